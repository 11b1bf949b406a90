"""The vault's locks attacked: lock objects crafted by a hostile vault writer, and a
holder renewing its lease at the very moment another breaks it (issue 15, review).

A lock is written by anyone who can write the vault, so what it says is checked: a
start in the future (which would move gc's cutoff past backups starting meanwhile),
no number, a pid no process can have, text that would break a message into lines or
send the terminal escapes, an object far larger than any holder's record.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.s3 import S3Server, fresh_bucket

from cbt.repo.lock import (
    VaultLockedError,
    exclusive_lock,
    objects_before,
    vault_holders,
    writers_since,
)
from cbt.repo.storage import LocalStorage, Storage

HOSTILE_TEXT = "elsewhere\x1b[2J\nsecond line\r"


def _s3_storage(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> Storage:
    from cbt.repo.s3 import S3Storage

    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return S3Storage.create(f"s3://{fresh_bucket()}/vault")


@contextlib.contextmanager
def _planted(storage: Storage, name: str, body: bytes) -> Iterator[None]:
    """A live lock of a hostile holder: on a directory a file whose flock this test
    holds (a live process), on S3 an object just written (its lease running)."""
    if isinstance(storage, LocalStorage):
        (Path(storage.root) / "locks").mkdir(exist_ok=True)
        path = Path(storage.root) / name
        path.write_bytes(body)
        fd = os.open(path, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            os.close(fd)
    else:
        storage.put(name, body)
        yield


@pytest.fixture(params=["dir", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "dir":
        return LocalStorage(tmp_path)
    return _s3_storage(request.getfixturevalue("s3"),
                       request.getfixturevalue("monkeypatch"))


@pytest.mark.parametrize("since_ts", ["1e12", 1e12, "inf", "nan", "1e400"])
def test_a_holder_from_the_future_does_not_move_gc_past_now(storage: Storage,
                                                            since_ts: object) -> None:
    """gc sweeps packs written before the earliest live holder's start: a start in the
    future (or infinity) would sweep the packs of a backup starting while gc runs."""
    body = json.dumps({"pid": 4242, "host": "elsewhere", "since_ts": since_ts}).encode()
    with _planted(storage, "locks/shared-hostile", body):
        before = time.time()
        since = writers_since(storage)
        assert since is not None and since <= time.time()
        assert objects_before(storage) <= time.time()
        if since_ts == "nan":
            assert since == 0.0  # cannot say since when: gc sweeps nothing
        else:
            assert since >= before - 1
        assert len(vault_holders(storage)) == 1


def test_a_hostile_holder_is_named_on_one_clean_line(storage: Storage) -> None:
    body = json.dumps({"pid": 10**30, "host": HOSTILE_TEXT, "command": HOSTILE_TEXT,
                       "since": HOSTILE_TEXT, "since_ts": 1.0}).encode()
    with _planted(storage, "locks/shared-hostile", body), \
            pytest.raises(VaultLockedError) as info, exclusive_lock(storage):
        pass
    message = str(info.value)
    assert "is locked by" in message
    assert all(c.isprintable() for c in message), repr(message)
    assert str(10**30) not in message  # no pid a process can have


def test_s3_holder_of_this_host_with_an_impossible_pid_is_dead(
        s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pid of this host is checked with kill(pid, 0): one too large for any process
    (an OverflowError there) is a dead holder, not a traceback of every backup."""
    from cbt.repo.s3 import node_id

    storage = _s3_storage(s3, monkeypatch)
    here = {"host": socket.gethostname(), "node": node_id()}
    for pid in (10**30, 2**63, -(10**30)):
        storage.put("locks/alone-hostile", json.dumps(
            {"pid": pid, **here, "since_ts": 1.0}).encode())
        assert writers_since(storage) is None or pid < 0
        with contextlib.suppress(VaultLockedError), exclusive_lock(storage):
            assert pid > 0, "a huge pid is no live holder"
        storage.delete("locks/alone-hostile")
    lock = storage.lock("locks/vm-x")
    storage.put("locks/vm-x", json.dumps({"pid": 10**30, **here}).encode())
    lock.acquire(0)  # broken: its holder is no process of this host
    lock.release()


def test_s3_a_huge_lock_object_is_read_only_in_part(s3: S3Server,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Any vault writer can put 64 MiB (or 64 GiB) at locks/alone-x: every backup reads
    the lock objects, so it reads only the head of each."""
    storage = _s3_storage(s3, monkeypatch)
    storage.put("locks/alone-huge", b"{" + b" " * (64 << 20) + b"}")
    tracemalloc.start()
    try:
        with pytest.raises(VaultLockedError, match="another process"), \
                exclusive_lock(storage):
            pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"read {peak} bytes of a lock object"


def test_s3_a_holder_renewing_as_it_is_broken_stays_a_holder(
        s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """A frozen holder past its lease thaws and renews between a gc's look at its lock
    (dead) and the gc's conditional break (which then fails): it is a live holder, so gc
    keeps the packs it writes (its start bounds gc's cutoff)."""
    storage = _s3_storage(s3, monkeypatch)
    monkeypatch.setenv("CBT_LOCK_LEASE", "1")
    from cbt.repo.s3 import S3Storage
    from cbt.repo.storage import LockHolder

    assert isinstance(storage, S3Storage)
    held = storage.lock("locks/shared-frozen")
    held.acquire(0)
    try:
        held.record(LockHolder(pid=os.getpid(), host=socket.gethostname(),
                               since="then", since_ts=time.time()))
        thread = held._thread  # freeze it: no renewal
        held._stop.set()
        assert thread is not None
        thread.join()
        time.sleep(2.2)  # past its lease (Last-Modified is in whole seconds)
        breaker = S3Storage(storage.root)
        put_if = breaker.put_if

        def thaw_first(name: str, data: bytes, mode: object) -> str | None:
            if name == "locks/shared-frozen" and data.startswith(b'{"broken"'):
                held._write()  # the holder's own renewal, just in time
            return put_if(name, data, mode)  # type: ignore[arg-type]
        monkeypatch.setattr(breaker, "put_if", thaw_first)
        assert writers_since(breaker) is not None, "a renewed holder was taken for dead"
        held.check()
    finally:
        held.release()
    assert storage.list_locks("locks") == []


def test_s3_gc_that_lost_its_lease_empties_no_trash(s3: S3Server,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """gc frozen past its lease (a commit may have broken its gc lock and rescued blocks
    from the trash meanwhile): thawed, it stops, emptying no trash either."""
    import cbt as cbt_api
    from cbt.core.errors import CbtIOError
    from cbt.ops import gc as gc_mod
    from cbt.repo import lock as lock_mod

    storage = _s3_storage(s3, monkeypatch)
    vault = cbt_api.Vault.create(storage)
    monkeypatch.setenv("CBT_LOCK_LEASE", "1")
    plan = gc_mod._plan_sweep
    emptied: list[float] = []

    def frozen(*args: object) -> object:
        for _spec, held in list(lock_mod._HELD):  # its renewals stop, as under SIGSTOP
            held._stop.set()  # type: ignore[attr-defined]
            thread = held._thread  # type: ignore[attr-defined]
            if thread is not None:
                thread.join()
        time.sleep(0.8)  # more than half its lease since the last renewal
        return plan(*args)  # type: ignore[arg-type]
    monkeypatch.setattr(gc_mod, "_plan_sweep", frozen)
    monkeypatch.setattr(gc_mod, "empty_trash", lambda *a: emptied.append(1) or 0)
    with pytest.raises(CbtIOError, match="lost the lock"):
        gc_mod.gc(vault)
    assert emptied == []


def test_s3_a_dead_pid_of_another_machine_of_the_same_name_is_no_dead_holder(
        s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Host names repeat (two clones named alike, two containers given one name): a pid
    is judged only where the lock says it was taken on this boot and pid namespace;
    another's lock waits for its lease."""
    import subprocess
    import sys

    from cbt.repo.s3 import node_id
    from cbt.repo.storage import LockBusyError

    storage = _s3_storage(s3, monkeypatch)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid no process of this host has now
    mine = {"pid": gone.pid, "host": socket.gethostname(), "since_ts": 1.0}
    lock = storage.lock("locks/vm-x")
    for node in ("another-machine", None):
        storage.put("locks/vm-x", json.dumps({**mine, "node": node}).encode())
        with pytest.raises(LockBusyError, match=f"held by pid {gone.pid} on "):
            lock.acquire(0)
    storage.put("locks/vm-x", json.dumps({**mine, "node": node_id()}).encode())
    lock.acquire(0)  # this machine's dead process: broken at once
    lock.release()


def _freeze_held_locks() -> None:
    """Stop this process's lease renewals, as SIGSTOP would (the lease runs out)."""
    from cbt.repo import lock as lock_mod

    for _spec, held in list(lock_mod._HELD):
        held._stop.set()  # type: ignore[attr-defined]
        thread = held._thread  # type: ignore[attr-defined]
        if thread is not None:
            thread.join()


def test_s3_prune_and_repair_that_lost_their_lease_change_nothing(
        s3: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A prune (or repair) frozen past its lease: a backup may have broken its lock and
    be running on a parent it would delete; thawed, it deletes, hides and moves nothing."""
    import cbt as cbt_api
    from cbt.core.errors import CbtIOError
    from cbt.ops import prune as prune_mod
    from cbt.ops import verify as verify_mod

    storage = _s3_storage(s3, monkeypatch)
    vault = cbt_api.Vault.create(storage)
    disk = tmp_path / "d.img"
    disk.write_bytes(os.urandom(256 * 1024))
    ids = [vault.backup("vm", [f"os={disk}"], block_size=65536, workers=1).id
           for _ in range(2)]
    monkeypatch.setenv("CBT_LOCK_LEASE", "1")
    plan = prune_mod._plan

    def frozen_plan(*args: object) -> object:
        _freeze_held_locks()
        time.sleep(0.8)  # more than half its lease since the last renewal
        return plan(*args)  # type: ignore[arg-type]
    monkeypatch.setattr(prune_mod, "_plan", frozen_plan)
    request = prune_mod.PruneRequest(keep=lambda pts: {p.id: [] for p in pts},
                                     expired=lambda vm, created: False)
    with pytest.raises(CbtIOError, match="lost the lock"):
        prune_mod.prune(vault, request)
    assert sorted(vault.point_ids()) == sorted(ids)

    segments = sorted(vault.segment_names())
    healthy = verify_mod._healthy_blobs

    def frozen_read(*args: object) -> object:
        _freeze_held_locks()  # while it reads the packs
        time.sleep(0.8)
        return healthy(*args)  # type: ignore[arg-type]
    monkeypatch.setattr(verify_mod, "_healthy_blobs", frozen_read)
    with pytest.raises(CbtIOError, match="lost the lock"):
        verify_mod.repair(vault)
    assert sorted(vault.segment_names()) == segments


def test_s3_a_breaker_killed_midway_blocks_for_moments_only(
        s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Breaking a dead lock is two steps (overwrite it conditionally, then delete it): a
    breaker killed between them leaves its overwrite, which must not hold the lock for a
    whole lease (prune refused for 5 minutes, a VM's backups too)."""
    import subprocess
    import sys

    from cbt.repo.lock import shared_lock
    from cbt.repo.s3 import S3Storage, node_id

    storage = _s3_storage(s3, monkeypatch)
    assert isinstance(storage, S3Storage)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    storage.put("locks/alone-dead", json.dumps(
        {"pid": gone.pid, "host": socket.gethostname(), "node": node_id()}).encode())
    breaker = S3Storage(storage.root)

    def killed_after_put(name: str, data: bytes, mode: object) -> str | None:
        S3Storage.put_if(breaker, name, data, mode)  # type: ignore[arg-type]
        raise SystemExit("killed")  # (the delete never comes)
    monkeypatch.setattr(breaker, "put_if", killed_after_put)
    with pytest.raises(SystemExit):
        breaker.lock("locks/alone-dead").clear_dead()
    assert storage.list_locks("locks") == ["locks/alone-dead"]
    t0 = time.monotonic()
    with shared_lock(storage, wait=30):
        pass
    assert time.monotonic() - t0 < 15
    assert storage.list_locks("locks") == []
