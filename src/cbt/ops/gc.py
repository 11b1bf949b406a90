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
   uncommitted point): no live entry -> dead; some dead -> rewritten when
   chosen (live blobs copied as they are into new packs; a sealed blob's
   associated data does not name its pack, so an encrypted vault's blobs move
   without being opened).  Chosen by default: those whose live bytes are under
   half the pack, so a mostly live pack stays whole with its dead blocks (the
   "dead but kept" bytes gc reports); with ``max_unused`` P: those with the
   most dead bytes first, until at most P% of the packs' bytes are dead.
4. Write one merged index segment of every live entry (rewritten ones at
   their new place; sealed in an encrypted vault), then remove the segments it
   replaces.
5. Move dead and rewritten packs to ``trash/`` instead of deleting them: a
   restore that loaded the index before gc reads them from there, and a
   backup that deduplicated against a block gc just declared dead moves its
   pack back when it commits (see ``rescue``).
6. Empty the trash of what was put there before the cutoff and longer ago
   than the grace period (so never what this run trashed: the next run's).

So a run frees from the storage only what an earlier run trashed (and the
index segments it replaces), while it writes the rewritten packs and a new
segment first: the vault can grow during a gc that takes dead blocks out of
use.  The result says each part, measured from the storage's object sizes
(:class:`GcResult`), never the dead bytes as "freed" before they are deleted.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from cbt.core.errors import CbtError, CbtIOError, CbtValueError
from cbt.core.sizes import human_bytes
from cbt.format import paged_index
from cbt.format.pack import (
    BLOB,
    ENTRY,
    FOOTER,
    HEADER,
    PackWriter,
    blob_length,
    pack_name,
)
from cbt.format.records import CorruptPointError, is_point_id
from cbt.ops.marks import Marks
from cbt.repo import index as index_mod
from cbt.repo import segments
from cbt.repo.compact import merge
from cbt.repo.index import Index, IndexEntry
from cbt.repo.lock import GC_LOCK, LOCKS, check_held, gc_lock, objects_before
from cbt.repo.storage import Storage
from cbt.repo.trash import (
    DEFAULT_GRACE,
    TRASH,
    empty_trash,
    move_to_trash,
    retire_segment,
    trash_name,
)
from cbt.repo.vault import Vault

REWRITE_BELOW = 0.5  # default: rewrite a pack when less than this share of it is live
# entries the passes over the whole index take at a time: the index's default (65,536)
# decodes into about 15 MB of transient arrays, a step in every gc's peak
CHUNK = 8192

Progress = Callable[[str, int, int], None]
"""``progress(phase, done, total)``: phase "mark" (points resolved of all points), "sweep"
(packs judged of the index's packs) or "rewrite" (bytes copied of those to copy)."""


@dataclass
class GcResult:
    """What a gc did (or, dry, would do).

    Bytes, each measured from the storage (sizes of the objects themselves):

    - ``bytes_deleted``: deleted this run (freed now): packs emptied from the trash,
      index segments replaced.
    - ``bytes_trashed``: whole packs this run moved to the trash (dead ones, and rewritten
      ones whose live blocks were copied first, ``bytes_written``); they still take space
      until a gc after ``trash_free_after`` (ISO 8601, UTC) deletes them.
    - ``bytes_freed``: the bytes this run took out of ``packs/`` (the trashed packs less
      the packs written of their live blobs): freed from the storage once in the trash
      no longer.
    - ``trash_bytes``: all that is in the trash after the run.
    - ``dead_kept_bytes`` (in ``dead_kept_packs`` packs): dead blocks inside packs that stay
      because most of each is live (``REWRITE_BELOW``) or, with ``max_unused``, because the
      vault's dead share is within it.  Packs newer than a running backup are not judged.
    - ``vault_bytes_before``/``vault_bytes_after``: every object of the vault (None after
      a dry run).
    """

    dry_run: bool
    packs_removed: int = 0
    packs_rewritten: int = 0
    bytes_freed: int = 0
    trash_emptied: int = 0
    bytes_deleted: int = 0
    bytes_trashed: int = 0
    bytes_written: int = 0
    trash_bytes: int = 0
    trash_free_after: str | None = None
    dead_kept_bytes: int = 0
    dead_kept_packs: int = 0
    max_unused: float | None = None
    vault_bytes_before: int = 0
    vault_bytes_after: int | None = None
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
    pack_bytes: int = 0  # the sizes of the packs the rewrite writes


@dataclass(frozen=True)
class _Pack:
    """One pack older than the cutoff, as step 3 judges it."""

    pid: str
    number: int  # in the index's pack_ids
    size: int
    live: int  # its index entries a point references
    live_bytes: int
    dead_bytes: int  # its unreferenced blobs (headers included)

    @property
    def rewritten_size(self) -> int:
        """The size of the pack of its live blobs only (what a rewrite writes)."""
        return HEADER.size + self.live_bytes + self.live * ENTRY.size + FOOTER.size


def gc(vault: Vault, dry_run: bool = False, grace: float = DEFAULT_GRACE,
       wait: float = 600.0, max_unused: float | None = None,
       progress: Progress | None = None) -> GcResult:
    """Mark and sweep (see the module doc).  Waits up to ``wait`` seconds for the gc lock,
    which a backup holds only while it commits, or another gc while it runs.
    ``max_unused``: a percentage (0 to 100), see :func:`_choose`."""
    if max_unused is not None and not 0.0 <= max_unused <= 100.0:
        raise CbtValueError(f"--max-unused must be a percentage from 0 to 100, not {max_unused}")
    result = GcResult(dry_run, max_unused=max_unused)
    tick = progress or (lambda _phase, _done, _total: None)
    with gc_lock(vault.storage, wait, reveal_command=not vault.encrypted):
        result.vault_bytes_before = storage_bytes(vault.storage)
        # (an S3 server's clock, whole seconds; measured by a write: not in a dry run)
        offset = vault.storage.clock_offset(measure=not dry_run)
        cutoff = _cutoff(vault, offset)
        index = vault.load_index(result.warnings)
        live, sure = _referenced(vault, index, result.warnings, tick)
        if not sure:
            result.warnings.append("gc frees nothing this time: the blocks of a damaged point "
                                   "cannot all be named (run cbt verify)")
            cutoff = 0.0  # sweep nothing, empty nothing from the trash
        sweep = _plan_sweep(vault, index, live, cutoff, result, tick)
        if not dry_run:
            check_held(vault.storage)  # (an S3 lease renewed in time: else nothing moves)
        if not dry_run and sweep.trash:
            _write_index(vault, index, sweep, result, tick)
            for pid in sweep.trash:
                move_to_trash(vault.storage, pid)
        deleted: list[int] = []
        result.trash_emptied = empty_trash(
            vault.storage, min(cutoff, time.time() + offset - grace), deleted, dry_run)
        result.bytes_deleted += sum(deleted)
        _trash_left(vault, grace, offset, result)
        if dry_run:
            _would(vault, index, sweep, grace, result)
    if not dry_run:
        result.vault_bytes_after = storage_bytes(vault.storage)
    return result


def storage_bytes(storage: Storage, prefix: str = "") -> int:
    """The sum of the sizes of the objects under ``prefix`` (:meth:`Storage.sizes`), locks
    left out (they hold who runs, not the vault's data)."""
    return sum(n for name, n in storage.sizes(prefix).items()
               if name != GC_LOCK and not name.startswith(f"{LOCKS}/"))


def _would(vault: Vault, index: Index, sweep: _Sweep, grace: float, result: GcResult) -> None:
    """A dry run's figures as the run would make them: the packs and the segment it would
    write (a segment's size depends on its number of entries only), the segments it would
    replace, and the trash it would leave (what it would empty gone, what it would trash
    there, the latest from now)."""
    result.trash_bytes += result.bytes_trashed - result.bytes_deleted  # (trash only, so far)
    if not result.trash_bytes:
        result.trash_free_after = None
    if not sweep.trash:
        return
    result.bytes_written += sweep.pack_bytes + _segment_size(vault, index, sweep)
    for s in index.segments:  # (retired to the trash, as the run would)
        with contextlib.suppress(CbtIOError):
            size = vault.storage.size(s)
            result.bytes_trashed += size
            result.trash_bytes += size
    when = dt.datetime.fromtimestamp(time.time() + grace, dt.UTC)
    result.trash_free_after = when.isoformat(timespec="seconds").replace("+00:00", "Z")


def _segment_size(vault: Vault, index: Index, sweep: _Sweep) -> int:
    """The size of the segment step 4 would write: as many entries as it keeps and moves
    (the moved ones where they are now: the same size)."""
    keep = sweep.keep.copy()
    for _pid, live in sweep.rewrite:
        keep[live] = True
    packs: set[int] = set()
    for base, got in index.chunks(CHUNK):
        packs.update(np.unique(got.pack[keep[base:base + len(got.offset)]]).tolist())
    return paged_index.segment_size(int(keep.sum()), len(packs), vault.cipher is not None)


def _trash_left(vault: Vault, grace: float, offset: float, result: GcResult) -> None:
    """What the trash holds after the run, and from when a gc may empty all of it (the
    latest trash time plus the grace period, in this host's clock)."""
    latest = None
    for name in vault.storage.list(TRASH):
        try:
            st = vault.storage.stat(name)
        except CbtIOError:
            continue
        result.trash_bytes += st.size
        latest = st.mtime if latest is None else max(latest, st.mtime)
    if latest is not None:
        when = dt.datetime.fromtimestamp(latest - offset + grace, dt.UTC)
        result.trash_free_after = when.isoformat(timespec="seconds").replace("+00:00", "Z")


def _cutoff(vault: Vault, offset: float) -> float:
    """Step 1: packs written since then may hold blocks of a running backup (a holder
    that cannot say since when: sweep nothing); in the storage's mtimes (``offset``:
    :meth:`~cbt.repo.storage.Storage.clock_offset`, so a server whose clock is behind, or
    whose mtimes are whole seconds, never has a running backup's first packs look older
    than its start)."""
    before = objects_before(vault.storage)
    return 0.0 if before <= 0.0 else before + offset


def _referenced(vault: Vault, index: Index, warnings: list[str], tick: Progress
                ) -> tuple[Marks, bool]:
    """Step 2: per index entry (a bit each), whether a point references it; and whether
    every point's blocks could be named (False: sweep nothing)."""
    live = Marks(len(index))
    records, damaged = vault.scan_records()
    lost = vault.unavailable(records)
    sure = True
    # hidden points (pruned bases) only lend their manifests to the resolution of
    # visible ones; the blocks only they hold are dead
    for n, point in enumerate(records):
        tick("mark", n, len(records))
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
            live.set(pos[pos >= 0])
    for d in damaged:
        warnings.append(f"{d.warning()}; gc keeps every block its manifests name")
        sure &= _mark_folders(vault, index, vault.manifest_dir_of(d.name), live, True)
    tick("mark", len(records), len(records))
    return live, sure


def _mark_folders(vault: Vault, index: Index, folder: str, live: Marks,
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
            live.set(pos[pos >= 0])
            base = m.metadata.get("cbt.base")
            if base is not None:
                if not is_point_id(base):
                    ok = False
                    continue
                todo.append(vault.manifest_dir(base))
    return ok


def _plan_sweep(vault: Vault, index: Index, live: Marks, cutoff: float,
                result: GcResult, tick: Progress | None = None) -> _Sweep:
    """Step 3: dead packs and those :func:`_choose` picks to rewrite, counted into
    ``result``.  Two passes over the index a chunk at a time (never all its columns at
    once): one tallies each pack's live and dead blobs, one takes the chosen packs'
    entries out of ``keep`` and finds the live ones a rewrite copies."""
    sweep = _Sweep(keep=np.ones(len(index), dtype=bool))
    n_live, live_bytes, dead_bytes = _tally(index, live)
    packs: list[_Pack] = []
    newer = [0, 0]  # packs not judged (written since the cutoff), their bytes
    for k, pid in enumerate(index.pack_ids):
        if tick is not None:
            tick("sweep", k, len(index.pack_ids))
        try:
            st = vault.storage.stat(pack_name(pid))
        except CbtIOError as exc:
            if exc.errno != errno.ENOENT:
                raise
            if n_live[k]:
                _bring_back(vault, pid, result)
            continue
        if st.mtime >= cutoff:
            newer[0], newer[1] = newer[0] + 1, newer[1] + st.size
            continue
        packs.append(_Pack(pid, k, st.size, int(n_live[k]), int(live_bytes[k]),
                           int(dead_bytes[k])))
    if tick is not None:
        tick("sweep", len(index.pack_ids), len(index.pack_ids))
    chosen = _choose(packs, result.max_unused)
    for p in chosen:
        sweep.trash.append(p.pid)
        result.bytes_trashed += p.size
        if p.live:
            result.packs_rewritten += 1
            sweep.pack_bytes += p.rewritten_size
            result.bytes_freed += p.size - p.rewritten_size
        else:
            result.packs_removed += 1
            result.bytes_freed += p.size
    moving = _take_out(index, live, chosen, sweep.keep)
    sweep.rewrite = [(p.pid, moving[p.number]) for p in chosen if p.live]
    gone = set(sweep.trash)
    kept = [p for p in packs if p.pid not in gone and p.dead_bytes]
    result.dead_kept_packs = len(kept)
    result.dead_kept_bytes = sum(p.dead_bytes for p in kept)
    if newer[0] and result.max_unused is not None:
        result.warnings.append(
            f"{newer[0]} packs ({human_bytes(newer[1])}) written since a running backup "
            f"started (or too recently) were not judged: --max-unused "
            f"{result.max_unused:g}% counts the others only (a later gc judges them)")
    return sweep


def _tally(index: Index, live: Marks
           ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Per pack number: its live entries, and the bytes of its live and of its dead blobs
    (headers included), a chunk of the index at a time."""
    size = len(index.pack_ids)
    n_live = np.zeros(size, dtype=np.int64)
    blob_bytes = [np.zeros(size, dtype=np.int64), np.zeros(size, dtype=np.int64)]
    for base, got in index.chunks(CHUNK):
        lv = live.get(base, base + len(got.pack))
        # an entry listed twice (a merge killed before it retired its inputs) is one blob:
        # its later copy is neither live nor dead (the write of the index drops it)
        dead = ~lv & ~index.copies(base, got, ~lv)
        blob = got.stored.astype(np.int64) + BLOB.size
        n_live += np.bincount(got.pack[lv], minlength=size)
        for which, mask in ((0, lv), (1, dead)):
            # (float sums are exact here: a chunk's bytes are far below 2**53)
            blob_bytes[which] += np.rint(np.bincount(got.pack[mask], weights=blob[mask],
                                                     minlength=size)).astype(np.int64)
    return n_live, blob_bytes[0], blob_bytes[1]


def _take_out(index: Index, live: Marks, chosen: list[_Pack],
              keep: npt.NDArray[np.bool_]) -> dict[int, npt.NDArray[np.int64]]:
    """Clear ``keep`` at the entries of the ``chosen`` packs; the positions of the live
    ones, ascending, per pack number (the blobs a rewrite copies)."""
    if not chosen:
        return {}
    gone = np.zeros(len(index.pack_ids), dtype=bool)
    gone[[p.number for p in chosen]] = True
    found: dict[int, list[npt.NDArray[np.int64]]] = {p.number: [np.zeros(0, np.int64)]
                                                     for p in chosen if p.live}
    for base, got in index.chunks(CHUNK):
        taken = gone[got.pack]
        if not taken.any():
            continue
        end = base + len(got.pack)
        keep[base:end] &= ~taken
        at = np.nonzero(taken & live.get(base, end))[0]
        for k in np.unique(got.pack[at]).tolist():  # (per pack in the chunk, not per entry)
            found[k].append(base + at[got.pack[at] == k])
    return {k: np.concatenate(v) for k, v in found.items()}


def _choose(packs: list[_Pack], max_unused: float | None) -> list[_Pack]:
    """The packs to take away: every one with no live blob; then, of those partly dead,

    - without ``max_unused``: each whose live blobs are under ``REWRITE_BELOW`` of it
      (a pack mostly live stays whole: its dead blocks are kept);
    - with ``max_unused`` = P (restic's meaning): the packs with the most dead bytes
      first, until the dead bytes left are at most P% of the packs' bytes after the
      run (live L, dead D left: D <= P/100 * (L + D)); 0 rewrites every pack with a dead
      block, 100 none.
    """
    out = [p for p in packs if not p.live]
    partly = [p for p in packs if p.live and p.dead_bytes]
    if max_unused is None:
        return out + [p for p in partly if p.live_bytes < REWRITE_BELOW * p.size]
    partly.sort(key=lambda p: p.dead_bytes, reverse=True)
    dead = sum(p.dead_bytes for p in partly)
    stored = sum(p.size for p in packs if p.live)
    for p in partly:
        if dead <= max_unused / 100.0 * stored:
            break
        out.append(p)
        dead -= p.dead_bytes
        stored -= p.size - p.rewritten_size
    return out


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


def _write_index(vault: Vault, index: Index, sweep: _Sweep, result: GcResult,
                 tick: Progress) -> None:
    """Step 4: rewrite the mostly dead packs, then one segment of every live entry."""
    moved: list[IndexEntry] = []
    total = sum(len(live) for _pid, live in sweep.rewrite)
    for pid, live in sweep.rewrite:
        tick("rewrite", len(moved), total)
        entries, written = _rewrite(vault, index, pid, live)
        moved += entries
        result.bytes_written += written
    tick("rewrite", total, total)
    # every part's kept entries and the moved ones, merged as streams into one segment
    inputs = index.sorted_streams(sweep.keep, CHUNK)  # (a round: CHUNK a part)
    if moved:
        inputs.append(iter([segments.first_copies(index_mod.segment_entries(moved))]))
    name = vault.segment_name(f"gc-{uuid.uuid4().hex}")
    segments.write_paged(vault, name, merge(inputs), int(sweep.keep.sum()) + len(moved))
    with contextlib.suppress(CbtIOError):
        result.bytes_written += vault.storage.size(name)
    for s in index.segments:
        with contextlib.suppress(CbtIOError):
            result.bytes_trashed += vault.storage.size(s)
        retire_segment(vault.storage, s)  # (a reader searching it finds it in the trash)


def _rewrite(vault: Vault, index: Index, pid: str,
             live_entries: npt.NDArray[np.int64]) -> tuple[list[IndexEntry], int]:
    """Copy the live blobs of a pack, byte for byte, into a new pack; their new entries,
    and the new pack's size."""
    data = memoryview(vault.storage.get(pack_name(pid)))
    writer = PackWriter()
    at = index.locate(live_entries)
    old = [IndexEntry(d.tobytes(), pid, off, stored, raw) for d, off, stored, raw
           in zip(at.digests, at.offset.tolist(), at.stored.tolist(), at.raw.tolist(),
                  strict=True)]
    offsets = [writer.add_blob(e.digest, data[e.offset:e.offset + blob_length(e.stored)],
                               e.stored, e.raw) for e in old]
    content = writer.finish()
    vault.storage.put(pack_name(writer.pack_id), content)
    return [e._replace(pack=writer.pack_id, offset=off)
            for e, off in zip(old, offsets, strict=True)], sum(len(b) for b in content)
