"""Input edges (issue 12): every size, count and time a command takes has bounds and a
one-line error (exit 2, nothing created); point ids sort by time; a closed stdout ends
a command quietly (exit 141); a vault location with an unknown scheme is refused; a
killed restore's temporary file is removed by the next restore into that directory.

Every command runs as a real ``cbt`` process.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helpers import MIB
from helpers.cli import (
    backup_cli,
    cbt,
    cbt_argv,
    clean_env,
    crash_env,
    one_error_line,
    run_in_session,
)
from helpers.images import assert_same_bytes, write_random_disk
from helpers.vaults import PASSWORD, encrypted_env, listed_ids

HUGE = "99999999999999999999999"


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A plain vault ``vault`` with one point of VM ``web`` (disks os, db), and the disks."""
    write_random_disk(tmp_path / "os.img", 2 * MIB + 5000, seed=1)
    write_random_disk(tmp_path / "db.img", 1 * MIB, seed=2)
    assert cbt("init", tmp_path / "vault", "--encryption", "none").returncode == 0
    backup_cli(tmp_path / "vault", "web", f"os={tmp_path / 'os.img'}",
               f"db={tmp_path / 'db.img'}", "--block-size", "64K",
               now="2026-01-02T03:04:05Z")
    return tmp_path


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# -- sizes and counts ----------------------------------------------------------------------

BAD_OPTIONS = [
    ("scan", "{os}", "--block-size", HUGE),
    ("scan", "{os}", "--block-size", f"{HUGE}K"),
    ("scan", "{os}", "--block-size", "3K"),
    ("scan", "{os}", "--workers", HUGE),
    ("scan", "{os}", "--workers", "0"),
    ("diff", "{os}", "{db}", "--block-size", HUGE),
    ("diff", "{os}", "{db}", "--workers", "100000"),
    ("backup", "{vault}", "--vm", "web", "{os}", "--block-size", HUGE),
    ("backup", "{vault}", "--vm", "web", "{os}", "--block-size", "8M"),
    ("backup", "{vault}", "--vm", "web", "{os}", "--workers", HUGE),
    ("backup", "{vault}", "--vm", "web", "{os}", "--wait", "nan"),
    ("backup", "{vault}", "--vm", "web", "{os}", "--wait", "inf"),
    ("backup", "{vault}", "--vm", "web", "{os}", "--wait", "-1"),
    ("restore", "{vault}", "web.latest", "--to", "{out}", "--workers", HUGE),
    ("gc", "{vault}", "--grace", "nan"),
    ("gc", "{vault}", "--grace", "-5"),
    ("gc", "{vault}", "--wait", "1e400"),
    ("init", "{new}", "--kdf-log-n", HUGE),
    ("demo", "--dir", "{new}", "--size", f"{HUGE}T"),
    ("demo", "--dir", "{new}", "--size", "0"),
]


@pytest.mark.parametrize("argv", BAD_OPTIONS, ids=lambda a: " ".join(a[:1] + a[-2:]))
def test_out_of_range_options_are_one_line_exit_2(site: Path, argv: tuple[str, ...]) -> None:
    before = _tree(site)
    paths = {"os": site / "os.img", "db": site / "db.img", "vault": site / "vault",
             "out": site / "out", "new": site / "new"}
    r = cbt(*(a.format(**paths) for a in argv), "--json")
    msg = one_error_line(r)
    assert argv[-2] in msg, msg  # names the option
    assert "Traceback" not in r.stderr
    assert _tree(site) == before  # nothing created, nothing written


# -- times -------------------------------------------------------------------------------

BAD_TIMES = ["0999-01-01T00:00:00Z", "1969-12-31T23:59:59Z", "0001-01-01T00:00:00+01:00",
             "9999-12-31T23:00:00-05:00", "10000-01-01T00:00:00Z", "1970-01-01T00:00:00"]


@pytest.mark.parametrize("when", BAD_TIMES)
def test_now_outside_1970_to_9999_is_refused(site: Path, when: str) -> None:
    before = _tree(site)
    msg = one_error_line(cbt("backup", site / "vault", "--vm", "web", f"os={site / 'os.img'}",
                             "--now", when))
    assert "--now" in msg and when in msg, msg
    assert _tree(site) == before
    assert listed_ids(site / "vault") == ["web.20260102T030405Z"]


@pytest.mark.parametrize("command", ["prune", "run-due"])
def test_now_is_checked_by_every_command_taking_it(site: Path, command: str) -> None:
    cfg = site / "cbt.toml"
    cfg.write_text('vault = "vault"\n[policy.p]\nschedule = "daily 02:00"\n'
                   '[vm.web]\npolicy = "p"\ndisks = { os = "os.img" }\n')
    msg = one_error_line(cbt(command, "--config", cfg, "--now", "0999-01-01T00:00:00Z"))
    assert "--now" in msg and "1970" in msg, msg


def test_point_ids_sort_by_time(site: Path) -> None:
    """The earliest and latest times a point may have: ids (4-digit years) sort by time,
    ``latest`` is the newest."""
    vault = site / "vault"
    os_disk = f"os={site / 'os.img'}"
    backup_cli(vault, "web", os_disk, now="9999-12-31T23:59:59Z")
    backup_cli(vault, "web", os_disk, now="1970-01-01T00:00:00Z")
    ids = listed_ids(vault, "web")
    assert ids == ["web.19700101T000000Z", "web.20260102T030405Z", "web.99991231T235959Z"]
    assert sorted(ids) == ids
    r = cbt("show", vault, "web.latest", "--json")
    assert r.returncode == 0 and '"web.99991231T235959Z"' in r.stdout


def test_api_refuses_a_point_time_before_1970(tmp_path: Path) -> None:
    from cbt.api import Vault
    from cbt.core.errors import CbtValueError

    write_random_disk(tmp_path / "d.img", 64 * 1024, seed=3)
    v = Vault.init(tmp_path / "vault")
    before = sorted(p.name for p in (tmp_path / "vault").rglob("*"))
    with pytest.raises(CbtValueError, match="from 1970 to 9999"):
        v.backup("web", [str(tmp_path / "d.img")], created="1969-07-20T20:17:00Z")
    with pytest.raises(CbtValueError, match="not a point time"):
        v.backup("web", [str(tmp_path / "d.img")], created="999-07-20T20:17:00Z")
    assert v.point_ids() == []
    assert sorted(p.name for p in (tmp_path / "vault").rglob("*")) == before  # no pack


# -- numbers in config files ---------------------------------------------------------------

CONFIG = """\
vault = "vault"
[policy.p]
schedule = "daily 02:00"
retention = { daily = 7 }
[vm.web]
policy = "p"
disks = { os = "os.img" }
block_size = "64K"
[vm.web.hooks]
pre = ["/bin/true"]
timeout = 30
"""
BAD_CONFIG = [("timeout = 30", "timeout = nan", "vm.web.hooks.timeout"),
              ("timeout = 30", "timeout = inf", "vm.web.hooks.timeout"),
              ("timeout = 30", "timeout = -inf", "vm.web.hooks.timeout"),
              ("timeout = 30", "timeout = -1", "vm.web.hooks.timeout"),
              ("timeout = 30", "timeout = 0.0", "vm.web.hooks.timeout"),
              ("timeout = 30", "timeout = 1e300", "vm.web.hooks.timeout"),
              ("timeout = 30", f"timeout = {HUGE}", "vm.web.hooks.timeout"),
              ('block_size = "64K"', f"block_size = {HUGE}", "vm.web.block_size"),
              ('block_size = "64K"', f'block_size = "{HUGE}K"', "vm.web.block_size"),
              ('block_size = "64K"', "block_size = 9223372036854775807", "vm.web.block_size"),
              ("daily = 7", f"daily = {HUGE}", "policy.p.retention.daily"),
              ("daily = 7", "daily = 9223372036854775807", "policy.p.retention.daily")]


@pytest.mark.parametrize(("old", "new", "key"), BAD_CONFIG, ids=lambda v: str(v))
def test_config_numbers_out_of_range(tmp_path: Path, old: str, new: str, key: str) -> None:
    """``config check`` names the file, the line and the dotted key; so does a job."""
    text = CONFIG.replace(old, new)
    line = next(no for no, ln in enumerate(text.splitlines(), 1) if new in ln)
    cfg = tmp_path / "cbt.toml"
    cfg.write_text(text)
    for argv in (("config", "check", cfg), ("backup", "--config", cfg)):
        r = cbt(*argv)
        msg = one_error_line(r)
        assert f"{cfg}:{line}: {key}: " in msg, msg
        assert "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cbt.toml"]


def test_config_hook_timeout_in_range_is_kept(tmp_path: Path) -> None:
    cfg = tmp_path / "cbt.toml"
    cfg.write_text(CONFIG.replace("timeout = 30", "timeout = 86400"))
    r = cbt("config", "check", cfg)
    assert r.returncode == 0, r.stderr


# -- a closed stdout -------------------------------------------------------------------------

PIPED = [("list", "{vault}", "--json"), ("list", "{vault}"), ("show", "{vault}", "web.latest"),
         ("show", "{vault}", "web.latest", "--json"), ("diff", "{os}", "{db}", "--ranges"),
         ("diff", "{os}", "{db}", "--json"), ("scan", "{os}", "--json"), ("jobs", "{vault}"),
         ("verify", "{vault}", "--json")]


@pytest.mark.parametrize("argv", PIPED, ids=" ".join)
def test_a_closed_stdout_ends_quietly(site: Path, argv: tuple[str, ...]) -> None:
    """stdout is a pipe whose reader is gone before cbt writes (``cbt ... | head`` once
    head has exited): no traceback, no message, exit 141."""
    paths = {"os": site / "os.img", "db": site / "db.img", "vault": site / "vault"}
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        r = subprocess.run(cbt_argv(*(a.format(**paths) for a in argv)), stdout=write_end,
                           stderr=subprocess.PIPE, text=True, env=clean_env(), timeout=120,
                           check=False)
    finally:
        os.close(write_end)
    assert r.stderr == "", r.stderr
    assert r.returncode == 141, r.returncode


# -- vault locations ------------------------------------------------------------------------

SCHEMES = ["http://example.com/vault", "foo://", "S3://b", "s3://Bucket/x", "s3://bucket/../x"]
VAULT_COMMANDS = [("init", "{v}", "--encryption", "none"), ("init", "{v}"),
                  ("backup", "{v}", "--vm", "web", "{os}"), ("list", "{v}"),
                  ("show", "{v}", "web.latest"), ("restore", "{v}", "web.latest", "--to", "out"),
                  ("verify", "{v}"), ("gc", "{v}"), ("jobs", "{v}"), ("key", "list", "{v}")]


@pytest.mark.parametrize("location", SCHEMES)
@pytest.mark.parametrize("argv", VAULT_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_unknown_vault_scheme_or_bad_s3_location_is_refused(tmp_path: Path, location: str,
                                                            argv: tuple[str, ...]) -> None:
    """An unknown scheme, or an s3:// location whose bucket or prefix is not valid: one
    line naming it (no request sent: the bucket name is checked first), nothing made."""
    (tmp_path / "os.img").write_bytes(b"\1" * 8192)
    before = _tree(tmp_path)
    r = cbt(*(a.format(v=location, os=tmp_path / "os.img") for a in argv), "--json",
            env={"CBT_PASSWORD": PASSWORD, **NO_AWS}, cwd=tmp_path)
    msg = one_error_line(r)
    assert location in msg, msg
    assert ("scheme" in msg) != location.lower().startswith("s3://"), msg
    assert location.lower().startswith("s3://") <= ("bucket" in msg or "name" in msg), msg
    assert _tree(tmp_path) == before  # no folder named s3: or http:


# an S3 endpoint nobody answers at (a request, if one were sent, would fail at once)
NO_AWS = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x",
          "AWS_SECRET_ACCESS_KEY": "y", "AWS_EC2_METADATA_DISABLED": "true"}


def test_unknown_vault_scheme_in_a_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "cbt.toml"
    cfg.write_text('vault = "ftp://bucket/x"\n[policy.p]\nschedule = "daily 02:00"\n'
                   '[vm.web]\npolicy = "p"\ndisks = { os = "os.img" }\n')
    (tmp_path / "os.img").write_bytes(b"\1" * 8192)
    for argv in (("config", "check", cfg), ("backup", "--config", cfg), ("prune", "--config", cfg)):
        msg = one_error_line(cbt(*argv, cwd=tmp_path))
        assert f"{cfg}:1: vault:" in msg and "ftp://bucket/x" in msg, msg
    assert _tree(tmp_path) == ["cbt.toml", "os.img"]


def test_a_config_file_keeps_an_s3_vault_as_it_is(tmp_path: Path) -> None:
    """``vault = "s3://..."`` is not resolved against the file's folder."""
    from cbt.jobs.config import load

    cfg = tmp_path / "cbt.toml"
    cfg.write_text('vault = "s3://bucket/x/y"\n[policy.p]\nschedule = "daily 02:00"\n'
                   '[vm.web]\npolicy = "p"\ndisks = { os = "os.img" }\n')
    assert load(cfg).vault == "s3://bucket/x/y"
    r = cbt("config", "check", cfg, "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert '"vault":"s3://bucket/x/y"' in r.stdout, r.stdout


def test_api_refuses_an_unknown_scheme(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                       ) -> None:
    from cbt.api import Vault
    from cbt.core.errors import CbtValueError

    monkeypatch.chdir(tmp_path)
    for location in ("gs://bucket/x", "s3://B/x"):
        with pytest.raises(CbtValueError, match=r"scheme|bucket"):
            Vault.init(location)
        with pytest.raises(CbtValueError, match=r"scheme|bucket"):
            Vault.open(location)
    assert list(tmp_path.iterdir()) == []


# -- a killed restore's leftovers ---------------------------------------------------------


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_restore_removes_a_dead_restores_temp_files_only(site: Path) -> None:
    out = site / "out"
    out.mkdir()
    dead, dead2 = _dead_pid(), _dead_pid()
    stale = out / f".os.img.tmp-{dead}"
    stale.write_bytes(b"half a disk")
    other_label = out / f".data.img.tmp-{dead2}"  # a label this point does not have
    other_label.write_bytes(b"x")
    keep = {
        out / f".os.img.tmp-{os.getpid()}": b"a live process's",
        out / f".db.img.tmp-{dead}.bak": b"not our name",
        out / f"os.img.tmp-{dead}": b"not hidden: not our name",
        out / f".os.iso.tmp-{dead}": b"not an image name",
        out / f".os.img.tmp-0{dead}": b"not a pid as cbt writes it",
    }
    for path, data in keep.items():
        path.write_bytes(data)
    victim = site / "victim"
    victim.write_bytes(b"must stay")
    link = out / f".db.img.tmp-{dead2}"
    link.symlink_to(victim)
    a_dir = out / f".os.img.tmp-{dead2}"
    a_dir.mkdir()
    r = cbt("restore", site / "vault", "web.latest", "--to", out, "--json")
    assert r.returncode == 0, r.stderr
    assert not stale.exists() and not other_label.exists()
    for path, data in keep.items():
        assert path.read_bytes() == data
    assert link.is_symlink() and victim.read_bytes() == b"must stay"
    assert a_dir.is_dir()
    assert str(stale) in r.stdout  # a warning names each file removed
    assert_same_bytes(out / "os.img", site / "os.img")
    assert_same_bytes(out / "db.img", site / "db.img")


def test_restore_after_a_killed_restore(site: Path) -> None:
    """A restore SIGKILLed after writing its temporary file, before the rename: the
    next restore into that directory removes the file and restores."""
    out = site / "out"
    r = run_in_session("restore", site / "vault", "web.latest", "--to", out,
                       env=crash_env(1, site))
    assert r.returncode == -9, (r.returncode, r.stderr)
    left = sorted(p.name for p in out.iterdir())
    assert left and all(n.startswith((".os.img.tmp-", ".db.img.tmp-")) for n in left), left
    r = cbt("restore", site / "vault", "web.latest", "--to", out)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["db.img", "os.img"]
    assert_same_bytes(out / "os.img", site / "os.img")


def test_one_disk_restore_removes_only_its_own_temp_name(site: Path) -> None:
    """``--disk os --to FILE``: beside FILE only ``.FILE.tmp-PID`` of a dead PID goes."""
    dead = _dead_pid()
    target = site / "restored.raw"
    mine = site / f".restored.raw.tmp-{dead}"
    mine.write_bytes(b"x")
    other = site / f".os.img.tmp-{dead}"  # not this target's: another directory's business
    other.write_bytes(b"y")
    r = cbt("restore", site / "vault", "web.latest", "--disk", "os", "--to", target)
    assert r.returncode == 0, r.stderr
    assert not mine.exists() and other.read_bytes() == b"y"
    assert_same_bytes(target, site / "os.img")


def test_encrypted_vault_restore_removes_temp_files(tmp_path: Path) -> None:
    env = encrypted_env(tmp_path)
    write_random_disk(tmp_path / "os.img", 1 * MIB, seed=5)
    assert cbt("init", tmp_path / "vault", "--kdf-log-n", "10", env=env).returncode == 0
    backup_cli(tmp_path / "vault", "web", f"os={tmp_path / 'os.img'}", env=env)
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".os.img.tmp-{_dead_pid()}"
    stale.write_bytes(b"z")
    r = cbt("restore", tmp_path / "vault", "web.latest", "--to", out, env=env)
    assert r.returncode == 0, r.stderr
    assert not stale.exists()
    assert_same_bytes(out / "os.img", tmp_path / "os.img")


def test_instant_restore_removes_temp_files_too(site: Path) -> None:
    """``--instant`` (here from the vault: the point kept no snapshot) cleans up as well."""
    out = site / "out"
    out.mkdir()
    stale = out / f".db.img.tmp-{_dead_pid()}"
    stale.write_bytes(b"z")
    r = cbt("restore", site / "vault", "web.latest", "--to", out, "--instant")
    assert r.returncode == 0, r.stderr
    assert not stale.exists()
    assert str(stale) in r.stderr  # the warning names it
    assert_same_bytes(out / "db.img", site / "db.img")


@pytest.mark.parametrize("where", ["s3://bucket/x", "host:demo"])
def test_demo_refuses_a_directory_that_is_not_local(tmp_path: Path, where: str) -> None:
    """The demo's vault, disks and hooks are made in --dir: an s3:// location (or another
    host's) is one line, and no folder named s3: is made."""
    msg = one_error_line(cbt("demo", "--dir", where, "--size", "1M", cwd=tmp_path))
    assert where in msg and "local directory" in msg, msg
    assert list(tmp_path.iterdir()) == []
