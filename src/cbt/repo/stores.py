"""Opening a storage again from its spec, whatever kind it is (in a worker).

Above :mod:`cbt.repo.storage` (the seam, local and memory storage) and
:mod:`cbt.repo.s3` (S3), so that neither imports the other's caller.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from cbt.core.errors import CbtIOError
from cbt.repo.storage import (
    LocalStorage,
    Storage,
    StorageSpec,
    check_location,
    find_memory_storage,
    is_url,
)

__all__ = ["open_storage", "storage_at"]


def storage_at(location: str | os.PathLike[str], create: bool = False) -> Storage:
    """The storage at a vault location: ``s3://BUCKET/PREFIX`` (:mod:`cbt.repo.s3`) or a
    local directory (a text location checked by :func:`check_location`; a path object is
    a local path).  ``create``: a new, empty one (an S3 bucket made when missing)."""
    if isinstance(location, str):
        check_location(location)
    if is_url(location):
        from cbt.repo.s3 import S3Storage  # (obstore loads only for an S3 vault)

        text = str(location)
        return S3Storage.create(text) if create else S3Storage(text)
    if create:
        return LocalStorage.create(location)
    return LocalStorage(Path(location))


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
