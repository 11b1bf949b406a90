"""Verify: prove that every point can be restored, or name what cannot.

1. Every index segment and point record must pass its checksum.
2. For each point and disk: the manifest files (full and deltas) pass their
   checksums and match the record; every DATA block is in the index; its pack
   exists and is long enough to hold it.
3. With ``data``: every referenced blob is read, decompressed and re-hashed.
4. Index entries no point references (left by a killed run, or by pruning
   later) are *unreferenced*: reported in bytes, not a problem.

Each problem names point, disk, block and pack where they are known.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import blake3
import numpy as np

from cbt._core import fast
from cbt.errors import CbtError
from cbt.vault.index import Index
from cbt.vault.pack import BLOB, CorruptPackError, decode_blob, pack_name
from cbt.vault.points import PointRecord
from cbt.vault.vault import Vault


def _problem(point: str | None, disk: str | None, block: int | None, pack: str | None,
             what: str) -> dict[str, Any]:
    return {"point": point, "disk": disk, "block": block, "pack": pack, "problem": what}


def verify(vault: Vault, ref: str | None = None, data: bool = False) -> dict[str, Any]:
    started = time.perf_counter()
    problems: list[dict[str, Any]] = []
    warnings: list[str] = []
    try:
        index = vault.load_index(warnings)
    except CbtError as exc:
        problems.append(_problem(None, None, None, None, str(exc)))
        index = Index.empty()
    points: list[PointRecord] = []
    if ref is not None:
        points = [vault.point(ref)]
    else:
        for pid in vault.point_ids():
            try:
                points.append(vault.load_point(pid))
            except CbtError as exc:
                problems.append(_problem(pid, None, None, None, str(exc)))
    pack_sizes: dict[str, int] = {}
    referenced = np.zeros(len(index), dtype=bool)
    checked = 0
    for point in points:
        for disk in point.disks:
            try:
                raw = vault.storage.get(disk.manifest)
                if blake3.blake3(raw).hexdigest() != disk.manifest_checksum:
                    problems.append(_problem(point.id, disk.label, None, None,
                                             f"manifest {disk.manifest} differs from the one "
                                             "the point recorded"))
                    continue
                manifest = vault.resolve(point, disk.label)
            except CbtError as exc:
                problems.append(_problem(point.id, disk.label, None, None, str(exc)))
                continue
            if manifest.disk_size != disk.size:
                problems.append(_problem(point.id, disk.label, None, None,
                                         "manifest size differs from the point record"))
            rows = np.nonzero(manifest.flags == fast.FLAG_DATA)[0]
            pos = index.lookup(manifest.digests[rows])
            for r in rows[pos < 0][:100].tolist():
                problems.append(_problem(point.id, disk.label, int(r), None,
                                         "block missing from the vault index"))
            found = pos[pos >= 0]
            referenced[found] = True
            checked += len(rows)
            for r, p in zip(rows[pos >= 0].tolist(), found.tolist(), strict=True):
                pid = index.pack_ids[int(index.pack[p])]
                size = pack_sizes.get(pid)
                if size is None:
                    try:
                        size = vault.storage.size(pack_name(pid))
                    except OSError:
                        size = -1
                    pack_sizes[pid] = size
                end = int(index.offset[p]) + BLOB.size + int(index.stored[p])
                if size < 0:
                    problems.append(_problem(point.id, disk.label, int(r), pid, "pack missing"))
                elif size < end:
                    problems.append(_problem(point.id, disk.label, int(r), pid,
                                             "pack truncated before this block"))
                if len(problems) > 1000:
                    break
    if data:
        for p in np.nonzero(referenced)[0].tolist():
            pid = index.pack_ids[int(index.pack[p])]
            if pack_sizes.get(pid, 0) < 0:
                continue
            length = BLOB.size + int(index.stored[p])
            try:
                blob = vault.storage.read_range(pack_name(pid), int(index.offset[p]), length)
                decode_blob(blob, index.digests[p].tobytes(), f"pack {pid}")
            except (CorruptPackError, OSError) as exc:
                owners = _owners(vault, points, index.digests[p])
                if not owners:
                    problems.append(_problem(None, None, None, pid, str(exc)))
                for point_id, label, block in owners:
                    problems.append(_problem(point_id, label, block, pid, str(exc)))
    unreferenced = 0
    if ref is None:
        dead = ~referenced
        unreferenced = int((index.stored[dead].astype(np.int64) + BLOB.size).sum())
        for name in vault.leftovers():  # temporary files, manifests of uncommitted points
            with contextlib.suppress(OSError):
                unreferenced += vault.storage.size(name)
    return {
        "points": len(points),
        "blocks_checked": checked,
        "data": data,
        "problems": problems,
        "unreferenced_bytes": unreferenced,
        "seconds": round(time.perf_counter() - started, 6),
        "warnings": warnings,
    }


def _owners(vault: Vault, points: list[PointRecord],
            digest: np.ndarray) -> list[tuple[str, str, int]]:
    """Which (point, disk, block) reference a digest (for naming a damaged blob)."""
    out: list[tuple[str, str, int]] = []
    for point in points:
        for disk in point.disks:
            try:
                m = vault.resolve(point, disk.label)
            except CbtError:
                continue
            hits = np.nonzero((m.digests == digest).all(axis=1))[0]
            out.extend((point.id, disk.label, int(b)) for b in hits[:3].tolist())
    return out
