"""Change tracking's truth: disks written in known patterns, and what really changed.

A *tracked disk* is random data (no zero byte, so a write or a punched hole always
changes what it touches) with holes in known places.  :func:`mutate` applies a
seeded random pattern the way a guest writes: writes straddling block boundaries,
1-byte writes, punched holes (a TRIM), writes into holes, a truncate-and-extend of
the tail.  Every write XORs the bytes with non-zero values, so each byte it touches
really changes.  The truth (:func:`changed_blocks`) comes from comparing two files
byte for byte with numpy, never from cbt.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt

from helpers import MIB, PAGE

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def punch_hole(path: str | os.PathLike[str], offset: int, length: int) -> None:
    """fallocate(PUNCH_HOLE | KEEP_SIZE): what a guest's TRIM does to its image file."""
    fd = os.open(path, os.O_WRONLY)
    try:
        if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def nonzero_random(size: int, rng: np.random.Generator) -> npt.NDArray[np.uint8]:
    return rng.integers(1, 256, size=size, dtype=np.uint8)


def make_tracked_disk(path: Path, size: int, seed: int,
                      holes: tuple[tuple[int, int], ...] = ()) -> Path:
    """Random non-zero bytes with the given (offset, length) holes (page aligned)."""
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        for off in range(0, size, 8 * MIB):
            f.write(nonzero_random(min(8 * MIB, size - off), rng).tobytes())
        f.flush()
        os.fsync(f.fileno())
    for off, length in holes:
        punch_hole(path, off, length)
    return path


def xor_write(fd: int, offset: int, length: int, rng: np.random.Generator) -> None:
    """Change every byte of [offset, offset + length): XOR it with a non-zero value."""
    old = np.frombuffer(os.pread(fd, length, offset), dtype=np.uint8)
    new = old ^ nonzero_random(len(old), rng)
    os.pwrite(fd, new.tobytes(), offset)


def mutate(path: Path, seed: int, writes: int = 60, punches: int = 6,
           truncate_tail: int = 0) -> None:
    """A guest's writes on the live disk ``path`` (its size is kept): see the module."""
    rng = np.random.default_rng(seed)
    size = os.path.getsize(path)
    lengths = (1, 1, 7, 511, PAGE - 1, PAGE, PAGE + 1, 3 * PAGE + 3, 70_000)
    fd = os.open(path, os.O_RDWR)
    try:
        for _ in range(writes):
            length = int(rng.choice(lengths))
            offset = int(rng.integers(0, size - length))
            if rng.random() < 0.3:  # end right past a page boundary: straddles two pages
                offset = max(0, (offset // PAGE + 1) * PAGE - int(rng.integers(1, 64)))
            xor_write(fd, offset, min(length, size - offset), rng)
    finally:
        os.close(fd)
    for _ in range(punches):  # >= 64 bytes of non-zero data: the punch changes each block
        length = int(rng.integers(64, 5 * PAGE))
        offset = int(rng.integers(0, size - length))
        punch_hole(path, offset, length)
    if truncate_tail:
        os.truncate(path, size - truncate_tail)
        os.truncate(path, size)


def changed_blocks(a: str | os.PathLike[str], b: str | os.PathLike[str],
                   block_size: int) -> set[int]:
    """The blocks of ``block_size`` whose bytes differ between two files of one size."""
    x, y = np.fromfile(a, dtype=np.uint8), np.fromfile(b, dtype=np.uint8)
    assert len(x) == len(y), (a, b)
    n = -(-len(x) // block_size)
    pad = n * block_size - len(x)
    diff = np.concatenate([x != y, np.zeros(pad, dtype=bool)]).reshape(n, block_size)
    return set(np.flatnonzero(diff.any(axis=1)).tolist())


def blocks_of(ranges: list[tuple[int, int]] | tuple[tuple[int, int], ...]) -> set[int]:
    """Every block of (first, end) ranges; asserts they are sorted, disjoint, not touching."""
    out: set[int] = set()
    last_end = -1
    for lo, hi in ranges:
        assert lo < hi and lo > last_end, ranges
        last_end = hi
        out.update(range(lo, hi))
    return out


def coarser(blocks: set[int], factor: int) -> set[int]:
    return {b // factor for b in blocks}


def btrfs(*args: str) -> None:
    subprocess.run(["btrfs", *args], check=True, capture_output=True)


@contextlib.contextmanager
def fs_area(kind: str, mnt: Path, name: str) -> Iterator[Path]:
    """A fresh folder ``name`` on a loop-mounted file system (a subvolume on btrfs), removed
    afterwards with every subvolume made in or beside it (snapshots, tracking bases)."""
    d = mnt / name.replace("[", "-").replace("]", "")
    if kind == "btrfs":
        btrfs("subvolume", "create", str(d))
    else:
        d.mkdir()
    try:
        yield d
    finally:
        if kind == "btrfs":  # deepest first: a subvolume holding others is deleted last
            found = [p for p in (*d.rglob("*"), *mnt.glob(f"{d.name}*"))
                     if p.is_dir() and not p.is_symlink() and p.stat().st_ino == 256]
            for p in sorted(set(found), key=lambda p: -len(p.parts)):
                if p != d:
                    btrfs("subvolume", "delete", str(p))
            if d.exists():
                for p in d.iterdir():
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                btrfs("subvolume", "delete", str(d))
        else:
            shutil.rmtree(d, ignore_errors=True)
