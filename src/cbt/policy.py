"""Policies: when backups run (schedule) and which points are kept (retention).

Schedule grammar (times in the policy's time zone, default UTC)::

    daily HH:MM[,HH:MM...]
    weekly mon..sun[,...] HH:MM[,HH:MM...]
    every Nh                 N divides 24: local 00:00 + k*N hours

Retention counts (``daily``, ``weekly``, ``monthly``, ``yearly``) keep the
newest point of that many most recent calendar buckets that have one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from cbt.errors import CbtValueError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_TIME = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


@dataclass(frozen=True)
class Schedule:
    kind: str  # "daily" | "weekly" | "every"
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


@dataclass(frozen=True)
class Retention:
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    keep_all: bool = False  # no retention table: keep everything


@dataclass(frozen=True)
class Policy:
    name: str
    schedule: Schedule
    timezone: str = "UTC"
    retention: Retention = field(default_factory=lambda: Retention(keep_all=True))
    instant_restore_days: int = 0
