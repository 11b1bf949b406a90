"""Prune: remove the recovery points a retention plan no longer keeps.

1. The plan (:class:`PruneRequest`, made from a config by
   :mod:`cbt.jobs.retention`) says, for every visible point, the reasons to
   keep it (none: remove), and which kept snapshots have expired.
2. A removed point that a kept point's manifests are based on (the skip chain
   of deltas, see ``vault.points``) is *hidden* instead: its record is
   rewritten with ``hidden = true`` (a durable rename), so it no longer lists
   but still resolves.  So is a VM's newest point that goes when it is newer
   than every point that stays (only ``forget`` removes a latest point): the
   VM's next backup finds that record newer than the point it is made against,
   and uses no change hint (one kept since the last backup would miss what
   changed in between).  Hidden points no kept point needs, and no such newer
   one, are deleted.  In an encrypted vault the rewritten record is sealed again.
3. A point is deleted by removing its record first (that is the commit), then
   its manifests (named by the vault's layout from the point's id and disk
   labels, never by what the record says); a crash in between leaves manifests that the next backup
   cleans up as leftovers.  Records go dependents first (a point before the
   points its deltas are based on), so a crash part way never leaves a record
   whose base is gone (an unavailable point).  The blocks are freed later by
   ``cbt gc``.
4. Kept snapshots (instant restore) older than the policy's
   ``instant_restore_days`` are removed (never a disk's tracking base).

:func:`forget` is the same with a plan that names the points to remove
(``cbt forget``): every other point is kept, and a named point that kept points
are based on is hidden, as above, and so is a VM's newest point.

A point record that cannot be read (damaged) is left where it is, and so is
every point based on it and every base those need, and the points its own
deltas are based on (its manifests name them); each is named in a warning
(``cbt verify --repair`` sets a damaged record aside).  When those manifests
cannot be read either, prune hides what it would delete.  The others are
pruned as usual.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from cbt.core.errors import CbtError, CbtValueError
from cbt.format.records import KeptSnapshots, PointRecord, is_point_id
from cbt.repo.lock import check_held, exclusive_lock
from cbt.repo.registry import kept_snapshots, remove_kept
from cbt.repo.vault import Vault
from cbt.source.snapshot import is_snapshot_path, remove_snapshot


@dataclass(frozen=True)
class PruneRequest:
    """What to keep: ``keep`` maps the visible points to the reasons to keep each
    (an empty list: remove); ``expired(vm, created)`` says whether a kept snapshot
    taken then has outlived its policy."""

    keep: Callable[[list[PointRecord]], dict[str, list[str]]]
    expired: Callable[[str, str], bool]
    dry_run: bool = False
    wait: float = 0.0
    removed_why: str = "not kept by any rule"  # the reason given for a point that goes


@dataclass(frozen=True)
class PointVerdict:
    """Whether a visible point stays, and why."""

    recovery_point: str
    vm: str
    keep: bool
    reasons: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"recovery_point": self.recovery_point, "vm": self.vm, "keep": self.keep,
                "reasons": list(self.reasons)}


@dataclass
class PruneResult:
    dry_run: bool
    points: list[PointVerdict]
    snapshots_expired: int
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The JSON of ``cbt prune --json``."""
        return {"dry_run": self.dry_run, "points": [p.to_dict() for p in self.points],
                "snapshots_expired": self.snapshots_expired, "warnings": list(self.warnings)}


@dataclass
class _Plan:
    """Steps 1 and 2: a verdict per visible point, and what changes on the vault."""

    verdicts: list[PointVerdict] = field(default_factory=list)
    hide: list[PointRecord] = field(default_factory=list)
    delete: list[PointRecord] = field(default_factory=list)
    expired: list[tuple[str, list[str]]] = field(default_factory=list)  # point id, paths


def prune(vault: Vault, request: PruneRequest,
          progress: Callable[[int, int], None] | None = None) -> PruneResult:
    """Steps 1 to 4 of the module doc, with the vault alone (no backup runs);
    ``progress(done, total)``: points hidden or deleted, of those to."""
    warnings: list[str] = []
    with exclusive_lock(vault.storage, request.wait, reveal_command=not vault.encrypted):
        plan = _plan(vault, request, warnings)
        if not request.dry_run:
            _apply(vault, plan, progress or (lambda _done, _total: None))
    return PruneResult(dry_run=request.dry_run, points=plan.verdicts,
                       snapshots_expired=sum(len(paths) for _, paths in plan.expired),
                       warnings=warnings)


def forget(vault: Vault, refs: list[str], dry_run: bool = False, wait: float = 0.0,
           progress: Callable[[int, int], None] | None = None) -> PruneResult:
    """Remove the named points (ids, unique id prefixes, ``VM.latest``), with the vault
    alone, as :func:`prune` removes what a plan does not keep; the result lists the
    named points only.  A name that is no visible point, or one that is unavailable
    (based on a damaged record), raises before anything changes (it is resolved under
    the lock, so a prune meanwhile cannot make it another).  ``progress`` as
    :func:`prune`'s."""
    def keep(points: list[PointRecord]) -> dict[str, list[str]]:
        named = {p.id for p in vault.points_named(refs)}
        lost = sorted(named - {p.id for p in points})
        if lost:  # (prune leaves such a point, and the bases it names, as they are)
            raise CbtValueError(f"point {lost[0]} is unavailable (it is based on a point "
                                "whose record is damaged or gone: cbt verify names it); "
                                "nothing was removed")
        return {p.id: [] if p.id in named else ["not named"] for p in points}

    result = prune(vault, PruneRequest(keep=keep, expired=lambda _vm, _created: False,
                                       dry_run=dry_run, wait=wait, removed_why="named"),
                   progress)
    result.points = [p for p in result.points if not p.keep]
    return result


def _plan(vault: Vault, request: PruneRequest, warnings: list[str]) -> _Plan:
    """Steps 1 and 2: keep, hide (a base kept points need) or delete each point."""
    records = vault.records()
    by_id = {r.id: r for r in records}
    reasons = request.keep(vault.points(warnings=warnings))
    # a point based on a damaged record is left as it is, and so are its bases
    lost = {pid for pid in vault.unavailable(records) if not by_id[pid].hidden}
    keep = [by_id[pid] for pid, why in reasons.items() if why] + [by_id[p] for p in lost]
    bases, known = _damaged_bases(vault)
    needed = _needed_bases(keep, by_id, bases)
    if not known:
        warnings.append("a damaged point record's manifests cannot be read, so the points it "
                        "is based on are not known: prune hides what it would delete")
    tombs = _tombstones(records, reasons, lost)
    plan = _Plan()
    for r in records:
        if r.id in lost:
            continue
        if r.hidden:
            if r.id not in needed and known and r.id not in tombs:
                plan.delete.append(r)
            continue
        why = reasons.get(r.id, [])
        if why:
            plan.verdicts.append(PointVerdict(r.id, r.vm, True, why))
            continue
        if r.id in needed or not known:
            plan.hide.append(r)
            why = [f"{request.removed_why}; hidden, as kept points are based on it"]
        elif r.id in tombs:
            plan.hide.append(r)
            why = [f"{request.removed_why}; hidden until VM {r.vm}'s next point (so that "
                   "backup uses no change hint made since this one)"]
        else:
            plan.delete.append(r)
            why = [request.removed_why]
        plan.verdicts.append(PointVerdict(r.id, r.vm, False, why))
    plan.expired = _expired_snapshots(kept_snapshots(vault, warnings), request.expired,
                                      {r.id for r in plan.delete} | {r.id for r in plan.hide})
    return plan


def _tombstones(records: list[PointRecord], reasons: dict[str, list[str]],
                lost: set[str]) -> set[str]:
    """Per VM, the newest point that goes (or went: hidden) when it is newer than every
    point that stays: kept hidden, a record the VM's next backup finds newer than the
    point it is made against (then it uses no change hint: one made since the last
    backup misses what changed in between).  ``records`` is oldest first."""
    top: dict[str, int] = {}  # VM -> place of its newest point that stays
    for k, r in enumerate(records):
        if not r.hidden and (reasons.get(r.id) or r.id in lost):
            top[r.vm] = k
    tomb: dict[str, str] = {}
    for k, r in enumerate(records):
        if (r.hidden or r.id not in lost) and not reasons.get(r.id) \
                and k > top.get(r.vm, -1):
            tomb[r.vm] = r.id
    return set(tomb.values())


def _apply(vault: Vault, plan: _Plan, progress: Callable[[int, int], None]) -> None:
    """Steps 2 to 4: hide, delete records (the commit, made durable), then manifests,
    then expired snapshots; each change only while the vault is surely still this
    run's alone (:func:`check_held`: an S3 lease not renewed in time, say after a
    freeze, may have been broken by a backup based on a point this would delete)."""
    total = len(plan.hide) + len(plan.delete)
    for n, r in enumerate(plan.hide):
        progress(n, total)
        check_held(vault.storage)
        vault.put_sealed("point", vault.point_name(r.id), replace(r, hidden=True).to_json())
    for n, r in enumerate(_dependents_first(plan.delete), start=len(plan.hide)):
        progress(n, total)
        check_held(vault.storage)
        vault.storage.delete(vault.point_name(r.id))
    progress(total, total)
    if plan.delete:
        vault.storage.sync("points")
    for r in plan.delete:
        for d in r.disks:
            vault.storage.delete(vault.manifest_name(r.id, d.label))
    for pid, paths in plan.expired:
        for path in paths:
            remove_snapshot(path)
        remove_kept(vault, pid)


def _dependents_first(records: list[PointRecord]) -> list[PointRecord]:
    """``records`` ordered so that each comes before every one of them its deltas are
    based on (a topological order of the base links; any left in a loop, which a
    vault never holds, come last in their order)."""
    by_id = {r.id: r for r in records}
    below = {r.id: {d.base for d in r.disks if d.base in by_id} - {r.id} for r in records}
    above = {r.id: 0 for r in records}  # how many of ``records`` are based on each
    for bases in below.values():
        for b in bases:
            above[b] += 1
    ready = [r.id for r in records if above[r.id] == 0]
    out: list[PointRecord] = []
    while ready:
        pid = ready.pop()
        out.append(by_id[pid])
        for b in sorted(below[pid]):
            above[b] -= 1
            if above[b] == 0:
                ready.append(b)
    done = {r.id for r in out}
    return out + [r for r in records if r.id not in done]


def _damaged_bases(vault: Vault) -> tuple[list[str], bool]:
    """The points the deltas of damaged records are based on (their manifests say it), and
    whether every such manifest could be read (else those bases are not known)."""
    bases: list[str] = []
    known = True
    for d in vault.damaged_records():
        for name in vault.storage.list(vault.manifest_dir_of(d.name)):
            try:
                base = vault.read_manifest_file(name).metadata.get("cbt.base")
            except (CbtError, OSError):
                known = False
                continue
            if base is not None:
                known &= is_point_id(base)
                bases.append(base)
    return bases, known


def _needed_bases(keep: list[PointRecord], by_id: dict[str, PointRecord],
                  more: list[str] | None = None) -> set[str]:
    """Every point whose manifests a kept point's manifests are based on (and ``more``'s)."""
    needed: set[str] = set()
    todo = [d.base for p in keep for d in p.disks if d.base] + list(more or [])
    while todo:
        pid = todo.pop()
        if pid is None or pid in needed or pid not in by_id:
            continue
        needed.add(pid)
        todo.extend(d.base for d in by_id[pid].disks if d.base)
    return needed


def _expired_snapshots(registry: dict[str, KeptSnapshots], expired: Callable[[str, str], bool],
                       removed: set[str]) -> list[tuple[str, list[str]]]:
    """Step 4: kept snapshots whose policy expired them or whose point goes.

    ``paths`` are host paths of snapshots (outside the vault); a disk's tracking
    base (``.base``) and hidden files are never removed.
    """
    out = []
    for pid, entry in registry.items():
        if pid in removed or expired(entry.vm, entry.created):
            paths = [p for p in entry.paths if is_snapshot_path(p, entry.vm)]
            out.append((pid, paths))
    return out
