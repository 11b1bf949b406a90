"""Synthetic disks with realistic contents and change patterns.

Used by ``cbt demo``, the benchmarks and the tests, so all three exercise the
same shapes of data:

- a *file-system image*: extents of incompressible data and of text-like
  (compressible) data, zero-filled regions and unallocated holes;
- a *database file*: 4 KiB pages, some zeroed, a sparse tail.

Changes (:func:`mutate`) are the ones a day brings: scattered 4 KiB page
writes (a database), longer runs (files rewritten), writes straddling block
boundaries, regions zeroed or punched into holes, a disk that grows or shrinks.
Everything is deterministic in its seed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from cbt.core.blockio import copy_sparse, punch_hole
from cbt.core.blockio import write_all as _write

__all__ = ["copy_sparse", "make_db_file", "make_fs_image", "mutate", "punch_hole"]

PAGE = 4096
def random_bytes(rng: np.random.Generator, n: int) -> bytes:
    """Incompressible bytes."""
    return rng.integers(0, 256, size=n, dtype=np.uint8).tobytes()


def text_bytes(rng: np.random.Generator, n: int) -> bytes:
    """Compressible, text-like bytes (a small vocabulary of words)."""
    words = np.array([b"cbt ", b"block ", b"disk ", b"vault ", b"change ", b"the ",
                      b"recovery ", b"point\n", b"0123 ", b"data "], dtype=object)
    out = b"".join(words[rng.integers(0, len(words), size=n // 4 + 16)])
    return out[:n]




def make_fs_image(path: str | os.PathLike[str], size: int, seed: int = 0) -> None:
    """A file-system-like image: data and text extents, zero regions, holes."""
    rng = np.random.default_rng(seed)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        pos = 0
        while pos < size:
            length = min(int(rng.integers(1, 64)) * 64 * 1024, size - pos)
            kind = rng.choice(["random", "text", "zero", "hole"], p=[0.45, 0.25, 0.1, 0.2])
            if kind == "random":
                _write(fd, pos, random_bytes(rng, length))
            elif kind == "text":
                _write(fd, pos, text_bytes(rng, length))
            elif kind == "zero":
                _write(fd, pos, bytes(length))
            pos += length
    finally:
        os.close(fd)


def make_db_file(path: str | os.PathLike[str], size: int, seed: int = 0) -> None:
    """A database-like file: 4 KiB pages, one in ten zero, the last eighth a hole."""
    rng = np.random.default_rng(seed)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        used = (size - size // 8) // PAGE * PAGE
        chunk = 256 * PAGE
        for pos in range(0, used, chunk):
            n = min(chunk, used - pos)
            pages = np.frombuffer(random_bytes(rng, n), dtype=np.uint8).reshape(-1, PAGE).copy()
            pages[rng.random(pages.shape[0]) < 0.1] = 0
            _write(fd, pos, pages.tobytes())
    finally:
        os.close(fd)


@dataclass
class Change:
    kind: str
    offset: int
    length: int

    def __str__(self) -> str:
        return f"{self.kind} at {self.offset} ({self.length} bytes)"


def mutate(path: str | os.PathLike[str], seed: int, page_writes: int = 64,
           runs: int = 4, run_length: int = 1 << 20, zero_runs: int = 1,
           holes: int = 1, resize: int = 0) -> list[Change]:
    """Apply a day's worth of changes in place and return what was done.

    ``page_writes`` scattered 4 KiB writes at page-aligned offsets; ``runs``
    longer writes at unaligned offsets (they straddle block boundaries);
    ``zero_runs`` regions overwritten with zeros; ``holes`` regions punched;
    ``resize`` bytes appended (> 0, random data) or cut off (< 0).
    """
    rng = np.random.default_rng(seed)
    changes: list[Change] = []
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        pages = max(size // PAGE, 1)
        for _ in range(page_writes):
            off = int(rng.integers(0, pages)) * PAGE
            length = min(PAGE, size - off)
            if length > 0:
                _write(fd, off, random_bytes(rng, length))
                changes.append(Change("page write", off, length))
        for _ in range(runs):
            length = min(int(rng.integers(run_length // 2, run_length + 1)), size)
            off = int(rng.integers(0, max(size - length, 0) + 1))
            _write(fd, off, random_bytes(rng, length))
            changes.append(Change("run write", off, length))
        for _ in range(zero_runs):
            length = min(256 * 1024 + 123, size)
            off = int(rng.integers(0, max(size - length, 0) + 1))
            _write(fd, off, bytes(length))
            changes.append(Change("zero fill", off, length))
        for _ in range(holes):
            length = min(512 * 1024, size)
            off = int(rng.integers(0, max(size - length, 0) // PAGE + 1)) * PAGE
            punch_hole(fd, off, length)
            changes.append(Change("hole punch", off, length))
        if resize > 0:
            _write(fd, size, random_bytes(rng, resize))
            changes.append(Change("append", size, resize))
        elif resize < 0:
            os.ftruncate(fd, max(size + resize, 0))
            changes.append(Change("shrink", max(size + resize, 0), -resize))
        os.fsync(fd)
    finally:
        os.close(fd)
    return changes
