"""Paged index segments in a vault: opened to be searched in place, written streamed,
compacted in tiers.

1. Open (:func:`open_paged`): only the segment's trailer and head are read and checked
   (:class:`cbt.format.paged_index.PagedSegment`); its pages are read when a lookup
   needs them, from ``index/`` or, once a merge retired it, from the trash
   (:func:`cbt.repo.trash.read_segment_range`).
2. Write (:func:`write_paged`): sorted chunks of entries stream through a
   :class:`~cbt.format.paged_index.PagedWriter` into :meth:`Storage.put_stream`: the
   segment is never whole in memory, and it appears whole or not at all.
3. Compact (:func:`compact`, after a backup's commit, under the gc lock):
   :func:`cbt.repo.compact.choose` picks, from each segment's entry count (its
   trailer only), the segments of a crowded tier (or the legacy Arrow ones);
   :func:`cbt.repo.compact.merge` streams them into one new segment, and then the
   inputs are retired to the trash.  A kill before the new segment is whole
   leaves nothing; after, the entries twice until the next compaction: harmless (both
   copies name the same blob).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Collection, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from cbt.core.errors import CbtError
from cbt.format import paged_index
from cbt.format.paged_index import PagedSegment, PagedWriter
from cbt.repo import compact as tiers
from cbt.repo.index import foreign_segments, open_paged, read_segment, stored_size, uuid_table
from cbt.repo.trash import read_segment_range, retire_segment

if TYPE_CHECKING:
    from cbt.repo.storage import Storage
    from cbt.repo.vault import Vault

Chunk = dict[str, Any]
CHUNK = 4096  # entries a merge reads of each input at a time (a round: ~0.25 MB an input)


def _entries(storage: Storage, name: str) -> int:
    """The entries of the paged segment ``name`` (its trailer alone is read and checked)."""
    return paged_index.trailer_entries(
        lambda offset, length: read_segment_range(storage, name, offset, length),
        stored_size(storage, name), where=storage.where(name))


def write_paged(vault: Vault, name: str, chunks: Iterable[Chunk], total: int) -> int:
    """Write the sorted ``chunks`` (at most ``total`` entries) as the segment ``name`` of
    ``vault`` (raised to the format that says it holds paged segments first); the number
    of entries written."""
    vault.allow_paged_segments()
    cipher = vault.cipher
    written = [0]

    def stream() -> Iterator[bytes]:
        out: list[bytes] = []
        writer = PagedWriter(lambda b: out.append(bytes(b)), total=total, name=name,
                             cipher=cipher)
        for chunk in chunks:
            if len(chunk["offset"]):
                writer.add(chunk["digests"], chunk["pack_uuid"], chunk["offset"],
                           chunk["stored"], chunk["raw"])
                written[0] += len(chunk["offset"])
                yield from out
                out.clear()
        writer.finish()
        yield from out

    vault.storage.put_stream(name, stream())
    return written[0]


def first_copies(entries: Chunk) -> Chunk:
    """Entries in segment form (digests, pack_uuid: rows or flat bytes; offset, stored,
    raw) sorted by digest, the first copy of a digest kept."""
    n = len(entries["offset"])
    cols: dict[str, npt.NDArray[Any]] = {
        "digests": np.ascontiguousarray(entries["digests"], dtype=np.uint8).reshape(n, 32),
        "pack_uuid": np.ascontiguousarray(entries["pack_uuid"], dtype=np.uint8).reshape(n, 16),
        "offset": np.asarray(entries["offset"], dtype=np.uint64),
        "stored": np.asarray(entries["stored"], dtype=np.uint32),
        "raw": np.asarray(entries["raw"], dtype=np.uint32)}
    return tiers.sorted_unique(cols)


def write_entries(vault: Vault, run: str, entries: Chunk) -> str | None:
    """The entries (any order, copies allowed) as the new segment of ``run``; its name,
    or None when there are none."""
    if not len(entries["offset"]):
        return None
    kept = first_copies(entries)
    name = vault.segment_name(run)
    write_paged(vault, name, [kept], len(kept["offset"]))
    return name


def paged_chunks(segment: PagedSegment, entries: int = CHUNK,
                 drop_packs: Collection[str] = ()) -> Iterator[Chunk]:
    """A paged segment's entries in order, as chunks with pack uuids, leaving out the
    entries of the packs in ``drop_packs``."""
    uuids = uuid_table(segment.pack_ids)
    keep = np.array([p not in drop_packs for p in segment.pack_ids], dtype=bool)
    for part in segment.chunks(entries):
        rows = keep[part["pack"]] if len(keep) else np.zeros(0, dtype=bool)
        if not rows.all():
            part = {k: v[rows] for k, v in part.items()}
        yield {"digests": part["digests"], "pack_uuid": uuids[part["pack"]],
               "offset": part["offset"], "stored": part["stored"], "raw": part["raw"]}


def merge_paged(segments: Sequence[PagedSegment], writer: PagedWriter, *,
                entries: int = 1 << 15, drop_packs: Collection[str] = ()) -> int:
    """Stream the union of ``segments`` into ``writer`` (not finished here): one entry per
    digest, the first segment listing it winning, the entries of ``drop_packs`` left
    out; the number added.  Memory: about ``entries`` entries in flight, whatever the
    segments' sizes (each streams ``entries / len(segments)`` at a time)."""
    per = max(paged_index.PAGE_ENTRIES, entries // max(1, len(segments)))
    drop = set(drop_packs)
    added = 0
    for chunk in tiers.merge([paged_chunks(s, per, drop) for s in segments]):
        writer.add(chunk["digests"], chunk["pack_uuid"], chunk["offset"], chunk["stored"],
                   chunk["raw"])
        added += len(chunk["offset"])
    return added


def legacy_chunks(part: dict[str, Any], entries: int = CHUNK) -> Iterator[Chunk]:
    """A legacy (Arrow) segment's entries (read whole: :func:`cbt.repo.index.read_segment`)
    in digest order (a legacy segment is sorted by 8 bytes only, and may hold a digest
    twice), as chunks with pack uuids."""
    kept = first_copies({"digests": part["digests"], "pack_uuid": uuid_table(part["pack_ids"])
                          [part["pack"]], "offset": part["offset"], "stored": part["stored"],
                          "raw": part["raw"]})
    for at in range(0, len(kept["offset"]), entries):
        yield {k: v[at:at + entries] for k, v in kept.items()}


def compact(vault: Vault) -> str | None:
    """One compaction step if :func:`cbt.repo.compact.choose` picks any segments: the
    merged segment's name, or None.  Call under the gc lock."""
    names = vault.segment_names()
    cipher = vault.cipher
    paged = [n for n in names if vault.is_paged_segment(n)]
    legacy = [n for n in names if not vault.is_paged_segment(n)]
    # choosing needs each segment's entry count only: its trailer, not its head (a
    # backup still holds its own index's heads here: reading them all again would
    # double what the index costs in memory, and read every filter once more).  A
    # segment that does not open (damaged, crafted, gone) is left where it is, out of
    # the merge: the index names it damaged and covers its packs from their trailers,
    # and verify --repair replaces it; a merge must not stop every later commit.
    counts: dict[str, int] = {}
    for n in paged:
        with contextlib.suppress(CbtError):
            counts[n] = _entries(vault.storage, n)
    read: dict[str, dict[str, Any]] = {}
    for n in legacy:
        with contextlib.suppress(CbtError):
            read[n] = read_segment(vault.get_sealed("index", n), vault.storage.where(n))
    opened: dict[str, PagedSegment] = {}
    left_out: set[str] = set()
    while True:
        picked = tiers.choose(sorted((n, c) for n, c in counts.items() if n not in left_out),
                              [n for n in read if n not in left_out])
        if not picked:
            return None
        for n in picked:
            if n in counts and n not in opened:
                try:
                    opened[n] = open_paged(vault.storage, n, cipher)
                except CbtError:
                    left_out.add(n)
        # (the packs listed only now, when there is a merge to make: not at every commit;
        # a segment naming none of this vault's packs is never merged into one of ours)
        left_out.update(foreign_segments(vault.storage, vault.storage.list("packs"),
                                         {n: opened[n] for n in picked if n in opened}))
        if not left_out & set(picked):
            break
    inputs: list[Iterator[Chunk]] = []
    total = 0
    for n in picked:
        if n in opened:
            inputs.append(paged_chunks(opened[n]))
            total += opened[n].n
        else:
            inputs.append(legacy_chunks(read[n]))
            total += len(read[n]["offset"])
    name = vault.segment_name(f"merged-{uuid.uuid4().hex}")
    write_paged(vault, name, tiers.merge(inputs), total)
    for n in picked:
        retire_segment(vault.storage, n)
    return name


__all__ = ["compact", "legacy_chunks", "merge_paged", "open_paged", "paged_chunks",
           "write_paged"]
