"""One moment: every provider that claims it gives a restorable pair from a single instant.

A writer process appends an increasing sequence number to both disks of a VM,
in one global order: stamp k goes to slot k of disk ``a`` (fsynced), then to
slot k of disk ``b`` (fsynced).  A state of the pair from one moment is a
prefix of that order: ``a`` holds 1..n and ``b`` holds 1..n or 1..n-1.  When
the pre hook asks, the writer pauses between two stamps and says at which
(``paused_at``); the post hook lets it go on.  So:

- with successful hooks (``none``, ``copy``, ``reflink``, ``btrfs``) both
  restored disks hold exactly 1..paused_at;
- ``btrfs`` without hooks still snapshots both disks at one instant: a prefix
  of the global order (crash-consistent across the disks, reason ``no hooks``);
- ``copy`` without hooks copies the disks one after another and says so
  (``disks snapshotted sequentially``), and ``none`` says ``live read``.

The writer keeps going after the job, so the test also checks that the live
disks moved on (the hooks really did pause and resume it).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import MIB
from helpers.cli import wait_for
from helpers.images import prefix_length, stamps
from helpers.jobs import (
    hook_argv,
    hook_log,
    job_config,
    one_point,
    set_ctl,
    write_hook,
)
from helpers.system import loop_fs
from helpers.vaults import restore_point

from cbt.api import Vault

DISK_SIZE = 2 * MIB  # 262143 slots of 8 bytes

WRITER = r'''
import os, sys, time

a, b, ctl = sys.argv[1], sys.argv[2], sys.argv[3]
sync = sys.argv[4] == "fsync"
slots = os.path.getsize(a) // 8
fa, fb = os.open(a, os.O_WRONLY), os.open(b, os.O_WRONLY)
q, paused, stop = (os.path.join(ctl, n) for n in ("quiesce", "paused", "stop"))
k = 1
paused_token = None
while not os.path.exists(stop):
    try:
        with open(q) as f:
            token = f.read()
    except FileNotFoundError:
        token = None
    if token:
        if token != paused_token:  # between two stamps: say where, then wait
            with open(paused + ".tmp", "w") as f:
                f.write(f"{token} {k - 1}")
            os.rename(paused + ".tmp", paused)
            paused_token = token
        time.sleep(0.001)
        continue
    if paused_token is not None:
        os.unlink(paused)
        paused_token = None
    if k >= slots:
        time.sleep(0.01)
        continue
    for fd in (fa, fb):
        os.pwrite(fd, k.to_bytes(8, "little"), 8 * k)
        if sync:
            os.fsync(fd)
    k += 1
    time.sleep(0.0002)
'''


@contextlib.contextmanager
def writer(a: Path, b: Path, ctl: Path, sync: bool = True) -> Iterator[subprocess.Popen[bytes]]:
    for p in (a, b):
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as f:
            f.write(b"\0" * DISK_SIZE)  # allocated zeros: every slot a written 0
    ctl.mkdir(parents=True, exist_ok=True)
    script = ctl / "writer.py"
    script.write_text(WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(a), str(b), str(ctl),
                             "fsync" if sync else "nosync"])
    try:
        wait_for(lambda: int(np.count_nonzero(stamps(b))) >= 50, timeout=30,
                 what="the writer to start")
        yield proc
    finally:
        (ctl / "stop").write_text("")
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def quiescing_hooks(state: Path, ctl: Path) -> dict[str, Any]:
    set_ctl(state, "pre", quiesce=str(ctl))
    set_ctl(state, "post", resume=str(ctl))
    return {"pre": hook_argv(state), "post": hook_argv(state), "timeout": 30}


def restored_counts(vault: Path, point: str, out: Path) -> tuple[int, int]:
    restore_point(vault, point, out)
    return prefix_length(out / "a.img"), prefix_length(out / "b.img")


def run_case(root: Path, vault: Path, snapshot: str, hooks: bool,
             disks: dict[str, Path], cfgdir: Path | None = None,
             restore: bool = True) -> dict[str, Any]:
    """Back up the pair while the writer runs; the point line, counts and pause position."""
    state = root / "state"
    write_hook(state)
    ctl = root / "ctl"
    cfgdir = cfgdir or root
    vm: dict[str, Any] = {"disks": {lb: str(p) for lb, p in disks.items()},
                          "snapshot": snapshot, "block_size": "4K"}
    if hooks:
        vm["hooks"] = quiescing_hooks(state, ctl)
    cfg = job_config(cfgdir / "cbt.toml", {"vm1": vm}, vault=str(vault))
    with writer(disks["a"], disks["b"], ctl):
        line = one_point(cfg)
        restored = (restored_counts(vault, line["recovery_point"], root / "restored")
                    if restore else (0, 0))
        # the writer went on after the job: the live disks moved past the point
        wait_for(lambda: prefix_length(disks["b"]) > max(restored) + 20, timeout=30,
                 what="the writer to resume")
    log = hook_log(state)
    paused_at = log[0].get("paused_at") if log else None
    if hooks:
        assert [e["phase"] for e in log] == ["pre", "post"]
    return {"line": line, "counts": restored, "paused_at": paused_at}


def assert_one_moment(counts: tuple[int, int]) -> None:
    na, nb = counts
    assert nb >= 50, counts
    assert na in (nb, nb + 1), f"a holds 1..{na}, b holds 1..{nb}: not one moment"


@pytest.mark.slow
@pytest.mark.parametrize("snapshot", ["none", "copy"])
def test_hooks_give_one_moment_on_any_file_system(tmp_path: Path, snapshot: str) -> None:
    root = tmp_path.resolve()
    Vault.init(root / "vault")
    disks = {"a": root / "disks" / "a.img", "b": root / "disks" / "b.img"}
    got = run_case(root, root / "vault", snapshot, True, disks)
    assert got["line"]["consistency"] == "application"
    assert got["counts"] == (got["paused_at"], got["paused_at"]), got


@pytest.mark.slow
@pytest.mark.parametrize("snapshot,reason", [
    ("copy", "no hooks; disks snapshotted sequentially"),
    ("none", "no hooks; live read"),
])
def test_without_hooks_the_point_says_why_it_is_not_one_moment(tmp_path: Path, snapshot: str,
                                                                reason: str) -> None:
    root = tmp_path.resolve()
    Vault.init(root / "vault")
    disks = {"a": root / "disks" / "a.img", "b": root / "disks" / "b.img"}
    # (a live read of disks being written restores only as torn disks: see
    # test_snapshots.py::test_live_read_of_a_disk_being_written_still_restores)
    got = run_case(root, root / "vault", snapshot, False, disks, restore=snapshot == "copy")
    assert got["line"]["consistency"] == "crash"
    assert got["line"]["consistency_reason"] == reason


@pytest.mark.slow
def test_reflink_with_hooks_is_one_moment(tmp_path: Path) -> None:
    with loop_fs(tmp_path, "xfs") as mnt:
        Vault.init(tmp_path / "vault")
        disks = {"a": mnt / "vm" / "a.img", "b": mnt / "vm" / "b.img"}
        got = run_case(tmp_path, tmp_path / "vault", "auto", True, disks)
        line = got["line"]
        assert {d["snapshot"] for d in line["disks"]} == {"reflink"}
        assert line["consistency"] == "application"
        assert got["counts"] == (got["paused_at"], got["paused_at"]), got


@pytest.mark.slow
@pytest.mark.parametrize("hooks", [False, True])
def test_btrfs_is_one_moment_with_or_without_hooks(tmp_path: Path, hooks: bool) -> None:
    with loop_fs(tmp_path, "btrfs") as mnt:
        subprocess.run(["btrfs", "subvolume", "create", str(mnt / "vm")], check=True,
                       capture_output=True)
        Vault.init(tmp_path / "vault")
        disks = {"a": mnt / "vm" / "a.img", "b": mnt / "vm" / "disks" / "b.img"}
        started = time.monotonic()
        got = run_case(tmp_path, tmp_path / "vault", "auto", hooks, disks)
        line = got["line"]
        assert {d["snapshot"] for d in line["disks"]} == {"btrfs"}
        assert_one_moment(got["counts"])
        if hooks:
            assert line["consistency"] == "application"
            assert got["counts"] == (got["paused_at"], got["paused_at"]), got
        else:
            assert line["consistency"] == "crash"
            assert line["consistency_reason"] == "no hooks"  # and nothing about sequential
        assert time.monotonic() - started < 120
