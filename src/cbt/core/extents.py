"""Where a file or device holds data: ``SEEK_DATA``/``SEEK_HOLE`` extent maps.

Kept apart from :mod:`cbt.core.blockio` (which loads libc through ctypes) so
that ``cbt scan`` pays only for ``os`` at start-up.
"""

from __future__ import annotations

import errno
import os


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """Byte ranges ``[start, end)`` that may hold data, by SEEK_DATA/SEEK_HOLE.

    Where the file system cannot say, the whole disk is data.
    """
    extents: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole remains
                break
            return [(0, size)] if size else []  # EINVAL: no extent map here
        if start >= size:
            break
        try:
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        except OSError:
            end = size
        extents.append((start, end))
        pos = end
    return extents
