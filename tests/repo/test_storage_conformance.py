"""One behaviour for every Storage: each test runs on LocalStorage, MemoryStorage and
S3Storage (against a real SeaweedFS server on 127.0.0.1: ``tests/helpers/s3.py``).

What a vault relies on: durable atomic put (readers see the old or the new
object, never a mix), reads that raise CbtIOError(ENOENT) for missing names,
sorted recursive listing on ``/`` boundaries, renames that replace and keep
the modification time, idempotent deletes, and exclusive locks whose holder
others can read, with waits that time out.  Where object storage differs (its
mtime has whole seconds; a rename is a copy and does not keep it), the test says so.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers.s3 import S3Server, fresh_bucket

from cbt.core.errors import CbtIOError, CbtValueError
from cbt.repo.lock import VaultLockedError, exclusive_lock, gc_lock, writers_since
from cbt.repo.storage import (
    LocalStorage,
    LockBusyError,
    LockHolder,
    MemoryStorage,
    Storage,
    StorageSpec,
)
from cbt.repo.stores import open_storage
from cbt.repo.vault import NotAVaultError, Vault

KINDS = ["local", "memory", "s3"]


@pytest.fixture(scope="module")
def bucket(s3: S3Server) -> str:
    return fresh_bucket()


def _s3_storage(request: pytest.FixtureRequest) -> Storage:
    from cbt.repo.s3 import S3Storage
    request.getfixturevalue("s3_env")
    bucket = request.getfixturevalue("bucket")
    return S3Storage.create(f"s3://{bucket}/t/{os.urandom(6).hex()}/vault")


@pytest.fixture(params=KINDS)
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    if request.param == "local":
        (tmp_path / "s").mkdir()
        yield LocalStorage(tmp_path / "s")
    elif request.param == "memory":
        yield MemoryStorage()
    else:
        yield _s3_storage(request)


def _is_s3(storage: Storage) -> bool:
    return storage.spec().kind == "s3"


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


def test_put_stream_writes_all_or_nothing(storage: Storage) -> None:
    """A streamed put: the chunks in order (more than one S3 part of them); a generator
    that fails half-way leaves no object, and an older version whole."""
    from cbt.repo import s3

    part = s3.STREAM_PART
    chunks = [bytes([i]) * (part // 3 + i) for i in range(7)]  # (over two parts)
    storage.put_stream("big", iter(chunks))
    assert storage.get("big") == b"".join(chunks)
    storage.put_stream("small", iter([b"ab", memoryview(b"cd"), bytearray(b"e")]))
    assert storage.get("small") == b"abcde"
    storage.put_stream("none", iter([]))
    assert storage.get("none") == b""

    def failing() -> Iterator[bytes]:
        yield b"x" * part
        yield b"y" * part
        raise RuntimeError("the writer failed")

    for name in ("fresh", "small"):
        with pytest.raises((RuntimeError, CbtIOError)):
            storage.put_stream(name, failing())
    assert not storage.exists("fresh")
    assert storage.get("small") == b"abcde"
    assert sorted(storage.list("")) == ["big", "none", "small"]  # (no temporary left)


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
    time.sleep(1.1 if _is_s3(storage) else 0.05)  # (S3: whole seconds)
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
    if not _is_s3(storage):  # (S3: a copy, with the time of the copy)
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
        open_storage(StorageSpec("ftp", "bucket"))
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
    assert writers_since(storage) is None
    t0 = time.time()
    with exclusive_lock(storage):
        since = writers_since(storage)
        assert since is not None and t0 - 1 <= since <= time.time()
        with pytest.raises(VaultLockedError) as info, exclusive_lock(storage, 0.2):
            pass
        assert f"vault {storage.root} is locked by pid {os.getpid()} on " in str(info.value)
        assert str(info.value).endswith("; retry later or pass --wait SECONDS")
        with gc_lock(storage), pytest.raises(VaultLockedError, match=r"; retry later$"), \
                gc_lock(storage, 0):  # another lock, held here
            pass
    assert writers_since(storage) is None


def test_local_lock_file_holds_the_holder_json(tmp_path: Path) -> None:
    """On disk: one file per holder of the vault, ``locks/alone-<random>`` (a backup's:
    ``locks/shared-<random>``), with one JSON object (pid, host, command, since,
    since_ts); removed on release.  (Before many writers: the file ``lock``, kept.)"""
    s = LocalStorage(tmp_path)
    with exclusive_lock(s):
        [f] = (tmp_path / "locks").iterdir()
        assert f.name.startswith("alone-")
        info = json.loads(f.read_bytes())
        assert list(info) == ["pid", "host", "command", "since", "since_ts"]
        assert info["pid"] == os.getpid()
        assert f.read_bytes() == LockHolder(**info).to_json()
        assert oct(f.stat().st_mode & 0o777) == oct(0o600 & ~_umask())
    assert list((tmp_path / "locks").iterdir()) == []


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


# -- edges every storage treats alike -------------------------------------------------------

ODD_NAMES = ["", "/abs", "../up", "a/../b", "a//b", "a/./b", ".", "a/", "nul\0x"]


@pytest.mark.parametrize("name", ODD_NAMES)
def test_odd_names_are_refused_alike(storage: Storage, name: str) -> None:
    for call in (lambda: storage.put(name, b"x"), lambda: storage.get(name),
                 lambda: storage.read_range(name, 0, 1), lambda: storage.stat(name),
                 lambda: storage.exists(name), lambda: storage.delete(name),
                 lambda: storage.lock(name)):
        with pytest.raises(CbtValueError, match="invalid name in a vault"):
            call()
    assert storage.list("") == []


def test_read_range_at_the_edges_of_a_large_object(storage: Storage) -> None:
    size = 24 << 20  # larger than one multipart part anywhere
    data = os.urandom(size)
    storage.put("big/one", [data[:size // 3], data[size // 3:]])
    assert storage.size("big/one") == size
    assert storage.get("big/one") == data
    for offset, length in ((0, 1), (0, 65536), (size - 1, 1), (size - 1, 10), (size - 65536, 65536),
                           (size // 2 - 3, 7), (size, 1), (size + 100, 5)):
        assert storage.read_range("big/one", offset, length) == data[offset:offset + length]
    storage.put("big/one", b"small now")  # overwrite: the new one, whole
    assert storage.get("big/one") == b"small now" and storage.size("big/one") == 9
    assert storage.read_range("big/one", 5, 100) == b" now"


def test_list_stays_under_the_storage_root(storage: Storage, tmp_path: Path,
                                           request: pytest.FixtureRequest) -> None:
    """A storage beside this one (another prefix of the bucket, another directory)
    shares none of its names."""
    if _is_s3(storage):
        s3s = storage
        bucket, prefix = s3s.root[5:].split("/", 1)
        from cbt.repo.s3 import S3Storage
        sibling: Storage = S3Storage(f"s3://{bucket}/{prefix}x")  # "vaultx": not under "vault/"
        parent: Storage = S3Storage(f"s3://{bucket}/{prefix.rsplit('/', 1)[0]}")
    elif isinstance(storage, LocalStorage):
        (tmp_path / "sx").mkdir()
        sibling, parent = LocalStorage(tmp_path / "sx"), LocalStorage(tmp_path)
    else:
        sibling = parent = MemoryStorage()
    sibling.put("packs/a", b"beside")
    storage.put("packs/b", b"mine")
    assert storage.list("") == ["packs/b"] and storage.list("packs") == ["packs/b"]
    assert not storage.exists("packs/a")
    _enoent(lambda: storage.get("packs/a"))
    if parent is not sibling:
        assert "vault/packs/b" in parent.list("") or "s/packs/b" in parent.list("")


# -- S3 only: where, errors, bucket creation ---------------------------------------------------


def test_s3_location_is_checked(s3_env: S3Server) -> None:
    from cbt.repo.s3 import S3Storage
    from cbt.repo.storage import STORAGE_SCHEMES, check_location, parse_location
    assert parse_location("s3://my-bucket/a/b/") == ("my-bucket", "a/b")
    assert parse_location("s3://my-bucket") == ("my-bucket", "")
    assert check_location("s3://my-bucket/x", STORAGE_SCHEMES) == "s3://my-bucket/x"
    assert check_location("s3://my-bucket/x") == "s3://my-bucket/x"  # by the commands too
    with pytest.raises(CbtValueError, match=r"scheme 's3' .* not taken here"):
        check_location("s3://my-bucket/x", frozenset())
    for bad in ("s3://", "s3://B/x", "s3://a/x", "s3://bucket/../x", "s3://bucket/a//b",
                "s3://bu_cket/x"):
        with pytest.raises(CbtValueError):
            S3Storage(bad)
        with pytest.raises(CbtValueError):
            check_location(bad, STORAGE_SCHEMES)
    with pytest.raises(CbtValueError, match="scheme"):
        LocalStorage("s3://my-bucket/x")


def test_s3_create_makes_the_bucket_and_refuses_a_used_prefix(s3_env: S3Server) -> None:
    from cbt.repo.s3 import S3Storage
    bucket = fresh_bucket()
    s = S3Storage.create(f"s3://{bucket}/v")  # the bucket did not exist
    s.put("config", b"{}")
    with pytest.raises(CbtIOError) as info:
        S3Storage.create(f"s3://{bucket}/v")
    assert info.value.errno == errno.ENOTEMPTY and f"s3://{bucket}/v" in str(info.value)
    S3Storage.create(f"s3://{bucket}/w")  # another prefix of the same bucket: empty
    assert open_storage(StorageSpec("s3", f"s3://{bucket}/v")).get("config") == b"{}"


def test_s3_errors_are_one_line_naming_the_object(s3_env: S3Server,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from cbt.repo.s3 import S3Storage
    bucket = fresh_bucket()
    S3Storage.create(f"s3://{bucket}")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    s = S3Storage(f"s3://{bucket}/v")
    with pytest.raises(CbtIOError) as info:
        s.get("points/p1")
    msg = str(info.value)
    assert f"s3://{bucket}/v/points/p1" in msg and "\n" not in msg, msg
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.secret_key)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nobody listens
    t0 = time.monotonic()
    with pytest.raises(CbtIOError) as info:
        S3Storage(f"s3://{bucket}/v").put("points/p1", b"x")
    msg = str(info.value)
    assert f"s3://{bucket}/v/points/p1" in msg and "\n" not in msg, msg
    assert time.monotonic() - t0 < 60


def test_s3_credentials_from_a_profile(s3_env: S3Server, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from cbt.repo.s3 import S3Storage
    creds, config = tmp_path / "credentials", tmp_path / "config"
    creds.write_text(f"[backup]\naws_access_key_id = {s3_env.access_key}\n"
                     f"aws_secret_access_key = {s3_env.secret_key}\n")
    config.write_text(f"[profile backup]\nregion = us-east-1\nendpoint_url = {s3_env.endpoint}\n")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_PROFILE", "backup")
    s = S3Storage.create(f"s3://{fresh_bucket()}/p")
    s.put("a", b"via profile")
    assert s.get("a") == b"via profile"
    monkeypatch.setenv("AWS_PROFILE", "nobody")
    with pytest.raises(CbtValueError, match="'nobody'"):
        S3Storage(f"s3://{fresh_bucket()}/p")


def test_list_of_more_than_a_page(storage: Storage) -> None:
    """S3 lists 1,000 keys a reply: every page is followed, each name once."""
    from concurrent.futures import ThreadPoolExecutor
    names = [f"index/{i:05d}.seg" for i in range(1234)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: storage.put(n, b"s"), names))
    storage.put("other/x", b"o")
    assert storage.list("index") == names
    assert len(storage.list("")) == 1235


# -- S3 replies are untrusted: a server that lies ------------------------------------------------


class _Liar(BaseHTTPRequestHandler):
    """Answers as S3 would, but with keys outside the prefix, too-long ranges, bad sizes."""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for k, v in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:
        if "list-type=2" in self.path:
            body = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><ListBucketResult>"
                    b"<Name>b</Name><Prefix>v/</Prefix><KeyCount>2</KeyCount>"
                    b"<IsTruncated>false</IsTruncated>"
                    b"<Contents><Key>v/packs/a</Key><Size>1</Size>"
                    b"<LastModified>2026-01-01T00:00:00.000Z</LastModified></Contents>"
                    b"<Contents><Key>elsewhere/secret</Key><Size>1</Size>"
                    b"<LastModified>2026-01-01T00:00:00.000Z</LastModified></Contents>"
                    b"</ListBucketResult>")
            self._send(200, body, {"Content-Type": "application/xml"})
        elif self.headers.get("Range"):
            self._send(206, b"x" * 100, {"Content-Range": "bytes 0-99/1000",
                                         "Last-Modified": "Thu, 01 Jan 2026 00:00:00 GMT"})
        else:
            self._send(200, b"x" * 10, {"Last-Modified": "Thu, 01 Jan 2026 00:00:00 GMT"})

    do_HEAD = do_GET


def test_s3_replies_are_not_trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    from cbt.repo.s3 import S3Storage
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Liar)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        for key, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.server_port}",
                           "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
                           "AWS_REGION": "us-east-1"}.items():
            monkeypatch.setenv(key, value)
        s = S3Storage("s3://bucket/v")
        with pytest.raises(CbtIOError, match="outside the prefix"):
            s.list("packs")
        with pytest.raises(CbtIOError) as info:
            s.read_range("packs/a", 0, 10)  # 100 bytes sent for 10 asked
        assert "s3://bucket/v/packs/a" in str(info.value) and "\n" not in str(info.value)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
