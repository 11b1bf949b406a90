"""cbt's own BLAKE3 (src/cbt/core/blake3/), every kernel against the ``blake3`` package.

Each test runs once per kernel (portable, sse41, avx2, avx512) in one process, switched
with ``fast.use_kernel``.  A kernel this CPU cannot run is skipped through
``helpers.system.need`` - and fails in CI (CI=true), whose machine runs all four.  The
oracle is the ``blake3`` package (``max_threads=1``), never our code.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator

import blake3
import numpy as np
import pytest
from helpers.system import need
from hypothesis import given, settings
from hypothesis import strategies as st

from cbt.core.errors import CbtValueError
from cbt.core.native import fast

KIB = 1024
MIB = 1024 * KIB
KEY = bytes(range(100, 132))
# The official test vectors' input lengths (their input: byte i is i % 251).
VECTOR_LENGTHS = [0, 1, 1023, 1024, 1025, 2048, 2049, 3072, 3073, 4096, 4097, 5120, 5121,
                  6144, 6145, 7168, 7169, 8192, 8193, 16384, 31744, 102400]
_RNG = np.random.default_rng(17)
_DATA = _RNG.integers(0, 256, size=9 * MIB, dtype=np.uint8).tobytes()


@pytest.fixture(params=["portable", "sse41", "avx2", "avx512"])
def kernel(request: pytest.FixtureRequest) -> Iterator[str]:
    name: str = request.param
    need(name in fast.kernels(), f"this CPU cannot run the {name} BLAKE3 kernel "
                                 f"(it runs {', '.join(fast.kernels())})")
    before = fast.kernel
    fast.use_kernel(name)
    try:
        yield name
    finally:
        fast.use_kernel(before)


def oracle(data: bytes, key: bytes | None) -> bytes:
    h = blake3.blake3(data, max_threads=1) if key is None else \
        blake3.blake3(data, key=key, max_threads=1)
    return h.digest()


def each(buffers: list[bytes] | list[memoryview], key: bytes | None) -> list[bytes]:
    digests = np.full((len(buffers), 32), 0xAA, dtype=np.uint8)
    assert fast.hash_each(list(buffers), digests, key=key) == len(buffers)
    return [row.tobytes() for row in digests]


def pattern(n: int) -> bytes:
    return bytes(i % 251 for i in range(n))


def check_each(buffers: list[bytes], key: bytes | None) -> None:
    got = each(buffers, key)
    for b, d in zip(buffers, got, strict=True):
        assert d == oracle(b, key), f"length {len(b)}, keyed {key is not None}"


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "keyed"])
def test_official_vector_lengths(kernel: str, key: bytes | None) -> None:
    inputs = [pattern(n) for n in VECTOR_LENGTHS]
    check_each(inputs, key)  # all in one call: lanes hold chunks of different inputs
    for b in inputs:
        check_each([b], key)  # and each alone


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "keyed"])
def test_every_length_to_past_five_chunks(kernel: str, key: bytes | None) -> None:
    check_each([_DATA[n:2 * n] for n in range(5300)], key)


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "keyed"])
def test_around_chunk_and_block_boundaries(kernel: str, key: bytes | None) -> None:
    """1..70 chunks (perfect trees and not), +-1 byte around each chunk and 64-byte block."""
    lengths = sorted({c * KIB + d for c in range(1, 71) for d in (-65, -64, -63, -1, 0, 1, 63,
                                                                   64, 65)})
    check_each([_DATA[:n] for n in lengths], key)


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "keyed"])
@pytest.mark.parametrize("bs", [1 << s for s in range(12, 23)], ids=lambda b: f"{b // KIB}K")
def test_hash_blocks_every_block_size(kernel: str, key: bytes | None, bs: int) -> None:
    """Data blocks with zero blocks among them and a short tail."""
    nblocks = max(2, min(40, 2 * MIB // bs))
    data = bytearray(_DATA[:nblocks * bs + bs // 3 + 5])
    for i in range(0, nblocks, 3):
        data[i * bs:(i + 1) * bs] = bytes(bs)
    n = -(-len(data) // bs)
    digests = np.full((n, 32), 0xAA, dtype=np.uint8)
    flags = np.full(n, 0xAA, dtype=np.uint8)
    hashed = fast.hash_blocks(data, bs, digests, flags, key)
    assert hashed == sum(1 for f in flags if f == fast.FLAG_DATA)
    for i in range(n):
        block = bytes(data[i * bs:(i + 1) * bs])
        if i % 3 == 0 and i < nblocks:
            assert flags[i] == fast.FLAG_ZERO and digests[i].tobytes() == bytes(32)
        else:
            assert flags[i] == fast.FLAG_DATA
            assert digests[i].tobytes() == oracle(block, key), f"block {i}"


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "keyed"])
def test_many_inputs_more_than_one_batch(kernel: str, key: bytes | None) -> None:
    """Thousands of 4 KiB blocks, and inputs larger than a batch among small ones."""
    data = _DATA[:2201 * 4 * KIB + 100]
    digests = np.zeros((2202, 32), dtype=np.uint8)
    flags = np.zeros(2202, dtype=np.uint8)
    assert fast.hash_blocks(data, 4 * KIB, digests, flags, key) == 2202
    for i in (0, 1, 15, 16, 17, 255, 256, 257, 1023, 1024, 2047, 2048, 2200, 2201):
        assert digests[i].tobytes() == oracle(data[i * 4 * KIB:(i + 1) * 4 * KIB], key)
    check_each([_DATA[:100], _DATA[5:5 + 3 * MIB + 7], _DATA[:4 * KIB], _DATA[1:2 * MIB + 1],
                _DATA[:1], _DATA[7:7 + 5 * 1024 * KIB]], key)


@pytest.mark.parametrize("offset", range(1, 8))
def test_unaligned_buffers(kernel: str, offset: int) -> None:
    raw = bytearray(_DATA[:4 * 64 * KIB + 16])
    views = [memoryview(raw)[offset + k * 64 * KIB:offset + (k + 1) * 64 * KIB - k]
             for k in range(4)]
    got = each(views, None)
    assert got == [oracle(bytes(v), None) for v in views]
    arr = np.frombuffer(raw, dtype=np.uint8)[offset:offset + 3 * 16 * KIB + 9]
    digests = np.zeros((4, 32), dtype=np.uint8)
    flags = np.zeros(4, dtype=np.uint8)
    fast.hash_blocks(arr, 16 * KIB, digests, flags, KEY)
    for i in range(4):
        assert digests[i].tobytes() == oracle(arr[i * 16 * KIB:(i + 1) * 16 * KIB].tobytes(), KEY)


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 20 * KIB), min_size=1, max_size=40),
       seed=st.integers(0, 2**32 - 1), keyed=st.booleans())
def test_random_inputs_every_kernel(lengths: list[int], seed: int, keyed: bool) -> None:
    rng = np.random.default_rng(seed)
    inputs = [rng.integers(0, 256, size=n, dtype=np.uint8).tobytes() for n in lengths]
    key = rng.integers(0, 256, size=32, dtype=np.uint8).tobytes() if keyed else None
    before = fast.kernel
    try:
        for name in fast.kernels():
            fast.use_kernel(name)
            assert each(inputs, key) == [oracle(b, key) for b in inputs], name
    finally:
        fast.use_kernel(before)


def test_kernels_listed_and_selectable() -> None:
    names = fast.kernels()
    assert names[0] == "portable" and set(names) <= {"portable", "sse41", "avx2", "avx512"}
    assert fast.kernel == names[-1] or "CBT_KERNEL" in os.environ
    with pytest.raises(CbtValueError, match=r"unknown BLAKE3 kernel 'neon'.*portable"):
        fast.use_kernel("neon")


def test_key_must_be_32_bytes() -> None:
    digests = np.zeros((1, 32), dtype=np.uint8)
    with pytest.raises(CbtValueError, match="32 bytes"):
        fast.hash_each([b"x"], digests, key=b"short")


@pytest.mark.parametrize("value", ["bogus", "AVX2 "])
def test_bad_cbt_kernel_is_one_clear_line(tmp_path: object, value: str) -> None:
    """A bad CBT_KERNEL: the first hash fails with one line naming it, no traceback."""
    img = os.path.join(str(tmp_path), "disk.img")
    with open(img, "wb") as f:
        f.write(_DATA[:64 * KIB])
    env = dict(os.environ, CBT_KERNEL=value)
    r = subprocess.run([sys.executable, "-c", "import sys; from cbt.cli.main import main; "
                        "sys.exit(main(['scan', sys.argv[1], '-o', sys.argv[2]]))",
                        img, img + ".arrow"], env=env, capture_output=True, text=True,
                       check=False, timeout=120)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert f"CBT_KERNEL={value}" in lines[0] and "portable" in lines[0]
    assert not os.path.exists(img + ".arrow")


def test_gil_released_while_hashing() -> None:
    """A Python thread counts while hash_blocks (256 MiB) and hash_each run.

    The switch interval is set far beyond the test, so the main thread only lets the
    counter run when it gives up the GIL itself: with the GIL held over the hash, the
    count would not move at all between the two reads around the call.
    """
    data = np.frombuffer(_DATA, dtype=np.uint8)
    big = np.tile(data[:8 * MIB], 32)  # 256 MiB
    n = len(big) // (64 * KIB)
    digests = np.zeros((n, 32), dtype=np.uint8)
    flags = np.zeros(n, dtype=np.uint8)
    count = 0
    done = threading.Event()
    started = threading.Event()

    def counter() -> None:
        nonlocal count
        started.set()
        while not done.is_set():
            count += 1
            if count % 1000 == 0:
                os.sched_yield()
                threading.Event().wait(0)  # gives the GIL back to a waiting main thread

    old = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    t = threading.Thread(target=counter)
    try:
        t.start()
        started.wait()
        c0 = count
        fast.hash_blocks(big, 64 * KIB, digests, flags)
        c1 = count
        fast.hash_each([big[i * 16 * MIB:(i + 1) * 16 * MIB] for i in range(16)],
                       np.zeros((16, 32), dtype=np.uint8))
        c2 = count
    finally:
        done.set()
        sys.setswitchinterval(old)
        t.join()
    assert c1 > c0 and c2 > c1
    assert digests[3].tobytes() == oracle(big[3 * 64 * KIB:4 * 64 * KIB].tobytes(), None)
