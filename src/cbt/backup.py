"""Backup: one recovery point of a VM's disks, sending only blocks the vault lacks.

1. Take the vault's writer lock; remove what a killed run left (temporary
   files, manifests of points never committed).  Packs a killed run finished
   stay: the index picks them up from their trailers, so their blocks are not
   sent again (resume, not restart).
2. Load the index.  Open every disk (errors now, before any work), fix its
   block size (a disk keeps the block size of its first backup) and find its
   previous point.
3. Split the disks into shards (every disk at least one, all cores busy) and
   run one forked worker per shard.  A worker maps its blocks in windows,
   hashes them with the core into shared arrays, looks the window's digests up
   in the index in one vectorised call, and appends the missing blocks,
   compressed, to packs of a few MiB that it writes durably as they fill.
4. Assemble each disk's manifest; count the blocks that differ from the
   disk's previous point (``cbt diff`` rules); write a full manifest (first
   backup) or a delta against the skip-chain base (see ``vault.points``).
5. Write an index segment for the new packs (one entry per digest, however
   many workers raced to store it), then the point record: its rename is the
   commit.  A crash anywhere before leaves earlier points untouched.
"""

from __future__ import annotations

import errno
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cbt._core import fast
from cbt.diff import diff_manifests
from cbt.durable import prepare_crash_counter
from cbt.errors import CbtIOError, CbtValueError
from cbt.manifest import Manifest, utc_now
from cbt.parallel import Report, fork_map, shared_array
from cbt.scan import (
    BlockRange,
    block_ranges,
    data_extents,
    default_workers,
    open_disk,
    split_ranges,
    windows,
)
from cbt.sizes import format_size
from cbt.vault import index as index_mod
from cbt.vault.lock import writer_lock
from cbt.vault.pack import TARGET_PACK_SIZE, PackWriter, pack_name
from cbt.vault.points import (
    DiskRecord,
    PointRecord,
    check_name,
    manifest_name,
    new_point_id,
    point_name,
)
from cbt.vault.vault import Vault

# Default block size of a disk's first backup, chosen by bench/block_size.py: on a
# database-like file with 1% of its 4 KiB pages rewritten, 16K blocks store 3.6x
# less than 64K (and 4K only 4x less again, at 4x the metadata and twice the scan
# time); on a file-system image changed in longer runs 16K stores the same as 64K.
DEFAULT_BACKUP_BLOCK_SIZE = 16 << 10

# (vm, label, bytes_done, bytes_total) a few times a second
BackupProgress = Callable[[str, str, int, int], None]


@dataclass(frozen=True)
class DiskSpec:
    label: str
    path: str


def parse_disk_arg(text: str) -> DiskSpec:
    """``PATH`` or ``LABEL=PATH`` (split at the first ``=`` only if a valid label precedes it)."""
    from cbt.vault.points import NAME_RE

    label, sep, rest = text.partition("=")
    if sep and NAME_RE.match(label) and rest:
        return DiskSpec(label, rest)
    stem = Path(text).name
    stem = stem.rsplit(".", 1)[0] if "." in stem[1:] else stem
    return DiskSpec(check_name("disk label", stem), text)


# The index of the run in progress: set before workers fork, so they share it.
_RUN_INDEX: index_mod.Index | None = None


@dataclass(frozen=True)
class _Shard:
    disk: int  # position in the run's disk list
    path: str
    fd: int
    size: int
    block_size: int
    ranges: list[BlockRange]
    digests: np.ndarray
    flags: np.ndarray
    vault_root: str


@dataclass
class _ShardResult:
    disk: int
    bytes_read: int
    digests: npt.NDArray[np.uint8]
    pack_uuid: npt.NDArray[np.uint8]
    offset: npt.NDArray[np.uint64]
    stored: npt.NDArray[np.uint32]
    raw: npt.NDArray[np.uint32]
    seconds: float


def _backup_shard(task: _Shard, report: Report) -> _ShardResult:
    """Hash a shard's blocks and store those the vault lacks (runs in a worker)."""
    from cbt.vault.storage import LocalStorage

    started = time.perf_counter()
    index = _RUN_INDEX if _RUN_INDEX is not None else index_mod.Index.empty()
    storage = LocalStorage(task.vault_root)
    bs = task.block_size
    stored_here: set[bytes] = set()
    entries: list[tuple[bytes, bytes, int, int, int]] = []
    writer = PackWriter()
    bytes_read = 0

    def flush() -> None:
        nonlocal writer
        if writer.entries:
            storage.put(pack_name(writer.pack_id), writer.finish())
            pid = uuid.UUID(hex=writer.pack_id).bytes
            entries.extend((d, pid, off, st, raw) for d, off, st, raw in writer.entries)
        writer = PackWriter()

    for lo, hi in task.ranges:
        for first, m in windows(task.fd, task.size, bs, lo, hi, task.path):
            n = fast.nblocks(len(m), bs)
            digests = task.digests[first:first + n]
            flags = task.flags[first:first + n]
            try:
                fast.hash_blocks(m, bs, digests, flags)
            except OSError as exc:
                raise CbtIOError(exc.errno, f"read error in {task.path} near byte "
                                 f"{first * bs}: {exc.strerror}") from None
            data_rows = np.nonzero(flags == fast.FLAG_DATA)[0]
            if len(data_rows):
                missing = data_rows[index.lookup(digests[data_rows]) < 0]
                view = memoryview(m)
                for row in missing.tolist():
                    d = digests[row].tobytes()
                    if d in stored_here:
                        continue
                    stored_here.add(d)
                    off = row * bs
                    writer.add(d, view[off:off + bs])
                    if len(writer) >= TARGET_PACK_SIZE:
                        flush()
                view.release()
            bytes_read += len(m)
            report(len(m))
    flush()
    k = len(entries)
    return _ShardResult(
        disk=task.disk,
        bytes_read=bytes_read,
        digests=np.frombuffer(b"".join(e[0] for e in entries), np.uint8).reshape(k, 32),
        pack_uuid=np.frombuffer(b"".join(e[1] for e in entries), np.uint8).reshape(k, 16),
        offset=np.array([e[2] for e in entries], dtype=np.uint64),
        stored=np.array([e[3] for e in entries], dtype=np.uint32),
        raw=np.array([e[4] for e in entries], dtype=np.uint32),
        seconds=time.perf_counter() - started,
    )


@dataclass
class _DiskPlan:
    spec: DiskSpec
    size: int
    block_size: int
    parent: DiskRecord | None
    seq: int
    ranges: list[BlockRange]
    digests: np.ndarray
    flags: np.ndarray


def _plan_disks(vault: Vault, prev: PointRecord | None, disks: Sequence[DiskSpec],
                block_size: int | None) -> tuple[list[_DiskPlan], list[int]]:
    plans, fds = [], []
    try:
        for spec in disks:
            disk = open_disk(spec.path)
            fds.append(disk.fd)
            parent = prev.disk(spec.label) if prev else None
            bs = parent.block_size if parent else (block_size or DEFAULT_BACKUP_BLOCK_SIZE)
            if parent and block_size and block_size != parent.block_size:
                raise CbtValueError(
                    f"disk {spec.label}: block size is fixed at {format_size(parent.block_size)} "
                    f"by its first backup; --block-size {format_size(block_size)} differs")
            n = fast.nblocks(disk.size, bs)
            plans.append(_DiskPlan(
                spec=spec, size=disk.size, block_size=bs, parent=parent,
                seq=parent.seq + 1 if parent else 0,
                ranges=block_ranges(data_extents(disk.fd, disk.size), bs),
                digests=shared_array((n, fast.DIGEST_SIZE), np.uint8),
                flags=shared_array((n,), np.uint8, fill=fast.FLAG_HOLE)))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return plans, fds


def _shards(plans: list[_DiskPlan], fds: list[int], workers: int,
            vault_root: str) -> list[_Shard]:
    total = sum(sum(hi - lo for lo, hi in p.ranges) for p in plans) or 1
    out: list[_Shard] = []
    for i, (p, fd) in enumerate(zip(plans, fds, strict=True)):
        blocks = sum(hi - lo for lo, hi in p.ranges)
        parts = max(1, round(workers * blocks / total))
        pieces = split_ranges(p.ranges, parts) or [[]]
        out.extend(_Shard(i, p.spec.path, fd, p.size, p.block_size, r, p.digests, p.flags,
                          vault_root) for r in pieces)
    return out


def backup(vault: Vault, vm: str, disks: Sequence[DiskSpec], block_size: int | None = None,
           workers: int | None = None, progress: BackupProgress | None = None,
           wait: float = 0.0, created: str | None = None,
           consistency: tuple[str, str] = ("crash", "live read")) -> PointRecord:
    """Back up ``disks`` of ``vm`` into ``vault``; returns the committed point."""
    global _RUN_INDEX
    check_name("VM name", vm)
    if not disks:
        raise CbtValueError("no disks to back up")
    labels = [d.label for d in disks]
    for label in labels:
        check_name("disk label", label)
    if len(set(labels)) != len(labels):
        raise CbtValueError(f"two disks share a label: {labels}")
    if block_size is not None:
        fast.check_block_size(block_size)
    started = time.perf_counter()
    prepare_crash_counter()
    with writer_lock(vault.root, wait):
        vault.clean_leftovers(vault.leftovers())
        warnings: list[str] = []
        index = vault.load_index(warnings)
        prev = vault.latest(vm)
        plans, fds = _plan_disks(vault, prev, disks, block_size)
        try:
            tasks = _shards(plans, fds, workers or default_workers(), vault.root)
            totals = [sum(min(hi * p.block_size, p.size) - lo * p.block_size
                          for lo, hi in p.ranges) for p in plans]
            report = None
            if progress:
                def report(done: npt.NDArray[np.uint64]) -> None:
                    per_disk = [0] * len(plans)
                    for t, d in zip(tasks, done.tolist(), strict=True):
                        per_disk[t.disk] += int(d)
                    for p, d, tot in zip(plans, per_disk, totals, strict=True):
                        progress(vm, p.spec.label, d, tot)
            _RUN_INDEX = index
            try:
                results = fork_map(_backup_shard, tasks, report)
            finally:
                _RUN_INDEX = None
        finally:
            for fd in fds:
                os.close(fd)
        return _commit(vault, vm, plans, results, index, prev, warnings, started, created,
                       consistency)


def _commit(vault: Vault, vm: str, plans: list[_DiskPlan], results: list[_ShardResult],
            index: index_mod.Index, prev: PointRecord | None, warnings: list[str],
            started: float, created: str | None,
            consistency: tuple[str, str]) -> PointRecord:
    created = created or utc_now()
    point_id = new_point_id(vm, created, set(vault.point_ids()))
    # one entry per digest across all workers; bytes_new counts a digest once
    seen: set[bytes] = set()
    keep: list[tuple[int, int]] = []
    per_disk_new = [0] * len(plans)
    per_disk_stored = [0] * len(plans)
    for ri, r in enumerate(results):
        for j in range(len(r.offset)):
            d = r.digests[j].tobytes()
            if d in seen:
                continue
            seen.add(d)
            keep.append((ri, j))
            per_disk_new[r.disk] += int(r.raw[j])
            per_disk_stored[r.disk] += int(r.stored[j])
    disk_records = []
    for i, p in enumerate(plans):
        rs = [r for r in results if r.disk == i]
        manifest = Manifest(p.block_size, p.size, np.array(p.digests), np.array(p.flags),
                            source=str(Path(p.spec.path).absolute()), created=created)
        if p.parent is not None and prev is not None:
            parent_manifest = vault.resolve(prev, p.spec.label)
            changed = diff_manifests(parent_manifest, manifest).changed_blocks
            base_point = vault.chain_base(vm, p.spec.label, p.seq)
        else:
            changed, base_point = manifest.blocks, None
        name = manifest_name(point_id, p.spec.label)
        if base_point is not None:
            base_manifest = vault.resolve(base_point, p.spec.label)
            delta = manifest.delta_from(base_manifest)
            delta.metadata = {"cbt.base": base_point.id, "cbt.seq": str(p.seq)}
            data = delta.to_bytes()
        else:
            data = manifest.to_bytes()
        vault.storage.put(name, data)
        import blake3

        disk_records.append(DiskRecord(
            label=p.spec.label, path=str(Path(p.spec.path).absolute()), size=p.size,
            block_size=p.block_size, blocks=manifest.blocks, changed_blocks=changed,
            bytes_read=sum(r.bytes_read for r in rs), bytes_new=per_disk_new[i],
            bytes_stored=per_disk_stored[i],
            seconds=round(max((r.seconds for r in rs), default=0.0), 6),
            manifest=name, manifest_checksum=blake3.blake3(data).hexdigest(),
            seq=p.seq if base_point is not None else 0,
            base=base_point.id if base_point is not None else None))
    _write_segment(vault, point_id, results, keep, index)
    record = PointRecord(
        id=point_id, vm=vm, created=created, consistency=consistency[0],
        consistency_reason=consistency[1], parent=prev.id if prev else None,
        disks=disk_records, bytes_new=sum(per_disk_new), bytes_stored=sum(per_disk_stored),
        seconds=round(time.perf_counter() - started, 6), warnings=warnings)
    vault.storage.put(point_name(point_id), record.to_json())
    _maybe_merge_segments(vault)
    return record


def _write_segment(vault: Vault, point_id: str, results: list[_ShardResult],
                   keep: list[tuple[int, int]], index: index_mod.Index) -> None:
    """Index entries for this run's packs and the orphan packs it adopted."""
    parts: dict[str, list[Any]] = {k: [] for k in ("digests", "pack_uuid", "offset", "stored",
                                                   "raw")}
    for ri, j in keep:
        r = results[ri]
        for k in parts:
            parts[k].append(getattr(r, k)[j:j + 1])
    if index.orphans:
        from cbt.vault.pack import pack_id_of

        adopted = index_mod.entries_for_packs(index, {pack_id_of(n) for n in index.orphans})
        for k in parts:
            parts[k].append(adopted[k])
    if not any(len(v) for v in parts["offset"]):
        return
    entries = {k: np.concatenate(v) for k, v in parts.items()}
    vault.storage.put(f"index/{point_id}.arrow", index_mod.segment_bytes(entries))


def _maybe_merge_segments(vault: Vault) -> None:
    """Merge many segments into one (after the commit; duplicates are harmless)."""
    segments = [s for s in vault.storage.list("index") if s.endswith(".arrow")]
    if len(segments) < index_mod.MERGE_AT:
        return
    index = vault.load_index()
    entries = index_mod.entries_for_packs(index, set(index.pack_ids))
    vault.storage.put(f"index/merged-{uuid.uuid4().hex}.arrow", index_mod.segment_bytes(entries))
    for s in segments:
        vault.storage.delete(s)


def require_disks_exist(disks: Sequence[DiskSpec]) -> None:
    for d in disks:
        if not os.path.exists(d.path):
            raise CbtIOError(errno.ENOENT, f"no such disk or image: {d.path}")
