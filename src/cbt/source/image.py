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

A page of a mapping that cannot be read (a read error, or a disk that shrank
below it) kills the process that touches it with SIGBUS.  So each window is
faulted in before it is handed out (:func:`~cbt.core.blockio.populate`, which
reports instead of faulting), and where that fails ``pread`` finds the first
byte that cannot be read: a :class:`~cbt.core.errors.SourceReadError` names the
disk, that byte and the error ("shrank" where the disk now ends before it).
A disk that shrinks while a window is being hashed still faults: the worker
dies of SIGBUS, and :func:`explain_death` says afterwards what happened, from
the byte range the worker noted (:func:`cbt.core.parallel.working_on`).
No numpy here (``cbt scan`` start-up time counts).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import stat
from collections.abc import Iterator

from cbt.core.blockio import first_unreadable, populate
from cbt.core.errors import CbtIOError, SourceReadError
from cbt.core.extents import data_extents
from cbt.core.parallel import WorkerError, working_on
from cbt.source.base import BlockSource, SourceSpec, Window

# Bytes mapped at once: large enough that the per-window cost vanishes, small
# enough that a worker's mapped footprint stays bounded whatever the disk size.
WINDOW = 64 << 20


class ImageSource(BlockSource):
    """An opened image file or block device: a descriptor, its size and its kind."""

    __slots__ = ("fd", "ident", "kind", "live", "path", "size")

    def __init__(self, path: str, fd: int, size: int, kind: str, live: bool = False,
                 ident: tuple[int, int] | None = None) -> None:
        self.path = path
        self.fd = fd
        self.size = size
        self.kind = kind  # "file" | "block device"
        self.live = live
        self.ident = ident  # (see SourceSpec.ident)

    def extents(self) -> list[tuple[int, int]]:
        return data_extents(self.fd, self.size)

    def windows(self, block_size: int, lo: int, hi: int,
                read_ahead: bool = True) -> Iterator[tuple[int, Window]]:
        return map_windows(self.fd, self.size, block_size, lo, hi, self.path,
                           read_ahead=read_ahead)

    def spec(self) -> SourceSpec:
        return SourceSpec("image", self.path, self.size, self.live, self.ident)

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
            size, kind, ident = st.st_size, "file", (st.st_dev, st.st_ino)
        elif stat.S_ISBLK(st.st_mode):
            size, kind, ident = os.lseek(fd, 0, os.SEEK_END), "block device", (0, st.st_rdev)
        elif stat.S_ISDIR(st.st_mode):
            raise CbtIOError(errno.EISDIR, f"is a directory, not a disk or image: {p}")
        else:
            raise CbtIOError(errno.EINVAL, f"not a regular file or block device: {p}")
    except BaseException:
        os.close(fd)
        raise
    return ImageSource(p, fd, size if limit is None else min(size, limit), kind, live, ident)


def open_source(spec: SourceSpec) -> BlockSource:
    """Reopen a source from its :meth:`~BlockSource.spec` (in a worker).

    It is read up to the size it had when planned; a disk now shorter is refused,
    and so is another file or device found at its path (renamed over it, a link
    turned elsewhere): a point would mix two disks.
    """
    if spec.kind == "nbd":
        from cbt.source.nbd import open_nbd  # (here: a file's scan does not pay for it)

        return open_nbd(spec)
    if spec.kind != "image":
        raise CbtIOError(errno.EINVAL, f"unknown block source kind {spec.kind!r}")
    try:
        source = open_image(spec.path, spec.live)
    except CbtIOError as exc:  # (gone, or a directory or a FIFO there now)
        raise SourceReadError(exc.errno or errno.EIO, f"{exc.strerror or exc} (it was "
                              "replaced or removed while it was read)", spec.path, 0) from None
    if spec.ident is not None and source.ident != spec.ident:
        source.close()
        raise SourceReadError(errno.ESTALE, f"{spec.path} was replaced while it was read: "
                              "another file or device is there now", spec.path, 0)
    if source.size < spec.size:
        source.close()
        raise _shrank(spec.path, source.size, spec.size)
    source.size = spec.size
    return source


def _shrank(path: str, now: int, size: int) -> SourceReadError:
    """The error of a disk that ends at ``now`` though it was read as ``size`` bytes."""
    return SourceReadError(errno.EIO, f"{path} shrank while it was read: it ends at byte "
                           f"{now}, it had {size} bytes", path, now)


def _current_size(fd: int) -> int:
    st = os.fstat(fd)
    return st.st_size if stat.S_ISREG(st.st_mode) else os.lseek(fd, 0, os.SEEK_END)


def _read_error(fd: int, path: str, offset: int, length: int, size: int) -> SourceReadError:
    """What keeps ``[offset, offset+length)`` of a disk of ``size`` bytes from being read."""
    return _unreadable(fd, path, offset, length, size) or SourceReadError(
        errno.EIO, f"cannot read {path} in bytes {offset}..{offset + length}", path, offset)


def _unreadable(fd: int, path: str, offset: int, length: int,
                size: int) -> SourceReadError | None:
    """The first byte of the range ``pread`` cannot read, as an error; None: all of it reads."""
    found = first_unreadable(fd, offset, length)
    if found is None:
        return None
    at, exc = found
    if exc is None:
        return _shrank(path, min(at, _current_size(fd)), size)
    return SourceReadError(exc.errno or errno.EIO, f"read error on {path} at byte {at}: "
                           f"{exc.strerror or exc}", path, at)


def explain_death(exc: WorkerError, *disks: tuple[str, int]) -> SourceReadError:
    """Why a worker reading ``disks`` ((path, size when planned) each) died of a signal.

    A disk that now ends early shrank; else the byte range the worker noted is
    read again with ``pread`` to name the byte and the error; else the death
    itself is the error.
    """
    for path, size in disks:
        found = _why_died(exc, path, size)
        if found is not None:
            return found
    where = "" if exc.span is None else f" near byte {exc.span[0]}"
    return SourceReadError(errno.EIO, f"reading {' or '.join(p for p, _ in disks)}{where} "
                           f"failed: {exc}", disks[0][0], exc.span[0] if exc.span else 0)


def _why_died(exc: WorkerError, path: str, size: int) -> SourceReadError | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as err:
        return SourceReadError(err.errno or errno.EIO, f"cannot open {path} again after a "
                               f"reader of it died: {err.strerror}", path, 0)
    try:
        now = _current_size(fd)
        if now < size:
            return _shrank(path, now, size)
        if exc.span is None:
            return None
        return _unreadable(fd, path, exc.span[0], exc.span[1] - exc.span[0], size)
    finally:
        os.close(fd)


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
        except ValueError:  # "mmap length is greater than file size": it shrank
            raise _shrank(path, _current_size(fd), size) from None
        except OSError as exc:
            raise SourceReadError(exc.errno or errno.EIO, f"cannot read {path} at byte "
                                  f"{offset}: {exc.strerror}", path, offset) from None
        try:
            working_on(offset, offset + length)
            if read_ahead:
                m.madvise(mmap.MADV_SEQUENTIAL)
                m.madvise(mmap.MADV_WILLNEED)
                if not populate(m, fd=fd, offset=offset):  # (else a SIGBUS when touched)
                    raise _read_error(fd, path, offset, length, size)
            yield first, m
        finally:
            with contextlib.suppress(BufferError):  # a view still held: unmapped when freed
                m.close()
