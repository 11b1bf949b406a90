"""Attacks on unattended running (issue 16, review of part U): hostile vault records
in the metrics, hostile state records, hostile text in the daemon's log lines.  Each
test drives the real command (or the real daemon) and judges what it wrote with the
tests' own parser (:mod:`helpers.prom`) or the file system."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
from helpers.cli import cbt, cleanup_group, start_cbt, wait_for
from helpers.images import write_random_disk
from helpers.jobs import write_config
from helpers.prom import get as _get
from helpers.prom import parse_textfile
from helpers.vaults import forge_record, listed_ids


def _one_vm(tmp_path: Path, extra: str = "") -> Path:
    write_random_disk(tmp_path / "disks" / "os.img", 64 << 10, seed=1)
    cfg = write_config(tmp_path / "cbt.toml", {"p": {"schedule": "every 1h"}},
                       {"web": {"policy": "p", "disks": {"os": "disks/os.img"},
                                "snapshot": "none"}})
    if extra:
        cfg.write_text(cfg.read_text() + extra)
    assert cbt("init", "--encryption", "none", tmp_path / "vault").returncode == 0
    return cfg


def _daemon_rounds(cfg: Path, tmp_path: Path, rounds: int) -> Path:
    """``cbt daemon -v`` of ``cfg`` until it has slept ``rounds`` times, then SIGTERM (exit
    0); its log (stderr)."""
    log = tmp_path / "daemon.log"
    with open(log, "w") as err:
        proc = start_cbt("daemon", "-v", "--config", cfg, stderr=err)
    with cleanup_group(proc):
        wait_for(lambda: log.read_text().count("sleeping until") >= rounds
                 or proc.poll() is not None, timeout=120 * rounds, what=f"round {rounds}")
        assert proc.poll() is None, log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
    return log


def test_a_crafted_consistency_level_neither_breaks_the_metrics_nor_bloats_them(
        tmp_path: Path) -> None:
    """A point record (checksum recomputed, as anyone can) whose consistency holds a
    lone surrogate (JSON's ``\\ud800``), a quote, a backslash, a newline, an escape
    character and 10 000 more characters: run-due --metrics still writes a file the
    exposition format's parser reads (valid UTF-8), its label is the first 128
    characters with the surrogate as U+FFFD; the file stays small."""
    cfg = _one_vm(tmp_path)
    r = cbt("run-due", "--config", cfg)
    assert r.returncode == 0, r.stderr
    [point] = listed_ids(tmp_path / "vault")
    level = 'crash\ud800"x\\\n\x1b[31m' + "y" * 10_000

    def change(body: dict[str, Any]) -> None:
        body["consistency"] = level

    forge_record(tmp_path / "vault", point, change)
    metrics = tmp_path / "cbt.prom"
    r = cbt("run-due", "--config", cfg, "--metrics", metrics)
    assert r.returncode == 0, r.stderr
    raw = metrics.read_bytes()
    assert len(raw) < 8192, len(raw)
    samples, _ = parse_textfile(raw.decode("utf-8"))  # (strict: valid UTF-8)
    label = level[:128].replace("\ud800", "\ufffd")
    assert _get(samples, "cbt_last_consistency", vm="web", consistency=label) == 1.0
    assert _get(samples, "cbt_last_consistency", vm="web", consistency="crash") == 0.0


def _maintained(tmp_path: Path) -> tuple[Any, Path]:
    """A config with [maintenance] (no prune, no gc: only its record) and its state path."""
    from cbt.jobs.config import load
    from cbt.jobs.scheduler import state_path

    cfg = _one_vm(tmp_path, '\n[maintenance]\nschedule = "daily 03:00"\nprune = false\n'
                            'gc = false\nstate_dir = "s"\n')
    config = load(cfg)
    path = state_path(config)
    path.parent.mkdir()
    return config, path


def _plant(how: str, path: Path, tmp_path: Path) -> None:
    if how == "deep":
        path.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    elif how == "huge":
        with open(path, "wb") as f:  # (sparse: takes no room)
            f.truncate(1 << 30)
    elif how == "fifo":
        os.mkfifo(path)
    elif how == "link-zero":
        path.symlink_to("/dev/zero")
    else:  # a link to another file (a victim): read as a record, written through
        (tmp_path / "victim").write_text("root:x:0:0:root:/root:/bin/bash\n")
        path.symlink_to(tmp_path / "victim")


@pytest.mark.parametrize("how", ["deep", "huge", "fifo", "link-zero", "link-file"])
def test_a_hostile_state_record_costs_a_warning_and_one_run(tmp_path: Path,
                                                            how: str) -> None:
    """A state record that is JSON nested 100 000 deep, a 1 GiB file, a FIFO, or a
    symbolic link (to /dev/zero, to another file): the maintenance slot is due, with one
    WARNING naming the record (no crash, no hang, no 1 GiB read); the run writes a
    regular 0600 record in its place and leaves the link's target as it was."""
    import datetime as dt
    import stat
    import threading

    from cbt.jobs.scheduler import maintenance_due, run_maintenance

    config, path = _maintained(tmp_path)
    _plant(how, path, tmp_path)
    now = dt.datetime(2026, 5, 4, 4, tzinfo=dt.UTC)
    logged: list[tuple[str, str]] = []
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(
        maintenance_due(config, now, lambda lv, text: logged.append((lv, text)))))
    t.start()
    t.join(60)
    if t.is_alive():  # blocked opening the FIFO: let it go, then fail
        with open(path, "wb"):
            pass
        t.join()
        raise AssertionError("reading the state record hung")
    assert out == ["2026-05-04T03:00:00Z"]
    assert [lv for lv, _ in logged] == ["WARNING"] and str(path) in logged[0][1], logged
    rec = run_maintenance(config, out[0], threading.Event(), lambda lv, text: None)
    assert rec is not None and rec.slot == out[0]
    st = path.lstat()
    assert stat.S_ISREG(st.st_mode) and st.st_mode & 0o777 == 0o600
    assert maintenance_due(config, now, lambda lv, text: None) is None
    if how == "link-file":
        assert (tmp_path / "victim").read_text() == "root:x:0:0:root:/root:/bin/bash\n"


@pytest.mark.slow
def test_daemon_log_lines_stay_one_printable_line(tmp_path: Path) -> None:
    """A job whose error names a disk path holding a newline, an escape sequence and a
    right-to-left override: the daemon's log has one line for it, every character
    printable (journald would keep a line with control characters as a blob), the
    characters written as their escapes."""


    cfg = _one_vm(tmp_path)
    text = cfg.read_text().replace('"disks/os.img"', '"disks/o\\n\\u001b[31ms\\u202e.img"')
    assert text != cfg.read_text()
    cfg.write_text(text)
    log = _daemon_rounds(cfg, tmp_path, 1)
    lines = log.read_text().split("\n")
    assert lines[-1] == "" and all(ln.isprintable() for ln in lines), lines
    [failed] = [ln for ln in lines if " ERROR backup web: failed " in ln]
    assert failed.endswith("disks/o \\x1b[31ms\\u202e.img"), failed



@pytest.mark.slow
def test_a_failed_job_is_tried_again_in_ten_minutes(tmp_path: Path) -> None:
    """A daily VM whose job fails (its pre hook fails, on_pre_failure = "fail": a guest
    busy for a moment, the network): the daemon sleeps ten minutes, not until the next
    slot a day away (a timer's run-due would try again in fifteen minutes; a vault
    locked by another host's prune was already retried in ten)."""
    import datetime as dt


    hour_ago = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).strftime("%H:%M")
    cfg = _one_vm(tmp_path)
    text = cfg.read_text().replace('"every 1h"', f'"daily {hour_ago}"')
    cfg.write_text(text + '\n[vm.web.hooks]\npre = ["/bin/false"]\non_pre_failure = "fail"\n')
    log = _daemon_rounds(cfg, tmp_path, 1)
    lines = log.read_text().splitlines()
    assert any(" ERROR backup web: failed (slot " in ln and "tried again in 600 s" in ln
               and "pre hook failed" in ln for ln in lines), lines
    sleep = next(ln for ln in lines if "sleeping until" in ln)
    t_log = dt.datetime.fromisoformat(sleep.split()[0].replace("Z", "+00:00"))
    until = dt.datetime.fromisoformat(sleep.split()[-1].replace("Z", "+00:00"))
    assert dt.timedelta(seconds=590) <= until - t_log <= dt.timedelta(seconds=601), sleep
    assert listed_ids(tmp_path / "vault") == []


@pytest.mark.slow
def test_metrics_on_a_full_file_system_keep_the_old_file_and_the_daemon_goes_on(
        tmp_path: Path) -> None:
    """--metrics in a 1 MiB tmpfs: a first run-due writes the file; the file system
    then filled, the daemon's round backs up, logs one ERROR for the metrics and goes
    on to sleep; the old file is whole (the same bytes), no temporary file is left."""
    import signal

    from helpers.cli import cleanup_group, start_cbt, wait_for
    from helpers.system import fill, tmpfs

    cfg = _one_vm(tmp_path)
    with tmpfs(tmp_path / "prom", 1) as mnt:
        metrics = mnt / "cbt.prom"
        r = cbt("run-due", "--config", cfg, "--now", "2026-05-04T03:00:00Z",
                "--metrics", metrics)
        assert r.returncode == 0, r.stderr
        old = metrics.read_bytes()
        fill(mnt / "ballast", 0)
        log = tmp_path / "daemon.log"
        with open(log, "w") as err:
            proc = start_cbt("daemon", "-v", "--config", cfg, "--metrics", metrics,
                             stderr=err)
        with cleanup_group(proc):
            wait_for(lambda: "sleeping until" in log.read_text() or proc.poll() is not None,
                     timeout=120, what="the round's end")
            assert proc.poll() is None, log.read_text()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, log.read_text()
        lines = log.read_text().splitlines()
        assert any(" INFO backup web: point " in ln for ln in lines), lines
        errors = [ln for ln in lines if " ERROR " in ln]
        assert len(errors) == 1 and "metrics: cannot write" in errors[0], lines
        assert "No space left on device" in errors[0], errors
        assert metrics.read_bytes() == old
        assert sorted(p.name for p in mnt.iterdir()) == ["ballast", "cbt.prom"]
    assert len(listed_ids(tmp_path / "vault")) == 2


@pytest.mark.slow
def test_an_unwritable_state_record_costs_no_maintenance_run_at_each_round(
        tmp_path: Path) -> None:
    """state_dir is a file, so the record cannot be written (an ERROR says so).  The
    VM's schedule has a second slot a minute or two on: at that round the daemon backs
    up again but does not prune and collect again (before: at every round)."""
    import datetime as dt


    now = dt.datetime.now(dt.UTC)
    t1 = (now - dt.timedelta(hours=1)).strftime("%H:%M")
    t2 = (now.replace(second=0, microsecond=0) + dt.timedelta(minutes=2)).strftime("%H:%M")
    at = (now - dt.timedelta(hours=2)).strftime("%H:%M")
    cfg = _one_vm(tmp_path, f'\n[maintenance]\nschedule = "daily {at}"\nprune = false\n'
                            'state_dir = "state-file"\n')
    cfg.write_text(cfg.read_text().replace('"every 1h"', f'"daily {t1},{t2}"'))
    (tmp_path / "state-file").write_text("not a folder")
    log = _daemon_rounds(cfg, tmp_path, 2)
    lines = log.read_text().splitlines()
    assert len([ln for ln in lines if " INFO backup web: point " in ln]) == 2, lines
    assert len([ln for ln in lines if " maintenance: slot " in ln and " started " in ln]) \
        == 1, lines
    assert any(" ERROR maintenance: cannot write its state record " in ln for ln in lines)
    assert len(listed_ids(tmp_path / "vault")) == 2


def test_a_point_from_the_future_does_not_hide_stopped_backups(tmp_path: Path) -> None:
    """A manual backup with --now a year ahead (or a writer whose clock is ahead): the
    metrics' newest point of the VM is the newest created by the metrics' now, so
    cbt_last_success_timestamp_seconds ages when backups stop (an alert can fire)."""
    import datetime as dt

    from helpers.vaults import listed

    cfg = _one_vm(tmp_path)
    assert cbt("run-due", "--config", cfg, "--now", "2026-05-04T03:00:00Z").returncode == 0
    r = cbt("backup", "--config", cfg, "--now", "2027-05-04T03:00:00Z")
    assert r.returncode == 0, r.stderr
    metrics = tmp_path / "cbt.prom"
    r = cbt("run-due", "--config", cfg, "--now", "2026-05-04T03:30:00Z", "--metrics", metrics)
    assert r.returncode == 0, r.stderr
    assert sorted(p["created"] for p in listed(tmp_path / "vault")) == [
        "2026-05-04T03:00:00Z", "2027-05-04T03:00:00Z"]
    samples, _ = parse_textfile(metrics.read_text())
    assert _get(samples, "cbt_last_success_timestamp_seconds", vm="web") == dt.datetime(
        2026, 5, 4, 3, tzinfo=dt.UTC).timestamp()
    assert _get(samples, "cbt_slot_missed", vm="web") == 0.0


@pytest.mark.slow
def test_sighup_reads_the_config_again_and_keeps_a_bad_one_out(tmp_path: Path) -> None:
    """SIGHUP (systemctl reload) while the daemon sleeps: it reads its config again and
    backs up the VM added there; a config that does not load then is one ERROR and the
    daemon goes on with the one in use; SIGTERM stops it (exit 0).  Before: SIGHUP
    killed it, the job in flight with it."""
    import signal

    from helpers.cli import cleanup_group, start_cbt, wait_for

    cfg = _one_vm(tmp_path)
    write_random_disk(tmp_path / "disks" / "db.img", 64 << 10, seed=2)
    log = tmp_path / "daemon.log"
    with open(log, "w") as err:
        proc = start_cbt("daemon", "-v", "--config", cfg, stderr=err)
    with cleanup_group(proc):
        def sleeps(n: int) -> None:
            wait_for(lambda: log.read_text().count("sleeping until") >= n
                     or proc.poll() is not None, timeout=120, what=f"sleep {n}")
            assert proc.poll() is None, log.read_text()

        sleeps(1)
        good = cfg.read_text() + ('\n[vm.db]\npolicy = "p"\nsnapshot = "none"\n'
                                  'disks = { db = "disks/db.img" }\n')
        cfg.write_text(good)
        proc.send_signal(signal.SIGHUP)
        sleeps(2)
        cfg.write_text(good + "\n[vm.broken]\n")
        proc.send_signal(signal.SIGHUP)
        sleeps(3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
    lines = log.read_text().splitlines()
    assert any(" INFO received SIGHUP: config " in ln and "read again: 2 VMs" in ln
               for ln in lines), lines
    assert any(" INFO backup db: point " in ln for ln in lines), lines
    bad = [ln for ln in lines if " ERROR " in ln]
    assert len(bad) == 1 and "received SIGHUP: keeping the config in use: " in bad[0], lines
    assert "vm.broken" in bad[0], bad
    assert lines[-1].endswith("INFO daemon stopped")
    assert sorted(p.split(".")[0] for p in listed_ids(tmp_path / "vault")) == ["db", "web"]


def test_a_vm_locked_by_a_manual_run_fails_alone(tmp_path: Path) -> None:
    """A manual backup of web runs (its VM lock, taken here) when run-due comes: web's
    job fails naming the lock, z-db's (after it in the config) still runs, the summary
    and the metrics come (before: run-due ended at web with one error line, z-db not
    tried, no summary, no metrics)."""
    import json

    from cbt.repo.lock import vm_lock
    from cbt.repo.vault import Vault

    cfg = _one_vm(tmp_path)
    write_random_disk(tmp_path / "disks" / "db.img", 64 << 10, seed=2)
    cfg.write_text(cfg.read_text() + '\n[vm.z-db]\npolicy = "p"\nsnapshot = "none"\n'
                                     'disks = { db = "disks/db.img" }\n')
    metrics = tmp_path / "cbt.prom"
    with vm_lock(Vault.open(tmp_path / "vault"), "web"):
        r = cbt("run-due", "--config", cfg, "--json", "--metrics", metrics)
    assert r.returncode == 2, r.stderr
    lines = [json.loads(ln) for ln in r.stdout.splitlines()]
    summary = lines[-1]
    assert summary["type"] == "summary", r.stdout
    status = {x["vm"]: x["status"] for x in summary["ran"]}
    assert status == {"web": "failed", "z-db": "succeeded"}, summary
    [error] = [x for x in lines if x["type"] == "error"]
    assert error["vm"] == "web" and "locked" in error["message"], error
    samples, _ = parse_textfile(metrics.read_text())
    assert _get(samples, "cbt_slot_missed", vm="web") == 1.0
    assert _get(samples, "cbt_job_failures_total", vm="web") == 1.0
    assert _get(samples, "cbt_slot_missed", vm="z-db") == 0.0
    assert sorted(p.split(".")[0] for p in listed_ids(tmp_path / "vault")) == ["z-db"]
