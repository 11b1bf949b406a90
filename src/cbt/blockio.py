"""Low-level writes a restore needs: punching holes and zeroing device ranges.

- Files: ``fallocate(PUNCH_HOLE | KEEP_SIZE)`` deallocates a range, which then
  reads as zeros (holes stay holes after a restore).
- Block devices: ``ioctl(BLKZEROOUT)`` asks the device to zero a range (thin
  devices unmap it); the unaligned tail of a range is written as zeros.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import stat
import struct

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
BLKZEROOUT = 0x127F  # _IO(0x12, 127)
SECTOR = 512
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate ``[offset, offset+length)`` of a file; it reads back as zeros."""
    if length <= 0:
        return
    rc = _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                         ctypes.c_long(offset), ctypes.c_long(length))
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def is_block_device(path: str | os.PathLike[str]) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


def device_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


def write_zeros(fd: int, offset: int, length: int) -> None:
    zeros = bytes(min(length, 1 << 20))
    while length > 0:
        n = os.pwrite(fd, zeros[:length], offset)
        offset += n
        length -= n


def zero_range(fd: int, offset: int, length: int, device: bool) -> None:
    """Make ``[offset, offset+length)`` read as zeros: BLKZEROOUT on a device, a hole in a file."""
    if length <= 0:
        return
    if not device:
        punch_hole(fd, offset, length)
        return
    aligned = length - length % SECTOR if offset % SECTOR == 0 else 0
    if aligned:
        try:
            fcntl.ioctl(fd, BLKZEROOUT, struct.pack("QQ", offset, aligned))
        except OSError:
            write_zeros(fd, offset, aligned)  # devices without the ioctl
    write_zeros(fd, offset + aligned, length - aligned)


def write_all(fd: int, offset: int, data: bytes | bytearray | memoryview) -> None:
    """pwrite until every byte is written."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def copy_sparse(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Copy a file keeping its holes (only data extents are written)."""
    from cbt.scan import data_extents

    with open(src, "rb") as fi, open(dst, "wb") as fo:
        size = os.fstat(fi.fileno()).st_size
        fo.truncate(size)
        for start, end in data_extents(fi.fileno(), size):
            pos = start
            while pos < end:
                chunk = os.pread(fi.fileno(), min(8 << 20, end - pos), pos)
                write_all(fo.fileno(), pos, chunk)
                pos += len(chunk)


