"""Running jobs: one VM's job now (:func:`run_vm`), every VM of a config (:func:`run`).

Under the VM's lock, sharing the vault with other backups: step 1 of
:mod:`cbt.jobs.job` (:func:`recover`: close this VM's jobs that died, run their
pending post hook, thaw a guest a dead QEMU job left frozen), then the job
itself: :class:`cbt.jobs.job.Job`, or for a VM with ``qmp``
:class:`cbt.jobs.qemu.QemuJob`.  This module sits above
both, so neither imports the other's caller.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import Executor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from cbt.core.timefmt import parse_now, rfc3339, utc_now
from cbt.jobs.config import Config, VMConfig
from cbt.jobs.config import load as load_config
from cbt.jobs.dask_executor import as_executor
from cbt.jobs.hooks import run_hook
from cbt.jobs.job import Job, JobFailed, JobRequest, JobResult, abort_on_signals
from cbt.jobs.policy import latest_slot
from cbt.jobs.qemu import QemuJob, thaw_interrupted
from cbt.ops.backup import BackupProgress
from cbt.repo.keys import Passphrase
from cbt.repo.lock import shared_lock, vm_lock
from cbt.repo.registry import list_jobs, save_job
from cbt.repo.vault import Vault
from cbt.source.snapshot import SNAPSHOT_DIR, btrfs_subvolume, remove_snapshot, snapshot_dir_for

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["asked_once", "recover", "run", "run_vm", "slot_at"]


# -- step 1: recover ----------------------------------------------------------------------


def recover(vault: Vault, vmc: VMConfig) -> list[str]:
    """Close jobs of this VM that died; run their pending post hook (recover)."""
    warnings: list[str] = []
    for rec in list_jobs(vault, vmc.name, warnings):
        if rec.status != "running":
            continue
        if rec.hook_pending and vmc.qemu:
            thaw_interrupted(vmc, rec, warnings)
        if rec.hook_pending and vmc.hooks and vmc.hooks.post:
            res = run_hook(vmc.hooks.post, "recover", vmc.name,
                           rec.recovery_point or "", vmc.hooks.timeout, vmc.hooks.cwd)
            rec.hooks.append(res.to_record())
            if not res.ok:
                warnings.append(f"recover hook of interrupted job {rec.id}: {res.describe()}")
        for path in _job_snapshots(vmc, rec.id):
            remove_snapshot(path)
        committed = rec.recovery_point in set(vault.point_ids())
        rec.status, rec.end, rec.hook_pending = "interrupted", utc_now(), False
        rec.recovery_point = rec.recovery_point if committed else None
        rec.error = rec.error or "the job's process died before it finished"
        save_job(vault, rec)
    return warnings


def _job_snapshots(vmc: VMConfig, job_id: str) -> list[str]:
    """Snapshots a dead job left: files and subvolumes whose name carries its id (a QEMU
    VM has none: QEMU's leftovers are released by :mod:`cbt.jobs.qemu`)."""
    if vmc.qemu:
        return []
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


# -- entry points ----------------------------------------------------------------------


def run_vm(config: Config, vm: str, request: JobRequest | None = None) -> JobResult:
    """Run the backup job of one VM now; the result carries the point or the error.
    A request without a slot (a manual run) records the slot its time falls in (the
    latest of the VM's schedule at or before it), so that slot is not due again."""
    request = request or JobRequest()
    if request.slot is None and vm in config.vms:
        created = request.created or utc_now()
        request = replace(request, created=created, slot=slot_at(config, vm, created))
    vault = Vault.open(config.vault, request.passphrase)
    signals = (contextlib.nullcontext() if request.finish_on_stop_signal
               else abort_on_signals())
    # the VM's lock first: recovery touches that VM's job records only
    with vm_lock(vault, vm, request.wait), \
            shared_lock(vault.storage, request.wait, not vault.encrypted), signals:
        warnings = recover(vault, config.vms[vm])
        return _job_class(config.vms[vm]).start(config, vault, vm, request, warnings).run()


def slot_at(config: Config, vm: str, created: str) -> str | None:
    """The slot of ``vm``'s schedule a job created at ``created`` fulfils: the latest at
    or before it (None: none in the two weeks before)."""
    policy = config.policies[config.vms[vm].policy]
    slot = latest_slot(policy.schedule, policy.timezone, parse_now(created))
    return rfc3339(slot) if slot is not None else None


def _job_class(vmc: VMConfig) -> type[Job]:
    """:class:`Job`, or for a running QEMU VM :class:`cbt.jobs.qemu.QemuJob`."""
    return QemuJob if vmc.qemu else Job


def run(config: Config | str | os.PathLike[str], vm: str | None = None,
        executor: Executor | Client | None = None, workers: int | None = None,
        progress: BackupProgress | None = None, created: str | None = None,
        wait: float = 0.0, passphrase: Passphrase | None = None) -> list[JobResult]:
    """Run the job of every VM of the config (or one) now, whatever the schedule;
    ``passphrase`` opens an encrypted vault (see :class:`JobRequest`); ``executor`` runs
    the shards (default: forked workers): any Executor, or a ``distributed.Client``
    (:mod:`cbt.jobs.dask_executor`: each VM's disks read on its ``host``)."""
    cfg = config if isinstance(config, Config) else load_config(config)
    if vm is not None and vm not in cfg.vms:
        raise JobFailed(f"no VM named {vm!r} in {cfg.path}")
    names = [vm] if vm is not None else list(cfg.vms)
    request = JobRequest(executor=as_executor(executor), workers=workers, progress=progress,
                         created=created, wait=wait, passphrase=asked_once(passphrase))
    return [run_vm(cfg, name, request) for name in names]


def asked_once(passphrase: Passphrase | None) -> Passphrase | None:
    """``passphrase``, a finder (a prompt) asked at most once however many times the
    vault is opened (one job per VM, a daemon's every slot)."""
    if not callable(passphrase):
        return passphrase
    find = passphrase
    found: list[bytes] = []

    def once() -> bytes:
        if not found:
            found.append(find())
        return found[0]

    return once
