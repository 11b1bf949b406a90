"""The Python API: what other tools import, and what the command line calls.

``cbt.Vault`` is the repository's vault (:class:`cbt.repo.vault.Vault`: open,
points, manifests) with the operations on top: ``backup``, ``restore``,
``verify``.  ``cbt.scan`` and ``cbt.diff`` are the scan and diff operations.
Every name here is re-exported by ``cbt`` itself, loaded on first use.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from typing import TYPE_CHECKING

from cbt.repo.keys import Passphrase
from cbt.repo.vault import NotAVaultError, VaultVersionError
from cbt.repo.vault import Vault as _RepoVault
from cbt.source.disks import DiskSpec, parse_disk_arg
from cbt.source.scan import DEFAULT_BLOCK_SIZE

if TYPE_CHECKING:
    from distributed import Client

    from cbt.format.manifest import Manifest
    from cbt.format.records import PointRecord
    from cbt.ops.backup import BackupProgress
    from cbt.ops.changeset import ChangeSet
    from cbt.ops.copy import CopyResult
    from cbt.ops.diff import PointDiff, Source
    from cbt.ops.restore import RestoreResult
    from cbt.ops.verify import VerifyResult
    from cbt.source.scan import PendingScan


class Vault(_RepoVault):
    """A vault, with the backup, restore and verify operations."""

    def backup(self, vm: str, disks: Sequence[DiskSpec | str | os.PathLike[str]],
               block_size: int | None = None, workers: int | None = None,
               progress: BackupProgress | None = None, wait: float = 0.0,
               created: str | None = None,
               consistency: tuple[str, str] = ("crash", "live read"),
               executor: Executor | Client | None = None, slot: str | None = None,
               early: PendingScan | None = None, full_scan: bool = False,
               verify_fraction: float | None = None,
               hints: Mapping[str, str | os.PathLike[str]] | None = None,
               hosts: Mapping[str, str] | None = None) -> PointRecord:
        """Back up ``disks`` (``DiskSpec``s, ``LABEL=PATH`` or ``PATH`` strings) of ``vm``.

        ``hints``: a hint file (``cbt backup --changed-ranges``) by disk label;
        ``full_scan`` hashes every allocated block whatever a source says;
        ``verify_fraction`` (0 to 1, default 1/32) of the blocks a source calls
        unchanged is re-hashed as a check.  ``executor`` runs the shards: any Executor,
        or a ``distributed.Client`` (:mod:`cbt.jobs.dask_executor`), whose workers on
        each disk's host (``hosts``: label -> host; default the caller's own host) read
        it.  See :class:`cbt.ops.backup.BackupRequest` for the arguments.
        """
        from cbt.format.records import check_point_time
        from cbt.ops.backup import BackupRequest, backup
        from cbt.source.changes import DEFAULT_VERIFY_FRACTION

        if created is not None:  # before any work: the point's id carries its time
            check_point_time(created)
        specs = [d if isinstance(d, DiskSpec) else parse_disk_arg(os.fspath(d)) for d in disks]
        if executor is not None:  # (a Dask client made an Executor; not imported otherwise)
            from cbt.jobs.dask_executor import as_executor

            executor = as_executor(executor)
        return backup(self, BackupRequest(
            vm, specs, block_size=block_size, workers=workers, progress=progress, wait=wait,
            created=created, consistency=consistency, executor=executor, slot=slot,
            early=early, full_scan=full_scan,
            verify_fraction=DEFAULT_VERIFY_FRACTION if verify_fraction is None else verify_fraction,
            hints={k: os.fspath(v) for k, v in (hints or {}).items()}, hosts=hosts or {}))

    def restore(self, point: str, to: str | os.PathLike[str], force: bool = False,
                workers: int | None = None, progress: Callable[[int, int], None] | None = None,
                disk: str | None = None, in_place: bool = False,
                assume_zeroed: bool = False, instant: bool = False,
                verify_snapshot: bool = True, mode: int = 0o600,
                format: str = "raw") -> RestoreResult:
        """Restore every disk of ``point`` into directory ``to``, or one ``disk`` to ``to``.

        See :class:`cbt.ops.restore.RestoreRequest` for the arguments;
        ``.to_dict()`` of the result is ``cbt restore --json``.
        """
        from cbt.ops.restore import RestoreRequest, restore

        return restore(self, RestoreRequest(
            point, to, disk=disk, force=force, in_place=in_place, assume_zeroed=assume_zeroed,
            workers=workers, progress=progress, instant=instant,
            verify_snapshot=verify_snapshot, mode=mode, format=format))

    def copy(self, to: _RepoVault, vm: str | None = None, points: Sequence[str] = (),
             wait: float = 0.0, progress: Callable[[int, int], None] | None = None
             ) -> CopyResult:
        """Copy points of this vault (``points``, else all, of ``vm`` if given) into vault
        ``to``, sending only the blocks it lacks (:mod:`cbt.ops.copy`)."""
        from cbt.ops.copy import copy

        return copy(self, to, vm, points, wait, progress)

    def verify(self, point: str | None = None, data: bool = False) -> VerifyResult:
        """Check points (all, or one) and optionally every stored block (:mod:`cbt.ops.verify`)."""
        from cbt.ops.verify import verify

        return verify(self, point, data)


def scan(path: str | os.PathLike[str], block_size: int = DEFAULT_BLOCK_SIZE,
         workers: int | None = None,
         progress: Callable[[int, int], None] | None = None) -> Manifest:
    """Hash every block of a disk or image: a :class:`~cbt.format.manifest.Manifest`."""
    from cbt.source.scan import scan as _scan

    return _scan(path, block_size, workers, progress)


def diff(a: Source, b: Source, block_size: int | None = None, workers: int | None = None,
         progress: Callable[[int, int], None] | None = None,
         passphrase: Passphrase | None = None) -> ChangeSet | PointDiff:
    """Changed blocks between two images, devices, manifests or points.

    ``passphrase`` unlocks an encrypted vault named as ``VAULT::POINT`` (None:
    from ``CBT_PASSWORD_FILE`` or ``CBT_PASSWORD``).  See :func:`cbt.ops.diff.diff`.
    """
    from cbt.ops.diff import diff as _diff

    return _diff(a, b, block_size, workers, progress, passphrase)


__all__ = ["DEFAULT_BLOCK_SIZE", "NotAVaultError", "Vault", "VaultVersionError", "diff", "scan"]
