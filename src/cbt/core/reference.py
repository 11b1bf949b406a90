"""Pure-Python reference of the native core (``_fast.pyx``), for tests only.

Same signatures, same outputs, written for obviousness rather than speed: the
test-suite runs one body against both implementations.  The product never
falls back to this module.
"""

from __future__ import annotations

from typing import Any

import blake3
import lz4.block
import numpy as np
import numpy.typing as npt

from cbt.core.errors import CbtValueError

API_VERSION = 5
DIGEST_SIZE = 32
FLAG_DATA = 0
FLAG_ZERO = 1
FLAG_HOLE = 2
MIN_BLOCK = 4096
MAX_BLOCK = 4 << 20
kernel = "python-reference"


def check_block_size(block_size: int) -> None:
    if not (MIN_BLOCK <= block_size <= MAX_BLOCK) or block_size & (block_size - 1):
        raise CbtValueError(
            f"block size {block_size}: block size must be a power of two from 4K to 4M"
        )


def nblocks(length: int, block_size: int) -> int:
    return -(-length // block_size)


def _bytes(buf: Any) -> bytes:
    view = memoryview(buf)
    if not view.c_contiguous:
        raise CbtValueError("buffer is not contiguous")
    return view.tobytes()


def _out(arr: Any, shape: tuple[int, ...], what: str) -> Any:
    """A writable uint8 output array of exactly ``shape`` (the core's rule)."""
    out = np.asarray(arr)
    if out.dtype != np.uint8 or out.shape != shape:
        raise CbtValueError(f"{what}: output array has the wrong shape")
    return out


def _digest_rows(arr: Any, what: str) -> Any:
    x = np.asarray(arr)
    if x.dtype != np.uint8 or x.ndim != 2 or (x.shape[0] and x.shape[1] != DIGEST_SIZE):
        raise CbtValueError(f"{what}: output array has the wrong shape")
    return x


def _blocks(data: bytes, block_size: int) -> list[bytes]:
    return [data[i : i + block_size] for i in range(0, len(data), block_size)]


def zero_flags(data: Any, block_size: int, flags: Any) -> int:
    check_block_size(block_size)
    blocks = _blocks(_bytes(data), block_size)
    out = _out(flags, (len(blocks),), "zero_flags")
    zeros = 0
    for i, block in enumerate(blocks):
        is_zero = block.count(0) == len(block)
        out[i] = FLAG_ZERO if is_zero else FLAG_DATA
        zeros += is_zero
    return zeros


def _hash(block: bytes, key: bytes | None) -> bytes:
    return (blake3.blake3(block) if key is None else blake3.blake3(block, key=key)).digest()


def hash_blocks(data: Any, block_size: int, digests: Any, flags: Any,
                key: bytes | None = None) -> int:
    check_block_size(block_size)
    blocks = _blocks(_bytes(data), block_size)
    dig = _out(digests, (len(blocks), DIGEST_SIZE), "hash_blocks")
    _out(flags, (len(blocks),), "hash_blocks")
    zero_flags(data, block_size, flags)
    hashed = 0
    for i, block in enumerate(blocks):
        if flags[i] == FLAG_ZERO:
            dig[i] = 0
        else:
            dig[i] = np.frombuffer(_hash(block, key), dtype=np.uint8)
            hashed += 1
    return hashed


def hash_each(buffers: list[Any], digests: Any, key: bytes | None = None) -> int:
    dig = np.asarray(digests)
    if dig.dtype != np.uint8 or dig.shape != (len(buffers), DIGEST_SIZE):
        raise CbtValueError("hash_each: output array has the wrong shape")
    for i, b in enumerate(buffers):
        dig[i] = np.frombuffer(_hash(bytes(b), key), dtype=np.uint8)
    return len(buffers)


def compare_digests(a: Any, b: Any, out: Any) -> int:
    x, y = _digest_rows(a, "compare_digests"), _digest_rows(b, "compare_digests")
    if x.shape[0] != y.shape[0]:
        raise CbtValueError("compare_digests: output array has the wrong shape")
    o = _out(out, (x.shape[0],), "compare_digests")
    changed = 0
    for i in range(x.shape[0]):
        o[i] = int(bytes(x[i]) != bytes(y[i]))
        changed += int(o[i])
    return changed


def compare_buffers(a: Any, b: Any, block_size: int, out: Any) -> int:
    check_block_size(block_size)
    x, y = _bytes(a), _bytes(b)
    if len(x) != len(y):
        raise CbtValueError(
            f"compare_buffers: buffers differ in length ({len(x)} and {len(y)})"
        )
    xs, ys = _blocks(x, block_size), _blocks(y, block_size)
    o = _out(out, (len(xs),), "compare_buffers")
    for i, (p, q) in enumerate(zip(xs, ys, strict=True)):
        o[i] = int(p != q)
    return int(o.sum())


def bitmap_runs(bitmap: Any, block_size: int, total_size: int) -> npt.NDArray[np.uint64]:
    check_block_size(block_size)
    bits = [int(v) for v in np.asarray(bitmap)]
    runs: list[tuple[int, int]] = []
    i = 0
    while i < len(bits):
        if not bits[i]:
            i += 1
            continue
        start = i
        while i < len(bits) and bits[i]:
            i += 1
        lo, hi = start * block_size, min(i * block_size, total_size)
        runs.append((lo, hi - lo))
    return np.array(runs, dtype=np.uint64).reshape(-1, 2)


STORED_RAW = 0
STORED_LZ4 = 2
DECODE_OK = 0
DECODE_BAD_CODEC = 1
DECODE_BAD_PAYLOAD = 2
DECODE_BAD_DIGEST = 3


def _lz4_rules_kept(src: bytes, size: int) -> bool:
    """The rules cbt's decoder keeps and the ``lz4`` package (liblz4 1.9.4) does not
    always: no offset 0, a match starts at least 12 bytes before the end of the output
    and ends at least 5 before it, and the block ends with literals.  (Lengths only: the
    package decodes; a block that breaks other rules it refuses itself.)"""
    ip, op, n = 0, 0, len(src)
    while ip < n:
        token = src[ip]
        lit, ip = _length(src, ip + 1, token >> 4)
        ip, op = ip + lit, op + lit
        if ip >= n:
            return True  # the last sequence (the package checks its length)
        if n - ip < 2 or src[ip] | src[ip + 1] << 8 == 0:
            return False
        match, ip = _length(src, ip + 2, token & 15)
        match += 4
        if size - op < 12 or match > size - op - 5 or ip >= n:
            return False
        op += match
    return True


def _length(src: bytes, ip: int, nibble: int) -> tuple[int, int]:
    """A token's length (its nibble, plus the bytes after it while they are 255 when it
    is 15) and where reading goes on."""
    length = nibble
    if nibble == 15:
        while ip < len(src):
            length += src[ip]
            ip += 1
            if src[ip - 1] != 255:
                break
    return length, ip


def _lz4(src: bytes, size: int) -> bytes | None:
    """The ``lz4`` package's decoding of a block to exactly ``size`` bytes, or None (also
    where it breaks a rule cbt's decoder keeps: :func:`_lz4_rules_kept`)."""
    if not src or (size and not _lz4_rules_kept(src, size)):
        return None
    try:
        out: bytes = lz4.block.decompress(src, uncompressed_size=size)
    except (lz4.block.LZ4BlockError, ValueError):
        return None
    return out if len(out) == size else None


def lz4_decode(src: Any, out: Any) -> bool:
    view = memoryview(out).cast("B")
    got = _lz4(_bytes(src), len(view))
    if got is None:
        return False
    view[:] = got
    return True


def decode_check(src: Any, starts: Any, ends: Any, codecs: Any, sizes: Any, out: Any,
                 digests: Any, key: bytes | None = None) -> tuple[int, int]:
    data = _bytes(src)
    n = len(starts)
    dig = np.asarray(digests)
    if (len(ends) != n or len(codecs) != n or len(sizes) != n or len(dig) != n
            or (n and dig.shape[1] != DIGEST_SIZE)):
        raise CbtValueError("decode_check: output array has the wrong shape")
    if any(int(x) < 0 for x in sizes):
        raise CbtValueError("decode_check: a block has a negative size")
    view = memoryview(out).cast("B")
    if sum(int(x) for x in sizes) > len(view):
        raise CbtValueError("decode_check: the blocks do not fit")
    pos = 0
    for i in range(n):
        a, b, size, codec = int(starts[i]), int(ends[i]), int(sizes[i]), int(codecs[i])
        if codec not in (STORED_RAW, STORED_LZ4):
            return i, DECODE_BAD_CODEC
        if not 0 <= a <= b <= len(data):
            return i, DECODE_BAD_PAYLOAD
        got = (data[a:b] if b - a == size else None) if codec == STORED_RAW else _lz4(
            data[a:b], size)
        if got is None:
            return i, DECODE_BAD_PAYLOAD
        view[pos:pos + size] = got
        pos += size
        if _hash(got, key) != bytes(dig[i]):
            return i, DECODE_BAD_DIGEST
    return -1, DECODE_OK
