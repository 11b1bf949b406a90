"""How an incremental's work is shared among its workers: after an early scan, by the blocks
that changed (what is compressed and stored), not by the bytes read.

Truth is numpy over the disks' bytes; the backups and restores are the real ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import KIB, MIB
from helpers.images import read
from helpers.vaults import FinishedScan
from hypothesis import given
from hypothesis import strategies as st

import cbt
from cbt.ops.backup import BackupRequest, backup, plan
from cbt.ops.early_scan import start_early_scan
from cbt.source.disks import DiskSpec
from cbt.source.plan import split_ranges_at
from cbt.source.scan import start_scan

BS = 16 * KIB


def _two_disks(tmp_path: Path) -> tuple[cbt.Vault, list[DiskSpec], dict[str, np.ndarray],
                                        np.ndarray]:
    """Disks a (8 MiB, unchanged on day 1) and b (8 MiB, every other run of 3 blocks
    rewritten on day 1, 40% of it); returns the vault after day 0, the specs, day 1's
    bytes, and which of b's blocks changed."""
    rng = np.random.default_rng(3)
    data = {}
    for label in ("a", "b"):
        data[label] = rng.integers(0, 256, 8 * MIB, np.uint8)
        data[label].tofile(tmp_path / f"{label}.img")
    specs = [DiskSpec(label, str(tmp_path / f"{label}.img")) for label in ("a", "b")]
    vault = cbt.Vault.init(tmp_path / "v")
    vault.backup("vm", specs, block_size=BS)
    n = 8 * MIB // BS
    changed = (np.arange(n) // 3) % 5 < 2
    for i in np.flatnonzero(changed):
        data["b"][i * BS:(i + 1) * BS] = rng.integers(0, 256, BS, np.uint8)
    data["b"].tofile(tmp_path / "b.img")
    return vault, specs, data, changed


def test_changes_in_one_disk_are_shared_by_the_workers(tmp_path: Path) -> None:
    """Cut by bytes read, disk b (where every change is) would be one worker's whole share;
    cut by work, it is two shards with half of its changed blocks each, and disk a (read
    already by the early scan, unchanged) one cheap shard.  The point is exact."""
    vault, specs, data, changed = _two_disks(tmp_path)
    scans = start_scan([(s.path, BS) for s in specs]).wait()
    planned = plan(vault, BackupRequest("vm", specs, early=FinishedScan(scans), workers=2))
    shards = {label: [s for s in planned.shards if s.label == label] for label in ("a", "b")}
    assert [s.ranges for s in shards["a"]] == [[(0, 8 * MIB // BS)]]
    assert len(shards["b"]) == 2
    rows = [b for s in shards["b"] for lo, hi in s.ranges for b in range(lo, hi)]
    assert rows == list(range(8 * MIB // BS)), "every block once, in order"
    each = [sum(int(changed[lo:hi].sum()) for lo, hi in s.ranges) for s in shards["b"]]
    assert sum(each) == changed.sum()
    assert all(abs(k - changed.sum() / 2) <= 2 for k in each), each

    point = backup(vault, BackupRequest("vm", specs, early=FinishedScan(scans), workers=2))
    assert {d.label: d.changed_blocks for d in point.disks} == {"a": 0, "b": changed.sum()}
    vault.restore(point.id, tmp_path / "out")
    for label in ("a", "b"):
        assert np.array_equal(read(tmp_path / "out" / f"{label}.img"), data[label]), label


def test_without_an_early_scan_the_cut_follows_the_bytes(tmp_path: Path) -> None:
    vault, specs, _, _ = _two_disks(tmp_path)
    planned = plan(vault, BackupRequest("vm", specs, workers=2))
    assert [(s.label, s.ranges) for s in planned.shards] == [
        ("a", [(0, 8 * MIB // BS)]), ("b", [(0, 8 * MIB // BS)])]


@given(st.lists(st.tuples(st.integers(0, 50), st.integers(1, 20)), max_size=6),
       st.lists(st.integers(0, 300), max_size=8))
def test_split_ranges_at_cuts_exactly_there(gaps: list[tuple[int, int]],
                                            cuts: list[int]) -> None:
    """The shards are the ranges, in order, cut before each row named (once: a cut at the
    start, the end, past it or repeated makes no empty shard)."""
    ranges, at = [], 0
    for gap, length in gaps:
        ranges.append((at + gap, at + gap + length))
        at += gap + length
    blocks = [b for lo, hi in ranges for b in range(lo, hi)]
    cuts = sorted(cuts)
    shards = split_ranges_at(ranges, cuts)
    rows = [[b for lo, hi in s for b in range(lo, hi)] for s in shards]
    assert [b for r in rows for b in r] == blocks
    assert all(rows) and all(lo < hi for s in shards for lo, hi in s)
    starts = [sum(len(r) for r in rows[:i]) for i in range(1, len(rows))]
    assert starts == sorted({c for c in cuts if 0 < c < len(blocks)})


@pytest.mark.parametrize("size", [0, 1 << 30], ids=["empty", "all-holes"])
def test_a_disk_with_no_data_beside_one_that_changed(tmp_path: Path, size: int) -> None:
    """A disk with nothing to read (an empty file, or one never written) has no rows for the
    work estimate: its incremental after an early scan is one empty shard, and the point
    restores both disks exactly."""
    data = tmp_path / "data.img"
    day0 = np.random.default_rng(0).integers(0, 256, MIB, np.uint8)
    day0.tofile(data)
    empty = tmp_path / "empty.img"
    with open(empty, "wb") as f:
        f.truncate(size)
    specs = [DiskSpec("data", str(data)), DiskSpec("empty", str(empty))]
    vault = cbt.Vault.init(tmp_path / "v")
    vault.backup("vm", specs, block_size=BS)
    day1 = day0.copy()
    day1[5 * BS:9 * BS] = np.random.default_rng(1).integers(0, 256, 4 * BS, np.uint8)
    day1.tofile(data)
    early = start_early_scan(vault.root, "vm", specs)
    point = backup(vault, BackupRequest("vm", specs, early=early, workers=2))
    assert {d.label: d.changed_blocks for d in point.disks} == {"data": 4, "empty": 0}
    vault.restore(point.id, tmp_path / "out")
    assert np.array_equal(read(tmp_path / "out" / "data.img"), day1)
    assert (tmp_path / "out" / "empty.img").stat().st_size == size
    assert not read(tmp_path / "out" / "empty.img").any()
