"""The disks of a backup: what to read.

1. :class:`DiskSpec` names a disk (label, path, and the snapshot to read it
   from); :func:`parse_disk_arg` reads ``LABEL=PATH`` or ``PATH``.
2. :meth:`DiskSpec.open` makes it a block source: the snapshot, or the live
   disk itself (:class:`cbt.source.image.ImageSource`).
3. The early scan of an incremental backup (:mod:`cbt.ops.early_scan`)
   hashes these disks before numpy loads.

This module imports neither numpy nor pyarrow (start-up time counts).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cbt.format.records import check_name
from cbt.source.image import ImageSource, open_image


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

    def open(self) -> ImageSource:
        """The block source to read: the snapshot, or the disk itself (live)."""
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
