"""The trash of a vault: packs gc has declared dead, kept readable for a while.

1. gc moves a dead or rewritten pack to ``trash/<pack id>.pack`` (a durable
   rename) and touches it: its mtime is when it was trashed.
2. A restore that loaded the index before a gc still finds its packs here.
3. A backup that deduplicated against a block gc just declared dead moves
   the pack back at its commit (:func:`rescue`).
4. gc deletes what was trashed before a given time (:func:`empty_trash`).
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


def is_trash_name(name: str) -> bool:
    """Whether ``name`` is where :func:`trash_name` puts a pack (the only names gc removes)."""
    return _TRASHED.match(name) is not None


def move_to_trash(storage: Storage, pid: str) -> None:
    try:
        storage.rename(pack_name(pid), trash_name(pid))
    except CbtIOError as exc:
        if exc.errno != errno.ENOENT:
            raise
        return
    storage.touch(trash_name(pid))  # mtime = when it was trashed


def empty_trash(storage: Storage, before: float) -> int:
    """Delete the packs trashed before ``before`` (epoch seconds); returns how many."""
    n = 0
    for name in storage.list(TRASH):
        if not is_trash_name(name):
            continue  # not a pack gc trashed: never removed
        try:
            old = storage.stat(name).mtime < before
        except CbtIOError as exc:
            if exc.errno != errno.ENOENT:
                raise
            continue
        if old:
            storage.delete(name)
            n += 1
    return n


def rescue(storage: Storage, missing: set[bytes]) -> set[bytes]:
    """Move trashed packs holding any of ``missing`` back; returns what is still missing.

    Called by a backup's commit (under the gc lock) for blocks it deduplicated
    against that a concurrent gc declared dead.
    """
    still = set(missing)
    for name in storage.list(TRASH):
        if not still or not is_trash_name(name):
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
