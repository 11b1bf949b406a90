"""The vault's registries beside its points: job history and kept snapshots.

- ``jobs/<job id>.json``: one :class:`JobRecord` per backup job (running, then
  its end), written durably before and after each step so a killed job is
  found and recovered by the next one.
- ``snapshots/<point id>.json``: the :class:`KeptSnapshots` of a point (for
  instant restore), and what to remove when they expire.

The records themselves (their JSON layout) are in :mod:`cbt.format.records`.
"""

from __future__ import annotations

import contextlib
import os

from cbt.format.records import JobRecord, KeptSnapshots
from cbt.repo.vault import Vault

JOBS_DIR = "jobs"
SNAPSHOTS_DIR = "snapshots"


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
