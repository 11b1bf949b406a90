"""The vault's registries beside its points: job history and kept snapshots.

- ``jobs/<job id>.json``: one :class:`JobRecord` per backup job (running, then
  its end), written durably before and after each step so a killed job is
  found and recovered by the next one.
- ``snapshots/<point id>.json``: the :class:`KeptSnapshots` of a point (for
  instant restore), and what to remove when they expire.

In an encrypted vault both are sealed (kinds ``job`` and ``snapshots``) under
opaque names (:meth:`Vault.job_name <cbt.repo.vault.Vault.job_name>`,
:meth:`Vault.kept_name <cbt.repo.vault.Vault.kept_name>`).  A record that cannot
be read (damaged, or failing authentication) is skipped, and said so in
``warnings`` when the caller gives a list.

The records themselves (their JSON layout) are in :mod:`cbt.format.records`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from cbt.format.records import JobRecord, KeptSnapshots, is_job_id
from cbt.repo.vault import Vault

JOBS_DIR = "jobs"
SNAPSHOTS_DIR = "snapshots"
R = TypeVar("R")


def _record_names(vault: Vault, folder: str) -> list[str]:
    """The committed records in ``folder`` (temporary files skipped)."""
    suffix = vault.record_suffix
    return [n for n in vault.storage.list(folder)
            if n.endswith(suffix) and not n.rsplit("/", 1)[-1].startswith(".")]


def _read_records(vault: Vault, folder: str, what: str, parse: Callable[[bytes], R],
                  own_name: Callable[[R], str | None], warnings: list[str] | None) -> list[R]:
    """Every record of ``folder`` that parses and lies under the name the vault gives
    it (``own_name``: None when its id is malformed); others skipped and named."""
    kind = {JOBS_DIR: "job", SNAPSHOTS_DIR: "snapshots"}[folder]  # its sealed-file kind
    out = []
    for name in _record_names(vault, folder):
        try:
            rec = parse(vault.get_sealed(kind, name))
        except (ValueError, OSError) as exc:
            _skipped(warnings, what, vault.storage.where(name), exc)
            continue
        if own_name(rec) != name:
            _skipped(warnings, what, vault.storage.where(name),
                     ValueError("its id is malformed or not the one its file name says"))
            continue
        out.append(rec)
    return out


def _skipped(warnings: list[str] | None, what: str, where: str, exc: Exception) -> None:
    if warnings is not None:
        reason = str(exc) if where in str(exc) else f"{where}: {exc}"
        warnings.append(f"skipping unreadable {what} record: {reason}")


def save_job(vault: Vault, record: JobRecord) -> None:
    vault.put_sealed("job", vault.job_name(record.id), record.to_json())


def list_jobs(vault: Vault, vm: str | None = None,
              warnings: list[str] | None = None) -> list[JobRecord]:
    """Every recorded job (of ``vm``, or all), oldest first; unreadable records skipped
    (and named in ``warnings``)."""
    jobs = _read_records(vault, JOBS_DIR, "job", JobRecord.from_json,
                         lambda r: vault.job_name(r.id) if is_job_id(r.id, r.vm) else None,
                         warnings)
    out = [r for r in jobs if vm is None or r.vm == vm]
    return sorted(out, key=lambda r: (r.start, r.start_ns, r.id))


# -- kept snapshots ----------------------------------------------------------------------


def register_snapshots(vault: Vault, entry: KeptSnapshots) -> None:
    """Record a point's kept snapshots (instant restore; expired by prune)."""
    vault.put_sealed("snapshots", vault.kept_name(entry.recovery_point), entry.to_json())


def remove_kept(vault: Vault, point_id: str) -> None:
    """Forget a point's kept snapshots (their files are the caller's to remove)."""
    vault.storage.delete(vault.kept_name(point_id))


def kept_snapshots(vault: Vault,
                   warnings: list[str] | None = None) -> dict[str, KeptSnapshots]:
    """Point id -> its kept snapshots, for every point that keeps some; unreadable
    records skipped (and named in ``warnings``)."""
    entries = _read_records(vault, SNAPSHOTS_DIR, "kept-snapshot", KeptSnapshots.from_json,
                            lambda e: vault.kept_name(e.recovery_point), warnings)
    return {e.recovery_point: e for e in entries}
