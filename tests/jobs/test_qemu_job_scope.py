"""Two cbt instances (two vaults: a local one and an off-host one) backing up the SAME
running VM: each names what it makes in QEMU by its scope (vault and VM), so neither
releases, merges or removes the other's bitmaps, views or work files; interleaved and
concurrent runs lose no change and every point equals the guest's view."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers.jobs import write_config
from helpers.qmp_daemon import Daemon, storage_daemon

from cbt.api import Vault
from cbt.jobs.config import load
from cbt.jobs.job import JobRequest, JobResult
from cbt.jobs.runner import run_vm
from cbt.source.qemu import QmpSession, bitmap_name, scope_of

MIB = 1 << 20
KIB = 1 << 10
VM = "web"


@pytest.fixture
def daemon(tmp_path: Path):
    with storage_daemon(tmp_path, {"os": 4 * MIB, "db": 2 * MIB}, second_monitor=True) as d:
        yield d


def _instance(root: Path, name: str, qmp: Path, **vm: Any) -> tuple[Vault, Path]:
    vault = Vault.init(root / f"vault-{name}", encryption="none")
    cfg = write_config(root / f"{name}.toml", {"p": {"schedule": "daily 02:00"}},
                       {VM: {"policy": "p", "qmp": str(qmp), **vm}}, vault=f"vault-{name}")
    return vault, cfg


def _run(cfg: Path, **request: Any) -> JobResult:
    return run_vm(load(cfg), VM, JobRequest(**request))


def _bm(vault: Vault, point: str) -> str:
    return bitmap_name(point, scope_of(str(vault.config["id"]), VM))


def _exact(root: Path, vault: Vault, res: JobResult, d: Daemon, source: str) -> None:
    assert res.point is not None, res.error
    for rec in res.point.disks:
        assert rec.change_source == source, rec
        out = root / "restored"
        vault.restore(res.point.id, out, disk=rec.label)
        assert out.read_bytes() == d.read(rec.label), rec.label
        out.unlink()


@pytest.mark.slow
def test_two_vaults_interleaved_never_touch_each_others_bitmaps(tmp_path: Path,
                                                                 daemon: Daemon) -> None:
    va, cfg_a = _instance(tmp_path, "a", daemon.qmp)
    vb, cfg_b = _instance(tmp_path, "b", daemon.qmp)
    daemon.write("os", 0, os.urandom(200 * KIB))
    a1, b1 = _run(cfg_a), _run(cfg_b)
    _exact(tmp_path, va, a1, daemon, "hash")
    _exact(tmp_path, vb, b1, daemon, "hash")
    assert a1.point is not None and b1.point is not None
    assert set(daemon.bitmaps("os")) == {_bm(va, a1.point.id), _bm(vb, b1.point.id)}

    daemon.write("os", 1 * MIB, b"\x01" * 5000)
    a2 = _run(cfg_a)
    _exact(tmp_path, va, a2, daemon, "qemu-bitmap")
    assert a2.point is not None
    assert set(daemon.bitmaps("os")) == {_bm(va, a2.point.id), _bm(vb, b1.point.id)}
    # a bitmap A's killed run left (A's scope): B leaves it alone, A folds it back
    left = _bm(va, "web.20261130T000000Z-dead")
    with QmpSession(daemon.qmp) as s:
        s.command("block-dirty-bitmap-add", {"node": "db", "name": left, "persistent": True})
    daemon.write("db", 512 * KIB, b"\x02" * 5000)  # recorded by all three bitmaps
    b2 = _run(cfg_b)
    _exact(tmp_path, vb, b2, daemon, "qemu-bitmap")  # saw the write A already took
    assert b2.point is not None and not any("earlier run" in w for w in b2.point.warnings)
    assert left in daemon.bitmaps("db")
    daemon.write("os", 3 * MIB, b"\x03" * 5000)
    a3 = _run(cfg_a)
    _exact(tmp_path, va, a3, daemon, "qemu-bitmap")
    assert a3.point is not None
    assert any(left in w for w in a3.point.warnings)
    assert set(daemon.bitmaps("db")) == {_bm(va, a3.point.id), _bm(vb, b2.point.id)}
    b3 = _run(cfg_b)
    _exact(tmp_path, vb, b3, daemon, "qemu-bitmap")


_OTHER_RUN = """
import json, sys
from cbt.jobs.config import load
from cbt.jobs.job import JobRequest
from cbt.jobs.runner import run_vm
res = run_vm(load(sys.argv[1]), "web", JobRequest(workers=1))
print(json.dumps({"error": res.error, "point": res.point.id if res.point else None}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("shared_nbd", [False, True], ids=["own-nbd", "shared-nbd"])
def test_a_second_vault_starting_in_the_middle_of_a_transfer(tmp_path: Path, daemon: Daemon,
                                                             shared_nbd: bool) -> None:
    """A reads its view (its own QMP monitor); B (the other monitor) starts then: B
    fails cleanly or succeeds, A's view is untouched, and the next runs miss nothing."""
    nbd = tmp_path / "shared-nbd.sock"
    extra = {"nbd": str(nbd)} if shared_nbd else {}
    assert daemon.qmp2 is not None
    va, cfg_a = _instance(tmp_path, "a", daemon.qmp, verify_fraction=0, **extra)
    vb, cfg_b = _instance(tmp_path, "b", daemon.qmp2, verify_fraction=0, **extra)
    if shared_nbd:
        with QmpSession(daemon.qmp) as s:
            s.command("nbd-server-start", {"addr": {"type": "unix",
                                                    "data": {"path": str(nbd)}}})
    daemon.write("os", 0, os.urandom(300 * KIB))
    _exact(tmp_path, va, _run(cfg_a), daemon, "hash")
    _exact(tmp_path, vb, _run(cfg_b), daemon, "hash")
    daemon.write("os", 1 * MIB, os.urandom(5000))
    daemon.write("db", 1 * MIB, os.urandom(5000))
    other: list[dict[str, Any]] = []
    guest_then: dict[str, bytes] = {}

    def middle(*_: object) -> None:
        if other:
            return
        guest_then.update({n: daemon.read(n) for n in ("os", "db")})
        r = subprocess.run([sys.executable, "-c", _OTHER_RUN, str(cfg_b)], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        other.append(json.loads(r.stdout))

    a2 = _run(cfg_a, progress=middle, workers=1)
    assert other, "B never ran"
    assert a2.point is not None, a2.error  # B tore nothing of A's down
    for label, data in guest_then.items():
        out = tmp_path / "r"
        va.restore(a2.point.id, out, disk=label)
        assert out.read_bytes() == data
        out.unlink()
    b_said = other[0]
    if shared_nbd:  # both read at once (two backup jobs over one disk): both exact
        assert b_said["error"] is None, b_said
        for label, data in guest_then.items():
            out = tmp_path / "r"
            vb.restore(b_said["point"], out, disk=label)
            assert out.read_bytes() == data
            out.unlink()
    else:  # QEMU runs one NBD server, A's: B fails at once, in one line
        assert "already runs an NBD server" in b_said["error"]
        assert "\n" not in b_said["error"]
    assert daemon.leftovers() == set()
    daemon.write("os", 2 * MIB, os.urandom(5000))
    _exact(tmp_path, va, _run(cfg_a), daemon, "qemu-bitmap")
    _exact(tmp_path, vb, _run(cfg_b), daemon, "qemu-bitmap")
    if shared_nbd:
        with QmpSession(daemon.qmp) as s:
            s.command("nbd-server-stop")
