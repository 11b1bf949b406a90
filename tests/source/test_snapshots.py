"""Snapshot providers: ``copy`` and ``none`` anywhere, ``reflink`` on a loop-mounted XFS,
``btrfs`` on a loop-mounted btrfs.

For each: what ``cbt config check`` resolves ``auto`` to, what the post hook
sees in the snapshot folder while the job runs (every disk snapshotted before
it), what is left afterwards (nothing, or exactly one tracking base per disk
for reflink/btrfs, replaced at the next commit and holding the disk as it was
at that commit), and that every point restores bit-identical to a copy of the
disk taken at backup time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import MIB
from helpers.cli import cbt, one_error_line
from helpers.images import assert_same_disk, keep_copy, make_disk, read, scribble
from helpers.jobs import (
    backup_config,
    hook_argv,
    hook_log,
    job_config,
    jobs_json,
    one_point,
    phases,
    set_ctl,
    write_hook,
)
from helpers.system import is_readonly_subvolume, is_subvolume, loop_fs, no_clone_dir
from helpers.vaults import listed_ids as point_ids
from helpers.vaults import restore_point

from cbt.api import Vault

BS = 64 * 1024


def check_plan(cfg: Path) -> dict[str, dict[str, str]]:
    r = cbt("config", "check", cfg, "--json")
    assert r.returncode == 0, r.stderr
    return {vm["name"]: {d["label"]: d["snapshot"] for d in vm["disks"]}
            for vm in json.loads(r.stdout)["vms"]}


def files_in(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def same_bytes(a: Path, b: Path) -> bool:
    return bool(np.array_equal(read(a), read(b)))


def restore_matches(vault: Path, point: str, copies: dict[str, Path], out: Path) -> None:
    restore_point(vault, point, out)
    for label, copy in copies.items():
        assert_same_disk(out / f"{label}.img", copy, BS)


# -- copy and none, on any file system -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("provider", ["copy", "none"])
def test_copy_and_none_with_a_snapshot_dir(tmp_path: Path, provider: str) -> None:
    root = tmp_path.resolve()
    disks = {"os": make_disk(root / "disks" / "os.img", 2 * MIB + 123, seed=3),
             "db": make_disk(root / "disks" / "db.img", MIB, seed=4)}
    Vault.init(root / "vault")
    state = root / "state"
    write_hook(state)
    snaps = root / "snaps" / "web"
    hooks = {"pre": hook_argv(state, snaps), "post": hook_argv(state, snaps)}
    cfg = job_config(root / "cbt.toml", {"web": {
        "disks": {"os": "disks/os.img", "db": "disks/db.img"}, "snapshot": provider,
        "snapshot_dir": "snaps", "block_size": 65536, "hooks": hooks}})
    assert check_plan(cfg) == {"web": {"os": provider, "db": provider}}
    copies: list[dict[str, Path]] = []
    points = []
    for day in range(2):
        if day:
            scribble(disks["os"], seed=30)
            scribble(disks["db"], seed=31)
        copies.append({lb: keep_copy(p, root / f"day{day}-{lb}.img") for lb, p in disks.items()})
        line = one_point(cfg)
        assert {d["snapshot"] for d in line["disks"]} == {provider}
        assert {d["block_size"] for d in line["disks"]} == {BS}
        points.append(line["recovery_point"])
        post = hook_log(state)[-1]
        assert post["phase"] == "post"
        seen = post["observed"][str(snaps)] or []
        if provider == "copy":  # the copies were made in the configured folder
            assert sorted(n.split(".")[0] for n in seen) == ["db", "os"], seen
        else:
            assert seen == []
        assert files_in(snaps) == []
    assert not (root / "disks" / ".cbt-snapshots" / "web").exists() or \
        files_in(root / "disks" / ".cbt-snapshots" / "web") == []
    for day, point in enumerate(points):
        restore_matches(root / "vault", point, copies[day], root / f"out{day}")


def test_auto_on_a_file_system_without_clones_reads_live(tmp_path: Path) -> None:
    with no_clone_dir(tmp_path.resolve()) as root:
        _auto_reads_live(root)


def _auto_reads_live(root: Path) -> None:
    make_disk(root / "a.img", MIB, seed=5)
    Vault.init(root / "vault")
    cfg = job_config(root / "cbt.toml", {"web": {"disks": {"a": "a.img"}}})
    assert check_plan(cfg) == {"web": {"a": "none"}}
    line = one_point(cfg)
    assert line["disks"][0]["snapshot"] == "none"
    assert line["consistency"] == "crash" and "live read" in line["consistency_reason"]


HAMMER = r'''
import os, random, sys
path, stop = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_WRONLY)
pages = os.path.getsize(path) // 4096
rnd = random.Random(1)
while not os.path.exists(stop):
    os.pwrite(fd, rnd.randbytes(4096), 4096 * rnd.randrange(pages))
'''


@pytest.mark.slow
def test_live_read_of_a_disk_being_written_still_restores(tmp_path: Path) -> None:
    """``none`` without quiescing reads a disk that changes under it: the point is torn
    (and says ``live read``), but everything it stored matches its digest and it restores."""
    root = tmp_path.resolve()
    disk = make_disk(root / "busy.img", 8 * MIB, seed=12)
    Vault.init(root / "vault")
    cfg = job_config(root / "cbt.toml", {"web": {"disks": {"busy": "busy.img"},
                                                   "snapshot": "none", "block_size": "4K"}})
    (root / "hammer.py").write_text(HAMMER)
    proc = subprocess.Popen([sys.executable, str(root / "hammer.py"), str(disk),
                             str(root / "stop")])
    try:
        lines = [one_point(cfg) for _ in range(2)]
    finally:
        (root / "stop").write_text("")
        proc.wait(timeout=30)
    for line in lines:
        assert line["consistency_reason"] == "no hooks; live read"
    r = cbt("verify", root / "vault", "--data", "--json")
    assert r.returncode == 0, r.stdout
    assert json.loads(r.stdout)["problems"] == []
    for k, line in enumerate(lines):
        restore_point(root / "vault", line["recovery_point"], root / f"out{k}")
        assert os.path.getsize(root / f"out{k}" / "busy.img") == 8 * MIB


@pytest.mark.parametrize("provider", ["reflink", "btrfs"])
def test_forced_provider_that_cannot_work_fails_the_job(tmp_path: Path, provider: str) -> None:
    with no_clone_dir(tmp_path.resolve()) as root:
        _forced_provider_fails(root, provider)


def _forced_provider_fails(root: Path, provider: str) -> None:
    make_disk(root / "a.img", MIB, seed=6)
    Vault.init(root / "vault")
    state = root / "state"
    write_hook(state)
    cfg = job_config(root / "cbt.toml", {"web": {
        "disks": {"a": "a.img"}, "snapshot": provider,
        "hooks": {"pre": hook_argv(state), "post": hook_argv(state)}}})
    r, lines = backup_config(cfg)
    msg = one_error_line(r)
    assert provider in msg, msg
    assert lines[0]["type"] == "error" and provider in lines[0]["message"]
    assert phases(state) == ["pre", "post"]
    assert point_ids(root / "vault") == []
    (job,) = jobs_json(root / "vault")
    assert job["status"] == "failed" and provider in job["error"]
    assert files_in(root / ".cbt-snapshots" / "web") == []


# -- reflink on XFS -----------------------------------------------------------------------------


@pytest.mark.slow
def test_reflink_on_xfs_keeps_a_tracking_base(tmp_path: Path) -> None:
    with loop_fs(tmp_path, "xfs") as mnt:
        root = mnt / "site"
        disks = {"os": make_disk(root / "disks" / "os.img", 16 * MIB + 4096, seed=7),
                 "db": make_disk(root / "disks" / "db.img", 8 * MIB, seed=8),
                 "logs": make_disk(root / "other" / "logs.img", 4 * MIB, seed=9)}
        vault = tmp_path / "vault"
        Vault.init(vault)
        state = tmp_path / "state"
        write_hook(state)
        web_snaps = root / "disks" / ".cbt-snapshots" / "web"
        app_snaps = root / "snaps" / "app"
        hooks = {"pre": hook_argv(state, web_snaps, app_snaps),
                 "post": hook_argv(state, web_snaps, app_snaps)}
        cfg = job_config(root / "cbt.toml", {
            "web": {"disks": {"os": "disks/os.img", "db": "disks/db.img"}, "hooks": hooks},
            "app": {"disks": {"logs": "other/logs.img"}, "snapshot": "reflink",
                    "snapshot_dir": "snaps"},
        }, vault=str(vault))
        assert check_plan(cfg) == {"web": {"os": "reflink", "db": "reflink"},
                                   "app": {"logs": "reflink"}}
        copies: list[dict[str, Path]] = []
        points: list[dict[str, str]] = []
        for day in range(2):
            if day:
                for k, p in enumerate(disks.values()):
                    scribble(p, seed=40 + k)
            copies.append({lb: keep_copy(p, tmp_path / f"day{day}-{lb}.img")
                           for lb, p in disks.items()})
            r, lines = backup_config(cfg)
            assert r.returncode == 0, r.stderr
            by_vm = {x["vm"]: x for x in lines}
            assert {d["snapshot"] for x in lines for d in x["disks"]} == {"reflink"}
            points.append({vm: x["recovery_point"] for vm, x in by_vm.items()})
            web = by_vm["web"]
            assert web["consistency"] == "application", web["consistency_reason"]
            assert by_vm["app"]["consistency"] == "crash"
            assert by_vm["app"]["consistency_reason"] == "no hooks"
            assert not any("copy" in w for w in web["warnings"])
            # while the web job ran: a clone of each disk beside the earlier bases
            post = hook_log(state)[-1]
            seen = post["observed"][str(web_snaps)]
            bases = ["db.base.img", "os.base.img"] if day else []
            clones = sorted(n for n in seen if n not in bases)
            assert sorted(n.split(".")[0] for n in clones) == ["db", "os"], seen
            assert sorted(set(seen) - set(clones)) == bases
            # afterwards only the tracking bases, holding the disks as they were backed up
            assert files_in(web_snaps) == ["db.base.img", "os.base.img"]
            assert files_in(app_snaps) == ["logs.base.img"]
            for lb in ("os", "db"):
                assert same_bytes(web_snaps / f"{lb}.base.img", copies[day][lb])
            assert same_bytes(app_snaps / "logs.base.img", copies[day]["logs"])

        # SIGTERM while the web job runs (in its post hook): the bases stay as they were
        base_inodes = {n: (web_snaps / n).stat().st_ino for n in files_in(web_snaps)}
        scribble(disks["os"], seed=50)
        set_ctl(state, "post", term_parent=True, sleep=2)
        r, lines = backup_config(cfg, "--vm", "web")
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert phases(state)[-2:] == ["pre", "post"]
        assert files_in(web_snaps) == ["db.base.img", "os.base.img"]
        assert {n: (web_snaps / n).stat().st_ino for n in files_in(web_snaps)} == base_inodes
        for lb in ("os", "db"):
            assert same_bytes(web_snaps / f"{lb}.base.img", copies[1][lb])
        assert sorted(j["status"] for j in jobs_json(vault, "web")) == ["failed", "succeeded",
                                                                        "succeeded"]

        for day in range(2):
            restore_matches(vault, points[day]["web"], {lb: copies[day][lb] for lb in ("os", "db")},
                            tmp_path / f"web{day}")
            restore_matches(vault, points[day]["app"], {"logs": copies[day]["logs"]},
                            tmp_path / f"app{day}")


# -- btrfs ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_btrfs_snapshots_the_subvolume_once(tmp_path: Path) -> None:
    with loop_fs(tmp_path, "btrfs") as mnt:
        subprocess.run(["btrfs", "subvolume", "create", str(mnt / "vms")], check=True,
                       capture_output=True)
        sub = mnt / "vms"
        disks = {"os": make_disk(sub / "web" / "os.img", 16 * MIB, seed=10),
                 "db": make_disk(sub / "web" / "data" / "db.img", 8 * MIB + 512, seed=11)}
        vault = tmp_path / "vault"
        Vault.init(vault)
        state = tmp_path / "state"
        write_hook(state)
        snaps = sub / ".cbt-snapshots"
        cfgdir = tmp_path / "etc"
        cfgdir.mkdir()
        vm: dict[str, Any] = {"disks": {lb: str(p) for lb, p in disks.items()}}
        cfg = job_config(cfgdir / "cbt.toml", {"web": vm}, vault=str(vault))
        assert check_plan(cfg) == {"web": {"os": "btrfs", "db": "btrfs"}}
        hooked = job_config(cfgdir / "hooked.toml", {"web": {
            **vm, "hooks": {"pre": hook_argv(state, snaps), "post": hook_argv(state, snaps)}}},
            vault=str(vault))
        copies: list[dict[str, Path]] = []
        points = []
        for day in range(3):
            if day:
                scribble(disks["os"], seed=60 + day)
                scribble(disks["db"], seed=70 + day)
            copies.append({lb: keep_copy(p, tmp_path / f"day{day}-{lb}.img")
                           for lb, p in disks.items()})
            line = one_point(hooked if day == 2 else cfg)
            points.append(line["recovery_point"])
            assert {d["snapshot"] for d in line["disks"]} == {"btrfs"}
            if day < 2:
                # one snapshot for both disks: one moment, crash-consistent without hooks
                assert line["consistency"] == "crash"
                assert line["consistency_reason"] == "no hooks"
            else:
                assert line["consistency"] == "application"
                seen = hook_log(state)[-1]["observed"][str(snaps)]
                assert "web.base" in seen and len(seen) == 2, seen  # the base and this job's
            assert files_in(snaps) == ["web.base"]
            base = snaps / "web.base"
            assert is_subvolume(base) and is_readonly_subvolume(base)
            assert same_bytes(base / "web" / "os.img", copies[day]["os"])
            assert same_bytes(base / "web" / "data" / "db.img", copies[day]["db"])
        for day, point in enumerate(points):
            restore_matches(vault, point, copies[day], tmp_path / f"out{day}")
        # no subvolume left but the base
        r = subprocess.run(["btrfs", "subvolume", "list", "-o", str(sub)], capture_output=True,
                           text=True, check=True)
        assert [ln.split()[-1] for ln in r.stdout.splitlines()] == \
            ["vms/.cbt-snapshots/web.base"], r.stdout
        assert os.path.exists(base)


# -- snapshot sets produce block sources ------------------------------------------------------


def test_snapshot_set_gives_block_sources(tmp_path: Path) -> None:
    """``copy`` gives a source reading the copy as taken (not live: a later write to the
    disk is not seen); ``none`` gives the live disk itself."""
    from cbt.source.snapshot import take

    disks = {"os": str(make_disk(tmp_path / "os.img", MIB + 5, seed=7)),
             "db": str(make_disk(tmp_path / "db.img", MIB, seed=8))}
    before = {lb: read(Path(p)) for lb, p in disks.items()}
    snaps = take("web", "job1", disks, {"os": "copy", "db": "none"}, str(tmp_path / "snaps"))
    try:
        scribble(Path(disks["os"]), seed=9)
        scribble(Path(disks["db"]), seed=10)
        for label, live, want in (("os", False, before["os"]), ("db", True, read(tmp_path /
                                                                             "db.img"))):
            assert snaps.disk(label, disks[label]).live is live
            with snaps.source(label, disks[label]) as src:
                assert (src.live, src.size) == (live, len(want))
                assert (src.path == disks[label]) is live
                got = b"".join(bytes(w) for _, w in src.windows(BS, 0, -(-src.size // BS)))
                assert got == want.tobytes(), label
    finally:
        snaps.discard()
    assert files_in(tmp_path / "snaps" / "web") == []
