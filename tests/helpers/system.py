"""What the machine offers the tests: root, tools, loop devices, mounts, reflink.

A test that needs what the machine lacks skips (``need``); in CI (``CI=true``)
it fails instead, so CI cannot pass by skipping.  Loop devices and mounts are
always released in ``finally``, and every mount point lies under the test's
``tmp_path``, so nothing outlives the test.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import MIB

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(condition: bool, why: str) -> None:
    """Skip when the machine can't run a test; in CI (CI=true) fail instead."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI must be able to run this test: {why}")
    pytest.skip(why)


def need_root_tools(*tools: str) -> None:
    need(os.geteuid() == 0, "needs root (loop devices, mkfs, mount)")
    for tool in tools:
        need(shutil.which(tool) is not None,
             f"needs {tool} (apt-get install it; ci/system-deps.sh does)")


# -- loop devices and mounts -------------------------------------------------------------


@contextlib.contextmanager
def loop_device(backing: Path) -> Iterator[str]:
    """Attach ``backing`` to a free loop device; always detached afterwards."""
    need_root_tools("losetup")
    r = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True,
                       text=True, check=False)
    need(r.returncode == 0, f"losetup cannot attach a loop device: {r.stderr.strip()}")
    dev = r.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)


def _unmount(mnt: Path) -> None:
    """Unmount, retrying while a process that just exited still holds a file there."""
    for _ in range(50):
        if subprocess.run(["umount", str(mnt)], capture_output=True,
                          check=False).returncode == 0:
            return
        time.sleep(0.1)
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


@contextlib.contextmanager
def _mounted(mnt: Path, *source: str) -> Iterator[Path]:
    """``mount SOURCE... MNT`` (skipped where it cannot), always unmounted afterwards."""
    r = subprocess.run(["mount", *source, str(mnt)], capture_output=True, text=True,
                       check=False)
    need(r.returncode == 0, f"cannot mount {source[-1]} on {mnt}: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        _unmount(mnt)


@contextlib.contextmanager
def tmpfs(mnt: Path, size_mib: int) -> Iterator[Path]:
    """A tmpfs of ``size_mib`` MiB mounted on the new folder ``mnt`` (root)."""
    need_root_tools("mount", "umount")
    mnt.mkdir()
    with _mounted(mnt, "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs"):
        yield mnt


@contextlib.contextmanager
def loop_fs(tmp_path: Path, kind: str, size: int = 512 * MIB) -> Iterator[Path]:
    """A fresh ``ext4``, XFS (reflink) or btrfs on a sparse file through a loop device, mounted.

    mkfs.xfs refuses file systems under 300 MB, hence the sparse 512 MiB default.
    """
    mkfs = {"ext4": "mkfs.ext4", "xfs": "mkfs.xfs", "btrfs": "mkfs.btrfs"}[kind]
    need_root_tools("losetup", mkfs, "mount", "umount", *(["btrfs"] if kind == "btrfs" else []))
    backing = tmp_path / f"{kind}.backing"
    with open(backing, "wb") as f:
        f.truncate(size)
    mnt = tmp_path / f"mnt-{kind}"
    mnt.mkdir()
    try:
        with loop_device(backing) as dev:
            args = {"ext4": [mkfs, "-q", "-F", dev],
                    "xfs": [mkfs, "-q", "-f", "-m", "reflink=1", dev],
                    "btrfs": [mkfs, "-q", "-f", dev]}[kind]
            subprocess.run(args, check=True, capture_output=True)
            with _mounted(mnt, dev):
                yield mnt
    finally:
        backing.unlink()


@contextlib.contextmanager
def loop_xfs(tmp_path: Path, size: int = 512 * MIB) -> Iterator[Path]:
    """A fresh XFS with reflink, mounted (root)."""
    with loop_fs(tmp_path, "xfs", size) as mnt:
        yield mnt


@contextlib.contextmanager
def small_fs(kind: str, size_mib: int, where: Path) -> Iterator[Path]:
    """A small mounted file system: ``ext4`` on a loop device, or ``tmpfs``."""
    if kind == "tmpfs":
        with tmpfs(where / "mnt-tmpfs", size_mib) as mnt:
            yield mnt
        return
    with loop_fs(where, kind, size_mib * MIB) as mnt:
        yield mnt


def free_bytes(path: Path) -> int:
    s = os.statvfs(path)
    return s.f_bavail * s.f_frsize


def fill(path: Path, leave: int) -> int:
    """A ballast file taking all but ``leave`` bytes of the file system; returns its size."""
    size = free_bytes(path.parent) - leave
    assert size > 0, (free_bytes(path.parent), leave)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.posix_fallocate(fd, 0, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    return size


# -- reflink and btrfs ---------------------------------------------------------------------


def can_reflink(directory: Path) -> bool:
    """Does ``cp --reflink=always`` work here (independent of cbt's own probe)?"""
    src, dst = directory / ".reflink-src", directory / ".reflink-dst"
    src.write_bytes(b"x" * 4096)
    try:
        r = subprocess.run(["cp", "--reflink=always", str(src), str(dst)], capture_output=True,
                           check=False)
        return r.returncode == 0
    finally:
        src.unlink()
        with contextlib.suppress(FileNotFoundError):
            dst.unlink()


@contextlib.contextmanager
def no_clone_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder on a file system that cannot clone files.

    ``tmp_path`` itself where it cannot; otherwise (a /tmp on XFS or btrfs) a small
    tmpfs mounted for the test (root), so the test still runs instead of skipping.
    """
    if not can_reflink(tmp_path):
        yield tmp_path
        return
    need(os.geteuid() == 0 and shutil.which("mount") is not None,
         "tmp_path clones files and mounting a tmpfs without clones needs root")
    with tmpfs(tmp_path / "noclone", 256) as mnt:
        assert not can_reflink(mnt)
        yield mnt


def is_subvolume(path: Path) -> bool:
    return path.is_dir() and path.stat().st_ino == 256


def is_readonly_subvolume(path: Path) -> bool:
    r = subprocess.run(["btrfs", "property", "get", "-ts", str(path), "ro"],
                       capture_output=True, text=True, check=False)
    return r.returncode == 0 and r.stdout.strip() == "ro=true"
