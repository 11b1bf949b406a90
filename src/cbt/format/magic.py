"""What a file holds, told by its first bytes, without numpy or pyarrow.

``cbt diff`` checks its two operands here before any heavy import: two images
are compared without either (a whole ``cbt diff`` is timed against ``b3sum``).
"""

from __future__ import annotations

import errno
import os

from cbt.core.errors import CbtIOError

# Do not modify: Arrow's IPC file magic, what a manifest file starts with.
ARROW_FILE_MAGIC = b"ARROW1"


def is_manifest_file(path: str | os.PathLike[str]) -> bool:
    """True when the file starts with Arrow's file magic (``ARROW1``).

    A first page that cannot be read (a disk image with a read error) is a
    :class:`CbtIOError` naming the file, the byte and the error, as a disk read names it.
    """
    with open(path, "rb") as f:
        try:
            return f.read(len(ARROW_FILE_MAGIC)) == ARROW_FILE_MAGIC
        except OSError as exc:
            raise CbtIOError(exc.errno or errno.EIO, f"read error on {os.fspath(path)} at "
                             f"byte 0: {exc.strerror or exc}") from None


def is_manifest_path(path: str) -> bool:
    """A regular file that is a manifest (a device, a directory or a missing path: no)."""
    return os.path.isfile(path) and is_manifest_file(path)
