"""Garbage collection: free the blocks no recovery point references.

Runs under its own lock, beside at most one backup (which holds the writer
lock).  Mark, then sweep with a margin covering the running backup:

1. Cutoff = the start of the running backup (from its lock), else now.
2. Mark: resolve every visible point (through hidden bases where its deltas
   need them) and mark the index entries they reference.
3. Per pack older than the cutoff (a newer one may hold blocks of the running
   backup's uncommitted point): no live entry -> dead; live bytes under half
   the pack -> rewritten (live blobs copied as they are into new packs).
4. Write one merged index segment of every live entry (rewritten ones at
   their new place), then remove the segments it replaces.
5. Move dead and rewritten packs to ``trash/`` instead of deleting them: a
   restore that loaded the index before gc reads them from there, and a
   backup that deduplicated against a block gc just declared dead moves its
   pack back when it commits (see ``rescue``).
6. Empty the trash of what was put there before the cutoff and longer ago
   than the grace period.
"""

from __future__ import annotations

import errno
import time
import uuid
from typing import Any

import numpy as np

from cbt.core.errors import CbtIOError
from cbt.format.pack import (
    BLOB,
    PackWriter,
    pack_name,
)
from cbt.repo import index as index_mod
from cbt.repo.index import Index
from cbt.repo.lock import gc_lock, writer_since
from cbt.repo.trash import DEFAULT_GRACE, empty_trash, move_to_trash
from cbt.repo.vault import Vault

REWRITE_BELOW = 0.5  # rewrite a pack when less than this share of it is live


def _cutoff(vault: Vault) -> float:
    since = writer_since(vault.storage)
    return time.time() if since is None else since  # 0.0, unknown age: sweep nothing


def _referenced(vault: Vault, index: Index, warnings: list[str]) -> np.ndarray:
    live = np.zeros(len(index), dtype=bool)
    # hidden points (pruned bases) only lend their manifests to the resolution of
    # visible ones; the blocks only they hold are dead
    for point in vault.points():
        for disk in point.disks:
            m = vault.resolve(point, disk.label)
            pos = index.lookup(m.digests[m.flags == 0])
            if (pos < 0).any():
                warnings.append(f"point {point.id} disk {disk.label}: "
                                f"{int((pos < 0).sum())} blocks not in the index (run verify)")
            live[pos[pos >= 0]] = True
    return live


def gc(vault: Vault, dry_run: bool = False, grace: float = DEFAULT_GRACE,
       wait: float = 600.0) -> dict[str, Any]:
    """Mark and sweep (see the module doc).  Waits up to ``wait`` seconds for the gc lock,
    which a backup holds only while it commits, or another gc while it runs."""
    warnings: list[str] = []
    removed = rewritten = 0
    freed = 0
    with gc_lock(vault.storage, wait):
        cutoff = _cutoff(vault)
        index = vault.load_index(warnings)
        live = _referenced(vault, index, warnings)
        new_parts: list[dict[str, Any]] = []
        keep_mask = np.ones(len(index), dtype=bool)
        to_trash: list[str] = []
        for k, pid in enumerate(index.pack_ids):
            name = pack_name(pid)
            try:
                st = vault.storage.stat(name)
            except CbtIOError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                continue
            if st.mtime >= cutoff:
                continue
            entries = np.nonzero(index.pack == k)[0]
            live_entries = entries[live[entries]]
            live_bytes = int((index.stored[live_entries].astype(np.int64) + BLOB.size).sum())
            if len(live_entries) and live_bytes >= REWRITE_BELOW * st.size:
                continue
            keep_mask[entries] = False
            to_trash.append(pid)
            if len(live_entries):
                rewritten += 1
                if not dry_run:
                    new_parts.append(_rewrite(vault, index, pid, live_entries))
                freed += st.size - live_bytes
            else:
                removed += 1
                freed += st.size
        if not dry_run and to_trash:
            everything = index_mod.entries_for_packs(index, set(index.pack_ids))  # index order
            merged = {k: v[keep_mask] for k, v in everything.items()}
            for part in new_parts:
                merged = {k: np.concatenate([merged[k], part[k]]) for k in merged}
            vault.storage.put(f"index/gc-{uuid.uuid4().hex}.arrow",
                              index_mod.segment_bytes(merged))
            for s in index.segments:
                vault.storage.delete(s)
            for pid in to_trash:
                move_to_trash(vault.storage, pid)
        emptied = 0 if dry_run else empty_trash(vault.storage, min(cutoff, time.time() - grace))
    return {"dry_run": dry_run, "packs_removed": removed, "packs_rewritten": rewritten,
            "bytes_freed": freed, "trash_emptied": emptied, "warnings": warnings}


def _rewrite(vault: Vault, index: Index, pid: str, live_entries: np.ndarray) -> dict[str, Any]:
    """Copy the live blobs of a pack, byte for byte, into a new pack."""
    data = memoryview(vault.storage.get(pack_name(pid)))
    writer = PackWriter()
    offsets = []
    for p in live_entries.tolist():
        off, stored = int(index.offset[p]), int(index.stored[p])
        offsets.append(writer.add_blob(index.digests[p].tobytes(),
                                       data[off:off + BLOB.size + stored], stored,
                                       int(index.raw[p])))
    new_id = writer.pack_id
    vault.storage.put(pack_name(new_id), writer.finish())
    n = len(live_entries)
    return {
        "digests": index.digests[live_entries],
        "pack_uuid": np.tile(np.frombuffer(uuid.UUID(hex=new_id).bytes, np.uint8), (n, 1)),
        "offset": np.array(offsets, dtype=np.uint64),
        "stored": index.stored[live_entries],
        "raw": index.raw[live_entries],
    }
