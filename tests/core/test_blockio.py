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


# copy_sparse of a source truncated under it, once the first chunk is written (a
# thread watches the copy's allocated blocks); run apart, so a copy that never ends
# is a timeout, not a test run that hangs.
SHRINK = r"""
import os, sys, threading
from cbt.core.blockio import copy_sparse
from cbt.core.errors import CbtIOError
src, dst = sys.argv[1], sys.argv[2]
with open(src, "wb") as f:
    f.write(os.urandom(256 << 20))
def shrink():
    while True:
        try:
            if os.stat(dst).st_blocks > 0:
                break
        except FileNotFoundError:
            pass
    os.truncate(src, 12345)
threading.Thread(target=shrink, daemon=True).start()
try:
    copy_sparse(src, dst)
except CbtIOError as exc:
    print(exc)
else:
    print("copied", os.path.getsize(dst))
"""


def test_copy_sparse_of_a_source_that_shrinks(tmp_path: Path) -> None:
    """Instant restore copies a kept snapshot where it cannot reflink it: a snapshot that
    shrinks under the copy is an error naming it, not a copy that never ends (a read
    at the new end returns nothing)."""
    import subprocess
    import sys

    src, dst = tmp_path / "snap.img", tmp_path / "copy.img"
    r = subprocess.run([sys.executable, "-c", SHRINK, str(src), str(dst)],
                       capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{src} shrank while it was copied: it ends at byte "), r.stdout


def test_copy_sparse_of_an_unreadable_source(tmp_path: Path) -> None:
    """A read error in the source names the file, the byte (its page) and the error."""
    from helpers.badblocks import bad_btrfs, random_file

    from cbt.core.blockio import copy_sparse
    from cbt.core.errors import CbtIOError

    with bad_btrfs(tmp_path) as fs:
        src = fs.mnt / "snap.img"
        random_file(src, 4 * MIB)
        page = fs.corrupt(src, 3 * MIB + 5)
        try:
            copy_sparse(src, tmp_path / "copy.img")
        except CbtIOError as exc:
            got = str(exc)
        else:
            got = "copied"
    assert got == f"read error on {src} at byte {page}: Input/output error", got


def test_small_gaps_are_taken_into_one_range(tmp_path: Path) -> None:
    """Writes with holes between them (a restore skips zero blocks) make one range per
    batch, not one per write: a gap of less than a batch ahead is taken in."""
    fd = os.open(tmp_path / "a.img", os.O_RDWR | os.O_CREAT, 0o644)
    wb = Recording(batch=4 * MIB)
    try:
        for k in range(12):  # 64 KiB written every 512 KiB: 6 MiB spanned
            wb.written(fd, k * 512 * 1024, 64 * 1024)
        end = 11 * 512 * 1024 + 64 * 1024
        assert wb.handed == [(fd, 0, 4 * MIB + 64 * 1024)]  # the first batch
        wb.written(fd, 20 * MIB, MIB)  # a gap of a batch or more: the rest goes
        assert wb.handed[1:] == [(fd, 4 * MIB + 64 * 1024, end)]
        wb.written(fd, 10 * MIB, MIB)  # backwards: what was pending goes too
        assert wb.handed[2:] == [(fd, 20 * MIB, 21 * MIB)]
    finally:
        wb.forget(fd)
        os.close(fd)
        wb.close()
