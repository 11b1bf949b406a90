"""Pre- and post-snapshot hooks: argv lists (never shell strings) with a timeout.

A hook runs in its own session.  Its result is its exit status: cbt reads its
stdout and stderr only while the hook process lives (and for
:data:`DRAIN_SECONDS` after it exits, for what is still in the pipes), so a hook
that leaves a child running (``sleep 600 & exit 0``, to hold a lock until the
post hook) succeeds when it exits, and that child is left alone: what it still
writes to the hook's stdout and stderr is read by a thread and thrown away (its
writes neither fail nor block, no SIGPIPE ends it) until it closes them.
A hook still running at its timeout is killed with its whole process group,
children included.  Of each stream only the last :data:`TAIL_BYTES` are kept
while reading (a flood costs no memory); the stderr tail gives the consistency
reason, and both tails (their last :data:`RECORD_TAIL` bytes) go into the job's
record (``hooks``).  The environment carries ``CBT_VM``, ``CBT_PHASE`` (pre,
post or recover) and ``CBT_POINT`` (the id the recovery point will have).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any

from cbt.jobs.signals import signals_deferred

STDERR_TAIL = 300  # characters of stderr in a failure's description
TAIL_BYTES = 64 << 10  # kept of each stream while reading
RECORD_TAIL = 4 << 10  # of each kept tail, what the job record stores
DRAIN_SECONDS = 0.5  # reading on after the hook exited (a child may hold its pipes)
_CHUNK = 1 << 16
DISCARD_PAUSE = 0.01  # after each chunk read from what a hook's child left writing


@dataclass
class HookResult:
    phase: str
    ok: bool
    exit_code: int | None
    timed_out: bool
    stderr_tail: str
    seconds: float
    error: str | None = None  # could not be started
    stdout_tail: str = ""

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
        tail = " ".join(self.stderr_tail[-STDERR_TAIL:].split())
        tail = "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" if ord(ch) < 256
                       else "?" for ch in tail)  # printed to terminals and logs: no escapes
        return f"{what}: {tail}" if tail else what

    def to_record(self) -> dict[str, Any]:
        """The entry of the job record's ``hooks`` list (tails cut to :data:`RECORD_TAIL`)."""
        return {"phase": self.phase, "ok": self.ok, "exit_code": self.exit_code,
                "timed_out": self.timed_out, "seconds": round(self.seconds, 3),
                "error": self.error, "stdout": _last(self.stdout_tail, RECORD_TAIL),
                "stderr": _last(self.stderr_tail, RECORD_TAIL)}


def run_hook(argv: Sequence[str], phase: str, vm: str, point: str,
             timeout: float, cwd: str | None = None) -> HookResult:
    env = dict(os.environ, CBT_VM=vm, CBT_PHASE=phase, CBT_POINT=point)
    started = time.monotonic()
    proc: subprocess.Popen[bytes] | None = None
    tails: _Tails | None = None
    try:
        # (a job's abort by SIGTERM waits until the hook is started and known here, and
        # is delivered as the block ends, inside this try: raised inside Popen, it left
        # the hook running, unkilled)
        with signals_deferred():
            try:
                proc = subprocess.Popen(list(argv), env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        start_new_session=True, cwd=cwd)
            except OSError as exc:
                return HookResult(phase, False, None, False, "", 0.0, error=str(exc))
            tails = _Tails(proc)
        assert proc is not None and tails is not None  # (set in the block, or it raised)
        timed_out = not tails.read_until_exit(started + timeout)
        if timed_out:
            _kill_group(proc.pid)
            proc.kill()
            proc.wait()
        tails.drain(time.monotonic() + DRAIN_SECONDS)
        tails.hand_off()
    except BaseException:
        if proc is not None:
            _kill_group(proc.pid)
            proc.kill()
            proc.wait()
        raise
    finally:
        if tails is not None:
            tails.close()
    seconds = time.monotonic() - started
    ok = not timed_out and proc.returncode == 0
    return HookResult(phase, ok, None if timed_out else proc.returncode, timed_out,
                      tails.text("stderr"), seconds, stdout_tail=tails.text("stdout"))


class _Tails:
    """Reads a process's stdout and stderr, keeping the last :data:`TAIL_BYTES` of each."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.sel = selectors.DefaultSelector()
        self.kept = {"stdout": bytearray(), "stderr": bytearray()}
        for name in self.kept:
            pipe: IO[bytes] | None = getattr(proc, name)
            if pipe is not None:
                os.set_blocking(pipe.fileno(), False)
                self.sel.register(pipe, selectors.EVENT_READ, name)
        self.handed: list[Any] = []  # pipes :meth:`hand_off` gave to a thread
        self.pidfd: int | None = None
        with contextlib.suppress(AttributeError, OSError):  # Linux >= 5.3: woken at its exit
            self.pidfd = os.pidfd_open(proc.pid)
            self.sel.register(self.pidfd, selectors.EVENT_READ, None)

    def read_until_exit(self, deadline: float) -> bool:
        """Read until the process exits (True) or ``deadline`` passes (False)."""
        while self.proc.poll() is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._read_once(min(left, 0.05 if self.pidfd is None else left))
        return True

    def drain(self, deadline: float) -> None:
        """What is left in the pipes, until both are closed or ``deadline`` passes."""
        if self.pidfd is not None:
            self.sel.unregister(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None
        while self.sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._read_once(left)

    def hand_off(self) -> None:
        """The pipes a child the hook left still holds go to a thread that reads them,
        throwing the data away, until that child closes them (:func:`_discard`)."""
        left = [key.fileobj for key in list(self.sel.get_map().values())]
        for pipe in left:
            self.sel.unregister(pipe)
        if left:
            self.handed = left
            threading.Thread(target=_discard, args=(self.handed,), name="cbt-hook-output",
                             daemon=True).start()

    def _read_once(self, wait: float) -> None:
        for key, _ in self.sel.select(wait):
            if key.data is None:  # the pidfd: the process exited
                continue
            try:
                chunk = os.read(key.fd, _CHUNK)
            except BlockingIOError:
                continue
            if not chunk:
                self.sel.unregister(key.fileobj)
                continue
            kept = self.kept[key.data]
            kept += chunk
            if len(kept) > 2 * TAIL_BYTES:
                del kept[:-TAIL_BYTES]

    def text(self, name: str) -> str:
        return bytes(self.kept[name][-TAIL_BYTES:]).decode(errors="replace")

    def close(self) -> None:
        """Stop reading: our ends of the pipes closed (a child left behind keeps its own)."""
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        self.sel.close()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None and pipe not in self.handed:
                pipe.close()


def _discard(pipes: list[Any]) -> None:
    """Read ``pipes`` until each is closed at its other end, keeping nothing; at most
    :data:`_CHUNK` per :data:`DISCARD_PAUSE` (a child that floods them waits on the full
    pipe instead of keeping a core busy here)."""
    with selectors.DefaultSelector() as sel:
        for pipe in pipes:
            sel.register(pipe, selectors.EVENT_READ)
        while sel.get_map():
            for key, _ in sel.select():
                try:
                    chunk = os.read(key.fd, _CHUNK)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                if not chunk:
                    sel.unregister(key.fileobj)
                    key.fileobj.close()  # type: ignore[union-attr]
                else:
                    time.sleep(DISCARD_PAUSE)


def _last(text: str, limit: int) -> str:
    """The end of ``text``: at most ``limit`` bytes of its UTF-8."""
    data = text.encode(errors="replace")
    return data[-limit:].decode(errors="ignore") if len(data) > limit else text


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
