"""Unattended runs: which VMs are due, ``run-due`` once, or a ``daemon`` loop.

A VM is due at time T when the latest slot of its policy's schedule at or
before T has no committed point recording that slot.  So running twice in a
slot backs up once; after downtime only the latest missed slot runs (once);
a failed slot is retried at the next call, because it still has no point.

The daemon:

1. Handles SIGTERM and SIGINT itself (they set a stop flag) and runs its jobs
   with ``finish_on_stop_signal``: a job does not abort on them and its forked
   workers ignore them, so the job in flight finishes.
2. Runs what is due (as ``run-due``); a VM not started yet when the stop
   flag is set is skipped ("stopping").
3. Sleeps until the next slot of any VM (no polling), waking for the stop
   flag; then again from 2, until stopped.

An encrypted vault is opened with the passphrase given (a finder, such as a
prompt, is asked once for all the jobs: :func:`cbt.jobs.runner.asked_once`), else
``CBT_PASSWORD_FILE`` or ``CBT_PASSWORD``; the daemon opens it before it starts,
so a wrong passphrase stops it at once.
"""

from __future__ import annotations

import datetime as _dt
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from cbt.core.timefmt import rfc3339
from cbt.jobs.config import Config
from cbt.jobs.job import JobRequest, JobResult
from cbt.jobs.policy import latest_slot, next_slot
from cbt.jobs.runner import asked_once, run_vm
from cbt.repo.keys import Passphrase
from cbt.repo.vault import Vault


@dataclass(frozen=True)
class DueJob:
    """A job ``run-due`` ran: its VM, the slot, how it ended."""

    vm: str
    slot: str
    status: str  # succeeded | failed
    recovery_point: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"vm": self.vm, "slot": self.slot, "status": self.status,
                "recovery_point": self.recovery_point}


@dataclass(frozen=True)
class Skipped:
    """A VM ``run-due`` did not run, and why."""

    vm: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"vm": self.vm, "reason": self.reason}


@dataclass
class RunDueSummary:
    now: str
    ran: list[DueJob] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every job that ran succeeded."""
        return all(r.status == "succeeded" for r in self.ran)

    def to_dict(self) -> dict[str, Any]:
        """The summary line of ``cbt run-due --json``."""
        return {"type": "summary", "now": self.now, "ran": [r.to_dict() for r in self.ran],
                "skipped": [s.to_dict() for s in self.skipped], "warnings": self.warnings}


def due(config: Config, now: _dt.datetime, passphrase: Passphrase | None = None
        ) -> tuple[list[tuple[str, str]], list[Skipped]]:
    """(vm, slot) pairs to run now, and the VMs skipped with the reason; ``passphrase``
    opens an encrypted vault (None: ``CBT_PASSWORD_FILE``, then ``CBT_PASSWORD``)."""
    vault = Vault.open(config.vault, passphrase)
    run: list[tuple[str, str]] = []
    skipped: list[Skipped] = []
    for name, vmc in config.vms.items():
        policy = config.policies[vmc.policy]
        slot = latest_slot(policy.schedule, policy.timezone, now)
        if slot is None:
            skipped.append(Skipped(name, "no slot of its schedule yet"))
            continue
        s = rfc3339(slot)
        done = [p.id for p in vault.points(name) if p.slot == s]
        if done:
            skipped.append(Skipped(name, f"slot {s} already has point {done[0]}"))
        else:
            run.append((name, s))
    return run, skipped


def run_due(config: Config, now: _dt.datetime, request: JobRequest | None = None,
            on_result: Callable[[JobResult, str], None] | None = None,
            stop: threading.Event | None = None) -> RunDueSummary:
    """Run every due VM once, each job as ``request`` says (its created time and slot
    set here; its passphrase opens the vault); ``on_result`` sees each result as it
    comes; ``stop`` skips the rest."""
    request = request or JobRequest()
    request = replace(request, passphrase=asked_once(request.passphrase))
    todo, skipped = due(config, now, request.passphrase)
    summary = RunDueSummary(rfc3339(now), skipped=skipped)
    for vm, slot in todo:
        if stop is not None and stop.is_set():
            summary.skipped.append(Skipped(vm, "stopping"))
            continue
        result = run_vm(config, vm, replace(request, created=rfc3339(now), slot=slot))
        if on_result:
            on_result(result, slot)
        summary.ran.append(DueJob(vm, slot, "succeeded" if result.point else "failed",
                                  result.point.id if result.point else None))
    return summary


def next_wakeup(config: Config, now: _dt.datetime) -> _dt.datetime:
    return min(next_slot(config.policies[v.policy].schedule, config.policies[v.policy].timezone,
                         now) for v in config.vms.values())


def daemon(config: Config, log: Callable[[str], None], workers: int | None = None,
           passphrase: Passphrase | None = None) -> int:
    """Run due jobs, sleep until the next slot, repeat; stop on SIGTERM/SIGINT.
    ``passphrase`` opens an encrypted vault (a finder is asked once, at the first slot)."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log(f"received {signal.Signals(signum).name}: stopping after the job in flight")
        stop.set()

    def report(result: JobResult, slot: str) -> None:
        if result.point:
            p = result.point
            log(f"{result.vm} slot {slot}: succeeded, point {p.id} ({p.consistency}: "
                f"{p.consistency_reason})")
        else:
            log(f"{result.vm} slot {slot}: failed: {result.error}")

    request = JobRequest(workers=workers, finish_on_stop_signal=True,
                         passphrase=asked_once(passphrase))
    Vault.open(config.vault, request.passphrase)  # a wrong passphrase fails now, not later
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        log(f"cbt daemon started: {len(config.vms)} VMs, vault {config.vault}")
        while not stop.is_set():
            run_due(config, _dt.datetime.now(_dt.UTC), request, on_result=report, stop=stop)
            if not stop.is_set():
                _sleep_until_next_slot(config, log, stop)
        log("cbt daemon stopped")
        return 0
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _sleep_until_next_slot(config: Config, log: Callable[[str], None],
                           stop: threading.Event) -> None:
    wake = next_wakeup(config, _dt.datetime.now(_dt.UTC))
    log(f"sleeping until {rfc3339(wake)}")
    while not stop.is_set():
        left = (wake - _dt.datetime.now(_dt.UTC)).total_seconds()
        if left <= 0:
            break
        stop.wait(min(left, 3600))
