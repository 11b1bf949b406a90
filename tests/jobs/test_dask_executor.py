"""Backups on a Dask cluster (cbt.jobs.dask_executor) into an S3 vault (a real SeaweedFS).

One cluster for the module (start-up is slow): a ``LocalCluster`` of two worker
processes on 127.0.0.1, and a third worker started as a host's would be (``dask
worker SCHED --resources host-hv1=1``, its own process in its own folder).  Each
worker reopens the vault from its spec and writes its packs to the bucket itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import distributed
import numpy as np
import pytest
from helpers.cli import cbt, cbt_argv, clean_env, one_error_line
from helpers.images import assert_same_bytes, fs_image, make_disk
from helpers.jobs import job_config
from helpers.s3 import S3Server, fresh_bucket
from helpers.system import need
from helpers.vaults import PASSWORD, encrypted_env, fast_kdf

from cbt.api import Vault
from cbt.core.errors import CbtError
from cbt.jobs.config import ConfigError, VMConfig, load
from cbt.ops.backup import PlacedExecutor
from cbt.repo.s3 import S3Storage
from cbt.repo.storage import LocalStorage
from cbt.source.disks import DiskSpec

BS = 16 << 10
HV1_RESOURCE = "host-hv1"


@pytest.fixture(scope="module")
def s3_env(s3: S3Server) -> Iterator[S3Server]:
    """The AWS variables set for the module: the cluster's workers inherit them."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3.env.items():
            mp.setenv(key, value)
        yield s3


class Cluster:
    def __init__(self, local: Any, client: Any, hv1: subprocess.Popen[bytes],
                 hv1_dir: Path) -> None:
        self.local, self.client, self.hv1, self.hv1_dir = local, client, hv1, hv1_dir

    @property
    def address(self) -> str:
        return str(self.local.scheduler_address)

    def hv1_worker(self) -> str:
        workers = self.client.scheduler_info(n_workers=-1)["workers"]
        (addr,) = [a for a, w in workers.items() if HV1_RESOURCE in (w.get("resources") or {})]
        return str(addr)

    def local_workers(self) -> list[str]:
        return sorted(set(self.client.scheduler_info(n_workers=-1)["workers"])
                      - {self.hv1_worker()})


def _stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def cluster(s3_env: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    import dask

    scratch = tmp_path_factory.mktemp("dask-scratch")  # (not the system's temp dir)
    with dask.config.set({"temporary-directory": str(scratch)}):
        yield from _cluster(scratch, tmp_path_factory)


def _cluster(scratch: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # (every port on 127.0.0.1, the HTTP servers' too)
    local = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                     host="127.0.0.1", scheduler_port=0,
                                     dashboard_address="127.0.0.1:0",
                                     worker_dashboard_address="127.0.0.1:0",
                                     local_directory=str(scratch))
    hv1_dir = tmp_path_factory.mktemp("hv1")
    hv1 = None
    try:
        client = distributed.Client(local, set_as_default=False)
        worker = Path(sys.executable).parent / "dask"
        hv1 = subprocess.Popen(
            [str(worker), "worker", local.scheduler_address, "--nthreads", "1",
             "--nworkers", "1", "--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0",
             "--no-nanny", "--local-directory", str(scratch),
             "--resources", f"{HV1_RESOURCE}=1"],
            cwd=hv1_dir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(hv1_dir / "worker.log", "wb"),  # noqa: SIM115
            start_new_session=True)
        client.wait_for_workers(3, timeout=60)
        yield Cluster(local, client, hv1, hv1_dir)
        client.close()
    finally:
        if hv1 is not None:
            _stop(hv1)
        local.close()


def _s3_vault(tag: str) -> Vault:
    return Vault.create(S3Storage.create(f"s3://{fresh_bucket()}/{tag}"))


def _manifests(v: Vault, point: str) -> dict[str, tuple[bytes, bytes, bytes]]:
    rec = v.point(point)
    out = {}
    for d in rec.disks:
        m = v.resolve(rec, d.label)
        out[d.label] = (m.rows.tobytes(), m.row_digests.tobytes(), m.row_flags.tobytes())
    return out


def _task_workers(ts: Any, prefix: str) -> set[str]:
    return {t["worker"] for t in ts.data if str(t["key"]).startswith(prefix)}


# -- equal bit for bit ----------------------------------------------------------------


def test_dask_job_into_s3_equals_a_local_job(cluster: Cluster, tmp_path: Path) -> None:
    """The same job (two disks: a file system image with zeros and holes, random data;
    run twice, a few blocks changed between) run by the cluster into an S3 vault
    (``cbt.jobs.run(config, executor=client)``) and by forked workers into a directory:
    the manifests are equal, each point restored from S3 is bit for bit the local
    job's restore of it, and both are the disks; every block of S3 reads back to its
    digest."""
    from cbt import jobs

    disks = {"os": fs_image(tmp_path / "os.img", 12 << 20, seed=3),
             "data": make_disk(tmp_path / "data.img", 9 << 20, seed=4)}
    vm = {"vm": {"disks": {k: str(p) for k, p in disks.items()}, "block_size": "16K"}}
    bucket = f"s3://{fresh_bucket()}/eq"
    remote, local = Vault.create(S3Storage.create(bucket)), \
        Vault.create(LocalStorage.create(tmp_path / "vault"))
    remote_cfg = job_config(tmp_path / "remote.toml", vm, vault=bucket)
    local_cfg = job_config(tmp_path / "local.toml", vm, vault=str(tmp_path / "vault"))
    for run in range(2):
        if run:
            with open(disks["data"], "r+b") as f:  # a few blocks change
                for at in (0, 5 << 20, (9 << 20) - BS):
                    f.seek(at)
                    f.write(os.urandom(BS))
        (ra,) = jobs.run(remote_cfg, executor=cluster.client)
        (rb,) = jobs.run(local_cfg, workers=2)
        a, b = ra.point, rb.point
        assert a is not None and b is not None, (ra.error, rb.error)
        assert _manifests(remote, a.id) == _manifests(local, b.id)
        assert [(d.blocks, d.changed_blocks, d.bytes_new) for d in a.disks] == \
            [(d.blocks, d.changed_blocks, d.bytes_new) for d in b.disks]
        for label, path in disks.items():
            from_s3, from_dir = (tmp_path / f"s3-{run}-{label}.img",
                                 tmp_path / f"dir-{run}-{label}.img")
            remote.restore(a.id, from_s3, disk=label)
            local.restore(b.id, from_dir, disk=label)
            assert_same_bytes(from_s3, from_dir)
            assert_same_bytes(from_s3, path)
    assert not remote.verify(data=True).problems


# -- pinning ----------------------------------------------------------------------------


def test_a_pinned_disk_runs_only_on_its_hosts_workers(cluster: Cluster, tmp_path: Path) -> None:
    """A disk on host hv1 is opened, mapped and read only by the worker serving hv1: its
    path (relative to that worker's folder) is not even there for the coordinator."""
    from distributed import get_task_stream

    make_disk(cluster.hv1_dir / "far.img", 6 << 20, seed=7)
    near = make_disk(tmp_path / "near.img", 6 << 20, seed=8)
    assert not Path("far.img").exists()
    v = _s3_vault("pin")
    with get_task_stream(cluster.client) as ts:
        point = v.backup("vm", ["far=far.img", f"near={near}"], block_size=BS,
                         executor=cluster.client, hosts={"far": "hv1"})
    hv1 = cluster.hv1_worker()
    assert _task_workers(ts, "_open_disk") == {hv1}
    ran = [(t["worker"], t["key"]) for t in ts.data if str(t["key"]).startswith("_run_shard")]
    assert len(ran) >= 2
    assert {w for w, k in ran} >= {hv1}
    assert point.disk("far").bytes_read == 6 << 20  # (read by hv1's worker: it is nowhere else)
    assert point.disk("far").path == "far.img"  # (as given: this host's folder means nothing)
    assert point.disk("near").path == str(near)
    assert not v.verify(data=True).problems


def test_a_host_no_worker_serves_fails_before_anything_is_written(cluster: Cluster,
                                                                 tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "a.img", 1 << 20, seed=9)
    v = _s3_vault("none")
    before = sorted(v.storage.list(""))
    with pytest.raises(CbtError, match="disk a: no Dask worker serves host hv9: start one "
                                       "there with --resources host-hv9=1"):
        v.backup("vm", [disk], executor=cluster.client, hosts={"a": "hv9"})
    assert sorted(v.storage.list("")) == before
    assert v.point_ids() == []


def test_a_pinned_host_needs_a_cluster(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "a.img", 1 << 20, seed=9)
    v = Vault.create(LocalStorage.create(tmp_path / "v"))
    with pytest.raises(CbtError, match=r"disk a is on host hv1: .*--executor dask://"):
        v.backup("vm", [disk], hosts={"a": "hv1"})


# -- the command line ------------------------------------------------------------------


def test_cli_backup_config_on_a_dask_scheduler(cluster: Cluster, tmp_path: Path) -> None:
    """cbt backup --config F --executor dask://127.0.0.1:PORT, F naming an encrypted
    s3:// vault (cbt init's default); a VM with host = "hv1" is opened and read by that
    host's worker, which writes its packs to the bucket itself; the points restore from
    S3 to the disks; an unreachable scheduler is one line, nothing written."""
    from distributed import get_task_stream

    far = make_disk(cluster.hv1_dir / "far.img", 3 << 20, seed=11)
    far2 = make_disk(cluster.hv1_dir / "far2.img", 2 << 20, seed=13)  # (hv1 holds two VMs)
    near = make_disk(tmp_path / "near.img", 3 << 20, seed=12)
    bucket = f"s3://{fresh_bucket()}/cli"
    env = encrypted_env(tmp_path)
    r = cbt("init", bucket, "--kdf-log-n", "10", env=env)
    assert r.returncode == 0, r.stderr
    cfg = job_config(tmp_path / "cbt.toml", {
        "near": {"disks": {"os": str(near)}, "snapshot": "none"},
        "far": {"disks": {"os": str(far)}, "host": "hv1"},
        "far2": {"disks": {"os": str(far2), "data": str(far)}, "host": "hv1"}}, vault=bucket)
    port = cluster.address.rsplit(":", 1)[1]
    with get_task_stream(cluster.client) as ts:
        res = subprocess.run(cbt_argv("backup", "--config", cfg, "--executor",
                                      f"dask://127.0.0.1:{port}", "--json"),
                             capture_output=True, text=True, env=clean_env(env), timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count('"type":"point"') == 3, res.stdout
    assert _task_workers(ts, "_open_disk") == {cluster.hv1_worker()}
    assert len(_task_workers(ts, "_run_shard")) >= 2
    v = Vault.open(bucket, PASSWORD)
    assert v.encrypted and len(v.point_ids()) == 3
    for vm, label, disk in (("far", "os", far), ("near", "os", near), ("far2", "os", far2),
                            ("far2", "data", far)):
        out = tmp_path / f"{vm}-{label}-restored.img"
        v.restore(v.latest(vm).id, out, disk=label)  # type: ignore[union-attr]
        assert_same_bytes(out, disk)
    assert not v.verify(data=True).problems
    dead = subprocess.run(cbt_argv("backup", "--config", cfg, "--executor",
                                   "dask://127.0.0.1:9"), capture_output=True, text=True,
                          env=clean_env(env), timeout=120)
    assert dead.returncode != 0
    (line,) = dead.stderr.strip().splitlines()
    assert line.startswith("cbt: error: cannot reach the Dask scheduler at 127.0.0.1:9: ")
    assert len(Vault.open(bucket, PASSWORD).point_ids()) == 3
    far2.unlink()


def test_config_check_json_shows_each_vms_host(tmp_path: Path) -> None:
    """cbt config check --json: each VM's "host" (null: this one); the text form names it."""
    cfg = job_config(tmp_path / "cbt.toml", {
        "near": {"disks": {"os": str(tmp_path / "near.img")}, "snapshot": "none"},
        "far": {"disks": {"os": "/srv/far.img"}, "host": "hv1"}},
        vault="s3://bucket/prefix")
    r = cbt("config", "check", cfg, "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["vault"] == "s3://bucket/prefix"
    assert {vm["name"]: vm["host"] for vm in plan["vms"]} == {"near": None, "far": "hv1"}
    text = cbt("config", "check", cfg)
    assert text.returncode == 0, text.stderr
    assert "vm far (policy daily) on host hv1" in text.stdout
    assert "vm near (policy daily)\n" in text.stdout


# -- a worker killed mid-backup ------------------------------------------------------------


def test_a_worker_killed_mid_backup_fails_the_run_and_the_next_succeeds(
        cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cbt.jobs import dask_executor

    monkeypatch.setattr(dask_executor, "WATCH_EVERY", 0.05)
    size = 160 << 20  # (long enough a shard that the kill lands while it runs: the hash
    # kernel made a 48 MiB one finish before the first progress report could kill it)
    disk = make_disk(tmp_path / "big.img", size, seed=13)
    v = _s3_vault("kill")
    client = cluster.client
    pids = client.run(os.getpid, workers=cluster.local_workers())
    killed: list[str] = []

    def kill_one(vm: str, label: str, done: int, total: int) -> None:
        if killed:
            return
        busy = [a for a, keys in client.processing().items() if keys and a in pids]
        victim = busy[0] if busy else next(iter(pids))
        os.kill(pids[victim], signal.SIGKILL)
        killed.append(victim)
        deadline = time.monotonic() + 30  # until the scheduler sees it gone
        while victim in client.scheduler_info(n_workers=-1)["workers"] and \
                time.monotonic() < deadline:
            time.sleep(0.05)

    # (progress comes as shards finish: a kill that lands after the last one did tests
    # nothing, and the point is whole; then the cluster is made whole and it is tried again)
    before: list[str] = []
    for _attempt in range(5):
        killed.clear()
        pids.clear()  # (a restarted worker has a new address and pid)
        pids.update(client.run(os.getpid, workers=cluster.local_workers()))
        try:
            p = v.backup("vm", [disk], block_size=BS, executor=client, progress=kill_one)
        except CbtError as exc:
            assert re.search(r"Dask worker .* (left the cluster|died)|nothing committed",
                             str(exc)), exc
            break
        before.append(p.id)
        client.wait_for_workers(3, timeout=60)
    else:
        pytest.fail("every kill landed after the backup's last shard")
    assert killed
    assert v.point_ids() == before
    client.wait_for_workers(3, timeout=60)  # (the nanny starts it again)
    point = v.backup("vm", [disk], block_size=BS, executor=client)
    assert v.point_ids() == [*before, point.id]
    assert point.disks[0].bytes_read == size
    assert not v.verify(data=True).problems


# -- without a cluster ---------------------------------------------------------------------


def test_without_distributed_one_line_says_what_to_install(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "a.img", 1 << 20, seed=1)
    Vault.create(LocalStorage.create(tmp_path / "v"))
    code = ("import sys; sys.modules['distributed'] = None\n"
            "from cbt.cli.main import main\n"
            f"sys.exit(main(['backup', {str(tmp_path / 'v')!r}, '--vm', 'vm', {str(disk)!r}, "
            "'--executor', 'dask://127.0.0.1:9']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=clean_env(), timeout=60)
    assert one_error_line(r) == ("cbt: error: the Dask executor needs the distributed "
                                 "package: pip install 'cbt[dask]'")
    assert Vault.open(tmp_path / "v").point_ids() == []


def test_bad_executor_address_is_one_line(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "a.img", 1 << 20, seed=1)
    Vault.create(LocalStorage.create(tmp_path / "v"))
    r = cbt("backup", tmp_path / "v", "--vm", "vm", disk, "--executor", "http://x:1")
    assert one_error_line(r) == "cbt: error: --executor 'http://x:1': give dask://HOST:PORT"


def test_config_host_key(tmp_path: Path) -> None:
    """``host``: the VM is read live (snapshot "none" by default, nothing else allowed),
    never with qmp; a host name."""
    def vm(**keys: Any) -> VMConfig:
        cfg = job_config(tmp_path / "c.toml", {"web": {"disks": {"os": "/srv/os.img"},
                                                         **keys}})
        return load(cfg).vms["web"]

    assert vm(host="hv1").host == "hv1"
    assert vm(host="hv1").snapshot == "none"
    assert vm(host="hv1", snapshot="none").host == "hv1"
    assert vm().host is None and vm().snapshot == "auto"
    assert vm(host="").host is None and vm(host="").snapshot == "auto"  # (the shown default)
    with pytest.raises(ConfigError, match=r"vm\.web\.snapshot.*read live"):
        vm(host="hv1", snapshot="reflink")
    with pytest.raises(ConfigError, match=r"vm\.web\.host.*not a host name"):
        vm(host="a b")
    with pytest.raises(ConfigError, match=r"vm\.web\.host.*string"):
        vm(host=3)
    cfg = job_config(tmp_path / "q.toml", {"q": {"qmp": "/run/q.qmp", "host": "hv1"}})
    with pytest.raises(ConfigError, match=r"vm\.q\.host.*not allowed with qmp"):
        load(cfg)


# (source, made a function by exec: a dynamic function, which cloudpickle sends by value;
# the workers cannot import this module)
MMAP_PROBE = """
def probe():
    import ctypes

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                    "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2
    before = libc.mallinfo2().hblks
    buf = bytearray(1 << 20)
    during = libc.mallinfo2().hblks
    del buf
    return int(during - before)
"""


def test_a_workers_malloc_is_tuned_for_cbt(cluster: Cluster) -> None:
    """Dask's nanny sets MALLOC_TRIM_THRESHOLD_, which pins glibc's mmap threshold at
    128 KiB (every larger buffer a fresh mmap: 1.5-1.7x the CPU); a cbt task on a worker
    gives the thresholds back first: a 1 MiB buffer is no mmap of its own there."""
    from cbt.jobs.dask_executor import DaskExecutor

    need(hasattr(__import__("ctypes").CDLL("libc.so.6"), "mallinfo2"), "needs glibc 2.33+")
    ns: dict[str, Any] = {}
    exec(MMAP_PROBE, ns)
    probe = ns["probe"]
    (worker,) = cluster.local_workers()[:1]
    client = cluster.client
    assert client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"),
                      workers=[worker])[worker] is not None
    assert client.submit(probe, pure=False, workers=[worker]).result(timeout=60) in (0, 1)
    executor = DaskExecutor(client)
    try:
        assert executor.submit(probe).result(timeout=60) == 0
    finally:
        executor.shutdown()


# -- a worker's crafted result ---------------------------------------------------------------


class _Tampering(ThreadPoolExecutor):
    """An executor whose 'workers' hand back a shard's result altered by ``tamper``."""

    def __init__(self, tamper: Callable[[Any, Any, list[Any]], Any]) -> None:
        super().__init__(2)
        self.tamper = tamper
        self.seen: list[Any] = []

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        def run() -> Any:
            r = fn(*args, **kwargs)
            if getattr(fn, "__name__", "") != "_run_shard":
                return r
            out = self.tamper(args[-1], r, self.seen)
            self.seen.append(r)
            return out
        return super().submit(run)


def _first_data(r: Any) -> int:
    from cbt.core.native import fast

    return int(np.flatnonzero(r.block_flags == fast.FLAG_DATA)[0])


def _unread_digest(shard: Any, r: Any, seen: list[Any]) -> Any:
    """A block said to hold data of another digest, which nobody stored."""
    row = _first_data(r)
    keep = ~(r.digests == r.block_digests[row]).all(axis=1)  # (its entry goes)
    digests = r.block_digests.copy()
    digests[row] = np.frombuffer(os.urandom(32), np.uint8)
    return dataclasses.replace(r, block_digests=digests, digests=r.digests[keep],
                               pack_uuid=r.pack_uuid[keep], offset=r.offset[keep],
                               stored=r.stored[keep], raw=r.raw[keep])


def _fake_entry(pack: bytes | None, offset: int) -> Callable[[Any, Any, list[Any]], Any]:
    """The first block stored said to lie elsewhere: in another pack, or past its end."""
    def tamper(shard: Any, r: Any, seen: list[Any]) -> Any:
        uuids, offsets = r.pack_uuid.copy(), r.offset.copy()
        if pack is not None:
            uuids[0] = np.frombuffer(pack, np.uint8)
        offsets[0] = offset
        return dataclasses.replace(r, pack_uuid=uuids, offset=offsets)
    return tamper


CRAFTED: dict[str, tuple[Callable[[Any, Any, list[Any]], Any], str]] = {
    "short digests": (lambda s, r, seen: dataclasses.replace(
        r, block_digests=r.block_digests[:-1]), "block_digests of the wrong shape"),
    "flags": (lambda s, r, seen: dataclasses.replace(
        r, block_flags=np.full_like(r.block_flags, 7)), "unknown block flags"),
    "not a result": (lambda s, r, seen: None, "is a NoneType, not a shard's"),
    "another shard's": (lambda s, r, seen: seen[0] if seen else r, "is another shard's"),
    "bytes read": (lambda s, r, seen: dataclasses.replace(r, bytes_read=r.bytes_read + 1),
                   "bytes read"),
    "an entry it did not read": (lambda s, r, seen: dataclasses.replace(
        r, digests=np.vstack([r.digests, np.frombuffer(os.urandom(32), np.uint8)[None]]),
        pack_uuid=np.vstack([r.pack_uuid, r.pack_uuid[:1]]),
        offset=np.append(r.offset, np.uint64(0)), stored=np.append(r.stored, np.uint32(1)),
        raw=np.append(r.raw, np.uint32(1))), "stored blocks the shard did not read"),
    "a digest of a block not stored": (_unread_digest,
                                       "neither in the vault nor stored by its workers"),
    "an entry in a pack never written": (_fake_entry(os.urandom(16), 0), "which the vault "
                                                                        "lacks"),
    "an entry past its pack's end": (_fake_entry(None, 1 << 30), "holds shorter"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_a_crafted_result_is_never_committed(case: str, tmp_path: Path) -> None:
    """A worker's result that is not the shard's (wrong lengths, unknown flags, another
    shard's, digests of blocks nobody stored, entries in packs that are not there) fails
    the backup, one line naming it; no point names a block the vault lacks; the next
    backup succeeds."""
    tamper, why = CRAFTED[case]
    disk = make_disk(tmp_path / "a.img", 4 << 20, seed=21)
    v = Vault.create(LocalStorage.create(tmp_path / "v"))
    with _Tampering(tamper) as ex, pytest.raises(CbtError, match=why) as err:
        v.backup("vm", [disk], block_size=BS, executor=ex)
    assert "nothing committed" in str(err.value) and "\n" not in str(err.value)
    assert v.point_ids() == []
    with ThreadPoolExecutor(2) as ex:
        point = v.backup("vm", [disk], block_size=BS, executor=ex)
    assert v.point_ids() == [point.id]
    assert not v.verify(data=True).problems


# -- an encrypted vault: what a worker holds and logs -----------------------------------------

# (source, made a function by exec: sent by value; the workers cannot import this module)
KEYS_PROBE = """
def probe():
    import gc
    from cbt.repo.keys import VaultKeys
    gc.collect()
    return sum(isinstance(o, VaultKeys) for o in gc.get_objects())
"""


def test_workers_hold_no_keys_after_an_encrypted_run_and_log_none(cluster: Cluster,
                                                                 tmp_path: Path) -> None:
    """The vault's keys go to the workers with each shard (no passphrase there); after the
    run no worker holds them (none of its objects is the vault's keys), and a shard that
    fails logs no key on its worker."""
    from cbt.core.crypto import ALGORITHMS

    ns: dict[str, Any] = {}
    exec(KEYS_PROBE, ns)
    probe = ns["probe"]
    client = cluster.client
    v = Vault.create(S3Storage.create(f"s3://{fresh_bucket()}/keys"),
                     encryption=next(iter(ALGORITHMS)), passphrase=PASSWORD, kdf=fast_kdf())
    assert v.keys is not None
    good = make_disk(tmp_path / "a.img", 4 << 20, seed=31)
    point = v.backup("vm", [good], block_size=BS, executor=client)
    assert not v.verify(data=True).problems
    assert set(client.run(probe).values()) == {0}, "a worker holds the vault's keys"
    # a shard that fails on hv1's worker (its disk gone after the plan), keys in hand
    from cbt.jobs.dask_executor import DaskExecutor
    from cbt.ops.backup import BackupRequest, WorkerVault, _run_shard, plan

    far = make_disk(tmp_path / "far.img", 2 << 20, seed=32)
    planned = plan(v, BackupRequest("vm2", [DiskSpec("far", str(far))], block_size=BS))
    far.unlink()
    executor = DaskExecutor(client)
    try:
        on_hv1, _ = executor.on("hv1")
        with pytest.raises(CbtError, match="far"):
            on_hv1.submit(_run_shard, WorkerVault.of(v, planned.index),
                          planned.shards[0]).result(timeout=60)
    finally:
        executor.release()
        executor.shutdown()
    assert set(client.run(probe).values()) == {0}
    log = (cluster.hv1_dir / "worker.log").read_bytes()
    assert b"Compute Failed" in log and b"far" in log
    keys = v.keys
    for secret in (keys.master, keys.id_key):
        assert secret not in log and secret.hex().encode() not in log
    assert v.point_ids() == [point.id]


def test_a_disk_of_another_host_is_never_opened_here(cluster: Cluster, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk of host hv1 is looked at only there: a file this host has at the same path
    (here a qcow2 image) is never read, nor taken for the disk; a qcow2 image on hv1 is
    refused in one line (cbt runs qemu-nbd on its own host only), nothing written."""
    monkeypatch.chdir(tmp_path)
    decoy = tmp_path / "far.qcow2"
    decoy.write_bytes(b"QFI\xfb" + os.urandom((1 << 20) - 4))
    far = make_disk(cluster.hv1_dir / "far.qcow2", 2 << 20, seed=41)  # (raw: no header)
    try:
        v = _s3_vault("decoy")
        point = v.backup("vm", ["far=far.qcow2"], block_size=BS, executor=cluster.client,
                         hosts={"far": "hv1"})
        assert point.disk("far").size == 2 << 20 and not point.warnings
        out = tmp_path / "restored.img"
        v.restore(point.id, out, disk="far")
        assert_same_bytes(out, far)
        with open(far, "r+b") as f:
            f.write(b"QFI\xfb")
        with pytest.raises(CbtError, match=r"^disk far: far\.qcow2 is a qcow2 image on "
                                           r"another host: .*qemu-nbd") as err:
            v.backup("vm", ["far=far.qcow2"], block_size=BS, executor=cluster.client,
                     hosts={"far": "hv1"})
        assert "\n" not in str(err.value)
        assert v.point_ids() == [point.id]
    finally:
        far.unlink()


class _Placed(PlacedExecutor):
    """A cluster of threads: every host served, what a worker says of a disk altered."""

    def __init__(self, tamper: Callable[[Any], Any]) -> None:
        self.pool = ThreadPoolExecutor(2)
        self.tamper = tamper

    def on(self, host: str | None) -> tuple[Executor, int]:
        return self, 2

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        if getattr(fn, "__name__", "") == "_open_disk_there":
            return self.pool.submit(lambda: self.tamper(fn(*args, **kwargs)))
        return self.pool.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.pool.shutdown(wait, cancel_futures=cancel_futures)


BAD_DISKS: dict[str, Callable[[Any], Any]] = {
    "past the end": lambda g: (g[0], [(0, 10**6)]),
    "overlapping": lambda g: (g[0], [(0, 10), (5, 20)]),
    "empty range": lambda g: (g[0], [(3, 3)]),
    "negative size": lambda g: (g[0]._replace(size=-1), []),
    "no source": lambda g: None,
    "unknown kind": lambda g: (g[0]._replace(kind="pipe"), g[1]),
}


@pytest.mark.parametrize("case", list(BAD_DISKS))
def test_what_a_hosts_worker_says_of_its_disk_is_checked(case: str, tmp_path: Path) -> None:
    """A disk's ranges and size come from its host's worker: ranges past the disk's end,
    overlapping or empty, a size below zero, or no source fail the run in one line,
    before anything is written."""
    disk = make_disk(tmp_path / "a.img", 1 << 20, seed=51)
    v = Vault.create(LocalStorage.create(tmp_path / "v"))
    def written() -> list[str]:
        return sorted(n for n in v.storage.list("") if not n.startswith("locks/"))

    before = written()
    with _Placed(BAD_DISKS[case]) as ex, \
            pytest.raises(CbtError, match=r"^disk a: its host's worker sent ") as err:
        v.backup("vm", [disk], block_size=BS, executor=ex, hosts={"a": "hv1"})
    assert "\n" not in str(err.value)
    assert written() == before
    with _Placed(lambda g: g) as ex:
        v.backup("vm", [disk], block_size=BS, executor=ex, hosts={"a": "hv1"})
    assert not v.verify(data=True).problems


# -- the scheduler gone mid-run ------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_scheduler_killed_mid_backup_is_one_line_nothing_committed(tmp_path: Path) -> None:
    """cbt backup --executor against a scheduler SIGKILLed while the shards run: one
    error line (none of Dask's tracebacks), soon, nothing committed, no lock left; the
    next backup (forked workers) succeeds."""
    port = _free_port()
    dask = str(Path(sys.executable).parent / "dask")
    env = clean_env({"DASK_TEMPORARY_DIRECTORY": str(tmp_path)})
    procs = [subprocess.Popen(
        [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
         "--dashboard-address", "127.0.0.1:0", "--no-show"],
        cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True, env=env)]
    try:
        procs.append(subprocess.Popen(
            [dask, "worker", f"tcp://127.0.0.1:{port}", "--nthreads", "1", "--no-nanny",
             "--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0",
             "--local-directory", str(tmp_path)],
            cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True, env=env))
        with distributed.Client(f"tcp://127.0.0.1:{port}", timeout=30,
                                set_as_default=False) as c:
            c.wait_for_workers(1, timeout=60)
        disks = [str(make_disk(tmp_path / f"d{k}.img", 16 << 20, seed=60 + k))
                 for k in range(3)]
        Vault.create(LocalStorage.create(tmp_path / "v"))
        run = subprocess.Popen(cbt_argv("backup", tmp_path / "v", "--vm", "vm", *disks,
                                        "--block-size", "16K",
                                        "--executor", f"dask://127.0.0.1:{port}"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env)
        packs = tmp_path / "v" / "packs"
        deadline = time.monotonic() + 120
        while not (packs.exists() and any(packs.rglob("*.pack"))) and run.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(procs[0].pid, signal.SIGKILL)
        killed = time.monotonic()
        out, err = run.communicate(timeout=120)
        took = time.monotonic() - killed
    finally:
        for p in procs:
            _stop(p)
    assert run.returncode != 0, (out, err)
    (line,) = err.strip().splitlines()
    assert line.startswith("cbt: error: ") and "nothing committed" in line, line
    assert took < 30
    v = Vault.open(tmp_path / "v")
    assert v.point_ids() == []
    point = v.backup("vm", disks, block_size=BS, workers=2)
    assert v.point_ids() == [point.id]
    assert not v.verify(data=True).problems


# -- gc beside a cluster's backup --------------------------------------------------------------


def test_gc_while_the_workers_write_packs_frees_none_of_them(cluster: Cluster,
                                                            tmp_path: Path) -> None:
    """The coordinator holds the VM's lock and shares the vault for the whole run: a gc
    run while the cluster's workers write packs (seven disks on three workers; S3: the
    server's clock) sweeps none of them; the point commits, verifies and restores; a gc
    after frees nothing it uses."""
    disks = [make_disk(tmp_path / f"g{k}.img", 6 << 20, seed=70 + k) for k in range(7)]
    bucket = f"s3://{fresh_bucket()}/gc"
    v = Vault.create(S3Storage.create(bucket))
    runs: list[subprocess.CompletedProcess[str]] = []
    packs: list[int] = []

    def gc_now(vm: str, label: str, done: int, total: int) -> None:
        if not runs:  # (the coordinator waits; the workers go on writing)
            packs.append(len(v.storage.list("packs")))
            runs.append(cbt("gc", bucket, "--json"))

    point = v.backup("vm", [str(p) for p in disks], block_size=BS, executor=cluster.client,
                     progress=gc_now)
    assert runs and runs[0].returncode == 0, runs[0].stderr
    assert packs[0] > 0  # (packs of no point yet, and no other holder: only the cutoff)
    assert json.loads(runs[0].stdout)["packs_removed"] == 0
    assert not v.verify(data=True).problems
    after = cbt("gc", bucket, "--json")
    assert after.returncode == 0, after.stderr
    assert not v.verify(data=True).problems
    for k, disk in enumerate(disks):
        out = tmp_path / f"r{k}.img"
        v.restore(point.id, out, disk=disk.stem)
        assert_same_bytes(out, disk)


# (made a function by exec: sent by value)
RAISER = """
def value_error():
    raise ValueError("bad\\n" + "x" * 5000)
"""


def test_a_workers_odd_exception_is_one_line_here(cluster: Cluster) -> None:
    """Whatever a task raises on a worker (a ValueError of 5000 characters over two lines;
    a KeyboardInterrupt or SystemExit, which would pass for this process's own) is one
    line of cbt's here."""
    from cbt.jobs.dask_executor import DaskExecutor, _worker_error

    ns: dict[str, Any] = {}
    exec(RAISER, ns)
    executor = DaskExecutor(cluster.client)
    try:
        with pytest.raises(CbtError, match=r"^a Dask worker failed: ValueError: bad x+: "
                                           r"nothing committed$") as err:
            executor.submit(ns["value_error"]).result(timeout=60)
        assert len(str(err.value)) < 300
    finally:
        executor.shutdown()
    for exc in (KeyboardInterrupt(), SystemExit(0)):
        got = _worker_error(exc)
        assert isinstance(got, CbtError)
        assert str(got) == f"a Dask worker failed: {type(exc).__name__}" + \
            (": 0" if isinstance(exc, SystemExit) else "") + ": nothing committed"
    # the client's fetch of a result over a connection the scheduler's death reset: an
    # OSError of Dask's, said as the connection lost (not "in <TCP (closed) ...>")
    from distributed.comm.core import CommClosedError

    lost = _worker_error(CommClosedError("in <TCP (closed) ConnectionPool.gather local=tcp:"
                                         "//127.0.0.1:1 remote=tcp://127.0.0.1:2>: "
                                         "ConnectionResetError: [Errno 104] reset"))
    assert isinstance(lost, CbtError) and "TCP" not in str(lost)
    assert str(lost).endswith("(connection lost): nothing committed; run it again")
    assert _worker_error(OSError(28, "No space left")).errno == 28  # (cbt's own: as it is)
    # a shard the client cancelled when its connection to the scheduler was lost
    from distributed.client import FutureCancelledError

    cancelled = _worker_error(FutureCancelledError(
        "_run_shard-7a0d", reason="scheduler-connection-lost",
        msg="Client lost the connection to the scheduler."))
    assert str(cancelled).endswith("(connection lost): nothing committed; run it again")
    other = _worker_error(FutureCancelledError("_run_shard-7a0d", reason="x", msg="y"))
    assert str(other).startswith("Dask cancelled a shard (") and "nothing committed" in str(other)


def test_the_workers_are_asked_of_the_scheduler_not_of_a_cache(cluster: Cluster) -> None:
    """The client refreshes its cached scheduler info every few seconds with no worker in
    it; the executor's view of the workers (the watcher's, the placement's) is the
    scheduler's answer itself, so a refresh meanwhile never makes every worker 'gone'."""
    import dask

    from cbt.jobs.dask_executor import DaskExecutor

    with dask.config.set({"distributed.client.scheduler-info-interval": "2ms"}), \
            distributed.Client(cluster.address, set_as_default=False) as client:
        executor = DaskExecutor(client)
        seen = {len(executor._workers()) for _ in range(300)}
        executor.shutdown()
    assert seen == {3}
