"""blockio.Writeback: which ranges it hands to the kernel, and that it never loses a write."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cbt.core.blockio import Writeback

MIB = 1 << 20


class Recording(Writeback):
    """Records the ranges handed over for writeback (and still starts it)."""

    def __init__(self, batch: int) -> None:
        self.handed: list[tuple[int, int, int]] = []
        super().__init__(batch)

    def _hand_over(self, fd: int, lo: int, hi: int) -> None:
        if hi > lo:
            self.handed.append((fd, lo, hi))
        super()._hand_over(fd, lo, hi)


def test_batches_follow_contiguous_writes(tmp_path: Path) -> None:
    fds = [os.open(tmp_path / f"{k}.img", os.O_RDWR | os.O_CREAT, 0o644) for k in range(2)]
    wb = Recording(batch=4 * MIB)
    try:
        a, b = fds
        for k in range(10):  # 10 MiB written in order to a, interleaved with b
            wb.written(a, k * MIB, MIB)
            wb.written(b, 100 * MIB + k * MIB, MIB)
        wb.written(a, 50 * MIB, MIB)  # a jump: what was pending goes, a new range starts
        assert [h for h in wb.handed if h[0] == a] == [
            (a, 0, 4 * MIB), (a, 4 * MIB, 8 * MIB), (a, 8 * MIB, 10 * MIB)]
        assert [h for h in wb.handed if h[0] == b] == [
            (b, 100 * MIB, 104 * MIB), (b, 104 * MIB, 108 * MIB)]
    finally:
        for fd in fds:
            wb.forget(fd)
            os.close(fd)
        wb.close()


def test_data_written_with_writeback_reads_back(tmp_path: Path) -> None:
    data = np.random.default_rng(3).integers(0, 256, 24 * MIB, np.uint8).tobytes()
    path = tmp_path / "disk.img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    wb = Writeback(batch=2 * MIB)
    try:
        for off in range(0, len(data), 3 * MIB // 2):
            os.pwrite(fd, data[off:off + 3 * MIB // 2], off)
            wb.written(fd, off, len(data[off:off + 3 * MIB // 2]))
        os.fsync(fd)
    finally:
        wb.forget(fd)
        os.close(fd)
        wb.close()
    assert path.read_bytes() == data
