"""Jobs on an encrypted vault (issue 11): a job run from a config file opens the
vault with ``CBT_PASSWORD_FILE`` (or the passphrase its caller gives), records
its history sealed, prunes by its retention; ``run-due`` asks a passphrase
finder once; the daemon refuses a wrong passphrase before it starts; ``cbt
demo`` makes an encrypted vault, generating its passphrase into a 0600 file
unless the environment gives one.

Truth: copies of the disks taken at each job, the vault's files as listed by
``os``, the passphrase file as written.
"""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from helpers import KIB
from helpers.images import assert_same_bytes, copy_disk, scribble, write_random_disk
from helpers.jobs import write_config
from helpers.vaults import PASSWORD, fast_kdf

from cbt.api import Vault
from cbt.jobs.config import load
from cbt.jobs.demo import run_demo
from cbt.jobs.job import JobRequest
from cbt.jobs.retention import prune
from cbt.jobs.runner import run, run_vm
from cbt.jobs.scheduler import daemon, run_due
from cbt.ops.gc import gc
from cbt.ops.verify import verify
from cbt.repo.keys import ENV_FILE, ENV_PASSWORD, PassphraseRequiredError, WrongPassphraseError
from cbt.repo.registry import list_jobs

ENC = "aes-256-gcm"
VM = "zebravm"



@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv(ENV_FILE, raising=False)
    monkeypatch.delenv(ENV_PASSWORD, raising=False)
    return monkeypatch


def _setup(tmp_path: Path, vms: tuple[str, ...] = (VM,)) -> tuple[Path, Vault]:
    for i, vm in enumerate(vms):
        write_random_disk(tmp_path / "disks" / f"{vm}.img", 256 * KIB, seed=30 + i)
    cfg = write_config(tmp_path / "cbt.toml",
                       {"p": {"schedule": "daily 02:00", "retention": {"daily": 2}}},
                       {vm: {"policy": "p", "disks": {"os": f"disks/{vm}.img"},
                             "snapshot": "none"} for vm in vms})
    v = Vault.init(tmp_path / "vault", encryption=ENC, passphrase=PASSWORD, kdf=fast_kdf())
    return cfg, v


def _password_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    pw = tmp_path / "password"
    pw.write_text(PASSWORD + "\n")
    pw.chmod(0o600)
    monkeypatch.setenv(ENV_FILE, str(pw))
    return pw


def test_a_job_from_a_config_file_with_CBT_PASSWORD_FILE(tmp_path: Path,
                                                          no_env: pytest.MonkeyPatch) -> None:
    cfg, v = _setup(tmp_path)
    _password_file(tmp_path, no_env)
    disk = tmp_path / "disks" / f"{VM}.img"
    points, copies = [], []
    for day in range(3):
        if day:
            scribble(disk, seed=day)
        (result,) = run(cfg, workers=1, created=f"2026-05-0{day + 1}T03:00:00Z")
        assert result.error is None and result.point is not None
        points.append(result.point.id)
        copies.append(copy_disk(disk, tmp_path / "truth" / f"day{day}.img"))
    assert [p.id for p in v.points()] == points
    jobs = list_jobs(v, VM)
    assert [(j.status, j.recovery_point) for j in jobs] == [("succeeded", p) for p in points]
    listing = [str(p.relative_to(v.root)) for p in Path(v.root).rglob("*") if p.is_file()]
    assert [n for n in listing if n.startswith("jobs/")] and \
        all(n.endswith(".sealed") for n in listing if n.startswith(("jobs/", "points/")))
    assert not any(VM in n for n in listing)
    # the config's retention (daily = 2) prunes day 1, which the others are based on
    # (hidden, its record sealed again); gc frees what only it held
    res = prune(v, load(cfg), dt.datetime(2026, 5, 3, 12, tzinfo=dt.UTC))
    assert [x.keep for x in res.points] == [False, True, True] and res.warnings == []
    assert [p.id for p in v.points()] == points[1:]
    assert [r.id for r in v.records() if r.hidden] == points[:1]
    gc(v, grace=0.0)
    assert verify(v, data=True).problems == []
    for day, pid in list(enumerate(points))[1:]:
        v.restore(pid, tmp_path / f"r{day}")
        assert_same_bytes(tmp_path / f"r{day}" / "os.img", copies[day])


def test_the_passphrase_of_a_job_request_and_what_happens_without_one(
        tmp_path: Path, no_env: pytest.MonkeyPatch) -> None:
    cfg, v = _setup(tmp_path)
    config = load(cfg)
    with pytest.raises(PassphraseRequiredError, match="no passphrase was given"):
        run_vm(config, VM, JobRequest(workers=1))
    with pytest.raises(WrongPassphraseError, match="wrong passphrase"):
        run_vm(config, VM, JobRequest(workers=1, passphrase="not it"))
    assert list_jobs(v) == [] and v.points() == []  # nothing was touched
    result = run_vm(config, VM, JobRequest(workers=1, passphrase=PASSWORD))
    assert result.point is not None and [p.id for p in v.points()] == [result.point.id]


def test_run_due_asks_a_passphrase_finder_once(tmp_path: Path,
                                               no_env: pytest.MonkeyPatch) -> None:
    cfg, v = _setup(tmp_path, (VM, "zebrasecond"))
    asked: list[int] = []

    def finder() -> bytes:
        asked.append(1)
        return PASSWORD.encode()

    summary = run_due(load(cfg), dt.datetime(2026, 5, 4, 3, tzinfo=dt.UTC),
                      JobRequest(workers=1, passphrase=finder))
    assert summary.ok and sorted(r.vm for r in summary.ran) == sorted([VM, "zebrasecond"])
    assert len(asked) == 1  # due() and both jobs opened the vault
    assert len(v.points()) == 2


def test_the_daemon_refuses_a_wrong_passphrase_before_it_starts(
        tmp_path: Path, no_env: pytest.MonkeyPatch) -> None:
    cfg, v = _setup(tmp_path)
    logged: list[str] = []
    with pytest.raises(WrongPassphraseError):
        daemon(load(cfg), lambda level, text: logged.append(text), workers=1,
               passphrase="not it")
    assert logged == [] and v.points() == []


def test_a_job_refused_its_passphrase_touches_nothing(tmp_path: Path,
                                                      no_env: pytest.MonkeyPatch) -> None:
    """Before any backup: the vault's files are the same after a refused job."""
    cfg, v = _setup(tmp_path)
    before = sorted((str(p), p.read_bytes()) for p in Path(v.root).rglob("*") if p.is_file())
    for passphrase in (None, "not it"):
        with pytest.raises((PassphraseRequiredError, WrongPassphraseError)):
            run(cfg, workers=1, passphrase=passphrase)
    after = sorted((str(p), p.read_bytes()) for p in Path(v.root).rglob("*") if p.is_file())
    assert after == before


# -- the demo ------------------------------------------------------------------------------

DEMO_KEYS = {"dir", "vault", "config", "password_file", "days", "restored",
             "restore_bit_identical", "diff", "diff_truth_changed_blocks", "agrees_with_truth",
             "seconds", "warnings", "snapshot_reason", "bytes_on_disk", "vault_bytes_on_disk",
             "remove_command"}


def test_the_demo_generates_its_passphrase_into_a_private_file(
        tmp_path: Path, no_env: pytest.MonkeyPatch) -> None:
    d = tmp_path / "demo"
    report = run_demo(d, size=8 << 20, kdf=fast_kdf())
    assert report.agrees_with_truth, report.to_dict()
    out = report.to_dict()
    assert set(out) == DEMO_KEYS
    pw = Path(out["password_file"])
    assert pw.parent == d and stat.S_IMODE(pw.stat().st_mode) == 0o600
    secret = pw.read_text().splitlines()[0]
    assert len(secret) >= 24
    assert Vault.is_encrypted(Vault.open(d / "vault", secret).storage)
    commands = report.suggested_commands()
    vault_commands = [c for c in commands if str(d / "vault") in c]
    assert vault_commands and all(c.startswith(f"{ENV_FILE}={pw} cbt ") for c in vault_commands)
    with pytest.raises(WrongPassphraseError):
        Vault.open(d / "vault", "not it")


def test_the_demo_uses_the_passphrase_of_the_environment(
        tmp_path: Path, no_env: pytest.MonkeyPatch) -> None:
    no_env.setenv(ENV_PASSWORD, PASSWORD)
    d = tmp_path / "demo"
    report = run_demo(d, size=8 << 20, kdf=fast_kdf())
    assert report.agrees_with_truth
    assert report.password_file is None and not (d / "password").exists()
    assert all(not c.startswith(ENV_FILE) for c in report.suggested_commands())
    no_env.delenv(ENV_PASSWORD)
    assert Vault.open(d / "vault", PASSWORD).encrypted
