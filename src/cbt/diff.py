"""Diff: which blocks differ between two disks, images or manifests.

Rules (content decides; a hole and a block of zeros are equal):

1. Block i covers ``[i*bs, min((i+1)*bs, max(size_a, size_b)))``; there are
   ``ceil(max(size_a, size_b) / bs)`` blocks.
2. When the sizes differ, the block holding the shorter input's end (byte
   ``min(size_a, size_b)``) and every block past it are changed: they are
   present, wholly or partly, in only one input.
3. Every block before that is changed when its bytes differ.

How the bytes are compared depends on the inputs:

- two images: compared directly, window by window with ``memcmp`` in the core,
  no hashing, split over the workers; blocks that are holes in both are never read;
- an image and a manifest: the image is scanned with the manifest's block size,
  then digests are compared;
- two manifests: digests only (same block size required).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from cbt._core import fast
from cbt.errors import CbtValueError
from cbt.manifest import Manifest, is_manifest_file
from cbt.parallel import Report, fork_map, shared_array
from cbt.scan import (
    DEFAULT_BLOCK_SIZE,
    BlockRange,
    Progress,
    block_ranges,
    data_extents,
    default_workers,
    open_disk,
    scan,
    split_ranges,
    windows,
)
from cbt.sizes import format_size

Source = str | os.PathLike[str] | Manifest


@dataclass
class ChangeSet:
    """The changed blocks between A and B.

    ``bitmap`` has one uint8 (0/1) per block; ``ranges`` is an ``(k, 2) uint64``
    array of merged changed runs, ``[offset, length]`` in bytes, sorted.
    """

    block_size: int
    size_a: int
    size_b: int
    bitmap: npt.NDArray[np.uint8]
    ranges: npt.NDArray[np.uint64]
    warnings: list[str] = field(default_factory=list)

    @property
    def blocks(self) -> int:
        return int(self.bitmap.shape[0])

    @property
    def changed_blocks(self) -> int:
        return int(np.count_nonzero(self.bitmap))

    @property
    def changed_bytes(self) -> int:
        return int(self.ranges[:, 1].sum()) if len(self.ranges) else 0

    @property
    def identical(self) -> bool:
        return self.changed_blocks == 0

    def to_dict(self) -> dict[str, Any]:
        """The keys of ``cbt diff --json``."""
        return {
            "block_size": self.block_size,
            "size_a": self.size_a,
            "size_b": self.size_b,
            "blocks": self.blocks,
            "changed_blocks": self.changed_blocks,
            "changed_bytes": self.changed_bytes,
            "ranges": self.ranges.tolist(),
            "warnings": list(self.warnings),
        }


def common_blocks(size_a: int, size_b: int, block_size: int) -> int:
    """Blocks compared by content; every block from here on is changed (rule 2)."""
    if size_a == size_b:
        return int(fast.nblocks(size_a, block_size))
    return min(size_a, size_b) // block_size


def _finish(bitmap: npt.NDArray[np.uint8], common: int, size_a: int, size_b: int,
            block_size: int, warnings: list[str]) -> ChangeSet:
    bitmap[common:] = 1
    ranges = fast.bitmap_runs(bitmap, block_size, max(size_a, size_b))
    return ChangeSet(block_size, size_a, size_b, bitmap, ranges, warnings)


def diff_manifests(a: Manifest, b: Manifest) -> ChangeSet:
    """Changed blocks from two manifests of the same block size (metadata only)."""
    if a.block_size != b.block_size:
        raise CbtValueError(
            f"manifests have different block sizes ({format_size(a.block_size)} and "
            f"{format_size(b.block_size)}); rescan one with --block-size "
            f"{format_size(a.block_size)}")
    bs = a.block_size
    n = fast.nblocks(max(a.disk_size, b.disk_size), bs)
    common = common_blocks(a.disk_size, b.disk_size, bs)
    bitmap = np.zeros(n, dtype=np.uint8)
    if common:
        fast.compare_digests(a.digests[:common], b.digests[:common], bitmap[:common])
    return _finish(bitmap, common, a.disk_size, b.disk_size, bs, [])


@dataclass(frozen=True)
class _CompareTask:
    path_a: str
    path_b: str
    fd_a: int
    fd_b: int
    size: int  # compared bytes: the common blocks, clipped to the disk end
    block_size: int
    ranges: list[BlockRange]
    bitmap: np.ndarray


def _compare_shard(task: _CompareTask, report: Report) -> int:
    bs = task.block_size
    for lo, hi in task.ranges:
        for (first, ma), (_, mb) in zip(windows(task.fd_a, task.size, bs, lo, hi, task.path_a),
                                        windows(task.fd_b, task.size, bs, lo, hi, task.path_b),
                                        strict=True):
            n = fast.nblocks(len(ma), bs)
            fast.compare_buffers(ma, mb, bs, task.bitmap[first:first + n])
            report(2 * len(ma))
    return 0


def diff_images(path_a: str | os.PathLike[str], path_b: str | os.PathLike[str],
                block_size: int = DEFAULT_BLOCK_SIZE, workers: int | None = None,
                progress: Progress | None = None) -> ChangeSet:
    """Compare two images or devices byte for byte, block by block, without hashing."""
    fast.check_block_size(block_size)
    workers = workers or default_workers()
    with open_disk(path_a) as da, open_disk(path_b) as db:
        n = fast.nblocks(max(da.size, db.size), block_size)
        common = common_blocks(da.size, db.size, block_size)
        size = min(common * block_size, da.size, db.size)
        extents = data_extents(da.fd, size) + data_extents(db.fd, size)
        ranges = block_ranges(extents, block_size)
        bitmap = shared_array((n,), np.uint8)
        to_read = 2 * sum(min(hi * block_size, size) - lo * block_size for lo, hi in ranges)
        tasks = [_CompareTask(da.path, db.path, da.fd, db.fd, size, block_size, shard, bitmap)
                 for shard in split_ranges(ranges, workers)]
        report = (lambda done: progress(int(done.sum()), to_read)) if progress else None
        fork_map(_compare_shard, tasks, report)
        result = np.array(bitmap)  # out of shared memory
    return _finish(result, common, da.size, db.size, block_size, [])


def _load(src: Source) -> Manifest | str:
    if isinstance(src, Manifest):
        return src
    p = os.fspath(src)
    if os.path.isfile(p) and is_manifest_file(p):
        return Manifest.read(p)
    return p


def diff(a: Source, b: Source, block_size: int | None = None, workers: int | None = None,
         progress: Progress | None = None) -> ChangeSet:
    """Changed blocks between two sources, each an image, a device, a manifest
    file or a :class:`Manifest`.

    ``block_size`` applies to images; a manifest's own block size wins (with a
    warning when it differs from an explicit ``block_size``).
    """
    if block_size is not None:
        fast.check_block_size(block_size)
    la, lb = _load(a), _load(b)
    manifests = [m for m in (la, lb) if isinstance(m, Manifest)]
    warnings: list[str] = []
    if not manifests:
        assert isinstance(la, str) and isinstance(lb, str)
        return diff_images(la, lb, block_size or DEFAULT_BLOCK_SIZE, workers, progress)
    bs = manifests[0].block_size
    if block_size is not None and any(m.block_size != block_size for m in manifests):
        warnings.append(f"--block-size {format_size(block_size)} ignored: the manifest's "
                        f"block size {format_size(bs)} wins")
    ma = la if isinstance(la, Manifest) else scan(la, bs, workers, progress)
    mb = lb if isinstance(lb, Manifest) else scan(lb, bs, workers, progress)
    result = diff_manifests(ma, mb)
    result.warnings[:0] = warnings
    return result
