"""Storage behind a vault: a small interface and its local-directory implementation.

Everything the vault stores goes through these few calls, so an object store
(``pyarrow.fs`` S3) can stand behind a vault later without touching the rest:

- ``put(name, data)``: durably create an object (local: temporary name, fsync,
  rename, fsync of the directory);
- ``get(name)`` / ``read_range(name, offset, length)``;
- ``size(name)``, ``exists(name)``, ``list(prefix)``, ``delete(name)``.

Names are ``/``-separated paths relative to the vault root.

A worker process or thread never receives a Storage object: it receives the
storage's :meth:`Storage.spec` (small and picklable) and reopens it with
:func:`open_storage`.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import BinaryIO, NamedTuple

from cbt.core.durable import atomic_write, fsync_dir
from cbt.core.errors import CbtIOError

Buffers = bytes | bytearray | memoryview | list[bytes | bytearray]


class StorageSpec(NamedTuple):
    """A picklable description of a storage: its kind and where it is."""

    kind: str  # "local"
    location: str


class Storage(ABC):
    """Where a vault's objects live."""

    root: str

    @abstractmethod
    def spec(self) -> StorageSpec:
        """What a worker needs to open this storage itself (:func:`open_storage`)."""

    @abstractmethod
    def put(self, name: str, data: Buffers) -> None:
        """Durably create ``name`` holding ``data`` (a buffer, or buffers to concatenate)."""

    @abstractmethod
    def get(self, name: str) -> bytes: ...

    @abstractmethod
    def read_range(self, name: str, offset: int, length: int) -> bytes: ...

    def map(self, name: str) -> bytes | mmap.mmap:
        """The whole object, mapped where the storage can (no copy), else read."""
        return self.get(name)

    @abstractmethod
    def size(self, name: str) -> int: ...

    @abstractmethod
    def exists(self, name: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Names of the objects under ``prefix`` (recursively), sorted."""

    @abstractmethod
    def delete(self, name: str) -> None: ...


class LocalStorage(Storage):
    """A vault in a local directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.fspath(root)

    def spec(self) -> StorageSpec:
        return StorageSpec("local", self.root)

    def path(self, name: str) -> Path:
        return Path(self.root, name)

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
        except FileNotFoundError:
            raise CbtIOError(errno.ENOENT, f"missing from vault: {self.path(name)}") from None

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        try:
            with open(self.path(name), "rb") as f:
                return os.pread(f.fileno(), length, offset)
        except FileNotFoundError:
            raise CbtIOError(errno.ENOENT, f"missing from vault: {self.path(name)}") from None

    def map(self, name: str) -> bytes | mmap.mmap:
        try:
            with open(self.path(name), "rb") as f:
                if os.fstat(f.fileno()).st_size == 0:
                    return b""
                return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise CbtIOError(errno.ENOENT, f"missing from vault: {self.path(name)}") from None

    def size(self, name: str) -> int:
        try:
            return self.path(name).stat().st_size
        except FileNotFoundError:
            raise CbtIOError(errno.ENOENT, f"missing from vault: {self.path(name)}") from None

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

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


def open_storage(spec: StorageSpec) -> Storage:
    """Reopen a storage from its :meth:`Storage.spec` (in a worker)."""
    if spec.kind == "local":
        return LocalStorage(spec.location)
    raise CbtIOError(errno.EINVAL, f"unknown storage kind {spec.kind!r}")


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
