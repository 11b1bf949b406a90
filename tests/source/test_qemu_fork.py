"""Forked transfer workers and the QMP connection: close-on-exec does not help with fork,
so a worker inherits the socket of its parent's QEMU monitor.  It must not be able to
talk on it, and a killed parent must not leave QEMU's monitor (one client at a time)
held by a worker that outlives it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.qmp_daemon import Daemon, storage_daemon

from cbt.source.qemu import QemuError, QmpSession

MIB = 1 << 20


@pytest.fixture
def daemon(tmp_path: Path):
    with storage_daemon(tmp_path, {"os": 1 * MIB}) as d:
        yield d


# a cbt run: a QMP session, then a forked worker (as the transfer's executor forks them);
# the worker says where its inherited descriptor points, and whether QMP still works there
_PARENT = """
import os, sys, time
from cbt.source.qemu import QmpSession, QemuError
s = QmpSession(sys.argv[1])
fd = s._fd
pid = os.fork()
if pid == 0:
    where = os.readlink(f"/proc/self/fd/{fd}")
    try:
        s.command("query-version")
        said = "talked"
    except QemuError as exc:
        said = str(exc)
    os.write(1, f"{where} | {said}\\n".encode())  # one write: lines never interleave
    time.sleep(60)
    os._exit(0)
os.write(1, f"{pid}\\n".encode())
time.sleep(60)
"""


def test_a_worker_outliving_its_killed_parent_does_not_hold_the_monitor(
        tmp_path: Path, daemon: Daemon) -> None:
    run = subprocess.Popen([sys.executable, "-c", _PARENT, str(daemon.qmp)],
                           stdout=subprocess.PIPE, text=True)
    assert run.stdout is not None
    lines = [run.stdout.readline(), run.stdout.readline()]
    worker = int(next(x for x in lines if x.strip().isdigit()))
    said = next(x for x in lines if "|" in x)
    try:
        where, answer = (x.strip() for x in said.split("|"))
        assert where == "/dev/null"  # the socket is not the worker's
        assert "forked process" in answer
        run.send_signal(signal.SIGKILL)
        run.wait()
        started = time.monotonic()
        with QmpSession(daemon.qmp, timeout=5) as s:  # the monitor is free at once
            assert "qemu" in s.command("query-version")
        assert time.monotonic() - started < 3
    finally:
        run.kill()
        run.wait()
        run.stdout.close()
        os.kill(worker, signal.SIGKILL)


def test_the_parent_keeps_its_session_after_a_fork(daemon: Daemon) -> None:
    with QmpSession(daemon.qmp) as s:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        assert "qemu" in s.command("query-version")
    with QmpSession(daemon.qmp) as s:
        parent, s._pid = s._pid, -1  # as a child sees it
        with pytest.raises(QemuError, match="forked"):
            s.command("query-version")
        s._pid = parent  # (else close() leaves this process's loop and connection behind)


def test_a_disk_resized_between_resolve_and_cut(tmp_path: Path, daemon: Daemon) -> None:
    """The view must cover the disk as it is at the moment: a size QEMU changed after
    resolve_disks fails the cut in one line, and nothing is left in QEMU."""
    from cbt.source.qemu import cut, resolve_disks

    with QmpSession(daemon.qmp) as s:
        disks = resolve_disks(s)
        s.command("block_resize", {"node-name": "os", "size": 2 * MIB})
        with pytest.raises(QemuError, match="transaction failed: Source and target image "
                           "have different sizes"), cut(s, disks, "p1", tmp_path):
            pass
        nodes = s.command("query-named-block-nodes", {"flat": True})
        assert {n["node-name"] for n in nodes} == {"os", "os-file"}
        assert [n.get("dirty-bitmaps", []) for n in nodes] == [[], []]
        assert s.command("query-jobs") == [] and not list(tmp_path.glob("cbt-*"))
