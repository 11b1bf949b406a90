"""Pre- and post-snapshot hooks: argv lists (never shell strings) with a timeout.

A hook runs in its own session, so at the timeout its whole process group is
killed, children included.  Its stdout is discarded (cbt's own stdout may be
JSON); the tail of its stderr is kept for the consistency reason.  The
environment carries ``CBT_VM``, ``CBT_PHASE`` (pre, post or recover) and
``CBT_POINT`` (the id the recovery point will have).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

STDERR_TAIL = 300


@dataclass
class HookResult:
    phase: str
    ok: bool
    exit_code: int | None
    timed_out: bool
    stderr_tail: str
    seconds: float
    error: str | None = None  # could not be started

    def describe(self) -> str:
        """``pre hook failed (exit 3): <stderr tail>`` and the like."""
        if self.ok:
            return f"{self.phase} hook succeeded"
        if self.error:
            return f"{self.phase} hook could not start: {self.error}"
        if self.timed_out:
            what = f"{self.phase} hook timed out after {self.seconds:.0f} s"
        else:
            what = f"{self.phase} hook failed (exit {self.exit_code})"
        tail = " ".join(self.stderr_tail.split())
        return f"{what}: {tail}" if tail else what


def run_hook(argv: Sequence[str], phase: str, vm: str, point: str,
             timeout: float, cwd: str | None = None) -> HookResult:
    env = dict(os.environ, CBT_VM=vm, CBT_PHASE=phase, CBT_POINT=point)
    started = time.monotonic()
    try:
        proc = subprocess.Popen(list(argv), env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True, cwd=cwd)
    except OSError as exc:
        return HookResult(phase, False, None, False, "", 0.0, error=str(exc))
    timed_out = False
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc.pid)
        try:
            _, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:  # a grandchild left its own session holding stderr
            proc.kill()
            err = b""
    except BaseException:
        _kill_group(proc.pid)
        proc.wait()
        raise
    seconds = time.monotonic() - started
    tail = err.decode(errors="replace")[-STDERR_TAIL:]
    ok = not timed_out and proc.returncode == 0
    return HookResult(phase, ok, proc.returncode if not timed_out else None, timed_out, tail,
                      seconds)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
