"""Index segments as tests read, find and rewrite them: through cbt's own paged format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cbt.format.paged_index import TRAILER_SIZE, PagedSegment
from cbt.repo.index import open_paged
from cbt.repo.segments import first_copies, write_paged
from cbt.repo.vault import Vault


def opened(vault: Vault, name: str) -> PagedSegment:
    return open_paged(vault.storage, name, vault.cipher)


def read_paged(vault: Vault, name: str) -> dict[str, Any]:
    """Every entry of a paged segment: digests (n, 32), pack (numbers into pack_ids),
    pack_ids, offset, stored, raw."""
    seg = opened(vault, name)
    chunks = list(seg.chunks())
    cols = {k: np.concatenate([c[k] for c in chunks]) if chunks else np.zeros(0)
            for k in ("digests", "pack", "offset", "stored", "raw")}
    cols["digests"] = cols["digests"].reshape(-1, 32)
    return {**cols, "pack_ids": list(seg.pack_ids)}


def paged_names(vault: Vault) -> list[str]:
    return [n for n in vault.segment_names() if vault.is_paged_segment(n)]


def largest(vault: Vault) -> str:
    """The paged segment with the most entries."""
    return max(paged_names(vault), key=lambda n: opened(vault, n).n)


def holding(vault: Vault, digest: bytes) -> str:
    """The paged segment holding ``digest``."""
    q = np.frombuffer(digest, np.uint8).reshape(1, 32)
    for name in paged_names(vault):
        if opened(vault, name).lookup(q)[0] >= 0:
            return name
    raise AssertionError("digest in no segment")


def rewrite(vault: Vault, name: str, entries: dict[str, Any]) -> None:
    """Write ``entries`` (segment form: digests, pack_uuid, offset, stored, raw) as the
    segment ``name``, replacing it: a well-formed segment saying what the test wants."""
    kept = first_copies(entries)
    write_paged(vault, name, [kept], len(kept["offset"]))


def head_fraction(path: Path) -> float:
    """Where (as a fraction of the file) a byte of the segment's head lies: flipping it
    damages the segment for every reader that opens it."""
    size = path.stat().st_size
    return (size - TRAILER_SIZE - 8) / size
