"""The compiled core's hashing entry points against hostile callers and memory layouts.

Inputs that end at an unreadable page (no SIMD load may read past an input), callers
whose arguments run Python code in the middle of a call, keys that are not bytes.
Truth comes from the ``blake3`` package; each test runs every kernel this CPU has.
"""

from __future__ import annotations

import ctypes
import mmap
import platform
import shutil
import subprocess
import sys
import textwrap

import blake3
import numpy as np
import pytest
from helpers.system import need

from cbt.core.native import fast

PAGE = mmap.PAGESIZE
KEY = bytes(range(32))


def oracle(data: bytes, key: bytes | None) -> bytes:
    return (blake3.blake3(data) if key is None else blake3.blake3(data, key=key)).digest()


def test_list_changed_by_the_call_itself_is_no_crash() -> None:
    """The key's conversion (or, from Python 3.12, a buffer's ``__buffer__``) runs Python
    code inside hash_each after it counted the list: emptying the list there must give a
    clean error or the digests of the list as passed, never a read past the list's end.
    Run in a child, whose crash is a failure here rather than the end of the test run."""
    code = textwrap.dedent("""
        import blake3, numpy as np
        from cbt.core.native import fast
        bufs = [bytes([i % 251]) * (i * 37) for i in range(2000)]
        want = [blake3.blake3(b, key=bytes(32)).digest() for b in bufs]
        keep = list(bufs)

        class Key:
            def __bytes__(self):
                bufs.clear()
                return bytes(32)

        class Clears:
            def __buffer__(self, flags):
                bufs.clear()
                return memoryview(b"x")

        d = np.zeros((2000, 32), np.uint8)
        try:
            fast.hash_each(bufs, d, key=Key())
            assert [r.tobytes() for r in d] == want
            print("hashed")
        except (TypeError, ValueError) as exc:
            print("refused", exc)
        bufs[:] = keep + [Clears()]
        d = np.zeros((2001, 32), np.uint8)
        try:
            fast.hash_each(bufs, d)
            print("hashed")
        except (TypeError, ValueError, BufferError) as exc:
            print("refused", exc)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=False, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert len(r.stdout.splitlines()) == 2, r.stdout


class _Guarded:
    """``pages`` readable pages of random bytes followed by one that cannot be read."""

    def __init__(self, pages: int) -> None:
        self.size = pages * PAGE
        self.map = mmap.mmap(-1, self.size + PAGE)
        self.map[:self.size] = np.random.default_rng(pages).integers(
            0, 256, self.size, dtype=np.uint8).tobytes()
        holder = (ctypes.c_char * (self.size + PAGE)).from_buffer(self.map)
        addr = ctypes.addressof(holder)
        del holder
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        assert libc.mprotect(addr + self.size, PAGE, 0) == 0, ctypes.get_errno()

    def tail(self, n: int) -> memoryview:
        """The last ``n`` readable bytes: the input ends where the unreadable page starts."""
        return memoryview(self.map)[self.size - n:self.size]


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "keyed"])
def test_no_read_past_an_input_that_ends_at_an_unreadable_page(key: bytes | None) -> None:
    """Every length around blocks and chunks, each input's last byte just before a
    PROT_NONE page: a load past the end would fault (SIGSEGV) instead of passing."""
    g = _Guarded(16)
    lengths = sorted(set(range(0, 2200)) | {c * 1024 + d for c in range(2, 65)
                                            for d in (-65, -64, -1, 0, 1, 63, 64)})
    lengths = [n for n in lengths if n <= g.size]
    before = fast.kernel
    try:
        for name in fast.kernels():
            fast.use_kernel(name)
            views = [g.tail(n) for n in lengths]
            digests = np.zeros((len(views), 32), dtype=np.uint8)
            fast.hash_each(views, digests, key)
            for v, row in zip(views, digests, strict=True):
                assert row.tobytes() == oracle(bytes(v), key), (name, len(v))
            for bs in (4096, 16384, 65536):
                for extra in (0, 1, 64, 1023, 1025, bs - 1):
                    data = np.frombuffer(g.tail(bs + extra), dtype=np.uint8)
                    n = -(-len(data) // bs)
                    out = np.zeros((n, 32), dtype=np.uint8)
                    fast.hash_blocks(data, bs, out, np.zeros(n, dtype=np.uint8), key)
                    for i in range(n):
                        assert out[i].tobytes() == oracle(
                            data[i * bs:(i + 1) * bs].tobytes(), key), (name, bs, extra, i)
            del views, data
    finally:
        fast.use_kernel(before)


@pytest.mark.parametrize("key", [32, [7] * 32, "k" * 32], ids=["int", "list", "str"])
def test_a_key_that_is_not_bytes_is_refused(key: object) -> None:
    """``bytes(32)`` is 32 zero bytes: an int key must not hash under an all-zero key
    (nor a list of ints under those bytes); the blake3 package refuses both as well."""
    digests = np.zeros((1, 32), dtype=np.uint8)
    with pytest.raises(TypeError):
        fast.hash_each([b"data"], digests, key=key)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        fast.hash_blocks(b"d" * 4096, 4096, digests, np.zeros(1, dtype=np.uint8),
                         key)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        blake3.blake3(b"data", key=key)  # type: ignore[arg-type]


def test_a_key_may_be_any_bytes_like_object() -> None:
    digests = np.zeros((1, 32), dtype=np.uint8)
    for key in (bytearray(KEY), memoryview(KEY), np.frombuffer(KEY, dtype=np.uint8)):
        fast.hash_each([b"data"], digests, key=key)  # type: ignore[arg-type]
        assert digests[0].tobytes() == oracle(b"data", KEY)


_LOW_CPU_CHILD = textwrap.dedent("""
    import os, sys, blake3
    import cbt.core._fast as fast  # no numpy: it needs more than the oldest CPUs have
    print(",".join(fast.kernels()), fast.kernel)
    bufs = [(bytes(range(251)) * 300)[:n] for n in (0, 1, 64, 1024, 1025, 5000, 70001)]
    for name in fast.kernels():
        fast.use_kernel(name)
        for key in (None, bytes(range(32))):
            out = bytearray(32 * len(bufs))
            fast.hash_each(bufs, memoryview(out).cast("B", (len(bufs), 32)), key)
            want = b"".join((blake3.blake3(b) if key is None else
                             blake3.blake3(b, key=key)).digest() for b in bufs)
            assert bytes(out) == want, name
    os.environ["CBT_KERNEL"] = sys.argv[1]
    fast._select_kernel()
    try:
        fast.hash_each([b"x"], memoryview(bytearray(32)).cast("B", (1, 32)))
        print("ran", fast.kernel)
    except ValueError as exc:
        print(exc)
""")


@pytest.mark.parametrize(("cpu", "runs"), [("qemu64", "portable"), ("Nehalem", "portable,sse41"),
                                           ("Haswell", "portable,sse41,avx2")])
def test_older_cpus_run_their_best_kernel_and_never_a_newer_one(cpu: str, runs: str) -> None:
    """Under qemu-user's emulation of an older CPU: the core imports and hashes exactly
    with every kernel that CPU has (no SIGILL: no instruction of a newer set outside the
    kernels chosen at run time), picks the best one, and CBT_KERNEL=avx512 is refused in
    one line naming what the CPU runs."""
    qemu = shutil.which("qemu-x86_64")
    need(qemu is not None and platform.machine() == "x86_64",
         "needs qemu-x86_64 (apt-get install qemu-user; ci/system-deps.sh does)")
    assert qemu is not None
    r = subprocess.run([qemu, "-cpu", cpu, sys.executable, "-c", _LOW_CPU_CHILD, "avx512"],
                       capture_output=True, text=True, check=False, timeout=300)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    lines = r.stdout.splitlines()
    assert lines[0] == f"{runs} {runs.split(',')[-1]}"
    assert lines[1] == (f"CBT_KERNEL=avx512: this CPU cannot run the BLAKE3 kernel 'avx512'; "
                        f"it supports: {runs.replace(',', ', ')}")
