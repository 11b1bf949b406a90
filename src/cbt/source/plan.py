"""The shard planner: which blocks to read, and how to share them between workers.

1. A source's allocated extents become merged ranges of blocks
   (:func:`block_ranges`): a block touched by any extent is read (the part in a
   hole reads as zeros), a block wholly in a hole never is.
2. :func:`bytes_to_read` is what reading those ranges costs: every block in
   full but the last block of the disk, which ends where the disk does.
3. :func:`plan_shards` cuts the ranges of one or more disks into shards of
   about equal bytes: one quota for the whole run, every disk at least one
   shard, a large disk several.  There may be a few more shards than workers
   (two disks of 1.7 and 0.9 GB on two cores make three); the kernel shares
   the cores, and all finish together.

Scan, backup and diff all plan with these.  No numpy here (``cbt scan``
start-up time counts).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import NamedTuple

BlockRange = tuple[int, int]  # [first block, end block)


def default_workers() -> int:
    """One worker per core this process may run on."""
    return len(os.sched_getaffinity(0)) or 1


def block_ranges(extents: list[tuple[int, int]], block_size: int) -> list[BlockRange]:
    """Merged ranges of blocks touched by any extent (partly counts)."""
    out: list[BlockRange] = []
    for start, end in sorted(extents):
        if end <= start:
            continue
        lo, hi = start // block_size, -(-end // block_size)
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def bytes_to_read(ranges: Sequence[BlockRange], block_size: int, size: int) -> int:
    """Bytes read by reading ``ranges`` of a disk of ``size`` bytes (its last block is short)."""
    return sum(min(hi * block_size, size) - lo * block_size for lo, hi in ranges)


def split_ranges(ranges: list[BlockRange], parts: int) -> list[list[BlockRange]]:
    """Cut ``ranges`` into at most ``parts`` shards of nearly equal block counts."""
    total = sum(hi - lo for lo, hi in ranges)
    parts = max(1, min(parts, total))
    if parts == 1:
        return [ranges] if total else []
    quota = -(-total // parts)
    return split_ranges_at(ranges, range(quota, total, quota))


def split_ranges_at(ranges: list[BlockRange], cuts: Iterable[int]) -> list[list[BlockRange]]:
    """Cut ``ranges`` before each of the rows ``cuts`` (increasing positions among the
    blocks of ``ranges``, counted from 0): ``len(cuts) + 1`` shards, none empty (a cut at
    0, at the end or repeated makes none)."""
    shards: list[list[BlockRange]] = [[]]
    at = 0  # the row of ``lo``
    upcoming = iter(cuts)
    cut = next(upcoming, None)
    for lo, hi in ranges:
        while lo < hi:
            while cut is not None and cut <= at:  # (a cut here, or one already passed)
                if shards[-1]:
                    shards.append([])
                cut = next(upcoming, None)
            take = hi - lo if cut is None else min(hi - lo, cut - at)
            shards[-1].append((lo, lo + take))
            lo += take
            at += take
    return shards if shards[-1] else shards[:-1]


class DiskPlan(NamedTuple):
    """What to read of one disk: its block ranges, in its block size."""

    ranges: list[BlockRange]
    block_size: int
    size: int

    @property
    def to_read(self) -> int:
        return bytes_to_read(self.ranges, self.block_size, self.size)


class Shard(NamedTuple):
    """One worker's share of one disk."""

    disk: int  # position in the planned disk list
    ranges: list[BlockRange]

    @property
    def blocks(self) -> int:
        return sum(hi - lo for lo, hi in self.ranges)


def plan_shards(disks: Sequence[DiskPlan], parts: int) -> list[Shard]:
    """Shards of about equal bytes over all ``disks``: every disk at least one
    (an empty one for a disk with nothing to read), in disk order."""
    quota = max(1, -(-sum(d.to_read for d in disks) // max(1, parts)))
    out: list[Shard] = []
    for i, d in enumerate(disks):
        pieces = split_ranges(d.ranges, max(1, -(-d.to_read // quota))) or [[]]
        out.extend(Shard(i, r) for r in pieces)
    return out
