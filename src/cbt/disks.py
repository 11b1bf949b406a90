"""The disks of a backup: what to read, and the early scan of an incremental one.

1. :class:`DiskSpec` names a disk (label, path, and the snapshot to read it
   from); :func:`parse_disk_arg` reads ``LABEL=PATH`` or ``PATH``.
2. :func:`start_early_scan`: the disks of an incremental backup have their
   block size fixed by their first backup, so the command line can start
   hashing them before it has imported numpy, taken the vault's lock or
   loaded its index (together about a third of a second).  The backup then
   takes the digests from the finished scan and reads only the blocks the
   vault lacks.  A disk (or a snapshot) may change meanwhile, as a live disk
   may during any read: each block is recorded as it was when it was read, and
   a block that is stored is hashed again as it is copied.  The backup drops
   the early scan, and hashes as usual, when it waited more than a second for
   the vault's lock (the scan would be too old) or when the scan failed.

This module imports neither numpy nor pyarrow (start-up time counts).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cbt.vault.points import check_name

if TYPE_CHECKING:
    from cbt.scan import PendingScan


@dataclass(frozen=True)
class DiskSpec:
    """A disk to back up: its label, its path, and where to read it (a snapshot)."""

    label: str
    path: str
    read_from: str | None = None  # a snapshot of ``path``; None reads ``path`` itself

    @property
    def source(self) -> str:
        return self.read_from or self.path

    @property
    def live(self) -> bool:
        """Read while in use (no snapshot): a block may change between hash and copy."""
        return self.read_from is None or self.read_from == self.path


def parse_disk_arg(text: str) -> DiskSpec:
    """``PATH`` or ``LABEL=PATH`` (split at the first ``=`` only if a valid label precedes it)."""
    from cbt.vault.points import NAME_RE

    label, sep, rest = text.partition("=")
    if sep and NAME_RE.match(label) and rest:
        return DiskSpec(label, rest)
    stem = Path(text).name
    stem = stem.rsplit(".", 1)[0] if "." in stem[1:] else stem
    return DiskSpec(check_name("disk label", stem), text)


def start_early_scan(vault_root: str | os.PathLike[str], vm: str, disks: Sequence[DiskSpec],
                     block_size: int | None = None,
                     workers: int | None = None) -> PendingScan | None:
    """Start scanning the disks that have a previous point (None: nothing to start).

    Anything unexpected (no vault, an unreadable disk, a block size the backup
    will refuse) starts nothing: the backup itself then reports it properly.
    """
    from cbt.errors import CbtError
    from cbt.scan import start_scan
    from cbt.vault.vault import Vault

    try:
        prev = Vault.open(vault_root).latest(vm)
        if prev is None:
            return None
        wanted = []
        for spec in disks:
            parent = prev.disk(spec.label)
            if parent is None or (block_size and block_size != parent.block_size):
                continue
            wanted.append((spec.source, parent.block_size))
        return start_scan(wanted, workers) if wanted else None
    except (CbtError, OSError, ValueError):
        return None
