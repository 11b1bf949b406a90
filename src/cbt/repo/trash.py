"""The trash of a vault: packs gc has declared dead, kept readable for a while.

A restore that loaded the index before a gc still finds its packs here, and a
backup that deduplicated against a block gc just declared dead moves the
pack back at its commit (:func:`rescue`).  ``trash/<pack id>.pack``; its
mtime is when it was trashed.
"""

from __future__ import annotations

import contextlib
import os

from cbt.format.pack import CorruptPackError, pack_id_of, pack_name, read_trailer
from cbt.repo.vault import Vault

DEFAULT_GRACE = 3600.0  # seconds a trashed pack stays readable
TRASH = "trash"


def trash_name(pack_id: str) -> str:
    return f"{TRASH}/{pack_id}.pack"


def move_to_trash(vault: Vault, pid: str) -> None:
    src = os.path.join(vault.root, pack_name(pid))
    dst = os.path.join(vault.root, trash_name(pid))
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.rename(src, dst)
        os.utime(dst)  # mtime = when it was trashed


def empty_trash(vault: Vault, before: float) -> int:
    n = 0
    for name in vault.storage.list(TRASH):
        path = os.path.join(vault.root, name)
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_mtime < before:
                os.unlink(path)
                n += 1
    return n


def rescue(vault: Vault, missing: set[bytes]) -> set[bytes]:
    """Move trashed packs holding any of ``missing`` back; returns what is still missing.

    Called by a backup's commit (under the gc lock) for blocks it deduplicated
    against that a concurrent gc declared dead.
    """
    still = set(missing)
    for name in vault.storage.list(TRASH):
        if not still or not name.endswith(".pack"):
            continue
        try:
            entries = read_trailer(vault.storage.get(name), name)
        except (CorruptPackError, OSError):
            continue
        held = {bytes(e["digest"]) for e in entries} & still
        if held:
            pid = pack_id_of(name)
            dst = os.path.join(vault.root, pack_name(pid))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.rename(os.path.join(vault.root, name), dst)
            still -= held
    return still
