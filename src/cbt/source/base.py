"""BlockSource: where a disk's blocks come from, whatever holds them.

Everything that reads a disk (scan, diff of images, backup) asks a source for
the same few things, in this order:

1. its ``size`` in bytes, and whether it is ``live`` (read while in use, no
   snapshot: a block may change between being hashed and being copied);
2. its allocated ``extents()``: byte ranges that may hold data (a hole is
   never read: it is all zeros);
3. ``windows(block_size, lo, hi)``: blocks ``[lo, hi)`` as large buffers, one
   after another, each valid until the next is asked for (``windows_of``: the
   windows of many ranges, which a source may read ahead across);
4. ``spec()``: a small picklable description from which a worker process
   reopens the source itself (:func:`cbt.source.image.open_source`).

Implementations: :class:`cbt.source.image.ImageSource` (image files and block
devices); snapshot providers (:mod:`cbt.source.snapshot`) produce those.
What changed since a disk's previous point is not the source's to say but its
snapshot's (:mod:`cbt.source.changes`: a hint against a kept tracking base).
"""

from __future__ import annotations

import mmap
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from cbt.source.plan import BlockRange, block_ranges

# A window of blocks: a mapping of the disk where it can be mapped, else a buffer.
Window = mmap.mmap | bytes | bytearray


class SourceSpec(NamedTuple):
    """What a worker needs to reopen a source (:func:`cbt.source.image.open_source`)."""

    kind: str  # "image": an image file or a block device; "nbd": an NBD export
    path: str  # the image or device; the NBD server's unix socket
    size: int  # bytes to read: the size when it was planned
    live: bool
    # which file or device it was when planned: (st_dev, st_ino) of a file, (0, st_rdev)
    # of a block device; a worker refuses another one found at the path (None: unchecked)
    ident: tuple[int, int] | None = None
    export: str = ""  # the NBD export's name (kind "nbd")


class BlockSource(ABC):
    """A disk to read: size, liveness, extents, windows."""

    path: str  # what is read (an image, a device, a snapshot of either)
    size: int
    live: bool

    @abstractmethod
    def extents(self) -> list[tuple[int, int]]:
        """Byte ranges ``[start, end)`` below ``size`` that may hold data, sorted."""

    def block_ranges(self, block_size: int) -> list[BlockRange]:
        """The blocks to read: every block touched by an extent."""
        return block_ranges(self.extents(), block_size)

    @abstractmethod
    def windows(self, block_size: int, lo: int, hi: int,
                read_ahead: bool = True) -> Iterator[tuple[int, Window]]:
        """Blocks ``[lo, hi)`` in large windows: (first block, buffer), in order.

        A window is valid until the next one is asked for; the last block of
        the disk is short.  ``read_ahead=False`` where only a few blocks of
        each window will be touched.
        """

    def windows_of(self, block_size: int, ranges: Sequence[BlockRange],
                   read_ahead: bool = True) -> Iterator[tuple[int, Window]]:
        """The windows of every range of ``ranges`` (sorted, apart), in order, as
        :meth:`windows` gives them; a window never spans two ranges.  A source may
        read ahead across ranges (NBD keeps requests of the next ranges in flight)."""
        for lo, hi in ranges:
            yield from self.windows(block_size, lo, hi, read_ahead)

    @abstractmethod
    def spec(self) -> SourceSpec:
        """A picklable description from which a worker reopens this source."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> BlockSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

