"""Retention and `cbt prune` against hand-written tables spanning years (issue 6).

Semantics under test (restic's ``--keep-*``): each count keeps the newest point
of that many most recent buckets *that have a point*; buckets are calendar
days, ISO weeks, months and years in the policy's time zone; the newest point
of each VM is always kept (``latest``); a missing count is 0; no retention
table keeps everything; points of VMs the config does not name are kept
(``no policy``).  Pruning a point that kept points are based on leaves them
restorable, bit for bit, also when prune is killed at any durable step.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers.cli import crash_env, run_in_session
from helpers.images import assert_same_bytes, copy_disk, random_bytes, scribble, write_disk
from helpers.jobs import run_due, write_config
from helpers.vaults import listed_ids, prune, restore, vault_state, verify_data_clean

from cbt.api import Vault
from cbt.jobs.policy import Retention, apply_retention
from cbt.source.disks import DiskSpec

UTC = dt.UTC

# Ten points of one VM over three calendar years.  Weekdays: 2026-01-05 and 01-12
# are Mondays, 01-11 a Sunday; 2026-01-01 is a Thursday, so ISO week 2026-W01 runs
# Mon 2025-12-29 .. Sun 2026-01-04, W02 01-05..01-11, W03 01-12..01-18.
POINTS = {
    "P01": "2024-03-10T12:00:00Z",
    "P02": "2024-11-20T08:00:00Z",
    "P03": "2025-06-01T09:00:00Z",  # 11:00 CEST
    "P04": "2025-12-31T23:00:00Z",  # Madrid: 2026-01-01 00:00 CET (new day, week, month, year)
    "P05": "2026-01-05T10:00:00Z",
    "P06": "2026-01-05T18:00:00Z",  # same day as P05, later
    "P07": "2026-01-11T10:00:00Z",  # Sunday: last day of W02
    "P08": "2026-01-12T23:30:00Z",  # Madrid: 2026-01-13 00:30, the day of P09 and P10
    "P09": "2026-01-13T10:00:00Z",
    "P10": "2026-01-13T20:00:00Z",
}
RULES = {"daily": 3, "weekly": 2, "monthly": 3, "yearly": 3}

# Expected reasons (rule, bucket) per point; [] = removed.
#   daily 3:   newest of the 3 most recent days that have a point
#   weekly 2:  ... ISO weeks; monthly 3: months; yearly 3: years
EXPECTED_UTC = {
    "P10": [("latest", ""), ("daily", "2026-01-13"), ("weekly", "2026-W03"),
            ("monthly", "2026-01"), ("yearly", "2026")],
    "P09": [],  # an older point of P10's day
    "P08": [("daily", "2026-01-12")],  # 23:30Z is still 01-12 in UTC
    "P07": [("daily", "2026-01-11"), ("weekly", "2026-W02")],
    "P06": [],  # 4th day back: daily is used up; W02 went to P07
    "P05": [],
    "P04": [("monthly", "2025-12"), ("yearly", "2025")],
    "P03": [("monthly", "2025-06")],  # 2025 went to P04
    "P02": [("yearly", "2024")],  # 4th month back; newest of 2024
    "P01": [],  # 2024 is P02's
}
EXPECTED_MADRID = {
    "P10": [("latest", ""), ("daily", "2026-01-13"), ("weekly", "2026-W03"),
            ("monthly", "2026-01"), ("yearly", "2026")],
    "P09": [],
    "P08": [],  # 00:30 local on 01-13: P10's day (and week)
    "P07": [("daily", "2026-01-11"), ("weekly", "2026-W02")],
    "P06": [("daily", "2026-01-05")],  # the third day that has a point
    "P05": [],
    "P04": [],  # 2026-01-01 local: its day is 4th back, its month and year are P10's
    "P03": [("monthly", "2025-06"), ("yearly", "2025")],
    "P02": [("monthly", "2024-11"), ("yearly", "2024")],
    "P01": [],
}


def _t(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _check(got: dict[str, list[str]], want: dict[str, list[tuple[str, str]]]) -> None:
    """Each point's reasons name exactly the expected rules and buckets."""
    assert set(got) == set(want)
    for pid, expected in want.items():
        reasons = got[pid]
        assert len(reasons) == len(expected), (pid, reasons, expected)
        for rule, bucket in expected:
            assert any(r.split()[0] == rule and bucket in r for r in reasons), (
                pid, rule, bucket, reasons)


@pytest.mark.parametrize(("tz", "want"), [("UTC", EXPECTED_UTC),
                                          ("Europe/Madrid", EXPECTED_MADRID)])
def test_retention_table_over_years(tz: str, want: dict[str, list[tuple[str, str]]]) -> None:
    got = apply_retention([(k, _t(v)) for k, v in POINTS.items()], Retention(**RULES), tz)
    _check(got, want)


SMALL_TABLES = [
    # (points, retention, zone, {point: kept?}, why)
    ({"a": "2026-01-01T10:00:00Z", "b": "2026-01-05T10:00:00Z", "c": "2026-01-09T10:00:00Z",
      "d": "2026-01-09T08:00:00Z"}, Retention(daily=3), "UTC",
     {"a": True, "b": True, "c": True, "d": False},
     "days without points do not count: 3 days that have one; the newest of 01-09"),
    ({"mon": "2025-12-29T12:00:00Z", "sun": "2026-01-04T12:00:00Z",
      "w52": "2025-12-28T12:00:00Z", "w51": "2025-12-21T12:00:00Z"},
     Retention(weekly=2), "UTC", {"sun": True, "mon": False, "w52": True, "w51": False},
     "ISO weeks: 2025-12-29 (Mon) is in 2026-W01 with 01-04; 12-28 is 2025-W52"),
    ({"a": "2025-12-31T22:30:00Z", "b": "2025-12-31T23:30:00Z", "c": "2026-02-01T12:00:00Z"},
     Retention(yearly=2), "Europe/Madrid", {"a": True, "b": False, "c": True},
     "23:30Z on 12-31 is 2026 in Madrid: b shares c's year; a (23:30 CET) is 2025"),
    ({"a": "2025-12-31T22:30:00Z", "b": "2025-12-31T23:30:00Z", "c": "2026-02-01T12:00:00Z"},
     Retention(yearly=2), "UTC", {"a": False, "b": True, "c": True},
     "the same points in UTC: a and b are both 2025, b is newer"),
    ({"a": "2026-03-01T00:00:00Z", "b": "2026-03-02T00:00:00Z"},
     Retention(), "UTC", {"a": False, "b": True},
     "every count missing (an empty table): only the latest"),
    ({"a": "2026-03-01T00:00:00Z", "b": "2026-03-02T00:00:00Z"},
     Retention(keep_all=True), "UTC", {"a": True, "b": True}, "no retention table: all"),
    ({"a": "2026-01-10T00:00:00Z", "b": "2026-02-10T00:00:00Z", "c": "2026-02-11T00:00:00Z",
      "d": "2026-03-01T00:00:00Z"}, Retention(monthly=2), "UTC",
     {"a": False, "b": False, "c": True, "d": True},
     "daily missing = 0: monthly 2 keeps 03 (d) and 02 (c, the newest of February)"),
    ({"a": "2026-03-28T23:30:00Z", "b": "2026-03-29T00:30:00Z", "c": "2026-03-29T22:30:00Z"},
     Retention(daily=2), "Europe/Madrid", {"a": False, "b": True, "c": True},
     "Madrid: a = 03-29 00:30 CET, b = 01:30 CET, c = 03-30 00:30 CEST: days 03-30, 03-29"),
]


@pytest.mark.parametrize(("points", "retention", "tz", "want", "why"), SMALL_TABLES,
                         ids=[c[4][:40] for c in SMALL_TABLES])
def test_retention_small_tables(points: dict[str, str], retention: Retention, tz: str,
                                want: dict[str, bool], why: str) -> None:
    got = apply_retention([(k, _t(v)) for k, v in points.items()], retention, tz)
    assert {k: bool(v) for k, v in got.items()} == want, why


# -- `cbt prune` on a real vault --------------------------------------------------------------

POLICIES = {
    "utc": {"schedule": "daily 02:00", "retention": RULES},
    "madrid": {"schedule": "daily 02:00", "timezone": "Europe/Madrid", "retention": RULES},
    "forever": {"schedule": "daily 02:00"},  # no retention table: keep everything
    "empty": {"schedule": "daily 02:00", "retention": {}},  # every count 0: the latest only
    "months": {"schedule": "daily 02:00", "retention": {"monthly": 2}},  # daily etc. = 0
}
VM_POLICY = {"u": "utc", "m": "madrid", "k": "forever", "e": "empty", "w": "months"}


def _backup(vault: Vault, vm: str, disk: Path, created: str) -> str:
    return vault.backup(vm, [DiskSpec("os", str(disk))], created=created, workers=1).id


@pytest.mark.slow
def test_prune_table_over_years(tmp_path: Path) -> None:
    disk = write_disk(tmp_path / "disks" / "os.img", random_bytes(64 << 10, seed=7))
    vms = {vm: {"policy": pol, "disks": {"os": "disks/os.img"}, "snapshot": "none"}
           for vm, pol in VM_POLICY.items()}
    cfg = write_config(tmp_path / "cbt.toml", POLICIES, vms)
    vault = Vault.init(tmp_path / "vault")
    ids: dict[tuple[str, str], str] = {}
    for k, (name, created) in enumerate(POINTS.items()):
        scribble(disk, seed=k, pages=2)
        for vm in [*VM_POLICY, "x"]:  # x: a VM the config does not name
            ids[vm, name] = _backup(vault, vm, disk, created)
    now = "2026-01-14T00:00:00Z"

    before = vault_state(tmp_path / "vault")
    dry = prune(cfg, now, dry_run=True)
    assert vault_state(tmp_path / "vault") == before, "--dry-run changed the vault"
    out = prune(cfg, now)
    assert {k: v for k, v in dry.items() if k != "dry_run"} == {
        k: v for k, v in out.items() if k != "dry_run"}, "dry run and real run differ"
    assert out["snapshots_expired"] == 0

    rows = {p["recovery_point"]: p for p in out["points"]}
    assert set(rows) == set(ids.values()), "every point is listed once"
    for (vm, _name), pid in ids.items():
        assert rows[pid]["vm"] == vm
    by_name = {vm: {name: rows[ids[vm, name]] for name in POINTS} for vm in [*VM_POLICY, "x"]}

    for vm, want in (("u", EXPECTED_UTC), ("m", EXPECTED_MADRID)):
        _check({n: r["reasons"] if r["keep"] else [] for n, r in by_name[vm].items()}, want)
        for name, row in by_name[vm].items():
            assert row["keep"] is bool(want[name]), (vm, name, row)
    # no retention table: everything, the newest as latest
    assert all(r["keep"] for r in by_name["k"].values())
    assert "latest" in by_name["k"]["P10"]["reasons"]
    # retention = {}: every count is 0, only the latest
    assert {n for n, r in by_name["e"].items() if r["keep"]} == {"P10"}
    assert by_name["e"]["P10"]["reasons"] == ["latest"]
    # only monthly = 2 (UTC): 2026-01 -> P10, 2025-12 -> P04
    assert {n for n, r in by_name["w"].items() if r["keep"]} == {"P10", "P04"}
    # a VM the config does not name: all kept, "no policy"
    assert all(r["keep"] and "no policy" in r["reasons"] for r in by_name["x"].values())

    kept = {pid for pid, r in rows.items() if r["keep"]}
    assert set(listed_ids(tmp_path / "vault")) == kept
    # pruning again at the same time removes nothing more
    again = prune(cfg, now)
    assert all(p["keep"] for p in again["points"])
    assert {p["recovery_point"] for p in again["points"]} == kept


@pytest.mark.slow
def test_latest_is_kept_even_when_ten_points_share_a_second(tmp_path: Path) -> None:
    """Eleven points created in one second get ids ...Z, ...Z-2, ..., ...Z-11; the
    newest (the last one made, what VM.latest restores) must be the one kept."""
    disk = tmp_path / "d.img"
    cfg = write_config(tmp_path / "cbt.toml",
                       {"p": {"schedule": "daily 10:00", "retention": {"daily": 1}}},
                       {"a": {"policy": "p", "disks": {"d": "d.img"}, "snapshot": "none"}})
    vault = Vault.init(tmp_path / "vault")
    made = []
    for i in range(11):
        write_disk(disk, np.full(64 << 10, i + 1, dtype=np.uint8))
        made.append(vault.backup("a", [DiskSpec("d", str(disk))],
                                 created="2026-01-01T10:00:00Z", workers=1).id)
    newest = made[-1]
    out = prune(cfg, "2026-01-02T00:00:00Z", dry_run=True)
    kept = [p for p in out["points"] if p["keep"]]
    assert [p["recovery_point"] for p in kept] == [newest], kept
    assert "latest" in kept[0]["reasons"]


# -- pruning bases that kept points depend on ---------------------------------------------------


def _restore_all(vault: Path, truth: dict[str, Path], out: Path, cli: bool = False) -> None:
    """Restore every listed point (in this process, or with `cbt restore` processes)."""
    ids = listed_ids(vault)
    assert ids
    for pid in ids:
        if cli:
            restore(vault, pid, out / pid)
        else:
            Vault.open(vault).restore(pid, out / pid, workers=1)
        assert_same_bytes(out / pid / "os.img", truth[pid])


@pytest.mark.slow
def test_pruning_bases_keeps_dependants_restorable(tmp_path: Path) -> None:
    """20 daily points (the first the full baseline every later one builds on), pruned
    to 5; every kept point restores bit for bit; four more days through run-due,
    pruned again; all restore again; verify --data is clean each time."""
    disk = write_disk(tmp_path / "disks" / "os.img", random_bytes(1 << 20, seed=3))
    cfg = write_config(
        tmp_path / "cbt.toml",
        {"p": {"schedule": "daily 12:00", "retention": {"daily": 4, "weekly": 2}}},
        {"web": {"policy": "p", "disks": {"os": "disks/os.img"}, "snapshot": "none"}})
    vault_dir = tmp_path / "vault"
    vault = Vault.init(vault_dir)
    truth: dict[str, Path] = {}
    day_of: dict[str, int] = {}
    for day in range(1, 21):  # 2026-02-01 (a Sunday) .. 02-20
        if day > 1:
            scribble(disk, seed=day, pages=6)
        if day == 9:  # a longer run of change too
            fd = os.open(disk, os.O_WRONLY)
            os.pwrite(fd, random_bytes(200 << 10, seed=99).tobytes(), 300 << 10)
            os.close(fd)
        pid = _backup(vault, "web", disk, f"2026-02-{day:02d}T12:00:00Z")
        truth[pid] = copy_disk(disk, tmp_path / "truth" / f"{pid}.img")
        day_of[pid] = day
    out = prune(cfg, "2026-02-20T13:00:00Z")
    # daily 4: 02-20, 19, 18, 17; weekly 2: W08 (02-16..22) -> 02-20, W07 (02-09..15) -> 02-15
    kept = {day_of[p["recovery_point"]] for p in out["points"] if p["keep"]}
    assert kept == {15, 17, 18, 19, 20}
    assert sorted(day_of[p] for p in listed_ids(vault_dir)) == [15, 17, 18, 19, 20]
    _restore_all(vault_dir, truth, tmp_path / "restored1")
    verify_data_clean(vault_dir)

    for day in range(21, 25):  # 02-21 .. 02-24 through run-due
        scribble(disk, seed=100 + day, pages=6)
        rc, s, _, _ = run_due(cfg, f"2026-02-{day:02d}T12:30:00Z")
        assert rc == 0 and [r["status"] for r in s["ran"]] == ["succeeded"]
        pid = s["ran"][0]["recovery_point"]
        truth[pid] = copy_disk(disk, tmp_path / "truth" / f"{pid}.img")
        day_of[pid] = day
    _restore_all(vault_dir, truth, tmp_path / "restored2")
    out = prune(cfg, "2026-02-24T13:00:00Z")
    # daily 4: 24, 23, 22, 21; weekly 2: W09 (02-23..03-01) -> 24, W08 (02-16..22) -> 22
    kept = {day_of[p["recovery_point"]] for p in out["points"] if p["keep"]}
    assert kept == {21, 22, 23, 24}
    _restore_all(vault_dir, truth, tmp_path / "restored3", cli=True)
    verify_data_clean(vault_dir)


@pytest.mark.slow
def test_prune_killed_at_every_durable_step(tmp_path: Path) -> None:
    """kill -9 of prune at its N-th durable step, for every N: every point still listed
    restores bit for bit and the vault verifies; a prune run to the end then leaves
    exactly what the policy keeps."""
    disk = write_disk(tmp_path / "disks" / "os.img", random_bytes(256 << 10, seed=5))
    cfg = write_config(
        tmp_path / "cbt.toml",
        {"p": {"schedule": "daily 12:00", "retention": {"daily": 2}}},
        {"web": {"policy": "p", "disks": {"os": "disks/os.img"}, "snapshot": "none"}})
    vault_dir = tmp_path / "vault"
    truth: dict[str, Path] = {}
    pristine = tmp_path / "pristine"
    vault = Vault.init(pristine)
    order = []
    for day in range(1, 9):
        if day > 1:
            scribble(disk, seed=day, pages=4)
        pid = _backup(vault, "web", disk, f"2026-03-{day:02d}T12:00:00Z")
        truth[pid] = copy_disk(disk, tmp_path / "truth" / f"{pid}.img")
        order.append(pid)
    expected = set(order[-2:])
    completed = False
    for n in range(1, 40):
        if vault_dir.exists():
            shutil.rmtree(vault_dir)
        shutil.copytree(pristine, vault_dir)
        r = run_in_session("prune", "--config", cfg, "--now", "2026-03-09T00:00:00Z",
                           env=crash_env(n, tmp_path))
        v = Vault.open(vault_dir)
        for pid in [p.id for p in v.points()]:
            out = tmp_path / "r" / f"{n}-{pid}"
            v.restore(pid, out, workers=1)
            assert_same_bytes(out / "os.img", truth[pid])
        assert v.verify()["problems"] == [], n
        assert set(expected) <= {p.id for p in v.points()}, n
        if r.returncode == 0:
            completed = True
            break
        assert r.returncode == -9, (n, r.returncode, r.stderr)
        # the next prune finishes the job
        r2 = run_in_session("prune", "--config", cfg, "--now", "2026-03-09T00:00:00Z")
        assert r2.returncode == 0, r2.stderr
        v = Vault.open(vault_dir)
        assert {p.id for p in v.points()} == expected, n
        for pid in expected:
            out = tmp_path / "r" / f"{n}-after-{pid}"
            v.restore(pid, out, workers=1)
            assert_same_bytes(out / "os.img", truth[pid])
    assert completed and n > 1, "prune made no durable step"
    assert {p.id for p in Vault.open(vault_dir).points()} == expected
