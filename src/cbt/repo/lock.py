"""The vault's writer lock: flock, so a dead holder never blocks anyone.

The lock file holds a line of JSON about the holder (pid, host, command,
since) so a refused writer can say who holds it.  Readers take no lock: they
see only committed points, whose records appear by rename.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator

from cbt.core.errors import CbtError


class VaultLockedError(CbtError, BlockingIOError):
    """Another writer holds the vault."""


def _holder(path: str) -> str:
    try:
        with open(path) as f:
            info = json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return "another process"
    return (f"pid {info.get('pid')} on {info.get('host')} "
            f"({info.get('command')}) since {info.get('since')}")


@contextlib.contextmanager
def writer_lock(vault_root: str, wait: float = 0.0) -> Iterator[None]:
    """Hold the writer lock; fail at once (or after ``wait`` seconds) if held."""
    with _flock(os.path.join(vault_root, "lock"), vault_root, wait,
               "retry later or pass --wait SECONDS"):
        yield


@contextlib.contextmanager
def gc_lock(vault_root: str, wait: float | None = 0.0) -> Iterator[None]:
    """Hold the gc lock (one gc at a time; a backup's commit waits for it: ``wait=None``)."""
    with _flock(os.path.join(vault_root, "gc.lock"), vault_root, wait, "retry later"):
        yield


def writer_since(vault_root: str) -> float | None:
    """When the running writer (a backup) started (epoch seconds), or None when none runs;
    0.0 when it runs but cannot say since when."""
    path = os.path.join(vault_root, "lock")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            try:
                info = json.loads(os.pread(fd, 4096, 0) or b"{}")
                return float(info.get("since_ts", 0.0))
            except (ValueError, TypeError):
                return 0.0
        return None
    finally:
        os.close(fd)


@contextlib.contextmanager
def _flock(path: str, vault_root: str, wait: float | None, hint: str) -> Iterator[None]:
    from cbt.core.timefmt import utc_now

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        if wait is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                        raise
                    if time.monotonic() >= deadline:
                        raise VaultLockedError(
                            errno.EAGAIN,
                            f"vault {vault_root} is locked by {_holder(path)}; "
                            f"{hint}") from None
                    time.sleep(0.1)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "command": " ".join(["cbt", *sys.argv[1:]])[:200], "since": utc_now(),
                "since_ts": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        _HELD.add(fd)
        yield
    finally:
        _HELD.discard(fd)
        # Unlock explicitly: a process forked meanwhile (a worker pool) shares the open
        # file, and closing our descriptor alone would leave the lock held through it.
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# Lock descriptors held by this process; a forked child closes its copies, so the
# lock never outlives the holder through a child.
_HELD: set[int] = set()


def _close_held_in_child() -> None:
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)
