"""The vault's registries beside its points: job history and kept snapshots.

- ``jobs/<job id>.json``: one record per backup job (running, then its end),
  written durably before and after each step so a killed job is found and
  recovered by the next one.
- ``snapshots/<point id>.json``: the snapshots a point keeps for instant
  restore, and what to remove when they expire.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

from cbt.format.records import PointRecord
from cbt.repo.vault import Vault

JOBS_DIR = "jobs"


def job_name(job_id: str) -> str:
    return f"{JOBS_DIR}/{job_id}.json"


def save_job(vault: Vault, record: dict[str, Any]) -> None:
    vault.storage.put(job_name(record["id"]),
                      (json.dumps(record, sort_keys=True, indent=1) + "\n").encode())


def list_jobs(vault: Vault, vm: str | None = None) -> list[dict[str, Any]]:
    """Every recorded job, oldest first."""
    out = []
    for name in vault.storage.list(JOBS_DIR):
        if not name.endswith(".json") or os.path.basename(name).startswith("."):
            continue
        try:
            rec = json.loads(vault.storage.get(name))
        except (ValueError, OSError):
            continue
        if vm is None or rec.get("vm") == vm:
            out.append(rec)
    return sorted(out, key=lambda r: (r.get("start", ""), r.get("start_ns", 0), r.get("id", "")))


def public_job(rec: dict[str, Any]) -> dict[str, Any]:
    """The keys of ``cbt jobs --json`` for one job."""
    return {k: rec.get(k) for k in ("id", "vm", "policy", "start", "end", "status",
                                    "consistency", "recovery_point", "disks", "error")}


def register_snapshots(vault: Vault, point: PointRecord, kept: dict[str, str],
                       paths: list[str]) -> None:
    """Record a point's kept snapshots (instant restore; expired by prune).

    ``kept`` maps each disk to the file to read; ``paths`` are what to remove
    when they expire (files, or one btrfs subvolume for all disks).
    """
    body = {"recovery_point": point.id, "vm": point.vm, "created": point.created,
            "disks": kept, "paths": paths}
    vault.storage.put(f"snapshots/{point.id}.json",
                      (json.dumps(body, sort_keys=True, indent=1) + "\n").encode())


def kept_snapshots(vault: Vault) -> dict[str, dict[str, Any]]:
    """Point id -> its registry entry, for every point with kept snapshots."""
    out = {}
    for name in vault.storage.list("snapshots"):
        if name.endswith(".json") and not os.path.basename(name).startswith("."):
            with contextlib.suppress(ValueError, OSError):
                body = json.loads(vault.storage.get(name))
                out[body["recovery_point"]] = body
    return out
