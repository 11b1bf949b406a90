"""Hooks cannot take cbt down (issue 12): a flood of output costs no memory, a hook's
result is its exit status (a child it leaves running is neither waited for nor
killed), its stdout goes into the job record, a hook that runs too long is still
killed with its process group.

Hooks here are real ``sh`` scripts; jobs run as real ``cbt backup --config``
processes, their peak RSS taken from the kernel (``getrusage`` in a fresh wrapper).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import MIB
from helpers.cli import cbt_argv, kill_if_alive, process_gone, run_measured, wait_for
from helpers.images import make_disk
from helpers.jobs import backup_config, job_config, jobs_json

from cbt.api import Vault
from cbt.jobs.hooks import RECORD_TAIL, run_hook

FLOOD = 13 * 20 * MIB  # per stream: 260 MiB of whole 13-byte lines


@pytest.fixture
def site(tmp_path: Path) -> Path:
    root = tmp_path.resolve()
    make_disk(root / "disks" / "os.img", 1 * MIB, seed=1)
    Vault.init(root / "vault")
    return root


def _config(root: Path, pre: str, post: str | None = None, timeout: float = 30) -> Path:
    hooks: dict[str, Any] = {"pre": ["sh", "-c", pre], "timeout": timeout}
    if post is not None:
        hooks["post"] = ["sh", "-c", post]
    return job_config(root / "cbt.toml", {"web": {
        "disks": {"os": "disks/os.img"}, "snapshot": "copy", "block_size": "64K",
        "hooks": hooks}})


def test_a_flooding_hook_costs_no_memory(site: Path) -> None:
    """260 MiB on stderr and 260 MiB on stdout: the job's peak RSS stays far below."""
    script = (f"yes stderr-flood | head -c {FLOOD} >&2; yes stdout-flood | head -c {FLOOD}; "
              "echo last-out; echo last-err >&2")
    cfg = _config(site, script)
    code, _, err, rss = run_measured(cbt_argv("backup", "--config", cfg, "--json"))
    assert code == 0, err
    assert rss < 200 * MIB, f"peak RSS {rss / MIB:.0f} MiB"
    (job,) = jobs_json(site / "vault")
    (pre,) = job["hooks"]
    assert pre["phase"] == "pre" and pre["ok"] and pre["exit_code"] == 0
    assert pre["stdout"].endswith("stdout-flood\nlast-out\n")
    assert pre["stderr"].endswith("stderr-flood\nlast-err\n")
    assert len(pre["stdout"].encode()) <= RECORD_TAIL
    assert len(pre["stderr"].encode()) <= RECORD_TAIL
    assert job["consistency"] == "application"


@pytest.fixture
def child_pid(site: Path) -> Iterator[Path]:
    """The pid file a hook's background child is written to; that child killed after."""
    pidfile = site / "child.pid"
    yield pidfile
    if pidfile.exists():
        kill_if_alive(int(pidfile.read_text()))


def test_a_hook_that_leaves_a_child_succeeds_promptly(site: Path, child_pid: Path) -> None:
    """``sleep 600 & exit 0``: the hook succeeded when it exited; its child (which holds
    the pipes) is not waited for nor killed; the point is application-consistent."""
    pre = f"sleep 600 & echo $! > {child_pid}; echo holding the lock; exit 0"
    cfg = _config(site, pre, post="echo released", timeout=60)
    started = time.monotonic()
    r, lines = backup_config(cfg)
    took = time.monotonic() - started
    assert r.returncode == 0, r.stderr
    assert took < 20, took
    (line,) = lines
    assert line["consistency"] == "application", line
    pid = int(child_pid.read_text())
    assert not process_gone(pid), "the hook's background child was killed"
    os.kill(pid, 0)
    (job,) = jobs_json(site / "vault")
    assert [h["phase"] for h in job["hooks"]] == ["pre", "post"]
    assert job["hooks"][0]["stdout"] == "holding the lock\n"
    assert job["hooks"][1]["stdout"] == "released\n"
    assert not job["hooks"][0]["timed_out"]


def test_run_hook_returns_at_exit_not_at_pipe_close(tmp_path: Path, child_pid: Path) -> None:
    res = run_hook(["sh", "-c", f"sleep 600 & echo $! > {child_pid}; echo out; exit 0"],
                   "pre", "web", "web.x", timeout=30)
    assert res.ok and res.exit_code == 0 and not res.timed_out, res
    assert res.seconds < 5, res.seconds
    assert res.stdout_tail == "out\n"
    assert not process_gone(int(child_pid.read_text()))


def test_a_hook_that_runs_too_long_is_killed_with_its_group(child_pid: Path) -> None:
    """Past its timeout the hook and the child it started (its process group) are killed."""
    res = run_hook(["sh", "-c", f"sleep 600 & echo $! > {child_pid}; echo started >&2; "
                    "sleep 600"], "pre", "web", "web.x", timeout=1)
    assert res.timed_out and not res.ok and res.exit_code is None, res
    assert res.seconds < 5, res.seconds
    assert res.stderr_tail == "started\n"
    assert "timed out after 1 s: started" in res.describe()
    wait_for(lambda: process_gone(int(child_pid.read_text())), 10, "the child killed")


def test_a_failing_hook_keeps_its_exit_code_and_tails() -> None:
    res = run_hook(["sh", "-c", "echo out; echo why >&2; exit 3"], "pre", "web", "web.x",
                   timeout=10)
    assert not res.ok and res.exit_code == 3 and not res.timed_out
    assert (res.stdout_tail, res.stderr_tail) == ("out\n", "why\n")
    assert res.describe() == "pre hook failed (exit 3): why"


def test_a_signal_during_a_hook_kills_it(tmp_path: Path) -> None:
    """KeyboardInterrupt (an abort) while a hook runs: the hook's group is killed."""
    pidfile = tmp_path / "hook.pid"
    code = ("import signal, sys\n"
            "from cbt.jobs.hooks import run_hook\n"
            "signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))\n"
            "signal.alarm(1)\n"
            "try:\n"
            f"    run_hook(['sh', '-c', 'echo $$ > {pidfile}; sleep 600'], 'pre', 'w', 'p', 60)\n"
            "except KeyboardInterrupt:\n"
            "    sys.exit(7)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=30, check=False)
    assert r.returncode == 7, r.stderr
    wait_for(lambda: process_gone(int(pidfile.read_text())), 10, "the hook killed")


def test_hook_runs_round_trip_through_the_job_record(tmp_path: Path) -> None:
    """Each kind of run (failed to start, failed, timed out, succeeded) is a valid entry of
    a job record's ``hooks``; a malformed entry makes the record not one."""
    from cbt.format.records import JobRecord

    runs = [run_hook([str(tmp_path / "missing")], "pre", "web", "web.x", timeout=5),
            run_hook(["sh", "-c", "echo é; exit 4"], "post", "web", "web.x", timeout=5),
            run_hook(["sleep", "5"], "recover", "web", "web.x", timeout=0.2)]
    assert runs[0].error and runs[1].exit_code == 4 and runs[2].timed_out
    rec = JobRecord(id="web.20260101T000000Z.abcdef", vm="web", policy="p",
                    start="2026-01-01T00:00:00Z", hooks=[r.to_record() for r in runs])
    back = JobRecord.from_json(rec.to_json())
    assert back.hooks == rec.hooks and back.hooks[1]["stdout"] == "é\n"
    assert back.to_dict()["hooks"][2]["exit_code"] is None
    bad = rec.to_json().replace(b'"timed_out": true', b'"timed_out": 1')
    with pytest.raises(ValueError, match="hook run"):
        JobRecord.from_json(bad)
