"""Scan: turn a disk (image file or block device) into per-block digests.

1. Open the disk as a block source (:mod:`cbt.source.image`): its size, its
   data extents; a block lying wholly in a hole is HOLE and never read.
2. Plan shards of about equal bytes, one or more per disk
   (:mod:`cbt.source.plan`), and fork one worker per shard.
3. Each worker runs the one hash loop (:func:`cbt.source.read.hash_shard`):
   windows of the disk go to the core, which writes digests and flags
   straight into shared output buffers (no pickling, no copies).  The
   buffers hold one row per block read, in block order (``packed``): a
   hole costs nothing, so memory follows the data, not the disk's size.
4. The result is a :class:`BlockScan` (plain buffers and counts);
   :func:`scan` turns it into a :class:`~cbt.manifest.Manifest`.

``cbt scan`` without ``-o`` stops at step 4's buffers and never imports numpy
or pyarrow: a whole ``cbt`` process is timed against ``b3sum``, and those
imports alone cost more than a tenth of a second.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from cbt.core.native import fast
from cbt.core.parallel import Forked, Report, WorkerError, shared_buffer
from cbt.source.base import BlockSource
from cbt.source.image import explain_death, open_image
from cbt.source.plan import (
    BlockRange,
    DiskPlan,
    bytes_to_read,
    default_workers,
    plan_shards,
)
from cbt.source.read import hash_shard

if TYPE_CHECKING:
    from cbt.format.manifest import Manifest

DEFAULT_BLOCK_SIZE = 64 << 10

Progress = Callable[[int, int], None]

__all__ = ["DEFAULT_BLOCK_SIZE", "BlockScan", "PendingScan", "Progress", "default_workers",
           "scan", "scan_blocks", "start_scan"]


# NamedTuples, not dataclasses, in this module: importing dataclasses (and the
# inspect module under it) alone costs ``cbt scan`` 5 ms of start-up.
class _ScanTask(NamedTuple):
    source: BlockSource
    block_size: int
    ranges: list[BlockRange]
    digests: memoryview  # flat: 32 bytes per block of ``ranges``, from the shard's first row
    flags: memoryview
    key: bytes | None  # keyed BLAKE3 (an encrypted vault's block ids), or plain


def _scan_shard(task: _ScanTask, report: Report) -> int:
    """Hash one shard's blocks into the shared buffers; returns bytes read."""
    for _ in hash_shard(task.source, task.block_size, task.ranges, task.digests, task.flags,
                        report, packed=True, key=task.key):
        pass
    return bytes_to_read(task.ranges, task.block_size, task.source.size)


class BlockScan(NamedTuple):
    """What a scan found, as plain shared-memory buffers (no numpy needed).

    One row per block of ``ranges`` (the blocks read), in block order; every
    other block of the disk lies wholly in a hole.
    """

    source: str
    disk_size: int
    block_size: int
    digests: mmap.mmap  # 32 bytes per row; zeros for ZERO blocks
    flags: mmap.mmap  # one FLAG_* byte per row (DATA or ZERO)
    bytes_read: int
    seconds: float
    ranges: list[BlockRange]  # [first, end) block ranges the rows are, in order

    @property
    def rows(self) -> int:
        return sum(hi - lo for lo, hi in self.ranges)

    def summary(self) -> dict[str, Any]:
        """The keys of ``cbt scan --json`` (but ``warnings``)."""
        n = fast.nblocks(self.disk_size, self.block_size)
        k = self.rows
        counts = self.flags[:k].count
        return {
            "path": self.source,
            "size": self.disk_size,
            "block_size": self.block_size,
            "blocks": n,
            "data_blocks": counts(fast.FLAG_DATA),
            "zero_blocks": counts(fast.FLAG_ZERO),
            "hole_blocks": n - k,
            "bytes_read": self.bytes_read,
            "seconds": round(self.seconds, 6),
        }

    def to_dict(self) -> dict[str, Any]:
        """What ``cbt scan --json`` prints."""
        return {**self.summary(), "warnings": []}

    def block_numbers(self) -> Any:
        """The block number of each row (a numpy ``uint64`` array)."""
        from cbt.format.manifest import range_rows

        return range_rows(self.ranges)

    def manifest(self) -> Manifest:
        """The scan as a (sparse) :class:`Manifest`."""
        import numpy as np

        from cbt.core.timefmt import utc_now
        from cbt.format.manifest import Manifest

        k = self.rows
        m = Manifest.sparse(
            self.block_size, self.disk_size, self.block_numbers(),
            np.frombuffer(self.digests, np.uint8, k * fast.DIGEST_SIZE)
            .reshape(k, fast.DIGEST_SIZE),
            np.frombuffer(self.flags, np.uint8, k),
            source=self.source, created=utc_now())
        m.bytes_read, m.seconds = self.bytes_read, self.seconds
        return m


def scan(
    path: str | os.PathLike[str],
    block_size: int = DEFAULT_BLOCK_SIZE,
    workers: int | None = None,
    progress: Progress | None = None,
    limit: int | None = None,
    key: bytes | None = None,
) -> Manifest:
    """Scan a disk image or block device into a :class:`Manifest`.

    ``workers`` processes share the disk (default: one per core).  ``progress``
    is called with ``(bytes_done, bytes_to_read)`` a few times per second.
    ``limit`` scans only the first ``limit`` bytes (a disk restored onto a
    larger device).  ``key`` (32 bytes) gives keyed BLAKE3 digests, the block
    ids of an encrypted vault; without it they are plain BLAKE3.
    """
    return scan_blocks(path, block_size, workers, progress, limit, key).manifest()


def scan_blocks(
    path: str | os.PathLike[str],
    block_size: int = DEFAULT_BLOCK_SIZE,
    workers: int | None = None,
    progress: Progress | None = None,
    limit: int | None = None,
    key: bytes | None = None,
) -> BlockScan:
    """:func:`scan` up to its buffers: what ``cbt scan`` without ``-o`` needs."""
    pending = start_scan([(path, block_size)], workers, limit, key)
    return pending.wait(progress)[0]


class PendingScan:
    """Disks being scanned by forked workers while this process goes on.

    An incremental ``cbt backup`` starts scanning its disks before it has even
    imported numpy or loaded the vault's index, and collects the digests when
    it needs them.  :meth:`wait` returns one :class:`BlockScan` per disk;
    :meth:`cancel` stops the workers.
    """

    def __init__(self, sources: list[BlockSource], block_sizes: list[int],
                 workers: int, key: bytes | None = None) -> None:
        self.started = time.perf_counter()
        self.key = key  # what the digests are keyed with (a backup checks it is its vault's)
        self._sources = sources
        self._block_sizes = block_sizes
        plans = [DiskPlan(s.block_ranges(bs), bs, s.size)
                 for s, bs in zip(sources, block_sizes, strict=True)]
        self._plans = plans
        self._to_read = [p.to_read for p in plans]
        # one row per block read (packed): holes take no memory
        rows = [sum(hi - lo for lo, hi in p.ranges) for p in plans]
        self._buffers = [(shared_buffer(k * fast.DIGEST_SIZE), shared_buffer(k)) for k in rows]
        self._tasks: list[tuple[int, _ScanTask]] = []
        first = [0] * len(plans)  # the next shard's first row, per disk
        for sh in plan_shards(plans, workers):
            if not sh.ranges:
                continue
            at = first[sh.disk]
            first[sh.disk] += sh.blocks
            digests, flags = self._buffers[sh.disk]
            self._tasks.append((sh.disk, _ScanTask(
                sources[sh.disk], block_sizes[sh.disk], sh.ranges,
                memoryview(digests)[at * fast.DIGEST_SIZE:], memoryview(flags)[at:], key)))
        self._forked: Forked[int] = Forked(_scan_shard, [t for _, t in self._tasks])

    def disks(self) -> list[tuple[str, int, int]]:
        """(absolute path, block size, size) of each disk, in order."""
        return [(os.path.abspath(s.path), bs, s.size)
                for s, bs in zip(self._sources, self._block_sizes, strict=True)]

    def wait(self, progress: Progress | None = None,
             disk_progress: Callable[[int, int, int], None] | None = None) -> list[BlockScan]:
        """The scans, in the order of the disks.

        ``progress(done, total)`` counts bytes over all disks; ``disk_progress(k,
        done, total)`` for disk ``k``.
        """
        total = sum(self._to_read)

        def report(done: list[int]) -> None:
            if progress:
                progress(sum(done), total)
            if disk_progress:
                per_disk = [0] * len(self._to_read)
                for (i, _), n in zip(self._tasks, done, strict=True):
                    per_disk[i] += n
                for i, n in enumerate(per_disk):
                    disk_progress(i, n, self._to_read[i])

        try:
            read = self._forked.wait(report if progress or disk_progress else None)
        except WorkerError as exc:  # died of a signal: a page it could not read, say which
            if exc.task is None:
                raise
            s = self._sources[self._tasks[exc.task][0]]
            raise explain_death(exc, (s.path, s.size)) from None
        finally:
            self.close()
        per_disk = [0] * len(self._sources)
        for (i, _), n in zip(self._tasks, read, strict=True):
            per_disk[i] += n
        seconds = time.perf_counter() - self.started
        return [BlockScan(os.path.abspath(s.path), s.size, bs, buf[0], buf[1], got, seconds,
                          plan.ranges)
                for s, bs, buf, got, plan in zip(self._sources, self._block_sizes,
                                                 self._buffers, per_disk, self._plans,
                                                 strict=True)]

    def cancel(self) -> None:
        self._forked.cancel()
        self.close()

    def close(self) -> None:
        for s in self._sources:
            with contextlib.suppress(OSError):
                s.close()


def start_scan(disks: Sequence[tuple[str | os.PathLike[str], int]], workers: int | None = None,
               limit: int | None = None, key: bytes | None = None) -> PendingScan:
    """Start scanning ``(path, block_size)`` disks in forked workers; see :class:`PendingScan`.

    ``limit`` scans only the first ``limit`` bytes of each (a disk restored
    onto a larger device).  ``key``: keyed BLAKE3 digests (see :func:`scan`).
    """
    opened: list[BlockSource] = []
    try:
        for path, bs in disks:
            fast.check_block_size(bs)
            opened.append(open_image(path, limit=limit))
        return PendingScan(opened, [bs for _, bs in disks], workers or default_workers(), key)
    except BaseException:
        for s in opened:
            s.close()
        raise
