"""Garbage collection: free the blocks no recovery point references.

Runs under its own lock, beside any number of backups (which share the vault:
:mod:`cbt.repo.lock`).  Mark, then sweep with a margin covering the running ones:

1. Cutoff = the earliest start of the live holders of the vault (from their locks),
   else now; on S3 less a clock margin, and moved into the storage's clock (an S3
   server's may be behind this host's, and its mtimes are whole seconds:
   ``Storage.clock_offset``).
2. Mark: resolve every visible point (through hidden bases where its deltas
   need them) and mark the index entries they reference.  A point whose record
   cannot be read (damaged), or whose manifests cannot be resolved (a damaged
   manifest, a base whose record is damaged), is treated conservatively: every
   block named by any manifest in its folder, and in the folders of the points
   its deltas are based on, is marked live (a superset of what it holds); when
   even that cannot be read (a damaged manifest, or a damaged record with no
   manifest left), gc frees nothing at all and says why.  So a damaged record
   or manifest costs space until ``verify --repair`` sets its point aside,
   never a block it might reference.
3. A pack a point uses that is in the trash only (named again by a writer
   that read the index before a gc trashed it) is moved back.  Per pack older
   than the cutoff (a newer one may hold blocks of the running backup's
   uncommitted point): no live entry -> dead; some dead, and live bytes
   under half the pack -> rewritten (live blobs copied as they are into new
   packs; a sealed blob's associated data does not name its pack, so an
   encrypted vault's blobs move without being opened).
4. Write one merged index segment of every live entry (rewritten ones at
   their new place; sealed in an encrypted vault), then remove the segments it
   replaces.
5. Move dead and rewritten packs to ``trash/`` instead of deleting them: a
   restore that loaded the index before gc reads them from there, and a
   backup that deduplicated against a block gc just declared dead moves its
   pack back when it commits (see ``rescue``).
6. Empty the trash of what was put there before the cutoff and longer ago
   than the grace period (so never what this run trashed: the next run's).
"""

from __future__ import annotations

import errno
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from cbt.core.errors import CbtError, CbtIOError
from cbt.format.index_segment import segment_bytes
from cbt.format.pack import (
    BLOB,
    PackWriter,
    blob_length,
    pack_name,
)
from cbt.format.records import CorruptPointError, is_point_id
from cbt.repo import index as index_mod
from cbt.repo.index import Index, IndexEntry
from cbt.repo.lock import check_held, gc_lock, objects_before
from cbt.repo.trash import DEFAULT_GRACE, empty_trash, move_to_trash, trash_name
from cbt.repo.vault import Vault

REWRITE_BELOW = 0.5  # rewrite a pack when less than this share of it is live


@dataclass
class GcResult:
    """What a gc did (or, dry, would do)."""

    dry_run: bool
    packs_removed: int = 0
    packs_rewritten: int = 0
    bytes_freed: int = 0
    trash_emptied: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The JSON of ``cbt gc --json``: every field, by its name."""
        return asdict(self)


@dataclass
class _Sweep:
    """The packs step 3 takes away, and the index entries that go with them."""

    keep: npt.NDArray[np.bool_]  # per index entry: still indexed where it is
    trash: list[str] = field(default_factory=list)  # pack ids
    rewrite: list[tuple[str, npt.NDArray[np.int64]]] = field(default_factory=list)


def gc(vault: Vault, dry_run: bool = False, grace: float = DEFAULT_GRACE,
       wait: float = 600.0) -> GcResult:
    """Mark and sweep (see the module doc).  Waits up to ``wait`` seconds for the gc lock,
    which a backup holds only while it commits, or another gc while it runs."""
    result = GcResult(dry_run)
    with gc_lock(vault.storage, wait, reveal_command=not vault.encrypted):
        # (an S3 server's clock, whole seconds; measured by a write: not in a dry run)
        offset = vault.storage.clock_offset(measure=not dry_run)
        cutoff = _cutoff(vault, offset)
        index = vault.load_index(result.warnings)
        live, sure = _referenced(vault, index, result.warnings)
        if not sure:
            result.warnings.append("gc frees nothing this time: the blocks of a damaged point "
                                   "cannot all be named (run cbt verify)")
            cutoff = 0.0  # sweep nothing, empty nothing from the trash
        sweep = _plan_sweep(vault, index, live, cutoff, result)
        if not dry_run:
            check_held(vault.storage)  # (an S3 lease renewed in time: else nothing moves)
        if not dry_run and sweep.trash:
            _write_index(vault, index, sweep)
            for pid in sweep.trash:
                move_to_trash(vault.storage, pid)
        if not dry_run:
            result.trash_emptied = empty_trash(vault.storage,
                                               min(cutoff, time.time() + offset - grace))
    return result


def _cutoff(vault: Vault, offset: float) -> float:
    """Step 1: packs written since then may hold blocks of a running backup (a holder
    that cannot say since when: sweep nothing); in the storage's mtimes (``offset``:
    :meth:`~cbt.repo.storage.Storage.clock_offset`, so a server whose clock is behind, or
    whose mtimes are whole seconds, never has a running backup's first packs look older
    than its start)."""
    before = objects_before(vault.storage)
    return 0.0 if before <= 0.0 else before + offset


def _referenced(vault: Vault, index: Index, warnings: list[str]
                ) -> tuple[npt.NDArray[np.bool_], bool]:
    """Step 2: per index entry, whether a point references it; and whether every point's
    blocks could be named (False: sweep nothing)."""
    live = np.zeros(len(index), dtype=bool)
    records, damaged = vault.scan_records()
    lost = vault.unavailable(records)
    sure = True
    # hidden points (pruned bases) only lend their manifests to the resolution of
    # visible ones; the blocks only they hold are dead
    for point in records:
        if point.hidden:
            continue
        for disk in point.disks:
            try:
                if point.id in lost:
                    raise CorruptPointError(lost[point.id])
                m = vault.resolve(point, disk.label)
            except (CbtError, OSError) as exc:
                warnings.append(f"point {point.id} disk {disk.label}: {exc}; gc keeps every "
                                "block its manifests name")
                sure &= _mark_folders(vault, index, vault.manifest_dir(point.id), live, False)
                continue
            pos = index.lookup(m.data_rows()[1])
            if (pos < 0).any():
                warnings.append(f"point {point.id} disk {disk.label}: "
                                f"{int((pos < 0).sum())} blocks not in the index (run verify)")
            live[pos[pos >= 0]] = True
    for d in damaged:
        warnings.append(f"{d.warning()}; gc keeps every block its manifests name")
        sure &= _mark_folders(vault, index, vault.manifest_dir_of(d.name), live, True)
    return live, sure


def _mark_folders(vault: Vault, index: Index, folder: str, live: npt.NDArray[np.bool_],
                  damaged: bool) -> bool:
    """Mark every DATA block that any manifest in ``folder`` names, and those of the
    folders of the points its deltas are based on (a superset of what the point holds,
    for a point whose record or manifests cannot be resolved).  False when some
    manifest on the way cannot be read, or (``damaged``: a damaged record's) the folder
    is empty: then the point's blocks are not all known.  A folder that is gone (a
    base ``verify --repair`` set aside) holds nothing to keep."""
    todo, seen, ok = [folder], set(), True
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        names = vault.storage.list(f)
        if damaged and f == folder:
            ok &= bool(names)
        for name in names:
            try:
                m = vault.read_manifest_file(name)
            except (CbtError, OSError):
                ok = False
                continue
            pos = index.lookup(m.data_rows()[1])
            live[pos[pos >= 0]] = True
            base = m.metadata.get("cbt.base")
            if base is not None:
                if not is_point_id(base):
                    ok = False
                    continue
                todo.append(vault.manifest_dir(base))
    return ok


def _plan_sweep(vault: Vault, index: Index, live: npt.NDArray[np.bool_], cutoff: float,
                result: GcResult) -> _Sweep:
    """Step 3: dead packs and mostly dead ones, counted into ``result``."""
    sweep = _Sweep(keep=np.ones(len(index), dtype=bool))
    for k, pid in enumerate(index.pack_ids):
        try:
            st = vault.storage.stat(pack_name(pid))
        except CbtIOError as exc:
            if exc.errno != errno.ENOENT:
                raise
            if live[index.pack == k].any():
                _bring_back(vault, pid, result)
            continue
        if st.mtime >= cutoff:
            continue
        entries = np.nonzero(index.pack == k)[0]
        live_entries = entries[live[entries]]
        live_bytes = int((index.stored[live_entries].astype(np.int64) + BLOB.size).sum())
        if len(live_entries) and (len(live_entries) == len(entries)
                                  or live_bytes >= REWRITE_BELOW * st.size):
            continue  # (all live: a rewrite would give the same pack, gc after gc)
        sweep.keep[entries] = False
        sweep.trash.append(pid)
        if len(live_entries):
            result.packs_rewritten += 1
            sweep.rewrite.append((pid, live_entries))
            result.bytes_freed += st.size - live_bytes
        else:
            result.packs_removed += 1
            result.bytes_freed += st.size
    return sweep


def _bring_back(vault: Vault, pid: str, result: GcResult) -> None:
    """A pack a point uses found in the trash only (the index named it again after a gc
    had trashed it: a writer that read the index before that gc): moved back to
    ``packs/``, never emptied from under its point.  (Missing altogether: verify says
    so.)"""
    if not vault.storage.exists(trash_name(pid)):
        return
    result.warnings.append(f"pack {pid} is in use but was in the trash: "
                           + ("it would be moved back" if result.dry_run else "moved back"))
    if not result.dry_run:
        vault.storage.rename(trash_name(pid), pack_name(pid))


def _write_index(vault: Vault, index: Index, sweep: _Sweep) -> None:
    """Step 4: rewrite the mostly dead packs, then one segment of every live entry."""
    moved = [e for pid, live in sweep.rewrite for e in _rewrite(vault, index, pid, live)]
    everything = index_mod.entries_for_packs(index, set(index.pack_ids))  # index order
    merged = {k: v[sweep.keep] for k, v in everything.items()}
    if moved:
        part = index_mod.segment_entries(moved)
        merged = {k: np.concatenate([merged[k], part[k]]) for k in merged}
    vault.put_sealed("index", vault.segment_name(f"gc-{uuid.uuid4().hex}"),
                     segment_bytes(merged))
    for s in index.segments:
        vault.storage.delete(s)


def _rewrite(vault: Vault, index: Index, pid: str,
             live_entries: npt.NDArray[np.int64]) -> list[IndexEntry]:
    """Copy the live blobs of a pack, byte for byte, into a new pack; their new entries."""
    data = memoryview(vault.storage.get(pack_name(pid)))
    writer = PackWriter()
    old = [index.entry(p) for p in live_entries.tolist()]
    offsets = [writer.add_blob(e.digest, data[e.offset:e.offset + blob_length(e.stored)],
                               e.stored, e.raw) for e in old]
    vault.storage.put(pack_name(writer.pack_id), writer.finish())
    return [e._replace(pack=writer.pack_id, offset=off) for e, off in zip(old, offsets,
                                                                           strict=True)]
