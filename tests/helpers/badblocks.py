"""Real read errors: files on a btrfs whose data checksums no longer match.

:func:`bad_btrfs` mounts a small btrfs (data ``single``, no compression, so a
file's bytes lie as they are in the backing file) on a loop device under the
test's ``tmp_path``.  :meth:`BadFs.corrupt` damages one page of a file there:
it finds the page's bytes in the backing file (they must be unique there:
random data is), flips a byte of them behind the file system's back, and
remounts, so the page cache is empty and the next read of that page fails the
data checksum: ``EIO``, from ``read``/``pread`` and as SIGBUS from a mapping.

Root, losetup, mkfs.btrfs and mount are needed (``system.need``: skipped
without them, a failure in CI).  The mount and the loop device are always
released, also when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from helpers import MIB, PAGE
from helpers.system import _mounted, _unmount, loop_device, need, need_root_tools


class BadFs:
    """A mounted btrfs whose files can be given unreadable pages."""

    def __init__(self, mnt: Path, dev: str, backing: Path) -> None:
        self.mnt = mnt
        self.dev = dev
        self.backing = backing

    def remount(self) -> None:
        """Unmount and mount again: nothing of its files stays cached."""
        _unmount(self.mnt)
        subprocess.run(["mount", self.dev, str(self.mnt)], check=True, capture_output=True)

    def corrupt(self, path: Path, offset: int) -> int:
        """Make the page of ``path`` holding byte ``offset`` unreadable (EIO); returns the
        page's first byte.  Call it with no file of the file system open."""
        page = offset - offset % PAGE
        os.sync()
        with open(path, "rb") as f:
            f.seek(page)
            content = f.read(PAGE)
        assert len(content) == PAGE and content.count(0) < PAGE, "corrupt a full data page"
        where = _find_unique(self.backing, content)
        with open(self.backing, "r+b") as f:
            f.seek(where + 100)
            byte = f.read(1)
            f.seek(where + 100)
            f.write(bytes([byte[0] ^ 0xFF]))
            f.flush()
            os.fsync(f.fileno())
        self.remount()
        return page


def _find_unique(backing: Path, content: bytes) -> int:
    """The one offset of the backing file holding ``content`` (page-aligned)."""
    found = []
    chunk = 64 * MIB
    with open(backing, "rb") as f:
        pos = 0
        while True:
            f.seek(pos)
            data = f.read(chunk)
            if not data:
                break
            at = data.find(content)
            while at >= 0:
                found.append(pos + at)
                at = data.find(content, at + 1)
            pos += chunk  # a page never straddles: chunk is a multiple of the page size
    assert len(found) == 1, f"the page is in the backing file {len(found)} times"
    return found[0]


@contextlib.contextmanager
def bad_btrfs(tmp_path: Path, size: int = 512 * MIB) -> Iterator[BadFs]:
    """A fresh btrfs (data single, metadata dup) on a loop device, mounted; see :class:`BadFs`."""
    need_root_tools("losetup", "mkfs.btrfs", "mount", "umount")
    backing = tmp_path / "bad-btrfs.backing"
    with open(backing, "wb") as f:
        f.truncate(size)
    mnt = tmp_path / "mnt-bad-btrfs"
    mnt.mkdir()
    try:
        with loop_device(backing) as dev:
            r = subprocess.run(["mkfs.btrfs", "-q", "-f", "--data", "single",
                                "--metadata", "dup", dev], capture_output=True, text=True,
                               check=False)
            need(r.returncode == 0, f"mkfs.btrfs failed: {r.stderr.strip()}")
            with _mounted(mnt, dev):
                yield BadFs(mnt, dev, backing)
    finally:
        backing.unlink()


def random_file(path: Path, size: int, seed: int = 7) -> bytes:
    """A file of ``size`` random bytes (every page unique), synced; returns its content."""
    import numpy as np

    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return data
