"""The early scan of an incremental ``cbt backup``: the disks are hashed before the vault is
even opened for writing, and the backup then reads only the blocks the vault lacks.

Truth is numpy and the ``blake3`` package over the disk's bytes; restores and ``verify
--data`` are the real commands.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pytest
from helpers import KIB, MIB
from helpers.cli import backup_cli, cbt_json
from helpers.images import read
from helpers.truth import truth_changed
from helpers.vaults import FinishedScan

import cbt
from cbt.format.records import PointRecord
from cbt.ops.backup import BackupRequest, backup
from cbt.ops.early_scan import start_early_scan
from cbt.source.disks import DiskSpec
from cbt.source.scan import start_scan

BS = 16 * KIB


def _disk(path: Path, size: int, seed: int) -> np.ndarray:
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    data.tofile(path)
    return data


def _write(path: Path, data: np.ndarray, offset: int, length: int, seed: int) -> None:
    new = np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8)
    data[offset:offset + length] = new
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, new.tobytes(), offset)
    finally:
        os.close(fd)


def _digests(data: np.ndarray, bs: int) -> np.ndarray:
    n = -(-len(data) // bs)
    return np.array([np.frombuffer(blake3.blake3(data[i * bs:(i + 1) * bs].tobytes()).digest(),
                                   np.uint8) for i in range(n)])


def _first_backup(tmp_path: Path, size: int, seed: int) -> tuple[cbt.Vault, Path, np.ndarray]:
    """A vault holding one point of disk ``d``: the disk's next backup is incremental."""
    vault = cbt.Vault.init(tmp_path / "v")
    disk = tmp_path / "d.img"
    data = _disk(disk, size, seed)
    vault.backup("vm", [f"d={disk}"], block_size=BS)
    return vault, disk, data


def _backup(vault: cbt.Vault, spec: DiskSpec, early: Any, wait: float = 0.0) -> PointRecord:
    return backup(vault, BackupRequest("vm", [spec], wait=wait, early=early))


def test_started_only_for_disks_with_a_previous_point(tmp_path: Path) -> None:
    vault = cbt.Vault.init(tmp_path / "v")
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    _disk(a, 2 * MIB, 1)
    _disk(b, 3 * MIB, 2)
    specs = [DiskSpec("a", str(a)), DiskSpec("b", str(b))]
    assert start_early_scan(vault.root, "vm", specs) is None, "no point yet: nothing to start"
    vault.backup("vm", [specs[0]], block_size=BS)
    early = start_early_scan(vault.root, "vm", specs)
    assert early is not None
    try:
        assert early.disks() == [(str(a), BS, 2 * MIB)], "only disk a has a previous point"
    finally:
        early.cancel()
    assert start_early_scan(vault.root, "vm", specs, block_size=64 * KIB) is None, (
        "a block size the backup will refuse starts nothing")
    assert start_early_scan(tmp_path / "nowhere", "vm", specs) is None


@pytest.mark.slow
def test_cli_incremental_with_early_scan_matches_the_disk(tmp_path: Path) -> None:
    """Two disks of different sizes (the early scan shards them by size), a real ``cbt
    backup``: the point's manifests equal the disks' BLAKE3 digests, the changed-block
    counts equal the truth, and a restore gives the disks back bit for bit."""
    vault = tmp_path / "v"
    cbt_json("init", "--encryption", "none", vault)
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    da, db = _disk(a, 5 * MIB + 4 * KIB, 3), _disk(b, 2 * MIB, 4)
    backup_cli(vault, "vm", f"a={a}", f"b={b}", "--block-size", "16K")
    old_a, old_b = da.copy(), db.copy()
    for k, off in enumerate((100, 3 * MIB + 5, 5 * MIB - 3000)):
        _write(a, da, off, 6000, 10 + k)
    _write(b, db, 17 * KIB, 40 * KIB, 20)
    point = backup_cli(vault, "vm", f"a={a}", f"b={b}")
    changed = {d["label"]: d["changed_blocks"] for d in point["disks"]}
    assert changed == {"a": truth_changed(old_a, da, BS), "b": truth_changed(old_b, db, BS)}
    v = cbt.Vault.open(vault)
    p = v.point(point["recovery_point"])
    for label, data in (("a", da), ("b", db)):
        assert np.array_equal(v.resolve(p, label).digests, _digests(data, BS)), label
    cbt_json("restore", vault, point["recovery_point"], "--to", tmp_path / "out")
    assert np.array_equal(read(tmp_path / "out" / "a.img"), da)
    assert np.array_equal(read(tmp_path / "out" / "b.img"), db)
    assert cbt_json("verify", vault, "--data")["problems"] == []


def test_disk_written_after_the_early_scan(tmp_path: Path) -> None:
    """A live disk written between the early scan and the backup: a block the scan saw
    unchanged keeps what the scan saw (it is in the vault already); a block the vault
    lacks is read again when stored, and the point records what was stored.  Either way
    every block of the restore is a state the disk really had, and verify passes."""
    vault, disk, data = _first_backup(tmp_path, 4 * MIB, 5)
    _write(disk, data, 0, 3 * BS, 30)  # day 1: blocks 0-2
    day1 = data.copy()
    scans = start_scan([(disk, BS)]).wait()
    _write(disk, data, BS, 3 * BS, 31)  # after the scan: blocks 1-3 (1, 2 new; 3 old)
    point = _backup(vault, DiskSpec("d", str(disk)), FinishedScan(scans))
    want = day1.copy()
    want[BS:3 * BS] = data[BS:3 * BS]  # stored blocks: read again, as they are now
    got = vault.resolve(point, "d")
    assert np.array_equal(got.digests, _digests(want, BS))
    vault.restore(point.id, tmp_path / "out")
    assert np.array_equal(read(tmp_path / "out" / "d.img"), want)
    assert vault.verify(data=True)["problems"] == []


def test_disk_resized_after_the_early_scan_is_hashed_again(tmp_path: Path) -> None:
    vault, disk, data = _first_backup(tmp_path, 3 * MIB, 6)
    scans = start_scan([(disk, BS)]).wait()
    grown = np.concatenate([data, np.random.default_rng(7).integers(0, 256, MIB, np.uint8)])
    grown.tofile(disk)
    point = _backup(vault, DiskSpec("d", str(disk)), FinishedScan(scans))
    assert np.array_equal(vault.resolve(point, "d").digests, _digests(grown, BS))
    assert point.disks[0].changed_blocks == truth_changed(data, grown, BS)


def test_snapshot_changed_after_the_early_scan(tmp_path: Path) -> None:
    """A disk read from a snapshot is not re-hashed on the plain path, but an early scan's
    digest is older than the bytes read at store time: those are hashed again too."""
    vault = cbt.Vault.init(tmp_path / "v")
    disk, snap = tmp_path / "d.img", tmp_path / "snap.img"
    data = _disk(disk, 2 * MIB, 8)
    vault.backup("vm", [f"d={disk}"], block_size=BS)
    _write(disk, data, 5 * BS, 2 * BS, 40)
    data.tofile(snap)
    scans = start_scan([(snap, BS)]).wait()
    _write(snap, data, 5 * BS, 2 * BS, 41)  # the snapshot changes after the scan
    point = _backup(vault, DiskSpec("d", str(disk), read_from=str(snap)), FinishedScan(scans))
    assert np.array_equal(vault.resolve(point, "d").digests, _digests(data, BS))
    assert vault.verify(data=True)["problems"] == []


def test_failed_early_scan_falls_back_to_hashing(tmp_path: Path) -> None:
    vault, disk, data = _first_backup(tmp_path, 2 * MIB, 9)
    _write(disk, data, 3 * BS, 5000, 50)
    early = start_scan([(disk, BS)])
    early.cancel()  # its workers are gone: waiting for it fails
    point = _backup(vault, DiskSpec("d", str(disk)), early)
    assert np.array_equal(vault.resolve(point, "d").digests, _digests(data, BS))


@pytest.mark.slow
def test_early_scan_dropped_after_a_long_wait_for_the_lock(tmp_path: Path) -> None:
    """Waiting long for the writer lock makes the early scan too old: the backup hashes
    the disk again, so the point is the disk as it is when the lock is finally taken."""
    import subprocess
    import sys

    vault, disk, data = _first_backup(tmp_path, 2 * MIB, 10)
    scans = start_scan([(disk, BS)]).wait()
    _write(disk, data, 0, 4 * BS, 60)  # after the scan, before the backup
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom cbt.repo.lock import exclusive_lock\n"
         "from cbt.repo.storage import LocalStorage\n"
         "with exclusive_lock(LocalStorage(sys.argv[1]), 0):\n    print('locked', flush=True)\n"
         "    time.sleep(2.0)\n", vault.root], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        point = _backup(vault, DiskSpec("d", str(disk)), FinishedScan(scans), wait=30)
    finally:
        holder.wait(timeout=30)
    assert np.array_equal(vault.resolve(point, "d").digests, _digests(data, BS))


def test_forked_workers_cannot_be_waited_for_twice() -> None:
    from cbt.core.parallel import Forked, WorkerError

    forked = Forked(lambda task, report: task * 2, [1, 2, 3])
    assert forked.wait() == [2, 4, 6]
    try:
        forked.wait()
    except WorkerError:
        pass
    else:
        raise AssertionError("a second wait must fail, not read pipes it closed")


def test_starts_before_numpy_or_pyarrow_load(tmp_path: Path) -> None:
    """The early scan is a head start only if it starts first: opening the vault, finding
    the previous point and forking the scan load neither numpy nor pyarrow (about 60 ms
    of imports that the backup needs later, while the disks are being hashed)."""
    vault, disk, _ = _first_backup(tmp_path, 2 * MIB, 8)
    probe = ("import sys\n"
             "from cbt.ops.early_scan import start_early_scan\n"
             "from cbt.source.disks import DiskSpec\n"
             "early = start_early_scan(sys.argv[1], 'vm', [DiskSpec('d', sys.argv[2])])\n"
             "print(early is not None, sorted(m for m in ('numpy', 'pyarrow', 'zstandard') "
             "if m in sys.modules))\n"
             "early.cancel()\n")
    r = subprocess.run([sys.executable, "-c", probe, str(vault.root), str(disk)],
                       capture_output=True, text=True, check=True)
    assert r.stdout.split("\n")[0] == "True []", r.stdout + r.stderr
