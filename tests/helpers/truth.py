"""The oracles: what cbt must report, computed without cbt.

Nothing here imports cbt: the truth the tests compare against is plain numpy,
the ``blake3`` package, ``hashlib`` and what the kernel reports (``SEEK_DATA``),
so a bug in cbt cannot hide by being repeated on both sides of an assertion.
One rule, one oracle: changed blocks under issue 2's rules are ``truth_bitmap``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import blake3
import numpy as np
import numpy.typing as npt

from helpers import MIB, PAGE

ZERO_DIGEST = bytes(32)
DATA, ZERO, HOLE = 0, 1, 2

# -- block arithmetic ---------------------------------------------------------------


def nblocks(size: int, bs: int) -> int:
    return -(-size // bs)


def block_len(size: int, bs: int, i: int) -> int:
    """Bytes of block ``i`` of a disk of ``size`` bytes (the tail block may be short)."""
    return min(bs, size - i * bs)


def block_bytes(data: npt.NDArray[np.uint8] | bytes, bs: int, i: int) -> bytes:
    return bytes(data[i * bs:(i + 1) * bs])


def padded_blocks(data: npt.NDArray[np.uint8], bs: int) -> npt.NDArray[np.uint8]:
    """``data`` zero-padded to whole blocks, as an (n, bs) array."""
    n = nblocks(len(data), bs)
    pad = np.zeros(n * bs - len(data), dtype=np.uint8)
    return np.concatenate([data, pad]).reshape(n, bs)


def nonzero_blocks(data: npt.NDArray[np.uint8], bs: int) -> npt.NDArray[np.bool_]:
    """Blocks holding any non-zero byte (what a vault stores)."""
    if len(data) == 0:
        return np.zeros(0, dtype=bool)
    return padded_blocks(data, bs).any(axis=1)


def data_bytes(data: npt.NDArray[np.uint8], bs: int) -> int:
    """Raw bytes of the non-zero blocks."""
    return sum(block_len(len(data), bs, int(i)) for i in np.flatnonzero(nonzero_blocks(data, bs)))


def resized(old: npt.NDArray[np.uint8], size: int) -> npt.NDArray[np.uint8]:
    """``old`` cut or zero-extended to ``size`` bytes (a file after ftruncate)."""
    if len(old) >= size:
        return old[:size]
    return np.concatenate([old, np.zeros(size - len(old), dtype=np.uint8)])


def runs(mask: npt.NDArray[np.bool_]) -> list[tuple[int, int]]:
    """Set bits as (first, count) runs."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8) != 0, [0]]).astype(np.int8))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return [(int(s), int(e - s)) for s, e in zip(starts, ends, strict=True)]


# -- digests --------------------------------------------------------------------------


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


def block_digests(data: npt.NDArray[np.uint8], bs: int) -> dict[bytes, int]:
    """Digest -> raw length of every distinct non-zero block (what a vault must hold)."""
    out: dict[bytes, int] = {}
    mv = memoryview(data)
    for i in np.flatnonzero(nonzero_blocks(data, bs)).tolist():
        block = mv[i * bs:(i + 1) * bs]
        out[blake3.blake3(block).digest()] = len(block)
    return out


def distinct_raw(entries: Iterable[tuple[bytes, int]]) -> int:
    """Sum of raw lengths, each digest counted once."""
    seen: dict[bytes, int] = {}
    for d, raw in entries:
        seen.setdefault(d, raw)
    return sum(seen.values())


def file_digest(path: Path) -> str:
    """BLAKE3 of a whole file, read in chunks (large disks)."""
    h = blake3.blake3()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MIB):
            h.update(chunk)
    return h.hexdigest()


def sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def tree_hashes(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``root``."""
    return {str(p.relative_to(root)): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


# -- changed blocks and diffs (issue 2's rules) ----------------------------------------


def truth_bitmap(x: npt.NDArray[np.uint8], y: npt.NDArray[np.uint8],
                 bs: int) -> npt.NDArray[np.uint8]:
    """Changed blocks under issue 2's rules, by comparing the bytes with numpy.

    Block i covers [i*bs, min((i+1)*bs, max size)); when the sizes differ the
    block holding byte min(size_a, size_b) and every block after it are changed.
    """
    big, short = max(len(x), len(y)), min(len(x), len(y))
    n = nblocks(big, bs)
    if len(x) == len(y):
        return (padded_blocks(x, bs) != padded_blocks(y, bs)).any(axis=1).astype(np.uint8)
    k = short // bs
    out = np.ones(n, dtype=np.uint8)
    out[:k] = (x[:k * bs].reshape(k, bs) != y[:k * bs].reshape(k, bs)).any(axis=1)
    return out


def truth_changed(old: npt.NDArray[np.uint8], new: npt.NDArray[np.uint8], bs: int) -> int:
    """How many blocks changed under ``cbt diff``'s rules (``truth_bitmap``)."""
    return int(truth_bitmap(old, new, bs).sum())


def differing_blocks(old: npt.NDArray[np.uint8], new: npt.NDArray[np.uint8],
                     bs: int) -> npt.NDArray[np.bool_]:
    """Blocks of ``new`` whose bytes differ from ``old`` once ``old`` has ``new``'s size.

    Not ``truth_bitmap``'s rule: this is what a restore in place must rewrite.
    """
    if len(new) == 0:
        return np.zeros(0, dtype=bool)
    return (padded_blocks(resized(old, len(new)), bs) != padded_blocks(new, bs)).any(axis=1)


def truth_ranges(bitmap: npt.NDArray[np.uint8], bs: int, total: int) -> list[list[int]]:
    """Merged [offset, length] byte runs of set bits, the last clipped to ``total``."""
    return [[s * bs, min((s + c) * bs, total) - s * bs] for s, c in runs(bitmap != 0)]


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


# -- holes, as the kernel reports them -------------------------------------------------


def data_block_mask(path: str | os.PathLike[str], bs: int) -> npt.NDArray[np.bool_]:
    """Blocks of a file that hold any allocated byte (SEEK_DATA / SEEK_HOLE)."""
    size = os.path.getsize(path)
    n = nblocks(size, bs)
    mask = np.zeros(n, dtype=bool)
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break  # ENXIO: only a hole remains
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            mask[start // bs:nblocks(end, bs)] = True
            pos = end
    finally:
        os.close(fd)
    return mask


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
