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

from cbt.format.records import JobRecord, KeptSnapshots, is_job_id
from cbt.repo.vault import Vault

JOBS_DIR = "jobs"
SNAPSHOTS_DIR = "snapshots"


def _record_names(vault: Vault, folder: str) -> list[str]:
    """The committed records in ``folder`` (temporary files skipped)."""
    suffix = vault.record_suffix
    return [n for n in vault.storage.list(folder)
            if n.endswith(suffix) and not n.rsplit("/", 1)[-1].startswith(".")]


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
    out = []
    for name in _record_names(vault, JOBS_DIR):
        try:
            rec = JobRecord.from_json(vault.get_sealed("job", name))
        except (ValueError, OSError) as exc:
            _skipped(warnings, "job", vault.storage.where(name), exc)
            continue
        if not is_job_id(rec.id, rec.vm) or vault.job_name(rec.id) != name:
            _skipped(warnings, "job", vault.storage.where(name),
                     ValueError(f"job id {rec.id!r} is not a job of VM {rec.vm!r} named "
                                "by its file"))
            continue
        if vm is None or rec.vm == vm:
            out.append(rec)
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
    out = {}
    for name in _record_names(vault, SNAPSHOTS_DIR):
        try:
            entry = KeptSnapshots.from_json(vault.get_sealed("snapshots", name))
        except (ValueError, OSError) as exc:
            _skipped(warnings, "kept-snapshot", vault.storage.where(name), exc)
            continue
        if vault.kept_name(entry.recovery_point) != name:
            _skipped(warnings, "kept-snapshot", vault.storage.where(name),
                     ValueError(f"it names point {entry.recovery_point}, not its file's"))
            continue
        out[entry.recovery_point] = entry
    return out
