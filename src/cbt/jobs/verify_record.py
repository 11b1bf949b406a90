"""Where ``cbt verify --read-data-subset N%`` goes on from: one small local record a vault.

The N% window (:meth:`cbt.ops.verify.DataSubset.choose`) moves on one step a run, not
a day: a part that rotates per run (issue 16).  Moved by the day, runs at a period
that is a multiple of 100/N days read one part for ever (every 2 days at 50%, every
10 or 30 days at 10%), and runs several times a day read the same part each time.

1. The record, ``verify-<16 hex of sha256(VAULT and N)>.json`` in cbt's state folder
   (:func:`cbt.jobs.scheduler.state_folder`), holds the vault, N and the window of the
   last run: one record per vault and N, so a daily 10% and a weekly 25% of one vault
   each keep their own cycle.
2. A run of the same N on the same vault reads the window after it.  With no record
   (the first run of that N, a record lost) it reads window *today* (days since
   1970-01-01 UTC), the one the day-by-day window read, so daily runs go on as before.
3. The record is untrusted input: read without following a link, a regular file of
   at most :data:`MAX_RECORD` bytes, checked field by field; one that is not right is a
   warning, and the run reads as in 2 (and writes the record anew).
4. After a run that finished (problems found or not; not one that failed), the record
   is written whole or not at all (temporary name, fsync, rename), the user's alone.
   A record that cannot be written is a warning: the data was checked all the same.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import time
from pathlib import Path

from cbt.core.durable import atomic_file, read_small_file
from cbt.core.errors import CbtError, untrusted_json
from cbt.core.timefmt import rfc3339
from cbt.jobs.scheduler import state_folder
from cbt.ops.verify import DAY

MAX_RECORD = 4096
MAX_WINDOW = 2**62  # (a forged window far beyond any day number is not a window)


def record_path(vault: str, percent: float) -> Path:
    """Step 1: the record of ``vault`` (a local path made absolute, or a URL) and N."""
    digest = hashlib.sha256(f"{_key(vault)}\0{percent!r}".encode()).hexdigest()[:16]
    return Path(state_folder()) / f"verify-{digest}.json"


def next_window(vault: str, percent: float, now: float | None = None
                ) -> tuple[int, list[str]]:
    """Step 2 and 3: the window this run of ``percent``% reads, and any warning."""
    today = int((time.time() if now is None else now) // DAY)
    path = record_path(vault, percent)
    try:
        raw = read_small_file(path, MAX_RECORD, str(path), follow=False)
    except FileNotFoundError:
        return today, []
    except (CbtError, OSError) as exc:
        return today, [f"verify's record {path} ignored ({_why(exc)}): this run reads "
                       f"window {today}"]
    try:
        rec = untrusted_json(raw)
        if not isinstance(rec, dict):
            raise ValueError("not a JSON object")
        window, pct = rec["window"], rec["percent"]
        if not (isinstance(rec["vault"], str) and isinstance(pct, float | int)
                and not isinstance(pct, bool) and 0 < float(pct) <= 100
                and isinstance(window, int) and not isinstance(window, bool)
                and 0 <= window < MAX_WINDOW):
            raise ValueError("not a record of verify's window")
    except (ValueError, KeyError, TypeError, OverflowError) as exc:
        return today, [f"verify's record {path} ignored (damaged: {_why(exc)}): this run "
                       f"reads window {today}"]
    if rec["vault"] != _key(vault) or float(rec["percent"]) != percent:
        return today, []  # (another vault's record, or another N: a new cycle)
    return window + 1, []


def save_window(vault: str, percent: float, window: int, now: float | None = None
                ) -> list[str]:
    """Step 4: record ``window`` as the last one read; a warning if it cannot be."""
    path = record_path(vault, percent)
    record = {"vault": _key(vault), "percent": percent, "window": window,
              "at": rfc3339(dt.datetime.fromtimestamp(time.time() if now is None else now,
                                                      dt.UTC))}
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with atomic_file(path, mode=0o600) as f:
            f.write((json.dumps(record) + "\n").encode())
    except OSError as exc:
        return [f"verify's record {path} not written ({_why(exc)}): the next run reads "
                "by the day"]
    return []


def _key(vault: str) -> str:
    return vault if "://" in vault else os.path.abspath(vault)


def _why(exc: BaseException) -> str:
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return " ".join(text.split()) or type(exc).__name__
