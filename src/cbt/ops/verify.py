"""Verify: prove that every point can be restored, or name what cannot.

1. Every index segment and point record must pass its checksum.
2. For each point and disk: the manifest files (full and deltas) pass their
   checksums and match the record; every DATA block is in the index.
3. For each pack the index points into: the pack exists, is long enough for
   every entry, and its own trailer agrees with the index (same digest at the
   same offset and length), so an index that disagrees with the packs is
   found without reading any data.
4. With ``data``: every referenced blob is read (pack by pack, sequentially),
   decompressed and re-hashed.
5. Index entries no point references (left by a killed run) and files a killed
   run left are *unreferenced*: reported in bytes, not a problem.

Each problem names point, disk, block and pack where they are known.
``repair`` rebuilds the index from the packs themselves (trailers, or blob
headers when a trailer is lost), indexing only blobs whose content matches
their digest, then verifies again to say which points remain damaged.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from typing import Any

import blake3
import numpy as np
import numpy.typing as npt

from cbt.core.errors import CbtError
from cbt.format.pack import (
    BLOB,
    CorruptPackError,
    decode_blob,
    pack_id_of,
    pack_name,
    read_trailer,
    scan_blobs,
)
from cbt.format.records import PointRecord
from cbt.repo import index as index_mod
from cbt.repo.index import Index
from cbt.repo.lock import writer_lock
from cbt.repo.vault import Vault

MAX_PROBLEMS = 1000


def _problem(point: str | None, disk: str | None, block: int | None, pack: str | None,
             what: str) -> dict[str, Any]:
    return {"point": point, "disk": disk, "block": block, "pack": pack, "problem": what}


def _check_packs(vault: Vault, index: Index, referenced: npt.NDArray[np.bool_],
                 data: bool) -> dict[int, str]:
    """Index position -> what is wrong with its blob, for every referenced entry."""
    bad: dict[int, str] = {}
    positions = np.nonzero(referenced)[0]
    if len(positions) == 0:
        return bad
    packs = index.pack[positions]
    order = np.argsort(packs, kind="stable")
    positions, packs = positions[order], packs[order]
    bounds = np.nonzero(np.diff(packs.astype(np.int64)))[0] + 1
    for s, e in zip(np.r_[0, bounds], np.r_[bounds, len(positions)], strict=True):
        pos = positions[s:e]
        pid = index.pack_ids[int(packs[s])]
        name = pack_name(pid)
        try:
            blob = vault.storage.get(name)
        except OSError:
            bad.update((int(p), "pack missing") for p in pos)
            continue
        ends = index.offset[pos] + BLOB.size + index.stored[pos]
        short = pos[ends > len(blob)]
        bad.update((int(p), "pack truncated before this block") for p in short)
        try:
            listed = {(bytes(t["digest"]), int(t["offset"]), int(t["stored"]))
                      for t in read_trailer(blob, f"pack {pid}")}
        except CorruptPackError:
            # trailer lost (a cut pack): the blob headers still say what is where
            listed = {(d, off, stored) for d, off, stored, _raw in scan_blobs(blob)}
        for p in pos.tolist():
            key = (index.digests[p].tobytes(), int(index.offset[p]), int(index.stored[p]))
            if key not in listed and p not in bad:
                bad[p] = "index disagrees with the pack (no such blob at this offset)"
        if data:
            for p in pos.tolist():
                if p in bad:
                    continue
                off = int(index.offset[p])
                try:
                    decode_blob(memoryview(blob)[off:off + BLOB.size + int(index.stored[p])],
                                index.digests[p].tobytes(), f"pack {pid}")
                except CorruptPackError as exc:
                    bad[p] = str(exc).removeprefix(f"pack {pid}: ")
    return bad


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
    referenced = np.zeros(len(index), dtype=bool)
    resolved: list[tuple[PointRecord, str, npt.NDArray[np.int64], npt.NDArray[np.int64]]] = []
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
            if point.hidden:
                continue  # a pruned base: its manifests must resolve, its blocks may be gone
            rows = np.nonzero(manifest.flags == 0)[0]
            pos = index.lookup(manifest.digests[rows])
            for r in rows[pos < 0][:MAX_PROBLEMS].tolist():
                problems.append(_problem(point.id, disk.label, int(r), None,
                                         "block missing from the vault index"))
            referenced[pos[pos >= 0]] = True
            resolved.append((point, disk.label, rows[pos >= 0], pos[pos >= 0]))
            checked += len(rows)
    bad = _check_packs(vault, index, referenced, data)
    if bad:
        bad_mask = np.zeros(len(index), dtype=bool)
        bad_mask[list(bad)] = True
        for point, label, rows, pos in resolved:
            hit = bad_mask[pos]
            for r, p in zip(rows[hit][:MAX_PROBLEMS].tolist(), pos[hit][:MAX_PROBLEMS].tolist(),
                            strict=True):
                problems.append(_problem(point.id, label, int(r),
                                         index.pack_ids[int(index.pack[p])], bad[p]))
    unreferenced = 0
    if ref is None:
        dead = ~referenced
        unreferenced = int((index.stored[dead].astype(np.int64) + BLOB.size).sum())
        for name in vault.leftovers():  # temporary files, manifests of uncommitted points
            with contextlib.suppress(OSError):
                unreferenced += vault.storage.size(name)
    return {
        "points": sum(not p.hidden for p in points),
        "blocks_checked": checked,
        "data": data,
        "problems": problems[:MAX_PROBLEMS],
        "unreferenced_bytes": unreferenced,
        "seconds": round(time.perf_counter() - started, 6),
        "warnings": warnings,
    }


def repair(vault: Vault, wait: float = 0.0) -> dict[str, Any]:
    """Rebuild the index from the packs, then verify; healthy data is not touched.

    The new segment is written before the old ones are removed, so a crash in
    between leaves the vault readable (run repair again).
    """
    packs_read = blobs = damaged = 0
    quarantined: list[str] = []
    parts: dict[str, list[Any]] = {k: [] for k in ("digests", "pack_uuid", "offset", "stored",
                                                   "raw")}
    with writer_lock(vault.storage, wait):
        for name in vault.storage.list("packs"):
            if not name.endswith(".pack"):
                continue
            pid = pack_id_of(name)
            try:
                content = vault.storage.get(name)
            except OSError:
                continue
            packs_read += 1
            try:
                entries = [(bytes(t["digest"]), int(t["offset"]), int(t["stored"]),
                            int(t["raw"])) for t in read_trailer(content, name)]
            except CorruptPackError:
                entries = scan_blobs(content)
            healthy = 0
            for digest, off, stored, raw in entries:
                try:
                    decode_blob(memoryview(content)[off:off + BLOB.size + stored], digest, name)
                except CorruptPackError:
                    damaged += 1
                    continue
                blobs += 1
                healthy += 1
                parts["digests"].append(np.frombuffer(digest, np.uint8).reshape(1, 32))
                parts["pack_uuid"].append(np.frombuffer(uuid.UUID(hex=pid).bytes,
                                                        np.uint8).reshape(1, 16))
                parts["offset"].append(np.array([off], np.uint64))
                parts["stored"].append(np.array([stored], np.uint32))
                parts["raw"].append(np.array([raw], np.uint32))
            if not healthy:
                # no segment will cover it, so the index would adopt it again from its
                # trailer: set it aside (kept, not deleted) instead
                quarantined.append(name)
        old = [s for s in vault.storage.list("index") if s.endswith(".arrow")]
        name = f"index/repaired-{uuid.uuid4().hex}.arrow"
        if blobs:
            entries_all = {k: np.concatenate(v) for k, v in parts.items()}
            vault.storage.put(name, index_mod.segment_bytes(entries_all))
        for s in old:
            if s != name:
                vault.storage.delete(s)
        for q in quarantined:
            vault.storage.rename(q, f"quarantine/{q.rsplit('/', 1)[-1]}")
    result = verify(vault)
    result["repair"] = {"packs_read": packs_read, "blobs_indexed": blobs,
                        "blobs_damaged": damaged, "packs_quarantined": len(quarantined),
                        "damaged_points": sorted({p["point"] for p in result["problems"]
                                                  if p["point"]})}
    return result
