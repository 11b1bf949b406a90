"""Diff: which blocks differ between two disks, images or manifests.

Rules (content decides; a hole and a block of zeros are equal):

1. Block i covers ``[i*bs, min((i+1)*bs, max(size_a, size_b)))``; there are
   ``ceil(max(size_a, size_b) / bs)`` blocks.
2. When the sizes differ, the block holding the shorter input's end (byte
   ``min(size_a, size_b)``) and every block past it are changed: they are
   present, wholly or partly, in only one input.
3. Every block before that is changed when its bytes differ.

How the bytes are compared depends on the inputs:

- two images: opened as block sources and compared directly, window by window
  with ``memcmp`` in the core (:func:`cbt.source.read.compare_shard`), no
  hashing, in shards over the workers; blocks that are holes in both are never read
  (:func:`cbt.ops.changeset.diff_images`: ``cbt diff`` of two images imports
  neither numpy nor this module);
- an image and a manifest: the image is scanned with the manifest's block size,
  then digests are compared;
- two manifests: digests only (same block size required).

Digests must be of one kind to be compared.  An encrypted vault's block ids
are keyed BLAKE3 (the vault's secret id key): its points compare with each
other, and an image compared with one of its points is hashed with the same
key; a manifest written by ``cbt scan -o`` holds plain BLAKE3, which no keyed
id can match, so comparing it with an encrypted vault's point is an error
that says why (as is comparing points of two vaults keyed differently).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from cbt.core.errors import CbtValueError
from cbt.core.native import fast
from cbt.core.sizes import format_size
from cbt.format.magic import is_manifest_path
from cbt.format.manifest import Manifest, digest_records, row_runs, union_rows
from cbt.format.records import PointRecord
from cbt.ops.changeset import ChangeSet, common_blocks, diff_images, parse_point_ref
from cbt.repo.keys import Passphrase
from cbt.repo.vault import Vault
from cbt.source.scan import DEFAULT_BLOCK_SIZE, Progress, scan

Source = str | os.PathLike[str] | Manifest


def _check_same_block_size(a: Manifest, b: Manifest) -> None:
    if a.block_size != b.block_size:
        raise CbtValueError(
            f"manifests have different block sizes ({format_size(a.block_size)} and "
            f"{format_size(b.block_size)}); rescan one with --block-size "
            f"{format_size(a.block_size)}")


def _changed_common(a: Manifest, b: Manifest, common: int) -> npt.NDArray[np.uint64]:
    """Blocks below ``common`` whose content differs: only blocks either manifest holds
    are compared (a hole and a zero block both have the zero digest: equal)."""
    end = np.uint64(common)  # (a Python int would make numpy compare the rows as floats)
    ka, kb = int(np.searchsorted(a.rows, end)), int(np.searchsorted(b.rows, end))
    if np.array_equal(a.rows[:ka], b.rows[:kb]):  # the same blocks held (no lookups)
        union, da, db = a.rows[:ka], a.row_digests[:ka], b.row_digests[:kb]
    else:  # each side's digests spread over the union (zero where it holds nothing)
        union = union_rows(a.rows[:ka], b.rows[:kb])
        da, db = _spread(a, ka, union), _spread(b, kb, union)
    differ = np.zeros(len(union), dtype=np.uint8)
    if len(union):
        fast.compare_digests(da, db, differ)
    changed: npt.NDArray[np.uint64] = union[differ.astype(bool)]
    return changed


def _spread(m: Manifest, k: int, union: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint8]:
    """The digests of ``m``'s first ``k`` rows at their places in ``union`` (a superset of
    them), zero elsewhere: one scatter of 32-byte records (not a lookup per row)."""
    out = np.zeros((len(union), fast.DIGEST_SIZE), dtype=np.uint8)
    if k:
        at = np.searchsorted(union, m.rows[:k])
        out.view("V32").ravel()[at] = digest_records(m.row_digests[:k])
    return out


def changed_blocks(a: Manifest, b: Manifest) -> int:
    """How many blocks :func:`diff_manifests` counts changed."""
    return diff_manifests(a, b).changed_blocks


def _runs(rows: npt.NDArray[np.uint64], common: int, n: int, block_size: int,
          total: int) -> npt.NDArray[np.uint64]:
    """:func:`fast.bitmap_runs` of the bitmap of ``rows`` and every block from ``common``
    to ``n``, without making that bitmap."""
    starts, ends = row_runs(rows)
    if n > common:
        if len(ends) and ends[-1] == common:
            ends[-1] = n
        else:
            starts, ends = np.r_[starts, common], np.r_[ends, n]
    out = np.zeros((len(starts), 2), dtype=np.uint64)
    out[:, 0] = starts * block_size
    out[:, 1] = np.minimum(ends * block_size, total) - starts * block_size
    return out


def diff_manifests(a: Manifest, b: Manifest) -> ChangeSet:
    """Changed blocks from two manifests of the same block size (metadata only; memory
    follows the blocks they hold, not the disks' size)."""
    _check_same_block_size(a, b)
    bs = a.block_size
    n = fast.nblocks(max(a.disk_size, b.disk_size), bs)
    common = common_blocks(a.disk_size, b.disk_size, bs)
    rows = _changed_common(a, b, common)
    ranges = _runs(rows, common, n, bs, max(a.disk_size, b.disk_size))
    return ChangeSet(bs, a.disk_size, b.disk_size, None, ranges, [], changed=(rows, common))


@dataclass
class _Side:
    """One side of a diff as loaded: a manifest, an image's path, or a whole point."""

    value: Manifest | str | PointRef
    name: str  # as the user named it, for messages
    key: bytes | None = None  # the key of its digests (an encrypted vault's ids); None: plain
    vault: str | None = None  # the vault it comes from, if any


def _load(src: Source, passphrase: Passphrase | None, opened: dict[str, Vault]) -> _Side:
    """Load one side; a vault named twice is opened (and unlocked) once, in ``opened``."""
    if isinstance(src, Manifest):
        return _Side(src, "the manifest given")
    p = os.fspath(src)
    ref = parse_point_ref(p)
    if ref is not None:
        vault = opened.get(ref[0])
        if vault is None:
            vault = opened[ref[0]] = Vault.open(ref[0], passphrase)
        point = vault.point(ref[1])
        value: Manifest | PointRef = (PointRef(vault, point) if ref[2] is None
                                      else vault.resolve(point, ref[2]))
        return _Side(value, p, vault.id_key, ref[0])
    if is_manifest_path(p):
        return _Side(Manifest.read(p), p)
    return _Side(p, p)


def _common_key(a: _Side, b: _Side) -> bytes | None:
    """The key both sides' digests are keyed with (None: plain BLAKE3), to hash an image
    with; an error when their digests cannot be compared."""
    sides = [s for s in (a, b) if not isinstance(s.value, str)]  # (an image: hashed to fit)
    if len({s.key for s in sides}) <= 1:
        return sides[0].key if sides else None
    plain = [s for s in sides if s.key is None]
    if plain and plain[0].vault is None:
        raise CbtValueError(f"{plain[0].name} holds plain BLAKE3 digests; the encrypted "
                            "vault's ids are keyed: diff the point against the image instead")
    if plain:
        raise CbtValueError(f"{a.name} and {b.name}: one vault is encrypted (its block ids "
                            "are keyed), the other not, so their digests cannot be compared: "
                            "diff a point against an image instead")
    raise CbtValueError(f"{a.name} and {b.name} are points of two encrypted vaults whose block "
                        "ids are keyed differently, so their digests cannot be compared: diff "
                        "a point against an image instead")


@dataclass
class PointRef:
    """A whole recovery point named as ``VAULT::POINT``."""

    vault: Vault
    point: PointRecord


@dataclass
class PointDiff:
    """Disk-by-disk changes between two whole recovery points (metadata only)."""

    a: str
    b: str
    disks: list[tuple[str, str, ChangeSet]]  # (label, status, change set)
    warnings: list[str] = field(default_factory=list)

    @property
    def changed_blocks(self) -> int:
        return sum(cs.changed_blocks for _, _, cs in self.disks)

    @property
    def changed_bytes(self) -> int:
        return sum(cs.changed_bytes for _, _, cs in self.disks)

    @property
    def identical(self) -> bool:
        return all(status == "same" for _, status, _ in self.disks)

    def to_dict(self) -> dict[str, Any]:
        disks = []
        for label, status, cs in self.disks:
            d = cs.to_dict()
            d.pop("warnings")
            disks.append({"label": label, "status": status, **d})
        return {"a": self.a, "b": self.b, "disks": disks, "changed_blocks": self.changed_blocks,
                "changed_bytes": self.changed_bytes, "warnings": list(self.warnings)}


def _absent_like(m: Manifest) -> Manifest:
    """An empty disk of ``m``'s block size: everything in ``m`` counts as changed."""
    return Manifest(m.block_size, 0)


def diff_points(a: PointRef, b: PointRef) -> PointDiff:
    """Compare two whole points disk by disk, by label (reads only manifests)."""
    labels_a = [d.label for d in a.point.disks]
    labels_b = [d.label for d in b.point.disks]
    out: list[tuple[str, str, ChangeSet]] = []
    for label in labels_a + [lb for lb in labels_b if lb not in labels_a]:
        ma = a.vault.resolve(a.point, label) if label in labels_a else None
        mb = b.vault.resolve(b.point, label) if label in labels_b else None
        if ma is not None and mb is not None:
            cs = diff_manifests(ma, mb)
            out.append((label, "same" if cs.identical else "changed", cs))
        elif ma is not None:
            out.append((label, "only_a", diff_manifests(ma, _absent_like(ma))))
        elif mb is not None:
            out.append((label, "only_b", diff_manifests(_absent_like(mb), mb)))
    return PointDiff(a.point.id, b.point.id, out)


def diff(a: Source, b: Source, block_size: int | None = None, workers: int | None = None,
         progress: Progress | None = None,
         passphrase: Passphrase | None = None) -> ChangeSet | PointDiff:
    """Changed blocks between two sources, each an image, a device, a manifest
    file, a :class:`Manifest`, or a point's disk ``VAULT::POINT/LABEL``: a
    :class:`ChangeSet`.  Two whole points ``VAULT::POINT``: a :class:`PointDiff`.

    ``block_size`` applies to images; a manifest's own block size wins (with a
    warning when it differs from an explicit ``block_size``).  ``passphrase``
    unlocks an encrypted vault named (None: from the environment); an image
    compared with its point is hashed with the vault's keyed block ids.  A
    :class:`Manifest` given as such is taken to hold plain BLAKE3 digests.
    """
    if block_size is not None:
        fast.check_block_size(block_size)
    opened: dict[str, Vault] = {}
    sa, sb = _load(a, passphrase, opened), _load(b, passphrase, opened)
    key = _common_key(sa, sb)
    la, lb = sa.value, sb.value
    if isinstance(la, PointRef) or isinstance(lb, PointRef):
        if not (isinstance(la, PointRef) and isinstance(lb, PointRef)):
            raise CbtValueError("a whole point (VAULT::POINT) can only be compared with another "
                                "whole point; name one disk as VAULT::POINT/LABEL")
        return diff_points(la, lb)
    manifests = [m for m in (la, lb) if isinstance(m, Manifest)]
    warnings: list[str] = []
    if not manifests:
        assert isinstance(la, str) and isinstance(lb, str)
        return diff_images(la, lb, block_size or DEFAULT_BLOCK_SIZE, workers, progress)
    bs = manifests[0].block_size
    if block_size is not None and any(m.block_size != block_size for m in manifests):
        warnings.append(f"--block-size {format_size(block_size)} ignored: the manifest's "
                        f"block size {format_size(bs)} wins")
    ma = la if isinstance(la, Manifest) else scan(la, bs, workers, progress, key=key)
    mb = lb if isinstance(lb, Manifest) else scan(lb, bs, workers, progress, key=key)
    result = diff_manifests(ma, mb)
    result.warnings[:0] = warnings
    return result
