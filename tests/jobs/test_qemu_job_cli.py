"""A QEMU VM through the command line and the configuration: ``cbt backup --config``,
``run-due``, ``config check``, a cbt run SIGKILLed after its cut, config errors of the
new keys, the guest agent's freeze falling back, an NBD server QEMU already runs."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from helpers.cli import cbt, crash_env, start_cbt
from helpers.jobs import (
    backup_config,
    hook_argv,
    hook_log,
    jobs_json,
    one_point,
    run_due,
    set_ctl,
    write_config,
    write_hook,
)
from helpers.qmp_daemon import Daemon, host_guest_agent, vault_bitmap
from helpers.shapes import CHECK_VM_KEYS
from helpers.vaults import init_cli_vault

from cbt.api import Vault
from cbt.jobs.config import ConfigError, load
from cbt.jobs.hooks import HookResult
from cbt.jobs.job import JobRequest
from cbt.jobs.qemu import AgentResult, qemu_consistency
from cbt.jobs.runner import run_vm
from cbt.source.qemu import QmpSession

MIB = 1 << 20
KIB = 1 << 10
VM = "web"


def _bm(root: Path, point: str, vm: str = VM) -> str:
    """The bitmap a point of ``vm`` in the vault ``root/vault`` leaves (scoped by vault and
    VM)."""
    return vault_bitmap(root / "vault", point, vm)


def _config(root: Path, d: Daemon, schedule: str = "daily 02:00", **vm: Any) -> Path:
    return write_config(root / "cbt.toml", {"p": {"schedule": schedule}},
                        {VM: {"policy": "p", "qmp": str(d.qmp), **vm}})


def _restored(root: Path, vault: Path, point: str, label: str,
              env: dict[str, str] | None) -> bytes:
    out = root / f"r-{label}"
    r = cbt("restore", vault, point, "--to", out, "--disk", label, "--json", env=env)
    assert r.returncode == 0, r.stderr
    data = out.read_bytes()
    out.unlink()
    return data


@pytest.mark.slow
@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_cbt_backup_killed_after_the_cut_then_the_next_run_misses_nothing(
        tmp_path: Path, daemon: Daemon, encrypted: bool) -> None:
    state = tmp_path / "state"
    write_hook(state)
    vault = tmp_path / "vault"
    env = init_cli_vault(vault, encrypted, tmp_path)
    cfg = _config(tmp_path, daemon, hooks={"post": hook_argv(state)})
    daemon.write("os", 0, os.urandom(256 * KIB))
    r, lines = backup_config(cfg, env=env)
    assert r.returncode == 0, r.stderr
    first = lines[0]["recovery_point"]
    assert lines[0]["consistency"] == "crash"

    daemon.write("os", 1 * MIB, b"\x61" * 5000)  # before the killed run's cut
    set_ctl(state, "post", killgroup=True, once=True)  # the post hook runs just after the cut
    proc = start_cbt("backup", "--config", cfg, "--json", env=env)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    left = daemon.leftovers()  # the post hook runs right after the transaction
    scope = _bm(tmp_path, "x")[len("cbt-"):-len("-x")]
    assert any(n.startswith(f"cbt-{scope}-n") for n in left)  # overlays
    assert any(n.startswith(f"cbt-{scope}-j") for n in left)  # backup jobs
    assert len(daemon.bitmaps("os")) == 2  # the killed run's new bitmap is left
    daemon.write("os", 3 * MIB, b"\x62" * 5000)  # after it: recorded by both bitmaps

    line = one_point(cfg) if env is None else _one_point_env(cfg, env)
    assert daemon.leftovers() == set()
    said = " ".join(line["warnings"])
    assert f"released what an earlier run left in QEMU: cbt-{scope}-" in said
    assert f"bitmaps an earlier run left folded into {_bm(tmp_path, first)}: db: cbt-{scope}-" \
        in said
    assert [e["phase"] for e in hook_log(state)] == ["post", "post", "recover", "post"]
    rec = json.loads(cbt("show", vault, line["recovery_point"], "--json", env=env).stdout)
    disks = {d["label"]: d for d in rec["disks"]}
    assert disks["os"]["change_source"] == "qemu-bitmap"
    assert disks["os"]["hint_mismatches"] == 0
    for label in ("os", "db"):
        assert _restored(tmp_path, vault, line["recovery_point"], label, env) == \
            daemon.read(label)
    assert set(daemon.bitmaps("os")) == {_bm(tmp_path, line['recovery_point'])}
    assert first != line["recovery_point"]
    assert sorted(j["status"] for j in jobs_json_env(vault, env)) == [
        "interrupted", "succeeded", "succeeded"]
    assert not any((tmp_path / "qmp.sock.cbt").iterdir())


def _one_point_env(cfg: Path, env: dict[str, str]) -> dict[str, Any]:
    r, lines = backup_config(cfg, env=env)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert len(lines) == 1 and lines[0]["type"] == "point", lines
    return lines[0]


def jobs_json_env(vault: Path, env: dict[str, str] | None) -> list[dict[str, Any]]:
    if env is None:
        return jobs_json(vault)
    r = cbt("jobs", vault, "--json", env=env)
    assert r.returncode == 0, r.stderr
    return list(json.loads(r.stdout)["jobs"])


@pytest.mark.slow
def test_run_due_backs_up_a_qemu_vm(tmp_path: Path, daemon: Daemon) -> None:
    vault = tmp_path / "vault"
    init_cli_vault(vault, False, tmp_path)
    cfg = _config(tmp_path, daemon, schedule="daily 02:00", disks={"root": "os"})
    daemon.write("os", 4096, b"\x71" * 9000)
    code, _summary, lines, err = run_due(cfg, now="2026-11-30T03:00:00Z")
    assert code == 0, err
    assert [x["type"] for x in lines] == ["point"]
    point = lines[0]["recovery_point"]
    rec = json.loads(cbt("show", vault, point, "--json").stdout)
    assert [d["label"] for d in rec["disks"]] == ["root"]
    assert rec["disks"][0]["path"] == str(daemon.image("os"))
    assert _restored(tmp_path, vault, point, "root", None) == daemon.read("os")


def test_config_check_shows_a_qemu_vm(tmp_path: Path) -> None:
    cfg = tmp_path / "cbt.toml"
    cfg.write_text('vault = "v"\n[policy.p]\nschedule = "daily 02:00"\n'
                   '[vm.web]\npolicy = "p"\nqmp = "run/web.qmp"\nguest_agent = "run/web.qga"\n'
                   'disks = { os = "virtio0", db = "db-node" }\n'
                   '[vm.all]\npolicy = "p"\nqmp = "/run/all.qmp"\n')
    r = cbt("config", "check", cfg, "--json")
    assert r.returncode == 0, r.stderr
    vms = {vm["name"]: vm for vm in json.loads(r.stdout)["vms"]}
    assert all(set(vm) == CHECK_VM_KEYS for vm in vms.values())
    web = vms["web"]
    assert (web["qmp"], web["guest_agent"], web["nbd"]) == (
        str(tmp_path / "run/web.qmp"), str(tmp_path / "run/web.qga"), None)
    assert web["disks"] == [{"label": "os", "path": "virtio0", "snapshot": "qemu"},
                            {"label": "db", "path": "db-node", "snapshot": "qemu"}]
    assert vms["all"]["disks"] == [] and vms["all"]["qmp"] == "/run/all.qmp"
    text = cbt("config", "check", cfg).stdout
    assert f"qmp          {tmp_path / 'run/web.qmp'}" in text
    assert "os           qemu     virtio0" in text
    assert "(all)        qemu     every writable, non-removable disk of the VM" in text


@pytest.mark.parametrize(("vm", "line", "message"), [
    ('guest_agent = "/run/a.qga"', 6, "vm.web.guest_agent: needs qmp"),
    ('qmp = "/run/a.qmp"\nsnapshot = "copy"', 7, "vm.web.snapshot: not allowed with qmp"),
    ('qmp = "/run/a.qmp"\nsnapshot_dir = "s"', 7, "vm.web.snapshot_dir: not allowed with qmp"),
    ('qmp = 3', 6, "vm.web.qmp: must be a socket path"),
    ('qmp = ""', 6, "vm.web.qmp: must be a socket path"),
    ('qmp = "/q"\nnbd = ["x"]', 7, "vm.web.nbd: must be a socket path"),
    ('qmp = "/q"\ndisks = { os = "a b" }', 7, "vm.web.disks.os: 'a b' is not a block node"),
    ('qmp = "/q"\ndisks = { "b@d" = "os" }', 7, "vm.web.disks.b@d: invalid disk label"),
    ('qmp = "/q"\ndisks = { os = 1 }', 7, "vm.web.disks.os: must be a block node name"),
], ids=["agent-alone", "snapshot", "snapshot_dir", "qmp-type", "qmp-empty", "nbd-type",
        "node-name", "label", "node-type"])
def test_config_errors_of_the_qemu_keys(tmp_path: Path, vm: str, line: int,
                                        message: str) -> None:
    cfg = tmp_path / "cbt.toml"
    disks = "" if "qmp" in vm else 'disks = { os = "os.img" }\n'
    cfg.write_text(f'vault = "v"\n[policy.p]\nschedule = "daily 02:00"\n'
                   f'[vm.web]\npolicy = "p"\n{vm}\n{disks}')
    with pytest.raises(ConfigError) as err:
        load(cfg)
    assert str(err.value).startswith(f"{cfg}:{line}: {message}"), str(err.value)
    r = cbt("config", "check", cfg)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr


def test_a_missing_qmp_socket_fails_the_job_in_one_line(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "cbt.toml", {"p": {"schedule": "daily 02:00"}},
                       {VM: {"policy": "p", "qmp": "gone.qmp"}})
    Vault.init(tmp_path / "vault", encryption="none")
    res = run_vm(load(cfg), VM, JobRequest())
    assert res.point is None
    assert res.error == f"vm web: no QMP socket {tmp_path / 'gone.qmp'} (is the VM running?)"
    r, lines = backup_config(cfg)
    assert r.returncode != 0 and lines[0]["type"] == "error"
    assert "no QMP socket" in lines[0]["message"]
    assert not (tmp_path / "gone.qmp.cbt").exists()


@pytest.mark.slow
def test_a_blocked_guest_freeze_falls_back_or_fails_and_is_recorded(
        tmp_path: Path, daemon: Daemon) -> None:
    agent_dir = tmp_path / "ga"
    agent_dir.mkdir()
    with host_guest_agent(agent_dir) as ga:
        vault = Vault.init(tmp_path / "vault", encryption="none")
        cfg = _config(tmp_path, daemon, guest_agent=str(ga), hooks={"timeout": 10})
        res = run_vm(load(cfg), VM, JobRequest())
        assert res.point is not None, res.error
        assert res.point.consistency == "crash"
        reason = res.point.consistency_reason
        assert reason.startswith(f"guest agent freeze failed: guest agent {ga}: "
                                 "guest-fsfreeze-freeze: the agent refused: CommandNotFound")
        job = json.loads(cbt("jobs", vault.root, "--json").stdout)["jobs"][-1]
        assert [(h["phase"], h["ok"]) for h in job["hooks"]] == [
            ("guest-freeze", False), ("guest-thaw", False)]  # thaw always runs
        assert "guest-fsfreeze-thaw" in job["hooks"][1]["error"]

        cfg = _config(tmp_path, daemon, guest_agent=str(ga),
                      hooks={"timeout": 10, "on_pre_failure": "fail"})
        res = run_vm(load(cfg), VM, JobRequest())
        assert res.point is None
        assert res.error is not None and res.error.startswith("guest agent freeze failed")
        assert res.error.endswith('(on_pre_failure = "fail")')
        assert daemon.leftovers() == set()
        assert len(daemon.bitmaps("os")) == 1  # no new bitmap


def test_consistency_levels_of_a_qemu_vm(tmp_path: Path) -> None:
    def vm(hooks: str) -> Any:
        cfg = tmp_path / "c.toml"
        cfg.write_text('vault = "v"\n[policy.p]\nschedule = "daily 02:00"\n'
                       f'[vm.web]\npolicy = "p"\nqmp = "/q"\n{hooks}')
        return load(cfg).vms["web"]

    froze = AgentResult("guest-freeze", True, 2, 0.1)
    refused = AgentResult("guest-freeze", False, None, 0.1, "refused")
    assert qemu_consistency(vm(""), None, froze)[0] == "file-system"
    assert qemu_consistency(vm('[vm.web.hooks]\npost = ["true"]\n'), None, froze)[0] == \
        "file-system"
    app = vm('[vm.web.hooks]\nprovides = "application"\n')
    assert qemu_consistency(app, None, froze)[0] == "application"
    level, reason = qemu_consistency(app, None, refused)
    assert (level, reason.split(";")[0]) == ("crash", "guest agent freeze failed: refused")
    ok_pre = HookResult("pre", True, 0, False, "", 0.1)
    bad_pre = HookResult("pre", False, 3, False, "busy", 0.1)
    assert qemu_consistency(vm(""), ok_pre, None)[0] == "application"
    assert qemu_consistency(vm(""), ok_pre, froze) == (
        "application", "pre hook succeeded; guest agent freeze succeeded (2 file systems); "
        "every disk cut at one moment (one QMP transaction)")
    fs = vm('[vm.web.hooks]\nprovides = "file-system"\n')
    assert qemu_consistency(fs, ok_pre, froze)[0] == "file-system"
    assert qemu_consistency(fs, None, froze)[0] == "file-system"
    assert qemu_consistency(app, bad_pre, froze) == (
        "crash", "pre hook failed (exit 3): busy; "
        "every disk cut at one moment (one QMP transaction)")
    assert qemu_consistency(vm(""), None, None) == (
        "crash", "no hooks, no guest agent; every disk cut at one moment (one QMP transaction)")


@pytest.mark.slow
def test_an_nbd_server_qemu_already_runs(tmp_path: Path, daemon: Daemon) -> None:
    vault = Vault.init(tmp_path / "vault", encryption="none")
    theirs = tmp_path / "theirs.nbd"
    with QmpSession(daemon.qmp) as s:
        s.command("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(theirs)}}})
    cfg = _config(tmp_path, daemon)
    res = run_vm(load(cfg), VM, JobRequest())
    assert res.point is None and res.error is not None
    assert "already runs an NBD server" in res.error and "nbd" in res.error
    assert "\n" not in res.error
    assert daemon.leftovers() == set()
    daemon.write("db", 0, b"\x81" * 7000)
    cfg = _config(tmp_path, daemon, nbd=str(theirs))
    res = run_vm(load(cfg), VM, JobRequest())
    assert res.point is not None, res.error
    out = tmp_path / "db.raw"
    vault.restore(res.point.id, out, disk="db")
    assert out.read_bytes() == daemon.read("db")
    assert theirs.exists()  # their server still runs: cbt only added and removed exports
    assert daemon.leftovers() == set()


@pytest.mark.slow
def test_a_run_killed_at_each_durable_step_loses_no_change(tmp_path: Path,
                                                            daemon: Daemon) -> None:
    """SIGKILL at every durable step of an incremental run (before, during and after
    the transfer, after the point's commit before the bitmaps settle): the next run
    releases what it left, folds its bitmap back, and its point equals the guest."""
    vault = tmp_path / "vault"
    init_cli_vault(vault, False, tmp_path)
    cfg = _config(tmp_path, daemon, verify_fraction=0)
    daemon.write("os", 0, os.urandom(64 * KIB))
    one_point(cfg)
    step, killed = 1, 0
    while True:
        daemon.write("os", (step * 97 % 60) * 64 * KIB, os.urandom(3000))  # before the kill
        daemon.write("db", (step * 31 % 30) * 64 * KIB, os.urandom(3000))
        proc = start_cbt("backup", "--config", cfg, "--json", env=crash_env(step, tmp_path))
        proc.communicate(timeout=120)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, (step, proc.returncode)
        killed += 1
        daemon.write("os", (step * 13 % 60) * 64 * KIB + 100, os.urandom(2000))  # after it
        res = run_vm(load(cfg), VM, JobRequest())  # in this process: cheaper
        assert res.point is not None, (step, res.error)
        assert daemon.leftovers() == set(), step
        v = Vault.open(vault)
        for d in res.point.disks:
            assert d.change_source == "qemu-bitmap", (step, d)
            out = tmp_path / "restored"
            v.restore(res.point.id, out, disk=d.label)
            assert out.read_bytes() == daemon.read(d.label), (step, d.label)
            out.unlink()
        for node in ("os", "db"):
            assert set(daemon.bitmaps(node)) == {_bm(tmp_path, res.point.id)}, step
        step += 1
    assert killed >= 10


@pytest.mark.slow
def test_host_hooks_around_the_cut_give_application_consistency(tmp_path: Path,
                                                                 daemon: Daemon) -> None:
    state = tmp_path / "state"
    write_hook(state)
    Vault.init(tmp_path / "vault", encryption="none")
    cfg = _config(tmp_path, daemon, hooks={"pre": hook_argv(state), "post": hook_argv(state)})
    res = run_vm(load(cfg), VM, JobRequest())
    assert res.point is not None, res.error
    assert (res.point.consistency, res.point.consistency_reason) == (
        "application", "pre hook succeeded; every disk cut at one moment (one QMP transaction)")
    log = hook_log(state)
    assert [(e["phase"], e["point"]) for e in log] == [("pre", res.point.id),
                                                       ("post", res.point.id)]
    set_ctl(state, "pre", exit=4, stderr="no quiesce")
    res = run_vm(load(cfg), VM, JobRequest())
    assert res.point is not None, res.error
    assert res.point.consistency == "crash"
    assert res.point.consistency_reason.startswith("pre hook failed (exit 4): no quiesce")
    assert [e["phase"] for e in hook_log(state)][2:] == ["pre", "post"]


def test_a_qmp_socket_nobody_serves_fails_the_job_in_one_line(tmp_path: Path) -> None:
    import socket

    stale = tmp_path / "stale.qmp"  # what a QEMU that died leaves
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))
    cfg = write_config(tmp_path / "cbt.toml", {"p": {"schedule": "daily 02:00"}},
                       {VM: {"policy": "p", "qmp": str(stale)}})
    vault = Vault.init(tmp_path / "vault", encryption="none")
    res = run_vm(load(cfg), VM, JobRequest())
    assert res.point is None and res.error is not None
    assert res.error.startswith(f"{stale}: cannot connect to QMP: ") and "\n" not in res.error
    assert "refused" in res.error.lower()
    assert vault.point_ids() == []


@pytest.mark.slow
def test_the_text_table_fits_qemu_bitmap(tmp_path: Path, daemon: Daemon) -> None:
    """``qemu-bitmap`` (11 characters) in the source column: the columns stay aligned."""
    init_cli_vault(tmp_path / "vault", False, tmp_path)
    cfg = _config(tmp_path, daemon, disks={"os": "os"})
    assert cbt("backup", "--config", cfg).returncode == 0
    daemon.write("os", 0, b"\x01" * 5000)
    r = cbt("backup", "--config", cfg)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    head = next(x for x in lines if x.lstrip().startswith("disk "))
    row = next(x for x in lines if x.lstrip().startswith("os "))
    assert "qemu-bitmap" in row
    assert row.index("qemu-bitmap") == head.index("source")
    assert row.index("  qemu", row.index("qemu-bitmap") + 11) == head.index("  snapshot")


@pytest.mark.slow
def test_a_second_backup_of_the_vm_while_one_runs_fails_at_once(tmp_path: Path,
                                                                 daemon: Daemon) -> None:
    """The vault's writer lock: the second run fails at once naming the holder, and
    touches nothing of the first's in QEMU (its overlays, exports, bitmaps)."""
    import time

    state = tmp_path / "state"
    write_hook(state)
    vault = tmp_path / "vault"
    init_cli_vault(vault, False, tmp_path)
    cfg = _config(tmp_path, daemon, hooks={"post": hook_argv(state)}, disks={"os": "os"})
    set_ctl(state, "post", sleep=4)  # right after the cut: the first run holds its view
    first = start_cbt("backup", "--config", cfg, "--json")
    deadline = time.monotonic() + 60
    work = tmp_path / "qmp.sock.cbt"  # (QMP is the first run's: one client at a time)
    while not (work.exists() and any(work.glob("cbt-*.qcow2"))):  # its cut is made
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.05)
    held = sorted(work.iterdir())
    started = time.monotonic()
    r, lines = backup_config(cfg)
    assert time.monotonic() - started < 10
    assert r.returncode != 0 and lines and lines[0]["type"] == "error", (r.stdout, r.stderr)
    assert "lock" in lines[0]["message"] and str(first.pid) in lines[0]["message"], lines
    assert sorted(work.iterdir()) == held
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 0, out
    assert daemon.leftovers() == set()
