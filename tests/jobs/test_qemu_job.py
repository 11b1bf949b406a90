"""The job of a running QEMU VM against a real qemu-storage-daemon (QMP socket, qcow2 disks,
writable FUSE exports the test writes through as a guest would).

Truth is the guest's view read back through the FUSE export at the moment of the cut
(nothing writes between the cut and the read, or the test says what it wrote after), the
point restored by cbt, and QEMU's own answers over QMP.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
from helpers.jobs import write_config
from helpers.qmp_daemon import Daemon, storage_daemon, vault_bitmap
from helpers.system import need
from helpers.vaults import PASSWORD, fast_kdf

from cbt.api import Vault
from cbt.jobs.config import load
from cbt.jobs.job import JobRequest, JobResult
from cbt.jobs.runner import run_vm
from cbt.repo.registry import list_jobs
from cbt.source.qemu import QmpSession

MIB = 1 << 20
KIB = 1 << 10
VM = "web"


def _bm(root: Path, point: str, vm: str = VM) -> str:
    """The bitmap a point of ``vm`` in the vault ``root/vault`` leaves (scoped by vault and
    VM)."""
    return vault_bitmap(root / "vault", point, vm)


def _config(root: Path, d: Daemon, **vm: Any) -> Path:
    return write_config(root / "cbt.toml", {"p": {"schedule": "daily 02:00"}},
                        {VM: {"policy": "p", "qmp": str(d.qmp), **vm}})


def _vault(root: Path, encrypted: bool) -> Vault:
    if encrypted:
        return Vault.init(root / "vault", encryption="aes-256-gcm", passphrase=PASSWORD,
                          kdf=fast_kdf())
    return Vault.init(root / "vault", encryption="none")


def _run(cfg: Path, encrypted: bool = False, **request: Any) -> JobResult:
    return run_vm(load(cfg), VM, JobRequest(passphrase=PASSWORD.encode() if encrypted else None,
                                            **request))


def _restored(root: Path, vault: Vault, point: str, label: str) -> bytes:
    out = root / f"r-{point}-{label}"
    vault.restore(point, out, disk=label)
    data = out.read_bytes()
    out.unlink()
    return data


def _disk(point: Any, label: str) -> Any:
    return next(x for x in point.disks if x.label == label)


@pytest.mark.slow
@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_full_then_incremental_equal_the_guest_view(tmp_path: Path, daemon: Daemon,
                                                    encrypted: bool) -> None:
    vault = _vault(tmp_path, encrypted)
    daemon.write("os", 0, os.urandom(300 * KIB))
    daemon.write("db", 1 * MIB, os.urandom(100 * KIB))
    cfg = _config(tmp_path, daemon)
    first = _run(cfg, encrypted)
    assert first.error is None and first.point is not None
    assert first.snapshots == {"db": "qemu", "os": "qemu"}
    for label in ("os", "db"):
        assert _restored(tmp_path, vault, first.point.id, label) == daemon.read(label)
        assert _disk(first.point, label).change_source == "hash"
        assert _disk(first.point, label).path == str(daemon.image(label))
    assert first.point.consistency == "crash"
    assert "one QMP transaction" in first.point.consistency_reason
    assert set(daemon.bitmaps("os")) == {_bm(tmp_path, first.point.id)}

    daemon.write("os", 2 * MIB + 5000, b"\x11" * 3000)  # 2 blocks of 16K touched
    second = _run(cfg, encrypted)
    assert second.point is not None, second.error
    os_rec, db_rec = _disk(second.point, "os"), _disk(second.point, "db")
    assert (os_rec.change_source, db_rec.change_source) == ("qemu-bitmap", "qemu-bitmap")
    assert os_rec.change_source_reason is None
    for label in ("os", "db"):
        assert _restored(tmp_path, vault, second.point.id, label) == daemon.read(label)
    # read: the changed blocks (one 64K granule = 4 blocks) and the verification sample
    assert os_rec.changed_blocks >= 1 and os_rec.bytes_read < 400 * KIB
    assert set(daemon.bitmaps("os")) == {_bm(tmp_path, second.point.id)}
    assert daemon.leftovers() == set()
    assert not any((tmp_path / "qmp.sock.cbt").iterdir())
    jobs = list_jobs(vault, VM)
    assert [j.status for j in jobs] == ["succeeded", "succeeded"]
    assert {d.label: d.snapshot for d in jobs[-1].disks} == {"db": "qemu", "os": "qemu"}


@pytest.mark.slow
def test_writes_after_the_cut_go_to_the_next_point_on_both_disks(tmp_path: Path,
                                                                  daemon: Daemon) -> None:
    vault = _vault(tmp_path, False)
    daemon.write("os", 0, b"\x01" * (128 * KIB))
    daemon.write("db", 0, b"\x02" * (128 * KIB))
    cfg = _config(tmp_path, daemon)
    at_cut: dict[str, bytes] = {}

    def progress(*_: object) -> None:  # during the transfer, after the cut: the guest writes
        if not at_cut:
            at_cut.update(os=daemon.read("os"), db=daemon.read("db"))
            daemon.write("os", 64 * KIB, b"\xaa" * (200 * KIB))
            daemon.write("db", 1 * MIB, b"\xbb" * (10 * KIB))

    first = _run(cfg, progress=progress)
    assert first.point is not None, first.error
    assert at_cut
    for label in ("os", "db"):
        got = _restored(tmp_path, vault, first.point.id, label)
        assert got == at_cut[label], label  # both disks as they were at the one moment
        assert got != daemon.read(label)
    second = _run(cfg)
    assert second.point is not None, second.error
    for label in ("os", "db"):
        assert _disk(second.point, label).change_source == "qemu-bitmap"
        assert _restored(tmp_path, vault, second.point.id, label) == daemon.read(label)


@pytest.mark.slow
def test_sigkill_of_qemu_makes_the_bitmap_inconsistent_full_read(tmp_path: Path,
                                                                  daemon: Daemon) -> None:
    vault = _vault(tmp_path, False)
    cfg = _config(tmp_path, daemon, disks={"os": "os"})
    daemon.write("os", 0, os.urandom(64 * KIB))
    first = _run(cfg)
    assert first.point is not None, first.error
    daemon.stop()  # a clean stop stores the bitmap in the qcow2; a restart loads it in use
    daemon.start()
    daemon.write("os", 3 * MIB, b"\x33" * 4096)
    daemon.stop(signal.SIGKILL)
    daemon.start()
    assert daemon.bitmaps("os")[_bm(tmp_path, first.point.id)]["inconsistent"] is True
    second = _run(cfg)
    assert second.point is not None, second.error
    rec = _disk(second.point, "os")
    assert rec.change_source == "hash"
    assert rec.change_source_reason == (f"bitmap {_bm(tmp_path, first.point.id)} on node os "
                                        "is inconsistent (QEMU stopped uncleanly)")
    assert _restored(tmp_path, vault, second.point.id, "os") == daemon.read("os")
    assert set(daemon.bitmaps("os")) == {_bm(tmp_path, second.point.id)}
    daemon.write("os", 1 * MIB, b"\x34" * 4096)  # and the new bitmap is used next time
    third = _run(cfg)
    assert third.point is not None, third.error
    assert _disk(third.point, "os").change_source == "qemu-bitmap"
    assert _restored(tmp_path, vault, third.point.id, "os") == daemon.read("os")


@pytest.mark.slow
def test_a_bitmap_qemu_never_stored_is_missing_after_sigkill(tmp_path: Path,
                                                             daemon: Daemon) -> None:
    vault = _vault(tmp_path, False)
    cfg = _config(tmp_path, daemon, disks={"os": "os"})
    first = _run(cfg)
    assert first.point is not None, first.error
    daemon.write("os", 3 * MIB, b"\x35" * 4096)
    daemon.stop(signal.SIGKILL)  # QEMU writes persistent bitmaps at close: this one is lost
    daemon.start()
    second = _run(cfg)
    assert second.point is not None, second.error
    rec = _disk(second.point, "os")
    assert (rec.change_source, rec.change_source_reason) == (
        "hash", f"bitmap {_bm(tmp_path, first.point.id)} missing on node os")
    assert _restored(tmp_path, vault, second.point.id, "os") == daemon.read("os")


@pytest.mark.slow
def test_deleted_bitmap_and_resized_disk_fall_back_to_hash(tmp_path: Path,
                                                           daemon: Daemon) -> None:
    vault = _vault(tmp_path, False)
    cfg = _config(tmp_path, daemon)
    first = _run(cfg)
    assert first.point is not None, first.error
    with QmpSession(daemon.qmp) as s:
        s.command("block-dirty-bitmap-remove",
                  {"node": "db", "name": _bm(tmp_path, first.point.id)})
        s.command("block_resize", {"node-name": "os", "size": 6 * MIB})
    daemon.write("db", 0, b"\x44" * 5000)
    daemon.write("os", 5 * MIB, b"\x55" * 5000)
    second = _run(cfg)
    assert second.point is not None, second.error
    db, os_ = _disk(second.point, "db"), _disk(second.point, "os")
    assert (db.change_source, db.change_source_reason) == (
        "hash", f"bitmap {_bm(tmp_path, first.point.id)} missing on node db")
    assert os_.change_source == "hash" and "resized" in (os_.change_source_reason or "")
    assert os_.size == 6 * MIB
    for label in ("os", "db"):
        assert _restored(tmp_path, vault, second.point.id, label) == daemon.read(label)


@pytest.mark.slow
def test_a_failing_transfer_merges_the_bitmap_back_and_misses_nothing(tmp_path: Path,
                                                                      daemon: Daemon) -> None:
    vault = _vault(tmp_path, False)
    cfg = _config(tmp_path, daemon)
    first = _run(cfg)
    assert first.point is not None, first.error
    daemon.write("os", 1 * MIB, b"\x66" * 5000)  # before the failing run's cut

    def fail(*_: object) -> None:
        daemon.write("os", 2 * MIB, b"\x77" * 5000)  # after its cut
        raise OSError(5, "injected transfer failure")

    failed = _run(cfg, progress=fail)
    assert failed.point is None and "injected transfer failure" in (failed.error or "")
    assert set(daemon.bitmaps("os")) == {_bm(tmp_path, first.point.id)}  # merged back
    assert daemon.bitmaps("os")[_bm(tmp_path, first.point.id)]["recording"] is True
    assert daemon.leftovers() == set()
    third = _run(cfg)
    assert third.point is not None, third.error
    assert _disk(third.point, "os").change_source == "qemu-bitmap"
    assert _restored(tmp_path, vault, third.point.id, "os") == daemon.read("os")
    assert [j.status for j in list_jobs(vault, VM)] == ["succeeded", "failed", "succeeded"]


@pytest.mark.slow
def test_sigterm_during_the_transfer_merges_the_bitmap_back(tmp_path: Path,
                                                            daemon: Daemon) -> None:
    from cbt.jobs.job import JobAborted

    vault = _vault(tmp_path, False)
    cfg = _config(tmp_path, daemon)
    first = _run(cfg)
    assert first.point is not None, first.error
    daemon.write("db", 0, b"\x91" * 5000)

    def term(*_: object) -> None:
        daemon.write("db", 1 * MIB, b"\x92" * 5000)
        os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(JobAborted, match="SIGTERM"):
        _run(cfg, progress=term)
    assert set(daemon.bitmaps("db")) == {_bm(tmp_path, first.point.id)}
    assert daemon.leftovers() == set()
    assert [j.status for j in list_jobs(vault, VM)] == ["succeeded", "failed"]
    again = _run(cfg)
    assert again.point is not None, again.error
    assert _disk(again.point, "db").change_source == "qemu-bitmap"
    assert _restored(tmp_path, vault, again.point.id, "db") == daemon.read("db")


@pytest.mark.slow
def test_change_tracking_hash_and_full_scan_read_everything(tmp_path: Path,
                                                            daemon: Daemon) -> None:
    vault = _vault(tmp_path, False)
    cfg = _config(tmp_path, daemon, change_tracking="hash", disks={"os": "os"})
    assert _run(cfg).point is not None
    daemon.write("os", 0, b"\xa1" * 5000)
    second = _run(cfg)
    assert second.point is not None, second.error
    assert (_disk(second.point, "os").change_source,
            _disk(second.point, "os").change_source_reason) == ("hash", 'change_tracking = "hash"')
    cfg = _config(tmp_path, daemon, disks={"os": "os"})
    daemon.write("os", 8192, b"\xa2" * 5000)
    third = _run(cfg, full_scan=True)
    assert third.point is not None, third.error
    assert _disk(third.point, "os").change_source_reason == "--full-scan"
    assert _restored(tmp_path, vault, third.point.id, "os") == daemon.read("os")
    assert set(daemon.bitmaps("os")) == {_bm(tmp_path, third.point.id)}  # the bitmap goes on


DEAD = "web.20261130T010000Z.dead01"  # a job that died with its guest frozen


@pytest.mark.slow
def test_recover_thaws_the_guest_a_dead_job_froze(tmp_path: Path, daemon: Daemon) -> None:
    from helpers.qmp_daemon import host_guest_agent

    from cbt.format.records import JobRecord
    from cbt.repo.registry import save_job

    vault = _vault(tmp_path, False)
    (tmp_path / "ga").mkdir()
    with host_guest_agent(tmp_path / "ga") as ga:
        cfg = _config(tmp_path, daemon, guest_agent=str(ga))
        dead = JobRecord(id=DEAD, vm=VM, policy="p", start="2026-11-30T01:00:00Z",
                         hook_pending=True, pid=2 ** 22 + 1, hooks=[{
                             "phase": "guest-freeze", "ok": False, "exit_code": None,
                             "timed_out": False, "seconds": 0.0, "error": "running",
                             "stdout": "", "stderr": "", "file_systems": None}])
        save_job(vault, dead)
        res = _run(cfg)
        assert res.point is not None, res.error
        warned = [w for w in res.point.warnings if "thaw of interrupted job" in w]
        assert len(warned) == 1 and DEAD in warned[0]
        assert "guest-fsfreeze-thaw" in warned[0]  # this host's agent refuses it
        rec = next(j for j in list_jobs(vault, VM) if j.id == DEAD)
        assert rec.status == "interrupted"
        assert [h["phase"] for h in rec.hooks] == ["guest-freeze", "guest-thaw"]
        ours = next(j for j in list_jobs(vault, VM) if j.id != DEAD)
        assert [h["phase"] for h in ours.hooks] == ["guest-freeze", "guest-thaw"]


@pytest.mark.slow
@pytest.mark.parametrize("block_size", ["4K", "1M"])
def test_dirty_granules_map_to_every_block_they_touch(tmp_path: Path, daemon: Daemon,
                                                      block_size: str) -> None:
    vault = _vault(tmp_path, False)
    cfg = _config(tmp_path, daemon, disks={"os": "os"}, block_size=block_size,
                  verify_fraction=0)
    daemon.write("os", 0, os.urandom(4 * MIB))
    assert _run(cfg).point is not None
    # a write across the 1 MiB boundary, and one in the last byte of the disk
    daemon.write("os", 1 * MIB - 10, b"\xc1" * 20)
    daemon.write("os", 4 * MIB - 1, b"\xc2")
    second = _run(cfg)
    assert second.point is not None, second.error
    rec = _disk(second.point, "os")
    assert rec.change_source == "qemu-bitmap"
    bs = 4 * KIB if block_size == "4K" else MIB
    assert rec.changed_blocks == 3  # both sides of 1 MiB, and the last block
    granule = 64 * KIB  # QEMU's default: the bitmap marks whole granules (3 of them here)
    assert rec.bytes_read == 3 * max(bs, granule)
    assert _restored(tmp_path, vault, second.point.id, "os") == daemon.read("os")


@pytest.mark.slow
def test_the_work_folder_belongs_to_the_qmp_socket_owner(tmp_path: Path,
                                                         daemon: Daemon) -> None:
    need(os.geteuid() == 0, "needs root (cbt changes owners only when it runs as root)")
    _vault(tmp_path, False)
    os.chown(daemon.qmp, 65534, 65534)  # as if QEMU ran as nobody
    cfg = _config(tmp_path, daemon, disks={"os": "os"})
    work = tmp_path / "qmp.sock.cbt"
    seen: list[tuple[str, int, int]] = []

    def look(*_: object) -> None:
        if not seen:
            seen.extend((p.name, p.stat().st_uid, p.stat().st_mode & 0o777)
                        for p in work.iterdir() if p.suffix == ".qcow2")

    res = _run(cfg, progress=look)
    assert res.point is not None, res.error
    st = work.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (65534, 65534, 0o700)
    assert len(seen) == 1 and seen[0][1:] == (65534, 0o600)  # the overlay QEMU writes
    assert not any(work.iterdir())


@pytest.mark.slow
def test_a_vm_of_the_longest_name(tmp_path: Path, daemon: Daemon) -> None:
    vm = "v" * 64  # its point ids are longer than QEMU's node names may be
    vault = _vault(tmp_path, False)
    cfg = write_config(tmp_path / "cbt.toml", {"p": {"schedule": "daily 02:00"}},
                       {vm: {"policy": "p", "qmp": str(daemon.qmp), "disks": {"os": "os"}}})
    for _ in range(2):
        daemon.write("os", 12345, os.urandom(3000))
        res = run_vm(load(cfg), vm, JobRequest())
        assert res.point is not None, res.error
        assert _restored(tmp_path, vault, res.point.id, "os") == daemon.read("os")
    assert _disk(res.point, "os").change_source == "qemu-bitmap"
    assert set(daemon.bitmaps("os")) == {_bm(tmp_path, res.point.id, vm)}


def test_a_short_range_of_a_view_costs_no_big_buffer(tmp_path: Path, daemon: Daemon) -> None:
    """A tracked disk reads many short ranges over NBD: each costs its own size, not a
    whole window (a zeroed 64 MiB buffer per range made a 1% incremental take seconds)."""
    import tracemalloc

    from cbt.source.nbd import NbdSource
    from cbt.source.qemu import cut, resolve_disks

    daemon.write("os", 5 * 4096, b"\xd1" * 4096)
    with QmpSession(daemon.qmp) as s:
        work = tmp_path / "w"
        work.mkdir()
        with cut(s, resolve_disks(s, {"os": "os"}), "p1", work) as m, \
                NbdSource(str(m.nbd_socket), m.views["os"].export) as src:
            tracemalloc.start()
            try:
                got = [bytes(w) for _, w in src.windows(4096, 5, 6)]
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
    assert got == [b"\xd1" * 4096]
    assert peak < 1 * MIB, peak


@pytest.mark.slow
def test_labels_moved_to_other_disks_are_read_whole(tmp_path: Path) -> None:
    """Every disk carries the same bitmap name (one per point): a label given another
    disk between runs must not take that disk's bitmap as its own changes."""
    with storage_daemon(tmp_path, {"one": 2 * MIB, "two": 2 * MIB}) as d:
        vault = _vault(tmp_path, False)
        d.write("one", 0, os.urandom(200 * KIB))
        d.write("two", 0, os.urandom(300 * KIB))
        cfg = _config(tmp_path, d, verify_fraction=0, disks={"a": "one", "b": "two"})
        assert _run(cfg).point is not None
        d.write("two", 1 * MIB, b"\x01" * 5000)
        cfg = _config(tmp_path, d, verify_fraction=0, disks={"a": "two", "b": "one"})
        res = _run(cfg)
        assert res.point is not None, res.error
        for label, node in (("a", "two"), ("b", "one")):
            rec = _disk(res.point, label)
            assert rec.change_source == "hash", rec
            assert "was " in (rec.change_source_reason or ""), rec
            assert _restored(tmp_path, vault, res.point.id, label) == d.read(node)


def test_disks_naming_one_node_twice_fail_in_one_line(tmp_path: Path, daemon: Daemon) -> None:
    _vault(tmp_path, False)
    cfg = _config(tmp_path, daemon, disks={"a": "os", "b": "os"})
    res = _run(cfg)
    assert res.point is None
    assert res.error == (f"{daemon.qmp}: disks 'a' and 'b' are the same block node 'os'")
    assert daemon.leftovers() == set()
    assert daemon.bitmaps("os") == {}


@pytest.mark.slow
def test_qemu_dying_mid_transfer_fails_clearly_and_the_next_run_reads_whole(
        tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with storage_daemon(tmp_path, {"os": 2 * MIB, "db": 64 * MIB}) as daemon:
        _dying_mid_transfer(tmp_path, daemon, ThreadPoolExecutor(1))


def _dying_mid_transfer(tmp_path: Path, daemon: Daemon, executor: Any) -> None:
    vault = _vault(tmp_path, False)
    cfg = _config(tmp_path, daemon)
    assert _run(cfg).point is not None
    daemon.write("os", 1 * MIB, os.urandom(5000))
    daemon.write("db", 0, os.urandom(48 * MIB))

    def die(*_: object) -> None:  # a shard read, the others not yet
        if daemon.proc is not None:
            daemon.stop(signal.SIGKILL)

    res = _run(cfg, progress=die, executor=executor, workers=1)
    executor.shutdown()
    assert res.point is None and res.error is not None
    assert "\n" not in res.error and "QMP" not in res.error  # the read's error, not cleanup's
    daemon.start()
    again = _run(cfg)
    assert again.point is not None, again.error
    for label in ("os", "db"):
        assert _disk(again.point, label).change_source == "hash"
        assert _restored(tmp_path, vault, again.point.id, label) == daemon.read(label)
    assert [j.status for j in list_jobs(vault, VM)] == ["succeeded", "failed", "succeeded"]


@pytest.mark.slow
def test_a_storm_of_sigterms_still_tears_down_and_merges_back(tmp_path: Path,
                                                              daemon: Daemon) -> None:
    """An impatient supervisor sends SIGTERM again and again from the transfer on: the
    job aborts, but QEMU's teardown and the bitmap's merge-back still run whole (a
    copy-before-write filter left in the VM's write path would grow its overlay)."""
    import threading
    import time

    from cbt.jobs.job import JobAborted

    _vault(tmp_path, False)
    cfg = _config(tmp_path, daemon)
    first = _run(cfg)
    assert first.point is not None, first.error
    daemon.write("db", 0, os.urandom(5000))
    stop = threading.Event()
    storms: list[threading.Thread] = []

    def storm() -> None:
        while not stop.is_set():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.001)

    def start(*_: object) -> None:
        if not storms:
            storms.append(threading.Thread(target=storm))
            storms[0].start()

    old = signal.signal(signal.SIGTERM, lambda *_: None)  # once the job has returned
    try:
        with pytest.raises(JobAborted):
            _run(cfg, progress=start)
    finally:
        stop.set()
        for t in storms:
            t.join()
        signal.signal(signal.SIGTERM, old)
    assert storms
    assert daemon.leftovers() == set()
    for node in ("os", "db"):
        assert set(daemon.bitmaps(node)) == {_bm(tmp_path, first.point.id)}
        assert daemon.bitmaps(node)[_bm(tmp_path, first.point.id)]["recording"] is True
    again = _run(cfg)
    assert again.point is not None, again.error
    assert _disk(again.point, "db").change_source == "qemu-bitmap"


def test_a_disk_qemu_names_unlike_a_label_is_named_in_disks(tmp_path: Path) -> None:
    """QEMU names nodes and devices with dots (``drive.0``); a point's labels cannot:
    without ``disks`` the job fails at once saying how to name it; with, it runs."""
    with storage_daemon(tmp_path, {"drive.0": 1 * MIB}) as d:
        vault = _vault(tmp_path, False)
        d.write("drive.0", 0, os.urandom(5000))
        res = _run(_config(tmp_path, d))
        assert res.point is None
        assert res.error == ("vm web: QEMU's disk 'drive.0' (node 'drive.0') is no usable "
                             'label: name it in disks, e.g. disks = { drive_0 = "drive.0" }')
        assert d.leftovers() == set()
        res = _run(_config(tmp_path, d, disks={"drive_0": "drive.0"}))
        assert res.point is not None, res.error
        assert _restored(tmp_path, vault, res.point.id, "drive_0") == d.read("drive.0")


@pytest.mark.slow
def test_an_nbd_socket_that_is_not_qemus(tmp_path: Path, daemon: Daemon) -> None:
    """``nbd`` names a socket QEMU does not serve (no server, or another program's): one
    line, nothing left in QEMU, the bitmap folded back."""
    import subprocess

    from helpers.qemu import create

    _vault(tmp_path, False)
    first = _run(_config(tmp_path, daemon, disks={"os": "os"}))
    assert first.point is not None
    other = tmp_path / "other.sock"
    create(tmp_path / "other.qcow2", MIB)
    proc = subprocess.Popen(["qemu-nbd", "--socket", str(other), "--persistent", "--shared=4",
                             "-f", "qcow2", str(tmp_path / "other.qcow2")])
    try:
        while not other.exists():
            assert proc.poll() is None
        for nbd in (other, tmp_path / "none.sock"):
            res = _run(_config(tmp_path, daemon, disks={"os": "os"}, nbd=str(nbd)))
            assert res.point is None and res.error is not None
            assert res.error == (f"{daemon.qmp}: nbd {nbd} is given, but this QEMU runs no "
                                 "NBD server (leave nbd out: cbt starts its own)")
            assert daemon.leftovers() == set()
            assert set(daemon.bitmaps("os")) == {_bm(tmp_path, first.point.id)}
    finally:
        proc.terminate()
        proc.wait()


_STORM = """
import os, sys, time
if os.fork() == 0:  # the hook returns at once; its child sends SIGTERM to cbt
    time.sleep(float(sys.argv[2]))
    end = time.monotonic() + 0.4
    while time.monotonic() < end:
        try:
            os.kill(int(sys.argv[1]), 15)
        except ProcessLookupError:
            break
        time.sleep(0.0005)
    os._exit(0)
"""


@pytest.mark.slow
def test_a_sigterm_at_every_step_leaves_nothing_and_loses_nothing(
        tmp_path: Path, daemon: Daemon) -> None:
    """A SIGTERM from the pre hook on, a little later each time, lands in every step
    (overlays, the transaction, exports, transfer; the abort kills the hook's group, so
    one lands): each aborted run leaves nothing in QEMU, and the next run's point
    equals the guest."""
    import sys
    import time

    from cbt.jobs.job import JobAborted

    vault = _vault(tmp_path, False)
    script = tmp_path / "storm.py"
    script.write_text(_STORM)
    assert _run(_config(tmp_path, daemon)).point is not None
    old = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        for i in range(12):
            daemon.write("os", (i % 50) * 64 * KIB, os.urandom(3000))
            cfg = _config(tmp_path, daemon, hooks={"pre": [
                sys.executable, str(script), str(os.getpid()), str(i * 0.004)]})
            with pytest.raises(JobAborted):
                _run(cfg)
            time.sleep(0.5)  # the storm is over
            assert daemon.leftovers() == set(), i
            daemon.write("db", (i % 30) * 64 * KIB, os.urandom(3000))
    finally:
        signal.signal(signal.SIGTERM, old)
    res = _run(_config(tmp_path, daemon))
    assert res.point is not None, res.error
    for label in ("os", "db"):
        assert _disk(res.point, label).change_source == "qemu-bitmap"
        assert _restored(tmp_path, vault, res.point.id, label) == daemon.read(label)
