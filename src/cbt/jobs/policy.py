"""Policies: when backups run (schedule) and which points are kept (retention).

Schedule grammar (times in the policy's time zone, default UTC)::

    daily HH:MM[,HH:MM...]
    weekly mon..sun[,...] HH:MM[,HH:MM...]
    every Nh                 N divides 24: local 00:00 + k*N hours

Retention (restic's ``--keep-*``): ``last`` keeps that many newest points; the
counts ``hourly``, ``daily``, ``weekly``, ``monthly``, ``yearly`` keep the newest
point of that many most recent calendar buckets that have one (wall-clock hours,
days, ISO weeks, months, years in the policy's time zone); ``within = "1y2m3d4h"``
keeps every point newer than the VM's newest point less that duration (restic's
``--keep-within``: relative to the latest point, not to now; years, months and
days are calendar steps in the time zone, a day past a month's end rolls over as
Go's ``AddDate`` does, then hours are subtracted as elapsed time).
"""

from __future__ import annotations

import datetime as _dt
import re
import zoneinfo
from dataclasses import dataclass, field
from typing import Literal

from cbt.core.errors import CbtValueError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_TIME = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


@dataclass(frozen=True)
class Schedule:
    kind: Literal["daily", "weekly", "every"]
    times: tuple[tuple[int, int], ...] = ()  # (hour, minute), sorted
    days: tuple[int, ...] = ()  # weekday numbers, Monday = 0 (weekly)
    hours: int = 0  # every N hours
    text: str = ""


def _times(text: str) -> tuple[tuple[int, int], ...]:
    out = []
    for part in text.split(","):
        m = _TIME.match(part.strip())
        if not m:
            raise CbtValueError(f"not a time HH:MM: {part.strip()!r}")
        out.append((int(m.group(1)), int(m.group(2))))
    return tuple(sorted(set(out)))


def parse_schedule(text: str) -> Schedule:
    """Parse a schedule string; ``CbtValueError`` says what is wrong."""
    words = text.split()
    if not words:
        raise CbtValueError("empty schedule")
    kind = words[0].lower()
    if kind == "daily" and len(words) == 2:
        return Schedule("daily", times=_times(words[1]), text=text)
    if kind == "weekly" and len(words) == 3:
        days = []
        for d in words[1].lower().split(","):
            if d not in DAYS:
                raise CbtValueError(f"not a weekday: {d!r} (use mon..sun)")
            days.append(DAYS.index(d))
        return Schedule("weekly", times=_times(words[2]), days=tuple(sorted(set(days))),
                        text=text)
    if kind == "every" and len(words) == 2:
        m = re.match(r"^(\d+)h$", words[1].lower())
        if not m or int(m.group(1)) < 1 or 24 % int(m.group(1)):
            raise CbtValueError(f"not an interval that divides a day: {words[1]!r} "
                                "(use every Nh with N in 1, 2, 3, 4, 6, 8, 12, 24)")
        return Schedule("every", hours=int(m.group(1)), text=text)
    raise CbtValueError(f"not a schedule: {text!r} (use 'daily HH:MM[,..]', "
                        "'weekly mon..sun[,..] HH:MM[,..]' or 'every Nh')")


_WITHIN = re.compile(r"^(?:(\d{1,6})y)?(?:(\d{1,6})m)?(?:(\d{1,6})d)?(?:(\d{1,7})h)?$")


@dataclass(frozen=True)
class Within:
    """A ``within`` duration: calendar years, months, days, then hours (restic's)."""

    years: int = 0
    months: int = 0
    days: int = 0
    hours: int = 0
    text: str = ""


def parse_within(text: str) -> Within:
    """``1y2m3d4h`` (each part optional, in that order, at least one above zero);
    ``CbtValueError`` says what is wrong."""
    m = _WITHIN.match(text.strip().lower())
    if not m or not text.strip() or not any(int(g or 0) for g in m.groups()):
        raise CbtValueError(f"not a duration: {text!r} (use e.g. \"14d\" or \"1y2m3d4h\": "
                            "y years, m months, d days, h hours, more than zero)")
    y, mo, d, h = (int(g or 0) for g in m.groups())
    return Within(y, mo, d, h, text.strip())


@dataclass(frozen=True)
class Retention:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: Within | None = None
    keep_all: bool = False  # no retention table: keep everything


@dataclass(frozen=True)
class Policy:
    name: str
    schedule: Schedule
    timezone: str = "UTC"
    retention: Retention = field(default_factory=lambda: Retention(keep_all=True))
    instant_restore_days: int = 0


# -- time ----------------------------------------------------------------------------

UTC = _dt.UTC


def local_to_utc(day: _dt.date, hour: int, minute: int, tz: _dt.tzinfo) -> _dt.datetime:
    """The UTC instant of a local wall time: a repeated time at its first occurrence, a
    time that does not exist (a DST gap) at the first instant after the gap."""
    naive = _dt.datetime(day.year, day.month, day.day, hour, minute)
    first = naive.replace(tzinfo=tz, fold=0).astimezone(UTC)
    if first.astimezone(tz).replace(tzinfo=None) == naive:
        other = naive.replace(tzinfo=tz, fold=1).astimezone(UTC)
        return min(first, other)
    # in a gap: the first UTC instant whose wall time is at or past ``naive``
    lo = int(naive.replace(tzinfo=tz, fold=1).astimezone(UTC).timestamp())
    hi = int(first.timestamp())
    lo, hi = min(lo, hi), max(lo, hi)
    while lo < hi:
        mid = (lo + hi) // 2
        wall = _dt.datetime.fromtimestamp(mid, tz).replace(tzinfo=None)
        if wall >= naive:
            hi = mid
        else:
            lo = mid + 1
    return _dt.datetime.fromtimestamp(lo, UTC)


def _day_times(schedule: Schedule, day: _dt.date) -> list[tuple[int, int]]:
    if schedule.kind == "daily":
        return list(schedule.times)
    if schedule.kind == "weekly":
        return list(schedule.times) if day.weekday() in schedule.days else []
    return [(h, 0) for h in range(0, 24, schedule.hours)]


def slots_between(schedule: Schedule, timezone: str, start: _dt.datetime,
                  end: _dt.datetime) -> list[_dt.datetime]:
    """Every slot (UTC) in ``[start, end]``, in order, each once (at the ends of the
    calendar, years 1 and 9999, no day past them)."""
    tz = zoneinfo.ZoneInfo(timezone)
    day = _add_days(_local_date(start, tz), -1)
    last = _add_days(_local_date(end, tz), 1)
    out: set[_dt.datetime] = set()
    while True:
        for h, m in _day_times(schedule, day):
            try:
                t = local_to_utc(day, h, m, tz)
            except OverflowError:  # a wall time whose UTC instant is past year 9999
                continue
            if start <= t <= end:
                out.add(t)
        if day >= last:
            return sorted(out)
        day += _dt.timedelta(days=1)


def _local_date(t: _dt.datetime, tz: _dt.tzinfo) -> _dt.date:
    try:
        return t.astimezone(tz).date()
    except OverflowError:  # 9999-12-31T23:00Z is in year 10000 east of UTC
        return _dt.date.max if t.year > 1 else _dt.date.min


def _add_days(day: _dt.date, n: int) -> _dt.date:
    try:
        return day + _dt.timedelta(days=n)
    except OverflowError:
        return day


def latest_slot(schedule: Schedule, timezone: str, now: _dt.datetime) -> _dt.datetime | None:
    """The latest slot at or before ``now`` (looking back up to two weeks)."""
    slots = slots_between(schedule, timezone, now - _dt.timedelta(days=15), now)
    return slots[-1] if slots else None


def next_slot(schedule: Schedule, timezone: str, now: _dt.datetime) -> _dt.datetime:
    """The first slot strictly after ``now``."""
    slots = slots_between(schedule, timezone, now + _dt.timedelta(seconds=1),
                          now + _dt.timedelta(days=15))
    return slots[0]


# -- retention -------------------------------------------------------------------------

_BUCKETS = ("hourly", "daily", "weekly", "monthly", "yearly")


def _bucket(rule: str, t: _dt.datetime) -> tuple[int, ...]:
    """The calendar bucket of a local time (``hourly``: the wall-clock hour, so the two
    02:00 hours of a night the clocks go back are one bucket, as in restic)."""
    if rule == "hourly":
        return (t.year, t.month, t.day, t.hour)
    if rule == "daily":
        return (t.year, t.month, t.day)
    if rule == "weekly":
        iso = t.isocalendar()
        return (iso[0], iso[1])
    if rule == "monthly":
        return (t.year, t.month)
    return (t.year,)


def _bucket_label(rule: str, b: tuple[int, ...]) -> str:
    if rule == "hourly":
        return f"{b[0]:04d}-{b[1]:02d}-{b[2]:02d}T{b[3]:02d}"
    if rule == "daily":
        return f"{b[0]:04d}-{b[1]:02d}-{b[2]:02d}"
    if rule == "weekly":
        return f"{b[0]:04d}-W{b[1]:02d}"
    if rule == "monthly":
        return f"{b[0]:04d}-{b[1]:02d}"
    return f"{b[0]:04d}"


def within_cutoff(latest: _dt.datetime, within: Within, tz: _dt.tzinfo) -> _dt.datetime | None:
    """restic's ``latest.AddDate(-y, -m, -d).Add(-h hours)`` in ``tz``: the calendar step
    on the local date (a day past the month's end rolls into the next month, as Go
    normalises), the same wall time (:func:`_go_date`: where it repeats or is skipped,
    as Go's ``time.Date`` picks), then the hours as elapsed time.  None: before year 1
    (keeps everything)."""
    try:
        local = latest.astimezone(tz)
        months = local.year * 12 + (local.month - 1) - within.years * 12 - within.months
        year, month = divmod(months, 12)
        if year < 1:
            return None
        day = _dt.date(year, month + 1, 1) + _dt.timedelta(days=local.day - 1 - within.days)
        wall = _dt.datetime.combine(day, local.time().replace(tzinfo=None))
        return _go_date(wall, tz) - _dt.timedelta(hours=within.hours)
    except OverflowError:
        return None


def _go_date(wall: _dt.datetime, tz: _dt.tzinfo) -> _dt.datetime:
    """The UTC instant of the naive local time ``wall`` in ``tz`` as Go's ``time.Date``
    finds it: the zone's offset at ``wall`` read as if UTC, and if ``wall`` less that
    offset lies in another offset's span, that one.  Where the wall time repeats or is
    skipped this picks as Go does: in Berlin a skipped 02:30 is 03:30 CEST and a repeated
    one its CET (later) occurrence; in New York a skipped 02:30 is 01:30 EST."""
    as_utc = wall.replace(tzinfo=UTC)
    guess = as_utc - (as_utc.astimezone(tz).utcoffset() or _dt.timedelta())
    return as_utc - (guess.astimezone(tz).utcoffset() or _dt.timedelta())


def apply_retention(created: list[tuple[str, _dt.datetime]], retention: Retention,
                    timezone: str) -> dict[str, list[str]]:
    """Point id -> reasons to keep it (empty: remove), restic's ``--keep-*`` semantics.

    ``created`` lists (point id, creation time) of one VM.  ``last`` keeps that
    many newest (``last N``); each count keeps the newest point of that many most
    recent calendar buckets (in ``timezone``) that have one (``daily 2026-01-13``);
    ``within`` keeps the points strictly newer than the newest less the duration
    (``within 14d``); the newest point is always kept (``latest``); no retention
    table keeps everything.
    """
    from cbt.format.records import id_order

    tz = zoneinfo.ZoneInfo(timezone)
    newest_first = sorted(created, key=lambda p: (p[1], id_order(p[0])), reverse=True)
    reasons: dict[str, list[str]] = {pid: [] for pid, _ in newest_first}
    if not newest_first:
        return reasons
    reasons[newest_first[0][0]].append("latest")
    if retention.keep_all:
        for pid in reasons:
            if "latest" not in reasons[pid]:
                reasons[pid].append("no retention")
        return reasons
    for pid, _t in newest_first[:retention.last]:
        reasons[pid].append(f"last {retention.last}")
    for rule in _BUCKETS:
        count = getattr(retention, rule)
        seen: set[tuple[int, ...]] = set()
        for pid, t in newest_first:
            if len(seen) >= count:
                break
            b = _bucket(rule, t.astimezone(tz))
            if b in seen:
                continue
            seen.add(b)
            reasons[pid].append(f"{rule} {_bucket_label(rule, b)}")
    if retention.within is not None:
        cutoff = within_cutoff(newest_first[0][1], retention.within, tz)
        for pid, t in newest_first:
            if cutoff is None or t > cutoff:
                reasons[pid].append(f"within {retention.within.text}")
    return reasons
