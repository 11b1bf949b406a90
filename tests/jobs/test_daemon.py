"""`cbt daemon`: runs a due job at once, logs one line per job, finishes the job in
flight on SIGTERM and exits 0; idle, it sleeps (no busy polling) and stops promptly
(issue 6).  The daemon is a real process in its own session, on the real clock."""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import MIB
from helpers.cli import cbt, cleanup_group, cpu_seconds, start_cbt, wait_for
from helpers.images import assert_same_bytes, copy_disk, write_random_disk
from helpers.jobs import hook_argv, hook_lines, run_due, set_ctl, write_config
from helpers.packs import pack_set
from helpers.vaults import listed, point_record, restore

from cbt.core.parallel import WorkerError, fork_map

LOG_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ (DEBUG|INFO|WARNING|ERROR) \S.*")


def _log_lines(path: Path) -> list[str]:
    """The daemon's log (its stderr): every line "TIME LEVEL text"."""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
    for ln in lines:
        assert LOG_LINE.fullmatch(ln), lines
    return lines


def _hour_floor(t: dt.datetime) -> str:
    return t.replace(minute=0, second=0, microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.slow
def test_daemon_runs_the_due_job_and_finishes_it_on_sigterm(tmp_path: Path) -> None:
    """An hourly schedule with no point yet: jobs are due at once.  SIGTERM goes to the
    daemon's whole process group twice - while web's pre hook sleeps, and again while
    web's disk is being transferred (its workers get it too).  The job in flight is
    finished and committed, no job starts after the signal, the daemon logs the job
    and that it stopped, and exits 0."""
    state = tmp_path / "hook"
    argv = hook_argv(state)
    set_ctl(state, "pre", sleep=2)
    disk = write_random_disk(tmp_path / "disks" / "os.img", 128 * MIB, seed=21)
    write_random_disk(tmp_path / "disks" / "db.img", 256 << 10, seed=23)
    truth = copy_disk(disk, tmp_path / "truth" / "os.img")
    hooks = {"pre": argv, "post": argv, "timeout": 60}
    cfg = write_config(tmp_path / "cbt.toml", {"hourly": {"schedule": "every 1h"}},
                       {"web": {"policy": "hourly", "disks": {"os": "disks/os.img"},
                                "snapshot": "none", "hooks": hooks},
                        "db": {"policy": "hourly", "disks": {"db": "disks/db.img"},
                               "snapshot": "none", "hooks": hooks}})
    vault = tmp_path / "vault"
    assert cbt("init", "--encryption", "none", vault).returncode == 0
    log = tmp_path / "daemon.log"
    before = dt.datetime.now(dt.UTC)
    with open(log, "w") as out:
        proc = start_cbt("daemon", "--config", cfg, stderr=out)
    with cleanup_group(proc):
        wait_for(lambda: any(ln.startswith("pre web") for ln in hook_lines(state))
                 or proc.poll() is not None, what="the pre hook")
        assert proc.poll() is None, log.read_text()
        t_term = time.time()
        os.killpg(proc.pid, signal.SIGTERM)  # mid-job: the pre hook is sleeping
        packs0 = pack_set(vault)
        wait_for(lambda: pack_set(vault) - packs0 or proc.poll() is not None,
                 what="the transfer")
        transferring = proc.poll() is None
        if transferring:
            os.killpg(proc.pid, signal.SIGTERM)  # mid-transfer, workers included
        rc = proc.wait(timeout=120)
        after = dt.datetime.now(dt.UTC)
        _, err = proc.communicate()
    assert rc == 0, (log.read_text(), err)
    assert transferring, "the job ended before the second SIGTERM (use a larger disk)"

    # a job that had started before the signal may have finished; none started after it
    hooks_seen = [ln.split() for ln in hook_lines(state)]
    assert not [h for h in hooks_seen if h[0] == "pre" and float(h[2]) > t_term], hooks_seen
    started = {h[1] for h in hooks_seen if h[0] == "pre"}
    assert "web" in started
    points = listed(vault)
    assert {p["vm"] for p in points} == started, (points, hooks_seen)
    pid = next(p["recovery_point"] for p in points if p["vm"] == "web")
    assert point_record(vault, pid)["slot"] in {_hour_floor(before), _hour_floor(after)}
    restore(vault, pid, tmp_path / "r")
    assert_same_bytes(tmp_path / "r" / "os.img", truth)
    web_phases = [h[0] for h in hooks_seen if h[1] == "web"]
    assert web_phases == ["pre", "post"], hooks_seen

    lines = _log_lines(log)
    for p in points:  # one line per job's end, one per its start
        job_lines = [ln for ln in lines if p["recovery_point"] in ln]
        assert len(job_lines) == 1, lines
        assert f" INFO backup {p['vm']}: point {p['recovery_point']} " in job_lines[0], lines
        assert len([ln for ln in lines if f" INFO backup {p['vm']}: started " in ln]) == 1
    assert "received SIGTERM" in "\n".join(lines)
    assert lines[-1].endswith(" INFO daemon stopped"), lines
    assert not any(" ERROR " in ln or "failed" in ln for ln in lines), lines


@pytest.mark.slow
def test_idle_daemon_sleeps_without_polling_and_stops_promptly(tmp_path: Path) -> None:
    """The latest slot already has its point: nothing is due.  The daemon uses (almost)
    no CPU while it waits for the next slot, and stops at once on SIGTERM, exit 0."""
    write_random_disk(tmp_path / "disks" / "os.img", 256 << 10, seed=22)
    # a daily slot 6 hours ago (UTC): the latest slot stays the same for 18 hours
    at = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=6)).strftime("%H:%M")
    cfg = write_config(tmp_path / "cbt.toml", {"d": {"schedule": f"daily {at}"}},
                       {"web": {"policy": "d", "disks": {"os": "disks/os.img"},
                                "snapshot": "none"}})
    vault = tmp_path / "vault"
    assert cbt("init", "--encryption", "none", vault).returncode == 0
    rc, s, _, _ = run_due(cfg)  # fill the latest slot (real clock)
    assert rc == 0 and len(s["ran"]) == 1
    assert len(listed(vault)) == 1

    log = tmp_path / "daemon.log"
    with open(log, "w") as out:
        proc = start_cbt("daemon", "--config", cfg, stderr=out)
    with cleanup_group(proc):
        # let it start up (imports, config, the due check): until its CPU time settles
        last = [-1.0]

        def settled() -> bool:
            now = cpu_seconds(proc.pid)
            done = now == last[0] and len(_log_lines(log)) >= 1
            last[0] = now
            return done

        wait_for(settled, timeout=30, what="the daemon to settle", interval=0.3)
        assert proc.poll() is None, log.read_text()
        c0 = cpu_seconds(proc.pid)
        time.sleep(2.0)
        used = cpu_seconds(proc.pid) - c0
        assert used <= 0.05, f"the idle daemon used {used:.2f} s of CPU in 2 s (polling?)"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=10)
        took = time.monotonic() - t0
        _, err = proc.communicate()
    assert rc == 0, (log.read_text(), err)
    assert took < 3.0, f"took {took:.1f} s to stop"
    lines = _log_lines(log)
    assert lines[-1].endswith(" INFO daemon stopped"), lines
    assert not any(": point " in ln or ": started " in ln or "ERROR" in ln for ln in lines), lines
    assert any(" INFO backup web: skipped, slot " in ln for ln in lines), lines  # at start
    assert len(listed(vault)) == 1



def _terminate_self(task: int, report: Callable[[int], None]) -> int:
    """A worker's task: SIGTERM to itself (as a daemon's stopped process group gets it),
    then the answer."""
    os.kill(os.getpid(), signal.SIGTERM)
    return task * 3


def test_worker_signal_policy_is_passed_in_per_call() -> None:
    """fork_map's workers ignore SIGTERM only when the call asks; a call that asked
    leaves nothing behind for the next one (no module state) nor in this process."""
    old = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # what the workers inherit
    try:
        assert fork_map(_terminate_self, [1, 2, 3], ignore_stop_signals=True) == [3, 6, 9]
        with pytest.raises(WorkerError, match="without a result"):
            fork_map(_terminate_self, [1, 2, 3])
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, old)
