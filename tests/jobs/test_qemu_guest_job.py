"""``cbt backup --config`` of a real running VM: QMP, its guest agent, a guest writing.

The guest (tests/helpers/guest.py: a Debian kernel, busybox and ``qemu-ga``
under TCG) writes files to the ext4 on its virtio disk all the time, each one
synced and then logged, while cbt backs the VM up through its QMP socket and
its agent.  A point restored from the vault is then checked from the host with
e2fsprogs: with the agent's freeze it is a clean file system (the journal was
flushed: no ``needs_recovery``) holding, byte for byte, every file the guest had
finished before the job started, and every file its log names; without a freeze
(the agent refuses it) it is crash-consistent: the same holds after the
journal is replayed.  After every job the guest is thawed and writing again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from helpers.cli import cbt, cleanup_group, kill_group, start_cbt
from helpers.guest import (
    Guest,
    check_writer_files,
    file_content,
    fsck_clean,
    needs_recovery,
    running_guest,
)
from helpers.jobs import hook_argv, hook_log, job_config, jobs_json, one_point
from helpers.qemu import run
from helpers.vaults import restore, restore_point

from cbt.source.qemu import QmpSession, bitmap_name, scope_of

pytestmark = pytest.mark.slow
LABEL = "vda-dev"  # every disk of the VM by default, labelled by its device id


def init_vault(tmp_path: Path) -> Path:
    vault = tmp_path / "vault"
    r = cbt("init", vault, "--encryption", "none")
    assert r.returncode == 0, r.stderr
    return vault


def config(tmp_path: Path, g: Guest, vault: Path, **vm: Any) -> Path:
    return job_config(tmp_path / "cbt.toml",
                      {"web": {"qmp": str(g.qmp), "guest_agent": str(g.qga), **vm}},
                      vault=str(vault))


def start_writer(g: Guest) -> int:
    pid = g.spawn("exec cbt-writer /mnt/w")
    g.wait_wrote(3)
    return pid


def restored(vault: Path, point: str, tmp_path: Path, label: str = LABEL) -> Path:
    out = tmp_path / f"restored-{point}"
    if not out.exists():
        restore_point(vault, point, out)
    return out / f"{label}.img"


def after_job(g: Guest) -> None:
    """The guest is thawed and writes on (thaw always ran)."""
    assert g.agent("guest-fsfreeze-status") == "thawed"
    g.wait_wrote(2, timeout=60)


def check_point_has(image: Path, before: list[int]) -> list[int]:
    """The point holds every file finished before the job, and every file it logged."""
    logged = check_writer_files(image)
    assert logged[: len(before)] == before, (before, logged)
    return logged


def check_frozen_point(image: Path, g: Guest, k: int) -> list[int]:
    """A point cut while the guest was frozen the ``k``-th time: a clean ext4 (the
    journal flushed) holding exactly what the guest had written by then."""
    assert not needs_recovery(image)
    fsck_clean(image)
    logged = check_writer_files(image)
    frozen_at, thawed_at = g.around_freeze(k)
    assert frozen_at <= len(logged) <= thawed_at + 1, (frozen_at, thawed_at, len(logged))
    return logged


def cbt_leftovers(g: Guest) -> tuple[list[str], list[str]]:
    """Nodes and exports cbt added to the VM (none after a job), and the disk's bitmaps."""
    with QmpSession(g.qmp) as s:
        nodes = [n["node-name"] for n in s.command("query-named-block-nodes", {"flat": True})
                 if n["node-name"].startswith("cbt-")]
        exports = [e["id"] for e in s.command("query-block-exports")]
        vda = next(n for n in s.command("query-named-block-nodes", {"flat": True})
                   if n["node-name"] == "vda")
        bitmaps = [b["name"] for b in vda.get("dirty-bitmaps", [])]
    return nodes + exports, bitmaps


def disk_line(line: Mapping[str, Any]) -> dict[str, Any]:
    (d,) = line["disks"]
    assert d["label"] == LABEL, d
    return dict(d)


def test_full_then_incremental_of_a_writing_guest(tmp_path: Path) -> None:
    vault = init_vault(tmp_path)
    with running_guest(tmp_path) as g:
        start_writer(g)
        cfg = config(tmp_path, g, vault)
        points = []
        for _ in range(2):
            before = g.wrote()
            line = one_point(cfg)
            after_job(g)
            assert line["consistency"] == "file-system", line
            points.append((line, before))
            left, bitmaps = cbt_leftovers(g)
            assert left == [], left
            vault_id = json.loads((vault / "config").read_text())["id"]  # (scoped names)
            assert bitmaps == [bitmap_name(line["recovery_point"], scope_of(vault_id, "web"))
                               ], bitmaps
        (full, _), (incr, _) = points
        d1, d2 = disk_line(full), disk_line(incr)
        assert d1["change_source"] == "hash", d1  # a first point reads everything
        assert d2["change_source"] == "qemu-bitmap", d2
        # the guest's writes since the full point, as its bitmap said, and nothing the
        # verification sample found changed outside them
        assert d2["changed_blocks"] > 0 and d2["hint_mismatches"] == 0, d2
        assert d2["bytes_read"] < d2["size"] // 8, d2
        logged = []
        for k, (line, before) in enumerate(points, 1):
            image = restored(vault, line["recovery_point"], tmp_path)  # the last: incr's
            logged.append(check_frozen_point(image, g, k))
            check_point_has(image, before)
        assert len(logged[1]) > len(logged[0])  # the guest wrote on between the points
        jobs = jobs_json(vault)
        assert sorted(j["consistency"] for j in jobs) == ["file-system"] * 2
    # the incremental point, restored as a qcow2 (restore --format qcow2), boots again: a
    # new guest on it reads every file
    res = restore(vault, incr["recovery_point"], tmp_path / "again", "--format", "qcow2")
    again = tmp_path / "again" / f"{LABEL}.qcow2"
    assert [d["to"] for d in res["disks"]] == [str(again)]
    assert run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(again),
               str(image)).startswith("Images are identical")
    with running_guest(tmp_path, disk=again, name="again") as g2:
        assert g2.sh("cat /mnt/w/log").split() == [str(n) for n in logged[1]]
        sums = g2.sh("cd /mnt/w && md5sum $(cat log)").split("\n")
        want = [f"{hashlib.md5(file_content(n)).hexdigest()}  {n}" for n in logged[1]]
        assert [x for x in sums if x] == want


@pytest.mark.parametrize("hooks", ["provides", "pre hook"])
def test_application_consistency_with_the_agent(tmp_path: Path, hooks: str) -> None:
    vault = init_vault(tmp_path)
    state = tmp_path / "hook"
    h: dict[str, Any] = ({"provides": "application"} if hooks == "provides" else
                         {"pre": hook_argv(state), "post": hook_argv(state)})
    with running_guest(tmp_path) as g:
        start_writer(g)
        before = g.wrote()
        line = one_point(config(tmp_path, g, vault, hooks=h))
        after_job(g)
        assert line["consistency"] == "application", line
        if hooks == "pre hook":
            assert [e["phase"] for e in hook_log(state)] == ["pre", "post"]
        image = restored(vault, line["recovery_point"], tmp_path)
        check_frozen_point(image, g, 1)
        check_point_has(image, before)


def replayed(image: Path) -> Path:
    """A copy of ``image`` with its ext4 journal replayed (as a mount would)."""
    copy = image.with_suffix(".replayed")
    shutil.copyfile(image, copy)
    r = subprocess.run(["e2fsck", "-f", "-y", str(copy)], capture_output=True, text=True,
                       check=False, timeout=120)
    assert r.returncode in (0, 1), f"e2fsck -fy: {r.returncode}\n{r.stdout}{r.stderr}"
    return copy


def test_a_refused_freeze_falls_back_to_crash_with_the_reason(tmp_path: Path) -> None:
    vault = init_vault(tmp_path)
    with running_guest(tmp_path, agent_block=("guest-fsfreeze-freeze",)) as g:
        start_writer(g)
        before = g.wrote()
        line = one_point(config(tmp_path, g, vault))
        after_job(g)
        assert line["consistency"] == "crash", line
        reason = line["consistency_reason"]
        assert "guest-fsfreeze-freeze" in reason or "freeze" in reason, reason
        assert "disabled" in reason, reason  # the agent's own words
        image = restored(vault, line["recovery_point"], tmp_path)
        assert needs_recovery(image)  # cut while mounted and writing: not frozen
        fixed = replayed(image)
        fsck_clean(fixed)
        check_point_has(fixed, before)
        left, _ = cbt_leftovers(g)
        assert left == [], left


@pytest.mark.parametrize("how", ["guest hook fails", "freeze slower than the timeout"])
def test_a_failed_freeze_is_thawed_and_recorded(tmp_path: Path, how: str) -> None:
    """The guest's own fsfreeze hook refuses (an application that cannot quiesce), or
    the freeze outlasts the hook timeout (and completes later, in the guest): crash
    with the reason, and the guest ends up thawed and writing."""
    vault = init_vault(tmp_path)
    with running_guest(tmp_path) as g:
        start_writer(g)
        g.sh("touch /run/freeze-fail" if how == "guest hook fails"
             else "echo 5 > /run/freeze-sleep")
        before = g.wrote()
        line = one_point(config(tmp_path, g, vault, hooks={"timeout": 2}))
        assert line["consistency"] == "crash", line
        reason = line["consistency_reason"]
        assert "guest agent freeze failed" in reason, reason
        assert ("hook" if how == "guest hook fails" else "no reply within 2 s") in reason, reason
        deadline = time.monotonic() + 20
        while g.agent("guest-fsfreeze-status") != "thawed":
            assert time.monotonic() < deadline, "the guest stayed frozen after the job"
            time.sleep(0.5)
        g.wait_wrote(2, timeout=60)
        image = replayed(restored(vault, line["recovery_point"], tmp_path))
        fsck_clean(image)
        check_point_has(image, before)


def test_a_run_killed_during_the_freeze_leaves_the_next_run_to_thaw(tmp_path: Path) -> None:
    """cbt is SIGKILLed while the guest is freezing (its fsfreeze hook is slow): the
    freeze completes in the guest with nobody left to thaw it; the next run thaws it
    first, then makes its own frozen point."""
    vault = init_vault(tmp_path)
    with running_guest(tmp_path) as g:
        start_writer(g)
        g.sh("echo 3 > /run/freeze-sleep")
        cfg = config(tmp_path, g, vault, hooks={"timeout": 30})
        with cleanup_group(start_cbt("backup", "--config", cfg, "--json")) as p:
            g.wait_console(r"^cbt-fsfreeze freeze", timeout=60)
            kill_group(p)
        deadline = time.monotonic() + 20
        while g.agent("guest-fsfreeze-status") != "frozen":  # nobody thawed it
            assert time.monotonic() < deadline, "the killed run's freeze never completed"
            time.sleep(0.5)
        line = one_point(cfg)
        after_job(g)
        assert g.freeze_hooks() == ["freeze", "thaw", "freeze", "thaw"]
        assert line["consistency"] == "file-system", line
        check_frozen_point(restored(vault, line["recovery_point"], tmp_path), g, 2)
        left, _ = cbt_leftovers(g)
        assert left == [], left


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "crash"])
def test_two_disks_are_cut_at_one_moment(tmp_path: Path, frozen: bool) -> None:
    """The guest writes file N to its first disk, then to its second, each synced, in
    one global order: a point of both disks from one moment holds 1..n on the first and
    1..n or 1..n-1 on the second, frozen by the agent or not (crash-consistent: the
    same after the journals' replay).  Frozen: every disk of the VM by default (labels
    are device ids); crash: ``disks`` names one by node name, one by device id."""
    vault = init_vault(tmp_path)
    labels = ["vda-dev", "vdb-dev"] if frozen else ["os", "data"]  # in the writer's order
    vm: dict[str, Any] = {} if frozen else {"disks": {"os": "vda", "data": "vdb-dev"}}
    with running_guest(tmp_path, two_disks=True,
                       agent_block=() if frozen else ("guest-fsfreeze-freeze",)) as g:
        g.spawn("exec cbt-writer /mnt/w /mnt2/w")
        g.wait_wrote(3)
        line = one_point(config(tmp_path, g, vault, **vm))
        after_job(g)
        assert sorted(d["label"] for d in line["disks"]) == sorted(labels), line
        assert line["consistency"] == ("file-system" if frozen else "crash"), line
        assert "one moment" in line["consistency_reason"], line
        logs = []
        for label in labels:
            image = restored(vault, line["recovery_point"], tmp_path, label)
            assert needs_recovery(image) != frozen
            if not frozen:
                image = replayed(image)
            fsck_clean(image)
            logs.append(len(check_writer_files(image)))
        first, second = logs
        assert second in (first, first - 1) and first >= 3, logs
        if frozen:
            frozen_at, thawed_at = g.around_freeze(1)
            assert frozen_at <= first <= thawed_at + 1, (frozen_at, thawed_at, logs)
