"""Restore: write disks of a recovery point back, bit for bit.

1. Resolve the point's manifests and look every DATA block up in the index
   (a block the index lacks is an error before anything is written).
2. Choose what to write for each target:
   - a new file: created under a temporary name with the disk's size; holes
     and zero blocks are never written, so they stay holes;
   - a block device: every DATA block, and zero/hole ranges zeroed with
     ``BLKZEROOUT`` (skipped with ``assume_zeroed``); the device must be at
     least as large as the disk;
   - ``in_place`` (an older restore or the damaged original, file or device):
     the target is scanned first and only blocks whose digest differs are
     written; blocks that must read as zeros are punched (file) or zeroed
     (device).
3. Order the blocks by (pack, offset) and give each worker whole packs; a
   worker reads each pack's needed span with large sequential reads, checks
   every blob against its digest, and writes it at its block's offset.
4. fsync; a new file is then renamed into place and its directory fsynced.
   On any error temporary files are removed: no new target is left
   half-written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cbt.core.blockio import (
    Writeback,
    device_size,
    is_block_device,
    write_all,
    zero_range,
)
from cbt.core.durable import fsync_dir, fsync_file, temp_name
from cbt.core.errors import CbtError, CbtIOError, CbtValueError
from cbt.core.native import fast
from cbt.core.parallel import Report, fork_map
from cbt.format.manifest import Manifest
from cbt.format.pack import (
    BLOB,
    BLOB_MAGIC,
    CODEC_NONE,
    CODEC_ZSTD,
    ENCRYPTION_NONE,
    CorruptPackError,
    decode_blob,
    pack_name,
)
from cbt.format.records import PointRecord
from cbt.repo.index import Index
from cbt.repo.vault import Vault
from cbt.source.scan import default_workers, scan


class DamagedPointError(CbtError, ValueError):
    """A block of a point is missing from the vault or fails its digest."""


@dataclass(frozen=True)
class _Job:
    vault_root: str
    point: str
    label: str
    target: str
    block_size: int
    pack: str
    blocks: np.ndarray  # block numbers, in pack offset order
    digests: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray  # blob header + payload
    disk_size: int


# Consecutive blocks are gathered up to this many bytes, checked with one call
# into the core and written with one pwritev, straight from where they lie (the
# mapped pack, or the buffer a block was decompressed into): no copy of ours.
RUN_BYTES = 8 << 20
IOV_MAX = 1024


class _Run:
    """Consecutive blocks of one target on their way to disk."""

    def __init__(self, fd: int, job: _Job, writeback: Writeback) -> None:
        self.fd, self.bs, self.writeback = fd, job.block_size, writeback
        self.where = f"point {job.point} disk {job.label} block {{}} pack {{}}"
        self.used = 0
        self.views: list[bytes | memoryview] = []
        self.blocks: list[int] = []
        self.digests: list[np.ndarray] = []
        self.packs: list[str] = []

    def add(self, block: int, digest: np.ndarray, data: bytes | memoryview, pack: str) -> None:
        if self.blocks and (block != self.blocks[-1] + 1 or self.used >= RUN_BYTES):
            self.flush()
        self.views.append(data)
        self.used += len(data)
        self.blocks.append(block)
        self.digests.append(digest)
        self.packs.append(pack)

    def flush(self) -> None:
        n = len(self.blocks)
        if not n:
            return
        got = np.empty((n, fast.DIGEST_SIZE), dtype=np.uint8)
        fast.hash_each(self.views, got)
        bad = (got != np.stack(self.digests)).any(axis=1)
        if bad.any():
            i = int(np.argmax(bad))
            raise DamagedPointError(self.where.format(self.blocks[i], self.packs[i])
                                    + ": content does not match its digest")
        offset = self.blocks[0] * self.bs
        for k in range(0, n, IOV_MAX):
            chunk = self.views[k:k + IOV_MAX]
            want = sum(len(v) for v in chunk)
            done = os.pwritev(self.fd, chunk, offset)
            if done < want:  # a short write: finish it plainly
                write_all(self.fd, offset + done, b"".join(bytes(v) for v in chunk)[done:])
            self.writeback.written(self.fd, offset, want)
            offset += want
        self.used = 0
        self.views, self.blocks, self.digests, self.packs = [], [], [], []


def _restore_packs(jobs: list[_Job], report: Report) -> dict[str, tuple[int, int]]:
    """Write the blocks of a list of packs; returns label -> (bytes written, blocks verified)."""
    from cbt.repo.storage import LocalStorage

    stats: dict[str, tuple[int, int]] = {}
    fds: dict[str, int] = {}
    runs: dict[str, _Run] = {}
    writeback = Writeback()  # the disk starts writing while this worker still works
    try:
        for job in jobs:
            fd = fds.get(job.target)
            if fd is None:
                fd = fds[job.target] = os.open(job.target, os.O_WRONLY)
                runs[job.target] = _Run(fd, job, writeback)
            run = runs[job.target]
            storage = LocalStorage(job.vault_root)
            where = f"point {job.point} disk {job.label} block {{}} pack {job.pack}"
            try:
                pack = memoryview(_map_pack(storage, job.pack))  # unmapped when unused
            except (OSError, ValueError) as exc:
                raise DamagedPointError(f"{where.format(int(job.blocks[0]))}: {exc}") from None
            views = _job_data(job, pack, where)
            for blk, dig, data in zip(job.blocks.tolist(), job.digests, views, strict=True):
                run.add(blk, dig, data, job.pack)  # content checked when the run is flushed
            w, v = stats.get(job.label, (0, 0))
            stats[job.label] = (w + sum(len(d) for d in views), v + len(views))
            del pack, views
            report(int(job.lengths.sum()))
        for run in runs.values():
            run.flush()
    finally:
        try:
            for fd in fds.values():
                writeback.forget(fd)
                os.close(fd)
        finally:
            writeback.close()
    return stats


_BLOB_MAGIC = np.frombuffer(BLOB_MAGIC, dtype=np.uint8)


def _job_data(job: _Job, pack: memoryview, where: str) -> list[bytes | memoryview]:
    """The content of every block of a job, from the mapped pack.

    The blob headers are checked all at once (magic, digest, codec, encryption,
    lengths); a raw blob comes back as a view into the pack, a compressed one
    decompressed.  The content itself is checked later, run by run.  On any
    doubt the block goes through :func:`decode_blob`, which names the problem.
    """
    n = len(job.blocks)
    arr = np.frombuffer(pack, dtype=np.uint8)
    offs = job.offsets.astype(np.int64)
    bs = job.block_size
    want = np.minimum(bs, job.disk_size - job.blocks.astype(np.int64) * bs)
    ok = np.zeros(n, dtype=bool)
    if n and int((offs + job.lengths.astype(np.int64)).max()) <= len(arr):
        hdr = arr[offs[:, None] + np.arange(BLOB.size)]
        codec, enc = hdr[:, 36], hdr[:, 37]
        raw = np.ascontiguousarray(hdr[:, 40:44]).view("<u4").ravel().astype(np.int64)
        stored = np.ascontiguousarray(hdr[:, 44:48]).view("<u4").ravel().astype(np.int64)
        ok = ((hdr[:, :4] == _BLOB_MAGIC).all(axis=1) & (hdr[:, 4:36] == job.digests).all(axis=1)
              & (enc == ENCRYPTION_NONE) & ((codec == CODEC_NONE) | (codec == CODEC_ZSTD))
              & (stored + BLOB.size == job.lengths.astype(np.int64)) & (raw == want))
    out: list[bytes | memoryview] = []
    for i, (blk, off, ln) in enumerate(zip(job.blocks.tolist(), offs.tolist(),
                                           job.lengths.tolist(), strict=True)):
        if ok[i] and hdr[i, 36] == CODEC_NONE:
            out.append(pack[off + BLOB.size:off + ln])
            continue
        try:
            data = decode_blob(pack[off:off + ln], job.digests[i].tobytes(), where.format(blk),
                               check=False)
        except CorruptPackError as exc:
            raise DamagedPointError(str(exc)) from None
        if len(data) != int(want[i]):
            raise DamagedPointError(f"{where.format(blk)}: content has the wrong length")
        out.append(data)
    return out


def _map_pack(storage: Any, pack: str) -> Any:
    """Map a pack (or read it, where storage cannot map), from the trash if a gc moved it."""
    from cbt.repo.trash import trash_name

    for name in (pack_name(pack), trash_name(pack)):
        try:
            return storage.map(name)
        except OSError as exc:
            if exc.errno != errno.ENOENT or name != pack_name(pack):
                raise
    raise AssertionError("unreachable")


def plan_disk(vault: Vault, index: Index, point_id: str, label: str, manifest: Manifest,
              target: str, rows: npt.NDArray[np.int64] | None = None) -> list[_Job]:
    """One job per pack holding the DATA blocks ``rows`` (default: all) of this disk."""
    if rows is None:
        rows = np.nonzero(manifest.flags == fast.FLAG_DATA)[0]
    digests = manifest.digests[rows]
    pos = index.lookup(digests)
    if (pos < 0).any():
        blk = int(rows[np.argmax(pos < 0)])
        raise DamagedPointError(f"point {point_id} disk {label} block {blk}: not in the vault "
                                f"({int((pos < 0).sum())} blocks missing; run cbt verify)")
    packs = index.pack[pos]
    offsets = index.offset[pos]
    order = np.lexsort((offsets, packs))
    rows, digests, packs, offsets = rows[order], digests[order], packs[order], offsets[order]
    lengths = index.stored[pos][order].astype(np.uint64) + BLOB.size
    jobs = []
    bounds = np.nonzero(np.diff(packs.astype(np.int64)))[0] + 1
    for s, e in zip(np.r_[0, bounds], np.r_[bounds, len(rows)], strict=True):
        if s == e:
            continue
        jobs.append(_Job(vault.root, point_id, label, target, manifest.block_size,
                         index.pack_ids[int(packs[s])], rows[s:e], digests[s:e],
                         offsets[s:e], lengths[s:e], manifest.disk_size))
    return jobs


@dataclass
class _Target:
    """Where one disk goes and how."""

    label: str
    final: Path
    write_to: Path  # the temporary name for a new file, else ``final``
    size: int
    device: bool
    in_place: bool
    zero_rows: npt.NDArray[np.int64]  # blocks to make read as zeros
    zeroed: int = 0


def _zero_runs(rows: npt.NDArray[np.int64]) -> list[tuple[int, int]]:
    """Consecutive block numbers as (first, count) runs."""
    if len(rows) == 0:
        return []
    breaks = np.nonzero(np.diff(rows) != 1)[0] + 1
    starts = np.r_[0, breaks]
    ends = np.r_[breaks, len(rows)]
    return [(int(rows[s]), int(e - s)) for s, e in zip(starts, ends, strict=True)]


def _prepare(vault: Vault, index: Index, point: PointRecord, label: str, manifest: Manifest,
             final: Path, force: bool, in_place: bool, assume_zeroed: bool,
             workers: int | None) -> tuple[_Target, list[_Job]]:
    size, bs = manifest.disk_size, manifest.block_size
    device = is_block_device(final)
    is_data = manifest.flags == fast.FLAG_DATA
    data_rows = np.nonzero(is_data)[0]
    empty = np.zeros(0, dtype=np.int64)
    if device:
        fd = os.open(final, os.O_RDONLY)
        try:
            have = device_size(fd)
        finally:
            os.close(fd)
        if have < size:
            raise CbtValueError(f"device {final} holds {have} bytes; disk {label} needs {size}")
    elif final.exists() and not (force or in_place):
        raise CbtIOError(errno.EEXIST, f"target exists: {final} (use --force to replace it, "
                         "or --in-place to rewrite only the blocks that differ)")
    elif in_place and not final.is_file():
        raise CbtIOError(errno.ENOENT, f"--in-place needs an existing copy of the disk: {final}")
    if in_place:
        current = scan(final, bs, workers, limit=size)
        common = min(current.blocks, manifest.blocks)
        differs = np.ones(manifest.blocks, dtype=bool)
        differs[:common] = (current.digests[:common] != manifest.digests[:common]).any(axis=1)
        # a block past the target's old end reads as zeros once the file is extended
        was_nonzero = np.zeros(manifest.blocks, dtype=bool)
        was_nonzero[:common] = current.flags[:common] == fast.FLAG_DATA
        rows = np.nonzero(is_data & differs)[0]
        zero_rows = np.nonzero(~is_data & was_nonzero)[0]
        target = _Target(label, final, final, size, device, True, zero_rows)
    elif device:
        rows = data_rows
        zero_rows = empty if assume_zeroed else np.nonzero(~is_data)[0]
        target = _Target(label, final, final, size, True, False, zero_rows)
    else:
        rows = data_rows
        target = _Target(label, final, temp_name(final), size, False, False, empty)
    jobs = plan_disk(vault, index, point.id, label, manifest, str(target.write_to), rows)
    return target, jobs


def restore(vault: Vault, ref: str, to: str | os.PathLike[str], force: bool = False,
            workers: int | None = None, progress: Any = None, disk: str | None = None,
            in_place: bool = False, assume_zeroed: bool = False) -> dict[str, Any]:
    """Restore point ``ref``: every disk as ``to/LABEL.img``, or one ``disk`` to ``to``.

    ``to`` may be a block device when ``disk`` is given.  See the module doc for
    ``in_place`` and ``assume_zeroed``.
    """
    started = time.perf_counter()
    point = vault.point(ref)
    if disk is not None:
        if point.disk(disk) is None:
            raise CbtValueError(f"point {point.id} has no disk {disk!r} (it has "
                                f"{', '.join(d.label for d in point.disks)})")
        finals = {disk: Path(to)}
        out_dirs = {Path(to).parent}
        if not Path(to).parent.is_dir():
            raise CbtIOError(errno.ENOENT, f"no such directory for {to}: {Path(to).parent}")
    else:
        out_dir = Path(to)
        if out_dir.exists() and not out_dir.is_dir():
            raise CbtIOError(errno.ENOTDIR, f"not a directory: {out_dir} (name one disk with "
                             "--disk LABEL to restore it to a file or device)")
        out_dir.mkdir(parents=True, exist_ok=True)
        finals = {d.label: out_dir / f"{d.label}.img" for d in point.disks}
        out_dirs = {out_dir}
    warnings: list[str] = []
    index = vault.load_index(warnings)
    manifests = {label: vault.resolve(point, label) for label in finals}
    targets: list[_Target] = []
    jobs: list[_Job] = []
    try:
        for label, final in finals.items():
            target, disk_jobs = _prepare(vault, index, point, label, manifests[label], final,
                                         force, in_place, assume_zeroed, workers)
            targets.append(target)
            jobs += disk_jobs
            if not target.device:
                if target.write_to != target.final:
                    with open(target.write_to, "xb"):
                        pass
                os.truncate(target.write_to, target.size)
        results = _run_jobs(jobs, workers, progress)
        per_disk = {t.label: [0, 0] for t in targets}
        for stats in results:
            for label, (w, v) in stats.items():
                per_disk[label][0] += w
                per_disk[label][1] += v
        for t in targets:
            _zero_and_sync(t, manifests[t.label].block_size)
        for t in targets:
            if t.write_to != t.final:
                os.replace(t.write_to, t.final)
        for d in out_dirs:
            fsync_dir(d)
    except BaseException:
        for t in targets:
            if t.write_to != t.final:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(t.write_to)
        raise
    return {
        "recovery_point": point.id,
        "disks": [{"label": t.label, "to": str(t.final), "size": t.size,
                   "bytes_written": per_disk[t.label][0] + t.zeroed,
                   "blocks_verified": per_disk[t.label][1]} for t in targets],
        "seconds": round(time.perf_counter() - started, 6),
        "warnings": warnings,
    }


def _run_jobs(jobs: list[_Job], workers: int | None, progress: Any) -> list[dict[str, Any]]:
    """Run the pack jobs on forked workers, shared out by :func:`_balance`."""
    groups = [g for g in _balance(jobs, max(1, min(workers or default_workers(), len(jobs))))
              if g]
    total = sum(int(j.lengths.sum()) for j in jobs)
    report = (lambda done: progress(sum(done), total)) if progress else None
    return fork_map(_restore_packs, groups, report)


def _balance(jobs: list[_Job], n: int) -> list[list[_Job]]:
    """Share pack jobs out to ``n`` workers: equal bytes, and each file to as few as can be.

    The kernel serialises buffered writes to one file, so two workers writing the same
    file mostly wait for each other: a target that fits in what a worker has left goes
    to it whole (largest first); one that does not is poured into the workers with the
    most room, in pack order (two disks of 1.6 and 0.9 GB on two workers: one takes
    1.25 GB of the first, the other the rest of it and the second).  Work is counted in
    block bytes (what is verified and written), not in stored bytes.
    """
    by_target: dict[str, list[_Job]] = {}
    for job in jobs:
        by_target.setdefault(job.target, []).append(job)

    def size(js: list[_Job]) -> int:
        return sum(len(j.blocks) * j.block_size for j in js)

    quota = -(-size(jobs) // n)
    groups: list[list[_Job]] = [[] for _ in range(n)]
    load = [0] * n
    for target_jobs in sorted(by_target.values(), key=lambda js: -size(js)):
        k = load.index(min(load))
        if load[k] + size(target_jobs) <= quota + quota // 16:  # (slack: packs are lumps)
            groups[k] += target_jobs
            load[k] += size(target_jobs)
            continue
        order = sorted(range(n), key=load.__getitem__)  # most room first
        i = 0
        for job in target_jobs:
            work = len(job.blocks) * job.block_size
            while i < n - 1 and load[order[i]] + work / 2 > quota:  # (nearer the next one)
                i += 1
            groups[order[i]].append(job)
            load[order[i]] += work
    return groups


def _zero_and_sync(t: _Target, block_size: int) -> None:
    """Zero what must read as zeros, fix a file's size, fsync."""
    fd = os.open(t.write_to, os.O_WRONLY)
    try:
        for first, count in _zero_runs(t.zero_rows):
            lo = first * block_size
            hi = min((first + count) * block_size, t.size)
            zero_range(fd, lo, hi - lo, t.device)
            t.zeroed += hi - lo
        fsync_file(fd)
    finally:
        os.close(fd)


def instant_restore(vault: Vault, ref: str, to: str | os.PathLike[str], force: bool = False,
                    disk: str | None = None, verify: bool = True,
                    workers: int | None = None) -> dict[str, Any]:
    """Restore from the point's kept snapshot where there is one, else from the vault.

    A snapshot is cloned (reflink where the target is on the same file system,
    else copied) and re-hashed against the point's manifest unless ``verify``
    is off; a snapshot that does not match is not used.  Each disk says which
    source it came from.
    """
    from cbt.core.blockio import copy_sparse
    from cbt.repo.registry import kept_snapshots
    from cbt.source.snapshot import reflink

    started = time.perf_counter()
    point = vault.point(ref)
    labels = [disk] if disk is not None else [d.label for d in point.disks]
    if disk is not None and point.disk(disk) is None:
        raise CbtValueError(f"point {point.id} has no disk {disk!r}")
    entry = kept_snapshots(vault).get(point.id)
    kept = entry.disks if entry is not None else {}
    out_dir = Path(to).parent if disk is not None else Path(to)
    if disk is None:
        out_dir.mkdir(parents=True, exist_ok=True)
    disks_out = []
    warnings: list[str] = []
    for label in labels:
        final = Path(to) if disk is not None else out_dir / f"{label}.img"
        snap = kept.get(label)
        source = "vault"
        if snap and os.path.exists(snap):
            if final.exists() and not force:
                raise CbtIOError(errno.EEXIST, f"target exists: {final} (use --force)")
            tmp = temp_name(final)
            try:
                try:
                    reflink(snap, str(tmp))
                    how = "reflink"
                except OSError:
                    copy_sparse(snap, tmp)
                    how = "copy"
                manifest = vault.resolve(point, label)
                if verify:
                    got = scan(tmp, manifest.block_size, workers)
                    if got.disk_size != manifest.disk_size or not np.array_equal(
                            got.digests, manifest.digests):
                        raise DamagedPointError(f"kept snapshot {snap} does not match point "
                                                f"{point.id} disk {label}")
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    fsync_file(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, final)
                fsync_dir(final.parent)
                source = f"snapshot ({how}{', verified' if verify else ', not verified'})"
                disks_out.append({"label": label, "to": str(final), "size": manifest.disk_size,
                                  "bytes_written": 0 if how == "reflink" else manifest.disk_size,
                                  "blocks_verified": manifest.blocks if verify else 0,
                                  "source": source})
                continue
            except (CbtError, OSError) as exc:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                warnings.append(f"disk {label}: instant restore from the snapshot failed "
                                f"({exc}); restoring from the vault")
        elif snap:
            warnings.append(f"disk {label}: kept snapshot {snap} is gone; restoring from the "
                            "vault")
        target = final
        r = restore(vault, point.id, target, force=force, workers=workers, disk=label)
        d = r["disks"][0]
        d["source"] = source
        disks_out.append(d)
        warnings += r["warnings"]
    return {"recovery_point": point.id, "disks": disks_out,
            "seconds": round(time.perf_counter() - started, 6), "warnings": warnings}
