"""Copy recovery points from one vault to another (``cbt copy SRC DST``).

Only the Vault and Storage APIs are used (no paths), so any storage works on
either side.  For each point, parents first:

1. A point DST holds already is skipped when it is the same point (vm, created,
   consistency, disks, and each disk's rows and flags; the digests too when both
   vaults name blocks alike); a different point under the same id is an error.
2. Every DATA block of the point's resolved manifests gets its id in DST: the
   same id when both vaults name blocks with the same key (both unencrypted);
   else the block is read from SRC, checked against SRC's id (SRC is untrusted),
   and hashed with DST's key.  Ids learned are kept for the run, and taken from
   the points DST already holds that were copied before (their rows line up), so
   an incremental copy reads only the blocks that changed.
3. Blocks DST lacks are stored in new DST packs (sealed with DST's cipher).
4. The manifests are written **full** in DST (seq 0, no base): SRC's delta chains
   go through points (hidden ones, pruned ones' bases) that need not be copied,
   and a full manifest makes each copied point stand alone; a manifest is small
   next to the blocks it names.
5. Under the gc lock: blocks deduplicated against that a concurrent gc trashed are
   rescued, the index segment written (adopting orphan packs of a killed run),
   then the point record, with ``copied_from`` = SRC's vault id.  The record is
   written last: a copy killed at any moment leaves no half point, and running it
   again reuses the packs already written (they are indexed from their trailers).

DST is shared with backups (:func:`cbt.repo.lock.shared_lock`) throughout, and each
VM's points are copied holding that VM's lock in DST (:func:`cbt.repo.lock.vm_lock`), as
a backup of it does: a copy and a backup of one VM never run at once; SRC is only read.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import os
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from cbt.core.errors import CbtError, CbtIOError, CbtValueError
from cbt.core.native import fast
from cbt.format.manifest import Manifest
from cbt.format.pack import BLOB, TARGET_PACK_SIZE, PackWriter, block_id, decode_blob, pack_name
from cbt.format.records import DiskRecord, PointRecord, id_order
from cbt.repo import index as index_mod
from cbt.repo import segments
from cbt.repo.index import Index
from cbt.repo.lock import check_held, commit_point, gc_lock, shared_lock, vm_lock
from cbt.repo.trash import read_pack_range
from cbt.repo.uploader import read_ahead, shared_uploader
from cbt.repo.vault import Vault

CopyProgress = Callable[[int, int], None]  # (bytes done, bytes to read) of the point


class CopyError(CbtError, ValueError):
    """A point cannot be copied (a damaged block in SRC, a clash in DST)."""


@dataclass
class CopiedPoint:
    id: str
    bytes_sent: int = 0  # bytes written to DST's packs
    blocks_new: int = 0  # blocks DST did not hold
    blocks_read: int = 0  # blocks read from SRC
    skipped: bool = False  # DST held it already

    def to_dict(self) -> dict[str, Any]:
        return {"type": "point", "recovery_point": self.id, "bytes_sent": self.bytes_sent,
                "blocks_new": self.blocks_new, "blocks_read": self.blocks_read,
                "skipped": self.skipped}


@dataclass
class CopyResult:
    points: list[CopiedPoint] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        copied = [p for p in self.points if not p.skipped]
        return {"type": "summary", "points_copied": len(copied),
                "points_skipped": len(self.points) - len(copied),
                "bytes_sent": sum(p.bytes_sent for p in copied),
                "blocks_new": sum(p.blocks_new for p in copied),
                "warnings": self.warnings}


def copy(src: Vault, dst: Vault, vm: str | None = None, refs: Sequence[str] = (),
         wait: float = 0.0, progress: CopyProgress | None = None,
         on_point: Callable[[CopiedPoint], None] | None = None) -> CopyResult:
    """Copy points of ``src`` (``refs``, else every point, of ``vm`` if given) into ``dst``."""
    if src.config["id"] == dst.config["id"] or _same_place(src, dst):
        raise CbtValueError(f"source and destination are the same vault ({src.root})")
    result = CopyResult()
    points = select_points(src, vm, refs, result.warnings)
    ids = IdMap(src, dst)
    for name, group in itertools.groupby(points, key=lambda p: p.vm):
        # a VM's points never beside a backup of it in DST (whose parent they would
        # fork); as a backup does: the VM's lock, then the vault shared with backups
        with vm_lock(dst, name, wait), shared_lock(dst.storage, wait, not dst.encrypted):
            for point in group:
                done = _copy_point(src, dst, point, ids, progress)
                result.points.append(done)
                if on_point is not None:
                    on_point(done)
    return result


def _same_place(src: Vault, dst: Vault) -> bool:
    a, b = src.storage.spec(), dst.storage.spec()
    if a == b:
        return True
    try:
        return os.path.samefile(src.root, dst.root)
    except (OSError, ValueError):
        return False


def select_points(src: Vault, vm: str | None, refs: Sequence[str],
                  warnings: list[str]) -> list[PointRecord]:
    """The points to copy, parents first (by VM, then by id: a parent is older)."""
    if refs:
        chosen = {p.id: p for p in (src.point(r) for r in refs)}
        points = [p for p in chosen.values() if vm is None or p.vm == vm]
        if len(points) != len(chosen):
            raise CbtValueError(f"a point named is not of VM {vm!r}")
    else:
        points = src.points(vm, warnings)
        if vm is not None and not points:
            raise CbtValueError(f"no recovery point of VM {vm!r} in {src.root}")
    return sorted(points, key=lambda p: (p.vm, id_order(p.id)))


class IdMap:
    """SRC block id -> DST block id, as learned (identity when both name blocks alike)."""

    def __init__(self, src: Vault, dst: Vault) -> None:
        self.same = src.id_key == dst.id_key
        self.known: dict[bytes, bytes] = {}

    def learn(self, src_digests: npt.NDArray[np.uint8],
              dst_digests: npt.NDArray[np.uint8]) -> None:
        if self.same:
            return
        for s, d in zip(_keys(src_digests), _keys(dst_digests), strict=True):
            self.known.setdefault(s, d)

    def get(self, digest: bytes) -> bytes | None:
        return digest if self.same else self.known.get(digest)


def _keys(digests: npt.NDArray[np.uint8]) -> list[bytes]:
    return [bytes(r) for r in np.ascontiguousarray(digests, dtype=np.uint8).reshape(-1, 32)]


# -- one point ------------------------------------------------------------------------


def _copy_point(src: Vault, dst: Vault, point: PointRecord, ids: IdMap,
                progress: CopyProgress | None) -> CopiedPoint:
    done = CopiedPoint(point.id)
    manifests = {d.label: _resolve(src, point, d.label) for d in point.disks}
    if dst.storage.exists(dst.point_name(point.id)):
        _check_same(src, dst, point, manifests, ids)
        done.skipped = True
        return done
    if point.parent is not None and dst.storage.exists(dst.point_name(point.parent)):
        _learn_from(src, dst, point.parent, ids)
    index = dst.load_index()
    store = _BlockStore(src, dst, point, index, ids, done)
    store.run(manifests, progress)
    disks = [_write_manifest(dst, point, d, manifests[d.label], ids) for d in point.disks]
    record = dataclasses.replace(point, disks=disks, hidden=False,
                                 copied_from=str(src.config["id"]))
    with gc_lock(dst.storage, None, not dst.encrypted):  # a gc in progress finishes first
        check_held(dst.storage)  # (a holder that lost its lease writes no segment)
        fresh = _after_gc(dst, index, manifests, ids, store.stored_digests())
        _write_segment(dst, store.entries, fresh)
        commit_point(dst, point.id, record.to_json())
    return done


def _resolve(vault: Vault, point: PointRecord, label: str) -> Manifest:
    try:
        return vault.resolve(point, label)
    except (CbtError, OSError) as exc:
        raise CopyError(f"point {point.id} disk {label} cannot be read in {vault.root}: "
                        f"{exc}") from None


def _data(m: Manifest) -> npt.NDArray[np.uint8]:
    out: npt.NDArray[np.uint8] = m.row_digests[m.row_flags == fast.FLAG_DATA]
    return out


def _learn_from(src: Vault, dst: Vault, point_id: str, ids: IdMap) -> None:
    """Ids from a point both vaults hold (a parent copied before): rows line up."""
    if ids.same:
        return
    try:
        theirs, ours = src.load_point(point_id), dst.load_point(point_id)
        if ours.copied_from != str(src.config["id"]):  # (another point of that id)
            return
        for d in theirs.disks:
            a, b = src.resolve(theirs, d.label), dst.resolve(ours, d.label)
            if np.array_equal(a.rows, b.rows) and np.array_equal(a.row_flags, b.row_flags):
                ids.learn(_data(a), _data(b))
    except (CbtError, OSError):
        return  # (only a shortcut: every block is then read and hashed)


def _check_same(src: Vault, dst: Vault, point: PointRecord, manifests: dict[str, Manifest],
                ids: IdMap) -> None:
    """DST's point of the same id is this one (then its ids are learned), else an error."""
    try:
        held = dst.load_point(point.id)
    except (CbtError, OSError) as exc:
        raise CopyError(f"point {point.id} exists in {dst.root} but cannot be read: "
                        f"{exc}") from None
    # where the vaults name blocks differently, digests cannot be compared: DST's point
    # is this one only if it was copied from this SRC (two vaults backing up one VM in
    # the same second hold two different points under one id)
    same = ((held.vm, held.created, held.consistency) ==
            (point.vm, point.created, point.consistency)
            and (ids.same or held.copied_from == str(src.config["id"]))
            and [(d.label, d.size, d.block_size) for d in held.disks] ==
            [(d.label, d.size, d.block_size) for d in point.disks])
    pairs = []
    for d in point.disks if same else []:
        ours, theirs = _resolve(dst, held, d.label), manifests[d.label]
        same = (np.array_equal(ours.rows, theirs.rows)
                and np.array_equal(ours.row_flags, theirs.row_flags)
                and (not ids.same or np.array_equal(ours.row_digests, theirs.row_digests)))
        if not same:
            break
        pairs.append((_data(theirs), _data(ours)))
    if not same:
        raise CopyError(f"{dst.root} holds another point under the id {point.id}: "
                        "not copied")
    for a, b in pairs:
        ids.learn(a, b)


class _BlockStore:
    """The blocks of one point that DST lacks: read from SRC (checked), stored in DST packs."""

    def __init__(self, src: Vault, dst: Vault, point: PointRecord, index: Index, ids: IdMap,
                 done: CopiedPoint) -> None:
        self.src, self.dst, self.point, self.index, self.ids = src, dst, point, index, ids
        self.done = done
        self.new: set[bytes] = set()
        self.entries: list[index_mod.IndexEntry] = []
        self.writer = PackWriter(cipher=dst.keys.cipher if dst.keys is not None else None,
                                 codec=dst.codec)
        self.puts: deque[Future[None]] = deque()  # packs on their way to DST

    def run(self, manifests: dict[str, Manifest], progress: CopyProgress | None) -> None:
        digests = [_data(m) for m in manifests.values()]
        every = np.concatenate(digests) if digests else np.zeros((0, 32), np.uint8)
        unique = [bytes(u) for u in np.unique(np.ascontiguousarray(every).view("V32").ravel())]
        todo = self._lacking(unique)
        src_index = self.src.load_index(headers=True)
        found = src_index.lookup(np.frombuffer(b"".join(todo), np.uint8).reshape(-1, 32))
        if (found < 0).any():
            lost = todo[int(np.nonzero(found < 0)[0][0])]
            raise CopyError(f"point {self.point.id}: block {lost.hex()} is not in "
                            f"{self.src.root} (run cbt verify there)")
        entries = sorted((src_index.entry(int(p)) for p in found),
                         key=lambda e: (e.pack, e.offset))
        total, done = sum(e.raw for e in entries), 0
        reads = read_ahead(self._read, read_batches(entries), self.src.storage.in_flight)
        with closing(reads):
            for batch, data in reads:
                for e in batch.entries:
                    at = e.offset - batch.start
                    self._copy_block(e, data[at:at + BLOB.size + e.stored])
                    done += e.raw
                if progress is not None:
                    progress(done, total)  # bytes read from SRC, of this point's
            self._flush()
            while self.puts:
                self.puts.popleft().result()  # (a failed put fails the copy: no record)

    def _read(self, batch: ReadBatch) -> memoryview:
        """A batch's bytes from SRC (one ranged read; a short one is an error)."""
        name = pack_name(batch.pack)
        want = batch.end - batch.start
        try:  # (from the trash when a gc on SRC moved the pack meanwhile)
            data = read_pack_range(self.src.storage, batch.pack, batch.start, want)
        except (CbtError, OSError) as exc:
            raise CopyError(f"point {self.point.id}: block {batch.entries[0].digest.hex()} "
                            f"cannot be read from {self.src.root}: {exc}") from None
        if len(data) != want:
            raise CopyError(f"point {self.point.id}: block {batch.entries[-1].digest.hex()} "
                            f"cannot be read from {self.src.root}: "
                            f"{self.src.storage.where(name)} ends at {batch.start + len(data)}, "
                            f"before {batch.end}")
        return memoryview(data)

    def _lacking(self, unique: list[bytes]) -> list[bytes]:
        """The SRC ids whose DST id is unknown, or known and not in DST (one index lookup)."""
        mapped = [self.ids.get(s) for s in unique]
        known = [i for i, m in enumerate(mapped) if m is not None]
        held = np.zeros(len(unique), dtype=bool)
        if known:
            ids = np.frombuffer(b"".join(mapped[i] or b"" for i in known), np.uint8)
            held[known] = self.index.lookup(ids.reshape(-1, 32)) >= 0
        return [unique[i] for i in np.nonzero(~held)[0].tolist()]

    def _held(self, dst_id: bytes | None) -> bool:
        if dst_id is None:
            return False
        return dst_id in self.new or self.index.find(dst_id) is not None

    def _copy_block(self, e: index_mod.IndexEntry, blob: memoryview) -> None:
        """Store a block read from SRC (its blob, checked here against its id)."""
        name = pack_name(e.pack)
        where = f"{self.src.storage.where(name)} at {e.offset}"
        try:
            cipher = self.src.keys.cipher if self.src.keys is not None else None
            plain = decode_blob(blob, e.digest, where, cipher=cipher, id_key=self.src.id_key)
        except (CbtError, OSError) as exc:
            raise CopyError(f"point {self.point.id}: block {e.digest.hex()} cannot be read "
                            f"from {self.src.root}: {exc}") from None
        self.done.blocks_read += 1
        dst_id = e.digest if self.ids.same else block_id(plain, self.dst.id_key)
        if not self.ids.same:
            self.ids.known[e.digest] = dst_id
        if self._held(dst_id):
            return
        self.writer.add(dst_id, plain)
        self.new.add(dst_id)
        if len(self.writer) >= TARGET_PACK_SIZE:
            self._flush()

    def _flush(self) -> None:
        writer = self.writer
        if not writer.entries:
            return
        self.writer = writer.fresh()
        data = writer.finish()
        storage = self.dst.storage
        if storage.in_flight > 1:  # (several puts in flight, settled before the index)
            while len(self.puts) >= storage.in_flight:
                self.puts.popleft().result()
            self.puts.append(shared_uploader(storage.in_flight).put(
                storage, pack_name(writer.pack_id), data))
        else:
            storage.put(pack_name(writer.pack_id), data)
        self.done.bytes_sent += sum(len(b) for b in data)
        self.done.blocks_new += len(writer.entries)
        self.entries += [index_mod.IndexEntry(d, writer.pack_id, off, st, raw)
                         for d, off, st, raw in writer.entries]

    def stored_digests(self) -> set[bytes]:
        return set(self.new)


@dataclass(frozen=True)
class ReadBatch:
    """Blobs of one SRC pack read with one request: bytes ``[start, end)`` of it."""

    pack: str
    start: int
    end: int
    entries: list[index_mod.IndexEntry]


READ_GAP = 256 << 10  # blobs of a pack closer than this are read in one request
READ_MOST = 8 << 20  # a request's bytes, at most (more only for one blob larger still)


def read_batches(entries: Sequence[index_mod.IndexEntry]) -> list[ReadBatch]:
    """Entries sorted by (pack, offset) as ranged reads: each pack's blobs less than
    :data:`READ_GAP` apart coalesced, up to :data:`READ_MOST` bytes a read."""
    out: list[ReadBatch] = []
    cur: list[index_mod.IndexEntry] = []
    start = end = 0
    for e in entries:
        e_end = e.offset + BLOB.size + e.stored
        if cur and (e.pack != cur[0].pack or e.offset - end >= READ_GAP
                    or max(end, e_end) - start > READ_MOST):
            out.append(ReadBatch(cur[0].pack, start, end, cur))
            cur = []
        if not cur:
            start, end = e.offset, e_end
        cur.append(e)
        end = max(end, e_end)
    if cur:
        out.append(ReadBatch(cur[0].pack, start, end, cur))
    return out


def _write_manifest(dst: Vault, point: PointRecord, d: DiskRecord, m: Manifest,
                    ids: IdMap) -> DiskRecord:
    """One disk's manifest in DST's ids, written full; its record in DST."""
    import blake3

    digests = m.row_digests.copy()
    is_data = m.row_flags == fast.FLAG_DATA
    if not ids.same:
        mapped = [ids.known[s] for s in _keys(digests[is_data])]
        digests[is_data] = np.frombuffer(b"".join(mapped), np.uint8).reshape(-1, 32)
    out = Manifest.sparse(m.block_size, m.disk_size, m.rows, digests, m.row_flags,
                          source=d.path, created=point.created)
    name = dst.manifest_name(point.id, d.label)
    stored = dst.seal("manifest", name, out.to_bytes())
    dst.storage.put(name, stored)
    return dataclasses.replace(d, manifest=name,
                               manifest_checksum=blake3.blake3(stored).hexdigest(),
                               seq=0, base=None)


def _after_gc(dst: Vault, index: Index, manifests: dict[str, Manifest], ids: IdMap,
              stored_now: set[bytes]) -> Index:
    """The index at the commit: blocks deduplicated against that a gc running meanwhile
    trashed are brought back (as a backup's commit does)."""
    from cbt.repo.trash import rescue

    if set(dst.segment_names()) == set(index.segments) | set(index.damaged):
        return index
    fresh = dst.load_index()
    need: set[bytes] = set()
    for m in manifests.values():
        for s in _keys(_data(m)):
            d = ids.get(s)
            if d is not None and d not in stored_now and fresh.find(d) is None:
                need.add(d)
    if need:
        if rescue(dst.storage, need):
            raise CbtIOError(errno.EIO, f"blocks this copy relies on vanished from "
                             f"{dst.root} (removed by gc?); run the copy again")
        fresh = dst.load_index()
    return fresh


def _write_segment(dst: Vault, entries: list[index_mod.IndexEntry], index: Index) -> None:
    """An index segment of this point's new blocks and the orphan packs it adopts (a
    killed copy's or backup's)."""
    parts = [index_mod.segment_entries(entries)]
    if index.orphans:
        from cbt.format.pack import pack_id_of

        parts.append(index_mod.entries_for_packs(index, {pack_id_of(n) for n in index.orphans}))
    if not sum(len(p["offset"]) for p in parts):
        return
    segments.write_entries(dst, f"copy-{uuid.uuid4().hex}",
                           {k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
