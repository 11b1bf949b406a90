"""The vault's locks: many backups at once, some commands alone, one gc, one run per VM.

Every lock is a :meth:`Storage.lock <cbt.repo.storage.Storage.lock>` lock, so the
same rules hold on a directory (``flock``: a dead holder never blocks) and on S3
(an object with a lease its holder renews; see :mod:`cbt.repo.s3`).  Each names
its holder (pid, host, since; the command line only in a plain vault: it may name
VMs and host paths).

1. **Shared** (:func:`shared_lock`): a backup, a job, a daemon's run, ``cbt copy``
   into a vault.  Any number at once, from any process or host.
2. **Alone** (:func:`exclusive_lock`): prune, ``verify --repair``, key changes.
   They wait for (or refuse while) any shared or other lone holder runs, and
   shared holders wait for (or refuse while) one runs.
3. Both are built of one lock object per holder, ``locks/shared-<random>`` or
   ``locks/alone-<random>``: a holder makes its own, then lists the others (so of
   two that start at once, at least one sees the other: it backs off and tries
   again, with a random pause, while its ``--wait`` lasts).  A dead holder's
   object is removed by whoever meets it.
4. **One run per VM** (:func:`vm_lock`): ``locks/vm-<VM>`` (in an encrypted vault
   ``locks/vm-<tag>``, the keyed tag of the VM's name, like the vault's other
   names), taken before the shared lock: a second backup of a VM fails at once
   naming the holder, or waits.
5. **gc** (:func:`gc_lock`, ``gc.lock``): one gc at a time; a commit (the index
   segment and point record of a backup or copy) takes it too, so commits and
   gc's index rewrite never overlap, and commits never overlap each other.
   gc sweeps nothing newer than the earliest start of all live holders
   (:func:`writers_since`); a backup removes a killed run's leftovers only when
   they are older than that too.

Readers take no lock: they see only committed points.  A command that waits says
whom it waits for, once, on standard error.  :func:`check_held` fails when a lock
this process holds on a storage is no longer sure (an S3 lease not renewed in
time): a commit calls it last, so a holder that lost its lease commits nothing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import secrets
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from cbt.core.errors import CbtError, CbtIOError
from cbt.repo.storage import LockBusyError, LockHolder, Storage, StorageLock

if TYPE_CHECKING:
    from cbt.repo.vault import Vault

LOCKS = "locks"
SHARED = "shared"
ALONE = "alone"
GC_LOCK = "gc.lock"
WAIT_HINT = "retry later or pass --wait SECONDS"


class VaultLockedError(CbtError, BlockingIOError):
    """Another holder keeps the vault (or the VM)."""


def _deadline(wait: float | None) -> float | None:
    return None if wait is None else time.monotonic() + wait


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


@contextlib.contextmanager
def shared_lock(storage: Storage, wait: float | None = 0.0,
                reveal_command: bool = True) -> Iterator[None]:
    """Share the vault with other backups; fail at once (or after ``wait`` seconds) while
    a command that needs it alone runs.  ``reveal_command``: whether the holder record
    names this process's command line (pass ``not vault.encrypted``)."""
    with _vault_lock(storage, SHARED, wait, reveal_command):
        yield


@contextlib.contextmanager
def exclusive_lock(storage: Storage, wait: float | None = 0.0,
                   reveal_command: bool = True) -> Iterator[None]:
    """Have the vault alone (no backup, no other such command); fail at once (or after
    ``wait`` seconds) naming a holder."""
    with _vault_lock(storage, ALONE, wait, reveal_command):
        yield


@contextlib.contextmanager
def vm_lock(vault: Vault, vm: str, wait: float | None = 0.0) -> Iterator[None]:
    """One run of ``vm`` at a time in this vault: fail at once (or after ``wait`` seconds)
    naming the holder."""
    leaf = vault.vm_lock_name(vm)
    what = f"VM {vm} of vault {vault.root}"
    with _hold(vault.storage, f"{LOCKS}/vm-{leaf}", wait, not vault.encrypted, what):
        yield


@contextlib.contextmanager
def gc_lock(storage: Storage, wait: float | None = 0.0,
            reveal_command: bool = True) -> Iterator[None]:
    """Hold the gc lock (one gc at a time; a commit waits for it: ``wait=None``);
    ``reveal_command`` as for :func:`shared_lock`."""
    with _hold(storage, GC_LOCK, wait, reveal_command, f"vault {storage.root}",
               hint="retry later", say=wait is not None):
        yield


def writers_since(storage: Storage) -> float | None:
    """When the earliest live holder of the vault (shared or alone) started (epoch
    seconds), or None when none runs; 0.0 when one runs but cannot say since when."""
    earliest: float | None = None
    for _name, holder in _live(storage, own=None):
        since = 0.0 if holder.since_ts is None else holder.since_ts
        earliest = since if earliest is None else min(earliest, since)
    return earliest


# How far an object's time (its mtime; on S3 the server's Last-Modified, in whole
# seconds) may fall before the clock of the holder that wrote it: what is compared
# with a holder's start is first moved back by this much.
CLOCK_MARGIN_S3 = 60.0


def clock_margin(storage: Storage) -> float:
    """Seconds subtracted from a holder's start before objects' times are compared with
    it: 0 where the objects' times come from this host's clock (a directory)."""
    return 0.0 if storage.spec().kind in ("local", "memory") else CLOCK_MARGIN_S3


def objects_before(storage: Storage) -> float:
    """Objects last written before this time (epoch seconds) belong to no live holder of
    the vault: the earliest start of the live holders less the clock margin; now when
    none runs."""
    since = writers_since(storage)
    return time.time() if since is None else since - clock_margin(storage)


def vault_holders(storage: Storage) -> list[LockHolder]:
    """The live holders of the vault (shared or alone), earliest first."""
    return sorted((h for _n, h in _live(storage, own=None)),
                  key=lambda h: h.since_ts or 0.0)


def this_process(reveal_command: bool = True) -> LockHolder:
    """This process as a lock holder, since now; without its command line unless
    ``reveal_command``."""
    from cbt.core.timefmt import utc_now

    command = " ".join(["cbt", *sys.argv[1:]])[:200] if reveal_command else None
    return LockHolder(pid=os.getpid(), host=socket.gethostname(), command=command,
                      since=utc_now(), since_ts=time.time())


def check_held(storage: Storage) -> None:
    """Raise (CbtIOError ``ENOLCK``) when a lock this process holds on ``storage`` is no
    longer surely held (call right before a commit)."""
    spec = storage.spec()
    with _HELD_MUTEX:
        held = [lock for s, lock in _HELD if s == spec]
    for lock in held:
        lock.check()


def commit_point(vault: Vault, point_id: str, record: bytes) -> None:
    """Put a point's record, the commit; call under the gc lock (commits never overlap),
    so a record of that name committed meanwhile (by a copy) is never replaced; and only
    while this process surely holds its locks (:func:`check_held`)."""
    name = vault.point_name(point_id)
    if vault.storage.exists(name):
        raise CbtIOError(errno.EEXIST, f"point {point_id} was committed meanwhile by "
                         "another run; run again")
    check_held(vault.storage)
    vault.put_sealed("point", name, record)


# -- how -----------------------------------------------------------------------------------

_HELD: list[tuple[object, StorageLock]] = []  # (storage spec, lock) held by this process
_HELD_MUTEX = threading.Lock()


@contextlib.contextmanager
def _held(storage: Storage, lock: StorageLock) -> Iterator[None]:
    entry = (storage.spec(), lock)
    with _HELD_MUTEX:
        _HELD.append(entry)
    try:
        yield
    finally:
        with _HELD_MUTEX:
            _HELD.remove(entry)


def _kind(name: str) -> str | None:
    leaf = name.rpartition("/")[2]
    kind = leaf.partition("-")[0]
    return kind if kind in (SHARED, ALONE) and "-" in leaf else None


def _live(storage: Storage, own: str | None,
          kinds: tuple[str, ...] = (SHARED, ALONE)) -> Iterator[tuple[str, LockHolder]]:
    """The live vault holders of ``kinds`` but ``own``; a dead one's lock is removed."""
    for name in storage.list_locks(LOCKS):
        if name == own or _kind(name) not in kinds:
            continue
        lock = storage.lock(name, remove=True)
        holder = lock.holder()
        if holder is None:
            gone = False
            with contextlib.suppress(OSError):
                gone = lock.clear_dead()
            # not removed: renewed meanwhile (a holder thawed just in time) is alive
            holder = None if gone else lock.holder()
            if holder is None:
                continue
        yield name, holder


@contextlib.contextmanager
def _vault_lock(storage: Storage, kind: str, wait: float | None,
                reveal_command: bool) -> Iterator[None]:
    deadline = _deadline(wait)
    blocks = (SHARED, ALONE) if kind == ALONE else (ALONE,)
    said = False
    holder = this_process(reveal_command)
    while True:
        name = f"{LOCKS}/{kind}-{secrets.token_hex(8)}"
        mine = storage.lock(name, remove=True)
        mine.acquire(10.0)  # a new name: only another's look at it (a moment) can be in the way
        try:
            mine.record(holder)
            others = [h for _n, h in _live(storage, name, blocks)]
        except BaseException:
            mine.release()
            raise
        if not others:
            break
        mine.release()
        left = _left(deadline)
        what = "vault " + storage.root
        if left is not None and left <= 0:
            raise _locked(what, others[0], WAIT_HINT, len(others))
        if not said:
            _say_waiting(what, others[0], left, len(others))
            said = True
        time.sleep(min(0.1 + random.random() * 0.4, left if left is not None else 1.0))
    try:
        with _held(storage, mine):
            yield
    finally:
        mine.release()


@contextlib.contextmanager
def _hold(storage: Storage, name: str, wait: float | None, reveal_command: bool,
          what: str, hint: str = WAIT_HINT, say: bool = True) -> Iterator[None]:
    lock = storage.lock(name)
    try:
        lock.acquire(0)
    except LockBusyError as exc:
        if wait is not None and wait <= 0:
            raise _locked(what, exc.holder, hint) from None
        if say:
            _say_waiting(what, exc.holder, wait)
        try:
            lock.acquire(wait)
        except LockBusyError as again:
            raise _locked(what, again.holder, hint) from None
    try:
        lock.record(this_process(reveal_command))  # since = when it was taken, not asked for
        with _held(storage, lock):
            yield
    finally:
        lock.release()


def _locked(what: str, holder: LockHolder, hint: str, count: int = 1) -> VaultLockedError:
    more = f" (and {count - 1} more)" if count > 1 else ""
    return VaultLockedError(errno.EAGAIN, f"{what} is locked by {holder.describe()}{more}; "
                            f"{hint}")


def _say_waiting(what: str, holder: LockHolder, wait: float | None, count: int = 1) -> None:
    more = f" (and {count - 1} more)" if count > 1 else ""
    limit = "" if wait is None else f" (up to {wait:.0f} s)"
    print(f"cbt: waiting{limit} for {what}: locked by {holder.describe()}{more}",
          file=sys.stderr, flush=True)
