"""Disk images to back up, copies of them as they were, and byte-for-byte comparisons.

Images are made with plain numpy and file calls (``cbt.source.synth`` only where
a realistic file-system or database layout is wanted, as a generator of input,
never as the truth); every image's truth is its own bytes or a copy of them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import numpy.typing as npt

from helpers import MIB, PAGE
from helpers.truth import data_block_mask, nblocks, padded_blocks, truth_hash

# -- reading -----------------------------------------------------------------------


def read(path: str | os.PathLike[str]) -> npt.NDArray[np.uint8]:
    """Every byte of a file."""
    return np.fromfile(path, dtype=np.uint8)


def read_device(dev: str, length: int | None = None) -> npt.NDArray[np.uint8]:
    with open(dev, "rb") as f:
        raw = f.read() if length is None else f.read(length)
    return np.frombuffer(raw, dtype=np.uint8)


# -- making disks ------------------------------------------------------------------


def random_bytes(size: int, seed: int) -> npt.NDArray[np.uint8]:
    return np.random.default_rng(seed).integers(0, 256, size=size, dtype=np.uint8)


def fast_random(size: int, seed: int) -> bytes:
    """``size`` pseudo-random bytes (64-bit words of SFC64: fast for large disks)."""
    words = np.random.Generator(np.random.SFC64(seed)).integers(
        0, 2**64, size=-(-size // 8), dtype=np.uint64)
    return words.tobytes()[:size]


def write_random_disk(path: Path, size: int, seed: int) -> Path:
    """A fully written disk of random bytes, written in chunks (large disks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for k, off in enumerate(range(0, size, 64 * MIB)):
            f.write(fast_random(min(64 * MIB, size - off), seed * 1000 + k))
    return path


def write_disk(path: Path, data: npt.NDArray[np.uint8]) -> Path:
    """``data`` as a new file at ``path`` (a new inode: an earlier reflink or copy is untouched)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".writing")
    data.tofile(tmp)
    os.replace(tmp, path)
    return path


def make_disk(path: Path, size: int, seed: int, zero_share: float = 0.2) -> Path:
    """A fully written disk image: random data with some all-zero pages."""
    rng = np.random.default_rng(seed)
    data = rng.integers(1, 256, size=size, dtype=np.uint8)
    pages = size // PAGE
    for p in rng.choice(pages, size=int(pages * zero_share), replace=False).tolist():
        data[p * PAGE:(p + 1) * PAGE] = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    data.tofile(path)
    return path


def fs_image(path: str | os.PathLike[str], size: int, seed: int) -> Path:
    """``cbt.source.synth.make_fs_image`` with a mix worth testing: data, zeros and holes.

    Its extents are up to 4 MiB long, so a small image can come out all hole or
    all data; the first seed from ``seed`` on (deterministic) with 30-90% data
    and a hole is used.
    """
    from cbt.source.synth import make_fs_image

    for s in range(seed, seed + 1000 * 200, 1000):
        make_fs_image(path, size, seed=s)
        share = np.count_nonzero(padded_blocks(read(path), PAGE).any(axis=1)) / nblocks(size, PAGE)
        allocated = os.stat(path).st_blocks * 512
        if 0.3 <= share <= 0.9 and allocated < 0.97 * size:
            return Path(path)
    raise AssertionError(f"no seed gives a mixed image of {size} bytes")


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


# -- changing disks ------------------------------------------------------------------


def write_at(path: str | os.PathLike[str], offset: int, data: bytes) -> None:
    """``data`` written at ``offset`` in place (fsynced)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def scribble(path: Path, seed: int, pages: int = 20) -> None:
    """Overwrite ``pages`` random 4 KiB pages of a disk in place with random bytes (fsynced)."""
    rng = np.random.default_rng(seed)
    size = os.path.getsize(path)
    fd = os.open(path, os.O_WRONLY)
    try:
        for _ in range(pages):
            page = int(rng.integers(0, max(1, size // PAGE)))
            os.pwrite(fd, rng.integers(0, 256, PAGE, dtype=np.uint8).tobytes(), page * PAGE)
        os.fsync(fd)
    finally:
        os.close(fd)


# -- copies: the truth of a disk at one moment ------------------------------------------


def copy_disk(src: Path, dst: Path) -> Path:
    """A plain byte copy of the disk as it is now."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def keep_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """A sparse copy of the disk as it is now (holes stay holes)."""
    from cbt.source.synth import copy_sparse

    copy_sparse(src, dst)
    assert os.path.getsize(dst) == os.path.getsize(src)
    return Path(dst)


def assert_same_bytes(got: str | os.PathLike[str], want: str | os.PathLike[str],
                      bs: int | None = None) -> None:
    """Same size, same bytes (the first difference named, with its block if ``bs``)."""
    a, b = read(got), read(want)
    assert len(a) == len(b), f"{got}: size {len(a)}, expected {len(b)} ({want})"
    if not np.array_equal(a, b):
        first = int(np.flatnonzero(a != b)[0])
        where = f" (block {first // bs} of {bs})" if bs else ""
        raise AssertionError(f"{got} differs from {want}: first at byte {first}{where}")


def assert_same_disk(restored: str | os.PathLike[str], expected: str | os.PathLike[str],
                     bs: int) -> None:
    """Bit-identical, exactly the disk's size, and every all-zero block a hole."""
    assert_same_bytes(restored, expected, bs)
    e = read(expected)
    if len(e) == 0:
        return
    zero_blocks = ~padded_blocks(e, bs).any(axis=1)
    allocated = data_block_mask(restored, bs)
    bad = np.flatnonzero(zero_blocks & allocated)
    assert len(bad) == 0, (f"{restored}: {len(bad)} zero blocks are allocated, not holes "
                           f"(first block {int(bad[0])})")


# -- the one-moment writer's stamps ------------------------------------------------------


def stamps(path: Path) -> npt.NDArray[np.uint64]:
    """The writer's stamps of a disk: slot k (offset 8*k) holds k; slot 0 unused."""
    return np.fromfile(path, dtype="<u8")[1:]


def prefix_length(path: Path) -> int:
    """n such that the disk holds stamps 1..n and nothing after: else AssertionError."""
    s = stamps(path)
    n = int(np.count_nonzero(s))
    assert np.array_equal(s[:n], np.arange(1, n + 1, dtype=np.uint64)), \
        f"{path}: the stamps are not a prefix 1..{n}"
    return n
