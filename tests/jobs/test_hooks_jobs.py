"""Backup jobs through ``cbt backup --config``: hooks, honest consistency, kills, history.

Hooks are real scripts (``helpers.jobs.HOOK``) that log every call (phase, VM,
point, and what they saw in the vault and the snapshot folder at that moment)
and behave as their control file says: succeed, fail with an exit code and
stderr, hang with a child, SIGKILL the cbt run that started them.  Disks live
on the ordinary file system, so ``snapshot`` is forced to ``copy`` or ``none``.

Consistency rules (DESIGN.md, "Consistency, honestly recorded"):
- pre hook succeeded -> ``application`` (``file-system`` with provides =
  "file-system"); a failed post hook keeps the level and adds a warning;
- otherwise ``crash`` with the reason: the pre hook's exit code / timeout and
  stderr tail, or ``no hooks``; plus ``disks snapshotted sequentially`` (copy of
  more than one disk) or ``live read`` (none).
The post hook runs exactly once whenever the pre hook started; with ``none``
it runs only after the transfer (the point is already committed when it runs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import MIB
from helpers.cli import (
    cbt,
    crash_env,
    json_lines,
    one_error_line,
    process_gone,
    start_cbt,
    wait_for,
)
from helpers.images import assert_same_disk, make_disk, scribble
from helpers.images import write_random_disk as write_random
from helpers.jobs import (
    backup_config,
    hook_argv,
    hook_log,
    job_config,
    job_with,
    jobs_json,
    one_point,
    phases,
    set_ctl,
    statuses,
    write_hook,
)
from helpers.shapes import (
    ERROR_LINE_KEYS,
    JOB_KEYS,
    POINT_DISK_KEYS,
    POINT_LINE_KEYS,
    PROGRESS_KEYS,
)
from helpers.truth import truth_hash
from helpers.vaults import listed_ids as point_ids
from helpers.vaults import restore_point

from cbt import jobs as jobs_api
from cbt.api import Vault
from cbt.format.records import JobRecord, KeptSnapshots
from cbt.jobs.config import load as load_config
from cbt.repo.registry import kept_snapshots

BS = 64 * 1024


@dataclass
class Site:
    """A config folder with a vault, a VM ``web`` of two disks, and hook scripts."""

    root: Path
    vault: Path
    state: Path
    disks: dict[str, Path]

    @property
    def snapdir(self) -> Path:
        return self.root / "disks" / ".cbt-snapshots" / "web"

    def hooks(self, **extra: Any) -> dict[str, Any]:
        watch = (self.vault / "points", self.snapdir)
        h: dict[str, Any] = {"pre": hook_argv(self.state, *watch),
                             "post": hook_argv(self.state, *watch), "timeout": 20}
        h.update(extra)
        return h

    def config(self, snapshot: str = "copy", hooks: dict[str, Any] | bool | None = True,
               disks: dict[str, str] | None = None, name: str = "cbt.toml",
               **vm: Any) -> Path:
        if hooks is True:
            hooks = self.hooks()
        spec: dict[str, Any] = {
            "disks": disks or {label: f"disks/{p.name}" for label, p in self.disks.items()},
            "snapshot": snapshot, "block_size": "64K", **vm}
        if hooks:
            spec["hooks"] = hooks
        return job_config(self.root / name, {"web": spec})

    def snapshot_files(self) -> list[str]:
        if not self.snapdir.exists():
            return []
        return sorted(p.name for p in self.snapdir.iterdir())


@pytest.fixture
def site(tmp_path: Path) -> Site:
    root = (tmp_path / "site").resolve()
    disks = {"os": make_disk(root / "disks" / "os.img", 3 * MIB + 5000, seed=1),
             "db": make_disk(root / "disks" / "db.img", 2 * MIB, seed=2)}
    Vault.init(root / "vault")
    state = root / "state"
    write_hook(state)
    return Site(root, root / "vault", state, disks)


def check_point_line(line: dict[str, Any], providers: dict[str, str]) -> None:
    assert set(line) == POINT_LINE_KEYS, line
    for d in line["disks"]:
        assert set(d) == POINT_DISK_KEYS | {"snapshot"}, d
    assert {d["label"]: d["snapshot"] for d in line["disks"]} == providers


def check_restores(site: Site, point: str, copies: dict[str, Path] | None = None) -> None:
    out = site.root / f"restored-{point}"
    restore_point(site.vault, point, out)
    for label, disk in (copies or site.disks).items():
        assert_same_disk(out / f"{label}.img", disk, BS)


def hook_points(site: Site) -> set[str]:
    return {e["point"] for e in hook_log(site.state)}


# -- hooks and consistency ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("snapshot", ["copy", "none"])
@pytest.mark.parametrize("provides", ["application", "file-system"])
def test_hooks_succeed(site: Site, snapshot: str, provides: str) -> None:
    cfg = site.config(snapshot, hooks=site.hooks(provides=provides))
    line = one_point(cfg)
    check_point_line(line, {"os": snapshot, "db": snapshot})
    point = line["recovery_point"]
    assert line["consistency"] == provides
    assert "pre hook succeeded" in line["consistency_reason"]
    log = hook_log(site.state)
    assert [e["phase"] for e in log] == ["pre", "post"]
    assert {e["vm"] for e in log} == {"web"} and hook_points(site) == {point}
    assert {e["cwd"] for e in log} == {str(site.root)}  # hooks run in the config's folder
    pre, post = log
    points_dir, snapdir = str(site.vault / "points"), str(site.snapdir)
    assert f"{point}.json" not in (pre["observed"][points_dir] or [])
    assert not [n for n in pre["observed"][snapdir] or [] if n.endswith(".img")]
    if snapshot == "copy":
        # every disk snapshotted before the post hook, and the transfer after it
        snaps = [n for n in post["observed"][snapdir] if n.endswith(".img")]
        assert sorted(n.split(".")[0] for n in snaps) == ["db", "os"], snaps
        assert f"{point}.json" not in (post["observed"][points_dir] or [])
        assert any("copy" in w for w in line["warnings"]), line["warnings"]
    else:
        # no snapshot: the application stays quiesced until every disk has been read; the
        # post hook runs before the commit, so its warnings can go into the point
        assert f"{point}.json" not in (post["observed"][points_dir] or [])
    assert site.snapshot_files() == []
    (job,) = jobs_json(site.vault)
    assert job["status"] == "succeeded" and job["consistency"] == provides
    assert job["recovery_point"] == point and job["vm"] == "web" and job["policy"] == "daily"
    assert job["error"] is None
    assert {d["label"]: d["snapshot"] for d in job["disks"]} == {"os": snapshot, "db": snapshot}
    assert job["start"].endswith("Z") and job["end"].endswith("Z")
    assert job["start"] <= job["end"]
    check_restores(site, point)


@pytest.mark.slow
@pytest.mark.parametrize("snapshot,why", [("copy", "disks snapshotted sequentially"),
                                          ("none", "live read")])
def test_failing_pre_hook_falls_back_to_crash(site: Site, snapshot: str, why: str) -> None:
    noise = "x" * 2000  # only the tail of a long stderr is kept
    set_ctl(site.state, "pre", exit=7, stderr=f"{noise}\ndatabase busy: cannot flush\n")
    line = one_point(site.config(snapshot))
    assert line["consistency"] == "crash"
    reason = line["consistency_reason"]
    assert "exit 7" in reason and "database busy: cannot flush" in reason, reason
    assert why in reason, reason
    assert len(reason) < 1000, reason
    assert phases(site.state) == ["pre", "post"]
    assert hook_points(site) == {line["recovery_point"]}
    (job,) = jobs_json(site.vault)
    assert job["status"] == "succeeded" and job["consistency"] == "crash"
    check_restores(site, line["recovery_point"])


@pytest.mark.slow
def test_pre_hook_that_cannot_start_falls_back_to_crash(site: Site) -> None:
    hooks = site.hooks(pre=[str(site.root / "no-such-quiesce")])
    line = one_point(site.config("none", hooks=hooks))
    assert line["consistency"] == "crash"
    reason = line["consistency_reason"]
    assert "pre hook" in reason and "no-such-quiesce" in reason and "live read" in reason, reason
    check_restores(site, line["recovery_point"])


@pytest.mark.slow
def test_hung_pre_hook_is_killed_with_its_child(site: Site) -> None:
    set_ctl(site.state, "pre", hang=True)
    started = time.monotonic()
    line = one_point(site.config("copy", hooks=site.hooks(timeout=1)))
    elapsed = time.monotonic() - started
    assert elapsed < 30, elapsed
    assert line["consistency"] == "crash"
    assert "timed out" in line["consistency_reason"], line["consistency_reason"]
    assert "disks snapshotted sequentially" in line["consistency_reason"]
    log = hook_log(site.state)
    assert [e["phase"] for e in log] == ["pre", "post"]
    pre = log[0]
    wait_for(lambda: process_gone(pre["child"]) and process_gone(pre["pid"]), timeout=5,
             what="the hung hook and its child to be killed")
    check_restores(site, line["recovery_point"])


@pytest.mark.slow
@pytest.mark.parametrize("snapshot", ["copy", "none"])
def test_failing_post_hook_keeps_the_level_and_warns(site: Site, snapshot: str) -> None:
    set_ctl(site.state, "post", exit=5, stderr="thaw failed: fs busy\n")
    line = one_point(site.config(snapshot))
    assert line["consistency"] == "application"
    warnings = " ".join(line["warnings"])
    assert "post hook" in warnings and "exit 5" in warnings and "thaw failed" in warnings, \
        line["warnings"]
    assert phases(site.state) == ["pre", "post"]
    (job,) = jobs_json(site.vault)
    assert job["status"] == "succeeded" and job["consistency"] == "application"


@pytest.mark.slow
def test_on_pre_failure_fail_fails_the_job(site: Site) -> None:
    set_ctl(site.state, "pre", exit=3, stderr="cannot quiesce\n")
    cfg = site.config("copy", hooks=site.hooks(on_pre_failure="fail"))
    r, lines = backup_config(cfg)
    assert r.returncode == 2, (r.stdout, r.stderr)
    (err,) = lines
    assert set(err) == ERROR_LINE_KEYS, err
    assert err["type"] == "error" and err["vm"] == "web"
    assert "exit 3" in err["message"] and "cannot quiesce" in err["message"], err
    msg = one_error_line(r)
    assert "web" in msg and "exit 3" in msg
    assert point_ids(site.vault) == []
    assert phases(site.state) == ["pre", "post"]
    assert site.snapshot_files() == []
    (job,) = jobs_json(site.vault)
    assert job["status"] == "failed" and job["recovery_point"] is None
    assert "exit 3" in job["error"]


@pytest.mark.slow
@pytest.mark.parametrize("snapshot,labels,reason", [
    ("copy", ("os", "db"), "no hooks; disks snapshotted sequentially"),
    ("copy", ("os",), "no hooks"),
    ("none", ("os", "db"), "no hooks; live read"),
    ("none", ("db",), "no hooks; live read"),
])
def test_no_hooks_is_crash_consistent(site: Site, snapshot: str, labels: tuple[str, ...],
                                      reason: str) -> None:
    disks = {lb: f"disks/{site.disks[lb].name}" for lb in labels}
    line = one_point(site.config(snapshot, hooks=None, disks=disks))
    assert line["consistency"] == "crash"
    assert line["consistency_reason"] == reason
    assert site.snapshot_files() == []
    check_restores(site, line["recovery_point"], {lb: site.disks[lb] for lb in labels})


def test_post_hook_alone_quiesces_nothing(site: Site) -> None:
    """Without a pre hook nothing was quiesced: the point cannot claim more than crash."""
    hooks = site.hooks()
    del hooks["pre"]
    line = one_point(site.config("copy", hooks=hooks))
    assert phases(site.state) == ["post"]
    assert line["consistency"] == "crash", line["consistency_reason"]
    assert "pre hook succeeded" not in line["consistency_reason"]


@pytest.mark.slow
def test_hook_programs_from_path_and_the_config_folder(site: Site, tmp_path: Path) -> None:
    """argv[0] without '/' is found on PATH; relative arguments work from the config's folder."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    prog = bindir / "cbt-test-quiesce"
    prog.write_text(f"#!{sys.executable}\n" + (site.state / "hook.py").read_text())
    prog.chmod(0o755)
    (site.root / "hooks").mkdir()
    (site.root / "hooks" / "thaw.py").write_text((site.state / "hook.py").read_text())
    hooks = {"pre": ["cbt-test-quiesce", str(site.state)],
             "post": [sys.executable, "hooks/thaw.py", str(site.state)], "timeout": 20}
    cfg = site.config("none", hooks=hooks)
    env = {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = cbt("backup", "--config", cfg, "--json", env=env, cwd=elsewhere)
    assert r.returncode == 0, (r.stdout, r.stderr)
    (line,) = [x for x in json_lines(r.stdout) if x["type"] == "point"]
    assert line["consistency"] == "application"
    log = hook_log(site.state)
    assert [e["phase"] for e in log] == ["pre", "post"]
    assert log[0]["argv0"] == str(prog)
    assert {e["cwd"] for e in log} == {str(site.root)}


# -- kill -9 and signals -----------------------------------------------------------------------


@pytest.mark.slow
def test_kill9_between_hooks_then_recover(site: Site) -> None:
    cfg = site.config("copy")
    first = one_point(cfg)
    set_ctl(site.state, "pre", killgroup=True, once=True)
    proc = start_cbt("backup", "--config", cfg, "--json")
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.returncode
    log = hook_log(site.state)
    assert [e["phase"] for e in log] == ["pre", "post", "pre"]
    killed_point = log[-1]["point"]
    running = jobs_json(site.vault)
    assert statuses(running) == ["running", "succeeded"]
    killed_job = job_with(running, status="running")
    assert killed_job["recovery_point"] == killed_point and killed_job["end"] is None
    assert point_ids(site.vault) == [first["recovery_point"]]

    line = one_point(cfg)
    log = hook_log(site.state)
    assert [(e["phase"], e["point"]) for e in log[3:]] == [
        ("recover", killed_point), ("pre", line["recovery_point"]),
        ("post", line["recovery_point"])]
    assert line["consistency"] == "application"
    hist = jobs_json(site.vault)
    assert statuses(hist) == ["interrupted", "succeeded", "succeeded"]
    old = job_with(hist, id=killed_job["id"])
    assert old["status"] == "interrupted" and old["end"] is not None and old["error"]
    assert job_with(hist, recovery_point=line["recovery_point"])["status"] == "succeeded"
    # each job's record lists the hooks run for it (issue 12): the killed one's recovery
    assert [h["phase"] for h in old["hooks"]] == ["recover"] and old["hooks"][0]["ok"]
    new = job_with(hist, recovery_point=line["recovery_point"])
    assert [(h["phase"], h["exit_code"]) for h in new["hooks"]] == [("pre", 0), ("post", 0)]
    # a third run has nothing left to recover
    third = one_point(cfg)
    assert [e["phase"] for e in hook_log(site.state)[6:]] == ["pre", "post"]
    assert statuses(jobs_json(site.vault)) == ["interrupted"] + ["succeeded"] * 3
    assert site.snapshot_files() == []
    check_restores(site, third["recovery_point"])


@pytest.mark.slow
def test_interrupted_job_names_no_point_that_does_not_exist(site: Site) -> None:
    cfg = site.config("copy")
    set_ctl(site.state, "pre", killgroup=True, once=True)
    proc = start_cbt("backup", "--config", cfg, "--json")
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    one_point(cfg)
    hist = jobs_json(site.vault)
    assert statuses(hist) == ["interrupted", "succeeded"]
    # killed in its pre hook, the job made no point; the id it had planned may even be
    # taken by the next run's point (same second), so it must not be reported as its point
    old = job_with(hist, status="interrupted")
    assert old["recovery_point"] is None, old


def _counted_run(site: Site, cfg: Path) -> dict[str, int]:
    """A clean run that counts durable steps; the count each hook saw."""
    counter = site.root / "steps"
    counter.write_text("0")
    r, _ = backup_config(cfg, env={"CBT_CRASH_AT": str(10**9),
                                   "CBT_CRASH_COUNTER": str(counter)})
    assert r.returncode == 0, r.stderr
    seen = {e["phase"]: e["steps"] for e in hook_log(site.state)[-2:]}
    assert set(seen) == {"pre", "post"}, hook_log(site.state)
    return seen


def _crash_at(site: Site, cfg: Path, step: int) -> None:
    proc = start_cbt("backup", "--config", cfg, "--json", env=crash_env(step, site.root))
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, step)


@pytest.mark.slow
def test_crash_at_a_durable_step_between_hooks_then_recover(site: Site) -> None:
    """Provider none: the transfer runs between the hooks; kill it at its first durable step."""
    cfg = site.config("none")
    seen = _counted_run(site, cfg)
    assert seen["post"] > seen["pre"], seen  # durable steps happen while quiesced
    before = len(hook_log(site.state))
    # new data, so this run too writes packs while the application is quiesced
    for path in site.disks.values():
        fd = os.open(path, os.O_WRONLY)
        os.pwrite(fd, os.urandom(256 * 1024), 4096)
        os.close(fd)
    _crash_at(site, cfg, seen["pre"] + 1)
    log = hook_log(site.state)[before:]
    assert [e["phase"] for e in log] == ["pre"], log
    crashed = log[0]["point"]
    assert crashed not in point_ids(site.vault)
    line = one_point(cfg)
    log = hook_log(site.state)[before:]
    assert [(e["phase"], e["point"]) for e in log] == [
        ("pre", crashed), ("recover", crashed), ("pre", line["recovery_point"]),
        ("post", line["recovery_point"])]
    hist = jobs_json(site.vault)
    assert statuses(hist) == ["interrupted", "succeeded", "succeeded"]
    assert job_with(hist, status="interrupted")["end"] is not None
    r = cbt("verify", site.vault, "--json")
    assert r.returncode == 0, r.stdout
    check_restores(site, line["recovery_point"])


@pytest.mark.slow
def test_crash_before_the_pre_hook_runs_no_recover_hook(site: Site) -> None:
    cfg = site.config("copy")
    one_point(cfg)
    seen = _counted_run(site, cfg)
    before = len(hook_log(site.state))
    # the job's two records before the pre hook (running, then hook pending) take two
    # durable steps each (file, folder): crash once the first is in place
    _crash_at(site, cfg, seen["pre"] - 2)
    assert len(hook_log(site.state)) == before
    assert statuses(jobs_json(site.vault)) == ["running", "succeeded", "succeeded"]
    line = one_point(cfg)
    assert phases(site.state)[before:] == ["pre", "post"]
    assert statuses(jobs_json(site.vault)) == ["interrupted"] + ["succeeded"] * 3
    assert line["consistency"] == "application"


@pytest.mark.slow
def test_crash_during_transfer_leaves_no_snapshots_behind(site: Site) -> None:
    """kill -9 after the copy snapshots were taken: the next run removes them."""
    cfg = site.config("copy")
    one_point(cfg)
    seen = _counted_run(site, cfg)
    assert site.snapshot_files() == []
    # the post hook's own bookkeeping takes two steps (file, folder); then the transfer
    _crash_at(site, cfg, seen["post"] + 3)
    leftovers = site.snapshot_files()
    assert len(leftovers) == 2, leftovers  # precondition: killed while the snapshots existed
    line = one_point(cfg)
    assert site.snapshot_files() == [], site.snapshot_files()
    check_restores(site, line["recovery_point"])


@pytest.fixture(scope="module")
def big_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("big") / "big.img"
    write_random(path, 512 * MIB, seed=5)
    return path


def _big_site(site: Site, big: Path) -> Path:
    link = site.root / "disks" / "big.img"
    os.link(big, link)  # the same 512 MiB file, in this site's folder
    return site.config("copy", disks={"big": "disks/big.img"})


@pytest.mark.slow
@pytest.mark.parametrize("sig,target", [(signal.SIGTERM, "pid"), (signal.SIGINT, "group")])
def test_signal_during_transfer_aborts_cleanly(site: Site, big_disk: Path, sig: int,
                                               target: str) -> None:
    cfg = _big_site(site, big_disk)
    # two workers: the transfer of 512 MiB of random data takes seconds on any machine
    proc = start_cbt("backup", "--config", cfg, "--json", "--workers", "2")
    assert proc.stdout is not None
    try:
        # progress lines come only from the transfer, which starts after the post hook
        for raw in proc.stdout:
            if json.loads(raw).get("type") == "progress":
                break
        assert phases(site.state) == ["pre", "post"]
        if target == "pid":
            os.kill(proc.pid, sig)
        else:
            os.killpg(proc.pid, sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 2, (proc.returncode, err)
    assert any(x.get("type") == "error" for x in json_lines(out)), out
    assert phases(site.state) == ["pre", "post"]  # once, not again
    assert site.snapshot_files() == []
    assert point_ids(site.vault) == []
    (job,) = jobs_json(site.vault)
    assert job["status"] == "failed" and job["recovery_point"] is None, job
    assert job["end"] is not None and job["error"]
    # nothing left running in the run's process group
    wait_for(lambda: subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True,
                                    check=False).returncode != 0,
             timeout=10, what="the run's workers to exit")


@pytest.mark.slow
def test_sigterm_during_the_pre_hook_still_runs_the_post_hook(site: Site) -> None:
    set_ctl(site.state, "pre", sleep=30)
    proc = start_cbt("backup", "--config", site.config("copy"), "--json")
    try:
        wait_for(lambda: phases(site.state) == ["pre"], what="the pre hook")
        os.kill(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 2
    assert point_ids(site.vault) == []
    (job,) = jobs_json(site.vault)
    assert job["status"] == "failed"
    # the pre hook started, so the application must be resumed
    assert phases(site.state) == ["pre", "post"]


# -- job history --------------------------------------------------------------------------------


@pytest.mark.slow
def test_job_history_records_every_run(site: Site) -> None:
    cfg = job_config(site.root / "two.toml", {
        "web": {"disks": {"os": "disks/os.img"}, "snapshot": "copy", "hooks": site.hooks()},
        "db": {"disks": {"db": "disks/db.img", "logs": "disks/missing.img"},
               "snapshot": "none"},
    })
    assert jobs_json(site.vault) == []
    r, lines = backup_config(cfg)
    assert r.returncode == 2, (r.stdout, r.stderr)
    progress = [x for x in json_lines(r.stdout) if x["type"] == "progress"]
    assert progress and all(set(x) == PROGRESS_KEYS for x in progress), progress
    last = [x for x in progress if x["vm"] == "web"][-1]
    assert last["disk"] == "os"
    assert last["bytes_done"] == last["bytes_total"] == site.disks["os"].stat().st_size
    by_vm = {x["vm"]: x for x in lines}
    assert by_vm["web"]["type"] == "point"
    assert by_vm["db"]["type"] == "error" and set(by_vm["db"]) == ERROR_LINE_KEYS
    assert "logs" in by_vm["db"]["message"] and "missing.img" in by_vm["db"]["message"]
    assert "db" in one_error_line(r)

    r2, lines2 = backup_config(cfg, "--vm", "web")
    assert r2.returncode == 0 and [x["vm"] for x in lines2] == ["web"]
    hist = jobs_json(site.vault)
    assert sorted((j["vm"], j["status"]) for j in hist) == [
        ("db", "failed"), ("web", "succeeded"), ("web", "succeeded")]
    assert len({j["id"] for j in hist}) == 3
    web = jobs_json(site.vault, "web")
    assert {j["recovery_point"] for j in web} == {by_vm["web"]["recovery_point"],
                                                  lines2[0]["recovery_point"]}
    web.sort(key=lambda j: j["recovery_point"])  # ids sort by time
    assert sorted(point_ids(site.vault)) == sorted(j["recovery_point"] for j in web)
    for j in web:
        assert j["status"] == "succeeded" and j["consistency"] == "application"
        (d,) = j["disks"]
        assert d["label"] == "os" and d["snapshot"] == "copy"
        assert d["bytes_read"] > 0 and isinstance(d["seconds"], float)
    assert web[0]["disks"][0]["bytes_new"] > 0 and web[1]["disks"][0]["bytes_new"] == 0
    (db,) = jobs_json(site.vault, "db")
    assert db["status"] == "failed" and db["recovery_point"] is None
    assert db["consistency"] is None and "missing.img" in db["error"]
    assert jobs_json(site.vault, "nope") == []
    human = cbt("jobs", site.vault, "--vm", "db")
    assert human.returncode == 0 and "failed" in human.stdout and "web" not in human.stdout
    bad = cbt("backup", "--config", cfg, "--vm", "nope")
    assert "nope" in one_error_line(bad)


# what a job record held when it was a dict (format 1): every key, written as below
JOB_RECORD_KEYS = {"id", "vm", "policy", "start", "end", "status", "consistency",
                   "recovery_point", "disks", "error", "hook_pending", "pid", "slot",
                   "start_ns"}
JOB_DISK_KEYS = {"label", "snapshot", "bytes_read", "bytes_new", "bytes_stored", "seconds"}


def format_1(body: dict[str, Any]) -> bytes:
    return (json.dumps(body, sort_keys=True, indent=1) + "\n").encode()


def test_job_and_kept_snapshot_records_keep_format_1(site: Site) -> None:
    """The registry's files are the JSON format 1 wrote, and round-trip byte for byte."""
    cfg = site.config("copy", hooks=None, disks={"os": "disks/os.img"})
    cfg.write_text(cfg.read_text().replace('schedule = "daily 02:00"',
                                           'schedule = "daily 02:00"\ninstant_restore_days = 1'))
    good = one_point(cfg)
    bad = site.config("none", hooks=None, disks={"db": "disks/nope.img"}, name="bad.toml")
    assert backup_config(bad)[0].returncode == 2
    listed = {j["id"]: j for j in jobs_json(site.vault)}
    files = sorted((site.vault / "jobs").glob("*.json"))
    assert len(files) == len(listed) == 2
    for f in files:
        raw = f.read_bytes()
        body = json.loads(raw)
        assert set(body) == JOB_RECORD_KEYS and raw == format_1(body), raw
        assert all(set(d) == JOB_DISK_KEYS for d in body["disks"])
        rec = JobRecord.from_json(raw)
        assert rec.to_json() == raw
        # ``hooks`` (issue 12) is in the file only when a hook ran: [] when none did
        assert rec.to_dict() == listed[body["id"]] == {k: body.get(k, []) for k in JOB_KEYS}
        # a key another cbt wrote stays where it is when the record is rewritten
        newer = {**body, "future": {"x": [1, 2]}}
        assert JobRecord.from_json(format_1(newer)).to_json() == format_1(newer)
    statuses_seen = sorted(json.loads(f.read_bytes())["status"] for f in files)
    assert statuses_seen == ["failed", "succeeded"]

    (kept_file,) = (site.vault / "snapshots").glob("*.json")
    raw = kept_file.read_bytes()
    body = json.loads(raw)
    assert set(body) == {"recovery_point", "vm", "created", "disks", "paths"}
    assert raw == format_1(body) and body["recovery_point"] == good["recovery_point"]
    assert body["vm"] == "web" and set(body["disks"]) == {"os"}
    assert Path(body["disks"]["os"]).is_file() and body["disks"]["os"] in body["paths"]
    entry = KeptSnapshots.from_json(raw)
    assert entry.to_json() == raw
    assert kept_snapshots(Vault.open(site.vault)) == {good["recovery_point"]: entry}


def test_jobs_are_listed_oldest_first(site: Site) -> None:
    """``cbt jobs`` lists oldest first, also for jobs that start within the same second."""
    cfg = load_config(site.config("none", hooks=None, disks={"db": "disks/db.img"}))
    ran = []
    for _ in range(6):
        (res,) = jobs_api.run(cfg)
        assert res.error is None
        ran.append(res.job_id)
    assert [j["id"] for j in jobs_json(site.vault)] == ran


# -- the executor seam ---------------------------------------------------------------------------


EXECUTORS = ("default", "threads", "processes", "spawned")


@contextlib.contextmanager
def executor(name: str) -> Iterator[Executor | None]:
    if name == "default":
        yield None
        return
    ex: Executor
    if name == "threads":
        ex = ThreadPoolExecutor(max_workers=3)
    elif name == "processes":
        ex = ProcessPoolExecutor(max_workers=2)
    else:
        ex = ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn"))
    with ex:
        yield ex


@pytest.mark.slow
def test_same_point_on_any_executor(site: Site) -> None:
    """The same job on forked workers, a thread pool and process pools, each into its own vault."""
    cfg = load_config(site.config("none", hooks=None))
    vaults = {}
    for name in EXECUTORS:
        v = site.root / f"vault-{name}"
        Vault.init(v)
        vaults[name] = v
    results: dict[str, list[Any]] = {name: [] for name in EXECUTORS}
    truths = []
    for day in range(2):
        if day:
            scribble(site.disks["os"], seed=11, pages=25)
            scribble(site.disks["db"], seed=12, pages=5)
        truths.append({lb: truth_hash(np.fromfile(p, np.uint8), BS)
                       for lb, p in site.disks.items()})
        for name in EXECUTORS:
            c = dataclasses.replace(cfg, vault=str(vaults[name]))
            with executor(name) as ex:
                (res,) = jobs_api.run(c, executor=ex)
            assert res.error is None and res.point is not None, (name, res.error)
            results[name].append(res.point)
    for day in range(2):
        ref = results["default"][day]
        for name in EXECUTORS:
            vault = Vault.open(vaults[name])
            point = vault.point(results[name][day].id)
            assert point.bytes_new == ref.bytes_new, name
            assert [(d.label, d.bytes_new, d.changed_blocks) for d in point.disks] == \
                [(d.label, d.bytes_new, d.changed_blocks) for d in ref.disks], name
            for label in site.disks:
                m = vault.resolve(point, label)
                digests, flags = truths[day][label]
                np.testing.assert_array_equal(m.flags, flags, err_msg=f"{name} {label}")
                np.testing.assert_array_equal(m.digests, digests, err_msg=f"{name} {label}")
        assert results["default"][day].consistency == "crash"
    assert 0 < results["default"][1].bytes_new < results["default"][0].bytes_new


@pytest.mark.parametrize("name", ["threads", "processes"])
def test_one_pool_for_every_vm_of_a_config(site: Site, name: str) -> None:
    """cbt.jobs.run(config, executor=pool): one pool serves the jobs of every VM, run after run."""
    cfg = job_config(site.root / "two.toml", {
        "web": {"disks": {"os": "disks/os.img"}, "snapshot": "none"},
        "db": {"disks": {"db": "disks/db.img"}, "snapshot": "none"},
    })
    with executor(name) as ex:
        for _ in range(2):
            results = jobs_api.run(cfg, executor=ex)
            assert [(r.vm, r.error) for r in results] == [("web", None), ("db", None)]
    assert len(point_ids(site.vault)) == 4
    assert [j["status"] for j in jobs_json(site.vault)] == ["succeeded"] * 4
