"""Input edges found by the review of issue 12's part C: a command started with stdout or
stderr closed (``>&-``, ``2>&-``, as cron and daemons can) runs as with ``/dev/null`` there
and keeps its exit codes; a vault location that reads as another host's (``host:path``,
``s3:bucket``: a ``:`` before the first ``/``) is refused, ``./host:path`` is local.

Every command runs as a real ``cbt`` process; the streams are closed by ``sh``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from helpers import MIB
from helpers.cli import backup_cli, cbt, cbt_argv, clean_env, crash_env, one_error_line
from helpers.images import assert_same_bytes, write_random_disk
from helpers.system import need_root_tools


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A plain vault ``vault`` with one point of VM ``web`` (disk os), and the disk."""
    write_random_disk(tmp_path / "os.img", 1 * MIB + 5000, seed=3)
    assert cbt("init", tmp_path / "vault", "--encryption", "none").returncode == 0
    backup_cli(tmp_path / "vault", "web", f"os={tmp_path / 'os.img'}", "--block-size", "64K")
    return tmp_path


def _closed(redirect: str, *args: object) -> subprocess.CompletedProcess[str]:
    """``cbt ARGS... REDIRECT`` (``>&-`` or ``2>&-``) run by sh; the other stream captured."""
    return subprocess.run(["sh", "-c", f'exec "$@" {redirect}', "sh", *cbt_argv(*args)],
                          capture_output=True, text=True, env=clean_env(), timeout=120,
                          check=False)


# -- stdout closed ---------------------------------------------------------------------------

CLOSED_STDOUT = [("list", "{vault}"), ("list", "{vault}", "--json"),
                 ("show", "{vault}", "web.latest", "--json"), ("verify", "{vault}", "--json"),
                 ("verify", "{vault}"), ("jobs", "{vault}", "--json"),
                 ("scan", "{os}", "--json"), ("diff", "{os}", "{os}"),
                 ("gc", "{vault}", "--dry-run", "--json"), ("--help",)]


@pytest.mark.parametrize("argv", CLOSED_STDOUT, ids=" ".join)
def test_a_closed_stdout_is_as_dev_null(site: Path, argv: tuple[str, ...]) -> None:
    paths = {"os": site / "os.img", "vault": site / "vault"}
    r = _closed(">&-", *(a.format(**paths) for a in argv))
    assert r.stderr == "", r.stderr
    assert r.returncode == 0, r.returncode


def test_restore_and_backup_with_stdout_closed_do_their_work(site: Path) -> None:
    out = site / "out"
    r = _closed(">&-", "restore", site / "vault", "web.latest", "--to", out, "--json")
    assert (r.returncode, r.stderr) == (0, "")
    assert_same_bytes(out / "os.img", site / "os.img")
    r = _closed(">&-", "backup", site / "vault", "--vm", "web", f"os={site / 'os.img'}",
                "--json")
    assert (r.returncode, r.stderr) == (0, "")
    points = json.loads(cbt("list", site / "vault", "--json").stdout)["points"]
    assert len(points) == 2


def test_an_error_with_stdout_closed_is_still_one_line_exit_2(site: Path) -> None:
    r = _closed(">&-", "list", site / "missing", "--json")
    one_error_line(r)


# -- stderr closed ---------------------------------------------------------------------------

def test_an_error_with_stderr_closed_still_exits_2(site: Path) -> None:
    for argv in (("list", site / "missing"), ("restore", site / "vault", "nope", "--to",
                                              site / "out"),
                 ("backup", site / "vault", "--vm", "web", site / "absent.img"),
                 ("scan", site / "os.img", "--block-size", "3K")):
        r = _closed("2>&-", *argv)
        assert r.returncode == 2, (argv, r.returncode, r.stdout)
        assert "Traceback" not in r.stdout
    assert not (site / "out").exists()


def test_warnings_with_stderr_closed_do_not_fail_a_command(site: Path) -> None:
    """``verify`` of a vault with a problem writes its problems to stderr: still exit 2
    (a problem), never 1 (a crash)."""
    pack = next((site / "vault" / "packs").rglob("*.pack"))
    data = bytearray(pack.read_bytes())
    data[100] ^= 0xFF
    pack.write_bytes(bytes(data))
    r = _closed("2>&-", "verify", site / "vault", "--data")
    assert r.returncode == 2, (r.returncode, r.stdout)
    assert "Traceback" not in r.stdout


# -- vault locations -------------------------------------------------------------------------

REMOTE_LOOKING = ["s3:bucket/x", "sftp:host:/srv/vault", "backup-host:vaults/web",
                  "user@host:vault", "C:\\vault", "s3:/x", "1s3://x"]


@pytest.mark.parametrize("location", REMOTE_LOOKING)
@pytest.mark.parametrize("command", ["init", "list"])
def test_a_location_with_a_colon_before_its_first_slash_is_refused(
        tmp_path: Path, location: str, command: str) -> None:
    args = ("init", location, "--encryption", "none") if command == "init" else (
        "list", location)
    r = cbt(*args, cwd=tmp_path)
    msg = one_error_line(r)
    assert location in msg and f"./{location}" in msg, msg
    assert list(tmp_path.iterdir()) == []


def test_a_local_path_with_a_colon_is_named_so(tmp_path: Path) -> None:
    """``./a:b`` and ``/abs/a:b`` are local directories, kept as they are."""
    assert cbt("init", "./web:2026", "--encryption", "none", cwd=tmp_path).returncode == 0
    assert (tmp_path / "web:2026" / "config").is_file()
    assert cbt("list", "./web:2026", cwd=tmp_path).returncode == 0
    absolute = tmp_path / "x:y"
    assert cbt("init", absolute, "--encryption", "none").returncode == 0
    assert cbt("list", absolute).returncode == 0


def test_config_and_api_refuse_a_remote_looking_location(tmp_path: Path) -> None:
    from cbt.api import Vault
    from cbt.core.errors import CbtValueError

    cfg = tmp_path / "cbt.toml"
    cfg.write_text('vault = "backup-host:vaults/web"\n[policy.p]\nschedule = "daily 02:00"\n'
                   '[vm.web]\npolicy = "p"\ndisks = { os = "os.img" }\n')
    msg = one_error_line(cbt("config", "check", cfg, cwd=tmp_path))
    assert f"{cfg}:1: vault:" in msg, msg
    with pytest.raises(CbtValueError, match="host:"):
        Vault.init("backup-host:vaults/web")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cbt.toml"]


# -- what killed restores left ---------------------------------------------------------------

def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_a_temp_file_a_live_restore_holds_is_kept(site: Path) -> None:
    """A restore whose process this one cannot see (another PID namespace: a container;
    another host on a shared directory) holds its temporary file locked: the name's PID
    is no process here, yet the file stays."""
    import fcntl

    out = site / "out"
    out.mkdir()
    live = out / f".os.img.tmp-{_dead_pid()}"
    live.write_bytes(b"a live restore's half disk")
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        r = cbt("restore", site / "vault", "web.latest", "--to", out)
        assert r.returncode == 0, r.stderr
        assert live.read_bytes() == b"a live restore's half disk"
    finally:
        os.close(fd)
    assert_same_bytes(out / "os.img", site / "os.img")


def test_a_temp_file_under_this_processs_pid_left_by_a_dead_one(site: Path) -> None:
    """In a container every run can have the same PID: a killed restore's
    ``.os.img.tmp-PID`` has this restore's PID, and is removed (was: 'File exists' on every
    later restore)."""
    from cbt.api import Vault
    from cbt.ops.restore import RestoreRequest, restore

    out = site / "out"
    out.mkdir()
    stale = out / f".os.img.tmp-{os.getpid()}"
    stale.write_bytes(b"half a disk")
    result = restore(Vault.open(site / "vault"), RestoreRequest("web.latest", out))
    assert any(str(stale) in w for w in result.warnings), result.warnings
    assert sorted(p.name for p in out.iterdir()) == ["os.img"]
    assert_same_bytes(out / "os.img", site / "os.img")


def test_a_container_restore_after_a_killed_one(site: Path) -> None:
    """The same, for real: each ``cbt restore`` is PID 2 of a new PID namespace (its
    shell is PID 1)."""
    need_root_tools("unshare")
    out = site / "out"
    argv = ["unshare", "--pid", "--fork", "--kill-child", "sh", "-c", '"$@"; exit $?', "sh",
            *cbt_argv("restore", site / "vault", "web.latest", "--to", out)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False,
                       env=clean_env(crash_env(1, site)), start_new_session=True)
    assert r.returncode != 0
    assert [p.name for p in out.iterdir()] == [".os.img.tmp-2"], r.stderr
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False,
                       env=clean_env())
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["os.img"]
    assert_same_bytes(out / "os.img", site / "os.img")


def test_a_target_made_meanwhile_is_not_replaced_without_force(site: Path) -> None:
    """Two restores into one directory: the target is checked when the restore starts,
    and another restore can commit the same name before this one's rename; without
    ``--force`` this one then fails and the other's file stays (was: silently replaced)."""
    from cbt.api import Vault
    from cbt.core.errors import CbtError
    from cbt.ops.restore import RestoreRequest, restore

    out = site / "out"
    theirs = b"another restore's disk"

    def meanwhile(done: int, total: int) -> None:
        if not (out / "os.img").exists():
            (out / "os.img").write_bytes(theirs)

    with pytest.raises(CbtError, match="exists"):
        restore(Vault.open(site / "vault"),
                RestoreRequest("web.latest", out, progress=meanwhile))
    assert (out / "os.img").read_bytes() == theirs
    assert sorted(p.name for p in out.iterdir()) == ["os.img"]  # no temporary file left
    restore(Vault.open(site / "vault"), RestoreRequest("web.latest", out, force=True))
    assert_same_bytes(out / "os.img", site / "os.img")


# -- times at the ends of the range -------------------------------------------------------

@pytest.mark.parametrize("timezone", ["UTC", "Pacific/Kiritimati", "Pacific/Pago_Pago"])
@pytest.mark.parametrize("now", ["9999-12-31T23:59:59Z", "9999-12-31T01:59:00Z",
                                 "1970-01-01T00:00:00Z"])
def test_run_due_at_the_ends_of_time(site: Path, timezone: str, now: str) -> None:
    """``run-due --now`` takes every time a point may carry (was: 9999-12-31 at any hour
    an OverflowError traceback, exit 1): the slot due then runs."""
    cfg = site / "cbt.toml"
    cfg.write_text(f'vault = "{site / "vault"}"\n[policy.p]\nschedule = "daily 00:30"\n'
                   f'timezone = "{timezone}"\n[vm.web]\npolicy = "p"\n'
                   f'disks = {{ os = "{site / "os.img"}" }}\n')
    r = cbt("run-due", "--config", cfg, "--now", now, "--json")
    assert r.returncode == 0, r.stderr
    points = json.loads(cbt("list", site / "vault", "--json").stdout)["points"]
    assert now[:19] + "Z" in [p["created"] for p in points]


@pytest.mark.parametrize("now", ["9999-12-31T00:00:00Z", "9999-12-30T12:00:00Z"])
def test_demo_whose_third_day_is_past_9999_is_refused(tmp_path: Path, now: str) -> None:
    """The demo's days 2 and 3 follow ``--now`` a day apart: a day past 9999-12-31 is
    one error line before anything is made (was: a traceback, its vault half made)."""
    msg = one_error_line(cbt("demo", "--dir", tmp_path / "d", "--size", "1M", "--now", now))
    assert "9999" in msg, msg
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("command", ["init", "list", "gc"])
def test_an_empty_vault_location_is_refused(tmp_path: Path, command: str) -> None:
    """``cbt init "$VAULT"`` with VAULT unset: an error (was: a vault made in the current
    directory, and every later command on it)."""
    r = cbt(command, "", *(("--encryption", "none") if command == "init" else ()),
            cwd=tmp_path)
    assert "empty" in one_error_line(r)
    assert list(tmp_path.iterdir()) == []
