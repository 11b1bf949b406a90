"""`cbt run-due`: idempotent per slot, catch-up after downtime, retry of a failed slot,
JSON Lines and exit codes (issue 6).  Every run is a real `cbt` process; the
restores are compared with copies of the disks taken at backup time."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.cli import cbt
from helpers.images import assert_same_bytes, copy_disk, scribble, write_random_disk
from helpers.jobs import hook_argv, hook_lines, run_due, set_ctl, write_config
from helpers.vaults import listed_ids, point_record, restore


def _setup(tmp_path: Path, policies: dict[str, dict[str, object]],
           vms: dict[str, dict[str, object]]) -> tuple[Path, Path]:
    for vm in vms.values():
        for path in vm["disks"].values():  # type: ignore[attr-defined]
            write_random_disk(tmp_path / path, 256 << 10, seed=len(str(path)))
    cfg = write_config(tmp_path / "cbt.toml", policies, vms)
    assert cbt("init", "--encryption", "none", tmp_path / "vault").returncode == 0
    return cfg, tmp_path / "vault"


@pytest.mark.slow
def test_twice_in_a_slot_backs_up_once(tmp_path: Path) -> None:
    cfg, vault = _setup(tmp_path, {"p": {"schedule": "daily 02:00"}},
                        {"web": {"policy": "p", "disks": {"os": "disks/os.img"},
                                 "snapshot": "none"}})
    disk = tmp_path / "disks" / "os.img"
    # --now with an offset and a fraction: 04:10:30.25 CEST is 02:10:30Z.
    rc, s, results, _ = run_due(cfg, "2026-05-04T04:10:30.250+02:00")
    assert s["now"] == "2026-05-04T02:10:30Z"
    assert [(r["vm"], r["slot"], r["status"]) for r in s["ran"]] == [
        ("web", "2026-05-04T02:00:00Z", "succeeded")]
    assert s["skipped"] == []
    first = s["ran"][0]["recovery_point"]
    assert results[0]["created"] == "2026-05-04T02:10:30Z"  # created is --now, in UTC
    assert point_record(vault, first)["slot"] == "2026-05-04T02:00:00Z"
    day1 = copy_disk(disk, tmp_path / "truth" / "day1.img")

    scribble(disk, seed=1)
    # later in the same slot (up to the next 02:00): nothing runs, it says why
    for now in ("2026-05-04T02:10:31Z", "2026-05-04T12:00:00Z", "2026-05-05T01:59:59Z"):
        rc, s, results, _ = run_due(cfg, now)
        assert rc == 0 and s["ran"] == [] and results == []
        assert [x["vm"] for x in s["skipped"]] == ["web"]
    assert listed_ids(vault) == [first]

    # the next slot runs
    rc, s, results, _ = run_due(cfg, "2026-05-05T02:00:00Z")
    assert [(r["vm"], r["slot"]) for r in s["ran"]] == [("web", "2026-05-05T02:00:00Z")]
    second = s["ran"][0]["recovery_point"]
    assert results[0]["created"] == "2026-05-05T02:00:00Z"
    assert point_record(vault, second)["slot"] == "2026-05-05T02:00:00Z"
    assert listed_ids(vault) == [first, second]
    restore(vault, first, tmp_path / "r1")
    assert_same_bytes(tmp_path / "r1" / "os.img", day1)
    restore(vault, second, tmp_path / "r2")
    assert_same_bytes(tmp_path / "r2" / "os.img", disk)


@pytest.mark.slow
def test_after_downtime_only_the_latest_missed_slot_runs_once(tmp_path: Path) -> None:
    cfg, vault = _setup(
        tmp_path,
        {"six": {"schedule": "every 6h"}, "wk": {"schedule": "weekly mon,thu 09:00"}},
        {"a": {"policy": "six", "disks": {"d": "disks/a.img"}, "snapshot": "none"},
         "b": {"policy": "wk", "disks": {"d": "disks/b.img"}, "snapshot": "none"}})
    # Fri 2026-05-01 01:00Z: a's slot 00:00Z; b's latest is Thu 04-30 09:00
    rc, s, _, _ = run_due(cfg, "2026-05-01T01:00:00Z")
    assert {r["vm"]: r["slot"] for r in s["ran"]} == {"a": "2026-05-01T00:00:00Z",
                                                     "b": "2026-04-30T09:00:00Z"}
    # Down for 11 days: a missed 45 slots, b missed Mon 05-04, Thu 05-07 and Mon 05-11.
    # Tue 05-12 13:00Z: each runs once, for its latest slot only.
    rc, s, results, _ = run_due(cfg, "2026-05-12T13:00:00Z")
    assert rc == 0
    assert sorted((r["vm"], r["slot"]) for r in s["ran"]) == [
        ("a", "2026-05-12T12:00:00Z"), ("b", "2026-05-11T09:00:00Z")]
    assert len(results) == 2
    assert len(listed_ids(vault, "a")) == 2 and len(listed_ids(vault, "b")) == 2
    # and not again
    rc, s, _, _ = run_due(cfg, "2026-05-12T17:59:59Z")
    assert s["ran"] == [] and sorted(x["vm"] for x in s["skipped"]) == ["a", "b"]
    assert len(listed_ids(vault)) == 4


@pytest.mark.slow
def test_failed_slot_is_retried_at_the_next_call(tmp_path: Path) -> None:
    state = tmp_path / "hook"
    argv = hook_argv(state)
    cfg, vault = _setup(
        tmp_path, {"p": {"schedule": "daily 02:00,14:30"}},
        {"db": {"policy": "p", "disks": {"data": "disks/db.img"}, "snapshot": "none",
                "hooks": {"pre": argv, "post": argv, "timeout": 30,
                          "on_pre_failure": "fail"}},
         "web": {"policy": "p", "disks": {"os": "disks/web.img"}, "snapshot": "none"}})
    set_ctl(state, "pre", exit=3, stderr="pre hook told to fail once\n", once=True)
    # db's pre hook fails: its job fails ("fail" mode); web's succeeds; exit 2
    rc, s, results, stderr = run_due(cfg, "2026-06-01T03:00:00Z")
    assert rc == 2
    by_vm = {r["vm"]: r for r in s["ran"]}
    assert by_vm["db"]["status"] == "failed" and by_vm["db"]["recovery_point"] is None
    assert by_vm["db"]["slot"] == "2026-06-01T02:00:00Z"
    assert by_vm["web"]["status"] == "succeeded"
    error = next(x for x in results if x["vm"] == "db")
    assert error["type"] == "error" and error["message"]
    assert "error" in stderr and "db" in stderr
    assert listed_ids(vault, "db") == []
    assert not (state / "ctl-pre").exists()  # the hook did run and fail
    # the next call, still in the same slot, retries db's slot (and only that)
    rc, s, results, _ = run_due(cfg, "2026-06-01T03:05:00Z")
    assert rc == 0
    assert [(r["vm"], r["slot"], r["status"]) for r in s["ran"]] == [
        ("db", "2026-06-01T02:00:00Z", "succeeded")]
    assert [x["vm"] for x in s["skipped"]] == ["web"]
    point = s["ran"][0]["recovery_point"]
    assert point_record(vault, point)["slot"] == "2026-06-01T02:00:00Z"
    assert results[0]["created"] == "2026-06-01T03:05:00Z"
    assert sum(line.startswith("pre db") for line in hook_lines(state)) == 2
    # then nothing is due until 14:30
    rc, s, _, _ = run_due(cfg, "2026-06-01T14:29:00Z")
    assert s["ran"] == [] and sorted(x["vm"] for x in s["skipped"]) == ["db", "web"]
    restore(vault, point, tmp_path / "r")
    assert_same_bytes(tmp_path / "r" / "data.img", tmp_path / "disks" / "db.img")


@pytest.mark.slow
def test_a_failing_job_exits_2_and_is_retried_once_fixed(tmp_path: Path) -> None:
    cfg, vault = _setup(tmp_path, {"p": {"schedule": "every 8h"}},
                        {"gone": {"policy": "p", "disks": {"d": "disks/gone.img"},
                                  "snapshot": "none"}})
    disk = tmp_path / "disks" / "gone.img"
    disk.rename(tmp_path / "away.img")
    rc, s, results, _ = run_due(cfg, "2026-07-01T09:00:00Z")
    assert rc == 2
    assert [(r["vm"], r["slot"], r["status"]) for r in s["ran"]] == [
        ("gone", "2026-07-01T08:00:00Z", "failed")]
    assert results[0]["type"] == "error"
    (tmp_path / "away.img").rename(disk)
    rc, s, _, _ = run_due(cfg, "2026-07-01T09:30:00Z")
    assert rc == 0
    assert [(r["vm"], r["slot"], r["status"]) for r in s["ran"]] == [
        ("gone", "2026-07-01T08:00:00Z", "succeeded")]
    assert len(listed_ids(vault)) == 1


@pytest.mark.slow
def test_a_manual_backup_counts_for_its_slot(tmp_path: Path) -> None:
    """`cbt backup --config` records the slot its time falls in (the latest at or before
    it, in the policy's time zone): run-due right after does not back that VM up again,
    but does the VM the manual run left out, and the next slot runs as usual."""
    cfg, vault = _setup(tmp_path, {"p": {"schedule": "daily 02:00",
                                         "timezone": "Europe/Berlin"}},
                        {"web": {"policy": "p", "disks": {"os": "disks/os.img"},
                                 "snapshot": "none"},
                         "db": {"policy": "p", "disks": {"d": "disks/db.img"},
                                "snapshot": "none"}})
    # 03:30 CEST on May 4th: the slot is 02:00 CEST = 00:00Z
    r = cbt("backup", "--config", cfg, "--vm", "web", "--now", "2026-05-04T01:30:00Z",
            "--json")
    assert r.returncode == 0, r.stderr
    manual = listed_ids(vault, "web")
    assert len(manual) == 1
    assert point_record(vault, manual[0])["slot"] == "2026-05-04T00:00:00Z"
    rc, s, _, _ = run_due(cfg, "2026-05-04T01:31:00Z")
    assert rc == 0
    assert [(r["vm"], r["slot"]) for r in s["ran"]] == [("db", "2026-05-04T00:00:00Z")]
    assert [x["vm"] for x in s["skipped"]] == ["web"]
    assert manual[0] in s["skipped"][0]["reason"]
    assert listed_ids(vault, "web") == manual
    # 01:30 CEST on May 5th, before that day's 02:00: still the slot of May 4th
    r = cbt("backup", "--config", cfg, "--vm", "web", "--now", "2026-05-04T23:30:00Z")
    assert r.returncode == 0, r.stderr
    second = [p for p in listed_ids(vault, "web") if p not in manual]
    assert point_record(vault, second[0])["slot"] == "2026-05-04T00:00:00Z"
    # the next slot (02:00 CEST on May 5th) runs both
    rc, s, _, _ = run_due(cfg, "2026-05-05T00:30:00Z")
    assert sorted((r["vm"], r["slot"]) for r in s["ran"]) == [
        ("db", "2026-05-05T00:00:00Z"), ("web", "2026-05-05T00:00:00Z")]
    # the summary lines are for people: -q leaves them out (exit code as before)
    r = cbt("run-due", "--config", cfg, "--now", "2026-05-05T00:31:00Z")
    assert r.returncode == 0 and r.stdout.count("skipped, slot 2026-05-05T00:00:00Z") == 2
    r = cbt("run-due", "-q", "--config", cfg, "--now", "2026-05-05T00:32:00Z")
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", (r.stdout, r.stderr)
    r = cbt("run-due", "-q", "--config", cfg, "--now", "2026-05-06T00:32:00Z")
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", (r.stdout, r.stderr)
    assert len(listed_ids(vault, "db")) == 3  # (it did run)
