"""Retention rules ``last``, ``hourly`` and ``within`` (issue 16), against hand-written tables.

Semantics under test (restic's ``--keep-last``, ``--keep-hourly``, ``--keep-within``):
``last = N`` keeps the N newest points; ``hourly = N`` the newest point of each of
the N most recent wall-clock hours that have one, in the policy's time zone (the
two 02:xx hours of the night the clocks go back are one hour, as in restic);
``within = "1y2m3d4h"`` keeps the points strictly newer than the VM's newest point
less the duration, the calendar part stepped on the local date with Go's
``AddDate`` roll-over (2026-03-31 less a month is 2026-03-03), then the hours.
Each expected cutoff below is worked out by hand in the comment beside it.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest
from helpers.images import write_disk
from helpers.jobs import write_config
from helpers.vaults import listed_ids, prune

from cbt.api import Vault
from cbt.jobs.policy import Retention, apply_retention, parse_within
from cbt.source.disks import DiskSpec


def _t(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _apply(points: dict[str, str], retention: Retention, tz: str) -> dict[str, list[str]]:
    return apply_retention([(k, _t(v)) for k, v in points.items()], retention, tz)


# Madrid, 2025-10-26: at 03:00 CEST (01:00Z) the clocks go back to 02:00 CET.
FALL_BACK = {
    "f": "2025-10-25T22:59:00Z",  # 00:59 CEST
    "e": "2025-10-25T23:30:00Z",  # 01:30 CEST
    "a": "2025-10-26T00:10:00Z",  # 02:10 CEST
    "b": "2025-10-26T00:50:00Z",  # 02:50 CEST
    "c": "2025-10-26T01:20:00Z",  # 02:20 CET: the same wall-clock hour 02 as a and b
    "d": "2025-10-26T02:05:00Z",  # 03:05 CET
}
# Kolkata is UTC+05:30: its hours start at :30 UTC.
HALF_HOUR = {"x": "2026-01-01T04:20:00Z",  # 09:50 IST
             "y": "2026-01-01T04:40:00Z",  # 10:10 IST
             "z": "2026-01-01T04:50:00Z"}  # 10:20 IST

# (points, retention, zone, {point: expected reasons}, why)
TABLES = [
    ({"p1": "2026-01-01T00:00:00Z", "p2": "2026-01-02T00:00:00Z", "p3": "2026-01-03T00:00:00Z",
      "p4": "2026-01-04T00:00:00Z", "p5": "2026-01-05T00:00:00Z"}, Retention(last=3), "UTC",
     {"p5": ["latest", "last 3"], "p4": ["last 3"], "p3": ["last 3"], "p2": [], "p1": []},
     "last 3: the three newest"),
    ({"p1": "2026-01-01T10:00:00Z", "p2": "2026-01-01T11:00:00Z", "p3": "2026-01-01T12:00:00Z"},
     Retention(last=1, daily=2), "UTC",
     {"p3": ["latest", "last 1", "daily 2026-01-01"], "p2": [], "p1": []},
     "last 1 and daily: one day only, the newest of it"),
    ({"p1": "2026-01-01T00:00:00Z", "p2": "2026-01-02T00:00:00Z"}, Retention(last=100_000),
     "UTC", {"p2": ["latest", "last 100000"], "p1": ["last 100000"]},
     "last above the number of points: all"),
    (FALL_BACK, Retention(hourly=3), "Europe/Madrid",
     {"d": ["latest", "hourly 2025-10-26T03"], "c": ["hourly 2025-10-26T02"], "b": [],
      "a": [], "e": ["hourly 2025-10-26T01"], "f": []},
     "Madrid: c (02:20 CET) shares hour 02 with a and b (02:xx CEST); then hour 01"),
    (FALL_BACK, Retention(hourly=3), "UTC",
     {"d": ["latest", "hourly 2025-10-26T02"], "c": ["hourly 2025-10-26T01"],
      "b": ["hourly 2025-10-26T00"], "a": [], "e": [], "f": []},
     "the same points in UTC: hours 02, 01, 00"),
    (HALF_HOUR, Retention(hourly=2), "Asia/Kolkata",
     {"z": ["latest", "hourly 2026-01-01T10"], "y": [], "x": ["hourly 2026-01-01T09"]},
     "Kolkata: x is hour 09, y and z hour 10"),
    (HALF_HOUR, Retention(hourly=2), "UTC",
     {"z": ["latest", "hourly 2026-01-01T04"], "y": [], "x": []},
     "in UTC all three are hour 04"),
    # latest 03-31 12:00 less a month: "02-31" rolls over to 03-03 12:00 (2026: no 02-29)
    ({"new": "2026-03-31T12:00:00Z", "edge": "2026-03-03T12:00:00Z",
      "in": "2026-03-03T12:00:01Z", "old": "2026-03-01T12:00:00Z"},
     Retention(within=parse_within("1m")), "UTC",
     {"new": ["latest", "within 1m"], "in": ["within 1m"], "edge": [], "old": []},
     "within 1m: Go's roll-over; a point at the cutoff itself is not newer"),
    # latest 2026-05-10 10:00 less 1y 2m 3d: 2025-03-07 10:00, less 4h: 06:00
    ({"new": "2026-05-10T10:00:00Z", "in": "2025-03-07T06:00:01Z",
      "edge": "2025-03-07T06:00:00Z"},
     Retention(within=parse_within("1y2m3d4h")), "UTC",
     {"new": ["latest", "within 1y2m3d4h"], "in": ["within 1y2m3d4h"], "edge": []},
     "within 1y2m3d4h: calendar years, months, days, then hours"),
    # latest 03-29 12:00Z = 14:00 CEST; a day back is 03-28 14:00 CET = 13:00Z (25 hours)
    ({"new": "2026-03-29T12:00:00Z", "in": "2026-03-28T13:30:00Z",
      "out": "2026-03-28T12:30:00Z"},
     Retention(within=parse_within("1d")), "Europe/Madrid",
     {"new": ["latest", "within 1d"], "in": ["within 1d"], "out": []},
     "Madrid: a calendar day across the spring change is 25 hours"),
    ({"new": "2026-03-29T12:00:00Z", "in": "2026-03-28T13:30:00Z",
      "out": "2026-03-28T12:30:00Z"},
     Retention(within=parse_within("1d")), "UTC",
     {"new": ["latest", "within 1d"], "in": ["within 1d"], "out": ["within 1d"]},
     "the same in UTC: 24 hours, both kept"),
    # wall times the clocks skip or repeat resolve as Go's time.Date does (restic's AddDate):
    # latest 03-30 00:30Z = 02:30 CEST; 03-29 02:30 is skipped: 02:30 "as UTC" is in
    # CEST (+2), 00:30Z is not, so CET's +1: 01:30Z (the first instant after the gap,
    # 01:00Z, kept 'out' too)
    ({"new": "2026-03-30T00:30:00Z", "in": "2026-03-29T01:40:00Z",
      "out": "2026-03-29T01:20:00Z"},
     Retention(within=parse_within("1d")), "Europe/Berlin",
     {"new": ["latest", "within 1d"], "in": ["within 1d"], "out": []},
     "Berlin: a skipped wall time as Go resolves it"),
    # latest 10-26 01:30Z = 02:30 CET; 10-25 02:30 happens twice (00:30Z, 01:30Z): Go
    # takes CET's, 01:30Z (the first occurrence kept 'out' too)
    ({"new": "2026-10-26T01:30:00Z", "in": "2026-10-25T01:40:00Z",
      "out": "2026-10-25T01:00:00Z"},
     Retention(within=parse_within("1d")), "Europe/Berlin",
     {"new": ["latest", "within 1d"], "in": ["within 1d"], "out": []},
     "Berlin: a repeated wall time as Go resolves it"),
    # latest 03-09 06:30Z = 02:30 EDT; 03-08 02:30 is skipped: 02:30Z is in EST (-5),
    # 07:30Z is not, so EDT's -4: 06:30Z (the first instant after the gap, 07:00Z,
    # removed 'in': fewer kept than restic keeps)
    ({"new": "2026-03-09T06:30:00Z", "in": "2026-03-08T06:45:00Z",
      "out": "2026-03-08T06:20:00Z"},
     Retention(within=parse_within("1d")), "America/New_York",
     {"new": ["latest", "within 1d"], "in": ["within 1d"], "out": []},
     "New York: a skipped wall time as Go resolves it"),
    ({"new": "2026-03-29T12:00:00Z", "old": "1970-01-01T00:00:00Z"},
     Retention(within=parse_within("999999y")), "UTC",
     {"new": ["latest", "within 999999y"], "old": ["within 999999y"]},
     "a duration reaching before year 1 keeps everything"),
    ({"new": "2026-01-20T00:00:00Z", "mid": "2026-01-10T00:00:00Z",
      "old": "2025-12-01T00:00:00Z"},
     Retention(within=parse_within("14d"), monthly=2), "UTC",
     {"new": ["latest", "monthly 2026-01", "within 14d"], "mid": ["within 14d"],
      "old": ["monthly 2025-12"]},
     "within adds to the counts; mid, 10 days older than new, is kept"),
]


@pytest.mark.parametrize(("points", "retention", "tz", "want", "why"), TABLES,
                         ids=[c[4][:40] for c in TABLES])
def test_retention_rules_table(points: dict[str, str], retention: Retention, tz: str,
                               want: dict[str, list[str]], why: str) -> None:
    got = _apply(points, retention, tz)
    assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in want.items()}, \
        why


def test_within_is_relative_to_the_newest_point_not_now() -> None:
    """Points two years old: within 14d still keeps those 14 days from the newest."""
    pts = {"a": "2024-01-20T00:00:00Z", "b": "2024-01-10T00:00:00Z",
           "c": "2024-01-01T00:00:00Z"}
    got = _apply(pts, Retention(within=parse_within("14d")), "UTC")
    assert {k for k, v in got.items() if v} == {"a", "b"}


@pytest.mark.parametrize("text", ["", "14", "2w", "1d1y", "0d", "0y0m", "d", "1.5d",
                                  "14 days", "-1d", "1y 2m"])
def test_bad_durations(text: str) -> None:
    from cbt.core.errors import CbtValueError

    with pytest.raises(CbtValueError, match="not a duration"):
        parse_within(text)


def test_prune_with_last_and_within_on_a_vault(tmp_path: Path) -> None:
    """`cbt prune` with last = 2 and within = "3d": the rules reach a real vault."""
    disk = tmp_path / "d.img"
    cfg = write_config(tmp_path / "cbt.toml",
                       {"p": {"schedule": "daily 10:00",
                              "retention": {"last": 2, "within": "3d"}}},
                       {"a": {"policy": "p", "disks": {"d": "d.img"}, "snapshot": "none"}})
    vault = Vault.init(tmp_path / "vault")
    made = {}
    for day in (1, 5, 10, 11, 12, 13):
        write_disk(disk, np.full(64 << 10, day, dtype=np.uint8))
        made[day] = vault.backup("a", [DiskSpec("d", str(disk))],
                                 created=f"2026-01-{day:02d}T10:00:00Z", workers=1).id
    out = prune(cfg, "2026-06-01T00:00:00Z")
    reasons = {p["recovery_point"]: p["reasons"] for p in out["points"] if p["keep"]}
    # newest 01-13 10:00 less 3 days: 01-10 10:00 (not newer); last 2: 13, 12
    assert reasons == {made[13]: ["latest", "last 2", "within 3d"],
                       made[12]: ["last 2", "within 3d"], made[11]: ["within 3d"]}
    assert set(listed_ids(tmp_path / "vault")) == {made[11], made[12], made[13]}


def test_within_at_the_end_of_the_calendar() -> None:
    """A newest point in the last hour of year 9999, in a zone east of UTC (its local time
    is in year 10000): no traceback; the cutoff cannot be worked out, so everything is
    kept (as for a duration reaching before year 1)."""
    got = _apply({"new": "9999-12-31T23:30:00Z", "old": "2026-01-01T00:00:00Z"},
                 Retention(within=parse_within("1h")), "Asia/Tokyo")
    assert got == {"new": ["latest", "within 1h"], "old": ["within 1h"]}
