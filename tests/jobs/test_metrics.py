"""`--metrics FILE`: Prometheus textfile metrics of run-due (and the daemon), read back
with a small parser of the text exposition format written here (not cbt's code), and
checked against the JSON lines of the same run."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest
from helpers.cli import cbt, json_lines, one_error_line
from helpers.images import write_random_disk
from helpers.jobs import hook_argv, run_due, set_ctl, write_config
from helpers.prom import get as _get
from helpers.prom import parse_textfile
from helpers.vaults import listed

from cbt.jobs.metrics import VMMetrics, render


def _unix(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@pytest.mark.slow
def test_run_due_metrics_match_the_run(tmp_path: Path) -> None:
    """web backs up (application: its pre hook succeeds), db's job fails (its pre hook
    fails, on_pre_failure = "fail"): the file says web's point as the JSON does, db's
    slot missed and one failure; after a second run that fixes db, both are fine."""
    state = tmp_path / "hook"
    argv = hook_argv(state)
    write_random_disk(tmp_path / "disks" / "os.img", 1 << 20, seed=3)
    write_random_disk(tmp_path / "disks" / "a.img", 256 << 10, seed=4)
    write_random_disk(tmp_path / "disks" / "db.img", 512 << 10, seed=5)
    # db's pre hook fails: a control file only db's run reads
    vault = tmp_path / "vault"
    assert cbt("init", "--encryption", "none", vault).returncode == 0
    metrics = tmp_path / "prom" / "cbt.prom"
    metrics.parent.mkdir()
    hooks_db = hook_argv(tmp_path / "hook-db")
    set_ctl(tmp_path / "hook-db", "pre", exit=1)
    cfg = write_config(tmp_path / "cbt.toml", {"p": {"schedule": "daily 02:00"}}, {
        "web": {"policy": "p", "disks": {"os": "disks/os.img", "a": "disks/a.img"},
                "snapshot": "none", "hooks": {"pre": argv}},
        "db": {"policy": "p", "disks": {"db": "disks/db.img"}, "snapshot": "none",
               "hooks": {"pre": hooks_db, "on_pre_failure": "fail"}}})
    umask = os.umask(0o077)  # (as cbt's systemd units set it)
    try:
        r = cbt("run-due", "--config", cfg, "--now", "2026-05-04T03:00:00Z", "--json",
                "--metrics", metrics)
    finally:
        os.umask(umask)
    assert r.returncode == 2, r.stderr
    assert metrics.stat().st_mode & 0o777 == 0o644  # the exporter runs as another user
    lines = json_lines(r.stdout)
    point = next(x for x in lines if x["type"] == "point")
    assert point["vm"] == "web"
    assert sorted(p.name for p in metrics.parent.iterdir()) == ["cbt.prom"]  # no temp file
    samples, types = parse_textfile(metrics.read_text())

    assert _get(samples, "cbt_last_success_timestamp_seconds", vm="web") == _unix(
        point["created"]) == _unix("2026-05-04T03:00:00Z")
    assert _get(samples, "cbt_last_duration_seconds", vm="web") == pytest.approx(
        point["seconds"], abs=1e-9)
    assert _get(samples, "cbt_last_read_bytes", vm="web") == sum(
        d["bytes_read"] for d in point["disks"]) == (1 << 20) + (256 << 10)
    assert _get(samples, "cbt_last_new_bytes", vm="web") == sum(
        d["bytes_new"] for d in point["disks"])
    assert _get(samples, "cbt_last_stored_bytes", vm="web") == sum(
        d["bytes_stored"] for d in point["disks"])
    assert point["consistency"] == "application"
    assert {lv: _get(samples, "cbt_last_consistency", vm="web", consistency=lv)
            for lv in ("application", "file-system", "crash")} == {
        "application": 1.0, "file-system": 0.0, "crash": 0.0}
    assert _get(samples, "cbt_slot_missed", vm="web") == 0.0
    assert _get(samples, "cbt_slot_missed", vm="db") == 1.0
    assert _get(samples, "cbt_job_failures_total", vm="web") == 0.0
    assert _get(samples, "cbt_job_failures_total", vm="db") == 1.0
    assert types["cbt_job_failures_total"] == "counter"
    assert types["cbt_last_success_timestamp_seconds"] == "gauge"
    # db has no point: none of the per-point samples name it
    assert not [k for k in samples if dict(k[1]).get("vm") == "db"
                and k[0].startswith("cbt_last_")]
    assert not [k for k in samples if k[0].startswith("cbt_maintenance")]  # no [maintenance]

    # db fixed; later in the slot: db runs, web is skipped and keeps its figures
    set_ctl(tmp_path / "hook-db", "pre", exit=0)
    rc, s, results, _ = run_due(cfg, "2026-05-04T04:00:00Z")
    assert rc == 0 and [x["vm"] for x in s["ran"]] == ["db"]
    r = cbt("run-due", "--config", cfg, "--now", "2026-05-04T04:30:00Z", "--metrics", metrics)
    assert r.returncode == 0, r.stderr
    samples, _ = parse_textfile(metrics.read_text())
    db = results[0]
    assert _get(samples, "cbt_last_success_timestamp_seconds", vm="db") == _unix(db["created"])
    assert _get(samples, "cbt_last_read_bytes", vm="db") == 512 << 10
    assert _get(samples, "cbt_last_success_timestamp_seconds", vm="web") == _unix(
        point["created"])
    assert _get(samples, "cbt_slot_missed", vm="db") == 0.0
    assert _get(samples, "cbt_job_failures_total", vm="db") == 0.0  # (this run's)
    assert len(listed(vault)) == 2


def test_label_values_are_escaped() -> None:
    """Backslash, double quote and newline in a label value, as the exposition format
    escapes them; the parser here reads back the same name."""
    name = 'a\\b"c\nd'
    text = render([VMMetrics(name, None, True, 2)])
    assert 'vm="a\\\\b\\"c\\nd"' in text
    samples, _ = parse_textfile(text)
    assert _get(samples, "cbt_slot_missed", vm=name) == 1.0
    assert _get(samples, "cbt_job_failures_total", vm=name) == 2.0


def test_a_metrics_file_in_a_missing_folder_is_refused_first(tmp_path: Path) -> None:
    """A folder that does not exist, or a folder given as the file: refused before any
    job runs (it would fail only at the end, after the backups)."""
    write_random_disk(tmp_path / "disks" / "os.img", 64 << 10, seed=1)
    cfg = write_config(tmp_path / "cbt.toml", {"p": {"schedule": "every 1h"}},
                       {"web": {"policy": "p", "disks": {"os": "disks/os.img"},
                                "snapshot": "none"}})
    assert cbt("init", "--encryption", "none", tmp_path / "vault").returncode == 0
    for cmd in ("run-due", "daemon"):
        r = cbt(cmd, "--config", cfg, "--metrics", tmp_path / "nowhere" / "cbt.prom")
        assert r.returncode != 0
        assert "--metrics" in one_error_line(r) and "nowhere" in one_error_line(r)
        r = cbt(cmd, "--config", cfg, "--metrics", tmp_path / "disks")  # the folder itself
        assert r.returncode != 0
        assert "--metrics" in one_error_line(r) and "disks" in one_error_line(r)
    assert listed(tmp_path / "vault") == []
