"""Helpers shared by the tests: ground truth computed without cbt, and a CLI runner.

Nothing here imports cbt's scan, diff or core: the truth the tests compare
against is plain numpy and the ``blake3`` package, so a bug in cbt cannot hide
by being repeated on both sides of an assertion.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import blake3
import numpy as np
import numpy.typing as npt

PAGE = 4096
ZERO_DIGEST = bytes(32)
DATA, ZERO, HOLE = 0, 1, 2

# The one exact shape of each command's --json object (issue 2).
SCAN_KEYS = {"path", "size", "block_size", "blocks", "data_blocks", "zero_blocks",
             "hole_blocks", "bytes_read", "seconds", "warnings"}
DIFF_KEYS = {"block_size", "size_a", "size_b", "blocks", "changed_blocks", "changed_bytes",
             "ranges", "warnings"}


def run_cli(*args: object, cwd: str | os.PathLike[str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``cbt ARGS...`` as a separate process, capturing text output."""
    return subprocess.run([sys.executable, "-m", "cbt.cli.main", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          check=False)


def nblocks(size: int, bs: int) -> int:
    return -(-size // bs)


def read_image(path: str | os.PathLike[str]) -> npt.NDArray[np.uint8]:
    return np.fromfile(path, dtype=np.uint8)


def block_bytes(data: npt.NDArray[np.uint8] | bytes, bs: int, i: int) -> bytes:
    return bytes(data[i * bs:(i + 1) * bs])


def truth_hash(data: npt.NDArray[np.uint8] | bytes, bs: int,
               holes: npt.NDArray[np.bool_] | None = None
               ) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """Digests and flags of every block, block by block with ``blake3.blake3``."""
    n = nblocks(len(data), bs)
    digests = np.zeros((n, 32), dtype=np.uint8)
    flags = np.zeros(n, dtype=np.uint8)
    for i in range(n):
        block = block_bytes(data, bs, i)
        if holes is not None and holes[i]:
            flags[i] = HOLE
        elif block.count(0) == len(block):
            flags[i] = ZERO
        else:
            digests[i] = np.frombuffer(blake3.blake3(block).digest(), dtype=np.uint8)
    return digests, flags


def truth_bitmap(x: npt.NDArray[np.uint8], y: npt.NDArray[np.uint8],
                 bs: int) -> npt.NDArray[np.uint8]:
    """Changed blocks under issue 2's rules, by comparing the bytes with numpy.

    Block i covers [i*bs, min((i+1)*bs, max size)); when the sizes differ the
    block holding byte min(size_a, size_b) and every block after it are changed.
    """
    big, short = max(len(x), len(y)), min(len(x), len(y))
    n = nblocks(big, bs)
    if len(x) == len(y):
        pad = np.zeros(n * bs - big, dtype=np.uint8)
        xx, yy = np.concatenate([x, pad]), np.concatenate([y, pad])
        return (xx.reshape(n, bs) != yy.reshape(n, bs)).any(axis=1).astype(np.uint8)
    k = short // bs
    out = np.ones(n, dtype=np.uint8)
    out[:k] = (x[:k * bs].reshape(k, bs) != y[:k * bs].reshape(k, bs)).any(axis=1)
    return out


def truth_ranges(bitmap: npt.NDArray[np.uint8], bs: int, total: int) -> list[list[int]]:
    """Merged [offset, length] byte runs of set bits, the last clipped to ``total``."""
    edges = np.diff(np.concatenate([[0], bitmap.astype(np.int8) != 0, [0]]).astype(np.int8))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return [[int(s) * bs, min(int(e) * bs, total) - int(s) * bs]
            for s, e in zip(starts, ends, strict=True)]


def truth_diff(x: npt.NDArray[np.uint8], y: npt.NDArray[np.uint8], bs: int) -> dict[str, object]:
    """What ``cbt diff --json`` must print for byte arrays x and y."""
    bitmap = truth_bitmap(x, y, bs)
    ranges = truth_ranges(bitmap, bs, max(len(x), len(y)))
    return {
        "block_size": bs,
        "size_a": len(x),
        "size_b": len(y),
        "blocks": nblocks(max(len(x), len(y)), bs),
        "changed_blocks": int(bitmap.sum()),
        "changed_bytes": sum(length for _, length in ranges),
        "ranges": ranges,
        "warnings": [],
    }


def fs_has_page_holes(directory: Path) -> bool:
    """Does this file system report holes at 4 KiB granularity (SEEK_DATA/SEEK_HOLE)?"""
    probe = directory / ".hole-probe"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, 4 * PAGE)
        os.pwrite(fd, b"x", 2 * PAGE)
        os.fsync(fd)
        return (os.lseek(fd, 0, os.SEEK_DATA) == 2 * PAGE
                and os.lseek(fd, 2 * PAGE, os.SEEK_HOLE) == 3 * PAGE)
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink()


class SparseImage:
    """A sparse file built with ftruncate, pwrite and hole punching, with its truth.

    ``content`` mirrors every byte; ``alloc`` marks the 4 KiB pages that hold
    data (a write allocates every page it touches; a punch frees the pages
    wholly inside it and zeroes the rest).  Keep punches page-aligned.
    """

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self.content = np.zeros(size, dtype=np.uint8)
        self.alloc = np.zeros(nblocks(size, PAGE), dtype=bool)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)

    def write(self, offset: int, data: bytes | npt.NDArray[np.uint8]) -> None:
        raw = bytes(data)
        assert offset + len(raw) <= self.size
        fd = os.open(self.path, os.O_WRONLY)
        try:
            assert os.pwrite(fd, raw, offset) == len(raw)
        finally:
            os.close(fd)
        self.content[offset:offset + len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        if raw:
            self.alloc[offset // PAGE:nblocks(offset + len(raw), PAGE)] = True

    def write_random(self, offset: int, length: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.write(offset, rng.integers(1, 256, size=length, dtype=np.uint8))

    def punch(self, offset: int, length: int) -> None:
        from cbt.source.synth import punch_hole

        assert offset % PAGE == 0 and length % PAGE == 0
        fd = os.open(self.path, os.O_RDWR)
        try:
            punch_hole(fd, offset, length)
        finally:
            os.close(fd)
        self.content[offset:offset + length] = 0
        self.alloc[offset // PAGE:(offset + length) // PAGE] = False

    def holes(self, bs: int) -> npt.NDArray[np.bool_]:
        """Blocks lying wholly in a hole (no allocated page intersects them)."""
        n = nblocks(self.size, bs)
        per = bs // PAGE
        pad = np.zeros(n * per - len(self.alloc), dtype=bool)
        return ~np.concatenate([self.alloc, pad]).reshape(n, per).any(axis=1)

    def expected(self, bs: int) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8], int]:
        """Digests, flags and bytes read that a scan at block size ``bs`` must report."""
        holes = self.holes(bs)
        digests, flags = truth_hash(self.content, bs, holes)
        read = sum(min(bs, self.size - i * bs) for i in range(len(flags)) if not holes[i])
        return digests, flags, read
