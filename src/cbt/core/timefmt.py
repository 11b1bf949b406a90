"""Time formats: RFC 3339 UTC with ``Z`` (written), ISO 8601 with an offset (read)."""

from __future__ import annotations

import datetime as _dt

from cbt.core.errors import CbtValueError


def utc_now() -> str:
    """Now as RFC 3339 UTC with ``Z``, to the second."""
    return rfc3339(_dt.datetime.now(_dt.UTC))


def rfc3339(t: _dt.datetime) -> str:
    """UTC, to the second, with ``Z``."""
    u = t.astimezone(_dt.UTC)
    return f"{u.year:04d}-{u:%m-%dT%H:%M:%S}Z"  # 4-digit year always (strftime's %Y: 999)


def parse_now(text: str) -> _dt.datetime:
    """An ISO 8601 time with an offset (``2026-03-29T02:30:00+01:00``, ``...Z``), as UTC."""
    try:
        t = _dt.datetime.fromisoformat(text.strip().replace("z", "Z"))
    except ValueError:
        raise CbtValueError(f"not an ISO 8601 time: {text!r}") from None
    if t.tzinfo is None or t.utcoffset() is None:
        raise CbtValueError(f"time {text!r} has no offset: add Z or +HH:MM")
    try:
        return t.astimezone(_dt.UTC)
    except OverflowError:  # 9999-12-31T23:00:00-05:00
        raise CbtValueError(f"time {text!r} is out of range") from None
