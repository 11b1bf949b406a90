"""Jobs: the backup flow of one VM, run from its configuration.

For each VM, under the vault's writer lock:

1. Recover: a job of this VM still marked ``running`` died (we hold the lock,
   so nothing else runs); if it died between its pre and post hook, run the
   post hook with ``CBT_PHASE=recover``, then mark it ``interrupted``.
2. Record the new job as ``running`` (durably) and choose the point's id, so
   hooks see it as ``CBT_POINT``.
3. Run the pre hook.  If it fails or times out the job falls back to a
   crash-consistent snapshot and records why (or fails, with
   ``on_pre_failure = "fail"``).
4. Snapshot every disk (``snapshot`` provider, ``auto`` by default).
5. Run the post hook (with provider ``none``: only after the transfer, so the
   application stays quiesced while its disks are read).  The post hook runs
   exactly once whenever the pre hook started, also on failure or abort.
6. Transfer: one worker per disk shard on the executor; commit the point with
   its consistency level and reason.
7. Keep the last snapshot of each ``reflink``/``btrfs`` disk as its tracking
   base, remove the rest, and record the job's end.

SIGINT and SIGTERM abort a job cleanly: snapshots removed, post hook run,
job recorded as ``failed``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import time
from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cbt.core.errors import CbtError
from cbt.core.timefmt import utc_now
from cbt.format.records import PointRecord, new_point_id
from cbt.jobs.config import Config, VMConfig
from cbt.jobs.config import load as load_config
from cbt.jobs.hooks import HookResult, run_hook
from cbt.ops.backup import BackupProgress, BackupRequest, backup_locked
from cbt.repo.lock import writer_lock
from cbt.repo.registry import (
    list_jobs,
    register_snapshots,
    save_job,
)
from cbt.repo.vault import Vault
from cbt.source.disks import DiskSpec
from cbt.source.snapshot import (
    SNAPSHOT_DIR,
    SnapshotSet,
    btrfs_subvolume,
    remove_snapshot,
    resolve_provider,
    snapshot_dir_for,
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


# -- signals ---------------------------------------------------------------------------


@contextlib.contextmanager
def _abort_on_signals() -> Iterator[None]:
    """Turn SIGTERM (and SIGINT) into JobAborted in this process while a job runs."""
    def handler(signum: int, _frame: object) -> None:
        raise JobAborted(f"aborted by {signal.Signals(signum).name}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# -- one VM ------------------------------------------------------------------------------


def _recover(vault: Vault, vmc: VMConfig) -> list[str]:
    """Close jobs of this VM that died; run their pending post hook (recover)."""
    warnings = []
    for rec in list_jobs(vault, vmc.name):
        if rec.get("status") != "running":
            continue
        if rec.get("hook_pending") and vmc.hooks and vmc.hooks.post:
            res = run_hook(vmc.hooks.post, "recover", vmc.name,
                           rec.get("recovery_point") or "", vmc.hooks.timeout, vmc.hooks.cwd)
            if not res.ok:
                warnings.append(f"recover hook of interrupted job {rec['id']}: {res.describe()}")
        for path in _job_snapshots(vmc, rec["id"]):
            remove_snapshot(path)
        committed = rec.get("recovery_point") in set(vault.point_ids())
        rec.update(status="interrupted", end=utc_now(), hook_pending=False,
                   recovery_point=rec.get("recovery_point") if committed else None,
                   error=rec.get("error") or "the job's process died before it finished")
        save_job(vault, rec)
    return warnings


def _job_snapshots(vmc: VMConfig, job_id: str) -> list[str]:
    """Snapshots a dead job left: files and subvolumes whose name carries its id."""
    dirs = {snapshot_dir_for(p, vmc.name, vmc.snapshot_dir) for p in vmc.disks.values()}
    for p in vmc.disks.values():
        subvol = btrfs_subvolume(p) if os.path.exists(p) else None
        if subvol and not vmc.snapshot_dir:
            dirs.add(Path(subvol) / SNAPSHOT_DIR)
    found = []
    for d in dirs:
        with contextlib.suppress(OSError):
            found += [str(e) for e in d.iterdir() if f".{job_id}" in e.name]
    return found


def _consistency(vmc: VMConfig, pre: HookResult | None, snaps: SnapshotSet) -> tuple[str, str]:
    """Level and reason, as DESIGN.md's "Consistency, honestly recorded" says."""
    if pre is not None and pre.ok:
        level = vmc.hooks.provides if vmc.hooks else "application"
        how = ("disks read while quiesced" if snaps.live else "snapshots taken while quiesced")
        return level, f"pre hook succeeded; {how}"
    if pre is not None:
        reasons = [pre.describe()]
    else:
        reasons = ["no pre hook" if vmc.hooks and vmc.hooks.post else "no hooks"]
    if snaps.live:
        reasons.append("live read")
    elif not snaps.one_moment:
        reasons.append("disks snapshotted sequentially")
    return "crash", "; ".join(reasons)


def run_vm(config: Config, vm: str, executor: Executor | None = None,
           workers: int | None = None, progress: BackupProgress | None = None,
           created: str | None = None, wait: float = 0.0, slot: str | None = None,
           abort_on_signals: bool = True) -> JobResult:
    """Run the backup job of one VM now; the result carries the point or the error."""
    vmc = config.vms[vm]
    vault = Vault.open(config.vault)
    signals = _abort_on_signals() if abort_on_signals else contextlib.nullcontext()
    with writer_lock(vault.root, wait), signals:
        warnings = _recover(vault, vmc)
        created = created or utc_now()
        point_id = new_point_id(vm, created, set(vault.point_ids()))
        job_id = f"{vm}.{created.replace('-', '').replace(':', '')}.{secrets.token_hex(3)}"
        rec: dict[str, Any] = {
            "id": job_id, "vm": vm, "policy": vmc.policy, "start": utc_now(), "end": None,
            "status": "running", "consistency": None, "recovery_point": point_id,
            "disks": [], "error": None, "hook_pending": False, "pid": os.getpid(),
            "slot": slot, "start_ns": time.time_ns(),
        }
        save_job(vault, rec)
        hooks = vmc.hooks
        pre: HookResult | None = None
        hooks_started = False
        post_done = False
        snaps: SnapshotSet | None = None
        point: PointRecord | None = None
        providers: dict[str, str] = {}

        def run_post() -> list[str]:
            """The post hook, exactly once if the hooks started; returns new warnings."""
            nonlocal post_done
            if post_done or not hooks_started:
                return []
            post_done = True
            new = []
            if hooks and hooks.post:
                res = run_hook(hooks.post, "post", vm, point_id, hooks.timeout, hooks.cwd)
                if not res.ok:
                    new.append(res.describe())
            rec["hook_pending"] = False
            save_job(vault, rec)
            warnings.extend(new)
            return new

        try:
            for label, path in vmc.disks.items():
                if not os.path.exists(path):
                    raise JobFailed(f"disk {label}: no such disk or image: {path}")
            providers = resolve_provider(vmc.snapshot, vm, vmc.disks, vmc.snapshot_dir)
            if hooks and (hooks.pre or hooks.post):
                rec["hook_pending"] = True
                save_job(vault, rec)
                hooks_started = True  # from here on the post hook runs, whatever happens
                if hooks.pre:
                    pre = run_hook(hooks.pre, "pre", vm, point_id, hooks.timeout, hooks.cwd)
                    if not pre.ok and hooks.on_pre_failure == "fail":
                        raise JobFailed(f"{pre.describe()} (on_pre_failure = \"fail\")")
            snaps = take(vm, job_id, vmc.disks, providers, vmc.snapshot_dir)
            warnings += snaps.warnings
            if not snaps.live:
                run_post()
            level, reason = _consistency(vmc, pre, snaps)
            specs = [DiskSpec(label, path, read_from=snaps.read_paths[label])
                     for label, path in vmc.disks.items()]
            # with a live read the post hook runs after the transfer, before the commit
            point = backup_locked(vault, BackupRequest(vm, specs, block_size=vmc.block_size,
                                  workers=workers, progress=progress, created=created,
                                  consistency=(level, reason), executor=executor,
                                  point_id=point_id, warnings=warnings, slot=slot,
                                  before_commit=run_post))
            run_post()
            days = config.policies[vmc.policy].instant_restore_days
            created_paths = list(snaps.created)
            kept = snaps.commit(keep=days > 0)
            snaps = None
            if kept:
                register_snapshots(vault, point, kept, created_paths)
            rec.update(status="succeeded", consistency=point.consistency)
            rec["disks"] = [{"label": d.label, "snapshot": providers[d.label],
                             "bytes_read": d.bytes_read, "bytes_new": d.bytes_new,
                             "bytes_stored": d.bytes_stored, "seconds": d.seconds}
                            for d in point.disks]
            return JobResult(vm, job_id, point, None, providers)
        except (CbtError, OSError) as exc:
            rec.update(status="failed", error=" ".join(str(exc).split()),
                       recovery_point=None)
            if isinstance(exc, JobAborted):
                raise
            return JobResult(vm, job_id, None, rec["error"], providers)
        finally:
            try:
                run_post()
            finally:
                if snaps is not None:
                    snaps.discard()
                rec["end"] = utc_now()
                if rec["status"] == "running":
                    rec.update(status="failed", error=rec["error"] or "aborted",
                               recovery_point=None)
                rec["hook_pending"] = False
                save_job(vault, rec)


def run(config: Config | str | os.PathLike[str], vm: str | None = None,
        executor: Executor | None = None, workers: int | None = None,
        progress: BackupProgress | None = None, created: str | None = None,
        wait: float = 0.0) -> list[JobResult]:
    """Run the job of every VM of the config (or one) now, whatever the schedule."""
    cfg = config if isinstance(config, Config) else load_config(config)
    if vm is not None and vm not in cfg.vms:
        raise JobFailed(f"no VM named {vm!r} in {cfg.path}")
    names = [vm] if vm is not None else list(cfg.vms)
    return [run_vm(cfg, name, executor, workers, progress, created, wait) for name in names]

