"""Prune: remove the recovery points a retention plan no longer keeps.

1. The plan (:class:`PruneRequest`, made from a config by
   :mod:`cbt.jobs.retention`) says, for every visible point, the reasons to
   keep it (none: remove), and which kept snapshots have expired.
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

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from cbt.format.records import PointRecord, point_name
from cbt.repo.lock import writer_lock
from cbt.repo.registry import kept_snapshots
from cbt.repo.vault import Vault
from cbt.source.snapshot import remove_snapshot


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


@dataclass(frozen=True)
class PruneRequest:
    """What to keep: ``keep`` maps the visible points to the reasons to keep each
    (an empty list: remove); ``expired(vm, created)`` says whether a kept snapshot
    taken then has outlived its policy."""

    keep: Callable[[list[PointRecord]], dict[str, list[str]]]
    expired: Callable[[str, str], bool]
    dry_run: bool = False
    wait: float = 0.0


def prune(vault: Vault, request: PruneRequest) -> dict[str, Any]:
    dry_run = request.dry_run
    warnings: list[str] = []
    with writer_lock(vault.storage, request.wait):
        records = vault.records()
        by_id = {r.id: r for r in records}
        reasons = request.keep(vault.points())
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
        expired = _expired_snapshots(kept_snapshots(vault), request.expired,
                                     {r.id for r in delete} | {r.id for r in hide})
        if not dry_run:
            for r in hide:
                vault.storage.put(point_name(r.id), replace(r, hidden=True).to_json())
            for r in delete:
                vault.storage.delete(point_name(r.id))
            if delete:
                vault.storage.sync("points")
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


def _expired_snapshots(registry: dict[str, dict[str, Any]], expired: Callable[[str, str], bool],
                       removed: set[str]) -> list[tuple[str, list[str]]]:
    out = []
    for pid, entry in registry.items():
        if pid in removed or expired(entry.get("vm", ""), entry["created"]):
            paths = [p for p in entry.get("paths", [])
                     if not os.path.basename(p).startswith(".") and ".base" not in p]
            out.append((pid, paths))
    return out
