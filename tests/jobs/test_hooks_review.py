"""Hooks, found by the review of issue 12's part C: a child a hook leaves running (to
hold a lock until the post hook) may still write to the hook's stdout and stderr after
the hook exited, and lives on (was: killed by SIGPIPE at its first write, its lock gone).

Hooks are real ``sh`` scripts.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cbt.jobs.hooks import run_hook


def test_a_child_left_by_a_hook_may_write_and_lives_on(tmp_path: Path) -> None:
    alive, pid_file = tmp_path / "alive", tmp_path / "pid"
    script = ('sh -c \'echo $$ > "$0"; sleep 1.5; echo held; echo held >&2; sleep 0.5; '
              'touch "$1"; sleep 30\' "$1" "$2" & exit 0')
    started = time.monotonic()
    res = run_hook(["sh", "-c", script, "hook", str(pid_file), str(alive)], "pre", "web",
                   "web.x", 20)
    assert res.ok and time.monotonic() - started < 1.4, res
    deadline = time.monotonic() + 10
    while not alive.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert alive.exists(), "the hook's child died when it wrote"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(os.getpgid(int(pid_file.read_text())), signal.SIGKILL)


def test_a_hooks_stderr_in_a_message_has_no_control_characters() -> None:
    """The stderr tail in a failure's one line is printed to a terminal and to logs:
    escape sequences (a title change, colours, a cursor move), other control characters
    and invalid UTF-8 show as printable text, never as what they would do."""
    noise = r"printf 'bad \033]0;pwned\007 \033[2J\033[31mred\r\bx\177\302\233y\377 end' >&2"
    res = run_hook(["sh", "-c", noise + "; exit 3"], "pre", "web", "web.x", 10)
    line = res.describe()
    assert line.startswith("pre hook failed (exit 3): bad"), line
    assert line.endswith("end"), line
    assert all(ch.isprintable() for ch in line), repr(line)
    assert "pwned" in line and "red" in line  # the text itself is kept


def test_a_pre_hook_cut_short_by_sigterm_is_in_the_job_record(tmp_path: Path) -> None:
    """SIGTERM while the pre hook runs: the job fails, the hook's group is killed, the
    post hook runs, and the pre hook's run is in the record too (was: only the post's)."""
    from helpers.cli import cbt_argv, clean_env, process_gone, wait_for
    from helpers.images import make_disk
    from helpers.jobs import job_config, jobs_json

    from cbt.api import Vault

    root = tmp_path.resolve()
    make_disk(root / "disks" / "os.img", 1 << 20, seed=1)
    Vault.init(root / "vault")
    started = root / "pre.pid"
    cfg = job_config(root / "cbt.toml", {"web": {
        "disks": {"os": "disks/os.img"}, "snapshot": "copy", "block_size": "64K",
        "hooks": {"pre": ["sh", "-c", f"echo $$ > {started}; echo freezing; sleep 60"],
                  "post": ["sh", "-c", "echo thawed"], "timeout": 120}}})
    proc = subprocess.Popen(cbt_argv("backup", "--config", cfg), env=clean_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: started.exists() and started.read_text().strip(), 30, "the pre hook")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 2, err
    wait_for(lambda: process_gone(int(started.read_text())), 10, "the hook killed")
    (job,) = jobs_json(root / "vault")
    assert job["status"] == "failed" and "SIGTERM" in job["error"]
    assert [(h["phase"], h["ok"]) for h in job["hooks"]] == [("pre", False), ("post", True)]
    pre = job["hooks"][0]
    assert "SIGTERM" in pre["error"] and pre["exit_code"] is None and not pre["timed_out"]


def test_sigterm_while_the_hook_is_being_started_kills_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job's SIGTERM that lands inside ``Popen`` (the hook started, its process not yet
    known to cbt): the abort waits until it is known, then kills it (was: raised inside
    Popen, the hook was left running).  The signal is sent from within Popen itself."""
    from helpers.cli import process_gone

    import cbt.jobs.hooks as hooks_mod
    from cbt.jobs.job import JobAborted, abort_on_signals

    real = subprocess.Popen
    started: list[int] = []

    def popen(*a: object, **kw: object) -> subprocess.Popen[bytes]:
        proc = real(*a, **kw)  # type: ignore[call-overload]
        started.append(proc.pid)
        os.kill(os.getpid(), signal.SIGTERM)  # (Python runs the handler at once: here)
        time.sleep(0.2)
        return proc  # type: ignore[no-any-return]

    monkeypatch.setattr(hooks_mod.subprocess, "Popen", popen)
    with abort_on_signals(), pytest.raises(JobAborted, match="SIGTERM"):
        run_hook(["sh", "-c", "sleep 60"], "pre", "web", "web.x", 120)
    (pid,) = started
    deadline = time.monotonic() + 10
    while not process_gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert process_gone(pid), "the hook was left running"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
