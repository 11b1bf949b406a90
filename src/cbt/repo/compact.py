"""Index compaction: sorted runs of index entries merged into one, streamed.

Every index segment holds its entries sorted by digest, so many segments (or any
sorted streams of entries: gc's survivors, a repaired pack's blobs) become one by a
k-way merge that never holds more than a chunk of each input:

1. Each input is an iterator of *chunks* (dicts of equal-length arrays: ``digests``
   (n, 32) uint8, ``pack_uuid`` (n, 16) uint8, ``offset``, ``stored``, ``raw``), its
   digests strictly ascending across its chunks.
2. Each round takes, from every input, the entries up to the *cut*: the smallest
   last-buffered digest among the inputs with more to come (nothing after the cut can
   come before it), sorts them by digest, keeps the first copy of a digest (earlier
   inputs win: both copies are valid places of the same block), and hands them on.
3. An input whose buffer ran dry is refilled, and the rounds go on until every input
   is exhausted.  Memory: one chunk per input and one round's output (the merge is a
   generator: the consumer, a segment writer, takes each round before the next).

Which segments merge (:func:`choose`) is size-tiered: a segment's *tier* is how many
times TIER its entry count is above BASE; when WIDTH segments share the lowest
crowded tier they merge into one of the next tier.  A vault of N entries so keeps at
most (WIDTH - 1) segments a tier, about (WIDTH - 1) * log_TIER(N / BASE) in all, and
each entry is rewritten about log_TIER(N / BASE) times over its life: a backup's
small segment never drags the whole index through memory or the network.
Segments of the older Arrow format (read whole) merge as soon as there are any.

Digests are compared as 32-byte strings (numpy ``S32``: bytewise, the order
segments are written in), never by a prefix: ids that share 8 or 16 bytes (a
crafted vault's) merge in the right order too.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

KEYS = ("digests", "pack_uuid", "offset", "stored", "raw")
BASE = 4096  # entries: segments up to this size share the lowest tier
TIER = 4  # a tier spans entry counts within this factor
WIDTH = 4  # segments of one tier that merge together

Chunk = dict[str, Any]


def tier(entries: int) -> int:
    """The tier of a segment of ``entries`` entries (0 up to BASE)."""
    t, size = 0, BASE
    while entries > size:
        t, size = t + 1, size * TIER
    return t


def choose(segments: Sequence[tuple[str, int]], legacy: Sequence[str] = ()) -> list[str]:
    """The segments to merge now, given each paged segment's (name, entries) and the
    names of the legacy (Arrow) ones: all the legacy ones when there are any, else the
    segments of the lowest tier holding WIDTH or more, else none."""
    if legacy:
        return list(legacy)
    tiers: dict[int, list[str]] = {}
    for name, n in segments:
        tiers.setdefault(tier(n), []).append(name)
    crowded = [t for t, names in tiers.items() if len(names) >= WIDTH]
    return sorted(tiers[min(crowded)]) if crowded else []


def _as_s32(digests: npt.NDArray[np.uint8]) -> npt.NDArray[Any]:
    """Digests as one ``S32`` value each (a view: no copy when contiguous)."""
    return np.ascontiguousarray(digests, dtype=np.uint8).reshape(-1, 32).view("S32").ravel()


class _Input:
    """One sorted stream and the part of its current chunk not yet merged."""

    def __init__(self, chunks: Iterator[Chunk]) -> None:
        self._chunks = chunks
        self.buf: Chunk | None = None
        self.keys: npt.NDArray[Any] = np.zeros(0, "S32")
        self.done = False
        self._last: bytes | None = None
        self.fill()

    def fill(self) -> None:
        """Load the next non-empty chunk when the buffer is empty."""
        while not self.done and len(self.keys) == 0:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                self.done, self.buf = True, None
                return
            keys = _as_s32(chunk["digests"])
            if len(keys) == 0:
                continue
            if (len(keys) > 1 and not (keys[1:] > keys[:-1]).all()) or \
                    (self._last is not None and keys[0] <= self._last):
                raise ValueError("compaction input is not sorted by digest")
            self._last = bytes(keys[-1])
            self.buf, self.keys = chunk, keys

    def take(self, cut: bytes) -> Chunk | None:
        """The buffered entries up to ``cut``, removed from the buffer."""
        if self.buf is None or len(self.keys) == 0:
            return None
        n = int(np.searchsorted(self.keys, np.array(cut, "S32"), "right"))
        if n == 0:
            return None
        out = {k: self.buf[k][:n] for k in KEYS}
        self.buf = {k: self.buf[k][n:] for k in KEYS}
        self.keys = self.keys[n:]
        self.fill()
        return out


def merge(inputs: Sequence[Iterator[Chunk]]) -> Iterator[Chunk]:
    """Sorted streams of entries merged: sorted chunks, no digest twice."""
    streams = [_Input(it) for it in inputs]
    while True:
        live = [s for s in streams if s.buf is not None and len(s.keys)]
        if not live:
            return
        # the cut: the smallest last buffered digest (an input yet to be refilled may
        # hold anything after its own last one, never anything before it)
        cut = min(bytes(s.keys[-1]) for s in live)
        parts = [p for p in (s.take(cut) for s in live) if p is not None]
        out = _sorted_unique(parts)
        if len(out["offset"]):
            yield out


def _sorted_unique(parts: list[Chunk]) -> Chunk:
    """One round's entries sorted by digest, the first copy of each kept."""
    if len(parts) == 1:
        return parts[0]
    return sorted_unique({k: np.concatenate([p[k] for p in parts]) for k in KEYS})


def sorted_unique(cols: Chunk) -> Chunk:
    """Entries (digests as (n, 32) rows) sorted by digest, the first copy of each kept
    (a stable sort: the earlier copy first)."""
    keys = _as_s32(cols["digests"])
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    keep = np.ones(len(order), dtype=bool)
    keep[1:] = keys[1:] != keys[:-1]
    order = order[keep]
    return {k: v[order] for k, v in cols.items()}
