"""Jobs: the backup flow of one VM, run from its configuration.

For each VM, under its lock and sharing the vault (:mod:`cbt.repo.lock`):

1. Recover: a job of this VM still marked ``running`` died (we hold the lock,
   so nothing else runs); if it died between its pre and post hook, run the
   post hook with ``CBT_PHASE=recover``, then mark it ``interrupted``.
2. Record the new job as ``running`` (durably) and choose the point's id, so
   hooks see it as ``CBT_POINT``.
3. Run the pre hook.  If it fails or times out the job falls back to a
   crash-consistent snapshot and records why (or fails, with
   ``on_pre_failure = "fail"``).
4. Snapshot every disk (``snapshot`` provider, ``auto`` by default).
5. Run the post hook (with provider ``none`` or an offline qcow2 disk, read through
   qemu-nbd with the image locked: only after the transfer, so the
   application stays quiesced while its disks are read).  The post hook runs
   exactly once whenever the pre hook started, also on failure or abort.
6. Transfer: one worker per disk shard on the executor; commit the point with
   its consistency level and reason.
7. Keep the last snapshot of each ``reflink``/``btrfs`` disk as its tracking
   base (and, with ``instant_restore_days``, the others, registered for
   ``restore --instant``); remove the rest.  The base is made just before the
   commit (``SnapshotSet.settle``, whose identities the point records), and the
   next job's transfer asks ``SnapshotSet.changes`` what changed since it
   (``change_tracking = "hash"`` or ``JobRequest.full_scan`` force a hash scan).
8. Record the job's end: ``succeeded``, or ``failed`` with the error.  Also on
   failure or abort: the post hook runs if it is still due, and snapshots are
   removed.

SIGINT and SIGTERM abort a job cleanly: snapshots removed, post hook run,
job recorded as ``failed`` (unless the caller keeps them, as the daemon does:
then the job in flight and its workers finish).

Step 1 is :func:`recover`, step 2 :meth:`Job.start`; :meth:`Job.run` runs
steps 3 to 8, one method each.  A running QEMU VM (``qmp``) runs
:class:`cbt.jobs.qemu.QemuJob` instead, whose steps differ where QEMU makes the
point-in-time view (and :func:`recover` also thaws a guest a dead job froze).

An encrypted vault is opened with ``JobRequest.passphrase`` (None:
``CBT_PASSWORD_FILE``, then ``CBT_PASSWORD``); its job records are sealed, and
its lock holder record names no command line.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import time
from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from functools import partial

from cbt.core.errors import CbtError
from cbt.core.timefmt import utc_now
from cbt.format.records import DiskRecord, JobDisk, JobRecord, KeptSnapshots, PointRecord
from cbt.jobs.config import Config, VMConfig
from cbt.jobs.hooks import HookResult, run_hook
from cbt.jobs.signals import handling, signals_deferred
from cbt.ops.backup import BackupProgress, BackupRequest, backup_locked
from cbt.repo.keys import Passphrase
from cbt.repo.registry import register_snapshots, save_job
from cbt.repo.vault import Vault
from cbt.source.changes import ChangeHint, TrackingBase
from cbt.source.disks import DiskSpec
from cbt.source.qcow2 import (
    ChangesFn,
    OfflineSet,
    is_qcow2,
    open_offline,
    unnamed_qcow2_warnings,
)
from cbt.source.qemu import scope_of
from cbt.source.snapshot import (
    SnapshotSet,
    resolve_provider,
    take,
)


class JobAborted(CbtError, KeyboardInterrupt):
    """SIGINT or SIGTERM arrived during a job."""


class JobFailed(CbtError, RuntimeError):
    """The job failed; the message says which step and why."""


@dataclass
class JobResult:
    vm: str
    job_id: str
    point: PointRecord | None
    error: str | None
    snapshots: dict[str, str] = field(default_factory=dict)  # label -> provider used


@dataclass(frozen=True)
class JobRequest:
    """How a job runs: on what, reporting to whom, for which time and slot."""

    executor: Executor | None = None  # default: forked workers
    workers: int | None = None  # default: one per core
    progress: BackupProgress | None = None
    created: str | None = None  # the point's creation time (default: when the job starts)
    wait: float = 0.0  # seconds to wait for another writer (default: fail at once)
    slot: str | None = None  # the schedule slot the point fulfils
    # SIGINT and SIGTERM are the caller's (the daemon's): the job is not aborted and
    # its forked workers ignore them, so the job in flight finishes
    finish_on_stop_signal: bool = False
    # opens an encrypted vault (a finder is asked only then; None: CBT_PASSWORD_FILE,
    # then CBT_PASSWORD); an unencrypted vault ignores it
    passphrase: Passphrase | None = field(default=None, repr=False)
    # hash every allocated block, whatever the change sources say (``--full-scan``)
    full_scan: bool = False


# -- signals ---------------------------------------------------------------------------


@contextlib.contextmanager
def abort_on_signals() -> Iterator[None]:
    """Turn SIGTERM (and SIGINT) into JobAborted in this process while a job runs."""
    def handler(signum: int, _frame: object) -> None:
        raise JobAborted(f"aborted by {signal.Signals(signum).name}")

    with handling(handler):
        yield


# -- steps 2 to 8: the job ----------------------------------------------------------------


class Job:
    """One run of one VM's job, under its locks: steps 2 to 8 of the module docstring."""

    def __init__(self, config: Config, vault: Vault, vm: str, request: JobRequest,
                 record: JobRecord, warnings: list[str]) -> None:
        self.config = config
        self.vault = vault
        self.vmc = config.vms[vm]
        self.request = request
        self.record = record
        self.point_id = record.recovery_point or ""
        self.warnings = warnings  # recover's, the snapshots', failed post hooks'
        self.providers: dict[str, str] = {}  # label -> snapshot provider
        self.pre: HookResult | None = None
        self.hooks_started = False  # from then on the post hook runs, whatever happens
        self.post_done = False
        self.snaps: SnapshotSet | None = None  # taken and not yet committed or discarded
        self.images: dict[str, str] = {}  # label -> offline qcow2 image (read via qemu-nbd)
        self.offline = contextlib.ExitStack()  # their qemu-nbd and bitmaps, until the end
        self.offline_set: OfflineSet | None = None

    @classmethod
    def start(cls, config: Config, vault: Vault, vm: str, request: JobRequest,
              warnings: list[str]) -> Job:
        """Step 2: choose the point's id (hooks see it) and record the job as running."""
        created = request.created or utc_now()
        point_id = vault.unused_point_id(vm, created)
        job_id = f"{vm}.{created.replace('-', '').replace(':', '')}.{secrets.token_hex(3)}"
        record = JobRecord(id=job_id, vm=vm, policy=config.vms[vm].policy, start=utc_now(),
                           recovery_point=point_id, pid=os.getpid(), slot=request.slot,
                           start_ns=time.time_ns())
        save_job(vault, record)
        return cls(config, vault, vm, replace(request, created=created), record, warnings)

    def run(self) -> JobResult:
        """Steps 3 to 8; the post hook runs and the job's end is recorded whatever happens."""
        try:
            return self.succeeded(self._steps())
        except (CbtError, OSError) as exc:
            return self.failed(exc)
        finally:
            self.record_end()

    def _steps(self) -> PointRecord:
        self.providers = self.check_disks()
        self.pre_hook()
        snaps = self.snapshot()
        if not snaps.live and not self.images:  # (an offline image is read while quiesced:
            self.post_hook()                    # a post hook may start its VM)
        point = self.transfer(snaps)  # with a live read the post hook runs before the commit
        if self.offline_set is not None:
            self.offline_set.commit()
        self.post_hook()
        self.keep_snapshots(point, snaps)
        return point

    def check_disks(self) -> dict[str, str]:
        """Before any hook: every disk exists; the snapshot provider of each."""
        vmc = self.vmc
        if vmc.host is not None:  # (opened where they lie: by the workers of that host)
            return resolve_provider("none", vmc.name, vmc.disks, None)
        for label, path in vmc.disks.items():
            if not os.path.exists(path):
                raise JobFailed(f"disk {label}: no such disk or image: {path}")
        # a qcow2 image is never snapshotted (a clone would take its bitmaps): it is read
        # through qemu-nbd as the guest sees it, the VM stopped
        self.images = {lb: p for lb, p in vmc.disks.items() if not vmc.qemu and is_qcow2(p)}
        if not vmc.qemu:
            self.warnings += unnamed_qcow2_warnings(vmc.disks)
        rest = {lb: p for lb, p in vmc.disks.items() if lb not in self.images}
        return {**resolve_provider(vmc.snapshot, vmc.name, rest, vmc.snapshot_dir),
                **dict.fromkeys(self.images, "qemu-nbd")}

    def pre_hook(self) -> None:
        """Step 3: mark the hooks pending (durably), then run the pre hook."""
        hooks = self.vmc.hooks
        if not hooks or not (hooks.pre or hooks.post):
            return
        self.record.hook_pending = True
        save_job(self.vault, self.record)
        self.hooks_started = True
        if hooks.pre:
            started = time.monotonic()
            try:
                self.pre = run_hook(hooks.pre, "pre", self.vmc.name, self.point_id,
                                    hooks.timeout, hooks.cwd)
            except JobAborted as exc:  # the hook's group was killed: its run is recorded
                self.record.hooks.append(HookResult(
                    "pre", False, None, False, "", time.monotonic() - started,
                    error=f"{exc} while it ran").to_record())
                raise
            self.record.hooks.append(self.pre.to_record())
            if not self.pre.ok and hooks.on_pre_failure == "fail":
                raise JobFailed(f"{self.pre.describe()} (on_pre_failure = \"fail\")")

    def snapshot(self) -> SnapshotSet:
        """Step 4: snapshot every disk with its provider."""
        vmc = self.vmc
        rest = {lb: p for lb, p in vmc.disks.items() if lb not in self.images}
        self.snaps = take(vmc.name, self.record.id, rest,
                          {lb: self.providers[lb] for lb in rest}, vmc.snapshot_dir)
        self.warnings += self.snaps.warnings
        if self.images:
            prev = self.vault.latest(vmc.name)
            self.offline_set = self.offline.enter_context(open_offline(
                self.images, self.point_id, prev.id if prev else None,
                scope_of(str(self.vault.config["id"]), vmc.name)))
        return self.snaps

    def post_hook(self) -> list[str]:
        """Step 5: the post hook, exactly once if the hooks started; returns new warnings."""
        if self.post_done or not self.hooks_started:
            return []
        self.post_done = True
        hooks = self.vmc.hooks
        new = []
        if hooks and hooks.post:
            res = run_hook(hooks.post, "post", self.vmc.name, self.point_id, hooks.timeout,
                           hooks.cwd)
            self.record.hooks.append(res.to_record())
            if not res.ok:
                new.append(res.describe())
        self.record.hook_pending = False
        save_job(self.vault, self.record)
        self.warnings.extend(new)
        return new

    def transfer(self, snaps: SnapshotSet) -> PointRecord:
        """Step 6: one worker per disk shard; commit the point with its consistency."""
        vmc, request = self.vmc, self.request
        specs = [DiskSpec(label, path, read_from=snaps.read_paths.get(label))
                 for label, path in vmc.disks.items()]
        changes: ChangesFn = partial(_changes, snaps, vmc.change_tracking == "hash")
        if self.offline_set is not None:
            specs = self.offline_set.specs(specs)
            if vmc.change_tracking != "hash":
                changes = self.offline_set.changes(changes)
        consistency = _consistency(vmc, self.pre, snaps)
        return backup_locked(self.vault, BackupRequest(
            vmc.name, specs, block_size=vmc.block_size, workers=request.workers,
            progress=request.progress, created=request.created, consistency=consistency,
            executor=request.executor, point_id=self.point_id, warnings=self.warnings,
            slot=request.slot, before_commit=self.read_done,
            ignore_stop_signals=request.finish_on_stop_signal,
            full_scan=request.full_scan, verify_fraction=vmc.verify_fraction,
            changes=changes,
            settle=partial(snaps.settle, keep=self.keep),
            hosts=dict.fromkeys(vmc.disks, vmc.host) if vmc.host is not None else {}))

    def read_done(self) -> list[str]:
        """Every disk read: offline images are released (qemu-nbd stopped), then the post
        hook runs if still due; its warnings go into the point."""
        if self.offline_set is not None:
            self.offline_set.stop()
        return self.post_hook()

    @property
    def keep(self) -> bool:
        """Whether the policy keeps every snapshot for instant restore."""
        return self.config.policies[self.vmc.policy].instant_restore_days > 0

    def keep_snapshots(self, point: PointRecord, snaps: SnapshotSet) -> None:
        """Step 7: keep the tracking bases (and, for instant restore, the rest); register them."""
        created_paths = list(snaps.created)
        kept = snaps.commit(keep=self.keep)
        self.snaps = None
        if kept:
            register_snapshots(self.vault, KeptSnapshots.of(point, kept, created_paths))

    def succeeded(self, point: PointRecord) -> JobResult:
        """Step 8, once the point is committed: the job's record says what each disk cost."""
        self.record.status, self.record.consistency = "succeeded", point.consistency
        self.record.disks = [JobDisk(d.label, self.providers[d.label], d.bytes_read,
                                     d.bytes_new, d.bytes_stored, d.seconds)
                             for d in point.disks]
        return JobResult(self.vmc.name, self.record.id, point, None, self.providers)

    def failed(self, exc: CbtError | OSError) -> JobResult:
        """Step 8 after an error: no point; an abort (a signal) is raised on."""
        text = str(exc)
        if isinstance(exc, OSError) and exc.strerror:  # (as the command line says it)
            text = exc.strerror if not exc.filename else f"{exc.strerror}: {exc.filename}"
        self.record.status, self.record.error = "failed", " ".join(text.split())
        self.record.recovery_point = None
        if isinstance(exc, JobAborted):
            raise exc
        return JobResult(self.vmc.name, self.record.id, None, self.record.error,
                         self.providers)

    def record_end(self) -> None:
        """Step 8: run a post hook still due, discard snapshots not kept, record the end."""
        try:
            self.post_hook()
        finally:
            if self.snaps is not None:
                self.snaps.discard()
            self.offline.close()  # qemu-nbd stopped; bitmaps settled (or merged back)
            rec = self.record
            rec.end = utc_now()
            if rec.status == "running":
                rec.status, rec.error = "failed", rec.error or "aborted"
                rec.recovery_point = None
            rec.hook_pending = False
            with signals_deferred():
                save_job(self.vault, rec)


def _changes(snaps: SnapshotSet, hash_only: bool, label: str, parent: DiskRecord | None,
             block_size: int, size: int) -> ChangeHint:
    """What the snapshots say changed in disk ``label`` since its previous point ``parent``
    (the tracking base that point recorded; None: no previous point); every block, said
    so, for a VM whose config says ``change_tracking = "hash"``."""
    if hash_only:
        return ChangeHint.hash('change_tracking = "hash"')
    recorded = TrackingBase.from_json(parent.tracking_base) if parent is not None else None
    return snaps.changes(label, block_size, size, recorded)


def _consistency(vmc: VMConfig, pre: HookResult | None, snaps: SnapshotSet) -> tuple[str, str]:
    """Level and reason, as DESIGN.md's "Consistency, honestly recorded" says."""
    if pre is not None and pre.ok:
        level = vmc.hooks.provides if vmc.hooks else "application"
        how = ("disks read while quiesced" if snaps.live or not snaps.providers
               else "snapshots taken while quiesced")
        return level, f"pre hook succeeded; {how}"
    if pre is not None:
        reasons = [pre.describe()]
    else:
        reasons = ["no pre hook" if vmc.hooks and vmc.hooks.post else "no hooks"]
    if snaps.live:
        reasons.append("live read")
    elif not snaps.providers:  # (every disk an offline qcow2 image)
        reasons.append("offline qcow2 image")
    elif not snaps.one_moment:
        reasons.append("disks snapshotted sequentially")
    return "crash", "; ".join(reasons)
