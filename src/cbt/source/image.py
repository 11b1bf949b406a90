"""Image files and block devices as block sources.

1. :func:`open_image` opens the disk read-only and finds its size (``st_size``
   for a file, the device's own size for a block device); anything else (a
   directory, a FIFO) is refused with a clear error.
2. Extents come from ``SEEK_DATA``/``SEEK_HOLE`` (the whole disk where the
   file system cannot say).
3. Windows are ``mmap`` mappings of 64 MiB (``MADV_SEQUENTIAL`` and
   ``MADV_WILLNEED``): no copy out of the page cache.
4. A worker reopens the source from its :class:`SourceSpec`
   (:func:`open_source`), and refuses a disk that shrank since it was planned.

Reading through mmap assumes the disk does not shrink while it is read (a
snapshot, or a quiesced disk): pages past a truncated end would fault.
No numpy here (``cbt scan`` start-up time counts).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import stat
from collections.abc import Iterator

from cbt.core.errors import CbtIOError
from cbt.core.extents import data_extents
from cbt.source.base import BlockSource, SourceSpec, Window

# Bytes mapped at once: large enough that the per-window cost vanishes, small
# enough that a worker's mapped footprint stays bounded whatever the disk size.
WINDOW = 64 << 20


class ImageSource(BlockSource):
    """An opened image file or block device: a descriptor, its size and its kind."""

    __slots__ = ("fd", "kind", "live", "path", "size")

    def __init__(self, path: str, fd: int, size: int, kind: str, live: bool = False) -> None:
        self.path = path
        self.fd = fd
        self.size = size
        self.kind = kind  # "file" | "block device"
        self.live = live

    def extents(self) -> list[tuple[int, int]]:
        return data_extents(self.fd, self.size)

    def windows(self, block_size: int, lo: int, hi: int,
                read_ahead: bool = True) -> Iterator[tuple[int, Window]]:
        return map_windows(self.fd, self.size, block_size, lo, hi, self.path,
                           read_ahead=read_ahead)

    def spec(self) -> SourceSpec:
        return SourceSpec("image", self.path, self.size, self.live)

    def close(self) -> None:
        """Close the descriptor (again is harmless)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> ImageSource:
        return self


def open_image(path: str | os.PathLike[str], live: bool = False,
               limit: int | None = None) -> ImageSource:
    """Open an image file or block device read-only; clear errors for anything else.

    ``limit`` reads only the first ``limit`` bytes (a disk restored onto a
    larger device).
    """
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
            size, kind = st.st_size, "file"
        elif stat.S_ISBLK(st.st_mode):
            size, kind = os.lseek(fd, 0, os.SEEK_END), "block device"
        elif stat.S_ISDIR(st.st_mode):
            raise CbtIOError(errno.EISDIR, f"is a directory, not a disk or image: {p}")
        else:
            raise CbtIOError(errno.EINVAL, f"not a regular file or block device: {p}")
    except BaseException:
        os.close(fd)
        raise
    return ImageSource(p, fd, size if limit is None else min(size, limit), kind, live)


def open_source(spec: SourceSpec) -> ImageSource:
    """Reopen a source from its :meth:`~BlockSource.spec` (in a worker).

    It is read up to the size it had when planned; a disk now shorter is refused.
    """
    if spec.kind != "image":
        raise CbtIOError(errno.EINVAL, f"unknown block source kind {spec.kind!r}")
    source = open_image(spec.path, spec.live)
    if source.size < spec.size:
        source.close()
        raise CbtIOError(errno.EIO, f"{spec.path} shrank while it was read")
    source.size = spec.size
    return source


def map_windows(fd: int, size: int, block_size: int, lo: int, hi: int, path: str = "disk",
                window: int = WINDOW, read_ahead: bool = True) -> Iterator[tuple[int, mmap.mmap]]:
    """Map blocks ``[lo, hi)`` of ``fd`` in windows; yields (first block, mapping)."""
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
