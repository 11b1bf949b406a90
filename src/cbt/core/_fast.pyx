# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Native core of cbt: pure compute on buffers, no I/O, no policy.

1. ``zero_flags`` marks every all-zero block (memcmp against itself shifted by
   one byte, which glibc runs with SIMD; random data exits on the first word).
2. ``hash_blocks`` runs the zero pass, gathers the non-zero blocks' pointers and
   hands them all to cbt's own many-input BLAKE3 (``blake3/``, C: one SIMD lane
   per 1024-byte chunk, 16/8/4 chunks of any blocks at once, then the parents
   level by level), all with the GIL released.  ``hash_each`` takes the pointers
   of a list of buffers under the GIL (holding the buffers) and hashes them the
   same way without it.  The kernel (AVX-512, AVX2, SSE4.1 or portable) is picked
   at import for this CPU, or by ``CBT_KERNEL``; ``kernel`` names it.
3. ``compare_digests`` / ``compare_buffers`` turn two digest arrays or two
   buffers into a changed-block bitmap (one uint8 per block, 0 or 1).
4. ``bitmap_runs`` merges set bits into (offset, length) byte runs.
5. ``decode_check`` is a restore's inner loop for blocks stored as they are or as
   lz4 blocks: each decoded (cbt's own LZ4 block decoder, ``lz4/``, C) or copied
   into one buffer, one after another, and every 16 of them hashed against their
   digests while in cache, all with the GIL released.  ``lz4_decode`` decodes one.

Kernels are ``cdef ... nogil`` and return a code; ``_check`` is the one place
that turns a code into an exception.
"""

from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcmp, memcpy, memset
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer

import os as _os

from cbt.core.errors import CbtValueError

cdef extern from "cbt_blake3.h":
    int CBT_B3_NKERNELS
    const char *cbt_b3_kernel_name(int kernel)
    int cbt_b3_kernel_supported(int kernel)
    int cbt_b3_best_kernel()
    int cbt_b3_use_kernel(int kernel)
    int cbt_b3_current_kernel()
    int cbt_b3_hash_many(const uint8_t **inputs, const size_t *lens, uint8_t **outs,
                         size_t n, const uint8_t *key) nogil

cdef extern from "cbt_lz4.h":
    int cbt_lz4_decode(const uint8_t *src, size_t n, uint8_t *dst, size_t cap) nogil

# Bumped whenever a signature or an output changes; cbt/__init__ refuses a
# compiled core whose API_VERSION differs from the one it was written for.
API_VERSION = 5

cdef enum:
    C_DIGEST_SIZE = 32
    C_FLAG_DATA = 0
    C_FLAG_ZERO = 1
    C_FLAG_HOLE = 2
    C_MIN_BLOCK = 4096
    C_MAX_BLOCK = 4194304

DIGEST_SIZE = C_DIGEST_SIZE
FLAG_DATA = C_FLAG_DATA
FLAG_ZERO = C_FLAG_ZERO
FLAG_HOLE = C_FLAG_HOLE
MIN_BLOCK = C_MIN_BLOCK
MAX_BLOCK = C_MAX_BLOCK

# -- the BLAKE3 kernel ---------------------------------------------------------

ALL_KERNELS = tuple(cbt_b3_kernel_name(i).decode() for i in range(CBT_B3_NKERNELS))
kernel = ""  # the running kernel's name, set below
cdef object _kernel_error = None  # a bad CBT_KERNEL: raised on first use


def kernels():
    """The BLAKE3 kernels this CPU can run, fastest last (``portable`` always)."""
    return [name for i, name in enumerate(ALL_KERNELS) if cbt_b3_kernel_supported(i)]


def use_kernel(str name):
    """Hash with the kernel ``name`` from now on (tests, benchmarks); ``CbtValueError``
    if it is unknown or this CPU cannot run it."""
    global kernel, _kernel_error
    if name not in ALL_KERNELS:
        raise CbtValueError(f"unknown BLAKE3 kernel {name!r}; this CPU supports: "
                            f"{', '.join(kernels())}")
    if cbt_b3_use_kernel(ALL_KERNELS.index(name)) != 0:
        raise CbtValueError(f"this CPU cannot run the BLAKE3 kernel {name!r}; it supports: "
                            f"{', '.join(kernels())}")
    kernel = name
    _kernel_error = None


def _select_kernel():
    """At import: $CBT_KERNEL if set, else the best this CPU runs.  A bad value is kept
    as an error raised by the first hash (``cbt`` prints it as one line)."""
    global kernel, _kernel_error
    want = _os.environ.get("CBT_KERNEL", "")
    if not want:
        use_kernel(ALL_KERNELS[cbt_b3_best_kernel()])
        return
    try:
        use_kernel(want)
    except CbtValueError as exc:
        kernel = "none"
        _kernel_error = f"CBT_KERNEL={want}: {exc}"


_select_kernel()


def kernel_error():
    """Why no kernel runs (a bad ``CBT_KERNEL``: the line the first hash raises), else None."""
    return _kernel_error


cdef inline void _ready() except *:
    if _kernel_error is not None:
        raise CbtValueError(_kernel_error)


cdef bytes _key_bytes(key):
    """The 32-byte key of keyed hashing (an encrypted vault's block ids), or None."""
    if key is None:
        return None
    k = bytes(memoryview(key))  # a bytes-like object: bytes(32) would be 32 zero bytes
    if len(k) != 32:
        raise CbtValueError(f"BLAKE3 key must be 32 bytes, not {len(k)}")
    return k

cdef enum:
    OK = 0
    E_BLOCK_SIZE = 1
    E_SHAPE = 2


cdef inline bint _is_zero(const uint8_t *p, Py_ssize_t n) noexcept nogil:
    # p[0] == 0 and p[i] == p[i+1] for all i  <=>  all bytes zero.
    if n == 0:
        return True
    if p[0] != 0:
        return False
    return memcmp(p, p + 1, n - 1) == 0


cdef inline Py_ssize_t _nblocks(Py_ssize_t length, Py_ssize_t block_size) noexcept nogil:
    return (length + block_size - 1) // block_size


cdef int _valid_block_size(Py_ssize_t block_size) noexcept nogil:
    if block_size < C_MIN_BLOCK or block_size > C_MAX_BLOCK:
        return E_BLOCK_SIZE
    if block_size & (block_size - 1):
        return E_BLOCK_SIZE
    return OK


cdef int _zero_kernel(const uint8_t *data, Py_ssize_t length, Py_ssize_t block_size,
                      uint8_t *flags, Py_ssize_t *zeros) noexcept nogil:
    cdef Py_ssize_t i, n = _nblocks(length, block_size), off, ln, count = 0
    for i in range(n):
        off = i * block_size
        ln = block_size if off + block_size <= length else length - off
        if _is_zero(data + off, ln):
            flags[i] = C_FLAG_ZERO
            count += 1
        else:
            flags[i] = C_FLAG_DATA
    zeros[0] = count
    return OK


cdef int _compare_digest_kernel(const uint8_t *a, const uint8_t *b, Py_ssize_t n,
                                uint8_t *out, Py_ssize_t *changed) noexcept nogil:
    cdef Py_ssize_t i, count = 0
    for i in range(n):
        if memcmp(a + i * C_DIGEST_SIZE, b + i * C_DIGEST_SIZE, C_DIGEST_SIZE) != 0:
            out[i] = 1
            count += 1
        else:
            out[i] = 0
    changed[0] = count
    return OK


cdef int _compare_buffer_kernel(const uint8_t *a, const uint8_t *b, Py_ssize_t length,
                                Py_ssize_t block_size, uint8_t *out,
                                Py_ssize_t *changed) noexcept nogil:
    cdef Py_ssize_t i, n = _nblocks(length, block_size), off, ln, count = 0
    for i in range(n):
        off = i * block_size
        ln = block_size if off + block_size <= length else length - off
        if memcmp(a + off, b + off, ln) != 0:
            out[i] = 1
            count += 1
        else:
            out[i] = 0
    changed[0] = count
    return OK


cdef Py_ssize_t _count_runs(const uint8_t *bits, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i, runs = 0
    cdef uint8_t prev = 0
    for i in range(n):
        if bits[i] and not prev:
            runs += 1
        prev = bits[i]
    return runs


cdef void _fill_runs(const uint8_t *bits, Py_ssize_t n, uint64_t block_size,
                     uint64_t total, uint64_t *out) noexcept nogil:
    cdef Py_ssize_t i = 0, k = 0, start
    cdef uint64_t lo, hi
    while i < n:
        if not bits[i]:
            i += 1
            continue
        start = i
        while i < n and bits[i]:
            i += 1
        lo = <uint64_t>start * block_size
        hi = <uint64_t>i * block_size
        if hi > total:
            hi = total
        out[2 * k] = lo
        out[2 * k + 1] = hi - lo
        k += 1


cdef object _check(int code, str what):
    if code == OK:
        return None
    if code == E_BLOCK_SIZE:
        raise CbtValueError(
            f"{what}: block size must be a power of two from 4K to 4M")
    raise CbtValueError(f"{what}: output array has the wrong shape")


def check_block_size(Py_ssize_t block_size):
    """Raise ``CbtValueError`` unless ``block_size`` is a power of two in [4 KiB, 4 MiB]."""
    _check(_valid_block_size(block_size), f"block size {block_size}")


def nblocks(Py_ssize_t length, Py_ssize_t block_size):
    """Number of blocks covering ``length`` bytes (the last may be short)."""
    return _nblocks(length, block_size)


def zero_flags(const uint8_t[::1] data, Py_ssize_t block_size, uint8_t[::1] flags):
    """Set ``flags[i]`` to FLAG_ZERO for all-zero blocks, FLAG_DATA otherwise.

    Returns the number of zero blocks.
    """
    cdef Py_ssize_t length = data.shape[0], zeros = 0
    cdef int code = _valid_block_size(block_size)
    _check(code, "zero_flags")
    if flags.shape[0] != _nblocks(length, block_size):
        _check(E_SHAPE, "zero_flags")
    if length == 0:
        return 0
    with nogil:
        _zero_kernel(&data[0], length, block_size, &flags[0], &zeros)
    return zeros


def hash_blocks(const uint8_t[::1] data, Py_ssize_t block_size,
                uint8_t[:, ::1] digests, uint8_t[::1] flags, key=None):
    """BLAKE3 every non-zero block of ``data`` into ``digests[i]``.

    ``digests`` is a caller-allocated ``(n, 32) uint8`` array and ``flags`` an
    ``(n,) uint8`` array, ``n = ceil(len(data) / block_size)``.  Zero blocks get
    FLAG_ZERO and 32 zero bytes; every other block FLAG_DATA and its digest,
    equal to ``blake3.blake3(block).digest()`` (with ``key``, 32 bytes:
    ``blake3.blake3(block, key=key).digest()``, an encrypted vault's block ids).
    Returns the number of hashed (DATA) blocks.
    """
    cdef Py_ssize_t length = data.shape[0], n, i, off, zeros = 0, hashed = 0
    cdef const uint8_t *base
    cdef const uint8_t *kp = NULL
    cdef const uint8_t **ins
    cdef size_t *lens
    cdef uint8_t **outs
    cdef int rc = 0
    _ready()
    _check(_valid_block_size(block_size), "hash_blocks")
    n = _nblocks(length, block_size)
    if digests.shape[0] != n or digests.shape[1] != C_DIGEST_SIZE or flags.shape[0] != n:
        _check(E_SHAPE, "hash_blocks")
    if n == 0:
        return 0
    kb = _key_bytes(key)
    if kb is not None:
        kp = <const uint8_t *><char *>kb
    base = &data[0]
    ins = <const uint8_t **>malloc(n * sizeof(uint8_t *))
    lens = <size_t *>malloc(n * sizeof(size_t))
    outs = <uint8_t **>malloc(n * sizeof(uint8_t *))
    try:
        if ins == NULL or lens == NULL or outs == NULL:
            raise MemoryError()
        with nogil:
            _zero_kernel(base, length, block_size, &flags[0], &zeros)
            for i in range(n):
                if flags[i] == C_FLAG_ZERO:
                    memset(&digests[i, 0], 0, C_DIGEST_SIZE)
                    continue
                off = i * block_size
                ins[hashed] = base + off
                lens[hashed] = block_size if off + block_size <= length else length - off
                outs[hashed] = &digests[i, 0]
                hashed += 1
            rc = cbt_b3_hash_many(ins, lens, outs, hashed, kp)
        if rc != 0:
            raise MemoryError()
    finally:
        free(ins)
        free(lens)
        free(outs)
    return hashed


def hash_each(list buffers, uint8_t[:, ::1] digests, key=None):
    """BLAKE3 of each buffer of a list (blocks scattered in memory) into ``digests[i]``.

    Used by restore, which checks blocks where they lie (in a mapped pack, or
    just decompressed) before writing them, without gathering them first.  The
    buffers (contiguous, any lengths) are held while they are hashed with the GIL
    released.  ``key`` as for :func:`hash_blocks`.
    """
    # A snapshot: the key's conversion or a buffer's export (Python >= 3.12: __buffer__)
    # may run code that changes the list while it is read.
    cdef tuple seq = tuple(buffers)
    cdef Py_ssize_t i, n = len(seq), got = 0
    cdef const uint8_t *kp = NULL
    cdef Py_buffer *views
    cdef const uint8_t **ins
    cdef size_t *lens
    cdef uint8_t **outs
    cdef int rc = 0
    _ready()
    if digests.shape[0] != n or (n and digests.shape[1] != C_DIGEST_SIZE):
        _check(E_SHAPE, "hash_each")
    if n == 0:
        return 0
    kb = _key_bytes(key)
    if kb is not None:
        kp = <const uint8_t *><char *>kb
    views = <Py_buffer *>calloc(n, sizeof(Py_buffer))
    ins = <const uint8_t **>malloc(n * sizeof(uint8_t *))
    lens = <size_t *>malloc(n * sizeof(size_t))
    outs = <uint8_t **>malloc(n * sizeof(uint8_t *))
    try:
        if views == NULL or ins == NULL or lens == NULL or outs == NULL:
            raise MemoryError()
        for i in range(n):
            PyObject_GetBuffer(seq[i], &views[i], PyBUF_SIMPLE)
            got += 1
            ins[i] = <const uint8_t *>views[i].buf
            lens[i] = <size_t>views[i].len
            outs[i] = &digests[i, 0]
        with nogil:
            rc = cbt_b3_hash_many(ins, lens, outs, n, kp)
        if rc != 0:
            raise MemoryError()
    finally:
        for i in range(got):
            PyBuffer_Release(&views[i])
        free(views)
        free(ins)
        free(lens)
        free(outs)
    return n


def compare_digests(const uint8_t[:, ::1] a, const uint8_t[:, ::1] b, uint8_t[::1] out):
    """``out[i] = 1`` where digest rows differ, else 0.  Returns the count of 1s."""
    cdef Py_ssize_t n = a.shape[0], changed = 0
    if b.shape[0] != n or out.shape[0] != n or (n and (a.shape[1] != C_DIGEST_SIZE
                                                        or b.shape[1] != C_DIGEST_SIZE)):
        _check(E_SHAPE, "compare_digests")
    if n == 0:
        return 0
    with nogil:
        _compare_digest_kernel(&a[0, 0], &b[0, 0], n, &out[0], &changed)
    return changed


def compare_buffers(const uint8_t[::1] a, const uint8_t[::1] b, Py_ssize_t block_size,
                    uint8_t[::1] out):
    """Compare two equally long buffers block by block into ``out`` (0 same, 1 changed).

    Returns the number of changed blocks.
    """
    cdef Py_ssize_t length = a.shape[0], changed = 0
    _check(_valid_block_size(block_size), "compare_buffers")
    if b.shape[0] != length:
        raise CbtValueError(
            f"compare_buffers: buffers differ in length ({length} and {b.shape[0]})")
    if out.shape[0] != _nblocks(length, block_size):
        _check(E_SHAPE, "compare_buffers")
    if length == 0:
        return 0
    with nogil:
        _compare_buffer_kernel(&a[0], &b[0], length, block_size, &out[0], &changed)
    return changed


def bitmap_runs(const uint8_t[::1] bitmap, Py_ssize_t block_size, uint64_t total_size):
    """Merged runs of set bits as an ``(k, 2) uint64`` array of (offset, length) bytes.

    The last run is clipped to ``total_size`` (a short tail block).
    """
    import numpy as np  # here, not at import: `cbt --help` should not pay for numpy

    cdef Py_ssize_t n = bitmap.shape[0], runs = 0
    _check(_valid_block_size(block_size), "bitmap_runs")
    if n:
        with nogil:
            runs = _count_runs(&bitmap[0], n)
    out = np.zeros((runs, 2), dtype=np.uint64)
    cdef uint64_t[:, ::1] view = out
    if runs:
        with nogil:
            _fill_runs(&bitmap[0], n, <uint64_t>block_size, total_size, &view[0, 0])
    return out


# -- restore's inner loop: decode, check ----------------------------------------

cdef enum:
    # the stored forms decode_check takes (cbt.format.pack's CODEC_NONE and CODEC_LZ4)
    C_STORED_RAW = 0
    C_STORED_LZ4 = 2
    # what decode_check says of the first block that fails
    C_DECODE_OK = 0
    C_DECODE_BAD_CODEC = 1  # stored in a form this loop does not decode
    C_DECODE_BAD_PAYLOAD = 2  # outside the source, a raw one of another size, or bad lz4
    C_DECODE_BAD_DIGEST = 3  # decoded, but its content does not match its digest
    C_GROUP = 16  # blocks decoded, then hashed at once (one per AVX-512 lane)

STORED_RAW = C_STORED_RAW
STORED_LZ4 = C_STORED_LZ4
DECODE_OK = C_DECODE_OK
DECODE_BAD_CODEC = C_DECODE_BAD_CODEC
DECODE_BAD_PAYLOAD = C_DECODE_BAD_PAYLOAD
DECODE_BAD_DIGEST = C_DECODE_BAD_DIGEST


def lz4_decode(const uint8_t[::1] src not None, uint8_t[::1] out not None):
    """Decode the lz4 block ``src`` into exactly ``out``: True, or False if it is
    malformed or does not decode to exactly ``len(out)`` bytes (``out`` is then garbage).
    Nothing outside ``src`` and ``out`` is ever read or written, whatever ``src`` holds."""
    cdef size_t n = src.shape[0], cap = out.shape[0]
    cdef const uint8_t *sp = &src[0] if n else NULL
    cdef uint8_t *op = &out[0] if cap else NULL
    cdef int rc
    if n == 0:
        return False
    with nogil:
        rc = cbt_lz4_decode(sp, n, op, cap)
    return rc == 0


cdef int _decode_one(const uint8_t *src, Py_ssize_t srclen, int64_t a, int64_t b,
                     uint8_t codec, uint8_t *dst, int64_t size) noexcept nogil:
    # (the codec first, as the reference does: an unknown codec is BAD_CODEC whatever its
    # bounds)
    if codec != C_STORED_RAW and codec != C_STORED_LZ4:
        return C_DECODE_BAD_CODEC
    if a < 0 or b < a or b > srclen:
        return C_DECODE_BAD_PAYLOAD
    if codec == C_STORED_RAW:
        if b - a != size:
            return C_DECODE_BAD_PAYLOAD
        memcpy(dst, src + a, <size_t>size)
        return C_DECODE_OK
    if cbt_lz4_decode(src + a, <size_t>(b - a), dst, <size_t>size) != 0:
        return C_DECODE_BAD_PAYLOAD
    return C_DECODE_OK


def decode_check(const uint8_t[::1] src not None, const int64_t[::1] starts not None,
                 const int64_t[::1] ends not None, const uint8_t[::1] codecs not None,
                 const int64_t[::1] sizes not None, uint8_t[::1] out not None,
                 const uint8_t[:, ::1] digests not None, key=None):
    """Decode blocks into ``out`` and check each against its digest: a restore's work.

    Block ``i`` is ``src[starts[i]:ends[i]]``, stored as it is (``codecs[i]`` =
    STORED_RAW: exactly ``sizes[i]`` bytes, copied) or as an lz4 block (STORED_LZ4:
    decoded, to exactly ``sizes[i]`` bytes); it goes into ``out`` right after block
    ``i - 1`` (at the sum of the sizes before it), and its BLAKE3 (keyed with ``key``)
    must be ``digests[i]``.  Every 16 blocks are decoded, then hashed while in cache,
    with the GIL released.  Returns ``(-1, DECODE_OK)``, or ``(i, why)`` for the first
    block that fails (DECODE_BAD_CODEC, DECODE_BAD_PAYLOAD or DECODE_BAD_DIGEST); the
    blocks before it are sound.  ``CbtValueError`` if the arrays disagree in length or
    ``out`` is shorter than the sizes' sum.
    """
    cdef Py_ssize_t n = starts.shape[0], srclen = src.shape[0], i, j, g, k
    cdef Py_ssize_t bad = -1
    cdef int why = C_DECODE_OK, rc = 0, code
    cdef int64_t pos = 0, total = 0
    cdef const uint8_t *sp
    cdef uint8_t *op
    cdef const uint8_t *kp = NULL
    cdef uint8_t empty = 0  # (src or out of no bytes: a pointer, never NULL + offset)
    cdef const uint8_t *ins[C_GROUP]
    cdef size_t lens[C_GROUP]
    cdef uint8_t *outs[C_GROUP]
    cdef uint8_t got[C_GROUP][C_DIGEST_SIZE]
    _ready()
    kb = _key_bytes(key)  # (checked even when there is no block)
    if (ends.shape[0] != n or codecs.shape[0] != n or sizes.shape[0] != n
            or digests.shape[0] != n or (n and digests.shape[1] != C_DIGEST_SIZE)):
        _check(E_SHAPE, "decode_check")
    for i in range(n):  # (each size against what is left: a sum could overflow)
        if sizes[i] < 0:
            raise CbtValueError(f"decode_check: block {i} has a negative size")
        if sizes[i] > out.shape[0] - total:
            raise CbtValueError(f"decode_check: block {i} does not fit in the "
                                f"{out.shape[0]} bytes given")
        total += sizes[i]
    if n == 0:
        return -1, C_DECODE_OK
    if kb is not None:
        kp = <const uint8_t *><char *>kb
    sp = &src[0] if srclen else &empty
    op = &out[0] if out.shape[0] else &empty
    for k in range(C_GROUP):
        outs[k] = got[k]
    with nogil:
        i = 0
        while i < n and bad < 0:
            g = C_GROUP if n - i > C_GROUP else n - i
            for j in range(g):
                code = _decode_one(sp, srclen, starts[i + j], ends[i + j], codecs[i + j],
                                   op + pos, sizes[i + j])
                if code != C_DECODE_OK:
                    bad, why, g = i + j, code, j  # (the blocks before it are still checked)
                    break
                ins[j] = op + pos
                lens[j] = <size_t>sizes[i + j]
                pos += sizes[i + j]
            if g:
                rc = cbt_b3_hash_many(ins, lens, outs, g, kp)
                if rc != 0:
                    break
                for j in range(g):
                    if memcmp(got[j], &digests[i + j, 0], C_DIGEST_SIZE) != 0:
                        bad, why = i + j, C_DECODE_BAD_DIGEST
                        break
            i += C_GROUP
    if rc != 0:
        raise MemoryError()
    return bad, why
