"""One behaviour for every Storage: each test runs on LocalStorage and on MemoryStorage.

What a vault relies on: durable atomic put (readers see the old or the new
object, never a mix), reads that raise CbtIOError(ENOENT) for missing names,
sorted recursive listing on ``/`` boundaries, renames that replace and keep
the modification time, idempotent deletes, and exclusive locks whose holder
others can read, with waits that time out.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cbt.core.errors import CbtIOError
from cbt.repo.lock import VaultLockedError, gc_lock, writer_lock, writer_since
from cbt.repo.storage import (
    LocalStorage,
    LockBusyError,
    LockHolder,
    MemoryStorage,
    Storage,
    StorageSpec,
    open_storage,
)
from cbt.repo.vault import NotAVaultError, Vault


@pytest.fixture(params=["local", "memory"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    if request.param == "local":
        (tmp_path / "s").mkdir()
        yield LocalStorage(tmp_path / "s")
    else:
        yield MemoryStorage()


def _enoent(call: Callable[[], object]) -> None:
    with pytest.raises(CbtIOError) as info:
        call()
    assert info.value.errno == errno.ENOENT


# -- objects ----------------------------------------------------------------------------


def test_put_get_and_buffers(storage: Storage) -> None:
    storage.put("a", b"hello")
    storage.put("dir/sub/b", [b"he", bytearray(b"ll"), b"o!"])
    storage.put("c", memoryview(b"xyz")[1:])
    storage.put("empty", b"")
    assert storage.get("a") == b"hello"
    assert storage.get("dir/sub/b") == b"hello!"
    assert storage.get("c") == b"yz"
    assert storage.get("empty") == b""
    assert bytes(storage.map("dir/sub/b")) == b"hello!"
    assert bytes(storage.map("empty")) == b""


def test_missing_names_raise_enoent(storage: Storage) -> None:
    storage.put("there", b"x")
    for call in (lambda: storage.get("nope"), lambda: storage.read_range("nope", 0, 1),
                 lambda: storage.map("nope"), lambda: storage.stat("nope"),
                 lambda: storage.size("nope"), lambda: storage.touch("nope"),
                 lambda: storage.rename("nope", "else"), lambda: storage.get("there/below")):
        _enoent(call)
    assert not storage.exists("else")


def test_put_replaces_atomically(storage: Storage) -> None:
    """A reader racing a writer sees one whole version or the other, never a mix."""
    versions = [bytes([i]) * (1 << 20) for i in range(1, 3)]
    storage.put("obj", versions[0])
    stop = threading.Event()
    seen: list[bytes] = []

    def read() -> None:
        while not stop.is_set():
            seen.append(storage.get("obj")[::4096])

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(20):
            storage.put("obj", versions[i % 2])
    finally:
        stop.set()
        reader.join()
    assert seen and {s for s in seen} <= {v[::4096] for v in versions}
    assert storage.get("obj") == versions[1]


def test_read_range(storage: Storage) -> None:
    storage.put("r", bytes(range(100)))
    assert storage.read_range("r", 10, 5) == bytes(range(10, 15))
    assert storage.read_range("r", 95, 10) == bytes(range(95, 100))  # short at the end
    assert storage.read_range("r", 200, 10) == b""
    assert storage.read_range("r", 0, 0) == b""


def test_stat_size_exists_touch(storage: Storage) -> None:
    before = time.time()
    storage.put("p/o", b"12345")
    st = storage.stat("p/o")
    assert st.size == 5 == storage.size("p/o")
    assert before - 1 <= st.mtime <= time.time() + 1
    assert storage.exists("p/o") and not storage.exists("p") and not storage.exists("p/x")
    time.sleep(0.05)
    storage.touch("p/o")
    assert storage.stat("p/o").mtime > st.mtime
    assert storage.get("p/o") == b"12345"


def test_list_is_sorted_recursive_and_on_boundaries(storage: Storage) -> None:
    names = ["packs/b1/z.pack", "packs/a0/y.pack", "packs/a0/x.pack", "packsx/q", "points/2",
             "points/10", "config"]
    for n in names:
        storage.put(n, n.encode())
    assert storage.list("packs") == ["packs/a0/x.pack", "packs/a0/y.pack", "packs/b1/z.pack"]
    assert storage.list("packs/") == storage.list("packs")
    assert storage.list("packs/a0") == ["packs/a0/x.pack", "packs/a0/y.pack"]
    assert storage.list("points") == ["points/10", "points/2"]  # string order
    assert storage.list("pack") == []
    assert storage.list("config") == []  # an object, not a prefix
    assert storage.list("nothing") == []
    assert storage.list("") == sorted(names)


def test_delete_and_sync(storage: Storage) -> None:
    storage.put("points/a", b"1")
    storage.put("points/b", b"2")
    storage.delete("points/a")
    storage.delete("points/a")  # again: no error
    storage.delete("never/was")
    storage.sync("points")
    assert storage.list("points") == ["points/b"]
    assert not storage.exists("points/a")
    _enoent(lambda: storage.get("points/a"))


def test_rename(storage: Storage) -> None:
    storage.put("packs/aa/x.pack", b"old")
    storage.put("trash/y.pack", b"other")
    mtime = storage.stat("packs/aa/x.pack").mtime
    time.sleep(0.05)
    storage.rename("packs/aa/x.pack", "quarantine/deep/x.pack")  # into a new prefix
    assert storage.get("quarantine/deep/x.pack") == b"old"
    assert storage.stat("quarantine/deep/x.pack").mtime == pytest.approx(mtime, abs=1e-6)
    assert not storage.exists("packs/aa/x.pack")
    _enoent(lambda: storage.get("packs/aa/x.pack"))
    storage.rename("quarantine/deep/x.pack", "trash/y.pack")  # over an existing one
    assert storage.get("trash/y.pack") == b"old"
    assert storage.list("") == ["trash/y.pack"]
    _enoent(lambda: storage.rename("quarantine/deep/x.pack", "trash/z.pack"))
    assert storage.get("trash/y.pack") == b"old"


def test_make_prefix(storage: Storage) -> None:
    storage.make_prefix("index")
    storage.make_prefix("index")  # again: no error
    assert storage.list("index") == [] and storage.list("") == []
    storage.put("index/s.arrow", b"seg")
    assert storage.list("index") == ["index/s.arrow"]


def test_where_names_the_storage(storage: Storage) -> None:
    assert storage.where("points/a.json") == f"{storage.root}/points/a.json"


def test_spec_reopens_the_same_storage(storage: Storage) -> None:
    spec = storage.spec()
    assert isinstance(spec, StorageSpec) and StorageSpec(*tuple(spec)) == spec
    storage.put("a/b", b"shared")
    got: list[bytes] = []
    t = threading.Thread(target=lambda: got.append(open_storage(spec).get("a/b")))
    t.start()
    t.join()
    assert got == [b"shared"]
    open_storage(spec).put("a/c", b"back")
    assert storage.get("a/c") == b"back"


def test_memory_storage_is_found_only_while_it_lives() -> None:
    s = MemoryStorage()
    spec = s.spec()
    assert spec.kind == "memory" and open_storage(spec) is s
    with pytest.raises(CbtIOError):
        MemoryStorage(s.key)  # one storage per key
    del s
    _enoent(lambda: open_storage(spec))
    with pytest.raises(CbtIOError) as info:
        open_storage(StorageSpec("s3", "bucket"))
    assert info.value.errno == errno.EINVAL


# -- locks -------------------------------------------------------------------------------

ME = LockHolder(pid=os.getpid(), host="here", command="cbt test", since="2026-01-01T00:00:00Z",
                since_ts=1767225600.0)


def test_lock_is_exclusive_and_names_its_holder(storage: Storage) -> None:
    first, second = storage.lock("lock"), storage.lock("lock")
    assert first.holder() is None
    first.acquire(0)
    first.record(ME)
    assert second.holder() == ME and first.holder() == ME
    with pytest.raises(LockBusyError) as info:
        second.acquire(0)
    assert info.value.holder == ME and info.value.errno == errno.EAGAIN
    other = storage.lock("gc.lock")  # another name: independent
    other.acquire(0)
    other.release()
    first.release()
    first.release()  # again: nothing happens
    assert second.holder() is None
    second.acquire(0)
    assert first.holder() is not None
    second.release()


def test_lock_wait_times_out_or_succeeds(storage: Storage) -> None:
    holder = storage.lock("lock")
    holder.acquire(None)
    holder.record(ME)
    waiter = storage.lock("lock")
    t0 = time.monotonic()
    with pytest.raises(LockBusyError):
        waiter.acquire(0.3)
    assert 0.3 <= time.monotonic() - t0 < 5
    threading.Timer(0.3, holder.release).start()
    t0 = time.monotonic()
    waiter.acquire(10)  # released by the other thread meanwhile
    assert 0.2 <= time.monotonic() - t0 < 5
    threading.Timer(0.3, waiter.release).start()
    holder.acquire(None)  # no limit
    holder.release()


def test_vault_locks_on_any_storage(storage: Storage) -> None:
    assert writer_since(storage) is None
    t0 = time.time()
    with writer_lock(storage):
        since = writer_since(storage)
        assert since is not None and t0 - 1 <= since <= time.time()
        with pytest.raises(VaultLockedError) as info, writer_lock(storage, 0.2):
            pass
        assert f"vault {storage.root} is locked by pid {os.getpid()} on " in str(info.value)
        assert str(info.value).endswith("; retry later or pass --wait SECONDS")
        with gc_lock(storage), pytest.raises(VaultLockedError, match=r"; retry later$"), \
                gc_lock(storage, 0):  # another lock, held here
            pass
    assert writer_since(storage) is None


def test_local_lock_file_holds_the_holder_json(tmp_path: Path) -> None:
    """On disk as ever: the file ``lock`` with one JSON object (pid, host, command, since,
    since_ts), left in place after release."""
    s = LocalStorage(tmp_path)
    with writer_lock(s):
        info = json.loads((tmp_path / "lock").read_bytes())
    assert list(info) == ["pid", "host", "command", "since", "since_ts"]
    assert info["pid"] == os.getpid()
    assert (tmp_path / "lock").read_bytes() == LockHolder(**info).to_json()
    assert oct((tmp_path / "lock").stat().st_mode & 0o777) == oct(0o600 & ~_umask())


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


# -- a vault on either -----------------------------------------------------------------------


def test_vault_create_and_open_on(storage: Storage) -> None:
    with pytest.raises(NotAVaultError):
        Vault.open_on(storage)
    v = Vault.create(storage)
    assert storage.list("") == ["config"]
    again = Vault.open_on(open_storage(storage.spec()))
    assert again.config == v.config and again.points() == [] and again.root == storage.root
    with pytest.raises(CbtIOError) as info:
        Vault.create(storage)
    assert info.value.errno == errno.ENOTEMPTY
