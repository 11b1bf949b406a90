"""Unattended runs: which VMs are due, ``run-due`` once, or a ``daemon`` loop.

A VM is due at time T when the latest slot of its policy's schedule at or
before T has no committed point recording that slot.  So running twice in a
slot backs up once; after downtime only the latest missed slot runs (once);
a failed slot is retried at the next call, because it still has no point.

The daemon runs what is due, then sleeps until the next slot of any VM (not
polling), until SIGTERM or SIGINT: a job in flight is finished first.
"""

from __future__ import annotations

import datetime as _dt
import signal
import threading
from collections.abc import Callable
from typing import Any

from cbt.core.timefmt import rfc3339
from cbt.jobs.config import Config
from cbt.jobs.job import JobResult, run_vm
from cbt.jobs.policy import latest_slot, next_slot
from cbt.ops.backup import BackupProgress
from cbt.repo.vault import Vault


def due(config: Config, now: _dt.datetime) -> tuple[list[tuple[str, str]], list[dict[str, str]]]:
    """(vm, slot) pairs to run now, and the VMs skipped with the reason."""
    vault = Vault.open(config.vault)
    run: list[tuple[str, str]] = []
    skipped: list[dict[str, str]] = []
    for name, vmc in config.vms.items():
        policy = config.policies[vmc.policy]
        slot = latest_slot(policy.schedule, policy.timezone, now)
        if slot is None:
            skipped.append({"vm": name, "reason": "no slot of its schedule yet"})
            continue
        s = rfc3339(slot)
        done = [p.id for p in vault.points(name) if p.slot == s]
        if done:
            skipped.append({"vm": name, "reason": f"slot {s} already has point {done[0]}"})
        else:
            run.append((name, s))
    return run, skipped


def run_due(config: Config, now: _dt.datetime, workers: int | None = None,
            progress: BackupProgress | None = None,
            on_result: Callable[[JobResult, str], None] | None = None,
            abort_on_signals: bool = True,
            stop: threading.Event | None = None) -> dict[str, Any]:
    """Run every due VM once; the summary of ``cbt run-due --json``."""
    todo, skipped = due(config, now)
    ran = []
    for vm, slot in todo:
        if stop is not None and stop.is_set():
            skipped.append({"vm": vm, "reason": "stopping"})
            continue
        result = run_vm(config, vm, workers=workers, progress=progress, created=rfc3339(now),
                        slot=slot, abort_on_signals=abort_on_signals)
        if on_result:
            on_result(result, slot)
        ran.append({"vm": vm, "slot": slot,
                    "status": "succeeded" if result.point else "failed",
                    "recovery_point": result.point.id if result.point else None})
    return {"type": "summary", "now": rfc3339(now), "ran": ran, "skipped": skipped,
            "warnings": []}


def next_wakeup(config: Config, now: _dt.datetime) -> _dt.datetime:
    return min(next_slot(config.policies[v.policy].schedule, config.policies[v.policy].timezone,
                         now) for v in config.vms.values())


def daemon(config: Config, log: Callable[[str], None], workers: int | None = None) -> int:
    """Run due jobs, sleep until the next slot, repeat; stop on SIGTERM/SIGINT."""
    from cbt.core import parallel

    stop = threading.Event()
    parallel.WORKERS_IGNORE_STOP_SIGNALS = True

    def on_signal(signum: int, _frame: object) -> None:
        log(f"received {signal.Signals(signum).name}: stopping after the job in flight")
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        log(f"cbt daemon started: {len(config.vms)} VMs, vault {config.vault}")
        while not stop.is_set():
            now = _dt.datetime.now(_dt.UTC)

            def report(result: JobResult, slot: str) -> None:
                if result.point:
                    p = result.point
                    log(f"{result.vm} slot {slot}: succeeded, point {p.id} ({p.consistency}: "
                        f"{p.consistency_reason})")
                else:
                    log(f"{result.vm} slot {slot}: failed: {result.error}")

            run_due(config, now, workers=workers, on_result=report, abort_on_signals=False,
                    stop=stop)
            if stop.is_set():
                break
            wake = next_wakeup(config, _dt.datetime.now(_dt.UTC))
            log(f"sleeping until {rfc3339(wake)}")
            while not stop.is_set():
                left = (wake - _dt.datetime.now(_dt.UTC)).total_seconds()
                if left <= 0:
                    break
                stop.wait(min(left, 3600))
        log("cbt daemon stopped")
        return 0
    finally:
        for s, h in old.items():
            signal.signal(s, h)
