"""Where the space goes: sizes, ratios, and what each point alone holds (``cbt stats``).

Definitions (bytes):

- *logical* of a point: the sum of its disks' sizes.
- *data* of a point: the bytes of its disks' DATA blocks (holes and zero blocks
  excluded; a disk's last block counts its real length).
- *stored* of the vault: every blob the index names, as it lies in the packs
  (blob header plus compressed, and in an encrypted vault sealed, bytes), blocks no
  point references any more included (``cbt gc`` frees those, pack by pack: see
  *unique*).  Not the packs' trailers, nor files the index does not name.
- *referenced*: the stored bytes of the distinct blocks some visible point
  references (a hidden base's blocks count only where a visible point uses them).
- *stored* of a point: the stored bytes of the distinct blocks it references (what
  restoring it reads); *new*: of those, the blocks no earlier point of its VM
  references; *unique*: the blocks no other visible point references (what
  forgetting it leaves unreferenced: a block a later point of the chain still
  uses is not unique).  A VM's unique bytes: the blocks only its points reference.
  ``cbt gc`` then frees them from packs it removes or rewrites; a pack still at
  least half live keeps its dead blobs (its *stored* bytes stay, its *referenced*
  ones go), so the space freed at once may be less.
- ``dedup_ratio`` = data bytes of all points / raw bytes of the distinct referenced
  blocks; ``compression_ratio`` = those raw bytes / their stored bytes
  (referenced, so blocks awaiting gc do not skew it).  None where nothing is stored.

Algorithm (no lock: it only reads, and never holds up a backup):

1. Load the visible points (a damaged record: a warning), then the index (a
   backup's segment is written before its record, so it covers every point).
2. Resolve each disk's manifest, look its DATA digests up in the index (one
   ``searchsorted`` per disk) and keep each point's distinct index positions.
3. Number the distinct referenced blocks (their sizes read from the index
   once); reference counts: a ``bincount`` over every point's numbers (per
   block, how many points hold it), and one over every VM's (how many VMs).
   Nothing is as long as the index: only the stored total streams through it.
4. A point's unique bytes are the blob sizes of its positions whose count is 1;
   a VM's likewise with the VM counts.  New bytes: each VM's points oldest first,
   against a mask of the blocks seen so far.  Linear in the number of
   (point, block) references: no pair of points (nor of VM and point) is ever
   compared.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from cbt.core.errors import CbtError
from cbt.format.pack import BLOB
from cbt.format.records import PointRecord
from cbt.repo.index import Index
from cbt.repo.vault import Vault

Positions = npt.NDArray[np.int64]


@dataclass
class PointStats:
    recovery_point: str
    vm: str
    created: str
    logical_bytes: int
    data_bytes: int
    stored_bytes: int = 0
    new_bytes: int = 0
    unique_bytes: int = 0


@dataclass
class VmStats:
    vm: str
    points: int
    logical_bytes: int
    data_bytes: int
    unique_bytes: int = 0


@dataclass
class Stats:
    """What ``cbt stats`` reports (see the module doc for each figure)."""

    logical_bytes: int = 0
    data_bytes: int = 0
    stored_bytes: int = 0
    referenced_bytes: int = 0
    dedup_ratio: float | None = None
    compression_ratio: float | None = None
    compression: str = "zstd"  # the codec the vault's backups write (its config's)
    vms: list[VmStats] = field(default_factory=list)
    points: list[PointStats] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The JSON of ``cbt stats --json``."""
        return asdict(self)


def stats(vault: Vault, vm: str | None = None, refs: list[str] | None = None) -> Stats:
    """Steps 1 to 4 of the module doc.  The totals are the whole vault's; ``vm`` and
    ``refs`` (point ids, prefixes, ``VM.latest``) only limit the VMs and points listed."""
    out = Stats(compression=vault.compression)
    # (names first: an unknown one fails before the work, and VM.latest is a point listed)
    wanted = {p.id for p in vault.points_named(refs)} if refs else None
    # points first: a backup commits its index segment before its record, so every
    # block of a point listed here is in the index loaded after (the other way round,
    # a backup committing in between was "blocks not in the index")
    points = vault.points(warnings=out.warnings)
    index = vault.load_index(out.warnings)
    if out.warnings:
        out.warnings.append("the blocks of points that cannot be read are not counted: the "
                            "unique bytes of others may be too high (gc keeps those blocks)")
    held = [_positions(vault, index, p, out.warnings) for p in points]
    # from here on a block is its number among the referenced ones, not its index position:
    # the counts and masks below are as long as what the points hold, not the whole index
    every = np.unique(np.concatenate([np.zeros(0, np.int64), *held]))
    referenced = np.zeros(len(index), dtype=bool)
    referenced[every] = True
    for base, got in index.chunks():
        # (a blob listed twice, by a merge killed before it retired its inputs, is one)
        one = ~index.copies(base, got, ~referenced[base:base + len(got.stored)])
        out.stored_bytes += int(got.stored[one].astype(np.int64).sum()) + BLOB.size * int(
            one.sum())
    del referenced
    at = index.locate(every)
    blob = at.stored.astype(np.int64) + BLOB.size
    held = [np.searchsorted(every, h) for h in held]
    per_point = np.bincount(np.concatenate([np.zeros(0, np.int64), *held]),
                            minlength=len(every))
    groups: dict[str, list[int]] = {}  # VM -> its points' places in ``points``
    for i, p in enumerate(points):
        groups.setdefault(p.vm, []).append(i)
    by_vm = {name: np.unique(np.concatenate([np.zeros(0, np.int64), *(held[i] for i in mine)]))
             for name, mine in groups.items()}
    per_vm = np.bincount(np.concatenate([np.zeros(0, np.int64), *by_vm.values()]),
                         minlength=len(every))
    rows = [_point_row(vault, p, h, blob, per_point) for p, h in zip(points, held, strict=True)]
    _new_bytes(rows, held, blob, groups)
    referenced = np.nonzero(per_point)[0]
    raw = int(at.raw[referenced].astype(np.int64).sum())
    out.referenced_bytes = int(blob[referenced].sum())
    out.logical_bytes = sum(r.logical_bytes for r in rows)
    out.data_bytes = sum(r.data_bytes for r in rows)
    out.dedup_ratio = out.data_bytes / raw if raw else None
    out.compression_ratio = raw / out.referenced_bytes if out.referenced_bytes else None
    out.vms = [VmStats(name, len(mine), sum(rows[i].logical_bytes for i in mine),
                       sum(rows[i].data_bytes for i in mine),
                       int(blob[by_vm[name][per_vm[by_vm[name]] == 1]].sum()))
               for name, mine in sorted(groups.items()) if vm is None or name == vm]
    out.points = [r for r in rows if (vm is None or r.vm == vm)
                  and (wanted is None or r.recovery_point in wanted)]
    return out


def _positions(vault: Vault, index: Index, point: PointRecord,
               warnings: list[str]) -> Positions:
    """Step 2: the distinct index positions of the blocks ``point`` references."""
    found = [np.zeros(0, np.int64)]
    for disk in point.disks:
        try:
            digests = vault.resolve(point, disk.label).data_rows()[1]
        except (CbtError, OSError) as exc:
            warnings.append(f"point {point.id} disk {disk.label}: {exc}; its blocks are not "
                            "counted (the unique bytes of others may be too high)")
            continue
        pos = index.lookup(digests)
        if (pos < 0).any():
            warnings.append(f"point {point.id} disk {disk.label}: {int((pos < 0).sum())} "
                            "blocks not in the index (run cbt verify)")
        found.append(pos[pos >= 0])
    return np.unique(np.concatenate(found))


def _data_bytes(vault: Vault, point: PointRecord) -> int:
    """Bytes of the DATA blocks of ``point``'s disks, the last block at its real length."""
    total = 0
    for disk in point.disks:
        try:
            rows = vault.resolve(point, disk.label).data_rows()[0]
        except (CbtError, OSError):
            continue  # (named in a warning by _positions)
        bs = disk.block_size
        total += len(rows) * bs
        last = -(-disk.size // bs) - 1
        if len(rows) and int(rows[-1]) == last:
            total -= (last + 1) * bs - disk.size
    return total


def _point_row(vault: Vault, point: PointRecord, held: Positions, blob: Positions,
               per_point: Positions) -> PointStats:
    return PointStats(point.id, point.vm, point.created, sum(d.size for d in point.disks),
                      _data_bytes(vault, point), int(blob[held].sum()), 0,
                      int(blob[held[per_point[held] == 1]].sum()))


def _new_bytes(rows: list[PointStats], held: list[Positions], blob: Positions,
               groups: dict[str, list[int]]) -> None:
    """Step 4: per VM (``groups``: its rows, oldest first), the bytes of blocks not seen
    before.  One mask over the index for all VMs, cleared where a VM set it before the
    next (a mask per VM was VMs x index entries bytes)."""
    seen = np.zeros(len(blob), dtype=bool)
    for mine in groups.values():
        for i in mine:
            pos = held[i]
            rows[i].new_bytes = int(blob[pos[~seen[pos]]].sum())
            seen[pos] = True
        for i in mine:
            seen[held[i]] = False
