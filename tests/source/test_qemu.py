"""QMP session against a real qemu-storage-daemon: disks, one-moment views, bitmaps, teardown."""

from __future__ import annotations

import hashlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.qemu import create
from helpers.qmp_daemon import (
    Daemon,
    dirty_extents,
    need_fuse_qemu,
    read_nbd,
    storage_daemon,
)
from helpers.system import need

from cbt.core.errors import CbtValueError
from cbt.source.qemu import (
    QemuError,
    QmpSession,
    bitmap_name,
    cut,
    recover,
    release_leftovers,
    resolve_disks,
)

MIB = 1 << 20
GRAN = 64 * 1024  # QEMU's default bitmap granularity


def _pattern(byte: int, n: int) -> bytes:
    return bytes([byte]) * n


def _state(s: QmpSession) -> tuple[set[str], set[str], set[str]]:
    nodes = {n["node-name"] for n in s.command("query-named-block-nodes", {"flat": True})}
    exports = {e["id"] for e in s.command("query-block-exports")}
    jobs = {j["id"] for j in s.command("query-jobs")}
    return nodes, exports, jobs


def _bitmaps(s: QmpSession, node: str) -> dict[str, dict[str, object]]:
    for n in s.command("query-named-block-nodes", {"flat": True}):
        if n["node-name"] == node:
            return {b["name"]: b for b in n.get("dirty-bitmaps", [])}
    raise AssertionError(node)


@pytest.fixture
def daemon(tmp_path: Path):
    with storage_daemon(tmp_path, {"os": 4 * MIB, "db": 2 * MIB}) as d:
        yield d


def test_resolves_disks_default_and_mapping(daemon: Daemon) -> None:
    with QmpSession(daemon.qmp) as s:
        disks = resolve_disks(s)
        assert sorted(disks) == ["db", "os"]
        assert (disks["os"].size, disks["os"].format) == (4 * MIB, "qcow2")
        assert disks["db"].size == 2 * MIB
        mapped = resolve_disks(s, {"root": "os"})
        assert list(mapped) == ["root"] and mapped["root"].node == "os"
        with pytest.raises(CbtValueError, match="nope"):
            resolve_disks(s, {"x": "nope"})


def test_unreachable_socket_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(QemuError, match="cannot connect"):
        QmpSession(tmp_path / "none.sock", timeout=2)


def test_two_disks_cut_at_one_moment_and_bitmap_records_later_writes(
        daemon: Daemon, tmp_path: Path) -> None:
    daemon.write("os", 0, _pattern(1, 4 * MIB))
    daemon.write("db", 0, _pattern(2, 2 * MIB))
    work = tmp_path / "work"
    work.mkdir()
    with QmpSession(daemon.qmp) as s:
        disks = resolve_disks(s)
        before = _state(s)
        with cut(s, disks, "p1", work) as m1:
            assert m1.reasons == {"db": "first backup: no previous bitmap",
                                  "os": "first backup: no previous bitmap"}
            truth_os, truth_db = daemon.read("os"), daemon.read("db")
            # the guest writes after the moment: not in the view
            daemon.write("os", 3 * GRAN, _pattern(9, GRAN))
            daemon.write("db", 5 * GRAN + 7, b"late")
            assert read_nbd(m1.uri("os"), tmp_path / "v-os") == truth_os
            assert read_nbd(m1.uri("db"), tmp_path / "v-db") == truth_db
            m1.commit()
        assert _state(s) == before  # no node, export or job left
        assert not list(work.iterdir())  # overlay files and the NBD socket gone
        bm = bitmap_name("p1")
        assert set(_bitmaps(s, "os")) == {bm} and set(_bitmaps(s, "db")) == {bm}
        disks = resolve_disks(s)
        daemon.write("os", 10 * GRAN, _pattern(7, 2 * GRAN))
        with cut(s, disks, "p2", work, previous=bm) as m2:
            assert m2.reasons == {}
            daemon.write("os", 40 * GRAN, b"after p2")  # lands in p2's bitmap only
            assert m2.views["os"].bitmap_context == f"qemu:dirty-bitmap:{bm}"
            assert dirty_extents(m2.nbd_socket, m2.views["os"].export, bm) == [
                (3 * GRAN, GRAN), (10 * GRAN, 2 * GRAN)]
            assert dirty_extents(m2.nbd_socket, m2.views["db"].export, bm) == [(5 * GRAN, GRAN)]
            assert read_nbd(m2.uri("os"), tmp_path / "v2-os") != daemon.read("os")
            m2.commit()
        assert set(_bitmaps(s, "os")) == {bitmap_name("p2")}
        assert _bitmaps(s, "os")[bitmap_name("p2")]["count"] == GRAN
        assert _state(s) == before


def test_failure_merges_new_bitmap_back(daemon: Daemon, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    with QmpSession(daemon.qmp) as s:
        with cut(s, resolve_disks(s), "p1", work) as m:
            m.commit()
        daemon.write("os", 2 * GRAN, b"x")
        with pytest.raises(RuntimeError), cut(s, resolve_disks(s), "p2", work,
                                              previous=bitmap_name("p1")):
            daemon.write("os", 8 * GRAN, b"y")  # after the moment: in p2's bitmap
            raise RuntimeError("backup failed")
        bms = _bitmaps(s, "os")
        assert set(bms) == {bitmap_name("p1")}
        assert bms[bitmap_name("p1")]["recording"] is True
        assert bms[bitmap_name("p1")]["count"] == 2 * GRAN  # both writes kept
        assert not list(work.iterdir())


def test_killed_run_bitmap_is_merged_back_by_recover(daemon: Daemon, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    with QmpSession(daemon.qmp) as s:
        with cut(s, resolve_disks(s), "p1", work) as m:
            m.commit()
        daemon.write("os", 0, b"a")
        p1 = bitmap_name("p1")
        # what a run killed after its transaction leaves: p1 disabled, p2 recording
        s.command("transaction", {"actions": [
            {"type": "block-dirty-bitmap-disable", "data": {"node": "os", "name": p1}},
            {"type": "block-dirty-bitmap-add",
             "data": {"node": "os", "name": bitmap_name("p2"), "persistent": True}}]})
        daemon.write("os", 6 * GRAN, b"b")
        assert recover(s, resolve_disks(s), p1) == {"os": [bitmap_name("p2")]}
        bms = _bitmaps(s, "os")
        assert set(bms) == {p1} and bms[p1]["recording"] is True and bms[p1]["count"] == 2 * GRAN


def test_sigkill_leaves_inconsistent_bitmap_detected(daemon: Daemon, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    with QmpSession(daemon.qmp) as s, cut(s, resolve_disks(s), "p1", work) as m:
        m.commit()
    daemon.stop()  # a clean stop stores the bitmap in the qcow2
    daemon.start()  # reopened: QEMU marks it in use in the image
    daemon.write("os", 0, b"z")
    daemon.stop(signal.SIGKILL)
    daemon.start()
    with QmpSession(daemon.qmp) as s:
        disks = resolve_disks(s)
        assert disks["os"].bitmap(bitmap_name("p1")).inconsistent  # type: ignore[union-attr]
        with cut(s, disks, "p2", work, previous=bitmap_name("p1")) as m:
            assert "inconsistent" in m.reasons["os"] and m.views["os"].bitmap is None
            m.commit()
        assert set(_bitmaps(s, "os")) == {bitmap_name("p2")}


def test_missing_foreign_and_resized_are_reported(daemon: Daemon, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    with QmpSession(daemon.qmp) as s:
        with cut(s, resolve_disks(s), "p1", work) as m:
            m.commit()
        p1 = bitmap_name("p1")
        s.command("block-dirty-bitmap-remove", {"node": "db", "name": p1})
        s.command("block_resize", {"node-name": "os", "size": 8 * MIB})
        sizes = {"os": 4 * MIB, "db": 2 * MIB}
        with cut(s, resolve_disks(s), "p2", work, previous=p1, previous_sizes=sizes) as m:
            assert m.reasons["os"] == f"disk resized from {4 * MIB} to {8 * MIB} bytes"
            assert m.reasons["db"] == f"bitmap {p1} missing on node db"
            m.commit()
        # the stale bitmap of the resized disk goes too: only the new point's is left
        assert set(_bitmaps(s, "os")) == {bitmap_name("p2")}
        assert set(_bitmaps(s, "db")) == {bitmap_name("p2")}
        p2 = bitmap_name("p2")
        s.command("block-dirty-bitmap-add", {"node": "os", "name": "theirs", "persistent": True})
        with cut(s, resolve_disks(s), "p3", work, previous="theirs") as m:
            assert "not cbt's" in m.reasons["os"]
        # not committed: p3 folded away, p2 kept, and a bitmap that is not cbt's never touched
        assert set(_bitmaps(s, "os")) == {p2, "theirs"}


def test_failed_transaction_leaves_nothing(daemon: Daemon, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    with QmpSession(daemon.qmp) as s:
        before = _state(s)
        # a bitmap of that name already exists on db: the transaction refuses as a whole
        s.command("block-dirty-bitmap-add", {"node": "db", "name": bitmap_name("p1")})
        with pytest.raises(QemuError, match="transaction"), cut(s, resolve_disks(s), "p1", work):
            pass
        assert _state(s) == before and not list(work.iterdir())
        assert set(_bitmaps(s, "os")) == set()  # os's part of the transaction rolled back


def test_reuses_a_running_nbd_server(daemon: Daemon, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    sock = tmp_path / "their-nbd.sock"
    daemon.write("db", 0, b"hello")
    with QmpSession(daemon.qmp) as s:
        s.command("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
        with cut(s, resolve_disks(s), "p1", work, nbd_socket=sock) as m:
            assert m.nbd_socket == sock and not m.started_server
            assert read_nbd(m.uri("db"), tmp_path / "v")[:5] == b"hello"
            m.commit()
        # the server is theirs: still running after the backup
        s.command("nbd-server-stop")  # refused when no server runs


def test_teardown_with_a_client_still_connected(daemon: Daemon, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    with QmpSession(daemon.qmp, timeout=5) as s:
        before = _state(s)
        reader: subprocess.Popen[str] | None = None
        try:
            with cut(s, resolve_disks(s), "p1", work) as m:
                # a reader that never lets go: connected, handshake done, idle
                reader = subprocess.Popen(["qemu-io", "-r", "-f", "raw", m.uri("os")],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          text=True)
                assert reader.stdin is not None and reader.stdout is not None
                reader.stdin.write("read 0 512\n")
                reader.stdin.flush()
                assert "read 512/512" in reader.stdout.readline()
                m.commit()
        finally:
            if reader is not None:
                reader.kill()
                reader.wait()
        assert _state(s) == before and not list(work.iterdir())


def test_qmp_that_never_answers_times_out(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "mute.sock"))
    listener.listen(1)
    try:
        t = time.monotonic()
        with pytest.raises(QemuError, match=r"cannot connect.*timed out"):
            QmpSession(tmp_path / "mute.sock", timeout=1)
        assert time.monotonic() - t < 10
    finally:
        listener.close()


def test_daemon_gone_mid_session_is_a_clear_error(daemon: Daemon) -> None:
    with QmpSession(daemon.qmp, timeout=5) as s:
        daemon.stop(signal.SIGKILL)
        t = time.monotonic()
        with pytest.raises(QemuError, match="query-block"):
            s.command("query-block")
        assert time.monotonic() - t < 10


def test_recover_without_a_usable_previous_drops_leftovers(daemon: Daemon) -> None:
    with QmpSession(daemon.qmp) as s:
        s.command("block-dirty-bitmap-add", {"node": "os", "name": "cbt-old", "persistent": True})
        s.command("block-dirty-bitmap-add", {"node": "os", "name": "theirs"})
        assert recover(s, resolve_disks(s), "cbt-gone") == {"os": ["cbt-old"]}
        assert set(_bitmaps(s, "os")) == {"theirs"}  # never touched


def test_default_disks_of_a_real_vm_are_its_writable_fixed_devices(tmp_path: Path) -> None:
    """A (stopped, never booted) qemu-system VM: a writable disk, a read-only one, a CD-ROM."""
    need_fuse_qemu()
    need(shutil.which("qemu-system-x86_64") is not None,
         "needs qemu-system-x86_64 (apt-get install qemu-system-x86)")
    a = create(tmp_path / "a.qcow2", 8 * MIB)
    b = create(tmp_path / "b.qcow2", 4 * MIB)
    c = tmp_path / "c.iso"
    c.write_bytes(bytes(MIB))
    qmp = tmp_path / "vm.qmp"
    args = ["qemu-system-x86_64", "-M", "pc", "-S", "-nodefaults", "-display", "none",
            "-accel", "tcg", "-qmp", f"unix:{qmp},server=on,wait=off"]
    for node, path, drv, ro, dev in (("an", a, "qcow2", "off", "virtio-blk-pci,id=vda"),
                                     ("bn", b, "qcow2", "on", "virtio-blk-pci,id=vdb"),
                                     ("cn", c, "raw", "on", "ide-cd,id=cd0")):
        args += ["-blockdev", f"driver=file,node-name={node}f,filename={path},read-only={ro}",
                 "-blockdev", f"driver={drv},node-name={node},file={node}f,read-only={ro}",
                 "-device", f"{dev},drive={node}"]
    vm = subprocess.Popen(args, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not qmp.exists():
            assert vm.poll() is None and time.monotonic() < deadline, vm.stderr
            time.sleep(0.05)
        with QmpSession(qmp) as s:
            disks = resolve_disks(s)
            assert list(disks) == ["vda"]
            assert (disks["vda"].node, disks["vda"].device, disks["vda"].size) == (
                "an", "vda", 8 * MIB)
            assert resolve_disks(s, {"data": "vdb"})["data"].node == "bn"
            assert resolve_disks(s, {"os": "an"})["os"].device is None
    finally:
        vm.kill()
        vm.wait()


_KILLED_RUN = """
import os, signal, sys
from pathlib import Path
from cbt.source.qemu import QmpSession, cut, resolve_disks
s = QmpSession(sys.argv[1])
with cut(s, resolve_disks(s), "p2", Path(sys.argv[2]), previous="cbt-p1") as m:
    print("cut", flush=True)
    sys.stdin.readline()
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_run_is_released_and_merged_back_next_time(
        daemon: Daemon, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    with QmpSession(daemon.qmp) as s:
        before = _state(s)
        with cut(s, resolve_disks(s), "p1", work) as m:
            m.commit()
    daemon.write("os", 1 * GRAN, b"before the killed run")
    # QEMU's monitor takes one client at a time: the run has it to itself
    run = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(daemon.qmp), str(work)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert run.stdout is not None and run.stdin is not None
    assert run.stdout.readline() == "cut\n"
    daemon.write("os", 9 * GRAN, b"during the killed run")
    run.stdin.write("die\n")
    run.stdin.flush()
    assert run.wait() == -signal.SIGKILL
    with QmpSession(daemon.qmp) as s:
        assert _state(s) != before and list(work.iterdir())  # it left its views behind
        released = release_leftovers(s, work)
        tag = hashlib.sha256(b"p2").hexdigest()[:8]  # views are named by the point's digest
        assert f"cbt-n{tag}-0" in released and f"cbt-e{tag}-0" in released
        assert _state(s) == before and not list(work.iterdir())
        assert recover(s, resolve_disks(s), bitmap_name("p1")) == {
            "db": [bitmap_name("p2")], "os": [bitmap_name("p2")]}
        daemon.write("os", 20 * GRAN, b"after")
        with cut(s, resolve_disks(s), "p3", work, previous=bitmap_name("p1")) as m:
            assert dirty_extents(m.nbd_socket, m.views["os"].export, bitmap_name("p1")) == [
                (1 * GRAN, GRAN), (9 * GRAN, GRAN), (20 * GRAN, GRAN)]  # nothing missed
            m.commit()
        assert _state(s) == before


def test_a_monitor_held_by_another_client_is_named(daemon: Daemon) -> None:
    with QmpSession(daemon.qmp), pytest.raises(QemuError, match="one client at a time"):
        QmpSession(daemon.qmp, timeout=1)


def test_a_running_nbd_server_not_named_is_said_and_left_alone(
        daemon: Daemon, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    sock = tmp_path / "their-nbd.sock"
    with QmpSession(daemon.qmp) as s:
        before = _state(s)
        s.command("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
        with pytest.raises(QemuError, match="already runs an NBD server"), \
                cut(s, resolve_disks(s), "p1", work):
            pass
        assert _state(s) == before and not list(work.iterdir())
        assert _bitmaps(s, "os") == {}  # the first run's bitmap is folded away
        s.command("nbd-server-stop")  # theirs: still running


def test_bitmap_names_come_from_point_ids() -> None:
    assert bitmap_name("web.20261130T034400Z-2") == "cbt-web.20261130T034400Z-2"
    with pytest.raises(CbtValueError, match="point id"):
        bitmap_name("../x y")
