"""The systemd units in contrib/ (issue 16): ``systemd-analyze verify`` passes on them
without a word, and their command lines run.  verify checks that ExecStart's binary
exists, so a temporary copy has ``/usr/local/bin/cbt`` rewritten to the cbt of the
environment running the tests; nothing else changes."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
from pathlib import Path

from helpers.cli import cbt_argv, clean_env
from helpers.images import write_random_disk
from helpers.jobs import write_config
from helpers.system import need
from helpers.vaults import listed_ids

CONTRIB = Path(__file__).resolve().parents[2] / "contrib"
UNITS = ("cbt-run-due.service", "cbt-run-due.timer", "cbt-daemon.service")
INSTALLED = "/usr/local/bin/cbt"
CONFIG = "/etc/cbt/cbt.toml"


def _unit(name: str) -> configparser.ConfigParser:
    # (systemd's syntax is near enough an INI file: no repeated keys in these units)
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((CONTRIB / name).read_text())
    return parser


def _exec_argv(name: str) -> list[str]:
    return shlex.split(_unit(name)["Service"]["ExecStart"])


def _cbt_here() -> str:
    head = cbt_argv()
    assert len(head) == 1, "the tests' cbt is not a console script"
    return head[0]


def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    need(shutil.which("systemd-analyze") is not None,
         "needs systemd-analyze (package systemd; ci/system-deps.sh installs it)")
    assert sorted(p.name for p in CONTRIB.glob("cbt-*")) == sorted(UNITS)
    for name in UNITS:
        text = (CONTRIB / name).read_text()
        (tmp_path / name).write_text(text.replace(INSTALLED, _cbt_here()))
    r = subprocess.run(["systemd-analyze", "verify", *(str(tmp_path / n) for n in UNITS)],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", (r.stdout, r.stderr)


def test_the_units_say_what_they_promise() -> None:
    timer = _unit("cbt-run-due.timer")["Timer"]
    assert timer["Persistent"] == "true" and timer["OnCalendar"] == "*:0/15"
    due = _unit("cbt-run-due.service")["Service"]
    assert due["Type"] == "oneshot"
    assert _exec_argv("cbt-run-due.service") == [INSTALLED, "run-due", "--config", CONFIG]
    daemon = _unit("cbt-daemon.service")
    svc = daemon["Service"]
    assert _exec_argv("cbt-daemon.service") == [INSTALLED, "daemon", "--config", CONFIG]
    # SIGTERM to the daemon alone: it finishes the job in flight, hooks and workers go on
    assert (svc["Restart"], svc["KillSignal"], svc["KillMode"]) == (
        "on-failure", "SIGTERM", "mixed")
    assert svc["TimeoutStopSec"] == "6h"
    assert svc["ExecReload"] == "/bin/kill -HUP $MAINPID"  # (the daemon reads its config)
    assert svc["StateDirectory"] == "cbt"  # $STATE_DIRECTORY: the maintenance record
    assert daemon["Install"]["WantedBy"] == "multi-user.target"
    for name in ("cbt-run-due.service", "cbt-daemon.service"):
        s = _unit(name)["Service"]
        # block devices must stay readable and writable snapshots possible beside disks
        assert "PrivateDevices" not in s and s["ProtectSystem"] == "full", name


def test_the_run_due_command_line_runs(tmp_path: Path) -> None:
    """The ExecStart of cbt-run-due.service, with this config: it backs the VM up."""
    write_random_disk(tmp_path / "disks" / "os.img", 128 << 10, seed=2)
    cfg = write_config(tmp_path / "cbt.toml", {"p": {"schedule": "every 1h"}},
                       {"web": {"policy": "p", "disks": {"os": "disks/os.img"},
                                "snapshot": "none"}})
    env = clean_env()
    assert subprocess.run(cbt_argv("init", "--encryption", "none", tmp_path / "vault"),
                          env=env, capture_output=True).returncode == 0
    argv = [_cbt_here() if a == INSTALLED else str(cfg) if a == CONFIG else a
            for a in _exec_argv("cbt-run-due.service")]
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(listed_ids(tmp_path / "vault", "web")) == 1
    argv = [_cbt_here() if a == INSTALLED else str(cfg) if a == CONFIG else a
            for a in _exec_argv("cbt-daemon.service")]
    r = subprocess.run([*argv, "--help"], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "--metrics" in r.stdout, r.stderr


def test_the_example_config_loads() -> None:
    from cbt.jobs.config import load

    config = load(CONTRIB / "cbt.toml.example")
    assert sorted(config.vms) == ["db", "web"]
    m = config.maintenance
    assert m is not None and m.schedule.text == "daily 04:00" and m.prune and m.gc
