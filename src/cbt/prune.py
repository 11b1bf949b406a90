"""Prune: remove the recovery points a policy no longer keeps.

1. For each VM of the config, apply its policy's retention to its points
   (calendar buckets in the policy's time zone; the newest point is always
   kept).  Points of VMs the config does not name are kept (``no policy``).
2. A removed point that a kept point's manifests are based on (the skip chain
   of deltas, see ``vault.points``) is *hidden* instead: its record is
   rewritten with ``hidden = true`` (a durable rename), so it no longer lists
   but still resolves.  Hidden points no kept point needs any more are
   deleted.
3. A point is deleted by removing its record first (that is the commit), then
   its manifests; a crash in between leaves manifests that the next backup
   cleans up as leftovers.  The blocks are freed later by ``cbt gc``.
4. Kept snapshots (instant restore) older than the policy's
   ``instant_restore_days`` are removed (never a disk's tracking base).
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import replace
from typing import Any

from cbt.config import Config
from cbt.durable import fsync_dir
from cbt.policy import apply_retention, parse_now
from cbt.snapshot import remove_snapshot
from cbt.vault.lock import writer_lock
from cbt.vault.points import PointRecord, point_name
from cbt.vault.vault import Vault


def _needed_bases(vault: Vault, keep: list[PointRecord],
                  by_id: dict[str, PointRecord]) -> set[str]:
    """Every point whose manifests a kept point's manifests are based on."""
    needed: set[str] = set()
    todo = [d.base for p in keep for d in p.disks if d.base]
    while todo:
        pid = todo.pop()
        if pid is None or pid in needed or pid not in by_id:
            continue
        needed.add(pid)
        todo.extend(d.base for d in by_id[pid].disks if d.base)
    return needed


def plan(vault: Vault, config: Config, now: _dt.datetime) -> dict[str, list[str]]:
    """Point id -> reasons to keep it (empty list: remove), for every visible point."""
    reasons: dict[str, list[str]] = {}
    by_vm: dict[str, list[PointRecord]] = {}
    for p in vault.points():
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


def prune(vault: Vault, config: Config, now: _dt.datetime, dry_run: bool = False,
          wait: float = 0.0) -> dict[str, Any]:
    from cbt.jobs import kept_snapshots

    warnings: list[str] = []
    with writer_lock(vault.root, wait):
        records = vault.records()
        by_id = {r.id: r for r in records}
        reasons = plan(vault, config, now)
        keep = [by_id[pid] for pid, why in reasons.items() if why]
        needed = _needed_bases(vault, keep, by_id)
        out = []
        hide, delete = [], []
        for r in records:
            if r.hidden:
                if r.id not in needed:
                    delete.append(r)
                continue
            why = reasons.get(r.id, [])
            if why:
                out.append({"recovery_point": r.id, "vm": r.vm, "keep": True, "reasons": why})
                continue
            if r.id in needed:
                hide.append(r)
                why = ["not kept by any rule; hidden, as kept points are based on it"]
            else:
                delete.append(r)
                why = ["not kept by any rule"]
            out.append({"recovery_point": r.id, "vm": r.vm, "keep": False, "reasons": why})
        expired = _expired_snapshots(vault, config, now, kept_snapshots(vault),
                                     {r.id for r in delete} | {r.id for r in hide})
        if not dry_run:
            for r in hide:
                vault.storage.put(point_name(r.id), replace(r, hidden=True).to_json())
            for r in delete:
                vault.storage.delete(point_name(r.id))
            if delete:
                fsync_dir(os.path.join(vault.root, "points"))
            for r in delete:
                for d in r.disks:
                    vault.storage.delete(d.manifest)
            for pid, paths in expired:
                for path in paths:
                    remove_snapshot(path)
                vault.storage.delete(f"snapshots/{pid}.json")
    return {"dry_run": dry_run, "points": out,
            "snapshots_expired": sum(len(paths) for _, paths in expired),
            "warnings": warnings}


def _expired_snapshots(vault: Vault, config: Config, now: _dt.datetime,
                       registry: dict[str, dict[str, Any]],
                       removed: set[str]) -> list[tuple[str, list[str]]]:
    out = []
    for pid, entry in registry.items():
        vmc = config.vms.get(entry.get("vm", ""))
        days = config.policies[vmc.policy].instant_restore_days if vmc else None
        created = parse_now(entry["created"])
        too_old = days is not None and created < now - _dt.timedelta(days=days)
        if pid in removed or too_old:
            paths = [p for p in entry.get("paths", [])
                     if not os.path.basename(p).startswith(".") and ".base" not in p]
            out.append((pid, paths))
    return out

