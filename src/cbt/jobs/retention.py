"""Retention of a config applied to a vault: which points to keep, and why.

1. For each VM of the config, apply its policy's retention to its points
   (``last``, calendar buckets in the policy's time zone, ``within`` relative
   to the VM's newest point: :func:`cbt.jobs.policy.apply_retention`; the
   newest point is always kept).  Points of VMs the config does not name are kept (``no policy``);
   points newer than ``now`` are kept (``newer than --now``).
2. A kept snapshot (instant restore) expires when it is older than its VM's
   policy's ``instant_restore_days``.
3. :func:`prune` hands both to :func:`cbt.ops.prune.prune`, which hides or
   removes points with the vault alone (no backup running).
"""

from __future__ import annotations

import datetime as _dt

from cbt.core.timefmt import parse_now
from cbt.format.records import PointRecord
from cbt.jobs.config import Config
from cbt.jobs.policy import apply_retention
from cbt.ops.prune import PruneRequest, PruneResult
from cbt.ops.prune import prune as prune_points
from cbt.repo.vault import Vault


def keep_reasons(points: list[PointRecord], config: Config,
                 now: _dt.datetime) -> dict[str, list[str]]:
    """Point id -> reasons to keep it (empty list: remove), for every visible point."""
    reasons: dict[str, list[str]] = {}
    by_vm: dict[str, list[PointRecord]] = {}
    for p in points:
        by_vm.setdefault(p.vm, []).append(p)
    for vm, pts in by_vm.items():
        vmc = config.vms.get(vm)
        if vmc is None:
            reasons.update({p.id: ["no policy"] for p in pts})
            continue
        policy = config.policies[vmc.policy]
        future = [p for p in pts if parse_now(p.created) > now]
        reasons.update({p.id: ["newer than --now"] for p in future})
        past = [(p.id, parse_now(p.created)) for p in pts if p not in future]
        reasons.update(apply_retention(past, policy.retention, policy.timezone))
    return reasons


def snapshot_expired(config: Config, now: _dt.datetime, vm: str, created: str) -> bool:
    """Whether a kept snapshot of ``vm`` taken at ``created`` has outlived its policy."""
    vmc = config.vms.get(vm)
    days = config.policies[vmc.policy].instant_restore_days if vmc else None
    return days is not None and parse_now(created) < now - _dt.timedelta(days=days)


def prune_request(config: Config, now: _dt.datetime, dry_run: bool = False,
                  wait: float = 0.0) -> PruneRequest:
    return PruneRequest(keep=lambda points: keep_reasons(points, config, now),
                        expired=lambda vm, created: snapshot_expired(config, now, vm, created),
                        dry_run=dry_run, wait=wait)


def prune(vault: Vault, config: Config, now: _dt.datetime, dry_run: bool = False,
          wait: float = 0.0) -> PruneResult:
    """Remove the points ``config``'s retention no longer keeps (see :mod:`cbt.ops.prune`)."""
    return prune_points(vault, prune_request(config, now, dry_run, wait))
