"""The trash of a vault: packs gc has declared dead, kept readable for a while.

Index segments a merge, gc or repair replaced go there too
(``trash/index/<name>``, :func:`retire_segment`): segments are searched where they
lie, so a reader that opened one before still reads its pages from the trash.

1. gc moves a dead or rewritten pack to ``trash/<pack id>.pack``; its mtime
   there is when it was trashed (set before a move that keeps it, by the
   move itself where the storage's rename is a copy).
2. A restore or copy that loaded the index before a gc still finds its packs
   here (:func:`read_pack_range`; restore's ``_map_pack``).
3. A backup (or copy) that deduplicated against a block gc just declared dead
   moves the pack back at its commit (:func:`rescue`).
4. gc deletes what was trashed before a given time (:func:`empty_trash`).

A commit without rename (S3, where :meth:`Storage.rename` is a copy then a
delete: not atomic, and a crash between them leaves both names):

- Packs, manifests and index segments are immutable objects under unique
  names, written whole by ``put`` (atomic on S3: a reader sees all or
  nothing).  The point record is written last; its existence is the commit.
  Readers follow committed records only; what a killed run left is reused
  (a pack no segment covers is indexed from its own trailer: the next
  backup or copy adopts it in its segment and deduplicates against it) or
  collected (manifests no record owns: ``Vault.leftovers``; packs no point
  uses: gc).
- The only moves are between ``packs/`` and ``trash/`` here, and verify
  --repair's moves into ``quarantine/``.  Each copies before it deletes, so
  at every moment the pack is under at least one of its names, and a pack
  under both is harmless: readers try ``packs/`` then ``trash/`` and find
  the same bytes; the index adopts the ``packs/`` copy as an orphan (its
  blocks are valid; if dead, the next gc trashes it again, overwriting the
  trash copy); :func:`empty_trash` deleting the ``trash/`` copy leaves the
  ``packs/`` one; :func:`rescue` copies over an equal ``packs/`` copy.  A
  quarantined pack or record left in place by a crash is set aside again by
  the next repair (a record under a new number).
- The trash time is an mtime: where a rename keeps it (a directory) the pack
  is touched before the move, so a crash between them leaves it in ``packs/``
  (newer than gc's cutoff: kept this time) and never in the trash with its
  old time (deleted at the next gc, inside the grace period).  On S3 the
  copy sets it, in the server's clock, in whole seconds: gc compares it with
  its own times through ``Storage.clock_offset`` (measured each run), so a
  server behind this host never has a pack look trashed, or written, earlier
  than it was.
"""

from __future__ import annotations

import errno
import re

from cbt.core.errors import CbtIOError
from cbt.format.pack import CorruptPackError, pack_id_of, pack_name, read_trailer
from cbt.repo.storage import Storage

DEFAULT_GRACE = 3600.0  # seconds a trashed pack stays readable
TRASH = "trash"


def trash_name(pack_id: str) -> str:
    return f"{TRASH}/{pack_id}.pack"


_TRASHED = re.compile(r"^trash/[0-9a-f]{32}\.pack$")
_TRASHED_SEGMENT = re.compile(r"^trash/index/[A-Za-z0-9_-][A-Za-z0-9._-]*$")


def is_trash_name(name: str) -> bool:
    """Whether ``name`` is where :func:`trash_name` puts a pack or
    :func:`retire_segment` an index segment (the only names gc removes)."""
    return _TRASHED.match(name) is not None or _TRASHED_SEGMENT.match(name) is not None


def segment_trash_name(name: str) -> str:
    """Where :func:`retire_segment` puts the index segment ``name`` (``index/X``)."""
    return f"{TRASH}/{name}"


def retire_segment(storage: Storage, name: str) -> None:
    """Move an index segment a merge, gc or repair replaced to the trash, its mtime then
    being now: a reader that opened it before (it is searched where it lies, page by
    page) still finds it there for the grace period (:func:`read_segment_range`)."""
    try:
        if storage.rename_keeps_mtime:
            storage.touch(name)
        storage.rename(name, segment_trash_name(name))
    except CbtIOError as exc:
        if exc.errno != errno.ENOENT:
            raise


def read_segment_range(storage: Storage, name: str, offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset`` of an index segment: where it was listed, else in
    the trash where a merge meanwhile retired it."""
    return _read_first(storage, (name, segment_trash_name(name)), offset, length,
                       f"missing from vault: {storage.where(name)} (nor in its trash: replaced "
                       "longer ago than gc's grace period; run the command again)")


def _read_first(storage: Storage, places: tuple[str, ...], offset: int, length: int,
                missing: str) -> bytes:
    """The range of the first of ``places`` that exists; ENOENT saying ``missing``."""
    for where in places:
        try:
            return storage.read_range(where, offset, length)
        except CbtIOError as exc:
            if exc.errno != errno.ENOENT:
                raise
    raise CbtIOError(errno.ENOENT, missing)


def move_to_trash(storage: Storage, pid: str) -> None:
    """Move a pack to the trash, its mtime then being now (see the module doc)."""
    try:
        if storage.rename_keeps_mtime:
            storage.touch(pack_name(pid))  # (first: a crash then leaves it in packs/)
        storage.rename(pack_name(pid), trash_name(pid))
    except CbtIOError as exc:
        if exc.errno != errno.ENOENT:
            raise


def pack_places(pack_id: str) -> tuple[str, str, str]:
    """Where a reader looks for a pack, in order: ``packs/``, else the trash where a gc
    running meanwhile moved it (a reader that loaded the index before that gc), else
    ``packs/`` again: a :func:`rescue` meanwhile copied it back there before it deleted
    the trash's (each move copies before it deletes, so one of the three finds it)."""
    return pack_name(pack_id), trash_name(pack_id), pack_name(pack_id)


def read_pack_range(storage: Storage, pack_id: str, offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset`` of a pack, wherever it is (:func:`pack_places`)."""
    return _read_first(storage, pack_places(pack_id), offset, length,
                       f"missing from vault: {storage.where(pack_name(pack_id))} (nor in its "
                       "trash)")


def empty_trash(storage: Storage, before: float, deleted: list[int] | None = None,
                dry_run: bool = False) -> int:
    """Delete the packs (and retired index segments) trashed before ``before`` (epoch
    seconds); returns how many (and appends the size of each to ``deleted``).
    ``dry_run``: count them, delete nothing."""
    n = 0
    for name in storage.list(TRASH):
        if not is_trash_name(name):
            continue  # not a pack gc trashed: never removed
        try:
            st = storage.stat(name)
        except CbtIOError as exc:
            if exc.errno != errno.ENOENT:
                raise
            continue
        if st.mtime < before:
            if not dry_run:
                storage.delete(name)
            n += 1
            if deleted is not None:
                deleted.append(st.size)
    return n


def rescue(storage: Storage, missing: set[bytes]) -> set[bytes]:
    """Move trashed packs holding any of ``missing`` back; returns what is still missing.

    Called by a backup's commit (under the gc lock) for blocks it deduplicated
    against that a concurrent gc declared dead.
    """
    still = set(missing)
    for name in storage.list(TRASH):
        if not still or _TRASHED.match(name) is None:
            continue
        try:
            entries = read_trailer(storage.get(name), name)
        except (CorruptPackError, OSError):
            continue
        held = {bytes(e["digest"]) for e in entries} & still
        if held:
            storage.rename(name, pack_name(pack_id_of(name)))
            still -= held
    return still
