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
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import blake3

from cbt.core.errors import CbtError, CbtValueError, untrusted_json
from cbt.core.timefmt import parse_now

# Do not modify: identifies every point record ever written.
POINT_MAGIC = "cbt-point"
POINT_VERSION = 1
# Do not modify: identifies every vault ever made (its ``config`` record; read
# and written by :mod:`cbt.repo.vault`, which should take them from here).
VAULT_MAGIC = "cbt-vault"
VAULT_VERSION = 1
# (\Z, not $: $ matches before a final newline too, and "os\n" is no plain name)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
# ``<vm>.<YYYYMMDDTHHMMSSZ>``, with ``-N`` (N >= 2) when that second was taken.
POINT_ID_RE = re.compile(r"^(?P<vm>[A-Za-z0-9][A-Za-z0-9_-]{0,63})\.[0-9]{8}T[0-9]{6}Z"
                         r"(?:-[1-9][0-9]{0,8})?\Z")
JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\.[0-9]{8}T[0-9]{6}Z\.[0-9a-f]{6}\Z")
# Bounds a record read from a vault must keep (the core's block sizes: a test checks
# them against ``cbt.core.native.fast``; this module stays free of the compiled core).
MIN_BLOCK = 4096
MAX_BLOCK = 4 << 20
MAX_SIZE = 2**63
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class CorruptPointError(CbtError, ValueError):
    """A point record fails its checks."""


class NoSuchPointError(CbtError, LookupError):
    """No point matches (or more than one matches a prefix)."""


def check_name(kind: str, name: str) -> str:
    if not NAME_RE.match(name):
        raise CbtValueError(f"invalid {kind} {name!r}: use letters, digits, '_' and '-', "
                            "starting with a letter or digit, at most 64 characters")
    return name


def is_job_id(value: object, vm: str) -> bool:
    """Whether ``value`` is the id of a job of ``vm``: ``<vm>.<YYYYMMDDTHHMMSSZ>.<6 hex>``
    (recovery finds a dead job's snapshots by it: anything shorter would match others')."""
    return isinstance(value, str) and JOB_ID_RE.match(value) is not None \
        and value.rsplit(".", 2)[0] == vm


def is_point_id(value: object) -> bool:
    """Whether ``value`` is a point id: ``<vm>.<YYYYMMDDTHHMMSSZ>`` with an optional ``-N``."""
    return isinstance(value, str) and POINT_ID_RE.match(value) is not None


def base_seq(seq: int) -> int:
    """The seq a delta at ``seq`` is taken against: ``seq`` with its lowest set bit cleared."""
    return seq & (seq - 1)


# see cbt.source.changes
CHANGE_SOURCES = ("fiemap", "btrfs-send", "hint-file", "qemu-bitmap", "hash")
_KINDS = ("file", "subvolume")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass(frozen=True)
class TrackingBase:
    """What identifies a kept tracking base, recorded in the point made from it.

    ``kind`` ``file``: the ``<label>.base.img`` clone (device, inode, size, and
    change and modification times in ns: a rename, rewrite or replacement
    changes them).  ``subvolume``: the disk's file inside the base subvolume,
    plus the subvolume's UUID.
    """

    kind: str
    dev: int
    ino: int
    size: int
    ctime_ns: int
    mtime_ns: int
    subvolume_uuid: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object) -> TrackingBase | None:
        """Read from a point record (untrusted): None when it is not a valid identity."""
        if not isinstance(data, Mapping) or set(data) != set(cls.__dataclass_fields__):
            return None
        ints = ("dev", "ino", "size", "ctime_ns", "mtime_ns")
        if data["kind"] not in _KINDS or any(
                type(data[k]) is not int or not 0 <= data[k] < 2**64 for k in ints):
            return None
        u = data["subvolume_uuid"]
        if (data["kind"] == "subvolume") != isinstance(u, str) or (
                isinstance(u, str) and not _UUID.fullmatch(u)):
            return None
        return cls(**data)


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
    # how the run found the changed blocks (cbt.source.changes); points made before
    # change tracking existed read as hash scans
    change_source: str = "hash"
    change_source_reason: str | None = None  # why it fell back to ``hash`` (None: it did not)
    verified_blocks: int = 0  # blocks the source called unchanged, re-hashed as a check
    hint_mismatches: int = 0  # of those, blocks that had changed: the source lied
    tracking_base: dict[str, Any] | None = None  # TrackingBase.to_json of the kept base

    def problem(self) -> str | None:
        """What breaks the rules of :meth:`PointRecord.problem` in this disk (None: nothing)."""
        if not isinstance(self.label, str) or not NAME_RE.match(self.label):
            return f"invalid disk label {self.label!r}"
        where = f"disk {self.label}"
        for key in ("path", "manifest", "manifest_checksum"):
            if not isinstance(getattr(self, key), str):
                return f"{where}: {key} is not a string"
        if not _HEX64.match(self.manifest_checksum):
            return f"{where}: manifest_checksum is not 64 hex digits"
        bad = _bad_numbers(self, ("size", "block_size", "blocks", "changed_blocks",
                                  "bytes_read", "bytes_new", "bytes_stored", "seq"))
        if bad:
            return f"{where}: {bad}"
        bs = self.block_size
        if not MIN_BLOCK <= bs <= MAX_BLOCK or bs & (bs - 1):
            return f"{where}: block_size {bs} is not a power of two from 4K to 4M"
        if self.blocks != -(-self.size // bs):
            return f"{where}: {self.blocks} blocks do not make {self.size} bytes"
        if self.base is not None and not is_point_id(self.base):
            return f"{where}: base {self.base!r} is not a point id"
        return self._tracking_problem(where)

    def _tracking_problem(self, where: str) -> str | None:
        if self.change_source not in CHANGE_SOURCES:
            return f"{where}: unknown change_source {self.change_source!r}"
        reason = self.change_source_reason
        if reason is not None and (not isinstance(reason, str) or len(reason) > 1000):
            return f"{where}: change_source_reason is not a short string"
        bad = _bad_numbers(self, ("verified_blocks", "hint_mismatches"))
        if bad:
            return f"{where}: {bad}"
        if self.tracking_base is not None and TrackingBase.from_json(self.tracking_base) is None:
            return f"{where}: tracking_base is not a valid base identity"
        return None

    def public(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (
            "label", "path", "size", "block_size", "blocks", "changed_blocks", "bytes_read",
            "bytes_new", "bytes_stored", "seconds", "change_source", "change_source_reason",
            "verified_blocks", "hint_mismatches")}


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
    copied_from: str | None = None  # the id of the vault ``cbt copy`` copied it from

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
        if self.copied_from is not None:  # (absent otherwise: older records stay as they were)
            body["copied_from"] = self.copied_from
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        body["checksum"] = blake3.blake3(canonical.encode()).hexdigest()
        return (json.dumps(body, sort_keys=True, indent=1) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> PointRecord:
        try:
            body = untrusted_json(data)
            checksum = body.pop("checksum")
        except (ValueError, KeyError, AttributeError, TypeError):
            raise CorruptPointError(f"corrupt point record {where}: not JSON with a checksum") \
                from None
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        if blake3.blake3(canonical.encode()).hexdigest() != checksum:
            raise CorruptPointError(f"corrupt point record {where}: checksum mismatch")
        if body.get("magic") != POINT_MAGIC:
            raise CorruptPointError(f"corrupt point record {where}: not a cbt point")
        version = body.get("format_version", 0)
        if type(version) is not int:
            raise CorruptPointError(f"corrupt point record {where}: format_version is not an "
                                    "integer")
        if version > POINT_VERSION:
            raise CorruptPointError(f"point record {where} is from a newer cbt; upgrade cbt")
        try:
            if not isinstance(body["disks"], list):
                raise TypeError("disks is not a list")
            record = cls(
                id=body["id"], vm=body["vm"], created=body["created"],
                consistency=body["consistency"],
                consistency_reason=body["consistency_reason"], parent=body["parent"],
                disks=[DiskRecord(**d) for d in body["disks"]],
                bytes_new=body["bytes_new"], bytes_stored=body["bytes_stored"],
                seconds=body["seconds"], warnings=body.get("warnings", []),
                slot=body.get("slot"), hidden=body.get("hidden", False),
                copied_from=body.get("copied_from"))
        except (KeyError, TypeError, AttributeError) as exc:
            raise CorruptPointError(f"corrupt point record {where}: {exc}") from None
        problem = record.problem()
        if problem is not None:
            raise CorruptPointError(f"corrupt point record {where}: {problem}")
        return record

    def problem(self) -> str | None:
        """What makes this record unusable (None: it keeps every rule cbt writes by).

        The rules: ``id`` is ``<vm>.<YYYYMMDDTHHMMSSZ>[-N]`` and its vm part is ``vm``;
        ``vm`` and every disk label pass :data:`NAME_RE`, labels unique; ``parent``
        and each disk's ``base`` are point ids or None; strings are strings; integers
        are integers (not bool, not float), from 0 to 2**63; ``block_size`` is a power
        of two from :data:`MIN_BLOCK` to :data:`MAX_BLOCK`; ``blocks`` is
        ``ceil(size / block_size)`` (``changed_blocks`` may exceed it: a disk that shrank
        counts the blocks it lost); ``seq >= 0``;
        ``manifest_checksum`` is 64 hex digits; seconds are finite numbers >= 0.
        """
        m = POINT_ID_RE.match(self.id) if isinstance(self.id, str) else None
        if m is None:
            return f"id {self.id!r} is not <vm>.<YYYYMMDDTHHMMSSZ>[-N]"
        if not isinstance(self.vm, str) or not NAME_RE.match(self.vm):
            return f"invalid vm name {self.vm!r}"
        if m.group("vm") != self.vm:
            return f"id {self.id!r} is not a point of vm {self.vm!r}"
        for key in ("created", "consistency", "consistency_reason"):
            if not isinstance(getattr(self, key), str):
                return f"{key} is not a string"
        if _bad_time(self.created):
            return f"created {self.created!r} is not an ISO 8601 time with an offset"
        if self.slot is not None and (not isinstance(self.slot, str) or _bad_time(self.slot)):
            return f"slot {self.slot!r} is not an ISO 8601 time with an offset"
        if self.parent is not None and not is_point_id(self.parent):
            return f"parent {self.parent!r} is not a point id"
        if not isinstance(self.hidden, bool):
            return "hidden is not true or false"
        if self.copied_from is not None and not isinstance(self.copied_from, str):
            return "copied_from is not a string"
        if not isinstance(self.warnings, list) or not all(isinstance(w, str)
                                                          for w in self.warnings):
            return "warnings are not a list of strings"
        bad = _bad_numbers(self, ("bytes_new", "bytes_stored"))
        if bad:
            return bad
        labels = [d.label for d in self.disks]
        if len(set(map(repr, labels))) != len(labels):
            return "a disk label appears twice"
        for d in self.disks:
            bad = d.problem()
            if bad:
                return bad
        return None

    def summary(self) -> dict[str, Any]:
        """The keys of ``cbt list --json`` for one point."""
        return {
            "recovery_point": self.id, "vm": self.vm, "created": self.created,
            "consistency": self.consistency, "parent": self.parent,
            "disks": [{"label": d.label, "size": d.size, "block_size": d.block_size}
                      for d in self.disks],
            "bytes_new": self.bytes_new, "bytes_stored": self.bytes_stored,
        }


def _bad_time(text: str) -> bool:
    """Whether ``text`` is no time cbt can read back (prune and the scheduler parse them)."""
    try:
        parse_now(text)
    except CbtError:
        return True
    return False


def _bad_numbers(obj: DiskRecord | PointRecord | JobDisk, ints: tuple[str, ...]) -> str | None:
    """The first of ``ints`` that is not an int from 0 to :data:`MAX_SIZE`, or a bad
    ``seconds``; None when all are fine."""
    for key in ints:
        v = getattr(obj, key)
        if type(v) is not int or not 0 <= v <= MAX_SIZE:
            return f"{key} {v!r} is not an integer from 0 to 2**63"
    v = obj.seconds
    if type(v) not in (int, float) or not math.isfinite(v) or v < 0:
        return f"seconds {v!r} is not a number >= 0"
    return None


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


# The times a point may carry: ids sort by time only with a 4-digit year, and
# times before the epoch are no backup's (a mistyped --now).
FIRST_YEAR, LAST_YEAR = 1970, 9999
_CREATED_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$")


def check_point_time(created: str) -> str:
    """``created`` if a point may carry it (RFC 3339 UTC with ``Z``, years 1970 to 9999);
    else :class:`CbtValueError` naming it."""
    if not _CREATED_RE.match(created) or _bad_time(created):
        raise CbtValueError(f"not a point time: {created!r} (want YYYY-MM-DDTHH:MM:SSZ)")
    if not FIRST_YEAR <= int(created[:4]) <= LAST_YEAR:
        raise CbtValueError(f"time {created} is out of range: a point's time must be from "
                            f"{FIRST_YEAR} to {LAST_YEAR}")
    return created


def new_point_id(vm: str, created: str, existing: set[str]) -> str:
    """``<vm>.<YYYYMMDDTHHMMSSZ>``, with ``-N`` when that second is taken; ``created``
    must pass :func:`check_point_time` (so ids sort by time)."""
    stamp = check_point_time(created).replace("-", "").replace(":", "")
    base = f"{vm}.{stamp}"
    if base not in existing:
        return base
    n = 2
    while f"{base}-{n}" in existing:
        n += 1
    return f"{base}-{n}"


# -- job history and kept snapshots (jobs/<id>.json, snapshots/<point id>.json) ----------
# JSON with sorted keys, indented by one, and a final newline; they carry no magic
# or checksum (format 1).  A key this cbt does not know is kept as it is when a
# record is rewritten.


def _dump(body: dict[str, Any]) -> bytes:
    return (json.dumps(body, sort_keys=True, indent=1) + "\n").encode()


def _object(data: bytes) -> dict[str, Any]:
    body = untrusted_json(data)
    if not isinstance(body, dict):
        raise ValueError("not a JSON object")
    return body


# -- job history -------------------------------------------------------------------------


@dataclass
class JobDisk:
    """One disk of a succeeded job: the provider that snapshotted it, its bytes and time."""

    label: str
    snapshot: str
    bytes_read: int
    bytes_new: int
    bytes_stored: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "snapshot": self.snapshot, "bytes_read": self.bytes_read,
                "bytes_new": self.bytes_new, "bytes_stored": self.bytes_stored,
                "seconds": self.seconds}

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> JobDisk:
        return cls(label=body["label"], snapshot=body["snapshot"],
                   bytes_read=body["bytes_read"], bytes_new=body["bytes_new"],
                   bytes_stored=body["bytes_stored"], seconds=body["seconds"])


_JOB_KEYS = ("id", "vm", "policy", "start", "end", "status", "consistency", "recovery_point",
             "disks", "error", "hooks", "hook_pending", "pid", "slot", "start_ns")
_PUBLIC_JOB_KEYS = _JOB_KEYS[:11]
# one entry of a job's ``hooks``: a hook run and the tails of its output
_HOOK_RUN_KEYS: dict[str, type | tuple[type, ...]] = {
    "phase": str, "ok": bool, "exit_code": (int, type(None)), "timed_out": bool,
    "seconds": (int, float), "error": (str, type(None)), "stdout": str, "stderr": str}


@dataclass
class JobRecord:
    """One backup job: ``running`` while it runs, then ``succeeded``, ``failed`` or
    ``interrupted`` (its process died; set by the next job of its VM)."""

    id: str
    vm: str
    policy: str | None
    start: str
    start_ns: int = 0  # orders jobs that started in the same second
    status: str = "running"
    end: str | None = None
    consistency: str | None = None
    recovery_point: str | None = None  # the point's id, chosen when the job starts
    disks: list[JobDisk] = field(default_factory=list)
    error: str | None = None
    # the hooks it ran, in order: phase, ok, exit_code, timed_out, seconds, error, and
    # the tails of their stdout and stderr (cbt.jobs.hooks.HookResult.to_record); a QEMU
    # VM's guest agent calls too, with the same keys and ``file_systems`` (phase
    # ``guest-freeze`` or ``guest-thaw``: cbt.jobs.qemu.AgentResult.to_record)
    hooks: list[dict[str, Any]] = field(default_factory=list)
    hook_pending: bool = False  # between the pre hook's start and the post hook's end
    pid: int | None = None
    slot: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys of another cbt, kept as read

    def to_dict(self) -> dict[str, Any]:
        """The keys of ``cbt jobs --json`` for this job."""
        body = self._body()
        return {k: body[k] for k in _PUBLIC_JOB_KEYS}

    def to_json(self) -> bytes:
        """The record's file; ``hooks`` only when some ran (else as format 1 wrote it)."""
        body = self._body()
        if not body["hooks"]:
            del body["hooks"]
        return _dump({**self.extra, **body})

    def _body(self) -> dict[str, Any]:
        return {"id": self.id, "vm": self.vm, "policy": self.policy, "start": self.start,
                "end": self.end, "status": self.status, "consistency": self.consistency,
                "recovery_point": self.recovery_point,
                "disks": [d.to_dict() for d in self.disks], "error": self.error,
                "hooks": [dict(h) for h in self.hooks], "hook_pending": self.hook_pending,
                "pid": self.pid, "slot": self.slot, "start_ns": self.start_ns}

    @classmethod
    def from_json(cls, data: bytes) -> JobRecord:
        """Parse a record; ``ValueError`` if it is not one (a key missing, a wrong type)."""
        body = _object(data)
        try:
            rec = cls(
                id=body["id"], vm=body["vm"], policy=body.get("policy"),
                start=body.get("start", ""), start_ns=body.get("start_ns", 0),
                status=body.get("status", "running"), end=body.get("end"),
                consistency=body.get("consistency"),
                recovery_point=body.get("recovery_point"),
                disks=[JobDisk.from_dict(d) for d in body.get("disks") or []],
                error=body.get("error"), hooks=list(body.get("hooks") or []),
                hook_pending=bool(body.get("hook_pending")),
                pid=body.get("pid"), slot=body.get("slot"),
                extra={k: v for k, v in body.items() if k not in _JOB_KEYS})
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a job record: {exc!r}") from None
        bad = rec.problem()
        if bad:
            raise ValueError(f"not a job record: {bad}")
        return rec

    def problem(self) -> str | None:
        """The first value of a wrong type (a record is vault input; None: all fine)."""
        text = ("id", "vm", "start", "status")
        optional = ("policy", "end", "consistency", "recovery_point", "error", "slot")
        for key in text + optional:
            v = getattr(self, key)
            if not (isinstance(v, str) or (v is None and key in optional)):
                return f"{key} {v!r} is not a string"
        for key in ("start_ns", "pid"):
            v = getattr(self, key)
            if not (type(v) is int or (v is None and key == "pid")):
                return f"{key} {v!r} is not an integer"
        for d in self.disks:
            if not isinstance(d.label, str) or not isinstance(d.snapshot, (str, type(None))):
                return "a disk's label or snapshot is not a string"
            bad = _bad_numbers(d, ("bytes_read", "bytes_new", "bytes_stored"))
            if bad:
                return f"disk {d.label}: {bad}"
        for h in self.hooks:
            if not isinstance(h, dict) or not all(
                    isinstance(h.get(k), t) and (t is not bool or type(h.get(k)) is bool)
                    for k, t in _HOOK_RUN_KEYS.items()):
                return f"a hook run {h!r} is not one"
        return None


@dataclass(frozen=True)
class KeptSnapshots:
    """The snapshots a point keeps for instant restore.

    ``disks`` maps each disk label to the file to read; ``paths`` are what to
    remove when they expire (files, or one btrfs subvolume for all disks).
    """

    recovery_point: str
    vm: str
    created: str
    disks: dict[str, str]
    paths: list[str]

    @classmethod
    def of(cls, point: PointRecord, disks: dict[str, str], paths: list[str]) -> KeptSnapshots:
        return cls(point.id, point.vm, point.created, dict(disks), list(paths))

    def to_json(self) -> bytes:
        return _dump({"recovery_point": self.recovery_point, "vm": self.vm,
                      "created": self.created, "disks": self.disks, "paths": self.paths})

    @classmethod
    def from_json(cls, data: bytes) -> KeptSnapshots:
        """Parse an entry; ``ValueError`` if it is not one."""
        body = _object(data)
        try:
            entry = cls(recovery_point=body["recovery_point"], vm=body.get("vm", ""),
                        created=body["created"], disks=dict(body.get("disks") or {}),
                        paths=list(body.get("paths") or []))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a kept-snapshots entry: {exc!r}") from None
        if not is_point_id(entry.recovery_point) or not isinstance(entry.created, str) \
                or _bad_time(entry.created):
            raise ValueError("not a kept-snapshots entry: its point id or created time is "
                             "malformed")
        return entry
