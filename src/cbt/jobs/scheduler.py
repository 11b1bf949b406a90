"""Unattended runs: which VMs are due, ``run-due`` once, or a ``daemon`` loop.

A VM is due at time T when the latest slot of its policy's schedule at or
before T has no committed point recording that slot.  So running twice in a
slot backs up once; after downtime only the latest missed slot runs (once);
a failed slot is retried at the next call, because it still has no point.  A
manual run (``cbt backup --config``) records the slot its time falls in, so it
counts for that slot (:func:`cbt.jobs.runner.run_vm`).

The daemon:

1. Handles SIGTERM and SIGINT itself (they set a stop flag) and runs its jobs
   with ``finish_on_stop_signal``: a job does not abort on them and its forked
   workers ignore them, so the job in flight finishes.
2. Runs what is due (as ``run-due``); a VM not started yet when the stop
   flag is set is skipped ("stopping").
3. Maintenance (the config's ``[maintenance]`` table): when the latest slot of
   its schedule is not the one its state record names, prune (the vault alone:
   it waits for running backups in short steps, up to ``wait`` seconds, so a stop
   signal is acted on at once; then it gives up until the next slot), then gc.
   The slot is recorded once tried (whatever the outcome: a failure is retried at
   the next slot, not in a loop), in a small JSON file written atomically in a
   local state folder (systemd's ``StateDirectory``), and in the daemon's memory
   (a record that cannot be written costs one more run after a restart, not one
   at every round).  Why a local file: the
   vault's layout stays as it is, and a lost or damaged record costs one extra
   maintenance run (prune and gc are idempotent), never a missed one.
4. Writes the metrics file (``--metrics``: :mod:`cbt.jobs.metrics`).  A step
   that fails (the vault out of reach), or a job that fails (its vault locked by a
   prune elsewhere, a hook, the network), is logged, and the round is tried again
   after ten minutes instead of at the next slot (which may be a day away); only
   what is still due runs then.  The daemon goes on.
5. Sleeps until the next slot of any VM or of maintenance (no polling), waking
   for the stop flag or SIGHUP; after SIGHUP (``systemctl reload``) the config file
   is read again (one that does not load is said, and the one in use kept); then
   again from 2, until stopped.

It logs one line per event through ``log(level, text)``: start and stop, each
job's start and end (its point, or its error; its warnings), VMs skipped,
maintenance start, steps and end, failures; levels ``DEBUG`` (sleeping, what
is not due), ``INFO``, ``WARNING``, ``ERROR``.

An encrypted vault is opened with the passphrase given (a finder, such as a
prompt, is asked once for all the jobs: :func:`cbt.jobs.runner.asked_once`), else
``CBT_PASSWORD_FILE`` or ``CBT_PASSWORD``; the daemon opens it before it starts,
so a wrong passphrase stops it at once.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from cbt.core.durable import atomic_file, read_small_file
from cbt.core.errors import CbtError, untrusted_json
from cbt.core.sizes import human_bytes
from cbt.core.timefmt import parse_now, rfc3339
from cbt.format.records import PointRecord
from cbt.jobs.config import Config, load
from cbt.jobs.job import JobRequest, JobResult
from cbt.jobs.metrics import MaintenanceMetrics, VMMetrics, render, write_textfile
from cbt.jobs.policy import Schedule, latest_slot, next_slot
from cbt.jobs.runner import asked_once, run_vm
from cbt.repo.keys import Passphrase
from cbt.repo.lock import VaultLockedError
from cbt.repo.vault import Vault

Log = Callable[[str, str], None]  # (level, text)
DEBUG, INFO, WARNING, ERROR = "DEBUG", "INFO", "WARNING", "ERROR"
LOCK_STEP = 5.0  # seconds between tries of a lock maintenance waits for
RETRY = 600.0  # seconds until a round that failed (the vault out of reach) is tried again
MAX_STATE = 64 << 10  # bytes of a maintenance state record (one is a few hundred)
T = TypeVar("T")


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


@dataclass(frozen=True)
class _SlotState:
    slot: str | None  # the VM's latest slot at or before now (None: none yet)
    done: str | None  # a point recording it
    latest: PointRecord | None  # the VM's newest point created at or before now


def _slot_states(config: Config, vault: Vault, now: _dt.datetime) -> dict[str, _SlotState]:
    """Each VM's latest slot, whether a point records it, its newest point (one listing
    of the vault for all VMs).  A point created after ``now`` (``backup --now`` ahead,
    a writer's clock ahead, a forged record) is not the newest: it would hide from the
    metrics that backups stopped, until its time comes."""
    by_vm: dict[str, list[PointRecord]] = {}
    for p in vault.points():  # (oldest first)
        by_vm.setdefault(p.vm, []).append(p)
    out = {}
    for name, vmc in config.vms.items():
        policy = config.policies[vmc.policy]
        slot = latest_slot(policy.schedule, policy.timezone, now)
        s = rfc3339(slot) if slot is not None else None
        points = by_vm.get(name, [])
        done = [p.id for p in points if s is not None and p.slot == s]
        past = [p for p in points if parse_now(p.created) <= now]
        out[name] = _SlotState(s, done[0] if done else None, past[-1] if past else None)
    return out


def due(config: Config, now: _dt.datetime, passphrase: Passphrase | None = None
        ) -> tuple[list[tuple[str, str]], list[Skipped]]:
    """(vm, slot) pairs to run now, and the VMs skipped with the reason; ``passphrase``
    opens an encrypted vault (None: ``CBT_PASSWORD_FILE``, then ``CBT_PASSWORD``)."""
    run: list[tuple[str, str]] = []
    skipped: list[Skipped] = []
    for name, st in _slot_states(config, Vault.open(config.vault, passphrase), now).items():
        if st.slot is None:
            skipped.append(Skipped(name, "no slot of its schedule yet"))
        elif st.done is not None:
            skipped.append(Skipped(name, f"slot {st.slot} already has point {st.done}"))
        else:
            run.append((name, st.slot))
    return run, skipped


def run_due(config: Config, now: _dt.datetime, request: JobRequest | None = None,
            on_result: Callable[[JobResult, str], None] | None = None,
            stop: threading.Event | None = None,
            on_start: Callable[[str, str], None] | None = None) -> RunDueSummary:
    """Run every due VM once, each job as ``request`` says (its created time and slot
    set here; its passphrase opens the vault); ``on_start`` sees each (vm, slot) as its
    job starts, ``on_result`` each result as it comes; ``stop`` skips the rest.  A job
    whose VM or vault is locked by another run fails alone: the others still run."""
    request = request or JobRequest()
    request = replace(request, passphrase=asked_once(request.passphrase))
    todo, skipped = due(config, now, request.passphrase)
    summary = RunDueSummary(rfc3339(now), skipped=skipped)
    for vm, slot in todo:
        if stop is not None and stop.is_set():
            summary.skipped.append(Skipped(vm, "stopping"))
            continue
        if on_start:
            on_start(vm, slot)
        try:
            result = run_vm(config, vm, replace(request, created=rfc3339(now), slot=slot))
        except VaultLockedError as exc:  # (a manual run of this VM, a prune elsewhere:
            result = JobResult(vm, "", None, str(exc))  # this job fails, not the others)
        if on_result:
            on_result(result, slot)
        summary.ran.append(DueJob(vm, slot, "succeeded" if result.point else "failed",
                                  result.point.id if result.point else None))
    return summary


# -- metrics ---------------------------------------------------------------------------


def write_metrics(path: str | os.PathLike[str], config: Config, now: _dt.datetime,
                  failures: dict[str, int], passphrase: Passphrase | None = None) -> None:
    """The Prometheus textfile of :mod:`cbt.jobs.metrics`: every VM of ``config`` from
    the vault at ``now``, ``failures`` of this process per VM, and the maintenance
    state record (if the config has maintenance)."""
    vault = Vault.open(config.vault, passphrase)
    vms = [VMMetrics(name, st.latest, st.slot is not None and st.done is None,
                     failures.get(name, 0))
           for name, st in _slot_states(config, vault, now).items()]
    maintenance = None
    if config.maintenance is not None:
        try:
            rec = read_state(state_path(config), config.vault)
        except ValueError:
            rec = None  # (the daemon says so when it reads it)
        maintenance = MaintenanceMetrics(
            parse_now(rec.ended).timestamp() if rec else None, bool(rec and rec.ok),
            parse_now(rec.last_success).timestamp() if rec and rec.last_success else None)
    write_textfile(path, render(vms, maintenance))


# -- maintenance ------------------------------------------------------------------------


@dataclass(frozen=True)
class MaintenanceState:
    """The state record: the maintenance slot last tried, and how it went."""

    vault: str
    slot: str
    ended: str
    ok: bool
    last_success: str | None  # when a run last did all it was to do
    steps: dict[str, str]  # prune/gc -> what happened, in a few words

    def to_json(self) -> bytes:
        return json.dumps({"vault": self.vault, "slot": self.slot, "ended": self.ended,
                           "ok": self.ok, "last_success": self.last_success,
                           "steps": self.steps}, indent=1).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> MaintenanceState:
        """Parse a record; ``ValueError`` says what is wrong with it."""
        try:
            doc = untrusted_json(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("vault"), str) \
                or not isinstance(doc.get("ok"), bool) or not isinstance(doc.get("steps"), dict):
            raise ValueError("not a maintenance record")
        for key in ("slot", "ended", "last_success"):
            value = doc.get(key)
            if not (value is None and key == "last_success"):
                if not isinstance(value, str):
                    raise ValueError(f"{key}: not a time")
                parse_now(value)  # (a CbtValueError is a ValueError)
        return cls(doc["vault"], doc["slot"], doc["ended"], doc["ok"], doc["last_success"],
                   {str(k): str(v) for k, v in doc["steps"].items()})


def state_path(config: Config) -> Path:
    """Where the daemon records the maintenance slot of ``config``'s vault: in the
    config's ``state_dir``, else systemd's ``$STATE_DIRECTORY``, ``$XDG_STATE_HOME/cbt``
    or ``~/.local/state/cbt``; one file per vault."""
    m = config.maintenance
    folder = (m.state_dir if m is not None and m.state_dir else None) or state_folder()
    digest = hashlib.sha256(config.vault.encode()).hexdigest()[:16]
    return Path(folder) / f"maintenance-{digest}.json"


def state_folder() -> str:
    """Where cbt keeps its small local records (the daemon's maintenance slot, verify's
    data-subset window): systemd's ``$STATE_DIRECTORY``, else ``$XDG_STATE_HOME/cbt``,
    else ``~/.local/state/cbt``."""
    return os.environ.get("STATE_DIRECTORY", "").split(":")[0] \
        or str(Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
               / "cbt")


def read_state(path: Path, vault: str | None = None) -> MaintenanceState | None:
    """The state record at ``path`` (None: there is none); ``ValueError`` for a record
    that cannot be read or parsed, or is another vault's."""
    raw = _read_record(path)
    if raw is None:
        return None
    try:
        rec = MaintenanceState.from_json(raw)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    if vault is not None and rec.vault != vault:
        raise ValueError(f"{path}: the record of another vault ({rec.vault})")
    return rec


def _read_record(path: Path) -> bytes | None:
    """The bytes of the state record (None: there is none): a regular file of at most
    :data:`MAX_STATE` bytes, not a symbolic link (cbt writes it by a rename, never as a
    link), so a link planted to ``/dev/zero``, a FIFO or a huge file costs a warning
    (and one extra maintenance run), never the daemon's memory nor a hang."""
    try:
        return read_small_file(path, MAX_STATE, str(path), follow=False)
    except FileNotFoundError:
        return None


def _write_state(path: Path, rec: MaintenanceState) -> None:
    """The record, whole or not at all (:func:`cbt.core.durable.atomic_file`), root's
    (or the user's) alone."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with atomic_file(path, mode=0o600) as f:
        f.write(rec.to_json())


def maintenance_due(config: Config, now: _dt.datetime, log: Log) -> str | None:
    """The maintenance slot to run now (None: none, or its record names it already)."""
    m = config.maintenance
    if m is None:
        return None
    latest = latest_slot(m.schedule, m.timezone, now)
    if latest is None:
        return None
    slot = rfc3339(latest)
    try:
        rec = read_state(state_path(config), config.vault)
    except ValueError as exc:
        log(WARNING, f"maintenance: ignoring its state record: {exc}")
        rec = None
    if rec is not None and rec.slot == slot:
        log(DEBUG, f"maintenance: slot {slot} done at {rec.ended}")
        return None
    return slot


def _retrying(step: Callable[[], T], wait: float, stop: threading.Event, log: Log,
              what: str) -> T:
    """``step()`` (which takes a lock without waiting), tried again every few seconds
    while a lock is in the way, for up to ``wait`` seconds or until ``stop``."""
    deadline = time.monotonic() + wait
    said = False
    while True:
        try:
            return step()
        except VaultLockedError as exc:
            left = deadline - time.monotonic()
            if left <= 0 or stop.is_set():
                raise
            if not said:
                log(INFO, f"{what}: waiting (up to {left:.0f} s): {_text(exc)}")
                said = True
            stop.wait(min(LOCK_STEP, left))


def run_maintenance(config: Config, slot: str, stop: threading.Event, log: Log,
                    passphrase: Passphrase | None = None) -> MaintenanceState | None:
    """Prune, then gc, as ``[maintenance]`` says; the state record written (None: stopped
    before the end, nothing recorded, so the slot is tried again)."""
    from cbt.jobs.retention import prune
    from cbt.ops.gc import gc

    m = config.maintenance
    assert m is not None
    log(INFO, f"maintenance: slot {slot} started ({_what(m.prune, m.gc)})")
    vault = Vault.open(config.vault, passphrase)
    steps: dict[str, str] = {}
    if m.prune:
        def do_prune() -> str:
            r = prune(vault, config, _dt.datetime.now(_dt.UTC), wait=0.0)
            _warn(log, "prune", r.warnings)
            return (f"removed {sum(not p.keep for p in r.points)} of {len(r.points)} points, "
                    f"{r.snapshots_expired} kept snapshots expired")
        steps["prune"] = _step(log, "prune", lambda: _retrying(do_prune, m.wait, stop, log,
                                                                 "prune"), stop)
    if m.gc and not stop.is_set():
        def do_gc() -> str:
            r = gc(vault, dry_run=False, grace=m.gc_grace, wait=0.0, max_unused=m.max_unused)
            _warn(log, "gc", r.warnings)
            return (f"{r.packs_removed} packs removed, {r.packs_rewritten} rewritten; deleted "
                    f"{human_bytes(r.bytes_deleted)} now, {human_bytes(r.trash_bytes)} in the "
                    f"trash, {human_bytes(r.dead_kept_bytes)} dead kept in live packs")
        steps["gc"] = _step(log, "gc", lambda: _retrying(do_gc, m.wait, stop, log, "gc"), stop)
    if "stopping" in steps.values() or (stop.is_set() and len(steps) < m.prune + m.gc):
        log(INFO, f"maintenance: slot {slot} stopped before its end (tried again at start)")
        return None
    return _record(config, slot, steps, log)


def _text(exc: BaseException) -> str:
    """An error as the command line says it (an OSError without its ``[Errno N]``)."""
    if isinstance(exc, OSError) and exc.strerror:
        name = exc.filename
        return exc.strerror if name is None or str(name) in exc.strerror \
            else f"{exc.strerror}: {name}"
    return str(exc)


def _what(prune: bool, gc: bool) -> str:
    return " then ".join(n for n, on in (("prune", prune), ("gc", gc)) if on) or "nothing"


def _warn(log: Log, what: str, warnings: list[str]) -> None:
    for w in warnings:
        log(WARNING, f"{what}: {w}")


def _step(log: Log, what: str, step: Callable[[], str], stop: threading.Event) -> str:
    """One maintenance step: its outcome logged and returned (``ok: ...`` when done)."""
    try:
        text = step()
    except VaultLockedError as exc:
        if stop.is_set():
            log(INFO, f"{what}: not run: stopping")
            return "stopping"
        log(WARNING, f"{what}: gave up waiting for the vault (tried again at the next "
                     f"slot): {_text(exc)}")
        return f"gave up: {_text(exc)}"
    except (CbtError, OSError) as exc:
        log(ERROR, f"{what} failed: {_text(exc)}")
        return f"failed: {_text(exc)}"
    log(INFO, f"{what}: {text}")
    return f"ok: {text}"


def _record(config: Config, slot: str, steps: dict[str, str], log: Log) -> MaintenanceState:
    """The end of a maintenance run: logged, and its state record written."""
    path = state_path(config)
    ok = all(v.startswith("ok: ") for v in steps.values())
    ended = rfc3339(_dt.datetime.now(_dt.UTC))
    try:
        old = read_state(path, config.vault)
    except ValueError:
        old = None
    rec = MaintenanceState(config.vault, slot, ended, ok,
                           ended if ok else (old.last_success if old else None), steps)
    try:
        _write_state(path, rec)
    except OSError as exc:
        log(ERROR, f"maintenance: cannot write its state record {path}: "
                   f"{_text(exc)} (it runs again after a restart)")
    log(INFO if ok else WARNING, f"maintenance: slot {slot} ended "
        f"({'done' if ok else 'not all done'})")
    return rec


def next_wakeup(config: Config, now: _dt.datetime) -> _dt.datetime:
    """The next slot of any VM, or of maintenance (a day on, with neither)."""
    plans: list[tuple[Schedule, str]] = [
        (config.policies[v.policy].schedule, config.policies[v.policy].timezone)
        for v in config.vms.values()]
    if config.maintenance is not None:
        plans.append((config.maintenance.schedule, config.maintenance.timezone))
    return min((next_slot(sched, tz, now) for sched, tz in plans),
               default=now + _dt.timedelta(days=1))


@dataclass
class _Daemon:
    """One daemon's state: its config, how it logs, its stop flag and counters."""

    config: Config
    log: Log
    request: JobRequest
    metrics: str | None
    stop: threading.Event = field(default_factory=threading.Event)
    failures: dict[str, int] = field(default_factory=dict)

    signalled: list[str] = field(default_factory=list)
    rounds: int = 0
    retry: bool = False  # the last round failed: try again after RETRY seconds
    maintained: str | None = None  # the maintenance slot this process ran to its end (its
    # state record may be unwritable: then it is not run again at every round)
    hup: threading.Event = field(default_factory=threading.Event)  # SIGHUP: read the config
    wake: threading.Event = field(default_factory=threading.Event)  # ends a sleep: a signal

    def on_signal(self, signum: int, _frame: object) -> None:
        # (no writing here: the main thread may be inside a write to stderr; the
        # watcher thread says it, at once, even while a job runs)
        if signum == signal.SIGHUP:
            self.hup.set()
        else:
            self.signalled.append(signal.Signals(signum).name)
            self.stop.set()
        self.wake.set()

    def reread(self) -> None:
        """After SIGHUP: the config file read again; one that does not load is said
        (ERROR) and the one in use is kept."""
        if not self.stop.is_set():
            self.wake.clear()  # (before the flag: a SIGHUP from now on wakes the next sleep)
        if not self.hup.is_set():
            return
        self.hup.clear()
        try:
            config = load(self.config.path)
        except (CbtError, OSError) as exc:
            self.log(ERROR, f"received SIGHUP: keeping the config in use: {_text(exc)}")
            return
        self.config = config
        self.maintained = None  # (another state record, if the vault changed)
        self.log(INFO, f"received SIGHUP: config {config.path} read again: "
                       f"{len(config.vms)} VMs, vault {config.vault}")

    def watch(self) -> None:
        """The watcher thread: logs the stop signal as soon as it comes."""
        self.stop.wait()
        if self.signalled:
            self.log(INFO, f"received {self.signalled[0]}: stopping after the job in flight")

    def started(self, vm: str, slot: str) -> None:
        self.log(INFO, f"backup {vm}: started (slot {slot})")

    def report(self, result: JobResult, slot: str) -> None:
        p = result.point
        if p is None:
            self.failures[result.vm] = self.failures.get(result.vm, 0) + 1
            self.log(ERROR, f"backup {result.vm}: failed (slot {slot}; tried again in "
                            f"{RETRY:.0f} s): {result.error}")
            self.retry = True  # (as a timer's run-due would: not a whole slot later)
            return
        _warn(self.log, f"backup {result.vm}", p.warnings)
        self.log(INFO, f"backup {result.vm}: point {p.id} {human_bytes(p.bytes_new)} new in "
                       f"{p.seconds:.1f} s ({p.consistency}: {p.consistency_reason})")

    def once(self) -> None:
        """Steps 2 to 4: the due jobs, maintenance, the metrics; a step that fails (the
        vault out of reach) is logged, and the round tried again after :data:`RETRY`."""
        now = _dt.datetime.now(_dt.UTC)
        self.retry = False
        try:
            summary = run_due(self.config, now, self.request, on_result=self.report,
                              stop=self.stop, on_start=self.started)
        except (CbtError, OSError) as exc:
            self.failed("backups", exc)
        else:
            for sk in summary.skipped:  # (a slot done already: said at start, then with -v)
                done = sk.reason.startswith("slot ") and self.rounds > 0
                self.log(DEBUG if done else INFO, f"backup {sk.vm}: skipped, {sk.reason}")
        self.rounds += 1
        try:
            slot = None if self.stop.is_set() else maintenance_due(self.config, now, self.log)
            if slot is not None and slot != self.maintained and run_maintenance(
                    self.config, slot, self.stop, self.log, self.request.passphrase):
                self.maintained = slot
        except (CbtError, OSError) as exc:
            self.failed("maintenance", exc)
        if self.metrics is not None:
            try:
                write_metrics(self.metrics, self.config, _dt.datetime.now(_dt.UTC),
                              self.failures, self.request.passphrase)
            except (CbtError, OSError) as exc:
                self.log(ERROR, f"metrics: cannot write {self.metrics}: {_text(exc)}")

    def failed(self, what: str, exc: CbtError | OSError) -> None:
        self.log(ERROR, f"{what} failed (tried again in {RETRY:.0f} s): {_text(exc)}")
        self.retry = True

    def sleep(self) -> None:
        """Step 5: until the next slot (or the retry of a failed round), or a signal."""
        now = _dt.datetime.now(_dt.UTC)
        wake = next_wakeup(self.config, now)
        if self.retry:
            wake = min(wake, now + _dt.timedelta(seconds=RETRY))
        self.log(DEBUG, f"sleeping until {rfc3339(wake)}")
        while not self.wake.is_set():
            left = (wake - _dt.datetime.now(_dt.UTC)).total_seconds()
            if left <= 0:
                break
            self.wake.wait(min(left, 3600))


def daemon(config: Config, log: Log, workers: int | None = None,
           passphrase: Passphrase | None = None, metrics: str | None = None) -> int:
    """Run due jobs (and maintenance), sleep until the next slot, repeat; stop on
    SIGTERM/SIGINT; on SIGHUP read the config again (when the round in flight ends).
    ``log(level, text)`` gets one line per event; ``passphrase`` opens an encrypted
    vault (a finder is asked once, at the first slot); ``metrics``: the Prometheus
    textfile written after each round."""
    d = _Daemon(config, log, JobRequest(workers=workers, finish_on_stop_signal=True,
                                        passphrase=asked_once(passphrase)), metrics)
    Vault.open(config.vault, d.request.passphrase)  # a wrong passphrase fails now, not later
    old = {s: signal.signal(s, d.on_signal)
           for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    watcher = threading.Thread(target=d.watch, name="cbt-daemon-signals", daemon=True)
    watcher.start()
    try:
        m = config.maintenance
        log(INFO, f"daemon started: {len(config.vms)} VMs, vault {config.vault}, "
                  + (f"maintenance {m.schedule.text!r} ({_what(m.prune, m.gc)})" if m
                     else "no maintenance"))
        while not d.stop.is_set():
            d.once()
            if not d.stop.is_set():
                d.sleep()
            d.reread()
        watcher.join()  # (its line comes before the last one)
        log(INFO, "daemon stopped")
        return 0
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        d.stop.set()  # (the watcher ends, also after an error)
