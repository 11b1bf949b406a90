"""Throughput of the Cython core (``cbt.core.native.fast``) on a 64 MiB buffer.

Run (from the repository root)::

    python -m pytest bench/bench_core.py --benchmark-only

pytest collects a file named explicitly on the command line whatever its name,
so no ``-o python_files=...`` is needed; ``testpaths = ["tests"]`` keeps these
cases out of a plain ``pytest`` run.  Add ``--benchmark-json FILE`` for
machine output (each case's ``extra_info`` carries ``GB/s``).

Cases, each at 4 KiB, 64 KiB and 1 MiB blocks over the same 64 MiB random
buffer (beyond L2 and most L3 caches, though not every server's L3; lscpu
tells), so memory bandwidth counts much as it does for a disk image read from
the page cache:

- ``hash_blocks``: BLAKE3 of every block (zero pass first), one thread, once
  per BLAKE3 kernel this CPU runs (``fast.kernels()``: portable, sse41, avx2,
  avx512), at 4K, 16K, 64K and 1M blocks.  Beside it, on the same buffer:
  ``blake3_package`` (``blake3.blake3(buf, max_threads=1)``, one hash of the
  whole buffer: the best the package does on one thread) and
  ``per_block_package`` (one ``blake3`` package call per block, the core's
  path before its own kernel; from Python here, so slightly slower than it was).
- ``compare_buffers``: two buffers, equal except for one byte at the end of
  1% of the blocks, so every byte is compared (the worst case).
- ``compare_digests``: two digest arrays of the same blocks (1% differ); the
  GB/s figure is the *disk* bytes those digests stand for, i.e. how fast two
  manifests of a disk are diffed.
- ``zero_flags`` on an all-zero buffer (every byte is read: the worst case)
  and on random data (each block exits on its first byte: the usual case).

GB/s is 1e9 bytes of input (for ``compare_buffers``: of one buffer) divided by
the median round time; ``conftest.py`` prints it after the timing table.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import blake3
import numpy as np
import pytest

from cbt.core.native import fast

BUFFER = 64 << 20
BLOCK_SIZES = [4 << 10, 64 << 10, 1 << 20]
IDS = ["4K", "64K", "1M"]
HASH_SIZES = [4 << 10, 16 << 10, 64 << 10, 1 << 20]
HASH_IDS = ["4K", "16K", "64K", "1M"]
CHANGED = 0.01


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    rng = np.random.default_rng(20240601)
    return np.frombuffer(rng.bytes(BUFFER), dtype=np.uint8)


@pytest.fixture(scope="module")
def zeros() -> np.ndarray:
    # Not np.zeros: calloc'd pages all map the kernel's one zero page, which
    # stays in L1 and would overstate the figure; fill() allocates real pages.
    buf = np.empty(BUFFER, dtype=np.uint8)
    buf.fill(0)
    return buf


def _changed_copy(data: np.ndarray, block_size: int) -> np.ndarray:
    """``data`` with the last byte of 1% of its blocks flipped (scattered)."""
    n = BUFFER // block_size
    rng = np.random.default_rng(block_size)
    picks = rng.choice(n, size=max(1, int(n * CHANGED)), replace=False)
    other = data.copy()
    ends = (picks + 1) * block_size - 1
    other[ends] ^= 0xFF
    return other


def _record(benchmark: Any, nbytes: int, what: str) -> None:
    """Store GB/s (from the median) in extra_info, where conftest finds it."""
    benchmark.extra_info["bytes"] = nbytes
    benchmark.extra_info["what"] = what
    stats = getattr(benchmark.stats, "stats", None)  # None with --benchmark-disable
    if stats is not None and stats.median > 0:
        benchmark.extra_info["GB/s"] = round(nbytes / stats.median / 1e9, 3)


@pytest.fixture(params=fast.kernels())
def kernel(request: pytest.FixtureRequest) -> Iterator[str]:
    before = fast.kernel
    fast.use_kernel(request.param)
    yield request.param
    fast.use_kernel(before)


@pytest.mark.parametrize("block_size", HASH_SIZES, ids=HASH_IDS)
def test_hash_blocks(benchmark: Any, data: np.ndarray, kernel: str, block_size: int) -> None:
    n = fast.nblocks(BUFFER, block_size)
    digests = np.empty((n, fast.DIGEST_SIZE), dtype=np.uint8)
    flags = np.empty(n, dtype=np.uint8)
    benchmark.group = "hash_blocks"
    hashed = benchmark(fast.hash_blocks, data, block_size, digests, flags)
    assert hashed == n
    _record(benchmark, BUFFER, f"BLAKE3 of every block, 1 thread, kernel {kernel}")


def test_blake3_package(benchmark: Any, data: np.ndarray) -> None:
    benchmark.group = "hash_blocks"
    benchmark(lambda: blake3.blake3(data.data, max_threads=1).digest())
    _record(benchmark, BUFFER, "blake3 package, the whole buffer as one input, 1 thread")


@pytest.mark.parametrize("block_size", HASH_SIZES, ids=HASH_IDS)
def test_per_block_package(benchmark: Any, data: np.ndarray, block_size: int) -> None:
    view = data.data
    digests = np.empty((fast.nblocks(BUFFER, block_size), fast.DIGEST_SIZE), dtype=np.uint8)

    def per_block() -> None:
        h = blake3.blake3()
        for i, off in enumerate(range(0, BUFFER, block_size)):
            h.update(view[off:off + block_size])
            digests[i] = np.frombuffer(h.digest(), dtype=np.uint8)
            h.reset()

    benchmark.group = "hash_blocks"
    benchmark(per_block)
    _record(benchmark, BUFFER, "one blake3 package call per block (the old path)")


@pytest.mark.parametrize("block_size", BLOCK_SIZES, ids=IDS)
def test_compare_buffers(benchmark: Any, data: np.ndarray, block_size: int) -> None:
    other = _changed_copy(data, block_size)
    n = fast.nblocks(BUFFER, block_size)
    out = np.empty(n, dtype=np.uint8)
    benchmark.group = "compare_buffers"
    changed = benchmark(fast.compare_buffers, data, other, block_size, out)
    assert changed == max(1, int(n * CHANGED))
    _record(benchmark, BUFFER, "memcmp of two buffers (GB/s of one buffer)")


@pytest.mark.parametrize("block_size", BLOCK_SIZES, ids=IDS)
def test_compare_digests(benchmark: Any, data: np.ndarray, block_size: int) -> None:
    n = fast.nblocks(BUFFER, block_size)
    a = np.empty((n, fast.DIGEST_SIZE), dtype=np.uint8)
    b = np.empty((n, fast.DIGEST_SIZE), dtype=np.uint8)
    flags = np.empty(n, dtype=np.uint8)
    fast.hash_blocks(data, block_size, a, flags)
    fast.hash_blocks(_changed_copy(data, block_size), block_size, b, flags)
    out = np.empty(n, dtype=np.uint8)
    benchmark.group = "compare_digests"
    changed = benchmark(fast.compare_digests, a, b, out)
    assert changed == max(1, int(n * CHANGED))
    _record(benchmark, BUFFER, f"{n} digest pairs (GB/s of disk they cover)")


@pytest.mark.parametrize("block_size", BLOCK_SIZES, ids=IDS)
@pytest.mark.parametrize("kind", ["zero", "random"])
def test_zero_flags(benchmark: Any, data: np.ndarray, zeros: np.ndarray, kind: str,
                    block_size: int) -> None:
    buf = zeros if kind == "zero" else data
    n = fast.nblocks(BUFFER, block_size)
    flags = np.empty(n, dtype=np.uint8)
    benchmark.group = "zero_flags"
    found = benchmark(fast.zero_flags, buf, block_size, flags)
    assert found == (n if kind == "zero" else 0)
    what = ("all-zero buffer: every byte read" if kind == "zero"
            else "random buffer: first byte of each block")
    _record(benchmark, BUFFER, what)
