"""Marks over index positions: one bit per stored block, not a byte (issue 18).

verify and gc mark the index entries some point references.  The index numbers
its entries 0..n-1 (every part's rows after the parts before it), so a mark is a
bit in a bitmap of n bits: 1/8 byte per stored block, 2 MB for 16 million.

1. :meth:`Marks.set` marks the given positions (any order, repeats allowed).
2. :meth:`Marks.get` unpacks the marks of one range of positions (a chunk of the
   index, as :meth:`cbt.repo.index.Index.chunks` hands them out) into a bool array
   of that range only.
3. :meth:`Marks.positions` yields the marked positions ascending, a bounded range
   at a time; :meth:`Marks.count` counts them.

Bit ``p % 8`` of byte ``p // 8`` (numpy's ``bitorder="little"``) is position ``p``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

STEP = 1 << 20  # positions unpacked at once by positions() and count(): 1 MB of bools


class Marks:
    """``n`` bits, all clear at first."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.bits = np.zeros((n + 7) // 8, dtype=np.uint8)

    def set(self, positions: npt.NDArray[np.int64]) -> None:
        """Mark ``positions`` (each in 0..n-1)."""
        p = np.asarray(positions, dtype=np.int64)
        if len(p) and (p.min() < 0 or p.max() >= self.n):
            raise IndexError(f"position out of 0..{self.n - 1}")
        np.bitwise_or.at(self.bits, p >> 3, np.left_shift(1, p & 7).astype(np.uint8))

    def get(self, start: int, stop: int) -> npt.NDArray[np.bool_]:
        """The marks of positions ``start``..``stop - 1`` as bools."""
        stop = min(stop, self.n)
        if stop <= start:
            return np.zeros(0, dtype=bool)
        lo = start >> 3
        unpacked = np.unpackbits(self.bits[lo:(stop + 7) >> 3], bitorder="little")
        return unpacked[start - 8 * lo:stop - 8 * lo].astype(bool)

    def positions(self, step: int = STEP) -> Iterator[npt.NDArray[np.int64]]:
        """The marked positions, ascending, those of ``step`` positions at a time."""
        step = max(8, step - step % 8)  # (whole bytes)
        for start in range(0, self.n, step):
            yield start + np.nonzero(self.get(start, start + step))[0].astype(np.int64)

    def count(self) -> int:
        return sum(len(p) for p in self.positions())


__all__ = ["Marks"]
