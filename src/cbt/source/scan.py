"""Scan: turn a disk (image file or block device) into per-block digests.

1. Open the disk and find its size (``st_size`` for files, the device's own
   size for block devices).
2. Map its data extents with ``SEEK_DATA``/``SEEK_HOLE``.  A block lying wholly
   in a hole is HOLE and never read; a block partly in a hole is read (the hole
   reads as zeros).
3. Split the blocks to read into one contiguous shard per worker, balanced by
   bytes.  Each worker maps its shard in large aligned windows (``mmap`` with
   ``MADV_SEQUENTIAL``/``MADV_WILLNEED``: no copy out of the page cache) and
   feeds each window to the core, which writes digests and flags straight into
   shared output buffers.
4. The result is a :class:`BlockScan` (plain buffers and counts);
   :func:`scan` turns it into a :class:`~cbt.manifest.Manifest`.

``cbt scan`` without ``-o`` stops at step 4's buffers and never imports numpy
or pyarrow: a whole ``cbt`` process is timed against ``b3sum``, and those
imports alone cost more than a tenth of a second.

Reading through mmap assumes the disk does not shrink while it is read (a
snapshot, or a quiesced disk): pages past a truncated end would fault.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from cbt.core.errors import CbtIOError
from cbt.core.extents import data_extents
from cbt.core.native import fast
from cbt.core.parallel import Forked, Report, shared_buffer

if TYPE_CHECKING:
    from cbt.format.manifest import Manifest

DEFAULT_BLOCK_SIZE = 64 << 10
# Bytes mapped at once: large enough that the per-window cost vanishes, small
# enough that a worker's mapped footprint stays bounded whatever the disk size.
WINDOW = 64 << 20

Progress = Callable[[int, int], None]
BlockRange = tuple[int, int]  # [first block, end block)


# NamedTuples, not dataclasses, in this module: importing dataclasses (and the
# inspect module under it) alone costs ``cbt scan`` 5 ms of start-up.
class Disk(NamedTuple):
    """An opened disk: a descriptor, its size and what kind of thing it is."""

    path: str
    fd: int
    size: int
    kind: str  # "file" | "block device"

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Disk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_disk(path: str | os.PathLike[str]) -> Disk:
    """Open an image file or block device read-only; clear errors for anything else."""
    p = os.fspath(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below)
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise CbtIOError(errno.ENOENT, f"no such disk or image: {p}") from None
    except IsADirectoryError:
        raise CbtIOError(errno.EISDIR, f"is a directory, not a disk or image: {p}") from None
    except PermissionError:
        raise CbtIOError(errno.EACCES, f"permission denied reading {p}") from None
    except OSError as exc:
        raise CbtIOError(exc.errno, f"cannot open {p}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            return Disk(p, fd, st.st_size, "file")
        if stat.S_ISBLK(st.st_mode):
            return Disk(p, fd, os.lseek(fd, 0, os.SEEK_END), "block device")
        if stat.S_ISDIR(st.st_mode):
            raise CbtIOError(errno.EISDIR, f"is a directory, not a disk or image: {p}")
        raise CbtIOError(errno.EINVAL, f"not a regular file or block device: {p}")
    except BaseException:
        os.close(fd)
        raise




def block_ranges(extents: list[tuple[int, int]], block_size: int) -> list[BlockRange]:
    """Merged ranges of blocks touched by any extent (partly counts)."""
    out: list[BlockRange] = []
    for start, end in sorted(extents):
        if end <= start:
            continue
        lo, hi = start // block_size, -(-end // block_size)
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def split_ranges(ranges: list[BlockRange], parts: int) -> list[list[BlockRange]]:
    """Cut ``ranges`` into at most ``parts`` shards of nearly equal block counts."""
    total = sum(hi - lo for lo, hi in ranges)
    parts = max(1, min(parts, total))
    if parts == 1:
        return [ranges] if total else []
    quota = -(-total // parts)
    shards: list[list[BlockRange]] = [[]]
    room = quota
    for lo, hi in ranges:
        while lo < hi:
            if room == 0:
                shards.append([])
                room = quota
            take = min(room, hi - lo)
            shards[-1].append((lo, lo + take))
            lo += take
            room -= take
    return shards


def windows(fd: int, size: int, block_size: int, lo: int, hi: int, path: str = "disk",
            window: int = WINDOW, read_ahead: bool = True) -> Iterator[tuple[int, mmap.mmap]]:
    """Map blocks ``[lo, hi)`` in windows; yields (first block, mapping).

    ``read_ahead=False`` where only a few blocks of each window will be touched.
    """
    step = max(window // block_size, 1)
    for first in range(lo, hi, step):
        last = min(first + step, hi)
        offset = first * block_size
        length = min(last * block_size, size) - offset
        try:
            m = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ, offset=offset)
        except OSError as exc:
            raise CbtIOError(exc.errno, f"cannot read {path} at byte {offset}: "
                             f"{exc.strerror}") from None
        try:
            if read_ahead:
                m.madvise(mmap.MADV_SEQUENTIAL)
                m.madvise(mmap.MADV_WILLNEED)
            yield first, m
        finally:
            with contextlib.suppress(BufferError):  # a view still held: unmapped when freed
                m.close()


class _ScanTask(NamedTuple):
    path: str
    fd: int
    size: int
    block_size: int
    ranges: list[BlockRange]
    digests: memoryview  # flat: 32 bytes per block
    flags: memoryview


def _scan_shard(task: _ScanTask, report: Report) -> int:
    """Hash one shard's blocks into the shared buffers; returns bytes read."""
    read = 0
    bs = task.block_size
    size = fast.DIGEST_SIZE
    for lo, hi in task.ranges:
        for first, m in windows(task.fd, task.size, bs, lo, hi, task.path):
            n = fast.nblocks(len(m), bs)
            # (a memoryview cannot slice two dimensions: slice flat, then shape)
            rows = task.digests[first * size:(first + n) * size].cast("B", (n, size))
            try:
                fast.hash_blocks(m, bs, rows, task.flags[first:first + n])
            except OSError as exc:
                raise CbtIOError(exc.errno, f"read error in {task.path} near byte "
                                 f"{first * bs}: {exc.strerror}") from None
            read += len(m)
            report(len(m))
    return read


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) or 1


class BlockScan(NamedTuple):
    """What a scan found, as plain shared-memory buffers (no numpy needed)."""

    source: str
    disk_size: int
    block_size: int
    digests: mmap.mmap  # 32 bytes per block; zeros for ZERO and HOLE blocks
    flags: mmap.mmap  # one FLAG_* byte per block
    bytes_read: int
    seconds: float

    def summary(self) -> dict[str, Any]:
        """The keys of ``cbt scan --json`` (but ``warnings``)."""
        n = fast.nblocks(self.disk_size, self.block_size)
        counts = self.flags[:n].count
        return {
            "path": self.source,
            "size": self.disk_size,
            "block_size": self.block_size,
            "blocks": n,
            "data_blocks": counts(fast.FLAG_DATA),
            "zero_blocks": counts(fast.FLAG_ZERO),
            "hole_blocks": counts(fast.FLAG_HOLE),
            "bytes_read": self.bytes_read,
            "seconds": round(self.seconds, 6),
        }

    def manifest(self) -> Manifest:
        """The scan as a :class:`Manifest` (numpy views of the same memory)."""
        import numpy as np

        from cbt.core.timefmt import utc_now
        from cbt.format.manifest import Manifest

        n = fast.nblocks(self.disk_size, self.block_size)
        return Manifest(
            block_size=self.block_size,
            disk_size=self.disk_size,
            digests=np.frombuffer(self.digests, np.uint8, n * fast.DIGEST_SIZE)
            .reshape(n, fast.DIGEST_SIZE),
            flags=np.frombuffer(self.flags, np.uint8, n),
            source=self.source,
            created=utc_now(),
            bytes_read=self.bytes_read,
            seconds=self.seconds,
        )


def scan(
    path: str | os.PathLike[str],
    block_size: int = DEFAULT_BLOCK_SIZE,
    workers: int | None = None,
    progress: Progress | None = None,
    limit: int | None = None,
) -> Manifest:
    """Scan a disk image or block device into a :class:`Manifest`.

    ``workers`` processes share the disk (default: one per core).  ``progress``
    is called with ``(bytes_done, bytes_to_read)`` a few times per second.
    ``limit`` scans only the first ``limit`` bytes (a disk restored onto a
    larger device).
    """
    return scan_blocks(path, block_size, workers, progress, limit).manifest()


def scan_blocks(
    path: str | os.PathLike[str],
    block_size: int = DEFAULT_BLOCK_SIZE,
    workers: int | None = None,
    progress: Progress | None = None,
    limit: int | None = None,
) -> BlockScan:
    """:func:`scan` up to its buffers: what ``cbt scan`` without ``-o`` needs."""
    pending = start_scan([(path, block_size)], workers, limit)
    return pending.wait(progress)[0]


class PendingScan:
    """Disks being scanned by forked workers while this process goes on.

    An incremental ``cbt backup`` starts scanning its disks before it has even
    imported numpy or loaded the vault's index, and collects the digests when
    it needs them.  :meth:`wait` returns one :class:`BlockScan` per disk;
    :meth:`cancel` stops the workers.
    """

    def __init__(self, disks: list[Disk], block_sizes: list[int], workers: int) -> None:
        self.started = time.perf_counter()
        self._disks = disks
        self._block_sizes = block_sizes
        self._tasks: list[tuple[int, _ScanTask]] = []  # (disk number, task)
        self._to_read: list[int] = []
        self._buffers: list[tuple[mmap.mmap, mmap.mmap]] = []
        plans = []
        for disk, bs in zip(disks, block_sizes, strict=True):
            n = fast.nblocks(disk.size, bs)
            ranges = block_ranges(data_extents(disk.fd, disk.size), bs)
            self._to_read.append(sum(min(hi * bs, disk.size) - lo * bs for lo, hi in ranges))
            self._buffers.append((shared_buffer(n * fast.DIGEST_SIZE),
                                  shared_buffer(n, fill=fast.FLAG_HOLE)))
            plans.append(ranges)
        # Shards of about equal bytes (a small disk is one shard, a large one several),
        # so that workers finish together; the kernel shares the cores between them.
        quota = max(1, -(-sum(self._to_read) // workers))
        for i, (disk, bs, ranges) in enumerate(zip(disks, block_sizes, plans, strict=True)):
            digests, flags = self._buffers[i]
            parts = max(1, -(-self._to_read[i] // quota))
            for shard in split_ranges(ranges, parts):
                self._tasks.append((i, _ScanTask(disk.path, disk.fd, disk.size, bs, shard,
                                                 memoryview(digests), memoryview(flags))))
        self._forked: Forked[int] = Forked(_scan_shard, [t for _, t in self._tasks])

    def disks(self) -> list[tuple[str, int, int]]:
        """(absolute path, block size, size) of each disk, in order."""
        return [(os.path.abspath(d.path), bs, d.size)
                for d, bs in zip(self._disks, self._block_sizes, strict=True)]

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
        finally:
            self.close()
        per_disk = [0] * len(self._disks)
        for (i, _), n in zip(self._tasks, read, strict=True):
            per_disk[i] += n
        seconds = time.perf_counter() - self.started
        return [BlockScan(os.path.abspath(d.path), d.size, bs, buf[0], buf[1], got, seconds)
                for d, bs, buf, got in zip(self._disks, self._block_sizes, self._buffers,
                                           per_disk, strict=True)]

    def cancel(self) -> None:
        self._forked.cancel()
        self.close()

    def close(self) -> None:
        for d in self._disks:
            with contextlib.suppress(OSError):
                d.close()
        self._disks = [d._replace(fd=-1) for d in self._disks]


def start_scan(disks: Sequence[tuple[str | os.PathLike[str], int]], workers: int | None = None,
               limit: int | None = None) -> PendingScan:
    """Start scanning ``(path, block_size)`` disks in forked workers; see :class:`PendingScan`.

    ``limit`` scans only the first ``limit`` bytes of each (a disk restored
    onto a larger device).
    """
    opened: list[Disk] = []
    try:
        for path, bs in disks:
            fast.check_block_size(bs)
            disk = open_disk(path)
            opened.append(disk)
            if limit is not None and limit < disk.size:
                opened[-1] = Disk(disk.path, disk.fd, limit, disk.kind)
        return PendingScan(opened, [bs for _, bs in disks], workers or default_workers())
    except BaseException:
        for d in opened:
            d.close()
        raise
