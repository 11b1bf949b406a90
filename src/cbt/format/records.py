"""Recovery points: their records, ids, and how a disk's manifest is resolved;
the magic and version of a vault's ``config`` record.

A point is committed by the durable rename of its record,
``points/<id>.json``; everything it names (manifests, index segment, packs) is
durable before that rename.  A record carries a magic, a format version and a
BLAKE3 checksum of its own canonical JSON.

Manifests form a skip chain per disk.  The n-th backup of a disk (``seq`` n,
0 for its first) stores a full manifest when n = 0, else a delta against the
point with ``seq = n - lowbit(n)`` (n with its lowest set bit cleared).
Resolving seq n reads the full manifest and one delta per set bit of n:
at most ``ceil(log2 n) + 1`` files, while the deltas of a month of daily 1%
changes add up to well under three full manifests (each block change appears
in about log2(n) deltas at most).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import blake3

from cbt.core.errors import CbtError, CbtValueError

# Do not modify: identifies every point record ever written.
POINT_MAGIC = "cbt-point"
POINT_VERSION = 1
# Do not modify: identifies every vault ever made (its ``config`` record; read
# and written by :mod:`cbt.repo.vault`, which should take them from here).
VAULT_MAGIC = "cbt-vault"
VAULT_VERSION = 1
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class CorruptPointError(CbtError, ValueError):
    """A point record fails its checks."""


class NoSuchPointError(CbtError, LookupError):
    """No point matches (or more than one matches a prefix)."""


def check_name(kind: str, name: str) -> str:
    if not NAME_RE.match(name):
        raise CbtValueError(f"invalid {kind} {name!r}: use letters, digits, '_' and '-', "
                            "starting with a letter or digit, at most 64 characters")
    return name


def base_seq(seq: int) -> int:
    """The seq a delta at ``seq`` is taken against: ``seq`` with its lowest set bit cleared."""
    return seq & (seq - 1)


@dataclass
class DiskRecord:
    label: str
    path: str
    size: int
    block_size: int
    blocks: int
    changed_blocks: int
    bytes_read: int
    bytes_new: int
    bytes_stored: int
    seconds: float
    manifest: str  # vault-relative name
    manifest_checksum: str
    seq: int
    base: str | None  # point id holding the base of this delta (None for a full manifest)

    def public(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (
            "label", "path", "size", "block_size", "blocks", "changed_blocks", "bytes_read",
            "bytes_new", "bytes_stored", "seconds")}


@dataclass
class PointRecord:
    id: str
    vm: str
    created: str
    consistency: str
    consistency_reason: str
    parent: str | None
    disks: list[DiskRecord]
    bytes_new: int
    bytes_stored: int
    seconds: float
    warnings: list[str] = field(default_factory=list)
    slot: str | None = None  # the schedule slot this point fulfils (RFC 3339 UTC)
    hidden: bool = False  # pruned, kept only as the base of kept points' deltas

    def disk(self, label: str) -> DiskRecord | None:
        return next((d for d in self.disks if d.label == label), None)

    def to_json(self) -> bytes:
        body = {
            "magic": POINT_MAGIC,
            "format_version": POINT_VERSION,
            "id": self.id, "vm": self.vm, "created": self.created,
            "consistency": self.consistency, "consistency_reason": self.consistency_reason,
            "parent": self.parent,
            "disks": [vars(d) for d in self.disks],
            "bytes_new": self.bytes_new, "bytes_stored": self.bytes_stored,
            "seconds": self.seconds, "warnings": self.warnings,
            "slot": self.slot, "hidden": self.hidden,
        }
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        body["checksum"] = blake3.blake3(canonical.encode()).hexdigest()
        return (json.dumps(body, sort_keys=True, indent=1) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> PointRecord:
        try:
            body = json.loads(data)
            checksum = body.pop("checksum")
        except (ValueError, KeyError, AttributeError):
            raise CorruptPointError(f"corrupt point record {where}: not JSON with a checksum") \
                from None
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        if blake3.blake3(canonical.encode()).hexdigest() != checksum:
            raise CorruptPointError(f"corrupt point record {where}: checksum mismatch")
        if body.get("magic") != POINT_MAGIC:
            raise CorruptPointError(f"corrupt point record {where}: not a cbt point")
        if int(body.get("format_version", 0)) > POINT_VERSION:
            raise CorruptPointError(f"point record {where} is from a newer cbt; upgrade cbt")
        try:
            return cls(
                id=body["id"], vm=body["vm"], created=body["created"],
                consistency=body["consistency"],
                consistency_reason=body["consistency_reason"], parent=body["parent"],
                disks=[DiskRecord(**d) for d in body["disks"]],
                bytes_new=body["bytes_new"], bytes_stored=body["bytes_stored"],
                seconds=body["seconds"], warnings=body.get("warnings", []),
                slot=body.get("slot"), hidden=bool(body.get("hidden", False)))
        except (KeyError, TypeError) as exc:
            raise CorruptPointError(f"corrupt point record {where}: {exc}") from None

    def summary(self) -> dict[str, Any]:
        """The keys of ``cbt list --json`` for one point."""
        return {
            "recovery_point": self.id, "vm": self.vm, "created": self.created,
            "consistency": self.consistency, "parent": self.parent,
            "disks": [{"label": d.label, "size": d.size, "block_size": d.block_size}
                      for d in self.disks],
            "bytes_new": self.bytes_new, "bytes_stored": self.bytes_stored,
        }


def id_order(point_id: str) -> tuple[str, int]:
    """Sort key of ids made in the same second: ``-10`` after ``-9``."""
    stem, _, suffix = point_id.rpartition("-")
    if stem and suffix.isdigit() and stem.endswith("Z"):
        return (stem, int(suffix))
    return (point_id, 0)


def point_name(point_id: str) -> str:
    return f"points/{point_id}.json"


def manifest_name(point_id: str, label: str) -> str:
    return f"manifests/{point_id}/{label}.arrow"


def new_point_id(vm: str, created: str, existing: set[str]) -> str:
    """``<vm>.<YYYYMMDDTHHMMSSZ>``, with ``-N`` when that second is taken."""
    stamp = created.replace("-", "").replace(":", "")
    base = f"{vm}.{stamp}"
    if base not in existing:
        return base
    n = 2
    while f"{base}-{n}" in existing:
        n += 1
    return f"{base}-{n}"
