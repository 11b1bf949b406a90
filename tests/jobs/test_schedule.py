"""Schedules against hand-written tables: cbt.policy, and `cbt run-due --now` (issue 6).

Every expected instant below was worked out by hand from the time-zone rules
(not computed with zoneinfo), with the reasoning in a comment.  The rules used:

- Europe/Madrid 2026: CET (+01) until Sun 2026-03-29 01:00Z, when 02:00 local
  jumps to 03:00 CEST (+02); back at Sun 2026-10-25 01:00Z, when 03:00 CEST
  falls back to 02:00 CET, so 02:00-02:59 local happens twice.
- America/New_York 2026: EST (-05) until Sun 2026-03-08 07:00Z (02:00 -> 03:00
  EDT, -04); back on Sun 2026-11-01 06:00Z (02:00 EDT -> 01:00 EST).
- Australia/Lord_Howe 2026: a half-hour shift.  LHDT (+11) until Sun
  2026-04-05 02:00 local, which falls back to 01:30 LHST (+10:30), so
  01:30-01:59 happens twice; LHST until Sun 2026-10-04 02:00 local, which jumps
  to 02:30 LHDT.
- A local time in a gap runs at the first instant after the gap; a repeated one
  runs once, at its first occurrence; "every Nh" is local 00:00 + k*N.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from helpers.cli import cbt, json_lines
from helpers.images import random_bytes, write_disk
from helpers.jobs import run_due, write_config

from cbt.core.errors import CbtValueError
from cbt.core.timefmt import parse_now
from cbt.jobs.policy import latest_slot, next_slot, parse_schedule, slots_between

UTC = dt.UTC


def Z(text: str) -> dt.datetime:
    """A hand-written UTC instant ("2026-03-29T01:00Z")."""
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def hours(day: str, first: int, last: int, minute: int = 0) -> list[str]:
    """UTC instants DAYTfirst:MM .. DAYTlast:MM, one per hour."""
    return [f"{day}T{h:02d}:{minute:02d}Z" for h in range(first, last + 1)]


def slots(schedule: str, tz: str, start: str, end: str) -> list[dt.datetime]:
    return slots_between(parse_schedule(schedule), tz, Z(start), Z(end))


# -- parsing -----------------------------------------------------------------------------------

GOOD_SCHEDULES = [
    ("daily 02:00", "daily", ((2, 0),), (), 0),
    ("daily 14:30,02:00", "daily", ((2, 0), (14, 30)), (), 0),  # times come out sorted
    ("weekly mon,thu 09:00", "weekly", ((9, 0),), (0, 3), 0),  # Monday = 0, Thursday = 3
    ("weekly sun,mon 00:00,23:59", "weekly", ((0, 0), (23, 59)), (0, 6), 0),
    ("every 6h", "every", (), (), 6),
    ("every 8h", "every", (), (), 8),
    ("every 1h", "every", (), (), 1),
    ("every 24h", "every", (), (), 24),
]


@pytest.mark.parametrize(("text", "kind", "times", "days", "every"), GOOD_SCHEDULES)
def test_schedule_grammar_accepts(text: str, kind: str, times: tuple[tuple[int, int], ...],
                                  days: tuple[int, ...], every: int) -> None:
    s = parse_schedule(text)
    assert (s.kind, s.times, s.days, s.hours) == (kind, times, days, every)


@pytest.mark.parametrize("text", [
    "every 5h",  # 5 does not divide 24
    "every 7h",
    "every 0h",
    "every 48h",  # more than a day does not divide it either
    "daily 24:00",
    "daily 12:60",
    "weekly funday 09:00",
    "weekly mon",  # no time
    "hourly",
    "",
])
def test_schedule_grammar_rejects(text: str) -> None:
    with pytest.raises(CbtValueError):
        parse_schedule(text)


@pytest.mark.parametrize(("text", "utc"), [
    ("2026-03-29T01:00:00Z", "2026-03-29T01:00Z"),
    ("2026-03-29T03:00:00+02:00", "2026-03-29T01:00Z"),  # 03:00 CEST, just after the gap
    ("2026-03-28T21:00:00-04:00", "2026-03-29T01:00Z"),  # the same instant seen from New York
    ("2026-10-25T02:30:00+01:00", "2026-10-25T01:30Z"),  # the second 02:30 in Madrid
    ("2026-10-25T02:30:00+02:00", "2026-10-25T00:30Z"),  # the first one
])
def test_parse_now_needs_an_offset_and_gives_utc(text: str, utc: str) -> None:
    assert parse_now(text) == Z(utc)
    assert parse_now(text).utcoffset() == dt.timedelta(0)


@pytest.mark.parametrize("text", ["2026-03-29T01:00:00", "2026-03-29", "garbage", "",
                                  "2026-13-01T00:00:00Z"])
def test_parse_now_rejects(text: str) -> None:
    with pytest.raises(CbtValueError):
        parse_now(text)


# -- one day's slots ------------------------------------------------------------------------------

DAY_TABLE = [
    # (schedule, zone, UTC window [start, end], the slots in it, why)
    ("daily 02:00,14:30", "UTC", "2026-03-10T00:00Z", "2026-03-10T23:59Z",
     ["2026-03-10T02:00Z", "2026-03-10T14:30Z"], "two times a day"),
    ("weekly mon,thu 09:00", "UTC", "2026-03-01T00:00Z", "2026-03-14T23:59Z",
     ["2026-03-02T09:00Z", "2026-03-05T09:00Z", "2026-03-09T09:00Z", "2026-03-12T09:00Z"],
     "2026-03-02 and 03-09 are Mondays, 03-05 and 03-12 Thursdays"),
    ("every 6h", "UTC", "2026-03-10T00:00Z", "2026-03-10T23:59Z",
     hours("2026-03-10", 0, 18)[::6], "00, 06, 12, 18"),
    ("every 8h", "UTC", "2026-03-10T00:00Z", "2026-03-10T23:59Z",
     ["2026-03-10T00:00Z", "2026-03-10T08:00Z", "2026-03-10T16:00Z"], "00, 08, 16"),
    ("daily 02:00,14:30", "Europe/Madrid", "2026-01-14T23:00Z", "2026-01-15T22:59Z",
     ["2026-01-15T01:00Z", "2026-01-15T13:30Z"], "winter: local = UTC+1"),
    ("daily 02:00,14:30", "Europe/Madrid", "2026-07-14T22:00Z", "2026-07-15T21:59Z",
     ["2026-07-15T00:00Z", "2026-07-15T12:30Z"], "summer: local = UTC+2"),
    ("every 8h", "America/New_York", "2026-03-08T05:00Z", "2026-03-09T03:59Z",
     ["2026-03-08T05:00Z", "2026-03-08T12:00Z", "2026-03-08T20:00Z"],
     "spring-forward day: 00:00 EST = 05Z, then 08:00 and 16:00 EDT = 12Z and 20Z"),
    ("every 8h", "America/New_York", "2026-11-01T04:00Z", "2026-11-02T04:59Z",
     ["2026-11-01T04:00Z", "2026-11-01T13:00Z", "2026-11-01T21:00Z"],
     "fall-back day: 00:00 EDT = 04Z, then 08:00 and 16:00 EST = 13Z and 21Z"),
    ("daily 02:30", "Europe/Madrid", "2026-03-28T00:00Z", "2026-03-30T23:59Z",
     ["2026-03-28T01:30Z", "2026-03-29T01:00Z", "2026-03-30T00:30Z"],
     "CET day; then 02:30 does not exist on 03-29: the first instant after the gap is "
     "03:00 CEST = 01:00Z; then a CEST day"),
    ("daily 02:00", "Europe/Madrid", "2026-03-29T00:00Z", "2026-03-29T23:59Z",
     ["2026-03-29T01:00Z"], "02:00 itself is the first missing minute: runs at 03:00 CEST"),
    ("daily 03:00", "Europe/Madrid", "2026-03-29T00:00Z", "2026-03-29T23:59Z",
     ["2026-03-29T01:00Z"], "03:00 CEST exists: also 01:00Z"),
    ("daily 02:30", "Europe/Madrid", "2026-10-24T00:00Z", "2026-10-26T23:59Z",
     ["2026-10-24T00:30Z", "2026-10-25T00:30Z", "2026-10-26T01:30Z"],
     "02:30 happens at 00:30Z (CEST) and 01:30Z (CET) on 10-25: once, the first"),
    ("weekly sun 02:30", "Europe/Madrid", "2026-03-22T00:00Z", "2026-04-05T23:59Z",
     ["2026-03-22T01:30Z", "2026-03-29T01:00Z", "2026-04-05T00:30Z"],
     "a weekly slot on the spring-forward Sunday itself"),
    ("daily 02:30", "America/New_York", "2026-03-07T12:00Z", "2026-03-09T11:59Z",
     ["2026-03-08T07:00Z", "2026-03-09T06:30Z"],
     "02:30 does not exist on 03-08: 03:00 EDT = 07:00Z; then 02:30 EDT = 06:30Z"),
    ("daily 01:30", "America/New_York", "2026-11-01T00:00Z", "2026-11-01T23:59Z",
     ["2026-11-01T05:30Z"], "01:30 EDT (05:30Z), not 01:30 EST (06:30Z)"),
    ("daily 02:15", "Australia/Lord_Howe", "2026-10-02T13:00Z", "2026-10-05T12:59Z",
     ["2026-10-02T15:45Z", "2026-10-03T15:30Z", "2026-10-04T15:15Z"],
     "02:15 LHST (+10:30) = 15:45Z; on 10-04 02:00-02:29 is a gap: 02:30 LHDT = 15:30Z; "
     "then 02:15 LHDT (+11) = 15:15Z"),
    ("every 6h", "America/Havana", "2026-03-08T05:00Z", "2026-03-09T03:59Z",
     ["2026-03-08T05:00Z", "2026-03-08T10:00Z", "2026-03-08T16:00Z", "2026-03-08T22:00Z"],
     "Cuba springs forward at midnight: 00:00 CST does not exist, the day starts at "
     "01:00 CDT = 05:00Z; then 06, 12, 18 CDT (-04)"),
    ("daily 01:45", "Australia/Lord_Howe", "2026-04-03T13:00Z", "2026-04-05T13:29Z",
     ["2026-04-03T14:45Z", "2026-04-04T14:45Z"],
     "01:45 on 04-05 happens at 14:45Z (LHDT) and 15:15Z (LHST) on 04-04: the first"),
]


@pytest.mark.parametrize(("schedule", "tz", "start", "end", "want", "why"), DAY_TABLE,
                         ids=[f"{c[0]}|{c[1]}|{c[2][:10]}" for c in DAY_TABLE])
def test_slots_table(schedule: str, tz: str, start: str, end: str, want: list[str],
                     why: str) -> None:
    got = slots(schedule, tz, start, end)
    assert got == [Z(w) for w in want], why


HOURLY_DAYS = [
    # every 1h over one local calendar day: [local 00:00, next local 00:00) in UTC.
    # Spring-forward, Madrid 03-29: 24 wall times 00:00..23:00; 02:00 does not exist and
    # moves to the first instant after the gap, 03:00 CEST = 01:00Z, which is also the
    # slot of 03:00 itself: counted once -> 23 slots, one per real hour.
    ("Europe/Madrid", "2026-03-28T23:00Z", "2026-03-29T21:59Z",
     ["2026-03-28T23:00Z", "2026-03-29T00:00Z", *hours("2026-03-29", 1, 21)], 23),
    # Fall-back, Madrid 10-25: 24 wall times; 02:00 happens twice (00:00Z CEST, 01:00Z
    # CET) and runs once, the first time -> 24 slots in a 25-hour day, none at 01:00Z.
    ("Europe/Madrid", "2026-10-24T22:00Z", "2026-10-25T22:59Z",
     ["2026-10-24T22:00Z", "2026-10-24T23:00Z", "2026-10-25T00:00Z",
      *hours("2026-10-25", 2, 22)], 24),
    # An ordinary Madrid day: 24.
    ("Europe/Madrid", "2026-06-09T22:00Z", "2026-06-10T21:59Z",
     [*hours("2026-06-09", 22, 23), *hours("2026-06-10", 0, 21)], 24),
    # New York 03-08: 02:00 EST missing -> 03:00 EDT (07:00Z), which is 03:00's slot: 23.
    ("America/New_York", "2026-03-08T05:00Z", "2026-03-09T03:59Z",
     [*hours("2026-03-08", 5, 23), *hours("2026-03-09", 0, 3)], 23),
    # New York 11-01: 01:00 happens at 05:00Z and 06:00Z; only 05:00Z -> 24 in 25 hours.
    ("America/New_York", "2026-11-01T04:00Z", "2026-11-02T04:59Z",
     [*hours("2026-11-01", 4, 5), *hours("2026-11-01", 7, 23), *hours("2026-11-02", 0, 4)],
     24),
    # Lord Howe 10-04: 00:00 and 01:00 LHST (13:30Z, 14:30Z); 02:00 is in the half-hour gap
    # and moves to 02:30 LHDT = 15:30Z, a slot of its own (not 03:00's, which is 16:00Z);
    # then 03:00..23:00 LHDT = 16:00Z..12:00Z -> 24 slots in a 23.5-hour day.
    ("Australia/Lord_Howe", "2026-10-03T13:30Z", "2026-10-04T12:59Z",
     ["2026-10-03T13:30Z", "2026-10-03T14:30Z", "2026-10-03T15:30Z",
      *hours("2026-10-03", 16, 23), *hours("2026-10-04", 0, 12)], 24),
    # Lord Howe 04-05: 00:00, 01:00 LHDT (13:00Z, 14:00Z); 01:30-01:59 repeats but no
    # whole hour does; 02:00..23:00 LHST (+10:30) = 15:30Z..12:30Z -> 24.
    ("Australia/Lord_Howe", "2026-04-04T13:00Z", "2026-04-05T13:29Z",
     ["2026-04-04T13:00Z", "2026-04-04T14:00Z", *hours("2026-04-04", 15, 23, 30),
      *hours("2026-04-05", 0, 12, 30)], 24),
]


@pytest.mark.parametrize(("tz", "start", "end", "want", "count"), HOURLY_DAYS,
                         ids=[f"{c[0]}|{c[1][:10]}" for c in HOURLY_DAYS])
def test_every_hour_across_dst(tz: str, start: str, end: str, want: list[str],
                               count: int) -> None:
    got = slots("every 1h", tz, start, end)
    assert len(want) == count  # the table agrees with itself
    assert got == [Z(w) for w in want]
    assert len(set(got)) == len(got)


def test_every_6h_madrid_across_both_transitions() -> None:
    # 00, 06, 12, 18 local never fall in the gap or the repeat: 4 a day.  On 03-29 the
    # first (00:00 CET) is 23:00Z the day before and the rest are CEST (04Z, 10Z, 16Z);
    # on 10-25 00:00 CEST = 22:00Z the day before, then CET: 05Z, 11Z, 17Z.
    assert slots("every 6h", "Europe/Madrid", "2026-03-28T23:00Z", "2026-03-29T21:59Z") == [
        Z(t) for t in ("2026-03-28T23:00Z", "2026-03-29T04:00Z", "2026-03-29T10:00Z",
                       "2026-03-29T16:00Z")]
    assert slots("every 6h", "Europe/Madrid", "2026-10-24T22:00Z", "2026-10-25T22:59Z") == [
        Z(t) for t in ("2026-10-24T22:00Z", "2026-10-25T05:00Z", "2026-10-25T11:00Z",
                       "2026-10-25T17:00Z")]


# -- latest and next slot -------------------------------------------------------------------------

LATEST = [
    # (schedule, zone, now, latest slot at or before now, why)
    ("daily 02:00,14:30", "UTC", "2026-03-10T14:29:59Z", "2026-03-10T02:00Z", "before 14:30"),
    ("daily 02:00,14:30", "UTC", "2026-03-10T14:30:00Z", "2026-03-10T14:30Z", "at: inclusive"),
    ("daily 02:00,14:30", "UTC", "2026-03-10T01:59:59Z", "2026-03-09T14:30Z", "yesterday's"),
    ("weekly mon,thu 09:00", "UTC", "2026-03-08T12:00Z", "2026-03-05T09:00Z", "Sun -> Thu"),
    ("weekly mon,thu 09:00", "UTC", "2026-03-09T08:59Z", "2026-03-05T09:00Z", "Mon early"),
    ("weekly mon,thu 09:00", "UTC", "2026-03-09T09:00Z", "2026-03-09T09:00Z", "Mon 09:00"),
    ("weekly sun 09:00", "UTC", "2026-03-21T23:59Z", "2026-03-15T09:00Z", "a week back"),
    ("every 6h", "UTC", "2026-03-10T17:59:59Z", "2026-03-10T12:00Z", "12 <= t < 18"),
    ("every 8h", "UTC", "2026-03-10T23:00Z", "2026-03-10T16:00Z", "16 <= t < 24"),
    ("every 8h", "America/New_York", "2026-03-08T11:59Z", "2026-03-08T05:00Z",
     "07:59 EDT: the last slot was 00:00 EST"),
    ("every 8h", "America/New_York", "2026-03-08T12:00Z", "2026-03-08T12:00Z", "08:00 EDT"),
    ("daily 02:30", "Europe/Madrid", "2026-03-29T00:59:59Z", "2026-03-28T01:30Z",
     "01:59:59 CET on 03-29: today's slot (the gap's end) has not come"),
    ("daily 02:30", "Europe/Madrid", "2026-03-29T01:00:00Z", "2026-03-29T01:00Z",
     "03:00 CEST: the gap is over"),
    ("daily 02:30", "Europe/Madrid", "2026-10-25T01:30:00Z", "2026-10-25T00:30Z",
     "the second 02:30 is no new slot"),
    ("every 1h", "Europe/Madrid", "2026-10-25T01:59:59Z", "2026-10-25T00:00Z",
     "02:59 CET, the repeated hour: still the first 02:00's slot"),
    ("daily 02:15", "Australia/Lord_Howe", "2026-10-03T15:29:59Z", "2026-10-02T15:45Z",
     "01:59:59 LHST on 10-04, the last second before the gap: today's 02:15 only comes "
     "at the gap's end (15:30Z)"),
]


@pytest.mark.parametrize(("schedule", "tz", "now", "want", "why"), LATEST,
                         ids=[f"{c[0]}|{c[1]}|{c[2]}" for c in LATEST])
def test_latest_slot_table(schedule: str, tz: str, now: str, want: str, why: str) -> None:
    assert latest_slot(parse_schedule(schedule), tz, Z(now)) == Z(want), why


NEXT = [
    ("daily 02:00", "UTC", "2026-03-21T02:00:00Z", "2026-03-22T02:00Z", "strictly after"),
    ("daily 02:30", "Europe/Madrid", "2026-03-28T01:30Z", "2026-03-29T01:00Z", "into the gap"),
    ("daily 02:30", "Europe/Madrid", "2026-10-25T00:30Z", "2026-10-26T01:30Z",
     "not the repeated 02:30 an hour later"),
    ("every 1h", "Europe/Madrid", "2026-10-25T00:00Z", "2026-10-25T02:00Z",
     "01:00Z is the repeated 02:00"),
    ("every 1h", "Europe/Madrid", "2026-03-29T00:00Z", "2026-03-29T01:00Z", "03:00 CEST"),
    ("weekly mon,thu 09:00", "UTC", "2026-03-12T09:00Z", "2026-03-16T09:00Z", "Thu -> Mon"),
    ("every 1h", "Australia/Lord_Howe", "2026-10-03T14:30Z", "2026-10-03T15:30Z",
     "01:00 LHST -> the gap's end 02:30 LHDT"),
    ("every 1h", "Australia/Lord_Howe", "2026-10-03T15:30Z", "2026-10-03T16:00Z",
     "then 03:00 LHDT, half an hour later"),
]


@pytest.mark.parametrize(("schedule", "tz", "now", "want", "why"), NEXT,
                         ids=[f"{c[0]}|{c[1]}|{c[2]}" for c in NEXT])
def test_next_slot_table(schedule: str, tz: str, now: str, want: str, why: str) -> None:
    assert next_slot(parse_schedule(schedule), tz, Z(now)) == Z(want), why


# -- the same through `cbt run-due --now` ---------------------------------------------------------

POLICIES = {
    "twice": {"schedule": "daily 02:00,14:30"},
    "weekly": {"schedule": "weekly mon,thu 09:00"},
    "six": {"schedule": "every 6h"},
    "eight_ny": {"schedule": "every 8h", "timezone": "America/New_York"},
    "madrid": {"schedule": "daily 02:30", "timezone": "Europe/Madrid"},
    "hourly_madrid": {"schedule": "every 1h", "timezone": "Europe/Madrid"},
}
# One VM per policy, named after it.
VMS = {"twice": "twice", "weekly": "weekly", "six": "six", "eightny": "eight_ny",
       "madrid": "madrid", "hourly": "hourly_madrid"}

# A timeline of --now values; for each, the slot every VM must run (None: skipped,
# because its latest slot already has a point).  Worked out by hand, with the rules
# in the module doc.
TIMELINE: list[tuple[str, dict[str, str | None]]] = [
    # Sat 23:59Z = Sun 00:59 CET = Sat 19:59 EDT.  Nothing has run yet: all run.
    ("2026-03-28T23:59:00Z", {
        "twice": "2026-03-28T14:30:00Z",  # the second time of the day
        "weekly": "2026-03-26T09:00:00Z",  # Thursday
        "six": "2026-03-28T18:00:00Z",
        "eightny": "2026-03-28T20:00:00Z",  # 16:00 EDT
        "madrid": "2026-03-28T01:30:00Z",  # 02:30 CET
        "hourly": "2026-03-28T23:00:00Z",  # 00:00 CET Sunday
    }),
    # 01:59:59 CET, the last second before the gap.
    ("2026-03-29T00:59:59Z", {
        "twice": None, "weekly": None, "eightny": None,
        "six": "2026-03-29T00:00:00Z",
        "madrid": None,  # today's 02:30 does not exist; its slot (01:00Z) is not yet
        "hourly": "2026-03-29T00:00:00Z",  # 01:00 CET
    }),
    # 03:00 CEST: the gap is over; 02:30 and 02:00 both run here, and 03:00 with them.
    ("2026-03-29T01:00:00Z", {
        "twice": None, "weekly": None, "six": None, "eightny": None,
        "madrid": "2026-03-29T01:00:00Z",
        "hourly": "2026-03-29T01:00:00Z",
    }),
    # 03:59 CEST: nothing new (02:00 and 03:00 share one slot, already run).
    ("2026-03-29T01:59:00Z", dict.fromkeys(VMS)),
    # 04:00 CEST, 02:00Z: the hourly one, and the UTC 02:00 one.
    ("2026-03-29T02:00:00Z", {
        "twice": "2026-03-29T02:00:00Z", "weekly": None, "six": None, "eightny": None,
        "madrid": None, "hourly": "2026-03-29T02:00:00Z",
    }),
    # Down until Thu 04-02 10:00Z (12:00 CEST, 06:00 EDT): each VM runs its latest missed
    # slot only, once.
    ("2026-04-02T10:00:00Z", {
        "twice": "2026-04-02T02:00:00Z",
        "weekly": "2026-04-02T09:00:00Z",
        "six": "2026-04-02T06:00:00Z",
        "eightny": "2026-04-02T04:00:00Z",  # 00:00 EDT
        "madrid": "2026-04-02T00:30:00Z",  # 02:30 CEST
        "hourly": "2026-04-02T10:00:00Z",
    }),
    # The same hour, written with an offset: nothing is due.
    ("2026-04-02T12:59:00+02:00", dict.fromkeys(VMS)),
    # Fall back.  Sun 10-25 00:30Z = 02:30 CEST, the first 02:30.
    ("2026-10-25T00:30:00Z", {
        "twice": "2026-10-24T14:30:00Z",
        "weekly": "2026-10-22T09:00:00Z",  # Thursday
        "six": "2026-10-25T00:00:00Z",
        "eightny": "2026-10-24T20:00:00Z",  # 16:00 EDT (New York falls back a week later)
        "madrid": "2026-10-25T00:30:00Z",
        "hourly": "2026-10-25T00:00:00Z",  # 02:00 CEST
    }),
    # 01:30Z = 02:30 CET, the second 02:30; 01:00Z (02:00 CET) was no slot: nothing runs.
    ("2026-10-25T01:30:00Z", dict.fromkeys(VMS)),
    # 02:00Z = 03:00 CET.
    ("2026-10-25T02:00:00Z", {
        "twice": "2026-10-25T02:00:00Z", "weekly": None, "six": None, "eightny": None,
        "madrid": None, "hourly": "2026-10-25T02:00:00Z",
    }),
]


@pytest.mark.slow
def test_run_due_timeline_table(tmp_path: Path) -> None:
    vms = {}
    for k, (vm, policy) in enumerate(VMS.items()):
        write_disk(tmp_path / "disks" / f"{vm}.img", random_bytes(64 << 10, seed=k))
        vms[vm] = {"policy": policy, "disks": {"d": f"disks/{vm}.img"}, "snapshot": "none"}
    cfg = write_config(tmp_path / "cbt.toml", POLICIES, vms)
    assert cbt("init", "--encryption", "none", tmp_path / "vault").returncode == 0
    made = 0
    for now, want in TIMELINE:
        rc, summary, results, _ = run_due(cfg, now)
        assert rc == 0
        assert summary["now"] == dt.datetime.fromisoformat(now).astimezone(UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ")
        ran = {r["vm"]: r["slot"] for r in summary["ran"]}
        assert all(r["status"] == "succeeded" for r in summary["ran"]), summary
        assert ran == {vm: slot for vm, slot in want.items() if slot is not None}, now
        assert {s["vm"] for s in summary["skipped"]} == {
            vm for vm, slot in want.items() if slot is None}, now
        for line in results:  # each point is created at --now, recording its slot
            assert line["created"] == summary["now"]
            record = json_point(tmp_path / "vault", line["recovery_point"])
            assert record["slot"] == ran[line["vm"]]
        made += len(ran)
    r = cbt("list", tmp_path / "vault", "--json")
    assert len(json_lines(r.stdout)[0]["points"]) == made


def json_point(vault: Path, point: str) -> dict[str, object]:
    return dict(json.loads((vault / "points" / f"{point}.json").read_text()))


@pytest.mark.slow
def test_now_without_offset_or_garbage_is_an_error(tmp_path: Path) -> None:
    write_disk(tmp_path / "disks" / "d.img", random_bytes(64 << 10, seed=1))
    cfg = write_config(tmp_path / "cbt.toml", {"p": {"schedule": "daily 02:00"}},
                       {"vm1": {"policy": "p", "disks": {"d": "disks/d.img"},
                                "snapshot": "none"}})
    assert cbt("init", "--encryption", "none", tmp_path / "vault").returncode == 0
    cases = [("run-due", "2026-03-29T01:00:00"),  # naive: which zone would it be in?
             ("run-due", "garbage"),
             ("run-due", "2026-03-29"),
             ("backup", "2026-03-29T01:00:00"),
             ("prune", "2026-03-29T01:00:00")]
    for command, now in cases:
        r = cbt(command, "--config", cfg, "--now", now, "--json")
        assert r.returncode == 2, (command, now, r.stdout, r.stderr)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "error" in lines[0], r.stderr
        assert json_lines(r.stdout)[-1]["type"] == "error"
        assert list((tmp_path / "vault" / "points").iterdir()) == []
