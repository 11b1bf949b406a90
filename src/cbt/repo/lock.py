"""The vault's locks: the writer lock (``lock``) and the gc lock (``gc.lock``).

1. A writer (backup, prune, repair, a job) takes the writer lock, at once or
   within ``wait`` seconds; a refused writer says who holds it.
2. Having it, it records itself as the holder (pid, host, command, since) for
   others to read: gc sweeps nothing newer than the running writer's start
   (:func:`writer_since`).  In an encrypted vault the holder record holds
   nothing but pid, host and time (``reveal_command=False``): a command line
   may name VMs and host paths.
3. gc takes the gc lock for its whole run; a backup takes it only to commit.

Both are :meth:`Storage.lock <cbt.repo.storage.Storage.lock>` locks (local:
``flock``, so a dead holder never blocks anyone).  Readers take no lock: they
see only committed points, whose records appear by rename.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import sys
import time
from collections.abc import Iterator

from cbt.core.errors import CbtError
from cbt.repo.storage import LockBusyError, LockHolder, Storage

WRITER_LOCK = "lock"
GC_LOCK = "gc.lock"


class VaultLockedError(CbtError, BlockingIOError):
    """Another writer holds the vault."""


@contextlib.contextmanager
def writer_lock(storage: Storage, wait: float = 0.0,
                reveal_command: bool = True) -> Iterator[None]:
    """Hold the writer lock; fail at once (or after ``wait`` seconds) if held.

    ``reveal_command``: whether the holder record names this process's command
    line (pass ``not vault.encrypted``)."""
    with _hold(storage, WRITER_LOCK, wait, "retry later or pass --wait SECONDS",
               reveal_command):
        yield


@contextlib.contextmanager
def gc_lock(storage: Storage, wait: float | None = 0.0,
            reveal_command: bool = True) -> Iterator[None]:
    """Hold the gc lock (one gc at a time; a backup's commit waits for it: ``wait=None``);
    ``reveal_command`` as for :func:`writer_lock`."""
    with _hold(storage, GC_LOCK, wait, "retry later", reveal_command):
        yield


def writer_since(storage: Storage) -> float | None:
    """When the running writer (a backup) started (epoch seconds), or None when none runs;
    0.0 when it runs but cannot say since when."""
    holder = storage.lock(WRITER_LOCK).holder()
    if holder is None:
        return None
    return 0.0 if holder.since_ts is None else holder.since_ts


def this_process(reveal_command: bool = True) -> LockHolder:
    """This process as a lock holder, since now; without its command line unless
    ``reveal_command``."""
    from cbt.core.timefmt import utc_now

    command = " ".join(["cbt", *sys.argv[1:]])[:200] if reveal_command else None
    return LockHolder(pid=os.getpid(), host=socket.gethostname(), command=command,
                      since=utc_now(), since_ts=time.time())


@contextlib.contextmanager
def _hold(storage: Storage, name: str, wait: float | None, hint: str,
          reveal_command: bool) -> Iterator[None]:
    lock = storage.lock(name)
    try:
        lock.acquire(wait)
    except LockBusyError as exc:
        raise VaultLockedError(errno.EAGAIN, f"vault {storage.root} is locked by "
                               f"{exc.holder.describe()}; {hint}") from None
    try:
        lock.record(this_process(reveal_command))  # since = when the lock was taken, not asked for
        yield
    finally:
        lock.release()
