"""Restore: write every disk of a recovery point back, bit for bit.

1. Resolve the point's manifests and look every DATA block up in the index
   (a block the index lacks is an error before anything is written).
2. Create each target under a temporary name with the disk's size: holes and
   zero blocks are simply never written, so they stay holes.
3. Order the blocks by (pack, offset) and give each worker whole packs; a
   worker reads each pack's needed span with large sequential reads, checks
   every blob against its digest, and writes it at its block's offset.
4. fsync, rename to ``DIR/LABEL.img``, fsync the directory.  On any error the
   temporary files are removed: no target is left half-written.
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

from cbt._core import fast
from cbt.durable import fsync_dir, fsync_file, temp_name
from cbt.errors import CbtError, CbtIOError
from cbt.parallel import Report, fork_map
from cbt.scan import default_workers
from cbt.vault.index import Index
from cbt.vault.pack import BLOB, CorruptPackError, decode_blob, pack_name
from cbt.vault.vault import Vault

# Read a pack's needed span in one go when at least this share of it is needed.
DENSE = 0.25


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


def _restore_packs(jobs: list[_Job], report: Report) -> dict[str, tuple[int, int]]:
    """Write the blocks of a list of packs; returns label -> (bytes written, blocks verified)."""
    from cbt.vault.storage import LocalStorage

    stats: dict[str, tuple[int, int]] = {}
    fds: dict[str, int] = {}
    try:
        for job in jobs:
            fd = fds.get(job.target)
            if fd is None:
                fd = fds[job.target] = os.open(job.target, os.O_WRONLY)
            storage = LocalStorage(job.vault_root)
            name = pack_name(job.pack)
            lo = int(job.offsets[0])
            hi = int((job.offsets + job.lengths).max())
            span = None
            if int(job.lengths.sum()) >= DENSE * (hi - lo):
                span = storage.read_range(name, lo, hi - lo)
            for blk, dig, off, ln in zip(job.blocks.tolist(), job.digests, job.offsets.tolist(),
                                         job.lengths.tolist(), strict=True):
                where = (f"point {job.point} disk {job.label} block {blk} pack {job.pack}")
                raw = (memoryview(span)[off - lo:off - lo + ln] if span is not None
                       else storage.read_range(name, off, ln))
                try:
                    data = decode_blob(raw, dig.tobytes(), where)
                except CorruptPackError as exc:
                    raise DamagedPointError(str(exc)) from None
                os.pwrite(fd, data, blk * job.block_size)
                w, v = stats.get(job.label, (0, 0))
                stats[job.label] = (w + len(data), v + 1)
            report(int(job.lengths.sum()))
    finally:
        for fd in fds.values():
            os.close(fd)
    return stats


def plan_disk(vault: Vault, index: Index, point_id: str, label: str, manifest: Any,
              target: str) -> list[_Job]:
    """One job per pack holding blocks of this disk."""
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
                         offsets[s:e], lengths[s:e]))
    return jobs


def restore(vault: Vault, ref: str, to: str | os.PathLike[str], force: bool = False,
            workers: int | None = None, progress: Any = None) -> dict[str, Any]:
    """Restore every disk of point ``ref`` as ``to/LABEL.img``."""
    started = time.perf_counter()
    point = vault.point(ref)
    out_dir = Path(to)
    if out_dir.exists() and not out_dir.is_dir():
        raise CbtIOError(errno.ENOTDIR, f"not a directory: {out_dir}")
    targets = {d.label: out_dir / f"{d.label}.img" for d in point.disks}
    for t in targets.values():
        if t.exists() and not force:
            raise CbtIOError(errno.EEXIST, f"target exists: {t} (use --force to replace it)")
    warnings: list[str] = []
    index = vault.load_index(warnings)
    manifests = {d.label: vault.resolve(point, d.label) for d in point.disks}
    out_dir.mkdir(parents=True, exist_ok=True)
    temps = {label: temp_name(t) for label, t in targets.items()}
    jobs: list[_Job] = []
    try:
        for d in point.disks:
            with open(temps[d.label], "wb") as f:
                f.truncate(d.size)
            jobs += plan_disk(vault, index, point.id, d.label, manifests[d.label],
                              str(temps[d.label]))
        n = max(1, min(workers or default_workers(), len(jobs)))
        groups: list[list[_Job]] = [[] for _ in range(n)]
        load = [0] * n
        for job in sorted(jobs, key=lambda j: -int(j.lengths.sum())):
            k = load.index(min(load))
            groups[k].append(job)
            load[k] += int(job.lengths.sum())
        total = sum(load)
        report = (lambda done: progress(int(done.sum()), total)) if progress else None
        results = fork_map(_restore_packs, [g for g in groups if g], report)
        per_disk = {label: [0, 0] for label in targets}
        for stats in results:
            for label, (w, v) in stats.items():
                per_disk[label][0] += w
                per_disk[label][1] += v
        for label, tmp in temps.items():
            fd = os.open(tmp, os.O_RDONLY)
            try:
                fsync_file(fd)
            finally:
                os.close(fd)
            os.replace(tmp, targets[label])
        fsync_dir(out_dir)
    except BaseException:
        for tmp in temps.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    return {
        "recovery_point": point.id,
        "disks": [{"label": d.label, "to": str(targets[d.label]), "size": d.size,
                   "bytes_written": per_disk[d.label][0],
                   "blocks_verified": per_disk[d.label][1]} for d in point.disks],
        "seconds": round(time.perf_counter() - started, 6),
        "warnings": warnings,
    }
