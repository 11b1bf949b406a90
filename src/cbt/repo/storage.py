"""Storage behind a vault: one interface, a local-directory and an in-memory implementation.

Every read, write, rename, list, delete, stat, lock and durable commit of a
vault goes through these calls, so an object store (``pyarrow.fs`` S3) can
stand behind a vault later without touching the rest.  Names are
``/``-separated, relative to the storage's root; nothing outside this module
builds a path inside a vault.

1. ``put(name, data)`` durably creates or replaces an object, atomically
   (local: temporary name, fsync, rename, fsync of the directory).
2. ``get``, ``read_range``, ``map`` read one; ``stat``/``size``/``exists``
   describe one; ``list(prefix)`` names the objects under a prefix, sorted.
3. ``rename(src, dst)`` moves an object durably (replacing ``dst``): locally
   atomically, keeping its modification time; on S3 a copy then a delete
   (:attr:`Storage.rename_keeps_mtime` says which; the vault's commit protocol
   without rename is in :mod:`cbt.repo.trash`); ``touch`` sets the time to now.
4. ``delete`` removes an object (a missing one is no error); ``sync(prefix)``
   makes the deletes under ``prefix`` durable, one step for many deletes.
5. ``lock(name)`` is an exclusive lock of that name (local: ``flock`` on the
   file ``name``, so a dead holder never blocks anyone; S3: an object with a
   lease), with the holder's :class:`LockHolder` (pid, host, command, since)
   readable by others; ``list_locks(prefix)`` names the locks under a prefix (the
   vault's many-writer locks, :mod:`cbt.repo.lock`, are built of these).

Reading a missing object raises :class:`~cbt.core.errors.CbtIOError` with
``ENOENT``; an object that is there but cannot be read (a read error of the
disk under the vault) raises it with that error (``EIO``), saying
"unreadable", the byte and the error: never "missing".  A mapping is faulted
in before it is handed out, so a page that cannot be read is that error too,
not a SIGBUS when touched.  A worker process or thread never receives a Storage object: it
receives the storage's :meth:`Storage.spec` (small and picklable) and reopens
it with :func:`cbt.repo.stores.open_storage`.  A :class:`MemoryStorage` is found again only
within its own process (threads, not forked or spawned processes).
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import json
import math
import mmap
import os
import re
import stat
import threading
import time
import uuid
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from cbt.core.blockio import first_unreadable, populate
from cbt.core.durable import durable_step, fsync_file
from cbt.core.errors import CbtError, CbtIOError, CbtValueError, untrusted_json

Buffers = bytes | bytearray | memoryview | list[bytes | bytearray]


class StorageSpec(NamedTuple):
    """A picklable description of a storage: its kind and where it is."""

    kind: str  # "local", "memory" or "s3"
    location: str  # a directory, the key of a MemoryStorage in this process, s3://B/P


class ObjectStat(NamedTuple):
    size: int
    mtime: float  # epoch seconds of the last write, touch or (for local) trashing


@dataclass(frozen=True)
class LockHolder:
    """Who holds a lock; every field None when the holder wrote nothing readable."""

    pid: int | None = None
    host: str | None = None
    command: str | None = None
    since: str | None = None  # RFC 3339
    since_ts: float | None = None  # epoch seconds

    def to_json(self) -> bytes:
        return json.dumps({"pid": self.pid, "host": self.host, "command": self.command,
                           "since": self.since, "since_ts": self.since_ts}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> LockHolder:
        """The holder a lock says (written by anyone who can write the vault: checked).
        A field of the wrong type is None; text loses its control characters; a start
        that is no number (NaN) is None, one in the future is now (nobody started later:
        a later start would let gc sweep the blocks of backups starting meanwhile)."""
        try:
            info = untrusted_json(raw or b"{}")
        except ValueError:
            return cls()
        if not isinstance(info, dict):
            return cls()
        try:
            since_ts: float | None = float(info["since_ts"]) if "since_ts" in info else None
        except (ValueError, TypeError, OverflowError):
            since_ts = None
        if since_ts is not None:
            since_ts = None if math.isnan(since_ts) else min(since_ts, time.time())
        pid = info.get("pid")
        return cls(pid=pid if type(pid) is int and 0 < pid < 1 << 31 else None,
                   host=_text(info.get("host")), command=_text(info.get("command")),
                   since=_text(info.get("since")), since_ts=since_ts)

    def describe(self) -> str:
        if self == LockHolder():
            return "another process"
        command = f" ({self.command})" if self.command is not None else ""
        return f"pid {self.pid} on {self.host}{command} since {self.since}"


def _text(value: object, limit: int = 256) -> str | None:
    """``value`` when it is a string, printable (no control character: a message stays one
    line and sends the terminal nothing) and at most ``limit`` characters; else None."""
    if not isinstance(value, str):
        return None
    return "".join(c if c.isprintable() else "?" for c in value[:limit])


class LockBusyError(CbtError, BlockingIOError):
    """Another holder keeps the lock; ``holder`` says who, where it can be read."""

    def __init__(self, name: str, holder: LockHolder) -> None:
        super().__init__(errno.EAGAIN, f"lock {name} is held by {holder.describe()}")
        self.holder = holder


class StorageLock(ABC):
    """One handle on the exclusive lock of a name (acquire, record the holder, release)."""

    @abstractmethod
    def acquire(self, wait: float | None) -> None:
        """Take the lock: at once, or within ``wait`` seconds (None: however long it takes).

        Raises :class:`LockBusyError` when another holder keeps it.  Two handles
        conflict even in one process (a lock is not re-entrant).
        """

    @abstractmethod
    def record(self, holder: LockHolder) -> None:
        """Say who holds it (call after :meth:`acquire`), for others to read."""

    @abstractmethod
    def release(self) -> None:
        """Let go (nothing happens when this handle does not hold it)."""

    @abstractmethod
    def holder(self) -> LockHolder | None:
        """Who holds the lock now (any handle), or None when nobody does (or only a dead
        holder, whose lock :meth:`clear_dead` may remove)."""

    def clear_dead(self) -> bool:
        """Remove the lock when its holder is dead (never a live holder's): whether it
        went.  Storages whose locks die with their holder have nothing to do."""
        return False

    def check(self) -> None:
        """Raise :class:`~cbt.core.errors.CbtIOError` when this handle no longer surely
        holds the lock (a lease it could not renew in time, a lock removed meanwhile);
        a holder calls it right before a step that must not run without the lock."""
        return None


class Storage(ABC):
    """Where a vault's objects live (see the module doc)."""

    root: str  # where it is, for messages
    # Whether a forked worker can write to it (a backup's default workers are forked).
    forkable: bool = True
    # Whether rename is atomic and keeps the mtime (a directory), or a copy then a delete
    # that sets a new one (S3): see cbt.repo.trash for what relies on it.
    rename_keeps_mtime: bool = True
    # Requests worth having in flight at once by one process (uploads, reads ahead): 1
    # where a request costs what its bytes cost (a disk), more where each one waits on a
    # server (S3).  Above 1, a backup's packs go up and a restore's come down that many
    # at a time; each in flight holds a pack (8 MiB) in memory.
    in_flight: int = 1

    @abstractmethod
    def spec(self) -> StorageSpec:
        """What a worker needs to open this storage itself
        (:func:`cbt.repo.stores.open_storage`)."""

    def where(self, name: str) -> str:
        """Where ``name`` is, for messages."""
        return f"{self.root}/{name}"

    @abstractmethod
    def put(self, name: str, data: Buffers) -> None:
        """Durably create or replace ``name`` with ``data`` (a buffer, or buffers to join)."""

    def put_stream(self, name: str, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
        """:meth:`put` of the bytes ``chunks`` yields, in order, without holding them all
        where the storage can stream (a directory; S3 in parts); all or nothing, as put.
        An exception from ``chunks`` leaves nothing written."""
        self.put(name, [bytes(c) for c in chunks])

    @abstractmethod
    def get(self, name: str) -> bytes: ...

    @abstractmethod
    def read_range(self, name: str, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (fewer at the end of the object)."""

    def map(self, name: str, spans: Sequence[tuple[int, int]] | None = None
            ) -> bytes | mmap.mmap | memoryview:
        """The whole object, mapped where the storage can (no copy), else read.

        ``spans``: the byte ranges ``[start, end)`` the caller will touch, sorted; only
        those are faulted in and checked (a restore that needs a few blocks of a pack
        reads those, not the pack).  None: all of it.  Touching a mapping outside
        them is the caller's risk (a page that cannot be read there is a SIGBUS).
        """
        return self.get(name)

    @abstractmethod
    def stat(self, name: str) -> ObjectStat: ...

    def size(self, name: str) -> int:
        return self.stat(name).size

    @abstractmethod
    def exists(self, name: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Names of the objects under ``prefix`` (a ``/`` boundary; recursively), sorted."""

    def sizes(self, prefix: str) -> dict[str, int]:
        """The size of each object under ``prefix`` (as :meth:`list`; one gone meanwhile is
        left out).  A stat each here; one listing where the storage's says sizes (S3)."""
        out = {}
        for name in self.list(prefix):
            try:
                out[name] = self.size(name)
            except CbtIOError as exc:
                if exc.errno != errno.ENOENT:
                    raise
        return out

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove ``name``; a missing one is no error.  Durable after :meth:`sync`."""

    @abstractmethod
    def sync(self, prefix: str) -> None:
        """Make the deletes done under ``prefix`` (not in sub-prefixes) durable."""

    @abstractmethod
    def rename(self, src: str, dst: str) -> None:
        """Durably move ``src`` to ``dst``, replacing it: atomically and keeping the mtime
        where :attr:`rename_keeps_mtime` (a directory); else a copy then a delete (S3: a
        crash between them leaves both names, see :mod:`cbt.repo.trash`)."""

    @abstractmethod
    def touch(self, name: str) -> None:
        """Set the modification time of ``name`` to now."""

    @abstractmethod
    def make_prefix(self, prefix: str) -> None:
        """Make an empty ``prefix`` exist where the storage has directories."""

    @abstractmethod
    def lock(self, name: str, remove: bool = False) -> StorageLock:
        """A new handle on the exclusive lock ``name`` (not acquired yet); ``remove``: the
        lock goes when released (a lock of a unique name, made by one holder once)."""

    def list_locks(self, prefix: str) -> builtins.list[str]:
        """The names of the locks under ``prefix`` (live or dead), sorted."""
        return self.list(prefix)

    def missing(self) -> str | None:
        """Why nothing at all is here, where the storage can tell (an S3 bucket that does
        not exist), for messages; else None."""
        return None

    def clock_offset(self, measure: bool = True) -> float:
        """How far the mtimes this storage gives are ahead of this host's ``time.time()``,
        at least (negative: behind): an object written at this host's time ``t`` or later
        has an mtime of ``t + clock_offset()`` or more.  0.0 where the mtimes are this
        host's clock (a directory, memory); an S3 server's clock is its own, and its mtimes
        are whole seconds (:meth:`cbt.repo.s3.S3Storage.clock_offset` measures it, by a
        write: not ``measure``, as if the clocks agreed).  gc compares mtimes with this
        host's times through it."""
        return 0.0


# -- names -----------------------------------------------------------------------------


def name_parts(name: str, prefix: bool = False) -> list[str]:
    """The ``/``-separated parts of a storage name, checked: relative, no empty, ``.`` or
    ``..`` part, no NUL; else :class:`~cbt.core.errors.CbtValueError` (never a path outside
    the root).  A ``prefix`` may be empty (the root) or end with ``/``."""
    if not isinstance(name, str) or "\0" in name or name.startswith("/"):
        raise CbtValueError(f"invalid name in a vault: {name!r}")
    if prefix:
        name = name.rstrip("/")
        if not name:
            return []
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise CbtValueError(f"invalid name in a vault: {name!r}")
    return parts


# -- a local directory ------------------------------------------------------------------

_ROOT_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC  # the root itself may be a link
_DIR_FLAGS = _ROOT_FLAGS | os.O_NOFOLLOW
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # (a FIFO: no wait)
FILE_MODE = 0o600  # files and directories a vault creates: its owner's only
DIR_MODE = 0o700


# URL schemes a storage can be opened at (cbt.repo.s3: s3://BUCKET/PREFIX), and those
# cbt's commands and Vault.init/open take as a vault location (every one of them).
STORAGE_SCHEMES: frozenset[str] = frozenset({"s3"})
LOCATION_SCHEMES: frozenset[str] = STORAGE_SCHEMES
# What a vault location may be, for messages.
WHERE_A_VAULT_IS = "a vault is a local directory or s3://BUCKET/PREFIX"
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def parse_location(location: str) -> tuple[str, str]:
    """``s3://BUCKET/PREFIX`` as (bucket, prefix without its slashes); else CbtValueError."""
    if not location[:5].lower() == "s3://":
        raise CbtValueError(f"not an S3 location: {location!r}")
    bucket, _, prefix = location[5:].partition("/")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise CbtValueError(f"invalid S3 bucket name {bucket!r} in {location!r} (3-63 "
                            "characters: lower-case letters, digits, '.' and '-')")
    prefix = prefix.strip("/")
    if prefix:
        try:
            name_parts(prefix)  # no empty, "." or ".." part
        except CbtValueError:
            raise CbtValueError(f"invalid S3 prefix {prefix!r} in {location!r} (no empty, "
                                "'.' or '..' part)") from None
        if not prefix.isprintable() or len(prefix.encode("utf-8", "replace")) > 512:
            raise CbtValueError(f"invalid S3 prefix {prefix!r} in {location!r} (no control "
                                "character, at most 512 bytes: a key is at most 1024)")
    return bucket, prefix


def check_location(location: str, schemes: frozenset[str] = LOCATION_SCHEMES) -> str:
    """``location`` if cbt knows where it is: a local path, not an unknown ``scheme://``
    (``s3://bucket/x`` would otherwise be a folder named ``s3:``), nor what reads as another
    host's (a ``:`` before the first ``/``, as git, scp and rsync read it: ``host:path``,
    ``s3:bucket``, ``sftp:host:/x``; ``./host:path`` names the local one); else
    CbtValueError.  ``schemes``: the URL schemes taken (:data:`STORAGE_SCHEMES` for
    every storage cbt has; a ``s3://`` location is checked by
    :func:`parse_location`)."""
    if not location:  # "$VAULT" unset: not the current directory
        raise CbtValueError("the vault location is empty")
    m = _SCHEME_RE.match(location)
    if m and m.group(1).lower() in schemes:
        if m.group(1).lower() == "s3":
            parse_location(location)  # a valid bucket and prefix
        return location
    if m and m.group(1).lower() in STORAGE_SCHEMES:
        raise CbtValueError(f"vault location scheme {m.group(1)!r} in {location!r} is not "
                            f"taken here: a vault is a local directory (write "
                            f"./{location} for a local one)")
    if m:
        raise CbtValueError(f"unknown vault location scheme {m.group(1)!r} in "
                            f"{location!r}: {_where(schemes)} (write ./{location} for a "
                            "local one)")
    if ":" in location.split("/", 1)[0]:
        raise CbtValueError(f"vault location {location!r} reads as another host's or a URL "
                            f"(a ':' before the first '/'): {_where(schemes)} "
                            f"(write ./{location} for a local one)")
    return location


def _where(schemes: frozenset[str]) -> str:
    return WHERE_A_VAULT_IS if "s3" in schemes else "a vault is a local directory"


def is_url(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` is a URL of a storage cbt has (``s3://...``), not a path."""
    if not isinstance(location, str):
        return False
    m = _SCHEME_RE.match(location)
    return m is not None and m.group(1).lower() in STORAGE_SCHEMES


def _local_path(root: str | os.PathLike[str]) -> str:
    """A text location checked (:func:`check_location`) and local; a path object is a
    local path already (``Path("./a:b")`` is ``a:b``: no longer marked local)."""
    if not isinstance(root, str):
        return os.fspath(root)
    if is_url(root):
        raise CbtValueError(f"vault location scheme {root.split(':', 1)[0]!r} in {root!r}: "
                            "not a local directory")
    return check_location(root)


class LocalStorage(Storage):
    """A vault in a local directory.

    Nothing inside the root is trusted: every name is checked (:func:`name_parts`)
    and opened component by component from the root with ``O_NOFOLLOW``, so a
    symbolic link inside the vault is never followed (a link met on the way is an
    ``ELOOP`` error; :meth:`list` skips links).  Only regular files are read.  The
    root itself may be a link.  New directories are made 0700, files 0600.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = _local_path(root)

    @classmethod
    def create(cls, path: str | os.PathLike[str]) -> LocalStorage:
        """A storage in a new or empty directory (made here, 0700, with its parents)."""
        p = Path(_local_path(path))
        if p.exists() and not p.is_dir():
            raise CbtIOError(errno.ENOTDIR, f"not a directory: {p}")
        if p.is_dir() and any(p.iterdir()):
            raise CbtIOError(errno.ENOTEMPTY, f"directory not empty: {p} (cbt init needs a "
                             "new or empty directory)")
        if not p.is_dir():
            p.parent.mkdir(parents=True, exist_ok=True)
            p.mkdir(DIR_MODE)
            os.chmod(p, DIR_MODE)  # whatever the umask
        return cls(p)

    def spec(self) -> StorageSpec:
        return StorageSpec("local", self.root)

    def path(self, name: str) -> Path:
        """Where ``name`` is (for messages: cbt opens nothing by this path)."""
        return Path(self.root, *name_parts(name, prefix=True))

    def _missing(self, name: str) -> CbtIOError:
        return CbtIOError(errno.ENOENT, f"missing from vault: {self.path(name)}")

    def _link(self, where: str | Path) -> CbtIOError:
        return CbtIOError(errno.ELOOP, f"refusing a symbolic link inside the vault: {where} "
                          "(cbt never follows links in a vault)")

    def _error(self, name: str, exc: OSError, verb: str) -> CbtIOError:
        """An OSError met on ``name`` as cbt says it: missing, a link, or what failed."""
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return self._missing(name)
        if exc.errno == errno.ELOOP:
            return self._link(self.path(name))
        return CbtIOError(exc.errno, f"cannot {verb} {self.path(name)}: {exc.strerror}")

    @contextlib.contextmanager
    def _dir(self, parts: list[str], create: bool = False,
             durable: bool = True) -> Iterator[int]:
        """A descriptor of the directory ``parts`` (from the root, never through a link);
        ``create`` makes missing ones (0700), each new entry made durable if ``durable``."""
        fd = os.open(self.root, _ROOT_FLAGS)
        try:
            for i, part in enumerate(parts):
                try:
                    sub = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    try:
                        os.mkdir(part, DIR_MODE, dir_fd=fd)
                    except FileExistsError:
                        pass
                    else:
                        if durable:
                            os.fsync(fd)
                            durable_step()
                    sub = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link(part, fd):
                        raise self._link(Path(self.root, *parts[:i + 1])) from None
                    raise
                os.close(fd)
                fd = sub
            yield fd
        finally:
            os.close(fd)

    def _open(self, name: str, flags: int = _READ_FLAGS, mode: int = FILE_MODE) -> int:
        """A descriptor of the regular file ``name`` (never through a link), else OSError."""
        parts = name_parts(name)
        with self._dir(parts[:-1]) as dfd:
            fd = os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dfd)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise CbtIOError(errno.EINVAL, f"not a regular file: {self.path(name)}")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def put(self, name: str, data: Buffers) -> None:
        self.put_stream(name, data if isinstance(data, list) else [data])

    def put_stream(self, name: str, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
        parts = name_parts(name)
        base, tmp = parts[-1], f".{parts[-1]}.tmp-{os.getpid()}"
        try:
            with self._dir(parts[:-1], create=True) as dfd:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, FILE_MODE, dir_fd=dfd)
                try:
                    with open(fd, "wb") as f:
                        for chunk in chunks:
                            f.write(chunk)
                        f.flush()
                        fsync_file(f.fileno())
                    os.replace(tmp, base, src_dir_fd=dfd, dst_dir_fd=dfd)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp, dir_fd=dfd)
                    raise
                os.fsync(dfd)
                durable_step()
        except CbtIOError:
            raise
        except OSError as exc:
            raise self._error(name, exc, "write") from None

    def _open_read(self, name: str) -> int:
        """A descriptor of the regular file ``name`` (no link followed), errors named."""
        try:
            return self._open(name)
        except CbtIOError:
            raise
        except OSError as exc:
            raise self._error(name, exc, "read") from None

    def _unreadable(self, name: str, fd: int, offset: int, length: int,
                    exc: OSError | None) -> CbtIOError:
        """The error of an object that is there but cannot be read: which byte, what error."""
        found = first_unreadable(fd, offset, length)
        at, err = found if found is not None and found[1] is not None else (offset, exc)
        code = (err.errno if err is not None else None) or errno.EIO
        why = (err.strerror if err is not None else None) or os.strerror(code)
        return CbtIOError(code, f"unreadable in vault: {self.path(name)} at byte {at}: {why}")

    def get(self, name: str) -> bytes:
        fd = self._open_read(name)
        with open(fd, "rb") as f:
            try:
                return f.read()
            except OSError as exc:
                raise self._unreadable(name, fd, 0, os.fstat(fd).st_size, exc) from None

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        fd = self._open_read(name)
        try:
            return os.pread(fd, length, offset)
        except OSError as exc:
            raise self._unreadable(name, fd, offset, length, exc) from None
        finally:
            os.close(fd)

    def map(self, name: str, spans: Sequence[tuple[int, int]] | None = None
            ) -> bytes | mmap.mmap:
        fd = self._open_read(name)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                return b""
            m = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            for start, end in [(0, size)] if spans is None else spans:
                if not populate(m, start, end - start, fd=fd):  # (else a SIGBUS when touched)
                    m.close()
                    raise self._unreadable(name, fd, start, min(end, size) - start, None)
            return m
        finally:
            os.close(fd)

    def _lstat(self, name: str) -> os.stat_result:
        parts = name_parts(name)
        with self._dir(parts[:-1]) as dfd:
            st = os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            raise self._link(self.path(name))
        return st

    def stat(self, name: str) -> ObjectStat:
        try:
            st = self._lstat(name)
        except CbtIOError:
            raise
        except OSError as exc:
            raise self._error(name, exc, "stat") from None
        return ObjectStat(st.st_size, st.st_mtime)

    def exists(self, name: str) -> bool:
        try:
            return stat.S_ISREG(self._lstat(name).st_mode)
        except OSError:
            return False

    def list(self, prefix: str) -> list[str]:
        parts = name_parts(prefix, prefix=True)
        out: list[str] = []
        try:
            with self._dir(parts) as fd:
                _walk(fd, "".join(f"{p}/" for p in parts), out)
        except CbtIOError:
            raise
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(out)

    def delete(self, name: str) -> None:
        parts = name_parts(name)
        try:
            with self._dir(parts[:-1]) as dfd:
                os.unlink(parts[-1], dir_fd=dfd)  # a link itself goes, never what it names
        except (FileNotFoundError, NotADirectoryError):
            pass

    def sync(self, prefix: str) -> None:
        with self._dir(name_parts(prefix, prefix=True)) as fd:
            os.fsync(fd)
            durable_step()

    def rename(self, src: str, dst: str) -> None:
        s, d = name_parts(src), name_parts(dst)
        try:
            with self._dir(s[:-1]) as sfd:
                if not stat.S_ISREG(os.stat(s[-1], dir_fd=sfd, follow_symlinks=False).st_mode):
                    raise self._missing(src)
                with self._dir(d[:-1], create=True) as dfd:
                    os.rename(s[-1], d[-1], src_dir_fd=sfd, dst_dir_fd=dfd)
                    os.fsync(dfd)
                    durable_step()
                if s[:-1] != d[:-1]:
                    os.fsync(sfd)
                    durable_step()
        except CbtIOError:
            raise
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                raise self._error(src, exc, "rename") from None
            raise CbtIOError(exc.errno, f"cannot rename {self.path(src)} to {self.path(dst)}: "
                             f"{exc.strerror}") from None

    def touch(self, name: str) -> None:
        parts = name_parts(name)
        try:
            with self._dir(parts[:-1]) as dfd:
                if stat.S_ISLNK(os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False).st_mode):
                    raise self._link(self.path(name))
                os.utime(parts[-1], dir_fd=dfd, follow_symlinks=False)
        except CbtIOError:
            raise
        except OSError as exc:
            raise self._error(name, exc, "touch") from None

    def make_prefix(self, prefix: str) -> None:
        with self._dir(name_parts(prefix, prefix=True), create=True, durable=False):
            pass

    def lock(self, name: str, remove: bool = False) -> StorageLock:
        name_parts(name)
        return _FileLock(self, name, remove)


def _is_link(part: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(part, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _walk(fd: int, rel: str, out: list[str]) -> None:
    """Append the regular files under the directory ``fd`` (named ``rel``) to ``out``,
    descending into real directories only: a link is neither listed nor followed."""
    with os.scandir(fd) as it:
        entries = list(it)
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            try:
                sub = os.open(e.name, _DIR_FLAGS, dir_fd=fd)
            except OSError:
                continue  # gone, or replaced by a link meanwhile
            try:
                _walk(sub, f"{rel}{e.name}/", out)
            finally:
                os.close(sub)
        elif e.is_file(follow_symlinks=False):
            out.append(f"{rel}{e.name}")


class _FileLock(StorageLock):
    """``flock`` on a file holding a line of JSON about the holder.

    A file is removed (a ``remove`` lock's release, :meth:`clear_dead`) only by whoever
    holds its ``flock``, and whoever takes the ``flock`` checks that the name still is
    that file (else it locked a removed file: it tries again), so removing the lock file
    of a dead holder never races a new one."""

    def __init__(self, storage: LocalStorage, name: str, remove: bool = False) -> None:
        self._storage = storage
        self._name = name
        self._remove = remove
        self._path = storage.where(name)
        self._fd: int | None = None

    def _open(self, flags: int) -> int:
        try:
            return self._storage._open(self._name, flags)
        except CbtIOError:
            raise
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise
            raise self._storage._error(self._name, exc, "open") from None

    def _is_named(self, fd: int) -> bool:
        """Whether the name still is the file of ``fd`` (not removed or replaced)."""
        try:
            st = self._storage._lstat(self._name)
        except OSError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def acquire(self, wait: float | None) -> None:
        deadline = None if wait is None else time.monotonic() + wait
        parent = self._name.rpartition("/")[0]
        while True:
            if parent:
                self._storage.make_prefix(parent)
            fd = self._open(os.O_RDWR | os.O_CREAT)
            try:
                if deadline is None:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                else:
                    self._poll(fd, deadline)
                if self._is_named(fd):
                    break
            except BaseException:
                with contextlib.suppress(OSError):
                    fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
                raise
            fcntl.flock(fd, fcntl.LOCK_UN)  # removed (a dead holder's) before we locked it
            os.close(fd)
        self._fd = fd
        _HELD.add(fd)

    def _poll(self, fd: int, deadline: float) -> None:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                    raise
                if time.monotonic() >= deadline:
                    raise LockBusyError(self._path, self._read()) from None
                time.sleep(0.1)

    def _read(self) -> LockHolder:
        try:
            fd = self._open(os.O_RDONLY)
        except OSError:
            return LockHolder()
        try:
            return LockHolder.from_json(os.pread(fd, 4096, 0))
        finally:
            os.close(fd)

    def record(self, holder: LockHolder) -> None:
        assert self._fd is not None, "record() before acquire()"
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, holder.to_json(), 0)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _HELD.discard(fd)
        if self._remove and self._is_named(fd):
            with contextlib.suppress(OSError):
                self._storage.delete(self._name)  # still holding it: nobody else removes it
        # Unlock explicitly: a process forked meanwhile (a worker pool) shares the open
        # file, and closing our descriptor alone would leave the lock held through it.
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def holder(self) -> LockHolder | None:
        try:
            fd = self._open(_READ_FLAGS)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return LockHolder.from_json(os.pread(fd, 4096, 0))
            return None
        finally:
            os.close(fd)

    def clear_dead(self) -> bool:
        try:
            fd = self._open(os.O_RDWR)
        except OSError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False  # held: alive
            if not self._is_named(fd):
                return False
            self._storage.delete(self._name)
            return True
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def check(self) -> None:
        fd = self._fd
        if fd is None or not self._is_named(fd):
            raise CbtIOError(errno.ENOLCK, f"lost the lock {self._path} (its file was removed)")


# Lock descriptors held by this process; a forked child closes its copies, so the
# lock never outlives the holder through a child.
_HELD: set[int] = set()


def _close_held_in_child() -> None:
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


# -- in memory ------------------------------------------------------------------------------


class _Object(NamedTuple):
    data: bytes
    mtime: float


class _LockSlot:
    def __init__(self) -> None:
        self.mutex = threading.Lock()
        self.holder = LockHolder()


class MemoryStorage(Storage):
    """A vault in this process's memory: objects in a dict, locks as threading locks.

    Thread-safe.  :func:`cbt.repo.stores.open_storage` finds it again by its key while it lives,
    in this process only: threads share it; a forked worker inherits a copy it may
    read (a restore's workers) but never write: its writes would vanish with it,
    so they are refused.
    """

    forkable = False

    def __init__(self, key: str | None = None) -> None:
        self.key = key or uuid.uuid4().hex
        self.root = f"memory:{self.key}"
        self._objects: dict[str, _Object] = {}
        self._locks: dict[str, _LockSlot] = {}
        self._mutex = threading.Lock()
        self._owner = os.getpid()
        with _MEMORY_MUTEX:
            if self.key in _MEMORY:
                raise CbtIOError(errno.EEXIST, f"memory storage {self.key} exists already")
            _MEMORY[self.key] = self

    def _writable(self) -> None:
        if os.getpid() != self._owner:
            raise CbtIOError(errno.EPERM, f"{self.root}: a forked process cannot write to a "
                             "memory storage (its writes would be lost); use threads")

    def spec(self) -> StorageSpec:
        return StorageSpec("memory", self.key)

    def _object(self, name: str) -> _Object:
        name_parts(name)
        with self._mutex:
            obj = self._objects.get(name)
        if obj is None:
            raise CbtIOError(errno.ENOENT, f"missing from vault: {self.root}/{name}")
        return obj

    def put(self, name: str, data: Buffers) -> None:
        name_parts(name)
        self._writable()
        parts = data if isinstance(data, list) else [data]
        obj = _Object(b"".join(parts), time.time())
        with self._mutex:
            self._objects[name] = obj

    def get(self, name: str) -> bytes:
        return self._object(name).data

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        return self._object(name).data[offset:offset + length]

    def stat(self, name: str) -> ObjectStat:
        obj = self._object(name)
        return ObjectStat(len(obj.data), obj.mtime)

    def exists(self, name: str) -> bool:
        name_parts(name)
        with self._mutex:
            return name in self._objects

    def list(self, prefix: str) -> list[str]:
        head = "".join(f"{p}/" for p in name_parts(prefix, prefix=True))
        with self._mutex:
            return sorted(n for n in self._objects if n.startswith(head))

    def delete(self, name: str) -> None:
        name_parts(name)
        self._writable()
        with self._mutex:
            self._objects.pop(name, None)

    def sync(self, prefix: str) -> None:
        pass  # every change is as durable as it will ever be

    def make_prefix(self, prefix: str) -> None:
        self._writable()
        pass  # a prefix exists by the names under it

    def rename(self, src: str, dst: str) -> None:
        name_parts(src)
        name_parts(dst)
        self._writable()
        with self._mutex:
            obj = self._objects.pop(src, None)
            if obj is not None:
                self._objects[dst] = obj
        if obj is None:
            raise CbtIOError(errno.ENOENT, f"missing from vault: {self.root}/{src}")

    def touch(self, name: str) -> None:
        name_parts(name)
        self._writable()
        with self._mutex:
            obj = self._objects.get(name)
            if obj is not None:
                self._objects[name] = obj._replace(mtime=time.time())
        if obj is None:
            raise CbtIOError(errno.ENOENT, f"missing from vault: {self.root}/{name}")

    def lock(self, name: str, remove: bool = False) -> StorageLock:
        name_parts(name)
        self._writable()
        with self._mutex:
            slot = self._locks.setdefault(name, _LockSlot())
        return _MemoryLock(f"{self.root}/{name}", slot,
                           (lambda: self._drop_lock(name, slot)) if remove else None)

    def _drop_lock(self, name: str, slot: _LockSlot) -> None:
        with self._mutex:
            if self._locks.get(name) is slot and not slot.mutex.locked():
                del self._locks[name]

    def list_locks(self, prefix: str) -> builtins.list[str]:
        head = "".join(f"{p}/" for p in name_parts(prefix, prefix=True))
        with self._mutex:
            return sorted(n for n, slot in self._locks.items()
                          if n.startswith(head) and slot.mutex.locked())


class _MemoryLock(StorageLock):
    def __init__(self, where: str, slot: _LockSlot,
                 drop: Callable[[], None] | None = None) -> None:
        self._where = where
        self._slot = slot
        self._held = False
        self._drop = drop  # forget the slot when released (a lock of a unique name)

    def acquire(self, wait: float | None) -> None:
        mutex = self._slot.mutex
        if wait is None:
            got = mutex.acquire()
        elif wait > 0:
            got = mutex.acquire(timeout=wait)
        else:
            got = mutex.acquire(blocking=False)
        if not got:
            raise LockBusyError(self._where, self._slot.holder)
        self._held = True

    def record(self, holder: LockHolder) -> None:
        assert self._held, "record() before acquire()"
        self._slot.holder = holder

    def release(self) -> None:
        if self._held:
            self._held = False
            self._slot.mutex.release()
            if self._drop is not None:
                self._drop()

    def holder(self) -> LockHolder | None:
        return self._slot.holder if self._slot.mutex.locked() else None


# MemoryStorage instances of this process by key, while something else holds them.
_MEMORY: weakref.WeakValueDictionary[str, MemoryStorage] = weakref.WeakValueDictionary()
_MEMORY_MUTEX = threading.Lock()


def find_memory_storage(key: str) -> MemoryStorage | None:
    """The :class:`MemoryStorage` of ``key`` while it lives in this process, else None."""
    with _MEMORY_MUTEX:
        return _MEMORY.get(key)


__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "STORAGE_SCHEMES",
    "Buffers",
    "LocalStorage",
    "LockBusyError",
    "LockHolder",
    "MemoryStorage",
    "ObjectStat",
    "Storage",
    "StorageLock",
    "StorageSpec",
    "check_location",
    "find_memory_storage",
    "is_url",
    "name_parts",
    "parse_location",
]
