"""Opening a storage again from its spec, whatever kind it is (in a worker).

Above :mod:`cbt.repo.storage` (the seam, local and memory storage) and
:mod:`cbt.repo.s3` (S3), so that neither imports the other's caller.
"""

from __future__ import annotations

import errno
from pathlib import Path

from cbt.core.errors import CbtIOError
from cbt.repo.storage import LocalStorage, Storage, StorageSpec, find_memory_storage

__all__ = ["open_storage"]


def open_storage(spec: StorageSpec) -> Storage:
    """Reopen a storage from its :meth:`Storage.spec` (in a worker)."""
    if spec.kind == "local":
        return LocalStorage(Path(spec.location))  # checked when the vault was opened
    if spec.kind == "s3":
        from cbt.repo.s3 import S3Storage  # (obstore loads only for an S3 vault)

        return S3Storage(spec.location)
    if spec.kind == "memory":
        found = find_memory_storage(spec.location)
        if found is None:
            raise CbtIOError(errno.ENOENT, f"no memory storage {spec.location} in this process "
                             "(memory storage is shared with threads only)")
        return found
    raise CbtIOError(errno.EINVAL, f"unknown storage kind {spec.kind!r}")
