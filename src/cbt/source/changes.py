"""Change sources: what a disk's platform says changed since its previous point.

An incremental backup reads only what a change source calls changed (plus a
rotating sample of the rest, re-hashed to catch a source that lies); the hash
scan of every allocated block stays the always-correct fallback.

- ``fiemap``: a ``reflink`` snapshot against the kept tracking base of the
  disk's previous point: blocks whose extents are physically shared are
  unchanged.
- ``btrfs-send``: a ``btrfs`` snapshot against the kept base subvolume.
- ``hint-file``: ranges given by a tool that tracks writes itself
  (``cbt backup --changed-ranges LABEL=FILE``).
- ``hash``: no hint: every allocated block is read and hashed.

A :class:`ChangeHint` is what a source says about one disk; a
:class:`TrackingBase` identifies the base a point was made from, so the next
run can refuse a base that was replaced, rewritten or resized.
"""

from __future__ import annotations

from dataclasses import dataclass

from cbt.format.records import CHANGE_SOURCES, TrackingBase
from cbt.source.plan import BlockRange

__all__ = ["CHANGE_SOURCES", "ChangeHint", "TrackingBase"]

TRACKING_MODES = ("auto", "hash")  # a VM's ``change_tracking``
DEFAULT_VERIFY_FRACTION = 1 / 32  # a VM's ``verify_fraction``


@dataclass(frozen=True)
class ChangeHint:
    """What a change source says about one disk since its previous point.

    ``ranges``: the blocks (in the disk's backup block size, merged, sorted)
    that may have changed; every other block is unchanged.  ``None`` for
    ``hash``: no hint, read everything.  ``reason``: why the run fell back to
    ``hash`` when a source was wanted (``no tracking base``, ``base
    replaced``, ``disk resized``, ``--full-scan``...); None when it did not.
    """

    source: str
    ranges: tuple[BlockRange, ...] | None
    reason: str | None = None

    @classmethod
    def hash(cls, reason: str | None = None) -> ChangeHint:
        return cls("hash", None, reason)

    @property
    def tracked(self) -> bool:
        return self.ranges is not None
