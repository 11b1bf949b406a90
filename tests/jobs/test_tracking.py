"""Change tracking through jobs (``backup --config``) on real XFS (reflink) and btrfs:
a tracked incremental reads less than the disk, says ``fiemap``, and restores bit for
bit; ``change_tracking = "hash"`` scans; kills at every durable step of a job never
leave a base that loses a change.

Truth: copies of the disks at each backup, restored points compared byte for byte.
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import MIB
from helpers.cli import cbt_json, crash_env, start_cbt
from helpers.images import assert_same_disk
from helpers.jobs import backup_config, job_config, write_config
from helpers.system import loop_fs
from helpers.tracking import btrfs, make_tracked_disk, mutate
from helpers.vaults import init_cli_vault

BS = 16 * 1024
SIZE = 8 * MIB + 5000


class Site:
    def __init__(self, kind: str, mnt: Path, root: Path, encrypted: bool = False,
                 **vm: Any) -> None:
        self.kind, self.root = kind, root
        d = mnt / "vm"
        if kind == "btrfs":
            btrfs("subvolume", "create", str(d))
        else:
            d.mkdir()
        self.disk = make_tracked_disk(d / "os.img", SIZE, 3, ((MIB, MIB),))
        self.vault = root / "vault"
        self.env = init_cli_vault(self.vault, encrypted, root)
        self.cfg = job_config(root / "cbt.toml", {"web": {
            "disks": {"os": str(self.disk)}, "block_size": "16K",
            "snapshot": "btrfs" if kind == "btrfs" else "reflink", **vm}},
            vault=str(self.vault))
        self.n = 0

    def point(self) -> tuple[dict[str, Any], Path]:
        """One job; its point line and a copy of the disk as it was backed up."""
        self.n += 1
        copy = self.root / f"copy{self.n}.img"
        shutil.copyfile(self.disk, copy)
        r, lines = backup_config(self.cfg, env=self.env, timeout=300)
        assert r.returncode == 0 and lines[0]["type"] == "point", (r.stdout, r.stderr)
        return lines[0], copy

    def restores(self, line: dict[str, Any], copy: Path) -> None:
        out = self.root / f"out-{line['recovery_point']}"
        cbt_json("restore", self.vault, line["recovery_point"], "--to", out, env=self.env)
        assert_same_disk(out / "os.img", copy, BS)
        shutil.rmtree(out)


def _clear_btrfs(mnt: Path) -> None:
    for sv in sorted(mnt.rglob("*"), key=lambda p: -len(p.parts)):
        if sv.is_dir() and sv.stat().st_ino == 256:
            btrfs("subvolume", "delete", str(sv))


@pytest.mark.root
@pytest.mark.parametrize(("kind", "encrypted"), [("xfs", True), ("btrfs", False)])
def test_an_incremental_reads_only_what_changed(tmp_path: Path, kind: str,
                                                encrypted: bool) -> None:
    with loop_fs(tmp_path, kind) as mnt:
        try:
            site = Site(kind, mnt, tmp_path, encrypted)
            first, copy = site.point()
            assert first["disks"][0]["change_source"] == "hash"
            # the first point of a disk has nothing to compare with (the backup side says
            # whether that is a fallback)
            assert first["disks"][0]["change_source_reason"] in (None, "no tracking base")
            for seed in (1, 2):
                mutate(site.disk, seed)
                line, copy = site.point()
                disk = line["disks"][0]
                assert disk["change_source"] == "fiemap", disk
                assert disk["change_source_reason"] is None
                assert disk["bytes_read"] < SIZE // 4, disk
                site.restores(line, copy)
        finally:
            if kind == "btrfs":
                _clear_btrfs(mnt)


@pytest.mark.root
def test_change_tracking_hash_scans(tmp_path: Path) -> None:
    with loop_fs(tmp_path, "xfs") as mnt:
        site = Site("xfs", mnt, tmp_path, change_tracking="hash")
        site.point()
        mutate(site.disk, 1)
        line, copy = site.point()
        assert line["disks"][0]["change_source"] == "hash"
        # why, in the words of the config (no --full-scan was given)
        assert line["disks"][0]["change_source_reason"] == 'change_tracking = "hash"'
        assert line["disks"][0]["bytes_read"] >= SIZE - MIB  # all but the hole
        site.restores(line, copy)


def _count_steps(site: Site) -> int:
    counter = site.root / "steps"
    counter.write_text("0")
    env = {**(site.env or {}), "CBT_CRASH_AT": str(10**9), "CBT_CRASH_COUNTER": str(counter)}
    r, _ = backup_config(site.cfg, env=env)
    assert r.returncode == 0, r.stderr
    return int(counter.read_text())


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["xfs", "btrfs"])
def test_kills_at_every_durable_step_lose_no_change(tmp_path: Path, kind: str) -> None:
    """SIGKILL a job at each of its durable steps (between its snapshot and its commit,
    among others: the base is made then); the next job's point restores to the disk as
    it was.  A base trusted wrongly would lose the changes the killed job saw."""
    _kill_sweep(tmp_path, kind, Site)


def _kill_sweep(tmp_path: Path, kind: str, make: Callable[[str, Path, Path], Site]) -> None:
    """Kill a job of the site at each durable step, change the disk, check the next point."""
    with loop_fs(tmp_path, kind) as mnt:
        try:
            site = make(kind, mnt, tmp_path)
            site.point()
            steps = _count_steps(site)
            assert steps > 3
            for step in range(1, steps + 1):
                mutate(site.disk, 100 + step, writes=10, punches=1)
                proc = start_cbt("backup", "--config", site.cfg, "--json",
                                 env={**(site.env or {}), **crash_env(step, tmp_path)})
                proc.communicate(timeout=120)
                assert proc.returncode == -signal.SIGKILL, (step, proc.returncode)
                mutate(site.disk, 200 + step, writes=3, punches=0)
                line, copy = site.point()
                site.restores(line, copy)
                copy.unlink()
        finally:
            if kind == "btrfs":
                _clear_btrfs(mnt)


class KeptSite(Site):
    """A site whose policy keeps every snapshot (instant restore), its vault encrypted."""

    def __init__(self, kind: str, mnt: Path, root: Path) -> None:
        super().__init__(kind, mnt, root, encrypted=True)
        write_config(self.cfg, {"daily": {"schedule": "daily 02:00",
                                          "instant_restore_days": 2}},
                     {"web": {"policy": "daily", "disks": {"os": str(self.disk)},
                              "block_size": "16K",
                              "snapshot": "btrfs" if self.kind == "btrfs" else "reflink"}},
                     vault=str(self.vault))


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["xfs", "btrfs"])
def test_kills_with_kept_snapshots_and_encryption_lose_no_change(tmp_path: Path,
                                                                 kind: str) -> None:
    """The same with an encrypted vault and instant restore: the base is then a second
    clone of the kept snapshot, made under a temporary name (recover removes it)."""
    _kill_sweep(tmp_path, kind, KeptSite)
