"""Running ``cbt`` as scripts do: a separate process, its exit code, its JSON lines.

Every helper here runs the real executable (the console script beside this
interpreter, else ``python -m cbt.cli.main``) with no CBT_* variable inherited,
and checks the output shape it relies on.  Processes started in their own
session can be signalled as a group without touching pytest.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

# The console script beside this interpreter (no pyenv shim in between), else PATH.
_CBT = (str(Path(sys.executable).with_name("cbt"))
        if Path(sys.executable).with_name("cbt").exists() else shutil.which("cbt"))


def cbt_argv(*args: object) -> list[str]:
    """The argv of a real ``cbt`` process (the console script, else ``python -m``)."""
    head = [_CBT] if _CBT else [sys.executable, "-m", "cbt.cli.main"]
    return [*head, *map(str, args)]


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment without any CBT_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CBT_")}
    env.update(extra or {})
    return env


def crash_env(step: int, where: Path) -> dict[str, str]:
    """The environment that SIGKILLs a run at its ``step``-th durable step.

    The step counter is a fresh file under ``where`` (the test's tmp_path): left to
    itself, cbt would make one in the system temp directory and leave it there.
    """
    fd, counter = tempfile.mkstemp(prefix="crash-counter-", dir=where)
    os.close(fd)
    return {"CBT_CRASH_AT": str(step), "CBT_CRASH_COUNTER": counter}


def cbt(*args: object, env: Mapping[str, str] | None = None, timeout: float = 120,
        cwd: str | os.PathLike[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``cbt ARGS...`` as a separate process, capturing text output."""
    return subprocess.run(cbt_argv(*args), capture_output=True, text=True,
                          env=clean_env(env), timeout=timeout, cwd=cwd, check=False)


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def result_lines(text: str) -> list[dict[str, Any]]:
    """The JSON lines of a command's output, progress lines aside."""
    return [x for x in json_lines(text) if x.get("type") != "progress"]


def cbt_json(*args: object, env: Mapping[str, str] | None = None,
             timeout: float = 300) -> dict[str, Any]:
    """A ``--json`` command that must succeed: its one result object (progress aside)."""
    r = cbt(*args, "--json", env=env, timeout=timeout)
    assert r.returncode == 0, (args, r.returncode, r.stdout, r.stderr)
    lines = result_lines(r.stdout)
    assert len(lines) == 1, r.stdout
    return lines[0]


def one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    """The single ``cbt: error: ...`` line of a failed command (exit 2)."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("cbt: error: ") or ": error: " in lines[0], lines[0]
    return lines[0]


def backup_cli(vault: Path, vm: str, *args: object, now: str | None = None,
               env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``cbt backup VAULT ARGS... --vm VM [--now T] --json`` that must succeed: the point line.

    ``args`` are the disks and any further options.
    """
    line = cbt_json("backup", vault, *args, "--vm", vm, *(["--now", now] if now else []),
                    env=env)
    assert line["type"] == "point", line
    return line


# -- processes in their own session ------------------------------------------------------


def start_cbt(*args: object, env: Mapping[str, str] | None = None,
              stdout: Any = subprocess.PIPE, stderr: Any = subprocess.PIPE
              ) -> subprocess.Popen[str]:
    """A cbt process in a new session (its process group can be signalled alone)."""
    return subprocess.Popen(cbt_argv(*args), env=clean_env(env), stdout=stdout,
                            stderr=stderr, text=True, start_new_session=True)


def kill_group(p: subprocess.Popen[Any]) -> None:
    """SIGCONT then SIGKILL this test's own process group, and reap it."""
    for sig in (signal.SIGCONT, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, sig)
    with contextlib.suppress(Exception):
        p.wait(timeout=10)


@contextlib.contextmanager
def cleanup_group(p: subprocess.Popen[Any]) -> Iterator[subprocess.Popen[Any]]:
    """The process, its group killed afterwards if it still runs."""
    try:
        yield p
    finally:
        if p.poll() is None:
            kill_group(p)


def run_in_session(*args: object, env: Mapping[str, str] | None = None,
                   timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run cbt to the end in its own session (a CBT_CRASH_AT kill spares pytest)."""
    p = start_cbt(*args, env=env)
    try:
        out, err = p.communicate(timeout=timeout)
    except BaseException:
        kill_group(p)
        raise
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def wait_for(cond: Callable[[], Any], timeout: float = 60.0, what: str = "condition",
             interval: float = 0.005) -> Any:
    """Poll ``cond`` until it is true (returned) or ``timeout`` seconds pass (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def process_gone(pid: int) -> bool:
    """No such process, or only a zombie nobody reaped yet (it no longer runs)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def kill_if_alive(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    return ticks / os.sysconf("SC_CLK_TCK")


_MEASURE = """
import json, resource, subprocess, sys
r = subprocess.run(sys.argv[1:], capture_output=True, text=True, check=False)
print(json.dumps({"rc": r.returncode, "out": r.stdout, "err": r.stderr,
                  "maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def run_measured(argv: list[str], env: Mapping[str, str] | None = None,
                 timeout: float = 600) -> tuple[int, str, str, int]:
    """Run ``argv`` under a fresh small wrapper process: its exit code, stdout, stderr and
    peak RSS in bytes (of the largest of it and its forked workers, as
    ``getrusage(RUSAGE_CHILDREN)`` reports).  Not measured from the test process itself:
    a child forked from a large process (pytest with the whole suite loaded) starts
    with that process's RSS, and ``ru_maxrss`` would report it."""
    r = subprocess.run([sys.executable, "-c", _MEASURE, *argv], capture_output=True, text=True,
                       env=dict(env) if env is not None else clean_env(), timeout=timeout,
                       check=True)
    got = json.loads(r.stdout)
    return int(got["rc"]), str(got["out"]), str(got["err"]), int(got["maxrss_kib"]) * 1024


def on_a_terminal(*args: object, columns: str = "100") -> tuple[int, str, bytes]:
    """Run cbt with stderr on a pty (a terminal: progress bars on); exit code, stdout, and
    what the terminal got."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(cbt_argv(*args), stdout=subprocess.PIPE, stderr=slave,
                                text=True, env=clean_env({"COLUMNS": columns}))
        os.close(slave)
        seen = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # (EIO: the last writer closed the pty)
                break
            if not chunk:
                break
            seen += chunk
        out = proc.communicate(timeout=120)[0]
    finally:
        os.close(master)
    assert b"Traceback" not in seen, seen.decode(errors="replace")
    return proc.returncode, out, seen
