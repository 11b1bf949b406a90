"""`cbt daemon` maintenance (issue 16): prune then gc at the config's maintenance slot,
after the due backups, once a slot (a state record survives a restart); prune waits
behind a running backup in short steps, so SIGTERM still stops the daemon at once, and
gives up after ``wait`` seconds until the next slot.  The daemon is a real process on
the real clock; what was removed is judged from the points made and the pack files."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.cli import cbt, cbt_json, cleanup_group, start_cbt, wait_for
from helpers.images import write_random_disk
from helpers.jobs import run_due, write_config
from helpers.packs import pack_set
from helpers.prom import get as _get
from helpers.prom import parse_textfile
from helpers.vaults import init_cli_vault, listed, listed_ids

from cbt.jobs.config import ConfigError, load
from cbt.repo.lock import shared_lock
from cbt.repo.vault import Vault

LOG_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ (DEBUG|INFO|WARNING|ERROR) \S.*")


def _lines(path: Path) -> list[str]:
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
    for ln in lines:
        assert LOG_LINE.fullmatch(ln), lines
    return lines


def _maintenance_slot(now: dt.datetime) -> tuple[str, str]:
    """A daily maintenance time two hours ago (UTC), and the slot that is latest now."""
    at = now - dt.timedelta(hours=2)
    slot = at.replace(second=0, microsecond=0)
    return at.strftime("%H:%M"), slot.strftime("%Y-%m-%dT%H:%M:%SZ")


def _config(tmp_path: Path, maintenance: str) -> Path:
    cfg = write_config(tmp_path / "cbt.toml",
                       {"p": {"schedule": "every 1h", "retention": {"daily": 1}}},
                       {"web": {"policy": "p", "disks": {"os": "disks/os.img"},
                                "snapshot": "none"}})
    cfg.write_text(cfg.read_text() + "\n[maintenance]\n" + maintenance)
    return cfg


def _stop(proc: subprocess.Popen[str], log: Path) -> float:
    """SIGTERM; exit 0; seconds it took."""
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    took = time.monotonic() - t0
    assert rc == 0, log.read_text()
    return took


@pytest.mark.slow
def test_daemon_prunes_then_collects_once_a_slot(tmp_path: Path) -> None:
    """Three old points, each of its own random data; retention keeps one a day.  The
    daemon backs up the current slot, then prunes (the three old points go), then gc
    (every pack from before is gone: their blocks are dead), records the slot, says so
    in its log and metrics; restarted in the same slot, it does not run it again."""
    disk = tmp_path / "disks" / "os.img"
    now = dt.datetime.now(dt.UTC)
    at, mslot = _maintenance_slot(now)
    cfg = _config(tmp_path, f'schedule = "daily {at}"\ngc_grace = 0\nstate_dir = "state"\n'
                            'max_unused = 0\n')
    vault = tmp_path / "vault"
    assert cbt("init", "--encryption", "none", vault).returncode == 0
    for days in (3, 2, 1):
        write_random_disk(disk, 512 << 10, seed=days)
        when = (now - dt.timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ")
        r = cbt("backup", "--config", cfg, "--now", when)
        assert r.returncode == 0, r.stderr
    old = listed_ids(vault)
    assert len(old) == 3
    packs_before = pack_set(vault)
    write_random_disk(disk, 512 << 10, seed=4)

    log, metrics = tmp_path / "daemon.log", tmp_path / "cbt.prom"
    with open(log, "w") as err:
        proc = start_cbt("daemon", "-v", "--config", cfg, "--metrics", metrics, stderr=err)
    with cleanup_group(proc):
        wait_for(lambda: any(" maintenance: slot " in ln and " ended " in ln
                             for ln in _lines(log)) or proc.poll() is not None,
                 timeout=120, what="the maintenance run")
        assert proc.poll() is None, log.read_text()
        wait_for(lambda: any("sleeping until" in ln for ln in _lines(log)), what="sleep")
        _stop(proc, log)
    lines = _lines(log)
    points = listed(vault)
    assert len(points) == 1 and points[0]["recovery_point"] not in old, points
    new = points[0]["recovery_point"]
    assert not pack_set(vault) & packs_before  # every old pack swept
    assert pack_set(vault)

    def index(text: str) -> int:
        return next(i for i, ln in enumerate(lines) if text in ln)

    assert index(f"INFO backup web: point {new} ") < index(
        f"INFO maintenance: slot {mslot} started (prune then gc)")
    assert index("INFO prune: removed 3 of 4 points") < index("INFO gc: ")
    assert re.search(r"INFO gc: [1-9]\d* packs removed, \d+ rewritten; deleted .* now, .* in "
                     r"the trash, 0 B dead kept in live packs", lines[index("INFO gc: ")])
    assert index(f"INFO maintenance: slot {mslot} ended (done)") < index("sleeping until")
    assert not [ln for ln in lines if " ERROR " in ln or " WARNING " in ln], lines

    states = list((tmp_path / "state").iterdir())
    assert len(states) == 1 and states[0].name.startswith("maintenance-")
    assert states[0].stat().st_mode & 0o777 == 0o600
    rec = json.loads(states[0].read_text())
    assert rec["slot"] == mslot and rec["ok"] is True and rec["last_success"] == rec["ended"]
    assert rec["steps"]["prune"].startswith("ok: removed 3 of 4 points")
    assert rec["vault"] == str(vault.resolve())
    samples, _ = parse_textfile(metrics.read_text())
    ended = dt.datetime.fromisoformat(rec["ended"].replace("Z", "+00:00")).timestamp()
    assert _get(samples, "cbt_maintenance_last_run_timestamp_seconds") == ended
    assert _get(samples, "cbt_maintenance_last_run_success") == 1.0
    assert _get(samples, "cbt_maintenance_last_success_timestamp_seconds") == ended
    assert _get(samples, "cbt_slot_missed", vm="web") == 0.0

    # restarted in the same slot: no backup, no maintenance
    log2 = tmp_path / "daemon2.log"
    with open(log2, "w") as err:
        proc = start_cbt("daemon", "-v", "--config", cfg, stderr=err)
    with cleanup_group(proc):
        wait_for(lambda: any("sleeping until" in ln for ln in _lines(log2))
                 or proc.poll() is not None, what="sleep")
        _stop(proc, log2)
    lines2 = _lines(log2)
    assert not [ln for ln in lines2 if "started (" in ln or ": point " in ln], lines2
    assert any(f"DEBUG maintenance: slot {mslot} done at {rec['ended']}" in ln
               for ln in lines2), lines2
    assert json.loads(states[0].read_text()) == rec
    assert listed_ids(vault) == [new]


@pytest.fixture
def backup_running(tmp_path: Path) -> Iterator[Path]:
    """A vault whose web VM has its current slot's point, and a backup running into it
    (a holder of the shared lock, as every backup holds it while it runs)."""
    write_random_disk(tmp_path / "disks" / "os.img", 256 << 10, seed=9)
    vault = tmp_path / "vault"
    assert cbt("init", "--encryption", "none", vault).returncode == 0
    with shared_lock(Vault.open(vault).storage):
        yield vault


@pytest.mark.slow
def test_prune_waits_behind_a_backup_stops_at_once_and_gives_up(
        tmp_path: Path, backup_running: Path) -> None:
    """Prune (the vault alone) waits while a backup runs; SIGTERM stops the daemon at
    once (no state recorded: the slot is tried again).  With ``wait = 1`` prune gives
    up (a WARNING, the slot recorded as not all done: tried at the next slot), gc runs
    beside the backup; with -q only WARNING and ERROR lines are written."""
    now = dt.datetime.now(dt.UTC)
    at, mslot = _maintenance_slot(now)
    cfg = _config(tmp_path, f'schedule = "daily {at}"\nstate_dir = "state"\ngc = false\n')
    rc, s, _, _ = run_due(cfg)  # the backup slot filled: the daemon only maintains
    assert rc == 0 and len(s["ran"]) == 1
    points = listed_ids(backup_running)

    log = tmp_path / "daemon.log"
    with open(log, "w") as err:
        proc = start_cbt("daemon", "--config", cfg, stderr=err)
    with cleanup_group(proc):
        wait_for(lambda: any("INFO prune: waiting (up to " in ln for ln in _lines(log))
                 or proc.poll() is not None, what="prune to wait")
        assert proc.poll() is None, log.read_text()
        took = _stop(proc, log)
    assert took < 5.0, f"took {took:.1f} s to stop"
    lines = _lines(log)
    assert any("INFO prune: not run: stopping" in ln for ln in lines), lines
    assert any(f"maintenance: slot {mslot} stopped before its end" in ln for ln in lines)
    assert not (tmp_path / "state").exists() or not list((tmp_path / "state").iterdir())
    assert lines[-1].endswith("INFO daemon stopped")

    cfg = _config(tmp_path, f'schedule = "daily {at}"\nstate_dir = "state"\nwait = 1\n')
    log = tmp_path / "daemon-q.log"
    with open(log, "w") as err:
        proc = start_cbt("daemon", "-q", "--config", cfg, stderr=err)
    with cleanup_group(proc):
        wait_for(lambda: list((tmp_path / "state").glob("maintenance-*.json"))
                 or proc.poll() is not None, what="the state record")
        assert proc.poll() is None, log.read_text()
        _stop(proc, log)
    lines = _lines(log)
    assert lines and all(" WARNING " in ln or " ERROR " in ln for ln in lines), lines
    assert any(" WARNING prune: gave up waiting for the vault " in ln for ln in lines), lines
    assert any(f" WARNING maintenance: slot {mslot} ended (not all done)" in ln
               for ln in lines), lines
    rec = json.loads(next((tmp_path / "state").glob("maintenance-*.json")).read_text())
    assert rec["slot"] == mslot and rec["ok"] is False and rec["last_success"] is None
    assert rec["steps"]["prune"].startswith("gave up: ")
    assert rec["steps"]["gc"].startswith("ok: ")
    assert listed_ids(backup_running) == points


@pytest.mark.parametrize(("table", "key", "message"), [
    ('schedule = "hourly"\n', "maintenance.schedule", "not a schedule"),
    ('timezone = "Mars/Base"\nschedule = "daily 03:00"\n', "maintenance.timezone",
     "unknown time zone"),
    ('schedule = "daily 03:00"\nprune = "yes"\n', "maintenance.prune", "true or false"),
    ('schedule = "daily 03:00"\nwait = -1\n', "maintenance.wait", "seconds from 0"),
    ('schedule = "daily 03:00"\ngc_grace = inf\n', "maintenance.gc_grace", "seconds from 0"),
    ('schedule = "daily 03:00"\nmax_unused = 101\n', "maintenance.max_unused",
     "percentage from 0 to 100"),
    ('schedule = "daily 03:00"\nmax_unused = nan\n', "maintenance.max_unused",
     "percentage from 0 to 100"),
    ('schedule = "daily 03:00"\nmax_unused = "5%"\n', "maintenance.max_unused",
     "a percentage"),
    ('schedule = "daily 03:00"\nmaxunused = 5\n', "maintenance.maxunused", "unknown key"),
    ('gc = true\n', "maintenance", "missing required key 'schedule'"),
])
def test_bad_maintenance_keys_are_named(tmp_path: Path, table: str, key: str,
                                        message: str) -> None:
    cfg = tmp_path / "cbt.toml"
    cfg.write_text('vault = "v"\n\n[maintenance]\n' + table)
    with pytest.raises(ConfigError) as exc:
        load(cfg)
    text = str(exc.value)
    assert re.match(rf"{re.escape(str(cfg))}:[345]: {re.escape(key)}: ", text), text
    assert message in text, text


def test_maintenance_defaults_and_state_dir(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from cbt.jobs.scheduler import state_path

    cfg = tmp_path / "cbt.toml"
    cfg.write_text('vault = "v"\n[maintenance]\nschedule = "daily 03:00"\n')
    m = load(cfg).maintenance
    assert m is not None
    assert (m.prune, m.gc, m.gc_grace, m.wait, m.state_dir, m.timezone, m.max_unused) == (
        True, True, 3600.0, 3600.0, None, "UTC", None)
    cfg.write_text('vault = "v"\n[maintenance]\nschedule = "daily 03:00"\nmax_unused = 5\n')
    assert load(cfg).maintenance.max_unused == 5.0  # type: ignore[union-attr]
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "sd"))
    assert state_path(load(cfg)).parent == tmp_path / "sd"
    monkeypatch.delenv("STATE_DIRECTORY")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert state_path(load(cfg)).parent == tmp_path / "xdg" / "cbt"
    cfg.write_text('vault = "v"\n[maintenance]\nschedule = "daily 03:00"\nstate_dir = "s"\n')
    assert state_path(load(cfg)).parent == tmp_path / "s"
    cfg.write_text('vault = "v"\n')
    assert load(cfg).maintenance is None
    assert os.path.basename(state_path(load(cfg))).startswith("maintenance-")


@pytest.mark.slow
def test_an_encrypted_vault_is_maintained_and_measured(tmp_path: Path) -> None:
    """An encrypted vault opened with CBT_PASSWORD_FILE: the daemon backs up, prunes the
    old point (retention: one a day), collects, and its metrics name the new point."""
    disk = tmp_path / "disks" / "os.img"
    now = dt.datetime.now(dt.UTC)
    at, mslot = _maintenance_slot(now)
    cfg = _config(tmp_path, f'schedule = "daily {at}"\ngc_grace = 0\nstate_dir = "state"\n'
                            'max_unused = 0\n')
    vault = tmp_path / "vault"
    env = init_cli_vault(vault, True, tmp_path)
    write_random_disk(disk, 256 << 10, seed=1)
    old = (now - dt.timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert cbt("backup", "--config", cfg, "--now", old, env=env).returncode == 0
    write_random_disk(disk, 256 << 10, seed=2)
    log, metrics = tmp_path / "daemon.log", tmp_path / "cbt.prom"
    with open(log, "w") as err:
        proc = start_cbt("daemon", "--config", cfg, "--metrics", metrics, stderr=err, env=env)
    with cleanup_group(proc):
        wait_for(lambda: metrics.exists() or proc.poll() is not None, timeout=120,
                 what="the metrics")
        assert proc.poll() is None, log.read_text()
        _stop(proc, log)
    lines = _lines(log)
    assert any(f"INFO maintenance: slot {mslot} ended (done)" in ln for ln in lines), lines
    assert any("INFO prune: removed 1 of 2 points" in ln for ln in lines), lines
    points = cbt_json("list", vault, env=env)["points"]
    assert len(points) == 1 and points[0]["created"] != old
    samples, _ = parse_textfile(metrics.read_text())
    created = dt.datetime.fromisoformat(points[0]["created"].replace("Z", "+00:00"))
    assert _get(samples, "cbt_last_success_timestamp_seconds", vm="web") == created.timestamp()
    assert _get(samples, "cbt_last_read_bytes", vm="web") == 256 << 10
    assert _get(samples, "cbt_maintenance_last_run_success") == 1.0


@pytest.mark.slow
def test_failures_are_logged_and_the_daemon_goes_on(tmp_path: Path) -> None:
    """VM a's pre hook moves the vault away: the round fails (ERROR lines; retried in
    ten minutes, not at the next slot), and so does maintenance.  Then, the vault back,
    maintenance whose record cannot be written (its state_dir is a file): gc runs, an
    ERROR says the record is not written.  The daemon keeps running, stops cleanly."""
    vault = tmp_path / "vault"
    away = tmp_path / "vault-away"
    for name in ("a", "b"):
        write_random_disk(tmp_path / "disks" / f"{name}.img", 64 << 10, seed=len(name))
    hour_ago = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).strftime("%H:%M")
    cfg = write_config(tmp_path / "cbt.toml", {"p": {"schedule": f"daily {hour_ago}"}}, {
        "a": {"policy": "p", "disks": {"d": "disks/a.img"}, "snapshot": "none",
              "hooks": {"pre": ["/bin/mv", str(vault), str(away)],
                        "on_pre_failure": "fail"}},
        "b": {"policy": "p", "disks": {"d": "disks/b.img"}, "snapshot": "none"}})
    (tmp_path / "state-file").write_text("not a folder")
    at, _ = _maintenance_slot(dt.datetime.now(dt.UTC))
    cfg.write_text(cfg.read_text() + f'\n[maintenance]\nschedule = "daily {at}"\n'
                   'prune = false\nstate_dir = "state-file"\n')
    assert cbt("init", "--encryption", "none", vault).returncode == 0
    log = tmp_path / "daemon.log"
    with open(log, "w") as err:
        proc = start_cbt("daemon", "-v", "--config", cfg, stderr=err)
    with cleanup_group(proc):
        wait_for(lambda: any("sleeping until" in ln for ln in _lines(log))
                 or proc.poll() is not None, timeout=120, what="the round's end")
        assert proc.poll() is None, log.read_text()
        _stop(proc, log)
    lines = _lines(log)
    errors = [ln for ln in lines if " ERROR " in ln]
    assert away.is_dir() and not vault.exists()
    assert any(" ERROR backup a: failed " in ln or " ERROR backups failed " in ln
               for ln in errors), lines
    assert any(" ERROR backups failed (tried again in 600 s): " in ln for ln in errors), lines
    assert not any(": point " in ln for ln in lines), lines
    assert lines[-1].endswith("INFO daemon stopped")
    # the retry is in ten minutes, not at the next slot (in about a day)
    sleep = next(ln for ln in lines if "sleeping until" in ln)
    t_log = dt.datetime.fromisoformat(sleep.split()[0].replace("Z", "+00:00"))
    until = dt.datetime.fromisoformat(sleep.split()[-1].replace("Z", "+00:00"))
    assert dt.timedelta(seconds=590) <= until - t_log <= dt.timedelta(seconds=601), sleep

    assert any(" ERROR maintenance failed (tried again in 600 s): not a cbt vault: " in ln
               for ln in errors), lines

    away.rename(vault)
    cfg.write_text(f'vault = "vault"\n[maintenance]\nschedule = "daily {at}"\n'
                   'prune = false\nstate_dir = "state-file"\n')
    log = tmp_path / "daemon2.log"
    with open(log, "w") as err:
        proc = start_cbt("daemon", "--config", cfg, stderr=err)
    with cleanup_group(proc):
        wait_for(lambda: any(" maintenance: slot " in ln and " ended " in ln
                             for ln in _lines(log)) or proc.poll() is not None,
                 timeout=120, what="maintenance")
        assert proc.poll() is None, log.read_text()
        _stop(proc, log)
    lines = _lines(log)
    assert any(" INFO gc: 0 packs removed" in ln for ln in lines), lines
    assert any(" ERROR maintenance: cannot write its state record " in ln for ln in lines)
    assert (tmp_path / "state-file").read_text() == "not a folder"


@pytest.mark.parametrize("content", [
    b"", b"\xff\xfe", b"[]", b'{"vault": 1}',
    b'{"vault": "V", "slot": "yesterday", "ended": "2026-01-01T00:00:00Z", "ok": true, '
    b'"last_success": null, "steps": {}}',
    b'{"vault": "elsewhere", "slot": "2026-05-04T03:00:00Z", "ended": '
    b'"2026-05-04T03:01:00Z", "ok": true, "last_success": null, "steps": {}}',
])
def test_a_bad_state_record_is_said_and_maintenance_runs(tmp_path: Path,
                                                         content: bytes) -> None:
    """A record that is not one (or another vault's) is named in a WARNING; the slot
    is due (one extra run, never a missed one).  A good record of the slot: not due."""
    from cbt.jobs.scheduler import maintenance_due, state_path

    cfg = tmp_path / "cbt.toml"
    cfg.write_text('vault = "v"\n[maintenance]\nschedule = "daily 03:00"\nstate_dir = "s"\n')
    config = load(cfg)
    path = state_path(config)
    path.parent.mkdir()
    path.write_bytes(content.replace(b'"V"', json.dumps(config.vault).encode()))
    logged: list[tuple[str, str]] = []
    now = dt.datetime(2026, 5, 4, 4, tzinfo=dt.UTC)
    assert maintenance_due(config, now, lambda lv, t: logged.append((lv, t))) == \
        "2026-05-04T03:00:00Z"
    assert [lv for lv, _ in logged] == ["WARNING"] and str(path) in logged[0][1], logged
    good = {"vault": config.vault, "slot": "2026-05-04T03:00:00Z",
            "ended": "2026-05-04T03:01:00Z", "ok": False, "last_success": None, "steps": {}}
    path.write_text(json.dumps(good))
    assert maintenance_due(config, now, lambda lv, t: None) is None
    assert maintenance_due(config, now + dt.timedelta(days=1), lambda lv, t: None) == \
        "2026-05-05T03:00:00Z"


def test_config_check_shows_maintenance(tmp_path: Path) -> None:
    cfg = tmp_path / "cbt.toml"
    cfg.write_text('vault = "v"\n[maintenance]\nschedule = "daily 03:00"\n'
                   'timezone = "Europe/Berlin"\ngc = false\nwait = 60\nstate_dir = "s"\n')
    out = cbt_json("config", "check", cfg)
    state = out["maintenance"].pop("state_file")
    assert out["maintenance"] == {"schedule": "daily 03:00", "timezone": "Europe/Berlin",
                                  "prune": True, "gc": False, "gc_grace": 3600.0,
                                  "wait": 60.0}
    assert Path(state).parent == tmp_path / "s" and Path(state).name.startswith("maintenance-")
    r = cbt("config", "check", cfg)
    assert r.returncode == 0
    assert f"  maintenance: daily 03:00 (Europe/Berlin): prune; state {state}" in r.stdout
    cfg.write_text('vault = "v"\n')
    assert cbt_json("config", "check", cfg)["maintenance"] is None


def test_the_help_example_is_a_config_that_loads(tmp_path: Path) -> None:
    """`cbt daemon --help` shows a [maintenance] table: every key of it is one the config
    takes (with the value it shows), max_unused included."""
    import cbt.cli.daemon_cmd

    doc = cbt.cli.daemon_cmd.__doc__ or ""
    table = doc[doc.index("    [maintenance]"):].split("\n\n", 1)[0]
    example = "\n".join(line.split("#", 1)[0].strip() for line in table.splitlines())
    cfg = tmp_path / "cbt.toml"
    cfg.write_text('vault = "v"\n' + example + "\n")
    m = load(cfg).maintenance
    assert m is not None
    keys = {line.split("=")[0].strip() for line in example.splitlines() if "=" in line}
    assert keys == {"schedule", "prune", "gc", "max_unused", "wait"}, keys
    assert (m.prune, m.gc, m.max_unused, m.wait) == (True, True, 5.0, 3600.0)
