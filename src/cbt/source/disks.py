"""The disks of a backup: what to read.

1. :class:`DiskSpec` names a disk (label, path, and the snapshot to read it
   from, or the NBD export that serves its point-in-time view);
   :func:`parse_disk_arg` reads ``LABEL=PATH`` or ``PATH``.
2. :meth:`DiskSpec.open` makes it a block source: the snapshot, or the live
   disk itself (:class:`cbt.source.image.ImageSource`), or the NBD export
   (:class:`cbt.source.nbd.NbdSource`: a QEMU disk).
3. The early scan of an incremental backup (:mod:`cbt.ops.early_scan`)
   hashes these disks before numpy loads.

This module imports neither numpy nor pyarrow (start-up time counts).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cbt.format.records import check_name
from cbt.source.base import BlockSource
from cbt.source.image import open_image
from cbt.source.nbd import NbdSource


@dataclass(frozen=True)
class NbdExport:
    """Where a disk's point-in-time view is served over NBD (QEMU, ``qemu-nbd``).

    ``bitmaps``: dirty bitmaps to negotiate on the first connection (a server
    that takes one client at a time: ``qemu-nbd`` without ``--shared``).
    """

    socket: str
    export: str = ""
    bitmaps: tuple[str, ...] = ()


@dataclass(frozen=True)
class DiskSpec:
    """A disk to back up: its label, its path, and where to read it (a snapshot)."""

    label: str
    path: str
    read_from: str | None = None  # a snapshot of ``path``; None reads ``path`` itself
    # the disk's point-in-time view over NBD (a QEMU disk): read instead of any path;
    # ``path`` then only names the disk in the point (its image file, or ``qemu:NODE``)
    nbd: NbdExport | None = None

    @property
    def source(self) -> str:
        return self.read_from or self.path

    @property
    def live(self) -> bool:
        """Read while in use (no snapshot): a block may change between hash and copy."""
        if self.nbd is not None:
            return False
        return self.read_from is None or self.read_from == self.path

    def open(self) -> BlockSource:
        """The block source to read: the NBD view, the snapshot, or the disk itself (live)."""
        if self.nbd is not None:
            return NbdSource(self.nbd.socket, self.nbd.export, live=False,
                             bitmaps=self.nbd.bitmaps)
        return open_image(self.source, live=self.live)


def parse_disk_arg(text: str) -> DiskSpec:
    """``PATH`` or ``LABEL=PATH`` (split at the first ``=`` only if a valid label precedes it)."""
    from cbt.format.records import NAME_RE

    label, sep, rest = text.partition("=")
    if sep and NAME_RE.match(label) and rest:
        return DiskSpec(label, rest)
    stem = Path(text).name
    stem = stem.rsplit(".", 1)[0] if "." in stem[1:] else stem
    return DiskSpec(check_name("disk label", stem), text)
