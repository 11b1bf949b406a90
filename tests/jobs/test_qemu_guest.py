"""A real guest under TCG: a Debian kernel, busybox and ``qemu-ga`` on a virtio disk.

These tests prove the harness itself (tests/helpers/guest.py): the guest boots,
its agent answers, and a freeze through the agent really freezes the guest's
ext4: the writer inside stops until the thaw, and the disk read meanwhile is a
clean file system holding every file the writer had finished.  The checks that
tell a frozen disk from a live one (``needs_recovery``, the writer's log) are
shown to tell them apart here, on a disk read while the guest writes.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from helpers.guest import (
    AgentError,
    Guest,
    check_writer_files,
    fsck_clean,
    needs_recovery,
    running_guest,
)
from helpers.qemu import run
from helpers.qmp_daemon import dirty_extents, read_nbd

from cbt.source.qemu import QmpSession, bitmap_name, cut, resolve_disks

pytestmark = pytest.mark.slow
BS = 64 * 1024  # QEMU's default bitmap granularity


def disk_now(g: Guest, dest: Path) -> Path:
    """The guest's disk as it is on the host now (qemu-img, past QEMU's lock)."""
    run("qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(g.disk), str(dest))
    return dest


def start_writer(g: Guest) -> int:
    return g.spawn("exec cbt-writer /mnt/w")


def stop_writer(g: Guest, pid: int) -> None:
    g.sh("touch /mnt/w/stop")
    deadline = time.monotonic() + 60
    while not g.status(pid)["exited"]:
        assert time.monotonic() < deadline, "the writer did not stop"
        time.sleep(0.1)


def test_guest_boots_and_its_agent_answers(tmp_path: Path) -> None:
    with running_guest(tmp_path) as g:
        assert g.boot_seconds < 60, g.boot_seconds
        assert g.agent("guest-info")["version"].startswith("7.")
        mounts = g.sh("cat /proc/mounts")
        assert "/dev/vda /mnt ext4 rw" in mounts, mounts
        assert g.agent("guest-fsfreeze-status") == "thawed"
        # the guest's disk is the qcow2 the test made, on a virtio-blk device QMP names
        g.sh("echo hello > /mnt/hello && sync")
        assert g.sh("cat /mnt/hello") == "hello\n"
        assert g.proc is not None and g.proc.poll() is None
    assert g.proc.poll() is not None
    assert not g.sockets.exists()


def test_freeze_stops_the_guest_writing_until_thaw(tmp_path: Path) -> None:
    with running_guest(tmp_path) as g:
        writer = start_writer(g)
        g.wait_wrote(3)
        live = disk_now(g, tmp_path / "live.raw")
        assert needs_recovery(live)  # a mounted ext4 read as it runs: the journal is open

        assert g.agent("guest-fsfreeze-freeze") == 1  # one file system: the disk's ext4
        assert g.agent("guest-fsfreeze-status") == "frozen"
        at_freeze = g.wrote()
        time.sleep(3)
        frozen = g.wrote()
        # one file may finish after the freeze (written before it, logged at once); no more
        assert len(frozen) <= len(at_freeze) + 1, (at_freeze, frozen)
        time.sleep(2)
        assert g.wrote() == frozen, "the guest wrote while frozen"

        cut = disk_now(g, tmp_path / "frozen.raw")
        assert not needs_recovery(cut)  # the freeze flushed the journal to the disk
        fsck_clean(cut)
        logged = check_writer_files(cut)
        assert logged == frozen, (logged, frozen)  # exactly what the guest had finished

        assert g.agent("guest-fsfreeze-thaw") == 1
        assert g.agent("guest-fsfreeze-status") == "thawed"
        assert g.freeze_hooks() == ["freeze", "thaw"]  # the guest's own hook ran around it
        after = g.wait_wrote(2, timeout=60)
        assert after[: len(frozen)] == frozen
        stop_writer(g, writer)
        check_writer_files(disk_now(g, tmp_path / "after.raw"))


def test_an_agent_refusing_to_freeze_leaves_the_guest_writing(tmp_path: Path) -> None:
    with running_guest(tmp_path, agent_block=("guest-fsfreeze-freeze",)) as g:
        writer = start_writer(g)
        g.wait_wrote(1)
        with pytest.raises(AgentError, match="disabled"):
            g.agent("guest-fsfreeze-freeze")
        assert g.agent("guest-fsfreeze-status") == "thawed"
        g.wait_wrote(2, timeout=60)
        stop_writer(g, writer)


def test_the_guest_fsfreeze_hook_can_refuse_or_delay_the_freeze(tmp_path: Path) -> None:
    with running_guest(tmp_path) as g:
        g.sh("touch /run/freeze-fail")
        with pytest.raises(AgentError, match="hook"):
            g.agent("guest-fsfreeze-freeze")
        assert g.agent("guest-fsfreeze-status") == "thawed"
        g.sh("rm /run/freeze-fail; echo 3 > /run/freeze-sleep")
        start = time.monotonic()
        assert g.agent("guest-fsfreeze-freeze") == 1
        assert time.monotonic() - start >= 3
        assert g.agent("guest-fsfreeze-thaw") == 1
        assert g.freeze_hooks() == ["freeze", "freeze", "thaw"]


def changed_blocks(a: bytes, b: bytes) -> set[int]:
    return {i // BS for i in range(0, max(len(a), len(b)), BS) if a[i:i + BS] != b[i:i + BS]}


def test_cut_of_a_frozen_guest_is_its_disk_at_the_freeze(tmp_path: Path) -> None:
    """cbt's QMP moment (cbt.source.qemu.cut) on a real VM: agent freeze, cut, thaw at
    once; the view read over NBD while the guest goes on writing is the disk at the
    freeze; the next cut's bitmap covers every block the guest changed in between."""
    with running_guest(tmp_path) as g, QmpSession(g.qmp) as s:
        writer = start_writer(g)
        g.wait_wrote(3)
        disks = resolve_disks(s)
        assert list(disks) == ["vda-dev"] and disks["vda-dev"].node == "vda", disks
        points: list[bytes] = []
        for i, previous in enumerate((None, bitmap_name("p1")), 1):
            assert g.agent("guest-fsfreeze-freeze") == 1
            try:
                before = g.wrote()
                with cut(s, resolve_disks(s), f"p{i}", g.sockets, previous=previous) as m:
                    assert g.agent("guest-fsfreeze-thaw") == 1
                    g.wait_wrote(3)  # the guest writes on while the view is read
                    view = m.views["vda-dev"]
                    assert (view.bitmap is None) == (previous is None), m.reasons
                    dirty = (dirty_extents(m.nbd_socket, view.export, previous)
                             if previous else [])
                    data = read_nbd(m.uri("vda-dev"), tmp_path / f"p{i}.raw")
                    m.commit()
            finally:
                g.agent("guest-fsfreeze-thaw")
            image = tmp_path / f"p{i}.raw"
            assert not needs_recovery(image)
            fsck_clean(image)
            logged = check_writer_files(image)
            # what the guest had finished before the freeze, and at most the one file
            # it was finishing as the freeze came
            assert logged[: len(before)] == before and len(logged) <= len(before) + 1
            points.append(data)
        blocks = {o // BS + k for o, n in dirty for k in range((n + BS - 1) // BS)}
        changed = changed_blocks(points[0], points[1])
        assert changed and changed <= blocks, sorted(changed - blocks)
        stop_writer(g, writer)
