"""The vault index: block digest -> (pack, offset, stored length).

On disk it is a set of *segments* (``index/<run>.arrow``, Arrow IPC files with
a magic, a format version and a checksum), one written by each backup run for
the packs it created, merged into one when there are many.  A pack that no
segment covers (left by a killed run) is indexed from its own trailer, so the
next run reuses its blocks instead of sending them again.

In memory the index is a set of numpy arrays sorted by the digest's first 8
bytes; :meth:`Index.lookup` answers for a whole window of digests at once with
``searchsorted`` (no Python loop per block), which keeps millions of entries
fast and small (about 60 bytes an entry).  Where one entry is handed around
it is an :class:`IndexEntry` (:meth:`Index.entry`, :meth:`Index.find`).

1. Load: every segment (retrying when a writer merges them meanwhile), then
   the trailers of packs no segment covers (:func:`load`).
2. Look up digests in bulk (:meth:`Index.lookup`) or one at a time.
3. A run keeps its loaded index in an :class:`IndexCache` it hands to its
   workers (no module state), keyed by the segments and orphans it saw.

An encrypted vault's segments are sealed under opaque names: the vault lists
and reads them (``Vault.load_index`` passes ``segment_names`` and ``read``);
the digests in them are the vault's keyed block ids.
"""

from __future__ import annotations

import errno
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from cbt.core.errors import CbtError
from cbt.format import index_segment
from cbt.format.index_segment import CorruptIndexError, prefix_keys
from cbt.format.pack import (
    CorruptPackError,
    is_pack_name,
    pack_id_of,
    read_pack_trailer,
    scan_blobs,
)
from cbt.repo.storage import Storage

MERGE_AT = 16  # segments before a backup merges them into one


class IndexEntry(NamedTuple):
    """Where one block is stored: its blob is ``stored`` bytes after the blob header at
    ``offset`` in pack ``pack`` (an id), ``raw`` bytes once decompressed."""

    digest: bytes
    pack: str
    offset: int
    stored: int
    raw: int


@dataclass
class Index:
    digests: npt.NDArray[np.uint8]  # (n, 32)
    pack: npt.NDArray[np.uint32]  # (n,) index into pack_ids
    offset: npt.NDArray[np.uint64]
    stored: npt.NDArray[np.uint32]
    raw: npt.NDArray[np.uint32]
    pack_ids: list[str]
    keys: npt.NDArray[np.uint64]
    segments: list[str]
    orphans: list[str]  # packs indexed from their trailers (no segment yet)
    # segments that could not be read (damaged): name -> what is wrong; the packs they
    # covered are indexed from their own trailers (or blob headers) instead
    damaged: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    @classmethod
    def empty(cls) -> Index:
        return cls.build([], [], [])

    @classmethod
    def build(cls, parts: list[dict[str, Any]], segments: list[str],
              orphans: list[str]) -> Index:
        """Merge parts (dicts of arrays with a ``pack_ids`` list) keeping one entry per digest."""
        where: dict[str, int] = {}
        cols: dict[str, list[Any]] = {k: [] for k in ("digests", "pack", "offset", "stored",
                                                      "raw")}
        for part in parts:
            remap = np.array([where.setdefault(p, len(where)) for p in part["pack_ids"]],
                             dtype=np.uint32)
            cols["digests"].append(part["digests"])
            cols["pack"].append(remap[part["pack"]] if len(remap) else part["pack"])
            for k in ("offset", "stored", "raw"):
                cols[k].append(part[k])
        pack_ids = sorted(where, key=where.__getitem__)
        if parts:
            digests = np.concatenate(cols["digests"]).reshape(-1, 32)
            arrays = {k: np.concatenate(cols[k]) for k in ("pack", "offset", "stored", "raw")}
        else:
            digests = np.zeros((0, 32), dtype=np.uint8)
            arrays = {"pack": np.zeros(0, np.uint32), "offset": np.zeros(0, np.uint64),
                      "stored": np.zeros(0, np.uint32), "raw": np.zeros(0, np.uint32)}
        keys = prefix_keys(digests)
        # Sorting by the 8-byte prefix is enough: copies of a digest share it, so they
        # end up next to each other (a different digest with the same prefix between
        # two copies would only leave a harmless duplicate entry).  Segments are
        # written sorted, and a stable sort (timsort) of sorted runs is nearly linear.
        order = np.argsort(keys, kind="stable")
        keep = np.ones(len(order), dtype=bool)
        if len(order) > 1:
            sorted_keys = keys[order]
            same = np.nonzero(sorted_keys[1:] == sorted_keys[:-1])[0] + 1  # rare: compare all
            keep[same] = (digests[order[same]] != digests[order[same - 1]]).any(axis=1)
        order = order[keep]
        return cls(
            digests=np.ascontiguousarray(digests[order]),
            pack=arrays["pack"][order].astype(np.uint32),
            offset=arrays["offset"][order].astype(np.uint64),
            stored=arrays["stored"][order].astype(np.uint32),
            raw=arrays["raw"][order].astype(np.uint32),
            pack_ids=pack_ids,
            keys=keys[order],
            segments=segments,
            orphans=orphans,
        )

    def lookup(self, digests: npt.NDArray[np.uint8]) -> npt.NDArray[np.int64]:
        """Position of each digest in the index, or -1 where it is absent."""
        m = len(digests)
        out = np.full(m, -1, dtype=np.int64)
        n = len(self)
        if m == 0 or n == 0:
            return out
        q = prefix_keys(digests)
        pos = np.searchsorted(self.keys, q, side="left")
        inside = pos < n
        cand = np.where(inside, pos, 0)
        hit = inside & (self.keys[cand] == q)
        exact = hit & (self.digests[cand] == digests).all(axis=1)
        out[exact] = cand[exact]
        for i in np.nonzero(hit & ~exact)[0]:  # same 8-byte prefix, other digest: rare
            j = int(cand[i])
            while j < n and self.keys[j] == q[i]:
                if bytes(self.digests[j]) == bytes(digests[i]):
                    out[i] = j
                    break
                j += 1
        return out

    def entry(self, pos: int) -> IndexEntry:
        """The entry at a position :meth:`lookup` returned."""
        return IndexEntry(self.digests[pos].tobytes(), self.pack_ids[int(self.pack[pos])],
                          int(self.offset[pos]), int(self.stored[pos]), int(self.raw[pos]))

    def find(self, digest: bytes) -> IndexEntry | None:
        """The entry of one digest, or None."""
        pos = int(self.lookup(np.frombuffer(digest, dtype=np.uint8).reshape(1, 32))[0])
        return None if pos < 0 else self.entry(pos)

    def token(self) -> tuple[str, ...]:
        """What this index was loaded from: equal tokens, equal indexes."""
        return (*self.segments, "|", *self.orphans, "|", *sorted(self.damaged))


class IndexCache:
    """The index a run loaded, for its workers; passed to them, never a global.

    Threads share one cache; a forked worker inherits a copy with the index
    already in it; a worker elsewhere starts with an empty cache and loads
    the index once, for every shard of the same run (the same token).
    """

    def __init__(self, index: Index | None = None) -> None:
        self._index = index
        self._mutex = threading.Lock()

    def get(self, storage: Storage, token: tuple[str, ...],
            loader: Callable[[], Index] | None = None) -> Index:
        """The index with this token: the cached one, or loaded from ``storage``
        (by ``loader`` when given: an encrypted vault's unseals its segments)."""
        with self._mutex:
            if self._index is None or self._index.token() != token:
                self._index = loader() if loader is not None else load(storage)
            return self._index


# -- segments on disk ----------------------------------------------------------


def read_segment(data: bytes, where: str) -> dict[str, Any]:
    """A segment's checked entries, each row's pack as a number into ``pack_ids``."""
    part = index_segment.read_segment(data, where)
    return {**part, **_pack_numbers(part.pop("packs"))}


def _pack_numbers(packs: npt.NDArray[np.uint8]) -> dict[str, Any]:
    """Each row's pack (16 uuid bytes) as a number into a list of pack ids.

    numpy's unique is 7x faster on 8-byte integers than on 16-byte records, so
    it runs on the uuid's first 8 bytes, and the result is checked against all
    16 (two packs sharing 8 random bytes fall back to the slow way).
    """
    n = len(packs)
    if n == 0:
        return {"pack": np.zeros(0, dtype=np.uint32), "pack_ids": []}
    head = np.ascontiguousarray(packs[:, :8]).view("<u8").ravel()
    _, first, inverse = np.unique(head, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    uuids = packs[first]
    if not (uuids[inverse] == packs).all():
        _, first, inverse = np.unique(packs.view("V16").ravel(), return_index=True,
                                      return_inverse=True)
        inverse = inverse.reshape(-1)
        uuids = packs[first]
    return {"pack": inverse.astype(np.uint32),
            "pack_ids": [uuid.UUID(bytes=u.tobytes()).hex for u in uuids]}


def trailer_part(storage: Storage, name: str) -> dict[str, Any]:
    """Index entries of one pack, read from its trailer."""
    entries = read_pack_trailer(lambda offset, length: storage.read_range(name, offset, length),
                                storage.size(name), storage.where(name))
    n = len(entries)
    return {
        "digests": np.frombuffer(entries["digest"].tobytes(), dtype=np.uint8).reshape(n, 32),
        "pack": np.zeros(n, dtype=np.uint32),
        "pack_ids": [pack_id_of(name)],
        "offset": entries["offset"].astype(np.uint64),
        "stored": entries["stored"].astype(np.uint32),
        "raw": entries["raw"].astype(np.uint32),
    }


def load(storage: Storage, warnings: list[str] | None = None,
         segment_names: Callable[[], list[str]] | None = None,
         read: Callable[[str], bytes] | None = None, headers: bool = False) -> Index:
    """Read every segment, then index packs no segment covers from their trailers.

    ``segment_names`` lists the segments and ``read`` reads one (an encrypted
    vault's unseal them); by default, plain ``index/*.arrow`` files.
    Readers take no lock: when a writer merges segments under our feet (the
    merged one is written before the old ones go), a segment listed a moment
    ago can vanish; then we list again.

    A damaged segment is skipped (named in ``warnings`` and ``Index.damaged``):
    the packs it covered are indexed from their own trailers like any pack no
    segment covers, and with ``headers`` a pack whose trailer is lost too from
    its blob headers (a reader that checks every block it reads: restore,
    verify), as repair does.
    """
    names = segment_names or (lambda: [s for s in storage.list("index") if s.endswith(".arrow")])
    get = read or storage.get
    for _attempt in range(20):
        try:
            segments, parts, damaged = _read_segments(storage, names(), get)
            break
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
    else:
        raise CorruptIndexError(f"index segments of {storage.root} keep changing; retry")
    for why in damaged.values():
        if warnings is not None:
            warnings.append(f"ignoring damaged index segment: {why}; its packs are indexed "
                            "from their own trailers")
    covered = {p for part in parts for p in part["pack_ids"]}
    orphans = []
    for name in storage.list("packs"):
        if not is_pack_name(name) or pack_id_of(name) in covered:
            continue
        try:
            parts.append(trailer_part(storage, name))
            orphans.append(name)
        except CorruptPackError as exc:
            part = header_part(storage, name) if headers else None
            if part is not None:
                parts.append(part)
                orphans.append(name)
            elif warnings is not None:
                warnings.append(f"ignoring unreadable pack: {exc}")
    index = Index.build(parts, segments, orphans)
    index.damaged = damaged
    return index


def _read_segments(storage: Storage, names: list[str], get: Callable[[str], bytes]
                   ) -> tuple[list[str], list[dict[str, Any]], dict[str, str]]:
    """The segments that read, their parts, and the damaged ones (name -> why); a segment
    gone meanwhile raises ENOENT (the caller lists again)."""
    segments, parts, damaged = [], [], {}
    for name in names:
        try:
            parts.append(read_segment(get(name), storage.where(name)))
            segments.append(name)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise
            damaged[name] = str(exc)
        except CbtError as exc:
            damaged[name] = str(exc)
    return segments, parts, damaged


def header_part(storage: Storage, name: str) -> dict[str, Any] | None:
    """Index entries of one pack whose trailer is lost, from its blob headers (None when
    none parses).  Unchecked: only for readers that check each block they read."""
    try:
        blobs = scan_blobs(storage.get(name))
    except OSError:
        return None
    if not blobs:
        return None
    n = len(blobs)
    return {
        "digests": np.frombuffer(b"".join(b[0] for b in blobs), dtype=np.uint8).reshape(n, 32),
        "pack": np.zeros(n, dtype=np.uint32),
        "pack_ids": [pack_id_of(name)],
        "offset": np.array([b[1] for b in blobs], dtype=np.uint64),
        "stored": np.array([b[2] for b in blobs], dtype=np.uint32),
        "raw": np.array([b[3] for b in blobs], dtype=np.uint32),
    }


def segment_entries(entries: Sequence[IndexEntry]) -> dict[str, Any]:
    """Entries in segment form (:func:`segment_bytes`)."""
    n = len(entries)
    digests = np.frombuffer(b"".join(e.digest for e in entries), dtype=np.uint8)
    packs = np.frombuffer(b"".join(uuid.UUID(hex=e.pack).bytes for e in entries), dtype=np.uint8)
    return {
        "digests": digests.reshape(n, 32),
        "pack_uuid": packs.reshape(n, 16),
        "offset": np.array([e.offset for e in entries], dtype=np.uint64),
        "stored": np.array([e.stored for e in entries], dtype=np.uint32),
        "raw": np.array([e.raw for e in entries], dtype=np.uint32),
    }


def entries_for_packs(index: Index, packs: set[str]) -> dict[str, Any]:
    """The index entries whose pack is in ``packs``, in segment form."""
    sel = np.array([i for i, p in enumerate(index.pack_ids) if p in packs], dtype=np.uint32)
    mask = np.isin(index.pack, sel)
    uuids = np.frombuffer(b"".join(uuid.UUID(hex=p).bytes for p in index.pack_ids) or b"",
                          dtype=np.uint8).reshape(-1, 16)
    return {
        "digests": index.digests[mask],
        "pack_uuid": uuids[index.pack[mask]] if len(uuids) else np.zeros((0, 16), np.uint8),
        "offset": index.offset[mask],
        "stored": index.stored[mask],
        "raw": index.raw[mask],
    }
