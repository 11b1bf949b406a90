"""The demo: three days of backups of a two-disk VM, then restore and diff.

1. In a new directory: an encrypted vault, a config, and a VM ``web`` with a
   file-system-like image (``os``) and a database-like file (``db``), whose
   hooks (two small scripts) quiesce and resume the "application".  The
   vault's passphrase comes from ``CBT_PASSWORD_FILE`` or ``CBT_PASSWORD``
   when set; otherwise the demo generates one and writes it to ``password``
   in its directory (mode 0600), and the commands it suggests name that file
   in ``CBT_PASSWORD_FILE``.
2. Day 1: the job runs hooks -> snapshot -> transfer: an application-consistent
   full backup.
3. Day 2: a day of realistic changes (scattered 4 KiB page writes in the
   database, longer runs, a zeroed region, a punched hole, an append); the pre
   hook fails, so the point falls back to crash consistency and says why.
4. Day 3: more changes; the hooks succeed again.
5. Restore the last point and check it bit for bit against the disks; diff
   the points of day 2 and day 3 (metadata only) and check the answer against
   an independent numpy comparison of the disks' day-2 and day-3 contents.
6. Explain: why the config's ``snapshot = "auto"`` chose the provider it did
   (the file system's kind, probed as cbt.source.snapshot probes it), and how
   much room the demo's directory takes (du: allocated blocks, holes free).
"""

from __future__ import annotations

import datetime as _dt
import os
import secrets
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cbt.core.blockio import copy_sparse
from cbt.core.crypto import KdfParams
from cbt.core.errors import CbtValueError
from cbt.core.timefmt import rfc3339
from cbt.format.records import check_point_time
from cbt.jobs.config import Config
from cbt.jobs.config import load as load_config
from cbt.jobs.runner import run as run_jobs
from cbt.ops.diff import PointDiff, PointRef, diff_points
from cbt.ops.restore import RestoreRequest, restore
from cbt.repo.keys import ENV_FILE, Passphrase, passphrase_from_env
from cbt.repo.vault import DEFAULT_ENCRYPTION, Vault
from cbt.source.synth import make_db_file, make_fs_image, mutate

QUIESCE = """\
import os, sys
here = os.path.dirname(os.path.abspath(__file__))
if os.path.exists(os.path.join(here, "refuse")):
    sys.stderr.write("database busy: could not flush within the timeout\\n")
    sys.exit(3)
open(os.path.join(here, "quiesced"), "w").write(os.environ["CBT_POINT"])
"""
RESUME = """\
import os
here = os.path.dirname(os.path.abspath(__file__))
if os.path.exists(os.path.join(here, "quiesced")):
    os.unlink(os.path.join(here, "quiesced"))
"""
CONFIG = """\
vault = "vault"

[policy.daily]
schedule = "daily 02:00"
retention = {{ daily = 7, weekly = 4 }}

[vm.web]
policy = "daily"
disks = {{ os = "disks/os.img", db = "disks/db.img" }}
snapshot = "auto"

[vm.web.hooks]
pre = [{python}, "hooks/quiesce.py"]
post = [{python}, "hooks/resume.py"]
timeout = 30
"""


@dataclass(frozen=True)
class DemoDay:
    """One day's job: its point, the consistency it got, what it cost."""

    day: int
    recovery_point: str
    consistency: str
    consistency_reason: str
    changed_blocks: int
    bytes_new: int
    bytes_stored: int
    snapshots: dict[str, str]  # label -> provider used
    changes: int  # change operations applied to the disks that day
    blocks: int = 0  # the disks' blocks, changed or not
    bytes_read: int = 0  # what the backup read from the disks

    def to_dict(self) -> dict[str, Any]:
        return {"day": self.day, "recovery_point": self.recovery_point,
                "consistency": self.consistency, "consistency_reason": self.consistency_reason,
                "changed_blocks": self.changed_blocks, "blocks": self.blocks,
                "bytes_read": self.bytes_read, "bytes_new": self.bytes_new,
                "bytes_stored": self.bytes_stored, "snapshots": self.snapshots,
                "changes": self.changes}


@dataclass
class DemoReport:
    """What the demo did and whether every check agreed (``cbt demo --json``)."""

    dir: str
    vault: str
    config: str
    days: list[DemoDay]
    restored: str
    restore_bit_identical: bool
    diff: PointDiff  # days 2 -> 3
    diff_truth_changed_blocks: dict[str, int]  # label -> blocks numpy finds changed
    agrees_with_truth: bool  # the restore and the diff both
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    # the vault's passphrase file: the one the demo wrote, or CBT_PASSWORD_FILE's
    # (None: the passphrase came from CBT_PASSWORD)
    password_file: str | None = None
    # why snapshot = "auto" chose the provider it did (step 6)
    snapshot_reason: str = ""
    bytes_on_disk: int = 0  # what the demo's directory takes (du), vault included
    vault_bytes_on_disk: int = 0

    def remove_command(self) -> str:
        """The command that removes everything the demo made."""
        return f"rm -rf -- {shlex.quote(self.dir)}"

    def suggested_commands(self) -> list[str]:
        """Commands to try on the demo's vault (naming the demo's passphrase file)."""
        v, c = shlex.quote(self.vault), shlex.quote(self.config)
        env = (f"{ENV_FILE}={shlex.quote(self.password_file)} " if self.password_file
               else "")
        return [f"{env}cbt list {v}", f"{env}cbt jobs {v}", f"{env}cbt verify --data {v}",
                f"{env}cbt diff {v}::web.latest {v}::{self.days[0].recovery_point}",
                f"cbt config check {c}"]

    def to_dict(self) -> dict[str, Any]:
        return {"dir": self.dir, "vault": self.vault, "config": self.config,
                "password_file": self.password_file,
                "days": [d.to_dict() for d in self.days], "restored": self.restored,
                "restore_bit_identical": self.restore_bit_identical,
                "diff": self.diff.to_dict(),
                "diff_truth_changed_blocks": self.diff_truth_changed_blocks,
                "agrees_with_truth": self.agrees_with_truth, "seconds": self.seconds,
                "snapshot_reason": self.snapshot_reason, "bytes_on_disk": self.bytes_on_disk,
                "vault_bytes_on_disk": self.vault_bytes_on_disk,
                "remove_command": self.remove_command(), "warnings": self.warnings}


def new_demo_dir(directory: str | os.PathLike[str] | None) -> Path:
    """The demo's directory: a fresh one, or ``directory`` if new or empty."""
    if directory is None:
        import tempfile

        return Path(tempfile.mkdtemp(prefix="cbt-demo-"))
    d = Path(directory)
    if d.exists() and (not d.is_dir() or any(d.iterdir())):
        raise CbtValueError(f"demo directory exists and is not empty: {d}")
    d.mkdir(parents=True, exist_ok=True)
    return d


def changed_blocks_truth(a: Path, b: Path, block_size: int) -> np.ndarray:
    """Changed blocks by plain numpy over the whole files (independent of the core)."""
    x = np.fromfile(a, dtype=np.uint8)
    y = np.fromfile(b, dtype=np.uint8)
    short, big = min(len(x), len(y)), max(len(x), len(y))
    n = -(-big // block_size)
    full = short // block_size
    out = np.ones(n, dtype=np.uint8)
    same = (x[: full * block_size] == y[: full * block_size]).reshape(full, block_size).all(1)
    out[:full] = ~same
    if len(x) == len(y) and full < n:
        out[full] = int(not np.array_equal(x[full * block_size:], y[full * block_size:]))
    return out


def run_demo(directory: str | os.PathLike[str] | None = None,
             size: int = 128 << 20, now: _dt.datetime | None = None,
             kdf: KdfParams | None = None) -> DemoReport:
    """Run the demo; with ``now``, day d's point is created at ``now + (d - 1)`` days.
    ``kdf``: the scrypt costs of the vault's key (default :class:`KdfParams`)."""
    started = time.perf_counter()
    times = _day_times(now)  # before anything is made
    d = new_demo_dir(directory)
    passphrase, password_file = _passphrase(d)
    config = _set_up(d, size, passphrase, kdf)
    disks = {"os": d / "disks" / "os.img", "db": d / "disks" / "db.img"}
    day2_copies = {"os": d / "day2-os.img", "db": d / "day2-db.img"}
    days: list[DemoDay] = []
    for day in (1, 2, 3):
        days.append(_run_day(d, config, day, size, disks, times[day - 1], passphrase))
        if day == 2:
            for label, path in disks.items():
                copy_sparse(path, day2_copies[label])
    report = _check(d, disks, day2_copies, days, passphrase)
    report.password_file = password_file
    report.snapshot_reason = auto_reason(days[0].snapshots, disks)
    report.bytes_on_disk, report.vault_bytes_on_disk = disk_usage(d), disk_usage(d / "vault")
    report.seconds = round(time.perf_counter() - started, 3)
    return report


def _day_times(now: _dt.datetime | None) -> list[str | None]:
    """The creation times of days 1, 2 and 3 (None: the clock's); each one a point may
    carry (:func:`check_point_time`), else CbtValueError."""
    if now is None:
        return [None, None, None]
    try:
        return [check_point_time(rfc3339(now + _dt.timedelta(days=k))) for k in range(3)]
    except OverflowError:
        raise CbtValueError(f"demo day 3 ({rfc3339(now)} + 2 days) is past 9999-12-31: "
                            "a point's time must be from 1970 to 9999") from None


def _passphrase(d: Path) -> tuple[Passphrase | None, str | None]:
    """Step 1: the vault's passphrase (None: the environment's) and the file the demo
    wrote it to (None when it came from the environment)."""
    if passphrase_from_env() is not None:
        return None, os.environ.get(ENV_FILE) or None
    secret = secrets.token_urlsafe(24)
    path = d / "password"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with open(fd, "w") as f:
        f.write(secret + "\n")
    os.chmod(path, 0o600)  # whatever the umask
    return secret, str(path)


def _set_up(d: Path, size: int, passphrase: Passphrase | None,
            kdf: KdfParams | None) -> Config:
    """Step 1: the vault, the config, the hook scripts and the two disks."""
    (d / "disks").mkdir()
    (d / "hooks").mkdir()
    (d / "hooks" / "quiesce.py").write_text(QUIESCE)
    (d / "hooks" / "resume.py").write_text(RESUME)
    (d / "cbt.toml").write_text(CONFIG.format(python=f'"{sys.executable}"'))
    Vault.init(d / "vault", DEFAULT_ENCRYPTION, passphrase, kdf)
    make_fs_image(d / "disks" / "os.img", size, seed=1)
    make_db_file(d / "disks" / "db.img", size // 2, seed=2)
    return load_config(d / "cbt.toml")


def _run_day(d: Path, config: Config, day: int, size: int, disks: dict[str, Path],
             created: str | None, passphrase: Passphrase | None) -> DemoDay:
    """Steps 2 to 4: the day's changes, whether the pre hook refuses, the job."""
    changes = []
    if day > 1:
        changes += mutate(disks["os"], seed=10 + day, page_writes=50, runs=4,
                          resize=(64 << 10) + 1000 if day == 2 else 0)
        changes += mutate(disks["db"], seed=20 + day, page_writes=size // 2 // 4096 // 100,
                          runs=0, zero_runs=1, holes=1)
    refuse = d / "hooks" / "refuse"
    if day == 2:
        refuse.write_text("the database will not quiesce today\n")
    elif refuse.exists():
        refuse.unlink()
    (result,) = run_jobs(config, "web", created=created, passphrase=passphrase)
    if result.point is None:
        raise CbtValueError(f"demo backup of day {day} failed: {result.error}")
    p = result.point
    return DemoDay(day, p.id, p.consistency, p.consistency_reason,
                   sum(x.changed_blocks for x in p.disks), p.bytes_new, p.bytes_stored,
                   result.snapshots, len(changes), sum(x.blocks for x in p.disks),
                   sum(x.bytes_read for x in p.disks))


def auto_reason(providers: dict[str, str], disks: dict[str, Path]) -> str:
    """Step 6: why ``auto`` chose ``providers`` for these disks, in words (its rule:
    cbt.source.snapshot's docstring; the same probes)."""
    from cbt.source.snapshot import btrfs_subvolume

    where = disks[next(iter(disks))].parent
    kind = _fs_kind(where)
    chosen = set(providers.values())
    if chosen == {"btrfs"}:
        return (f"every disk lies in one btrfs subvolume ({btrfs_subvolume(str(where))}): "
                "one read-only snapshot of it holds all the disks at a single moment")
    if chosen == {"reflink"}:
        return (f"the file system of {where} ({kind}) clones files (reflink): each disk is "
                "cloned in an instant and read from the clone while the VM goes on")
    if chosen == {"none"}:
        return (f"the file system of {where} ({kind}) can neither snapshot nor clone a "
                "file, and auto never makes a full copy (as slow as reading the disk): the "
                "disks are read live while the hooks keep the application quiesced")
    return f"per disk, as each disk's file system allows ({kind} at {where})"


def _fs_kind(path: Path) -> str:
    """The type of the file system holding ``path`` as mounted (``ext4``, ``xfs``,
    ``tmpfs``): the /proc/self/mountinfo line of its device, else of the longest mount
    point above it (a btrfs subvolume's own device is in no line); ``stat -f`` only where
    there is no mountinfo (it says ``ext2/ext3`` of an ext4)."""
    import subprocess

    try:
        st, real = os.stat(path), os.path.realpath(path)
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            lines = [line.split() for line in f]
    except OSError:
        lines, st, real = [], None, str(path)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}" if st is not None else ""
    best: tuple[int, str] | None = None
    for fields in lines:
        if "-" not in fields[6:] or len(fields) < 5:
            continue
        fstype = fields[fields.index("-", 6) + 1]
        if fields[2] == dev:
            return fstype
        mount = fields[4].replace("\\040", " ")
        if (real == mount or real.startswith(mount.rstrip("/") + "/")) and \
                (best is None or len(mount) > best[0]):
            best = (len(mount), fstype)
    if best is not None:
        return best[1]
    try:
        return subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True,
                              text=True, check=True).stdout.strip() or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def disk_usage(root: Path) -> int:
    """Bytes ``root`` takes on disk, as du counts them (allocated blocks: holes are free;
    a file linked twice counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            st = os.lstat(os.path.join(folder, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total + os.lstat(root).st_blocks * 512


def _check(d: Path, disks: dict[str, Path], day2_copies: dict[str, Path],
           days: list[DemoDay], passphrase: Passphrase | None) -> DemoReport:
    """Step 5: restore the last point and compare; diff days 2 and 3 against numpy."""
    points = [x.recovery_point for x in days]
    vault = Vault.open(d / "vault", passphrase)
    restored = d / "restored"
    restore(vault, RestoreRequest(points[-1], restored))
    restore_ok = all(np.array_equal(np.fromfile(restored / f"{label}.img", np.uint8),
                                    np.fromfile(path, np.uint8))
                     for label, path in disks.items())
    pd = diff_points(PointRef(vault, vault.point(points[1])),
                     PointRef(vault, vault.point(points[2])))
    truth = {label: int(changed_blocks_truth(day2_copies[label], disks[label],
                                             cs.block_size).sum())
             for label, _, cs in pd.disks}
    agrees = all(cs.changed_blocks == truth[label] for label, _, cs in pd.disks)
    return DemoReport(str(d), str(d / "vault"), str(d / "cbt.toml"), days, str(restored),
                      restore_ok, pd, truth, bool(agrees and restore_ok))
