"""Durable writes: the one way cbt makes a file exist.

1. Write to a temporary name in the target's directory (``.NAME.tmp-PID``).
2. fsync the file.
3. rename it over the target: the rename is the commit.
4. fsync the directory, so the rename itself survives a power cut.

Each fsync is a *durable step*.  With ``CBT_CRASH_AT=N`` in the environment the
run's whole process group is SIGKILLed at its N-th durable step, counted across
every process of the run through a small counter file, so tests can crash a run
at each step deterministically.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

_COUNTER_ENV = "CBT_CRASH_COUNTER"


def _crash_counter() -> str | None:
    """Path of this run's step counter, created by the first process that needs it."""
    if not os.environ.get("CBT_CRASH_AT"):
        return None
    path = os.environ.get(_COUNTER_ENV)
    if not path:
        fd, path = tempfile.mkstemp(prefix="cbt-crash-counter-")
        os.close(fd)
        os.environ[_COUNTER_ENV] = path  # inherited by every worker started later
        # the run that made it removes it when it ends (a killed run cannot: tests that
        # kill pass their own CBT_CRASH_COUNTER)
        atexit.register(_remove_counter, path, os.getpid())
    return path


def _remove_counter(path: str, owner: int) -> None:
    if os.getpid() == owner:  # not a forked worker exiting
        with contextlib.suppress(OSError):
            os.unlink(path)


def prepare_crash_counter() -> None:
    """Create the run's step counter before any worker starts (no-op without CBT_CRASH_AT)."""
    _crash_counter()


def durable_step() -> None:
    """Count one durable step; SIGKILL the process group when it is the chosen one."""
    path = _crash_counter()
    if path is None:
        return
    target = int(os.environ["CBT_CRASH_AT"])
    with open(path, "r+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        raw = f.read().strip()
        count = int(raw or b"0") + 1
        f.seek(0)
        f.write(str(count).encode())
        f.truncate()
        f.flush()
    if count == target:
        os.killpg(os.getpgrp(), signal.SIGKILL)


def fsync_file(fd: int) -> None:
    os.fsync(fd)
    durable_step()


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    durable_step()


def temp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp-{os.getpid()}")


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs (this one does; one of another user's counts): the
    owner of a leftover named by its pid, such as a ``.NAME.tmp-PID``, may still be at work."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike[str], mode: int = 0o666) -> Iterator[BinaryIO]:
    """Open a temporary file that becomes ``target`` only if the block completes.

    The file is created with ``mode`` (less the umask).  On any exception the
    temporary file is removed and ``target`` is untouched.
    """
    final = Path(target)
    tmp = temp_name(final)
    f = os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode), "wb")
    try:
        yield f
        f.flush()
        fsync_file(f.fileno())
        f.close()
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):  # closing flushes, and may fail again (ENOSPC)
            f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(final.parent)


def atomic_write(target: str | os.PathLike[str], writer: Callable[[BinaryIO], None],
                 mode: int = 0o666) -> None:
    """Durably create ``target`` (``mode`` less the umask) with what ``writer`` writes to the
    file it is given."""
    with atomic_file(target, mode) as f:
        writer(f)


def read_small_file(path: str | os.PathLike[str], limit: int, where: str,
                    follow: bool = True) -> bytes:
    """The bytes of a small file cbt reads whole (a hint file, a state record): a regular
    file of at most ``limit`` bytes, opened without blocking (a FIFO costs no hang) and,
    unless ``follow``, not through a symbolic link.  ``FileNotFoundError`` as is; anything
    else wrong is a :class:`CbtValueError` of one line starting with ``where``."""
    import errno
    import stat

    from cbt.core.errors import CbtValueError

    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CbtValueError(f"{where}: not a regular file")
            if st.st_size > limit:
                raise CbtValueError(f"{where}: larger than {limit} bytes")
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise
    except OSError as exc:
        why = ("a symbolic link" if not follow and exc.errno == errno.ELOOP
               else f"cannot read it ({exc.strerror or exc})")
        raise CbtValueError(f"{where}: {why}") from None
    if len(data) > limit:  # (grew since the fstat)
        raise CbtValueError(f"{where}: larger than {limit} bytes")
    return data
