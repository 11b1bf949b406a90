"""The early scan of an incremental backup, started before anything heavy loads.

The disks of an incremental backup have their block size fixed by their first
backup, so the command line can start hashing them before it has imported
numpy, taken the vault's lock or loaded its index (together about a third of a
second).  The backup then takes the digests from the finished scan and reads
only the blocks the vault lacks.  A disk (or a snapshot) may change meanwhile,
as a live disk may during any read: each block is recorded as it was when it
was read, and a block that is stored is hashed again as it is copied.  The
backup drops the early scan, and hashes as usual, when it waited more than a
second for the vault's lock (the scan would be too old), when the scan failed,
or when its digests are not keyed as the vault's block ids are.

An encrypted vault's block ids are keyed BLAKE3: the scan hashes with the
vault's id key, so it needs the vault unlocked (pass the opened vault, which
the backup then uses too: one passphrase, one key derivation).

This module imports neither numpy nor pyarrow (start-up time counts).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence

from cbt.core.errors import CbtError
from cbt.repo.keys import Passphrase
from cbt.repo.vault import Vault
from cbt.source.disks import DiskSpec
from cbt.source.scan import PendingScan, start_scan


def start_early_scan(vault: Vault | str | os.PathLike[str], vm: str, disks: Sequence[DiskSpec],
                     block_size: int | None = None, workers: int | None = None,
                     passphrase: Passphrase | None = None,
                     skip: Collection[str] = ()) -> PendingScan | None:
    """Start scanning the disks that have a previous point (None: nothing to start).

    ``skip``: labels of disks not to scan: those a change source tracks (a hint
    file), which read only what changed.

    ``vault`` is the opened vault, or its path (opened here; an encrypted one
    with ``passphrase``, else from the environment).  Anything unexpected (no
    vault, no passphrase, an unreadable disk, a block size the backup will
    refuse) starts nothing: the backup itself then reports it properly.
    """
    try:
        opened = vault if isinstance(vault, Vault) else Vault.open(vault, passphrase)
        prev = opened.latest(vm)
        if prev is None:
            return None
        wanted = []
        for spec in disks:
            parent = prev.disk(spec.label)
            if spec.label in skip or spec.nbd is not None or parent is None or (
                    block_size and block_size != parent.block_size):
                continue
            wanted.append((spec.source, parent.block_size))
        return start_scan(wanted, workers, key=opened.id_key) if wanted else None
    except (CbtError, OSError, ValueError):
        return None
