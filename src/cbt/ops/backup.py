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
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cbt.core.durable import prepare_crash_counter
from cbt.core.errors import CbtError, CbtIOError, CbtValueError
from cbt.core.extents import data_extents
from cbt.core.native import fast
from cbt.core.parallel import Report, fork_map
from cbt.core.sizes import format_size
from cbt.core.timefmt import utc_now
from cbt.format.manifest import Manifest
from cbt.format.pack import TARGET_PACK_SIZE, PackWriter, pack_name
from cbt.format.records import (
    DiskRecord,
    PointRecord,
    check_name,
    manifest_name,
    new_point_id,
    point_name,
)
from cbt.ops.diff import diff_manifests
from cbt.repo import index as index_mod
from cbt.repo.lock import gc_lock, writer_lock
from cbt.repo.vault import Vault
from cbt.source.disks import DiskSpec
from cbt.source.scan import (
    BlockRange,
    BlockScan,
    PendingScan,
    block_ranges,
    default_workers,
    open_disk,
    split_ranges,
    windows,
)

# Default block size of a disk's first backup, chosen by bench/block_size.py: on a
# database-like file with 1% of its 4 KiB pages rewritten, 16K blocks store 3.3x
# less than 64K (and 4K only 3.5x less again, at 4x the metadata and twice the scan
# time); on a file-system image changed in longer runs 16K stores the same as 64K.
DEFAULT_BACKUP_BLOCK_SIZE = 16 << 10
PACKS_IN_FLIGHT = 2  # full packs of a worker queued for its writing thread
EARLY_SCAN_MAX_WAIT = 1.0  # seconds waited for the lock after which an early scan is dropped

# (vm, label, bytes_done, bytes_total) a few times a second
BackupProgress = Callable[[str, str, int, int], None]


# The index of the run in progress, set before workers start: forked workers and
# threads share it; a worker elsewhere (another host, a spawned process) loads
# the index itself and keeps it for the next shard of the same run.
_RUN_INDEX: tuple[tuple[str, ...], index_mod.Index] | None = None


def _index_for(vault_root: str, token: tuple[str, ...]) -> index_mod.Index:
    global _RUN_INDEX
    if _RUN_INDEX is None or _RUN_INDEX[0] != token:
        from cbt.repo.storage import LocalStorage

        _RUN_INDEX = (token, index_mod.load(LocalStorage(vault_root)))
    return _RUN_INDEX[1]


def _index_token(index: index_mod.Index) -> tuple[str, ...]:
    return (*index.segments, "|", *index.orphans)


@dataclass(frozen=True)
class _Shard:
    """One worker's share of one disk: picklable, so any Executor can run it."""

    disk: int  # position in the run's disk list
    label: str
    path: str  # what to read (the snapshot, or the disk itself)
    size: int
    block_size: int
    ranges: list[BlockRange]
    vault_root: str
    index_token: tuple[str, ...]
    live: bool = False
    # the whole disk's digests and flags from an early scan (shared memory, so only
    # for forked workers): the shard then hashes nothing and reads only new blocks
    prehash: tuple[Any, Any] | None = None


@dataclass
class _ShardResult:
    disk: int
    bytes_read: int
    block_digests: npt.NDArray[np.uint8]  # the shard's blocks, in range order
    block_flags: npt.NDArray[np.uint8]
    digests: npt.NDArray[np.uint8]
    pack_uuid: npt.NDArray[np.uint8]
    offset: npt.NDArray[np.uint64]
    stored: npt.NDArray[np.uint32]
    raw: npt.NDArray[np.uint32]
    seconds: float


def _backup_shard(task: _Shard, report: Report) -> _ShardResult:
    """Hash a shard's blocks and store those the vault lacks (runs in a worker)."""
    from cbt.repo.storage import LocalStorage

    started = time.perf_counter()
    index = _index_for(task.vault_root, task.index_token)
    storage = LocalStorage(task.vault_root)
    bs = task.block_size
    count = sum(hi - lo for lo, hi in task.ranges)
    all_digests = np.zeros((count, fast.DIGEST_SIZE), dtype=np.uint8)
    all_flags = np.zeros(count, dtype=np.uint8)
    disk = open_disk(task.path)
    if disk.size < task.size:
        disk.close()
        raise CbtIOError(errno.EIO, f"{task.path} shrank while it was read")
    stored_here: set[bytes] = set()
    entries: list[tuple[bytes, bytes, int, int, int]] = []
    writer = PackWriter()
    bytes_read = 0
    # A full pack is written and fsynced by a thread of its own while this one goes
    # on hashing and compressing; at most PACKS_IN_FLIGHT wait in memory for it.
    putter = ThreadPoolExecutor(max_workers=1)
    in_flight: deque[tuple[Future[None], PackWriter]] = deque()

    def settle(keep: int) -> None:
        while len(in_flight) > keep:
            fut, done = in_flight.popleft()
            fut.result()  # a failed write (ENOSPC...) fails the shard here
            pid = uuid.UUID(hex=done.pack_id).bytes
            entries.extend((d, pid, off, st, raw) for d, off, st, raw in done.entries)

    def flush() -> None:
        nonlocal writer
        if writer.entries:
            settle(PACKS_IN_FLIGHT - 1)
            in_flight.append((putter.submit(storage.put, pack_name(writer.pack_id),
                                            writer.finish()), writer))
        writer = PackWriter()

    try:
        base = 0  # position of the current range's first block in all_digests
        for lo, hi in task.ranges:
            for first, m in windows(disk.fd, task.size, bs, lo, hi, task.path,
                                    read_ahead=task.prehash is None):
                n = fast.nblocks(len(m), bs)
                at = base + first - lo
                digests = all_digests[at:at + n]
                flags = all_flags[at:at + n]
                if task.prehash is not None:
                    digests[:] = np.frombuffer(task.prehash[0], np.uint8, n * fast.DIGEST_SIZE,
                                               first * fast.DIGEST_SIZE).reshape(n, -1)
                    flags[:] = np.frombuffer(task.prehash[1], np.uint8, n, first)
                else:
                    try:
                        fast.hash_blocks(m, bs, digests, flags)
                    except OSError as exc:
                        raise CbtIOError(exc.errno, f"read error in {task.path} near byte "
                                         f"{first * bs}: {exc.strerror}") from None
                data_rows = np.nonzero(flags == fast.FLAG_DATA)[0]
                if len(data_rows):
                    missing = data_rows[index.lookup(digests[data_rows]) < 0]
                    with memoryview(m) as view:  # released before the window is unmapped
                        for row in missing.tolist():
                            d = digests[row].tobytes()
                            if d in stored_here:
                                continue
                            stored_here.add(d)
                            off = row * bs
                            # (an early scan's digest is older than the bytes read
                            # now, snapshot or not: they are hashed again as copied)
                            if task.live or task.prehash is not None:
                                actual = _add_live(writer, digests, flags, row,
                                                   view[off:off + bs], d)
                                if actual != d:  # changed under us: d itself was not stored
                                    stored_here.discard(d)
                                    stored_here.add(actual)
                            else:
                                with view[off:off + bs] as block:
                                    writer.add(d, block)
                            if len(writer) >= TARGET_PACK_SIZE:
                                flush()
                bytes_read += len(m)
                report(len(m))
            base += hi - lo
        flush()
        settle(0)
    finally:
        disk.close()
        putter.shutdown(wait=True, cancel_futures=True)
    k = len(entries)
    return _ShardResult(
        disk=task.disk,
        bytes_read=bytes_read,
        block_digests=all_digests,
        block_flags=all_flags,
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
    early: BlockScan | None = None  # the disk's early scan, when one matches


def _plan_disks(prev: PointRecord | None, disks: Sequence[DiskSpec],
                block_size: int | None) -> list[_DiskPlan]:
    plans = []
    for spec in disks:
        with open_disk(spec.source) as disk:
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
                digests=np.zeros((n, fast.DIGEST_SIZE), dtype=np.uint8),
                flags=np.full(n, fast.FLAG_HOLE, dtype=np.uint8)))
    return plans


def _shards(plans: list[_DiskPlan], parts_total: int, vault_root: str,
            token: tuple[str, ...]) -> list[_Shard]:
    """Shards of about equal size: every disk at least one, a large disk several.

    There may be a few more shards than workers (two disks of 1.7 and 0.9 GB on
    two cores make three); the kernel shares the cores, and all finish together.
    """
    total = sum(sum(hi - lo for lo, hi in p.ranges) for p in plans)
    quota = max(1, -(-total // parts_total))
    out: list[_Shard] = []
    for i, p in enumerate(plans):
        blocks = sum(hi - lo for lo, hi in p.ranges)
        pieces = split_ranges(p.ranges, max(1, -(-blocks // quota))) or [[]]
        prehash = (p.early.digests, p.early.flags) if p.early is not None else None
        out.extend(_Shard(i, p.spec.label, p.spec.source, p.size, p.block_size, r, vault_root,
                          token, p.spec.live, prehash) for r in pieces)
    return out


def _take_early_scan(early: PendingScan, plans: list[_DiskPlan], vm: str,
                     progress: BackupProgress | None) -> None:
    """Wait for the early scan; each disk it covers (same file, size, block size) takes its result.

    Only disks with a previous point use it: a first backup stores every block,
    and reads each once, hashing and storing it in the same pass.
    """
    match: dict[int, _DiskPlan] = {}
    for k, (source, block_size, size) in enumerate(early.disks()):
        for p in plans:
            if (p.parent is not None and all(p is not q for q in match.values())
                    and os.path.abspath(p.spec.source) == source
                    and (p.block_size, p.size) == (block_size, size)):
                match[k] = p
                break

    def report(k: int, done: int, total: int) -> None:
        if progress and k in match:
            progress(vm, match[k].spec.label, done, total)

    if not match:
        return
    try:
        scans = early.wait(disk_progress=report)
    except (CbtError, OSError):  # the early scan is only a head start: hash as usual
        return
    for k, p in match.items():
        p.early = scans[k]


def _add_live(writer: PackWriter, digests: np.ndarray, flags: np.ndarray, row: int,
              block_view: memoryview, digest: bytes) -> bytes:
    """Store a block of a disk read live: copy it, and record what the copy holds.

    The disk may have been written since the window was hashed; the point then
    records the block as copied (a live read is crash-consistent at best), so
    the stored bytes always match the manifest's digest.
    """
    import blake3

    with block_view:
        block = bytes(block_view)
    actual = blake3.blake3(block).digest()
    if actual != digest:
        if block.count(0) == len(block):
            digests[row] = 0
            flags[row] = fast.FLAG_ZERO
            return actual
        digests[row] = np.frombuffer(actual, dtype=np.uint8)
    writer.add(actual, block)
    return actual


def _run_shard(task: _Shard) -> _ShardResult:
    """Entry point for an Executor (no progress counter to report to)."""
    return _labelled_shard(task, lambda n: None)


def _labelled_shard(task: _Shard, report: Report) -> _ShardResult:
    """Run a shard; an error says which disk it concerns."""
    try:
        return _backup_shard(task, report)
    except OSError as exc:
        raise CbtIOError(exc.errno, f"disk {task.label}: {exc.strerror or exc}") from None
    except CbtError as exc:
        raise CbtIOError(errno.EIO, f"disk {task.label}: {exc}") from None


def _run_shards(tasks: list[_Shard], executor: Executor | None,
                report: Callable[[list[int]], None] | None,
                ignore_stop_signals: bool = False) -> list[_ShardResult]:
    if executor is None:
        return fork_map(_labelled_shard, tasks, report, ignore_stop_signals=ignore_stop_signals)
    done = [0] * len(tasks)
    futures = {executor.submit(_run_shard, t): k for k, t in enumerate(tasks)}
    results: list[_ShardResult | None] = [None] * len(tasks)
    try:
        for fut in as_completed(futures):
            k = futures[fut]
            results[k] = fut.result()
            done[k] = results[k].bytes_read  # type: ignore[union-attr]
            if report:
                report(done)
    except BaseException:
        for fut in futures:
            fut.cancel()
        raise
    return [r for r in results if r is not None]


def check_disks(vm: str, disks: Sequence[DiskSpec], block_size: int | None) -> None:
    """Names, labels and block size, before anything runs."""
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


def backup(vault: Vault, vm: str, disks: Sequence[DiskSpec], block_size: int | None = None,
           workers: int | None = None, progress: BackupProgress | None = None,
           wait: float = 0.0, created: str | None = None,
           consistency: tuple[str, str] = ("crash", "live read"),
           executor: Executor | None = None, slot: str | None = None,
           early: PendingScan | None = None) -> PointRecord:
    """Back up ``disks`` of ``vm`` into ``vault``; returns the committed point.

    Takes the vault's writer lock (waiting up to ``wait`` seconds).  The work
    runs on forked workers (``workers``, default one per core), or on any
    ``concurrent.futures.Executor`` given as ``executor``.  ``early`` is a scan
    of the disks started beforehand (:func:`cbt.ops.early_scan.start_early_scan`).
    """
    try:
        check_disks(vm, disks, block_size)
        prepare_crash_counter()
        asked = time.monotonic()
        with writer_lock(vault.storage, wait):
            if early is not None and time.monotonic() - asked > EARLY_SCAN_MAX_WAIT:
                early.cancel()  # it saw the disks too long before the point was taken
                early = None
            return backup_locked(vault, vm, disks, block_size=block_size, workers=workers,
                                 progress=progress, created=created, consistency=consistency,
                                 executor=executor, slot=slot, early=early)
    finally:
        if early is not None:
            early.cancel()


def backup_locked(vault: Vault, vm: str, disks: Sequence[DiskSpec],
                  block_size: int | None = None, workers: int | None = None,
                  progress: BackupProgress | None = None, created: str | None = None,
                  consistency: tuple[str, str] = ("crash", "live read"),
                  executor: Executor | None = None, point_id: str | None = None,
                  warnings: list[str] | None = None, slot: str | None = None,
                  early: PendingScan | None = None,
                  before_commit: Callable[[], list[str]] | None = None,
                  ignore_stop_signals: bool = False) -> PointRecord:
    """:func:`backup` for a caller that already holds the writer lock (a job).

    ``before_commit`` runs when every disk is read, before the commit; the
    warnings it returns go into the point (a job's post hook after a live read).
    With ``ignore_stop_signals`` forked workers ignore SIGTERM and SIGINT (a
    daemon's job in flight finishes).
    """
    started = time.perf_counter()
    check_disks(vm, disks, block_size)
    vault.clean_leftovers(vault.leftovers())
    warnings = list(warnings or [])
    index = vault.load_index(warnings)
    prev = vault.latest(vm)
    plans = _plan_disks(prev, disks, block_size)
    if early is not None:
        if executor is None:  # (its results live in shared memory: forked workers only)
            _take_early_scan(early, plans, vm, progress)
        early.cancel()
    n_workers = workers or default_workers()
    token = _index_token(index)
    # more shards than workers on an Executor, so progress moves as shards finish
    tasks = _shards(plans, n_workers if executor is None else 4 * n_workers, vault.root, token)
    totals = [sum(min(hi * p.block_size, p.size) - lo * p.block_size for lo, hi in p.ranges)
              for p in plans]
    report = None
    if progress:
        def report(done: list[int]) -> None:
            # (a disk of the early scan counted its bytes then: it stays full)
            per_disk = [tot if p.early else 0 for p, tot in zip(plans, totals, strict=True)]
            for t, d in zip(tasks, done, strict=True):
                if not plans[t.disk].early:
                    per_disk[t.disk] += int(d)
            for p, d, tot in zip(plans, per_disk, totals, strict=True):
                progress(vm, p.spec.label, d, tot)
    global _RUN_INDEX
    _RUN_INDEX = (token, index)
    try:
        results = _run_shards(tasks, executor, report, ignore_stop_signals)
    finally:
        _RUN_INDEX = None
    if before_commit is not None:
        warnings += before_commit()
    for t, r in zip(tasks, results, strict=True):
        p = plans[t.disk]
        at = 0
        for lo, hi in t.ranges:
            p.digests[lo:hi] = r.block_digests[at:at + hi - lo]
            p.flags[lo:hi] = r.block_flags[at:at + hi - lo]
            at += hi - lo
    return _commit(vault, vm, plans, results, index, prev, warnings, started, created,
                   consistency, point_id, slot)


def _commit(vault: Vault, vm: str, plans: list[_DiskPlan], results: list[_ShardResult],
            index: index_mod.Index, prev: PointRecord | None, warnings: list[str],
            started: float, created: str | None,
            consistency: tuple[str, str], point_id: str | None = None,
            slot: str | None = None) -> PointRecord:
    created = created or utc_now()
    point_id = point_id or new_point_id(vm, created, set(vault.point_ids()))
    new = _new_entries(results)
    per_disk_new = np.bincount(new["disk"], weights=new["raw"],
                               minlength=len(plans)).astype(np.int64).tolist()
    per_disk_stored = np.bincount(new["disk"], weights=new["stored"],
                                  minlength=len(plans)).astype(np.int64).tolist()
    disk_records = []
    for i, p in enumerate(plans):
        rs = [r for r in results if r.disk == i]
        manifest = Manifest(p.block_size, p.size, p.digests, p.flags,
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
            seconds=round(max((r.seconds for r in rs), default=0.0)
                          + (p.early.seconds if p.early else 0.0), 6),
            manifest=name, manifest_checksum=blake3.blake3(data).hexdigest(),
            seq=p.seq if base_point is not None else 0,
            base=base_point.id if base_point is not None else None))
    record = PointRecord(
        id=point_id, vm=vm, created=created, consistency=consistency[0],
        consistency_reason=consistency[1], parent=prev.id if prev else None,
        disks=disk_records, bytes_new=sum(per_disk_new), bytes_stored=sum(per_disk_stored),
        seconds=round(time.perf_counter() - started, 6), warnings=warnings, slot=slot)
    with gc_lock(vault.storage, wait=None):  # a gc in progress finishes first
        index = _after_gc(vault, index, plans, new["digests"])
        _write_segment(vault, point_id, new, index)
        record.seconds = round(time.perf_counter() - started, 6)
        vault.storage.put(point_name(point_id), record.to_json())
    _maybe_merge_segments(vault)
    return record


def _after_gc(vault: Vault, index: index_mod.Index, plans: list[_DiskPlan],
              stored_now: npt.NDArray[np.uint8]) -> index_mod.Index:
    """If a gc ran during this backup, make sure every block the point uses still exists.

    gc rewrites the index whenever it removes anything, so unchanged segments
    mean nothing moved.  Otherwise: blocks this run deduplicated against that
    gc declared dead are brought back from the trash, and the fresh index
    (not the stale one) decides which orphan packs this run's segment adopts.
    """
    from cbt.repo.trash import rescue

    current = {s for s in vault.storage.list("index") if s.endswith(".arrow")}
    if current == set(index.segments):
        return index
    fresh = vault.load_index()
    need: set[bytes] = set()
    for p in plans:
        data = p.digests[p.flags == fast.FLAG_DATA]
        missing = data[fresh.lookup(data) < 0]
        need.update(row.tobytes() for row in missing)
    need -= {row.tobytes() for row in stored_now}
    if need:
        still = rescue(vault.storage, need)
        if still:
            raise CbtIOError(errno.EIO, f"{len(still)} blocks this backup relies on vanished "
                             "from the vault (removed by gc?); run the backup again")
        fresh = vault.load_index()
    return fresh


_ENTRY_KEYS = ("digests", "pack_uuid", "offset", "stored", "raw")


def _new_entries(results: list[_ShardResult]) -> dict[str, Any]:
    """The blocks this run stored, one entry per digest however many workers raced to
    store it (the first wins; the spare copy is left for gc), with the disk of each."""
    cols = {k: np.concatenate([getattr(r, k) for r in results]) if results else
            np.zeros(0) for k in _ENTRY_KEYS}
    disk = np.concatenate([np.full(len(r.offset), r.disk, dtype=np.int64) for r in results]) \
        if results else np.zeros(0, dtype=np.int64)
    digests = np.ascontiguousarray(cols["digests"], dtype=np.uint8).reshape(-1, 32)
    _, first = np.unique(digests.view("V32").ravel(), return_index=True)
    keep = np.sort(first)
    out = {k: v[keep] for k, v in cols.items()}
    out["digests"] = digests[keep]
    out["disk"] = disk[keep]
    return out


def _write_segment(vault: Vault, point_id: str, new: dict[str, Any],
                   index: index_mod.Index) -> None:
    """Index entries for this run's packs and the orphan packs it adopted."""
    parts: dict[str, list[Any]] = {k: [new[k]] for k in _ENTRY_KEYS}
    if index.orphans:
        from cbt.format.pack import pack_id_of

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

