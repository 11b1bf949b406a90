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
3. ``rename(src, dst)`` moves an object atomically and durably (replacing
   ``dst``), keeping its modification time; ``touch`` sets that time to now.
4. ``delete`` removes an object (a missing one is no error); ``sync(prefix)``
   makes the deletes under ``prefix`` durable, one step for many deletes.
5. ``lock(name)`` is an exclusive lock of that name (local: ``flock`` on the
   file ``name``, so a dead holder never blocks anyone), with the holder's
   :class:`LockHolder` (pid, host, command, since) readable by others.

Reading a missing object raises :class:`~cbt.core.errors.CbtIOError` with
``ENOENT``.  A worker process or thread never receives a Storage object: it
receives the storage's :meth:`Storage.spec` (small and picklable) and reopens
it with :func:`open_storage`.  A :class:`MemoryStorage` is found again only
within its own process (threads, not forked or spawned processes).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import mmap
import os
import threading
import time
import uuid
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

from cbt.core.durable import atomic_write, fsync_dir
from cbt.core.errors import CbtError, CbtIOError

Buffers = bytes | bytearray | memoryview | list[bytes | bytearray]


class StorageSpec(NamedTuple):
    """A picklable description of a storage: its kind and where it is."""

    kind: str  # "local" or "memory"
    location: str  # a directory, or the key of a MemoryStorage in this process


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
        try:
            info = json.loads(raw or b"{}")
        except ValueError:
            return cls()
        if not isinstance(info, dict):
            return cls()
        try:
            since_ts: float | None = float(info.get("since_ts", 0.0))
        except (ValueError, TypeError):
            since_ts = None
        return cls(pid=info.get("pid"), host=info.get("host"), command=info.get("command"),
                   since=info.get("since"), since_ts=since_ts)

    def describe(self) -> str:
        if self == LockHolder():
            return "another process"
        command = f" ({self.command})" if self.command is not None else ""
        return f"pid {self.pid} on {self.host}{command} since {self.since}"


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
        """Who holds the lock now (any handle), or None when nobody does."""


class Storage(ABC):
    """Where a vault's objects live (see the module doc)."""

    root: str  # where it is, for messages
    # Whether a forked worker can write to it (a backup's default workers are forked).
    forkable: bool = True

    @abstractmethod
    def spec(self) -> StorageSpec:
        """What a worker needs to open this storage itself (:func:`open_storage`)."""

    def where(self, name: str) -> str:
        """Where ``name`` is, for messages."""
        return f"{self.root}/{name}"

    @abstractmethod
    def put(self, name: str, data: Buffers) -> None:
        """Durably create or replace ``name`` with ``data`` (a buffer, or buffers to join)."""

    @abstractmethod
    def get(self, name: str) -> bytes: ...

    @abstractmethod
    def read_range(self, name: str, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (fewer at the end of the object)."""

    def map(self, name: str) -> bytes | mmap.mmap:
        """The whole object, mapped where the storage can (no copy), else read."""
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

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove ``name``; a missing one is no error.  Durable after :meth:`sync`."""

    @abstractmethod
    def sync(self, prefix: str) -> None:
        """Make the deletes done under ``prefix`` (not in sub-prefixes) durable."""

    @abstractmethod
    def rename(self, src: str, dst: str) -> None:
        """Durably and atomically move ``src`` to ``dst``, replacing it, keeping the mtime."""

    @abstractmethod
    def touch(self, name: str) -> None:
        """Set the modification time of ``name`` to now."""

    @abstractmethod
    def make_prefix(self, prefix: str) -> None:
        """Make an empty ``prefix`` exist where the storage has directories."""

    @abstractmethod
    def lock(self, name: str) -> StorageLock:
        """A new handle on the exclusive lock ``name`` (not acquired yet)."""


# -- a local directory ------------------------------------------------------------------


class LocalStorage(Storage):
    """A vault in a local directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.fspath(root)

    @classmethod
    def create(cls, path: str | os.PathLike[str]) -> LocalStorage:
        """A storage in a new or empty directory (made here, with its parents)."""
        p = Path(path)
        if p.exists() and not p.is_dir():
            raise CbtIOError(errno.ENOTDIR, f"not a directory: {p}")
        if p.is_dir() and any(p.iterdir()):
            raise CbtIOError(errno.ENOTEMPTY, f"directory not empty: {p} (cbt init needs a "
                             "new or empty directory)")
        p.mkdir(parents=True, exist_ok=True)
        return cls(p)

    def spec(self) -> StorageSpec:
        return StorageSpec("local", self.root)

    def path(self, name: str) -> Path:
        return Path(self.root, name)

    def _missing(self, name: str) -> CbtIOError:
        return CbtIOError(errno.ENOENT, f"missing from vault: {self.path(name)}")

    def put(self, name: str, data: Buffers) -> None:
        p = self.path(name)
        parts = data if isinstance(data, list) else [data]

        def write(f: BinaryIO) -> None:
            for part in parts:
                f.write(part)

        try:
            _ensure_dir(p.parent)
            atomic_write(p, write)
        except OSError as exc:
            raise CbtIOError(exc.errno, f"cannot write {p}: {exc.strerror}") from None

    def get(self, name: str) -> bytes:
        try:
            return self.path(name).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise self._missing(name) from None
        except OSError as exc:
            raise CbtIOError(exc.errno, f"cannot read {self.path(name)}: "
                             f"{exc.strerror}") from None

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        try:
            with open(self.path(name), "rb") as f:
                return os.pread(f.fileno(), length, offset)
        except FileNotFoundError:
            raise self._missing(name) from None

    def map(self, name: str) -> bytes | mmap.mmap:
        try:
            with open(self.path(name), "rb") as f:
                if os.fstat(f.fileno()).st_size == 0:
                    return b""
                return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise self._missing(name) from None

    def stat(self, name: str) -> ObjectStat:
        try:
            st = self.path(name).stat()
        except FileNotFoundError:
            raise self._missing(name) from None
        return ObjectStat(st.st_size, st.st_mtime)

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self.path(prefix)
        if not base.is_dir():
            return []
        out: list[str] = []
        for dirpath, _dirs, files in os.walk(base):
            rel = os.path.relpath(dirpath, self.root)
            out.extend(f"{rel}/{f}" if rel != "." else f for f in files)
        return sorted(out)

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(name))

    def sync(self, prefix: str) -> None:
        fsync_dir(self.path(prefix))

    def rename(self, src: str, dst: str) -> None:
        s, d = self.path(src), self.path(dst)
        if not s.is_file():
            raise self._missing(src)
        try:
            _ensure_dir(d.parent)
            os.rename(s, d)
        except FileNotFoundError:
            raise self._missing(src) from None
        except OSError as exc:
            raise CbtIOError(exc.errno, f"cannot rename {s} to {d}: {exc.strerror}") from None
        fsync_dir(d.parent)
        if s.parent != d.parent:
            fsync_dir(s.parent)

    def touch(self, name: str) -> None:
        try:
            os.utime(self.path(name))
        except FileNotFoundError:
            raise self._missing(name) from None

    def make_prefix(self, prefix: str) -> None:
        self.path(prefix).mkdir(exist_ok=True)

    def lock(self, name: str) -> StorageLock:
        return _FileLock(os.fspath(self.path(name)))


class _FileLock(StorageLock):
    """``flock`` on a file holding a line of JSON about the holder."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._fd: int | None = None

    def acquire(self, wait: float | None) -> None:
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            if wait is None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                self._poll(fd, time.monotonic() + wait)
        except BaseException:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise
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
            with open(self._path, "rb") as f:
                return LockHolder.from_json(f.read())
        except OSError:
            return LockHolder()

    def record(self, holder: LockHolder) -> None:
        assert self._fd is not None, "record() before acquire()"
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, holder.to_json(), 0)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _HELD.discard(fd)
        # Unlock explicitly: a process forked meanwhile (a worker pool) shares the open
        # file, and closing our descriptor alone would leave the lock held through it.
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def holder(self) -> LockHolder | None:
        try:
            fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
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


# Lock descriptors held by this process; a forked child closes its copies, so the
# lock never outlives the holder through a child.
_HELD: set[int] = set()


def _close_held_in_child() -> None:
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


def _ensure_dir(d: Path) -> None:
    """Create ``d`` and missing parents, fsyncing each new entry's parent directory."""
    if d.is_dir():
        return
    _ensure_dir(d.parent)
    try:
        d.mkdir()
    except FileExistsError:
        return
    fsync_dir(d.parent)


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

    Thread-safe.  :func:`open_storage` finds it again by its key while it lives,
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
        with self._mutex:
            obj = self._objects.get(name)
        if obj is None:
            raise CbtIOError(errno.ENOENT, f"missing from vault: {self.root}/{name}")
        return obj

    def put(self, name: str, data: Buffers) -> None:
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
        with self._mutex:
            return name in self._objects

    def list(self, prefix: str) -> list[str]:
        head = prefix.strip("/")
        head = f"{head}/" if head else ""
        with self._mutex:
            return sorted(n for n in self._objects if n.startswith(head))

    def delete(self, name: str) -> None:
        self._writable()
        with self._mutex:
            self._objects.pop(name, None)

    def sync(self, prefix: str) -> None:
        pass  # every change is as durable as it will ever be

    def make_prefix(self, prefix: str) -> None:
        self._writable()
        pass  # a prefix exists by the names under it

    def rename(self, src: str, dst: str) -> None:
        self._writable()
        with self._mutex:
            obj = self._objects.pop(src, None)
            if obj is not None:
                self._objects[dst] = obj
        if obj is None:
            raise CbtIOError(errno.ENOENT, f"missing from vault: {self.root}/{src}")

    def touch(self, name: str) -> None:
        self._writable()
        with self._mutex:
            obj = self._objects.get(name)
            if obj is not None:
                self._objects[name] = obj._replace(mtime=time.time())
        if obj is None:
            raise CbtIOError(errno.ENOENT, f"missing from vault: {self.root}/{name}")

    def lock(self, name: str) -> StorageLock:
        self._writable()
        with self._mutex:
            slot = self._locks.setdefault(name, _LockSlot())
        return _MemoryLock(f"{self.root}/{name}", slot)


class _MemoryLock(StorageLock):
    def __init__(self, where: str, slot: _LockSlot) -> None:
        self._where = where
        self._slot = slot
        self._held = False

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

    def holder(self) -> LockHolder | None:
        return self._slot.holder if self._slot.mutex.locked() else None


# MemoryStorage instances of this process by key, while something else holds them.
_MEMORY: weakref.WeakValueDictionary[str, MemoryStorage] = weakref.WeakValueDictionary()
_MEMORY_MUTEX = threading.Lock()


def open_storage(spec: StorageSpec) -> Storage:
    """Reopen a storage from its :meth:`Storage.spec` (in a worker)."""
    if spec.kind == "local":
        return LocalStorage(spec.location)
    if spec.kind == "memory":
        with _MEMORY_MUTEX:
            found = _MEMORY.get(spec.location)
        if found is None:
            raise CbtIOError(errno.ENOENT, f"no memory storage {spec.location} in this process "
                             "(memory storage is shared with threads only)")
        return found
    raise CbtIOError(errno.EINVAL, f"unknown storage kind {spec.kind!r}")


__all__ = ["Buffers", "LocalStorage", "LockBusyError", "LockHolder", "MemoryStorage",
           "ObjectStat", "Storage", "StorageLock", "StorageSpec", "open_storage"]
