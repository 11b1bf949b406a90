"""Many writers into one vault (issue 15), on a directory and on S3 (a real SeaweedFS).

Backups share the vault; prune, repair and key changes need it alone; gc runs beside
backups; one VM's backups run one at a time; a dead holder never blocks for long.

Every writer is a real process: :data:`WRITER` backs up one VM through the Python API
(``Vault.open_on``: S3 is not wired into the command line by this part), and waits at
gates the test opens: after planning (``HOLD=plan``: the index is loaded), before its
commit (``HOLD=commit``: every pack written, nothing committed), and inside it
(``HOLD=segment``: its manifests written, its record not yet).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from helpers import KIB, MIB
from helpers.cli import cbt, clean_env, one_error_line
from helpers.images import assert_same_bytes
from helpers.s3 import S3Server, fresh_bucket
from helpers.vaults import PASSWORD, fast_kdf

import cbt as cbt_api
from cbt.repo.lock import (
    VaultLockedError,
    exclusive_lock,
    gc_lock,
    shared_lock,
    vault_holders,
    vm_lock,
    writers_since,
)
from cbt.repo.storage import LocalStorage, MemoryStorage, Storage

BS = 64 * KIB

WRITER = r"""
import os, sys, time
from pathlib import Path
kind, loc, vm, disk, gates = sys.argv[1:6]
sys.argv = ["cbt", "backup", "--vm", vm]  # (what a plain vault's lock says)
import cbt
from cbt.ops import backup as b
from cbt.source.disks import parse_disk_arg
gates = Path(gates)
holds = os.environ.get("HOLD", "").split(",")

def gate(step):
    (gates / f"{step}-{vm}-{os.getpid()}").write_text("")
    deadline = time.monotonic() + 120
    while not (gates / f"go-{step}").exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"gate {step} never opened")
        time.sleep(0.02)

if "plan" in holds:
    transfer = b.transfer
    def held(*args, **kw):
        gate("plan")
        return transfer(*args, **kw)
    b.transfer = held

if "segment" in holds:  # in its commit: manifests written, holding gc.lock
    write_segment = b._write_segment
    def held_segment(*args, **kw):
        gate("segment")
        return write_segment(*args, **kw)
    b._write_segment = held_segment

if kind == "dir":
    from cbt.repo.storage import LocalStorage
    storage = LocalStorage(loc)
else:
    from cbt.repo.s3 import S3Storage
    storage = S3Storage(loc)
vault = cbt.Vault.open_on(storage)
before = (lambda: (gate("commit"), [])[1]) if "commit" in holds else None
try:
    point = b.backup(vault, b.BackupRequest(vm, [parse_disk_arg(f"d={disk}")], block_size=65536,
                                            wait=float(os.environ.get("WAIT", "0")),
                                            before_commit=before))
except Exception as exc:
    print(f"error: {exc}", file=sys.stderr, flush=True)
    raise SystemExit(2)
print(point.id, flush=True)
"""


@dataclass
class Place:
    kind: str  # "dir" or "s3"
    loc: str
    env: dict[str, str]

    def storage(self) -> Storage:
        if self.kind == "dir":
            return LocalStorage(self.loc)
        from cbt.repo.s3 import S3Storage
        return S3Storage(self.loc)

    def vault(self) -> cbt_api.Vault:
        return cbt_api.Vault.open_on(self.storage())


@pytest.fixture(scope="module")
def bucket(s3: S3Server) -> str:
    return fresh_bucket()


def _place(request: pytest.FixtureRequest, tmp_path: Path, kind: str) -> Place:
    if kind == "dir":
        cbt_api.Vault.init(tmp_path / "vault")
        return Place("dir", str(tmp_path / "vault"), {})
    from cbt.repo.s3 import S3Storage

    server: S3Server = request.getfixturevalue("s3")
    monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    loc = f"s3://{request.getfixturevalue('bucket')}/{os.urandom(6).hex()}/vault"
    cbt_api.Vault.create(S3Storage.create(loc))
    return Place("s3", loc, dict(server.env))


@pytest.fixture(params=["dir", "s3"])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Place:
    return _place(request, tmp_path, request.param)


@pytest.fixture
def gates(tmp_path: Path) -> Path:
    (tmp_path / "gates").mkdir()
    return tmp_path / "gates"


def _disk(path: Path, seed: int, shared: int = 1, own: int = 1) -> Path:
    """``shared`` MiB every disk has (seed 0), then ``own`` MiB of its own."""
    common = np.random.default_rng(0).integers(0, 256, shared * MIB, np.uint8)
    mine = np.random.default_rng(seed).integers(0, 256, own * MIB, np.uint8)
    path.write_bytes(common.tobytes() + mine.tobytes())
    return path


def _start(place: Place, vm: str, disk: Path, gates: Path, hold: str = "",
           **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, place.kind, place.loc, vm, str(disk), str(gates)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env=clean_env({**place.env, "HOLD": hold, **env}))


def _at(gates: Path, step: str, count: int, procs: list[subprocess.Popen[str]]) -> None:
    """Wait until ``count`` writers stand at gate ``step``."""
    deadline = time.monotonic() + 120
    while len(list(gates.glob(f"{step}-*"))) < count:
        dead = [p for p in procs if p.poll() is not None]
        assert not dead, [p.communicate() for p in dead]
        assert time.monotonic() < deadline, f"the writers never reached {step}"
        time.sleep(0.02)


def _open(gates: Path, step: str) -> None:
    (gates / f"go-{step}").write_text("")


def _end(proc: subprocess.Popen[str], timeout: float = 180) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out.strip(), err.strip()


@contextlib.contextmanager
def _reaped(*procs: subprocess.Popen[str]) -> Iterator[None]:
    try:
        yield
    finally:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGCONT)
                    os.killpg(p.pid, signal.SIGKILL)
            p.communicate()


def _restores(place: Place, tmp_path: Path, disks: dict[str, Path]) -> None:
    """Every VM's latest point restores bit for bit, and verify (data too) finds nothing.
    (From S3 through a copy into a directory: restoring from S3 is part S's.)"""
    import shutil

    vault = place.vault()
    result = vault.verify(data=True)
    assert result.problems == [], result.problems
    if place.kind == "s3":
        local = cbt_api.Vault.init(tmp_path / "copied")
        vault.copy(local)
        vault = local
    for vm, disk in disks.items():
        out = tmp_path / "out" / vm
        out.parent.mkdir(exist_ok=True)
        vault.restore(f"{vm}.latest", out, disk="d")
        assert_same_bytes(out, disk)
        out.unlink()
    if place.kind == "s3":
        shutil.rmtree(tmp_path / "copied")


# -- two and four writers at once ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 4])
def test_concurrent_backups_of_different_vms(place: Place, gates: Path, tmp_path: Path,
                                             n: int) -> None:
    """``n`` backups of different VMs in flight at once (all past their transfer, none
    committed), sharing blocks; each commits, restores bit for bit, verify is clean."""
    disks = {f"vm{i}": _disk(tmp_path / f"d{i}.img", seed=10 + i) for i in range(n)}
    procs = [_start(place, vm, disk, gates, "commit") for vm, disk in disks.items()]
    with _reaped(*procs):
        _at(gates, "commit", n, procs)
        holders = vault_holders(place.storage())
        assert sorted(h.pid for h in holders) == sorted(p.pid for p in procs)
        assert place.vault().points() == [], "a point in flight is visible"
        _open(gates, "commit")
        ends = [_end(p) for p in procs]
    assert [rc for rc, _o, _e in ends] == [0] * n, ends
    vault = place.vault()
    assert sorted(p.vm for p in vault.points()) == sorted(disks)
    assert vault_holders(place.storage()) == []
    _restores(place, tmp_path, disks)


@pytest.mark.slow
def test_a_starting_backup_keeps_another_runs_uncommitted_manifests(
        place: Place, gates: Path, tmp_path: Path) -> None:
    """A backup starts by removing a killed run's leftovers (manifests of no committed
    point): never those of a backup still running (written after its start)."""
    disks = {"a": _disk(tmp_path / "a.img", seed=80), "b": _disk(tmp_path / "b.img", seed=81)}
    first = _start(place, "a", disks["a"], gates, "segment")
    with _reaped(first):
        _at(gates, "segment", 1, [first])
        manifests = place.storage().list("manifests")
        assert manifests, "the first backup's manifests are written"
        second = _start(place, "b", disks["b"], gates)  # cleans leftovers, then waits
        with _reaped(second):
            deadline = time.monotonic() + 60
            while not any(h.pid == second.pid for h in vault_holders(place.storage())):
                assert second.poll() is None and time.monotonic() < deadline, second.stderr
                time.sleep(0.05)
            time.sleep(1.0)  # (it plans and transfers: its commit waits for the first's)
            assert set(manifests) <= set(place.storage().list("manifests"))
            _open(gates, "segment")
            ends = [_end(first), _end(second)]
    assert [rc for rc, _o, _e in ends] == [0, 0], ends
    _restores(place, tmp_path, disks)


# -- one VM: one run at a time -------------------------------------------------------------


@pytest.mark.slow
def test_second_backup_of_a_vm_fails_at_once_or_waits(place: Place, gates: Path,
                                                      tmp_path: Path) -> None:
    disk = _disk(tmp_path / "a.img", seed=20)
    first = _start(place, "a", disk, gates, "commit")
    with _reaped(first):
        _at(gates, "commit", 1, [first])
        t0 = time.monotonic()
        rc, _out, err = _end(_start(place, "a", disk, gates))
        assert rc == 2 and time.monotonic() - t0 < 30, err
        assert f"VM a of vault {place.storage().root} is locked by pid {first.pid} on " in err
        if place.kind == "dir":  # the command line says the same, in one line
            line = one_error_line(cbt("backup", place.loc, disk, "--vm", "a"))
            assert f"VM a of vault {place.loc} is locked by pid {first.pid}" in line, line
            assert "(cbt backup --vm a)" in line, line  # a plain vault names the command
        other = _start(place, "b", _disk(tmp_path / "b.img", seed=21), gates)  # another VM
        assert _end(other)[0] == 0
        waiter = _start(place, "a", disk, gates, WAIT="120")
        with _reaped(waiter):
            assert waiter.stderr is not None
            said = waiter.stderr.readline()
            assert said.startswith("cbt: waiting (up to 120 s) for VM a of vault "), said
            assert f"locked by pid {first.pid} on " in said, said
            _open(gates, "commit")
            rc, first_id, err = _end(first)
            assert rc == 0, err
            rc, second_id, err = _end(waiter)
    assert rc == 0, err
    points = place.vault().points()
    assert sorted(p.vm for p in points) == ["a", "a", "b"]
    assert {p.id for p in points if p.vm == "a"} == {first_id, second_id}
    assert place.vault().point(second_id).parent == first_id  # it ran after the first


def test_vm_lock_is_per_vm_and_opaque_in_an_encrypted_vault(tmp_path: Path) -> None:
    vault = cbt_api.Vault.create(LocalStorage.create(tmp_path / "v"), "aes-256-gcm",
                                 PASSWORD.encode(), fast_kdf())
    with vm_lock(vault, "secret-vm"):
        names = vault.storage.list_locks("locks")
        assert len(names) == 1 and "secret-vm" not in names[0], names
        with vm_lock(vault, "other-vm"):
            pass
        with pytest.raises(VaultLockedError) as info, vm_lock(vault, "secret-vm"):
            pass
        assert str(info.value.strerror).startswith(
            f"VM secret-vm of vault {vault.root} is locked by pid {os.getpid()} on ")
        assert "(cbt" not in str(info.value), "an encrypted vault's lock names no command"


# -- the vault: shared, alone ----------------------------------------------------------------


@pytest.fixture(params=["local", "memory", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        (tmp_path / "s").mkdir()
        return LocalStorage(tmp_path / "s")
    if request.param == "memory":
        return MemoryStorage()
    return _place(request, tmp_path, "s3").storage()


def test_shared_and_alone_on_any_storage(storage: Storage) -> None:
    assert writers_since(storage) is None
    t0 = time.time()
    with shared_lock(storage):
        first = writers_since(storage)
        assert first is not None and t0 - 1 <= first <= time.time()
        time.sleep(0.05)
        with shared_lock(storage):  # another backup beside it
            assert writers_since(storage) == first  # the earliest
            assert len(vault_holders(storage)) == 2
            with pytest.raises(VaultLockedError) as info, exclusive_lock(storage):
                pass
            assert f"vault {storage.root} is locked by pid {os.getpid()} on " in str(info.value)
            assert "(and 1 more)" in str(info.value)
        with gc_lock(storage, 0):  # gc beside backups
            pass
    assert writers_since(storage) is None and vault_holders(storage) == []
    with exclusive_lock(storage), \
            pytest.raises(VaultLockedError, match=r"; retry later or pass --wait SECONDS$"), \
            shared_lock(storage, 0.3):
        pass
    with shared_lock(storage):  # all released
        pass
    assert storage.list_locks("locks") == []


def test_a_waiting_backup_gets_the_vault_once_it_is_free(storage: Storage,
                                                         capfd: pytest.CaptureFixture[str]
                                                         ) -> None:
    import threading

    got = threading.Event()

    def backup() -> None:
        with shared_lock(storage, 30):
            got.set()

    with exclusive_lock(storage):
        t = threading.Thread(target=backup)
        t.start()
        time.sleep(0.5)
        assert not got.is_set()
    t.join(30)
    assert got.is_set()
    assert f"cbt: waiting (up to 30 s) for vault {storage.root}: locked by pid " \
        f"{os.getpid()}" in capfd.readouterr().err


# -- a dead holder -----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_killed_writer_does_not_block_the_next(place: Place, gates: Path,
                                                 tmp_path: Path) -> None:
    """SIGKILLed before its commit: on a directory its flocks die with it; on S3 its lock
    objects stay, but their holder is a dead process of this host: broken at once."""
    disk = _disk(tmp_path / "a.img", seed=30)
    first = _start(place, "a", disk, gates, "commit")
    with _reaped(first):
        _at(gates, "commit", 1, [first])
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert place.storage().list_locks("locks"), "the killed writer's locks are left"
    t0 = time.monotonic()
    rc, point_id, err = _end(_start(place, "a", disk, gates))
    assert rc == 0 and time.monotonic() - t0 < 60, err
    assert [p.id for p in place.vault().points()] == [point_id]
    assert place.storage().list_locks("locks") in ([], ["locks/vm-a"]), \
        "the dead holder's shared lock is removed"
    _restores(place, tmp_path, {"a": disk})


@pytest.mark.slow
def test_s3_lease_expires_and_a_late_holder_commits_nothing(
        request: pytest.FixtureRequest, gates: Path, tmp_path: Path) -> None:
    """A holder frozen (SIGSTOP: alive, but renewing nothing) past its lease: the next
    backup of its VM breaks its locks after the lease; thawed, it fails at its commit
    (its lease could not be renewed), committing nothing."""
    place = _place(request, tmp_path, "s3")
    disk = _disk(tmp_path / "a.img", seed=40)
    first = _start(place, "a", disk, gates, "commit", CBT_LOCK_LEASE="3")
    with _reaped(first):
        _at(gates, "commit", 1, [first])
        os.killpg(first.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        second = _start(place, "a", disk, gates, WAIT="60", CBT_LOCK_LEASE="3")
        rc, second_id, err = _end(second)
        assert rc == 0, err
        assert time.monotonic() - t0 >= 1.0, "broke a live lease at once"
        assert f"locked by pid {first.pid}" in err, "waiting says whom it waits for"
        _open(gates, "commit")
        os.killpg(first.pid, signal.SIGCONT)
        rc, out, err = _end(first)
    assert rc == 2 and "lost the lock" in err, (rc, out, err)
    assert [p.id for p in place.vault().points()] == [second_id]
    # nor an index segment (it would index packs a gc may have swept meanwhile)
    assert len(place.vault().segment_names()) == 1
    _restores(place, tmp_path, {"a": disk})


def test_s3_lease_is_renewed_while_held(request: pytest.FixtureRequest, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CBT_LOCK_LEASE", "1.5")
    storage = _place(request, tmp_path, "s3").storage()
    mine, other = storage.lock("locks/vm-x"), storage.lock("locks/vm-x")
    mine.acquire(0)
    try:
        for _ in range(8):  # 4 s: more than two leases
            time.sleep(0.5)
            assert other.holder() is not None
            mine.check()
        with pytest.raises(Exception, match="is held by pid"):
            other.acquire(0)
    finally:
        mine.release()
    assert other.holder() is None and storage.list_locks("locks") == []


def test_s3_conditional_puts_are_honoured(request: pytest.FixtureRequest,
                                          tmp_path: Path) -> None:
    """What the locks rely on, against the real server: create only when missing
    (If-None-Match), replace only the version read (If-Match)."""
    from cbt.repo.s3 import S3Storage

    s = _place(request, tmp_path, "s3").storage()
    assert isinstance(s, S3Storage)
    first = s.put_if("x", b"one", "create")
    assert first is not None and s.put_if("x", b"two", "create") is None
    second = s.put_if("x", b"two", {"e_tag": first})
    assert second is not None and second != first
    assert s.put_if("x", b"three", {"e_tag": first}) is None  # stale
    assert s.put_if("missing", b"x", {"e_tag": first}) is None
    assert s.get("x") == b"two"


# -- gc beside backups, duplicates, prune --------------------------------------------------


@pytest.mark.slow
def test_gc_beside_running_backups_loses_nothing(place: Place, gates: Path,
                                                 tmp_path: Path) -> None:
    """gc runs while two backups stand before their commit (their packs are in no
    segment: orphans to gc): it frees the dead, and keeps everything they wrote."""
    from cbt.ops.gc import gc
    from cbt.ops.prune import PruneRequest, prune

    vault = place.vault()
    vault.backup("gone", [f"d={_disk(tmp_path / 'g.img', seed=50, shared=0, own=2)}"],
                 block_size=BS)
    prune(vault, PruneRequest(keep=lambda pts: {p.id: [] if p.vm == "gone" else ["kept"]
                                                for p in pts},
                              expired=lambda vm, created: False))
    disks = {f"vm{i}": _disk(tmp_path / f"d{i}.img", seed=51 + i) for i in range(2)}
    procs = [_start(place, vm, disk, gates, "commit") for vm, disk in disks.items()]
    with _reaped(*procs):
        _at(gates, "commit", 2, procs)
        result = gc(place.vault(), grace=0.0)
        if place.kind == "dir":  # (on S3 the clock margin keeps packs this young)
            assert result.packs_removed >= 1, result
            r = cbt("gc", place.loc, "--grace", "0")  # the command line too
            assert r.returncode == 0, r.stderr
        _open(gates, "commit")
        ends = [_end(p) for p in procs]
    assert [rc for rc, _o, _e in ends] == [0, 0], ends
    _restores(place, tmp_path, disks)
    gc(place.vault(), grace=0.0)  # and after: nothing of theirs is dead
    _restores(place, tmp_path, disks)


def test_gc_figures_beside_a_running_backup_are_its_own(place: Place, gates: Path,
                                                       tmp_path: Path) -> None:
    """gc beside a backup standing before its commit (its packs written): what gc says it
    deleted and wrote is the storage's difference, none of the backup's packs in it (they
    are too new to judge, and gc says so); the backup then commits and restores."""
    from cbt.ops.gc import gc, storage_bytes
    from cbt.ops.prune import PruneRequest, prune

    vault = place.vault()
    vault.backup("gone", [f"d={_disk(tmp_path / 'g.img', seed=70, shared=0, own=2)}"],
                 block_size=BS)
    prune(vault, PruneRequest(keep=lambda pts: {p.id: [] if p.vm == "gone" else ["kept"]
                                                for p in pts},
                              expired=lambda vm, created: False))
    disks = {"vm0": _disk(tmp_path / "d0.img", seed=71)}
    storage = place.storage()

    def data() -> dict[str, int]:
        return {k: n for k, n in storage.sizes("").items()
                if k != "gc.lock" and not k.startswith("locks/")}

    ours = set(storage.list("packs"))
    proc = _start(place, "vm0", disks["vm0"], gates, "commit")
    with _reaped(proc):
        _at(gates, "commit", 1, [proc])
        before = data()
        theirs = set(storage.list("packs")) - ours
        assert theirs
        r = gc(place.vault(), grace=0.0, max_unused=0.0)
        after = data()
        gone, new = set(before) - set(after), set(after) - set(before)
        assert theirs <= set(after) and not theirs & (gone | new)
        assert r.vault_bytes_before == sum(before.values())
        assert r.vault_bytes_after == sum(after.values()) == storage_bytes(storage)
        assert r.bytes_deleted == sum(before[k] for k in gone  # (packs, segments: trashed)
                                      if not k.startswith(("packs/", "index/")))
        assert r.bytes_written == sum(after[k] for k in new if not k.startswith("trash/"))
        assert r.bytes_trashed == sum(after[k] for k in new if k.startswith("trash/"))
        assert any("not judged" in w for w in r.warnings), r.warnings
        if place.kind == "dir":  # (on S3 the clock margin keeps "gone"'s packs this young)
            assert r.packs_removed >= 1 and r.bytes_trashed > 0, r
        _open(gates, "commit")
        rc, _out, err = _end(proc)
    assert rc == 0, err
    _restores(place, tmp_path, disks)


@dataclass
class _Packs:
    all: set[str]  # the packs in the vault
    used: set[str]  # those the index takes a block from (one entry per digest)
    bytes: int


def _packs(place: Place) -> _Packs:
    storage = place.storage()
    index = place.vault().load_index()
    names = storage.list("packs")
    # (the packs lookups resolve to: an entry listed in two segments, two writers' copies
    # of one block, is found in the first; the other copy's pack is a spare for gc)
    used = {int(k) for _base, got in index.chunks()
            for k in np.unique(index.locate(index.lookup(got.digests)).pack)}
    return _Packs(set(index.pack_ids), {index.pack_ids[k] for k in used},
                  sum(storage.size(n) for n in names))


@pytest.mark.slow
def test_two_writers_storing_the_same_blocks_and_gc(tmp_path: Path, gates: Path,
                                                    request: pytest.FixtureRequest) -> None:
    """Two backups of identical disks, both planned before either wrote a pack: both
    store every block and both succeed; a later gc removes the duplicates."""
    from cbt.ops.gc import gc

    place = _place(request, tmp_path, "dir")
    disk = _disk(tmp_path / "same.img", seed=60, shared=0, own=2)
    procs = [_start(place, vm, disk, gates, "plan") for vm in ("a", "b")]
    with _reaped(*procs):
        _at(gates, "plan", 2, procs)
        _open(gates, "plan")
        ends = [_end(p) for p in procs]
    assert [rc for rc, _o, _e in ends] == [0, 0], ends
    before = _packs(place)
    assert len(before.all) == 2 * len(before.used), "each writer stored every block"
    result = gc(place.vault(), grace=0.0)
    assert result.packs_removed == len(before.used) and result.bytes_freed > 0, result
    after = _packs(place)
    assert after.all == after.used == before.used  # one copy of each block is left
    assert after.bytes == before.bytes - result.bytes_freed
    _restores(place, tmp_path, {"a": disk, "b": disk})


@pytest.mark.slow
def test_prune_and_repair_refused_while_a_backup_runs(place: Place, gates: Path,
                                                      tmp_path: Path) -> None:
    from cbt.ops.prune import PruneRequest, prune
    from cbt.ops.verify import repair

    disk = _disk(tmp_path / "a.img", seed=70)
    place.vault().backup("a", [f"d={disk}"], block_size=BS)
    request = PruneRequest(keep=lambda pts: {p.id: ["kept"] for p in pts},
                           expired=lambda vm, created: False)
    writer = _start(place, "b", _disk(tmp_path / "b.img", seed=71), gates, "commit")
    with _reaped(writer):
        _at(gates, "commit", 1, [writer])
        for alone in (lambda: prune(place.vault(), request), lambda: repair(place.vault())):
            with pytest.raises(VaultLockedError) as info:
                alone()
            assert f"vault {place.storage().root} is locked by pid {writer.pid} on " \
                in str(info.value)
        _open(gates, "commit")
        assert _end(writer)[0] == 0
    prune(place.vault(), request)  # free again
    # and a backup refused while the vault is held alone, naming the holder
    with exclusive_lock(place.storage()):
        rc, _out, err = _end(_start(place, "c", disk, gates))
    assert rc == 2 and f"is locked by pid {os.getpid()} on " in err, err


RACER = r"""
import os, random, sys, time
from cbt.repo.lock import exclusive_lock, shared_lock
kind, loc, rounds, log = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
if kind == "dir":
    from cbt.repo.storage import LocalStorage
    storage = LocalStorage(loc)
else:
    from cbt.repo.s3 import S3Storage
    storage = S3Storage(loc)
sys.argv = ["cbt", "racer"]
rng = random.Random(os.getpid())
fd = os.open(log, os.O_WRONLY | os.O_APPEND)
for _ in range(rounds):
    alone = rng.random() < 0.3
    with (exclusive_lock if alone else shared_lock)(storage, 60):
        t0 = time.monotonic()  # (after taking it: each interval lies inside the hold)
        time.sleep(rng.random() * 0.02)
        os.write(fd, f"{int(alone)} {os.getpid()} {t0} {time.monotonic()}\n".encode())
"""


@pytest.mark.slow
def test_shared_and_alone_holders_never_overlap(place: Place, tmp_path: Path) -> None:
    """Processes racing for the vault, some alone, some shared, each logging when it held
    it: a lone hold overlaps no other hold, and every process gets all its turns."""
    log = tmp_path / "holds.log"
    log.write_text("")
    procs = [subprocess.Popen([sys.executable, "-c", RACER, place.kind, place.loc, "30",
                               str(log)], stderr=subprocess.PIPE, text=True,
                              env=clean_env(place.env), start_new_session=True)
             for _ in range(4)]
    with _reaped(*procs):
        errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errs
    holds = [(ln.split()[0] == "1", float(ln.split()[2]), float(ln.split()[3]))
             for ln in log.read_text().splitlines()]
    assert len(holds) == 4 * 30
    alone = [h for h in holds if h[0]]
    assert alone and len(alone) < len(holds)
    overlaps = [(a, h) for a in alone for h in holds
                if h is not a and h[1] < a[2] and a[1] < h[2]]
    assert overlaps == []
    assert place.storage().list_locks("locks") == []
