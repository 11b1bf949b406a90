"""The compiled core's hashing entry points against hostile callers and memory layouts.

Inputs that end at an unreadable page (no SIMD load may read past an input), callers
whose arguments run Python code in the middle of a call, keys that are not bytes.
Truth comes from the ``blake3`` package; each test runs every kernel this CPU has.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap


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
