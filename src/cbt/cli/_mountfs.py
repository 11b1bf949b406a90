"""The FUSE file system of ``cbt mount`` (mfusepy's high-level operations over ctypes).

Directories come from the files' paths; each file is a :class:`~cbt.ops.mount.DiskReader`.
Read-only: a file opens only for reading (else EROFS), and every operation that would
change something is mfusepy's default, EROFS (the mount is ``ro`` as well, so the
kernel refuses those first, for root too).  A read that fails (a damaged block) is EIO
and a warning line on stderr.  mfusepy calls these from libfuse's threads; the readers
are thread-safe.  Imported only by ``cbt mount`` (importing mfusepy loads libfuse).
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import time
from typing import Any

import mfusepy
from mfusepy import FuseOSError

from cbt.cli._common import emit_warnings, print_json, say, warn
from cbt.core.errors import CbtError, CbtValueError
from cbt.ops.mount import DiskReader, MountFile, Shared


class MountFs(mfusepy.Operations):  # type: ignore[misc]  # (mfusepy has no types)
    """The FUSE file system (mfusepy's high-level operations): directories from the file
    paths, each file a :class:`~cbt.ops.mount.DiskReader`; read-only."""

    use_ns = True

    def __init__(self, shared: Shared, files: list[MountFile], mountpoint: str,
                 as_json: bool, warnings: list[str]) -> None:
        self.shared, self.files, self.mountpoint = shared, files, mountpoint
        self.as_json, self.warnings = as_json, warnings
        self.mounted = False
        self.readers: dict[str, DiskReader] = {}
        self.dirs: dict[str, list[str]] = {"/": []}
        self.times: dict[str, int] = {}
        for f in files:
            parent = "/"
            for k, name in enumerate(f.parts):
                path = "/" + "/".join(f.parts[:k + 1])
                if path not in self.dirs:  # (a directory already made: a second disk in it)
                    self.dirs[parent].append(name)
                    if k < len(f.parts) - 1:
                        self.dirs[path] = []
                parent = path
            self.readers[path] = f.reader
            self.times[path] = _ns(f.reader.point.created)
        self.started = time.time_ns()

    def init(self, path: str) -> None:
        """Mounted: say so (the line scripts wait for)."""
        self.mounted = True
        emit_warnings(self.warnings)
        if self.as_json:
            print_json({"mountpoint": self.mountpoint,
                        "points": sorted({r.point.id for r in self.readers.values()}),
                        "files": [{"path": os.path.join(self.mountpoint, p[1:]),
                                   "size": r.size} for p, r in self.readers.items()],
                        "cache_bytes": self.shared.cache.limit, "warnings": self.warnings})
        else:
            say(f"mounted {len(self.readers)} disk image(s) read-only at {self.mountpoint}; "
                f"Ctrl-C or 'umount {self.mountpoint}' to stop")
        sys.stdout.flush()

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        ids = {"st_uid": os.getuid(), "st_gid": os.getgid()}
        if path in self.dirs:
            t = self.started
            return {"st_mode": stat.S_IFDIR | 0o555, "st_nlink": 2, "st_size": 0,
                    "st_atime": t, "st_mtime": t, "st_ctime": t, **ids}
        reader = self.readers.get(path)
        if reader is None:
            raise FuseOSError(errno.ENOENT)
        t = self.times[path]
        return {"st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_size": reader.size,
                "st_atime": t, "st_mtime": t, "st_ctime": t, **ids}

    def readdir(self, path: str, fh: int) -> list[str]:
        names = self.dirs.get(path)
        if names is None:
            raise FuseOSError(errno.ENOTDIR if path in self.readers else errno.ENOENT)
        return [".", "..", *names]

    def open(self, path: str, flags: int) -> int:
        if path not in self.readers:
            raise FuseOSError(errno.EISDIR if path in self.dirs else errno.ENOENT)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise FuseOSError(errno.EROFS)
        return 0

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        reader = self.readers.get(path)
        if reader is None:
            raise FuseOSError(errno.ENOENT)
        try:
            return reader.read(offset, size)
        except (CbtError, OSError, ValueError) as exc:
            warn(f"{path[1:]}: read of {size} bytes at {offset} failed: "
                 f"{' '.join(str(exc).split())}")
            raise FuseOSError(errno.EIO) from None

    def statfs(self, path: str) -> dict[str, int]:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_namemax": 255}


def _ns(created: str) -> int:
    from cbt.core.timefmt import parse_now

    try:
        return int(parse_now(created).timestamp()) * 10**9
    except (CbtValueError, AttributeError):
        return 0
