"""The vault's registries beside its points: job history and kept snapshots.

- ``jobs/<job id>.json``: one :class:`JobRecord` per backup job (running, then
  its end), written durably before and after each step so a killed job is
  found and recovered by the next one.
- ``snapshots/<point id>.json``: the :class:`KeptSnapshots` of a point (for
  instant restore), and what to remove when they expire.

Both are JSON with sorted keys, indented by one, and a final newline; they
carry no magic or checksum (format 1).  A key this cbt does not know is kept
as it is when a record is rewritten.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from cbt.format.records import PointRecord
from cbt.repo.vault import Vault

JOBS_DIR = "jobs"
SNAPSHOTS_DIR = "snapshots"


def _dump(body: dict[str, Any]) -> bytes:
    return (json.dumps(body, sort_keys=True, indent=1) + "\n").encode()


def _object(data: bytes) -> dict[str, Any]:
    body = json.loads(data)
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
             "disks", "error", "hook_pending", "pid", "slot", "start_ns")
_PUBLIC_JOB_KEYS = _JOB_KEYS[:10]


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
    hook_pending: bool = False  # between the pre hook's start and the post hook's end
    pid: int | None = None
    slot: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys of another cbt, kept as read

    def to_dict(self) -> dict[str, Any]:
        """The keys of ``cbt jobs --json`` for this job."""
        body = self._body()
        return {k: body[k] for k in _PUBLIC_JOB_KEYS}

    def to_json(self) -> bytes:
        return _dump({**self.extra, **self._body()})

    def _body(self) -> dict[str, Any]:
        return {"id": self.id, "vm": self.vm, "policy": self.policy, "start": self.start,
                "end": self.end, "status": self.status, "consistency": self.consistency,
                "recovery_point": self.recovery_point,
                "disks": [d.to_dict() for d in self.disks], "error": self.error,
                "hook_pending": self.hook_pending, "pid": self.pid, "slot": self.slot,
                "start_ns": self.start_ns}

    @classmethod
    def from_json(cls, data: bytes) -> JobRecord:
        """Parse a record; ``ValueError`` if it is not one (a key missing, a wrong type)."""
        body = _object(data)
        try:
            return cls(
                id=body["id"], vm=body["vm"], policy=body.get("policy"),
                start=body.get("start", ""), start_ns=body.get("start_ns", 0),
                status=body.get("status", "running"), end=body.get("end"),
                consistency=body.get("consistency"),
                recovery_point=body.get("recovery_point"),
                disks=[JobDisk.from_dict(d) for d in body.get("disks") or []],
                error=body.get("error"), hook_pending=bool(body.get("hook_pending")),
                pid=body.get("pid"), slot=body.get("slot"),
                extra={k: v for k, v in body.items() if k not in _JOB_KEYS})
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a job record: {exc!r}") from None


def job_name(job_id: str) -> str:
    return f"{JOBS_DIR}/{job_id}.json"


def save_job(vault: Vault, record: JobRecord) -> None:
    vault.storage.put(job_name(record.id), record.to_json())


def list_jobs(vault: Vault, vm: str | None = None) -> list[JobRecord]:
    """Every recorded job (of ``vm``, or all), oldest first; unreadable records skipped."""
    out = []
    for name in vault.storage.list(JOBS_DIR):
        if not name.endswith(".json") or os.path.basename(name).startswith("."):
            continue
        try:
            rec = JobRecord.from_json(vault.storage.get(name))
        except (ValueError, OSError):
            continue
        if vm is None or rec.vm == vm:
            out.append(rec)
    return sorted(out, key=lambda r: (r.start, r.start_ns, r.id))


# -- kept snapshots ----------------------------------------------------------------------


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
            return cls(recovery_point=body["recovery_point"], vm=body.get("vm", ""),
                       created=body["created"], disks=dict(body.get("disks") or {}),
                       paths=list(body.get("paths") or []))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a kept-snapshots entry: {exc!r}") from None


def kept_name(point_id: str) -> str:
    return f"{SNAPSHOTS_DIR}/{point_id}.json"


def register_snapshots(vault: Vault, entry: KeptSnapshots) -> None:
    """Record a point's kept snapshots (instant restore; expired by prune)."""
    vault.storage.put(kept_name(entry.recovery_point), entry.to_json())


def kept_snapshots(vault: Vault) -> dict[str, KeptSnapshots]:
    """Point id -> its kept snapshots, for every point that keeps some."""
    out = {}
    for name in vault.storage.list(SNAPSHOTS_DIR):
        if name.endswith(".json") and not os.path.basename(name).startswith("."):
            with contextlib.suppress(ValueError, OSError):
                entry = KeptSnapshots.from_json(vault.storage.get(name))
                out[entry.recovery_point] = entry
    return out
