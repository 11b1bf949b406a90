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
- ``qemu-bitmap``: a QEMU disk's persistent dirty bitmap of the previous point
  (``cbt-<point id>``), read over NBD (:mod:`cbt.source.qemu`, :mod:`cbt.source.nbd`).
- ``hash``: no hint: every allocated block is read and hashed.

A :class:`ChangeHint` is what a source says about one disk; a
:class:`TrackingBase` identifies the base a point was made from, so the next
run can refuse a base that was replaced, rewritten or resized.
"""

from __future__ import annotations

from dataclasses import dataclass

from cbt.core.durable import read_small_file
from cbt.core.errors import CbtValueError, untrusted_json
from cbt.format.records import CHANGE_SOURCES, TrackingBase
from cbt.source.plan import BlockRange

__all__ = ["CHANGE_SOURCES", "ChangeHint", "HintFile", "TrackingBase", "read_hint_file"]

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


# -- hint files (``cbt backup --changed-ranges LABEL=FILE``) ------------------------------

# A hint file larger than this is refused unread: parsed JSON costs about 230 bytes of
# memory per range, so 16 MiB (some 700,000 ranges of realistic offsets, at most 2.8
# million of the shortest) bounds what a hint can cost
MAX_HINT_FILE_BYTES = 16 << 20
MAX_HINT_RANGES = 1 << 22  # ranges in one hint file


@dataclass(frozen=True)
class HintFile:
    """A hint file, read and checked: the disk's sizes it names, and its changed blocks."""

    path: str
    size_a: int  # the disk's size at its previous point, as the file says
    size_b: int  # and now
    ranges: tuple[BlockRange, ...]  # changed blocks, merged, sorted

    def hint(self) -> ChangeHint:
        return ChangeHint("hint-file", self.ranges)


def read_hint_file(path: str, block_size: int, size: int) -> HintFile:
    """Read the hint file ``path`` (untrusted) for a disk of ``size`` bytes now, in blocks
    of ``block_size``.

    The shape of ``cbt diff --json``: ``block_size``, ``size_a``, ``size_b`` and
    ``ranges`` (``[[offset, length], ...]`` in bytes, sorted, not overlapping, any
    alignment: a block is changed when any part of a range touches it); other
    keys are ignored.  Anything wrong (unreadable, not a regular file, not JSON,
    wrong types, ranges empty, negative, overlapping, out of order or past
    ``size_b``, more than the disk can hold, ``size_b`` not the disk's size
    now) raises :class:`CbtValueError`: one line
    naming the file.
    """

    where = f"hint file {path}"
    try:
        data = read_small_file(path, MAX_HINT_FILE_BYTES, where)
    except FileNotFoundError as exc:
        raise CbtValueError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    try:
        doc = untrusted_json(data)
    except ValueError as exc:
        raise CbtValueError(f"{where}: not JSON ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(doc, dict):
        raise CbtValueError(f"{where}: not a JSON object")
    for key in ("block_size", "size_a", "size_b"):
        value = doc.get(key)
        if type(value) is not int or not 0 <= value < 2**63:
            raise CbtValueError(f"{where}: {key} is not a non-negative integer")
    if doc["block_size"] <= 0:
        raise CbtValueError(f"{where}: block_size is not positive")
    if doc["size_b"] != size:
        raise CbtValueError(f"{where}: size_b {doc['size_b']} is not the disk's size now "
                            f"({size} bytes)")
    ranges = _hint_ranges(doc.get("ranges"), doc["size_b"], block_size, where)
    return HintFile(path, doc["size_a"], doc["size_b"], ranges)


def _hint_ranges(raw: object, size: int, block_size: int, where: str) -> tuple[BlockRange, ...]:
    """The changed blocks of a hint file's ``ranges`` (checked against ``size``)."""
    import numpy as np

    if not isinstance(raw, list):
        raise CbtValueError(f"{where}: ranges is not a list")
    most = min(MAX_HINT_RANGES, size)  # (ranges that do not overlap, none empty)
    if len(raw) > most:
        raise CbtValueError(f"{where}: {len(raw)} ranges, more than a disk of {size} bytes "
                            f"can hold (at most {most})")
    for k, r in enumerate(raw):
        if (type(r) is not list or len(r) != 2 or type(r[0]) is not int
                or type(r[1]) is not int):
            raise CbtValueError(f"{where}: range {k} is not [offset, length] in integers")
        if not (0 <= r[0] < 2**63 and 0 < r[1] < 2**63):
            raise CbtValueError(f"{where}: range {k} {r} is empty, negative or too large")
    if not raw:
        return ()
    arr = np.array(raw, dtype=np.int64).reshape(-1, 2)
    ends = arr[:, 0].astype(np.uint64) + arr[:, 1].astype(np.uint64)  # (< 2**64: no overflow)
    past = np.nonzero(ends > size)[0]
    if len(past):
        k = int(past[0])
        raise CbtValueError(f"{where}: range {k} {raw[k]} ends past the disk's end "
                            f"({size} bytes)")
    off, end = arr[:, 0], ends.astype(np.int64)
    bad = np.nonzero(off[1:] < end[:-1])[0]
    if len(bad):
        k = int(bad[0]) + 1
        raise CbtValueError(f"{where}: range {k} {raw[k]} overlaps or precedes range {k - 1}")
    lo, hi = off // block_size, -(-end // block_size)
    # merged: a new run starts where a range begins past every block before it
    starts = np.r_[True, lo[1:] > np.maximum.accumulate(hi)[:-1]]
    first = np.nonzero(starts)[0]
    run_hi = np.maximum.reduceat(hi, first)
    return tuple(zip(lo[first].tolist(), run_hi.tolist(), strict=True))
