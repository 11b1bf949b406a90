"""`cbt gc` after prune, and gc racing a running backup and a running restore (issue 6).

Races are real processes: a `cbt backup` or `cbt restore` in its own session,
and `cbt gc` run while it works (free-running, or with the reader/writer held
by SIGSTOP at a known point so the interleaving is certain).  Afterwards every
remaining point restores bit for bit against copies of the disks taken at
backup time, and `cbt verify --data` is clean.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import MIB
from helpers.cli import cleanup_group, crash_env, run_in_session, start_cbt, wait_for
from helpers.images import assert_same_bytes, copy_disk, fast_random, write_at, write_random_disk
from helpers.jobs import write_config
from helpers.packs import pack_set
from helpers.vaults import (
    dir_bytes,
    gc,
    listed_ids,
    prune,
    restore,
    vault_state,
    verify_data_clean,
)

from cbt.api import Vault
from cbt.source.disks import DiskSpec

BS = 16 << 10  # the default block size of a first backup


@contextlib.contextmanager
def _stopped(proc: subprocess.Popen[str]) -> Iterator[None]:
    """Hold a cbt process group still (SIGSTOP) for the body, then let it go on."""
    os.killpg(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(proc.pid, signal.SIGCONT)


@contextlib.contextmanager
def _throttled(proc: subprocess.Popen[str], run_s: float = 0.05,
               hold_s: float = 0.2) -> Iterator[None]:
    """Let a cbt process group run only ``run_s`` in every ``run_s + hold_s`` (SIGCONT,
    then SIGSTOP) for the body, then let it go on: it still works beside the body, but
    so slowly that it cannot finish first, however loaded the machine is."""
    done = threading.Event()

    def cycle() -> None:
        with contextlib.suppress(ProcessLookupError):  # (it may end meanwhile)
            while not done.wait(run_s):
                os.killpg(proc.pid, signal.SIGSTOP)
                if done.wait(hold_s):
                    break
                os.killpg(proc.pid, signal.SIGCONT)

    thread = threading.Thread(target=cycle)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGCONT)


def _config(tmp_path: Path, retention: dict[str, int], disks: dict[str, str],
            vm: str = "v") -> Path:
    return write_config(tmp_path / "cbt.toml",
                        {"p": {"schedule": "daily 12:00", "retention": retention}},
                        {vm: {"policy": "p", "disks": disks, "snapshot": "none"}})


# -- prune + gc ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("dead_in", ["middle", "first"])
def test_prune_then_gc_frees_the_dead_and_keeps_the_rest(tmp_path: Path, dead_in: str) -> None:
    """24 MiB of unique data lives in one point only and is overwritten the next day;
    that point is pruned away.  "middle": the point sits between others; "first": it is
    the first, full backup that every later one builds on.  Either way no remaining
    point references those blocks, so gc must free them."""
    size = 32 * MIB
    disk = tmp_path / "disks" / "os.img"
    disk.parent.mkdir(parents=True)
    with open(disk, "wb") as f:
        f.write(fast_random(2 * MIB, seed=1))  # region A: lives on
        f.truncate(size)
    unique = fast_random(24 * MIB, seed=2)  # region U: dies
    zeros = bytes(24 * MIB)
    cfg = _config(tmp_path, {"daily": 2}, {"os": "disks/os.img"})
    vault_dir = tmp_path / "vault"
    vault = Vault.init(vault_dir)
    truth = {}
    days = {"first": [unique, zeros, None, None], "middle": [None, unique, zeros, None]}[dead_in]
    for day, region in enumerate(days, start=1):
        if region is not None:
            write_at(disk, 4 * MIB, region)
        write_at(disk, day * 4096, fast_random(4096, seed=100 + day))  # a small change
        pid = vault.backup("v", [DiskSpec("os", str(disk))],
                           created=f"2026-04-0{day}T12:00:00Z", workers=1).id
        truth[pid] = copy_disk(disk, tmp_path / "truth" / f"{pid}.img")
    ids = list(truth)
    out = prune(cfg, "2026-04-05T00:00:00Z")
    assert {p["recovery_point"] for p in out["points"] if p["keep"]} == set(ids[2:])
    assert listed_ids(vault_dir) == ids[2:]

    packs_before = dir_bytes(vault_dir / "packs")
    state = vault_state(vault_dir)
    dry = gc(vault_dir, "--dry-run", "--grace", "0")
    assert dry["dry_run"] is True
    assert vault_state(vault_dir) == state, "gc --dry-run changed the vault"

    real = gc(vault_dir, "--grace", "0")
    assert real["dry_run"] is False
    for k in ("packs_removed", "packs_rewritten", "bytes_freed"):
        assert real[k] == dry[k], (k, dry, real)
    # 24 MiB of incompressible data died
    assert real["bytes_freed"] >= 20 * MIB, real
    assert dir_bytes(vault_dir / "packs") <= packs_before - 20 * MIB
    for pid in ids[2:]:
        restore(vault_dir, pid, tmp_path / "r1" / pid)
        assert_same_bytes(tmp_path / "r1" / pid / "os.img", truth[pid])
    verify_data_clean(vault_dir)

    # a second gc past the grace period empties the trash: the vault itself shrinks
    total_before = dir_bytes(vault_dir)
    time.sleep(0.05)
    again = gc(vault_dir, "--grace", "0")
    assert again["packs_removed"] == again["packs_rewritten"] == 0
    assert dir_bytes(vault_dir) <= total_before - 20 * MIB
    assert dir_bytes(vault_dir / "trash") == 0
    for pid in ids[2:]:
        Vault.open(vault_dir).restore(pid, tmp_path / "r2" / pid, workers=1)
        assert_same_bytes(tmp_path / "r2" / pid / "os.img", truth[pid])
    verify_data_clean(vault_dir)


# -- gc beside a running backup ---------------------------------------------------------------


def _dead_point(tmp_path: Path, vault: Vault, old: bytes) -> tuple[Path, str, Path, set[str]]:
    """VM v: day 1 has disk "old" holding ``old``; day 2 only disk "new".  Pruning with
    daily = 1 removes day 1, and nothing else references ``old``'s blocks.

    Returns (config, day 2's point, its truth, the packs day 1 wrote)."""
    old_disk = tmp_path / "disks" / "old.img"
    old_disk.parent.mkdir(parents=True, exist_ok=True)
    old_disk.write_bytes(old)
    new_disk = write_random_disk(tmp_path / "disks" / "new.img", 4 * MIB, seed=77)
    before = pack_set(Path(vault.root))
    vault.backup("v", [DiskSpec("old", str(old_disk))], created="2026-05-01T12:00:00Z")
    old_packs = pack_set(Path(vault.root)) - before
    new_point = vault.backup("v", [DiskSpec("new", str(new_disk))],
                             created="2026-05-02T12:00:00Z").id
    new_truth = copy_disk(new_disk, tmp_path / "truth" / "new.img")
    cfg = _config(tmp_path, {"daily": 1}, {"new": "disks/new.img"})
    out = prune(cfg, "2026-05-03T00:00:00Z")
    assert [p["recovery_point"] for p in out["points"] if p["keep"]] == [new_point]
    old_disk.unlink()
    return cfg, new_point, new_truth, old_packs


def _point_of(stdout: str) -> str:
    lines = [json.loads(x) for x in stdout.splitlines() if x.strip()]
    points = [x for x in lines if x.get("type") == "point"]
    assert len(points) == 1, stdout
    return str(points[0]["recovery_point"])


@pytest.mark.slow
def test_gc_beside_a_running_backup(tmp_path: Path) -> None:
    """gc, run while a 256 MiB backup is in progress, removes the dead point's packs
    but nothing the backup writes; the new point restores bit for bit."""
    vault_dir = tmp_path / "vault"
    vault = Vault.init(vault_dir)
    _, new_point, new_truth, old_packs = _dead_point(tmp_path, vault,
                                                     fast_random(32 * MIB, seed=5))
    big = write_random_disk(tmp_path / "disks" / "big.img", 256 * MIB, seed=6)
    big_truth = copy_disk(big, tmp_path / "truth" / "big.img")
    packs0 = pack_set(vault_dir)
    proc = start_cbt("backup", vault_dir, big, "--vm", "big", "--json")
    with cleanup_group(proc):
        # the backup is writing: its first pack is there
        wait_for(lambda: pack_set(vault_dir) - packs0 or proc.poll() is not None,
                 what="the backup's first pack")
        assert proc.poll() is None, "the backup finished before gc could start"
        # (slowed while gc runs: a loaded machine, such as pytest-xdist's workers on 2
        # cores, ran the backup to its end first, and gc then waited for its commit)
        with _throttled(proc):
            during = gc(vault_dir, "--grace", "0")
            still_running = proc.poll() is None
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert still_running, "the backup ended before gc did: no race (use a larger disk)"
    assert during["packs_removed"] >= 1, during  # the dead point's packs went
    assert not (old_packs & pack_set(vault_dir))
    big_point = _point_of(out)
    restore(vault_dir, big_point, tmp_path / "r-big")
    assert_same_bytes(tmp_path / "r-big" / "big.img", big_truth)
    after = gc(vault_dir, "--grace", "0")  # nothing of the new point is dead
    assert after["packs_removed"] == after["packs_rewritten"] == 0, after
    restore(vault_dir, new_point, tmp_path / "r-new")
    assert_same_bytes(tmp_path / "r-new" / "new.img", new_truth)
    verify_data_clean(vault_dir)


def _gc_lock_held_by_other(vault_dir: Path) -> bool:
    """Is vault/gc.lock flock-ed by another process right now? (released at once if not)"""
    fd = os.open(vault_dir / "gc.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the lock if we got it
    return False


@pytest.mark.slow
def test_gc_started_while_a_backup_commits_does_not_fail(tmp_path: Path) -> None:
    """gc "may run beside one backup": also when it starts in the moment that backup is
    committing (holding the gc lock).  The backup is held by SIGSTOP inside its commit;
    a gc started then must not fail - it may wait for the commit - and both end well."""
    vault_dir = tmp_path / "vault"
    vault = Vault.init(vault_dir)
    _, new_point, new_truth, _ = _dead_point(tmp_path, vault, fast_random(8 * MIB, seed=13))
    disk = write_random_disk(tmp_path / "disks" / "c.img", 64 * MIB, seed=14)
    truth = copy_disk(disk, tmp_path / "truth" / "c.img")
    proc = start_cbt("backup", vault_dir, disk, "--vm", "c", "--json")
    with cleanup_group(proc):
        wait_for(lambda: _gc_lock_held_by_other(vault_dir) or proc.poll() is not None,
                 what="the backup's commit", interval=0.0002)
        with _stopped(proc):
            assert proc.poll() is None and _gc_lock_held_by_other(vault_dir), \
                "could not hold the backup inside its commit"
            gc_proc = start_cbt("gc", vault_dir, "--grace", "0", "--json")
            time.sleep(1.0)  # it may wait for the commit, or finish; it must not fail
        with cleanup_group(gc_proc):
            _, gc_err = gc_proc.communicate(timeout=120)
        out, err = proc.communicate(timeout=300)
    assert gc_proc.returncode == 0, f"gc beside a committing backup failed: {gc_err}"
    assert proc.returncode == 0, err
    point = _point_of(out)
    restore(vault_dir, point, tmp_path / "r")
    assert_same_bytes(tmp_path / "r" / "c.img", truth)
    restore(vault_dir, new_point, tmp_path / "r-new")
    assert_same_bytes(tmp_path / "r-new" / "new.img", new_truth)
    verify_data_clean(vault_dir)


@pytest.mark.slow
def test_gc_while_a_backup_reuses_blocks_of_a_pruned_point(tmp_path: Path) -> None:
    """The hard case.  A point is pruned; a backup starts whose disk holds that point's
    blocks again, so it deduplicates against them (they are still in the index it
    loaded); gc runs while the backup is held mid-transfer and moves those blocks'
    packs to the trash.  The backup's commit must bring them back: its point restores
    bit for bit, verify --data is clean, and a later gc keeps them."""
    vault_dir = tmp_path / "vault"
    vault = Vault.init(vault_dir)
    old = fast_random(32 * MIB, seed=8)
    _, new_point, new_truth, old_packs = _dead_point(tmp_path, vault, old)
    assert old_packs
    disk = tmp_path / "disks" / "again.img"
    with open(disk, "wb") as f:  # the pruned blocks again, then 48 MiB never seen
        f.write(old)
        f.write(fast_random(48 * MIB, seed=9))
    truth = copy_disk(disk, tmp_path / "truth" / "again.img")
    packs0 = pack_set(vault_dir)
    proc = start_cbt("backup", vault_dir, disk, "--vm", "w", "--workers", "2", "--json")
    with cleanup_group(proc):
        # a new pack exists: the backup has loaded the index and is transferring
        wait_for(lambda: pack_set(vault_dir) - packs0 or proc.poll() is not None,
                 what="the backup's first pack")
        assert proc.poll() is None, "the backup finished before it could be held"
        with _stopped(proc):
            first = gc(vault_dir, "--grace", "0")
            assert first["packs_removed"] >= 1, first
            assert not (old_packs & pack_set(vault_dir)), "gc left the dead packs in place"
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    point = _point_of(out)
    restore(vault_dir, point, tmp_path / "r1")
    assert_same_bytes(tmp_path / "r1" / "again.img", truth)
    verify_data_clean(vault_dir)
    # nothing it relies on is dead now: gc (twice, emptying the trash) keeps it whole
    gc(vault_dir, "--grace", "0")
    time.sleep(0.05)
    gc(vault_dir, "--grace", "0")
    restore(vault_dir, point, tmp_path / "r2")
    assert_same_bytes(tmp_path / "r2" / "again.img", truth)
    restore(vault_dir, new_point, tmp_path / "r3")
    assert_same_bytes(tmp_path / "r3" / "new.img", new_truth)
    verify_data_clean(vault_dir)


# -- gc beside a running restore ----------------------------------------------------------------


@pytest.mark.slow
def test_gc_with_no_grace_while_a_restore_reads(tmp_path: Path) -> None:
    """A restore has loaded the index and started writing; gc (grace 0) rewrites the
    packs it is about to read (two thirds of each is dead) and moves the originals to
    the trash.  The restore still succeeds, bit for bit."""
    vault_dir = tmp_path / "vault"
    vault = Vault.init(vault_dir)
    x = np.frombuffer(fast_random(64 * MIB, seed=11), dtype=np.uint8).reshape(-1, BS)
    y = x.copy()
    # day 2 keeps every third block of day 1, the rest is new
    fresh = np.frombuffer(fast_random(64 * MIB, seed=12), dtype=np.uint8).reshape(-1, BS)
    rows = np.arange(len(y)) % 3 != 0
    y[rows] = fresh[rows]
    old_disk = tmp_path / "disks" / "x.img"
    old_disk.parent.mkdir(parents=True)
    x.tofile(old_disk)
    before = pack_set(vault_dir)
    vault.backup("v", [DiskSpec("x", str(old_disk))], created="2026-06-01T12:00:00Z")
    old_packs = pack_set(vault_dir) - before
    new_disk = tmp_path / "disks" / "y.img"
    y.tofile(new_disk)
    truth = copy_disk(new_disk, tmp_path / "truth" / "y.img")
    point = vault.backup("v", [DiskSpec("y", str(new_disk))],
                         created="2026-06-02T12:00:00Z").id
    cfg = _config(tmp_path, {"daily": 1}, {"y": "disks/y.img"})
    out = prune(cfg, "2026-06-03T00:00:00Z")
    assert [p["recovery_point"] for p in out["points"] if p["keep"]] == [point]

    to = tmp_path / "out"
    proc = start_cbt("restore", vault_dir, point, "--to", to, "--workers", "1", "--json")
    with cleanup_group(proc):
        # the restore writes its target: it has loaded the index and planned every read
        wait_for(lambda: (to.is_dir() and any(to.iterdir())) or proc.poll() is not None,
                 what="the restore's target file", interval=0.0005)
        assert proc.poll() is None, "the restore finished before gc could run"
        with _stopped(proc):
            res = gc(vault_dir, "--grace", "0")
            assert res["packs_rewritten"] >= 1, res
            assert not (old_packs & pack_set(vault_dir)), "the old packs are still in place"
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert_same_bytes(to / "y.img", truth)
    verify_data_clean(vault_dir)
    restore(vault_dir, point, tmp_path / "again")
    assert_same_bytes(tmp_path / "again" / "y.img", truth)


# -- crash safety ------------------------------------------------------------------------


@pytest.mark.slow
def test_gc_killed_at_every_durable_step(tmp_path: Path) -> None:
    """kill -9 of gc at its N-th durable step, for every N (it removes one pack and
    rewrites others): the remaining point restores bit for bit and verify --data is
    clean after each crash, and again after a gc run to the end."""
    pristine = tmp_path / "vault"  # the config's vault, pruned, never collected
    vault = Vault.init(pristine)
    x = np.frombuffer(fast_random(8 * MIB, seed=41), dtype=np.uint8).reshape(-1, BS)
    y = x.copy()
    fresh = np.frombuffer(fast_random(8 * MIB, seed=42), dtype=np.uint8).reshape(-1, BS)
    rows = np.arange(len(y)) % 3 != 0  # day 2 keeps every third block of day 1
    y[rows] = fresh[rows]
    (tmp_path / "disks").mkdir()
    x.tofile(tmp_path / "disks" / "x.img")
    (tmp_path / "disks" / "dead.img").write_bytes(fast_random(4 * MIB, seed=43))
    vault.backup("v", [DiskSpec("x", str(tmp_path / "disks" / "x.img")),
                       DiskSpec("dead", str(tmp_path / "disks" / "dead.img"))],
                 created="2026-07-01T12:00:00Z", workers=1)
    y.tofile(tmp_path / "disks" / "y.img")
    truth = copy_disk(tmp_path / "disks" / "y.img", tmp_path / "truth.img")
    point = vault.backup("v", [DiskSpec("y", str(tmp_path / "disks" / "y.img"))],
                         created="2026-07-02T12:00:00Z", workers=1).id
    cfg = _config(tmp_path, {"daily": 1}, {"y": "disks/y.img"})
    out = prune(cfg, "2026-07-03T00:00:00Z")
    assert [p["recovery_point"] for p in out["points"] if p["keep"]] == [point]

    work = tmp_path / "work"

    def check(label: str) -> None:
        v = Vault.open(work)
        assert [p.id for p in v.points()] == [point]
        v.restore(point, tmp_path / "r" / label, workers=1)
        assert_same_bytes(tmp_path / "r" / label / "y.img", truth)
        assert v.verify(data=True)["problems"] == [], label

    for n in range(1, 60):
        if work.exists():
            shutil.rmtree(work)
        shutil.copytree(pristine, work)
        r = run_in_session("gc", work, "--grace", "0", "--json",
                           env=crash_env(n, tmp_path))
        check(f"{n}-crashed")
        if r.returncode == 0:  # N is past its last step: it ran to the end
            res = json.loads(r.stdout)
            assert res["packs_removed"] >= 1 and res["packs_rewritten"] >= 1, res
            break
        assert r.returncode == -9, (n, r.returncode, r.stderr)
        r2 = run_in_session("gc", work, "--grace", "0")
        assert r2.returncode == 0, r2.stderr
        check(f"{n}-after")
    assert r.returncode == 0 and n > 2, "gc made too few durable steps"
