"""Snapshot providers: a point-in-time, read-only view of each disk of a VM.

- ``reflink``: FICLONE clone of an image file (XFS, btrfs): instant, shares
  blocks until the disk is written.  Disks are cloned one after another.
- ``btrfs``: one read-only snapshot of the subvolume holding all the VM's
  disks: a single moment for every disk.
- ``copy``: a full sparse copy, for file systems with neither (slow; says so).
- ``none``: read the live disk (consistency then comes from the hooks, which
  keep the application quiesced through the transfer, else ``live read``).
- ``auto``: ``btrfs`` when every disk lies in one btrfs subvolume, else
  ``reflink`` per disk where the file system clones, else ``none``.  Not
  ``copy``: a copy of a live disk takes as long as a read of it, so it buys no
  consistency that a live read with hooks does not, at twice the I/O.

A :class:`SnapshotSet` is what a job reads: :meth:`SnapshotSet.disk` names
each disk with the snapshot to read it from, :meth:`SnapshotSet.source` opens
that as a block source (live where the provider is ``none``).

``reflink`` and ``btrfs`` keep the last snapshot of each disk as its *tracking
base* (``<label>.base.img``, or the subvolume ``<vm>.base``, beside the
snapshots): :meth:`SnapshotSet.settle` makes it, once every disk is read and
before the point is committed, and returns what identifies it; the point records
that, and :meth:`SnapshotSet.changes` at the next run compares the new snapshot
with the base only while the base is still the one recorded (``cbt.source.track``).
Everything else is removed when the job ends.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from cbt.core.blockio import copy_sparse
from cbt.core.durable import fsync_dir, fsync_file
from cbt.core.errors import CbtError
from cbt.source.changes import ChangeHint, TrackingBase
from cbt.source.disks import DiskSpec
from cbt.source.image import ImageSource, open_image
from cbt.source.track import changed_ranges, identify

FICLONE = 0x40049409
BTRFS_SUPER_MAGIC = 0x9123683E
BTRFS_SUBVOL_INODE = 256
SNAPSHOT_DIR = ".cbt-snapshots"


class SnapshotError(CbtError, OSError):
    """A snapshot could not be taken or removed."""


def reflink(src: str, dst: str) -> None:
    """Clone ``src`` to a new file ``dst`` (FICLONE); OSError where unsupported."""
    with open(src, "rb") as fi:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.ioctl(fd, FICLONE, fi.fileno())
        except OSError:
            os.close(fd)
            os.unlink(dst)
            raise
        os.close(fd)


def _is_btrfs(path: str) -> bool:
    try:
        out = subprocess.run(["stat", "-f", "-c", "%t", path], capture_output=True, text=True,
                             check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return False
    return int(out, 16) == BTRFS_SUPER_MAGIC


def btrfs_subvolume(path: str) -> str | None:
    """The root of the btrfs subvolume holding ``path`` (None off btrfs); a symbolic
    link is followed: the subvolume is the one holding the image itself."""
    p = Path(os.path.realpath(path))
    if not _is_btrfs(str(p)):
        return None
    d = p.parent if not p.is_dir() else p
    dev = os.stat(d).st_dev
    while True:
        st = os.stat(d)
        if st.st_ino == BTRFS_SUBVOL_INODE:
            return str(d)
        if d.parent == d or os.stat(d.parent).st_dev != dev:
            return str(d)
        d = d.parent


def _can_reflink(path: str, snap_dir: Path) -> bool:
    snap_dir.mkdir(parents=True, exist_ok=True)
    probe = snap_dir / f".probe-{os.getpid()}"
    try:
        reflink(path, str(probe))
    except OSError:
        return False
    with contextlib.suppress(FileNotFoundError):
        probe.unlink()
    return True


def snapshot_dir_for(disk: str, vm: str, configured: str | None) -> Path:
    """Where a VM's snapshots of ``disk`` go: the configured folder, else beside the
    image (a link followed: a clone can only be made on the image's file system)."""
    base = (Path(configured) if configured else
            Path(os.path.realpath(disk)).parent / SNAPSHOT_DIR)
    return base / vm


def resolve_provider(requested: str, vm: str, disks: dict[str, str],
                     snapshot_dir: str | None) -> dict[str, str]:
    """The provider each disk will use (``auto`` resolved by probing)."""
    if requested != "auto":
        return dict.fromkeys(disks, requested)
    subvols = {btrfs_subvolume(p) for p in disks.values()}
    if len(subvols) == 1 and None not in subvols:
        return dict.fromkeys(disks, "btrfs")
    out = {}
    for label, path in disks.items():
        ok = os.path.isfile(path) and _can_reflink(path, snapshot_dir_for(path, vm,
                                                                          snapshot_dir))
        out[label] = "reflink" if ok else "none"
    return out


@dataclass
class SnapshotSet:
    """The snapshots of one job: what to read for each disk, and how to clean up."""

    vm: str
    job: str
    providers: dict[str, str]
    read_paths: dict[str, str]
    created: list[str] = field(default_factory=list)  # files or subvolumes to remove
    bases: dict[str, tuple[str, str]] = field(default_factory=dict)  # label -> (snap, base)
    warnings: list[str] = field(default_factory=list)
    settled: dict[str, TrackingBase] | None = None  # what settle() made, once it ran

    @property
    def one_moment(self) -> bool:
        """All disks captured at one instant (a single btrfs snapshot, or a single disk)."""
        kinds = set(self.providers.values())
        return (len(self.providers) == 1 and kinds != {"none"}) or kinds == {"btrfs"}

    @property
    def live(self) -> bool:
        return "none" in self.providers.values()

    def disk(self, label: str, path: str) -> DiskSpec:
        """Disk ``label`` (at ``path``) as the backup reads it: from its snapshot."""
        return DiskSpec(label, path, read_from=self.read_paths[label])

    def source(self, label: str, path: str) -> ImageSource:
        """Disk ``label``'s snapshot opened as a block source (live for provider ``none``)."""
        return open_image(self.read_paths[label], live=self.disk(label, path).live)

    def changes(self, label: str, block_size: int, size: int,
                recorded: TrackingBase | None) -> ChangeHint:
        """What changed in disk ``label`` (``size`` bytes now, in blocks of ``block_size``)
        since the point whose tracking base ``recorded`` identifies (None: none recorded).
        A hash scan, with the reason, wherever the base cannot be trusted:

        - ``no tracking base``: nothing recorded, or no base on disk;
        - ``base replaced``: another file (or subvolume) than the one recorded;
        - ``base changed``: the recorded file, rewritten since (size or times differ);
        - ``disk resized``: the disk's size is no longer the base's;
        - the error, where the file system cannot map either file.

        Otherwise ``fiemap``: the blocks whose extents the new snapshot does not share
        with the base (for ``btrfs`` too: measured faster than ``btrfs send --no-data``).
        Providers without a base (``copy``, ``none``): a hash scan, no reason."""
        if label not in self.bases:
            return ChangeHint.hash(None)
        base_file, subvolume = self._base_file(label)
        if recorded is None or not os.path.lexists(base_file):
            return ChangeHint.hash("no tracking base")
        try:
            now = identify(base_file, subvolume)
        except OSError as exc:
            return ChangeHint.hash(_short(f"tracking base unusable: {_words(exc)}"))
        reason = base_mismatch(recorded, now)
        if reason is not None:
            return ChangeHint.hash(reason)
        if now.size != size:
            return ChangeHint.hash("disk resized")
        try:
            ranges = changed_ranges(base_file, self.read_paths[label], block_size)
            again = identify(base_file, subvolume)  # not swapped while it was mapped
        except OSError as exc:
            return ChangeHint.hash(_short(_words(exc)))
        if again != now:
            return ChangeHint.hash("base changed")
        return ChangeHint("fiemap", tuple(ranges))

    def _base_file(self, label: str) -> tuple[str, str | None]:
        """Disk ``label``'s tracking base file, and its subvolume (btrfs; else None)."""
        snap, base = self.bases[label]
        if self.providers[label] != "btrfs":
            return base, None
        return os.path.join(base, os.path.relpath(self.read_paths[label], snap)), base

    def settle(self, keep: bool = False) -> dict[str, TrackingBase]:
        """Once every disk is read, before the point's commit: make each snapshot its
        disk's tracking base, durably; label -> its identity, which the point records.

        Without ``keep`` the snapshot is renamed to the base.  With ``keep`` (instant
        restore) the snapshot stays and the base is a second, free reference to it: a
        FICLONE clone (its own inode: removing the kept snapshot later leaves the base's
        identity alone), or a read-only btrfs snapshot of the snapshot.  A crash at any
        step leaves the base of the last committed point, or none, or one whose identity
        is not the recorded one: the next run hashes."""
        if self.settled is not None:
            return dict(self.settled)
        done = set()
        for snap, base in self.bases.values():
            if snap in done:
                continue
            done.add(snap)
            _make_base(snap, base, keep, self.job)
        self.settled = {}
        for label in self.bases:
            base_file, subvolume = self._base_file(label)
            self.settled[label] = identify(base_file, subvolume)
        return dict(self.settled)

    def commit(self, keep: bool = False) -> dict[str, str]:
        """After the point is committed: keep tracking bases (:meth:`settle`, unless it
        ran), remove the rest.

        With ``keep`` (instant restore) every snapshot stays where it is, beside its
        tracking base; returns label -> kept path.
        """
        self.settle(keep)
        if keep:
            return {label: self.read_paths[label] for label, p in self.providers.items()
                    if p != "none"}
        moved = {snap for snap, _ in self.bases.values()}
        for path in self.created:
            if path not in moved:
                remove_snapshot(path)
        return {}

    def discard(self) -> None:
        """After a failed or aborted job: remove every snapshot it took."""
        for path in self.created:
            remove_snapshot(path)


def base_mismatch(recorded: TrackingBase, now: TrackingBase) -> str | None:
    """Why the base found (``now``) is not the one a point recorded (None: it is)."""
    if (recorded.kind, recorded.dev, recorded.ino, recorded.subvolume_uuid) != (
            now.kind, now.dev, now.ino, now.subvolume_uuid):
        return "base replaced"
    if (recorded.size, recorded.ctime_ns, recorded.mtime_ns) != (
            now.size, now.ctime_ns, now.mtime_ns):
        return "base changed"
    return None


def _words(exc: OSError) -> str:
    """An error as a reason reads in ``show``: its words and file, no ``[Errno N]``."""
    if not exc.strerror:
        return str(exc)
    return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


def _make_base(snap: str, base: str, keep: bool, job: str) -> None:
    """Make snapshot ``snap`` (a file, or a btrfs subvolume) the tracking base ``base``,
    durably (see :meth:`SnapshotSet.settle`); a clone is made under a temporary name
    carrying the job's id, so that ``recover`` removes it after a crash."""
    parent = os.path.dirname(base)
    if os.path.isdir(snap):
        remove_snapshot(base)
        if keep:
            r = subprocess.run(["btrfs", "subvolume", "snapshot", "-r", snap, base],
                               capture_output=True, text=True, check=False)
            if r.returncode != 0:
                raise SnapshotError(errno.EIO, f"btrfs snapshot of {snap} failed: "
                                    f"{r.stderr.strip() or r.returncode}")
        else:
            os.rename(snap, base)
        fsync_dir(parent)
        return
    source = snap
    if keep:
        source = os.path.join(parent, f".{os.path.basename(base)}.{job}.tmp")
        remove_snapshot(source)
        reflink(snap, source)
        os.chmod(source, stat.S_IMODE(os.lstat(snap).st_mode))
    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fsync_file(fd)  # (a rename keeps the inode: this is the base's fsync too)
    finally:
        os.close(fd)
    os.rename(source, base)
    fsync_dir(parent)


_NAME = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"


def is_snapshot_path(path: object, vm: str) -> bool:
    """Whether a path read from a vault's registry (untrusted) names a snapshot a job of
    ``vm`` took: absolute and normal, in a folder ``<vm>`` or ``.cbt-snapshots``, named
    ``<label>.<job id>.img`` (``<vm>.<job id>`` for btrfs), the job id
    ``<vm>.<time>.<hex>``; not a tracking base nor a hidden file.  cbt removes or
    reads nothing else a registry names."""
    if not isinstance(path, str) or not os.path.isabs(path) or os.path.normpath(path) != path:
        return False
    if not isinstance(vm, str) or not re.fullmatch(_NAME, vm):
        return False
    parent, base = os.path.split(path)
    if os.path.basename(parent) not in (vm, SNAPSHOT_DIR) or ".base" in base:
        return False
    job = rf"{re.escape(vm)}\.[0-9]{{8}}T[0-9]{{6}}Z\.[0-9a-f]+"
    return re.fullmatch(rf"{_NAME}\.{job}(?:\.img)?", base) is not None


def is_snapshot_file(path: object, vm: str) -> bool:
    """Whether a registry's disk path lies in a snapshot of ``vm`` (the snapshot file itself,
    or a file inside a btrfs snapshot subvolume) and is a regular file, not a link."""
    if not isinstance(path, str) or not os.path.isabs(path) or os.path.normpath(path) != path:
        return False
    here = path
    while here != os.path.dirname(here):
        if is_snapshot_path(here, vm):
            break
        here = os.path.dirname(here)
    else:
        return False
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def remove_snapshot(path: str) -> None:
    """Remove a snapshot file, or a (btrfs subvolume) directory.  A symbolic link is
    removed itself, never followed (to a subvolume it would delete, or a folder)."""
    p = Path(path)
    try:
        st = p.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        if st.st_ino == BTRFS_SUBVOL_INODE and shutil.which("btrfs"):
            subprocess.run(["btrfs", "subvolume", "delete", str(p)], capture_output=True,
                           check=False)
        if p.exists():
            shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def take(vm: str, job: str, disks: dict[str, str], providers: dict[str, str],
         snapshot_dir: str | None) -> SnapshotSet:
    """Snapshot every disk; on any failure the ones already taken are removed."""
    snaps = SnapshotSet(vm, job, dict(providers), {})
    try:
        btrfs_labels = [lb for lb, p in providers.items() if p == "btrfs"]
        if btrfs_labels:
            _take_btrfs(snaps, {lb: disks[lb] for lb in btrfs_labels}, snapshot_dir)
        for label, path in disks.items():
            provider = providers[label]
            if provider == "btrfs":
                continue
            if provider == "none":
                snaps.read_paths[label] = path
                continue
            d = snapshot_dir_for(path, vm, snapshot_dir)
            d.mkdir(parents=True, exist_ok=True)
            dst = d / f"{label}.{job}.img"
            mode = stat.S_IMODE(os.stat(path).st_mode)  # the snapshot keeps the disk's mode
            if provider == "reflink":
                try:
                    reflink(path, str(dst))
                except OSError as exc:
                    raise SnapshotError(exc.errno, f"reflink snapshot of {path} failed: "
                                        f"{exc.strerror} (snapshot = \"reflink\" needs XFS or "
                                        "btrfs; try \"auto\")") from None
                snaps.bases[label] = (str(dst), str(d / f"{label}.base.img"))
            else:  # copy
                try:
                    # made 0600 first: never readable by more than the disk, even briefly
                    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
                    os.fchmod(fd, 0o600)
                    os.close(fd)
                    snaps.created.append(str(dst))
                    copy_sparse(path, dst)
                except OSError as exc:
                    raise SnapshotError(exc.errno, f"copy snapshot of {path} failed: "
                                        f"{exc.strerror}") from None
                snaps.warnings.append(f"disk {label}: copy snapshot of "
                                      f"{os.path.getsize(path)} bytes (slow: every byte is "
                                      "copied; use XFS or btrfs for reflink snapshots)")
            if str(dst) not in snaps.created:
                snaps.created.append(str(dst))
            os.chmod(dst, mode)
            snaps.read_paths[label] = str(dst)
    except BaseException:
        snaps.discard()
        raise
    return snaps


def _take_btrfs(snaps: SnapshotSet, disks: dict[str, str], snapshot_dir: str | None) -> None:
    subvols = {btrfs_subvolume(p) for p in disks.values()}
    if len(subvols) != 1 or None in subvols:
        raise SnapshotError(errno.EINVAL, "snapshot = \"btrfs\" needs every disk of the VM in "
                            "one btrfs subvolume")
    subvol = str(subvols.pop())
    where = Path(snapshot_dir) / snaps.vm if snapshot_dir else Path(subvol) / SNAPSHOT_DIR
    where.mkdir(parents=True, exist_ok=True)
    dst = where / f"{snaps.vm}.{snaps.job}"
    r = subprocess.run(["btrfs", "subvolume", "snapshot", "-r", subvol, str(dst)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SnapshotError(errno.EIO, f"btrfs snapshot of {subvol} failed: "
                            f"{r.stderr.strip() or r.returncode}")
    snaps.created.append(str(dst))
    for label, path in disks.items():
        # the image itself, not a link to it: in the snapshot, a link (an absolute one
        # leads back to the live disk) is neither a snapshot to read nor a base to identify
        snaps.read_paths[label] = str(dst / os.path.relpath(os.path.realpath(path), subvol))
        snaps.bases[label] = (str(dst), str(where / f"{snaps.vm}.base"))
