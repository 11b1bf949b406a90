"""Change tracking from the file system: what changed between a disk's kept tracking
base and its new snapshot, and what identifies the base.

Both are clones of one disk (``reflink``: FICLONE; ``btrfs``: read-only snapshots), so
every block the guest did not write since the base was taken is still the *same
physical block* in both.  :func:`changed_ranges` compares the logical -> physical maps
of the two files (``FS_IOC_FIEMAP``, always with ``FIEMAP_FLAG_SYNC``: without it a
file's fresh writes sit in delayed allocation and are missing from its map) and calls a
block unchanged only when both map it to the same physical address, or both read as
zeros without data there: a hole, or an ``UNWRITTEN`` (preallocated) extent, which a
clone may turn into a hole.  Data on one side and a hole on the
other is a change (a punched hole is the guest's TRIM); an extent whose physical
address means nothing (``UNKNOWN``, ``DELALLOC``, ``ENCODED``, ``DATA_ENCRYPTED``,
``NOT_ALIGNED``, ``DATA_INLINE``, ``DATA_TAIL``) is changed.

:func:`identify` names a base (device, inode, size, change and modification times;
for a btrfs base also its subvolume's UUID) so the next run can refuse a base that
was replaced, rewritten or resized.  Nothing here follows a symbolic link.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import uuid

import numpy as np
import numpy.typing as npt

from cbt.source.changes import TrackingBase
from cbt.source.plan import BlockRange

__all__ = [
    "Extents",
    "FiemapError",
    "changed_ranges",
    "extents",
    "identify",
    "subvolume_uuid",
]

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNWRITTEN = 0x800
# flags that make an extent's physical address meaningless for a comparison
FIEMAP_EXTENT_OPAQUE = (0x2 | 0x4 | 0x8  # UNKNOWN, DELALLOC, ENCODED
                        | 0x80 | 0x100 | 0x200 | 0x400)  # ENCRYPTED, NOT_ALIGNED, INLINE, TAIL
_HEADER = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, mapped, count, reserved
_EXTENT = np.dtype([("logical", "<u8"), ("physical", "<u8"), ("length", "<u8"),
                    ("r0", "<u8"), ("r1", "<u8"), ("flags", "<u4"), ("r2", "<u4", (3,))])
assert _EXTENT.itemsize == 56
_BATCH = 8192  # extents per ioctl

BTRFS_IOC_GET_SUBVOL_INFO = 0x81F8943C
_SUBVOL_INFO_SIZE = 504
_SUBVOL_UUID_AT = 296
BTRFS_SUBVOL_INODE = 256

U64 = npt.NDArray[np.uint64]


class FiemapError(OSError):
    """A file's extent map could not be read."""


class Extents:
    """A file's extents (sorted, within its size): byte starts, ends, physical starts, flags."""

    def __init__(self, size: int, start: U64, end: U64, physical: U64,
                 flags: npt.NDArray[np.uint32]) -> None:
        self.size, self.start, self.end = size, start, end
        self.physical, self.flags = physical, flags

    def __len__(self) -> int:
        return len(self.start)


def _open_nofollow(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY)


def extents(path: str) -> Extents:
    """The extent map of the regular file at ``path`` (not followed if a link), synced
    first; FiemapError naming the file where the file system cannot map it."""
    try:
        fd = _open_nofollow(path)
    except OSError as exc:
        raise FiemapError(exc.errno, f"cannot open {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FiemapError(errno.EINVAL, f"{path} is not a regular file")
        raw = _fiemap(fd, st.st_size, path)
    finally:
        os.close(fd)
    size = st.st_size
    logical = raw["logical"]
    keep = logical < size
    raw = raw[keep]
    start = raw["logical"].astype(np.uint64)
    end = np.minimum(start + raw["length"], np.uint64(size)).astype(np.uint64)
    order = np.argsort(start, kind="stable")
    return Extents(size, start[order], end[order], raw["physical"][order].astype(np.uint64),
                   raw["flags"][order].astype(np.uint32))


def _fiemap(fd: int, size: int, path: str) -> npt.NDArray[np.void]:
    """Every extent of the open file ``fd`` up to ``size``, one FS_IOC_FIEMAP batch at a time."""
    parts: list[npt.NDArray[np.void]] = []
    buf = bytearray(_HEADER.size + _BATCH * _EXTENT.itemsize)
    start = 0
    while start < size:
        _HEADER.pack_into(buf, 0, start, 2**64 - 1 - start, FIEMAP_FLAG_SYNC, 0, _BATCH, 0)
        try:
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)
        except OSError as exc:
            raise FiemapError(exc.errno, f"cannot map the extents of {path} (FIEMAP): "
                              f"{exc.strerror}") from None
        mapped = _HEADER.unpack_from(buf, 0)[3]
        if mapped == 0:
            break
        batch = np.frombuffer(bytes(buf[_HEADER.size:_HEADER.size + mapped * _EXTENT.itemsize]),
                              dtype=_EXTENT)
        parts.append(batch)
        last = batch[-1]
        nxt = int(last["logical"]) + int(last["length"])
        if int(last["flags"]) & FIEMAP_EXTENT_LAST or nxt <= start:
            break
        start = nxt
    if not parts:
        return np.zeros(0, dtype=_EXTENT)
    out = np.concatenate(parts)
    # a batch may repeat an extent that straddles its start: keep each logical start once
    _, first = np.unique(out["logical"], return_index=True)
    return out[np.sort(first)]


def _locate(ext: Extents, at: U64) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.intp]]:
    """For each byte offset in ``at``: whether an extent of ``ext`` holds it, and which."""
    idx = np.searchsorted(ext.start, at, side="right").astype(np.intp) - 1
    safe = np.clip(idx, 0, max(len(ext) - 1, 0))
    inside = (idx >= 0) & (len(ext) > 0)
    if len(ext):
        inside &= at < ext.end[safe]
    return inside, safe


def _changed_segments(a: Extents, b: Extents) -> tuple[U64, U64]:
    """Byte segments [start, end) where the maps of ``a`` and ``b`` differ."""
    size = a.size
    cuts = np.unique(np.concatenate([a.start, a.end, b.start, b.end,
                                     np.array([0, size], dtype=np.uint64)]))
    cuts = cuts[cuts <= size]
    seg_start, seg_end = cuts[:-1], cuts[1:]
    if len(seg_start) == 0:
        return seg_start, seg_end
    in_a, ia = _locate(a, seg_start)
    in_b, ib = _locate(b, seg_start)
    changed = in_a != in_b
    both = in_a & in_b
    if len(a) and len(b):
        # within an extent physical - logical is constant: compare the two offsets
        pa = a.physical[ia].astype(np.int64) - a.start[ia].astype(np.int64)
        pb = b.physical[ib].astype(np.int64) - b.start[ib].astype(np.int64)
        opaque = ((a.flags[ia] | b.flags[ib]) & FIEMAP_EXTENT_OPAQUE) != 0
        changed |= both & ((pa != pb) | opaque)
    return seg_start[changed], seg_end[changed]


def _data_only(ext: Extents) -> Extents:
    """``ext`` without its unwritten extents: they read as zeros, as a hole does."""
    unwritten = (ext.flags & FIEMAP_EXTENT_UNWRITTEN) != 0
    keep = ~unwritten | ((ext.flags & FIEMAP_EXTENT_OPAQUE) != 0)
    return Extents(ext.size, ext.start[keep], ext.end[keep], ext.physical[keep],
                   ext.flags[keep])


def changed_ranges(base: str, new: str, block_size: int) -> list[BlockRange]:
    """The blocks of ``block_size`` bytes of ``new`` that may differ from ``base``, as
    merged, sorted ``(first, end)`` block ranges: any part of the block maps to another
    physical place than in ``base`` (or to a meaningless one, or to data where the
    other reads zeros).  Both files must have the same size (the caller handles a
    resize); FiemapError where a map cannot be read."""
    if block_size <= 0:
        raise ValueError(f"block size {block_size} is not positive")
    a, b = extents(base), extents(new)
    if a.size != b.size:
        raise FiemapError(errno.EINVAL, f"{base} has {a.size} bytes and {new} {b.size}: "
                          "sizes differ")
    s, e = _changed_segments(_data_only(a), _data_only(b))
    if len(s) == 0:
        return []
    bs = np.uint64(block_size)
    first = s // bs
    last = (e + bs - np.uint64(1)) // bs  # exclusive
    # merge: a block range starts where it does not touch the previous one
    run_end = np.maximum.accumulate(last)
    new_run = np.ones(len(first), dtype=bool)
    new_run[1:] = first[1:] > run_end[:-1]
    starts = first[new_run]
    ends_at = np.flatnonzero(new_run)[1:] - 1
    ends = np.append(run_end[ends_at], run_end[-1])
    return [(int(x), int(y)) for x, y in zip(starts, ends, strict=True)]


# -- identity ---------------------------------------------------------------------------------


def subvolume_uuid(path: str) -> str:
    """The UUID of the btrfs subvolume whose root is the folder ``path`` (not followed)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        buf = bytearray(_SUBVOL_INFO_SIZE)
        fcntl.ioctl(fd, BTRFS_IOC_GET_SUBVOL_INFO, buf, True)
    finally:
        os.close(fd)
    return str(uuid.UUID(bytes=bytes(buf[_SUBVOL_UUID_AT:_SUBVOL_UUID_AT + 16])))


def identify(path: str, subvolume: str | None = None) -> TrackingBase:
    """What identifies the base file at ``path`` (lstat: a link is refused, not followed).

    With ``subvolume`` (the base's btrfs subvolume, holding ``path``): kind
    ``subvolume`` with its UUID, and device 0: a subvolume's device number is handed
    out anew at each mount, its UUID is not.  OSError where either is missing."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, f"{path} is not a regular file")
    if subvolume is None:
        return TrackingBase("file", st.st_dev, st.st_ino, st.st_size, st.st_ctime_ns,
                            st.st_mtime_ns)
    return TrackingBase("subvolume", 0, st.st_ino, st.st_size, st.st_ctime_ns, st.st_mtime_ns,
                        subvolume_uuid(subvolume))
