"""Reading a shard: the one hash loop and the one compare loop.

Hash (scan, backup):

1. Ask the source for the windows of the shard's block ranges (an NBD source
   keeps reads of the next ranges in flight meanwhile).
2. Hash each window with the core straight into the caller's digest and flag
   buffers (``packed``: rows in shard order, for a worker that sends its rows
   back; else rows are block numbers, for whole-disk shared buffers).  Blocks
   an earlier scan already hashed (``prehashed``) are copied from its buffers
   instead, and the window is mapped without read-ahead.
3. Hand the window to the caller while it is still mapped (a backup stores
   the blocks its vault lacks from it), then count its bytes as read.

Compare (diff of two images): the windows of two sources side by side,
compared block by block with ``memcmp`` in the core, into a bitmap.

Both loops are per window, never per block: the per-block work is the core's.
No numpy here (``cbt scan`` start-up time counts).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import TYPE_CHECKING

from cbt.core.errors import CbtIOError
from cbt.core.native import fast
from cbt.source.base import BlockSource, Window
from cbt.source.plan import BlockRange

if TYPE_CHECKING:
    from cbt.core.parallel import Report


def hash_shard(source: BlockSource, block_size: int, ranges: Sequence[BlockRange],
               digests: memoryview, flags: memoryview, report: Report, packed: bool = False,
               prehashed: tuple[Window | memoryview, Window | memoryview] | None = None,
               key: bytes | None = None,
               ) -> Generator[tuple[int, Window], None, None]:
    """Hash ``ranges`` of ``source`` into ``digests`` (flat, 32 bytes a block) and ``flags``.

    Yields ``(row, window)`` after hashing each window: ``row`` is where the
    window's first block went in the buffers.  ``prehashed`` is the digests and
    flags of an earlier scan, in the same rows as ``digests`` and ``flags``,
    copied instead of hashed.
    ``key`` (32 bytes) makes the digests keyed BLAKE3 (an encrypted vault's
    block ids); None: plain BLAKE3.
    """
    size = fast.DIGEST_SIZE
    copied = None if prehashed is None else (memoryview(prehashed[0]), memoryview(prehashed[1]))
    todo = iter(ranges)
    base, (lo, hi) = 0, (0, 0)  # base: row of the current range's first block (packed)
    for first, window in source.windows_of(block_size, ranges, read_ahead=copied is None):
        while first >= hi:  # (windows come in order and never span two ranges)
            base += hi - lo
            lo, hi = next(todo)
        n = fast.nblocks(len(window), block_size)
        at = first + (base - lo if packed else 0)
        rows = digests[at * size:(at + n) * size]
        if copied is None:
            try:
                # (a memoryview cannot slice two dimensions: slice flat, then shape)
                fast.hash_blocks(window, block_size, rows.cast("B", (n, size)),
                                 flags[at:at + n], key)
            except OSError as exc:
                raise CbtIOError(exc.errno, f"read error in {source.path} near byte "
                                 f"{first * block_size}: {exc.strerror}") from None
        else:
            rows[:] = copied[0][at * size:(at + n) * size]
            flags[at:at + n] = copied[1][at:at + n]
        yield at, window
        report(len(window))


def compare_shard(a: BlockSource, b: BlockSource, block_size: int,
                  ranges: Sequence[BlockRange], bitmap: memoryview, report: Report) -> None:
    """Set ``bitmap[i]`` for each block ``i`` of ``ranges`` that differs in ``a`` and ``b``."""
    for lo, hi in ranges:
        for (first, wa), (_, wb) in zip(a.windows(block_size, lo, hi),
                                        b.windows(block_size, lo, hi), strict=True):
            n = fast.nblocks(len(wa), block_size)
            fast.compare_buffers(wa, wb, block_size, bitmap[first:first + n])
            report(2 * len(wa))
