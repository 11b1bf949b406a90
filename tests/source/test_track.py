"""Change tracking from extent maps (``cbt.source.track``), on real XFS (reflink=1) and
btrfs loop file systems.

Truth: the base and the new clone compared byte for byte (``helpers.tracking``).
Every changed block must be in the ranges, and since every write changes each byte
it touches (random data, XORed), no block outside them: no false positive at the
file system's block size either.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import MIB, PAGE
from helpers.system import loop_fs
from helpers.tracking import (
    blocks_of,
    btrfs,
    changed_blocks,
    coarser,
    fs_area,
    make_tracked_disk,
    mutate,
    punch_hole,
    xor_write,
)

from cbt.source.snapshot import reflink
from cbt.source.track import FiemapError, changed_ranges, extents, identify, subvolume_uuid

SIZE = 24 * MIB + 5000  # a short last block
HOLES = ((3 * MIB, MIB), (10 * MIB + 8 * PAGE, 5 * PAGE))


@pytest.fixture
def area(fs: tuple[str, Path], request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh folder of the test on the shared file system (a subvolume on btrfs)."""
    with fs_area(*fs, request.node.name) as d:
        yield d


def clone(kind: str, disk: Path, name: str) -> Path:
    """The disk as it is now: a FICLONE clone beside it."""
    dst = disk.with_name(name)
    reflink(str(disk), str(dst))
    return dst


def check(base: Path, new: Path) -> None:
    """changed_ranges at the fs block size equals the truth; at larger blocks, its cover."""
    truth = changed_blocks(base, new, PAGE)
    got = blocks_of(changed_ranges(str(base), str(new), PAGE))
    assert got - truth == set(), f"false positives: {sorted(got - truth)[:20]}"
    assert truth - got == set(), f"missed: {sorted(truth - got)[:20]}"
    for bs in (16 * 1024, 64 * 1024):
        assert blocks_of(changed_ranges(str(base), str(new), bs)) == coarser(truth, bs // PAGE)


@pytest.mark.root
@pytest.mark.parametrize("seed", [1, 2])
def test_random_patterns_against_a_reflink_clone(fs: tuple[str, Path], area: Path,
                                                  seed: int) -> None:
    kind, _ = fs
    disk = make_tracked_disk(area / "disk.img", SIZE, seed, HOLES)
    base = clone(kind, disk, "base.img")
    assert changed_ranges(str(base), str(clone(kind, disk, "same.img")), PAGE) == []
    mutate(disk, seed, truncate_tail=300_001 if seed == 2 else 0)
    new = clone(kind, disk, "new.img")
    assert len(changed_blocks(base, new, PAGE)) > 60
    check(base, new)
    # and again from that clone: a second round of changes against the new base
    mutate(disk, seed + 100)
    check(new, clone(kind, disk, "third.img"))



FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_ZERO_RANGE = 0x08, 0x10
FALLOC_FL_INSERT_RANGE, FALLOC_FL_UNSHARE_RANGE = 0x20, 0x40


def _fallocate(path: Path, mode: int, offset: int, length: int) -> bool:
    """fallocate(2) with ``mode``; False where the file system does not do it."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fd = os.open(path, os.O_RDWR)
    try:
        return libc.fallocate(fd, mode, offset, length) == 0
    finally:
        os.close(fd)


@pytest.mark.root
def test_fallocate_modes_direct_and_mapped_writes(fs: tuple[str, Path], area: Path) -> None:
    """What else changes a disk (a guest, qemu-img, a defragmenter): zeroed ranges
    (ZERO_RANGE, also KEEP_SIZE), a range collapsed then another inserted (the size is
    kept, every block after them moved), UNSHARE, preallocation inside a hole and past
    the end, O_DIRECT writes and writes through a shared mapping: no change missed."""
    import mmap

    kind, _ = fs
    disk = make_tracked_disk(area / "disk.img", SIZE, 11, HOLES)
    fsb = os.statvfs(area).f_bsize
    base = clone(kind, disk, "base.img")
    for rnd, new_name in enumerate(("n1.img", "n2.img", "n3.img")):
        _fallocate(disk, FALLOC_FL_ZERO_RANGE, 5 * MIB + 100 + rnd, 70_000)
        _fallocate(disk, FALLOC_FL_ZERO_RANGE | 0x01, 7 * MIB + 3 * fsb, 2 * fsb)
        _fallocate(disk, FALLOC_FL_UNSHARE_RANGE, 9 * MIB, MIB)
        _fallocate(disk, 0x01, 3 * MIB + PAGE, 2 * PAGE)  # inside the hole
        _fallocate(disk, 0x01, SIZE - 100, 5 * MIB)  # past the end
        if _fallocate(disk, FALLOC_FL_COLLAPSE_RANGE, (12 + rnd) * MIB, 4 * fsb):
            assert _fallocate(disk, FALLOC_FL_INSERT_RANGE, (2 + rnd) * MIB, 4 * fsb)
        assert os.path.getsize(disk) == SIZE
        fd = os.open(disk, os.O_RDWR | os.O_DIRECT)
        buf = mmap.mmap(-1, 2 * PAGE)
        buf.write(os.urandom(2 * PAGE))
        try:
            os.pwritev(fd, [buf], (15 + rnd) * MIB)
        finally:
            os.close(fd)
            buf.close()
        with open(disk, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
            at = 20 * MIB + 333 * (rnd + 1)
            m[at:at + 10] = bytes(b ^ 0xFF for b in m[at:at + 10])
        new = clone(kind, disk, new_name)
        truth = changed_blocks(base, new, PAGE)
        assert truth
        assert truth - blocks_of(changed_ranges(str(base), str(new), PAGE)) == set()
        base = new


@pytest.mark.root
def test_fresh_writes_are_seen_without_a_clone(fs: tuple[str, Path], area: Path) -> None:
    """Delayed allocation: writes not yet on disk are missing from the map unless it is
    synced first (FIEMAP_FLAG_SYNC); here the live file is compared at once."""
    kind, _ = fs
    disk = make_tracked_disk(area / "disk.img", SIZE, 5, HOLES)
    base = clone(kind, disk, "base.img")
    rng = np.random.default_rng(5)
    fd = os.open(disk, os.O_RDWR)
    try:
        for k in range(100):
            xor_write(fd, k * 200 * 1024 + 17, 1, rng)
    finally:
        os.close(fd)
    got = blocks_of(changed_ranges(str(base), str(disk), PAGE))
    assert got == changed_blocks(base, disk, PAGE)
    assert len(got) == 100


@pytest.mark.root
def test_btrfs_readonly_snapshots(tmp_path: Path) -> None:
    """Provider btrfs: the disk's file in two read-only snapshots of its subvolume."""
    with loop_fs(tmp_path, "btrfs") as mnt:
        area = mnt / "vm"
        btrfs("subvolume", "create", str(area))
        _btrfs_snapshots(mnt, area)


def _btrfs_snapshots(mnt: Path, area: Path) -> None:
    disk = make_tracked_disk(area / "disk.img", SIZE, 7, HOLES)
    btrfs("subvolume", "snapshot", "-r", str(area), str(mnt / f"{area.name}.base"))
    mutate(disk, 7, truncate_tail=123_457)
    btrfs("subvolume", "snapshot", "-r", str(area), str(mnt / f"{area.name}.new"))
    base, new = mnt / f"{area.name}.base" / "disk.img", mnt / f"{area.name}.new" / "disk.img"
    check(base, new)
    a, b = identify(str(base), str(base.parent)), identify(str(new), str(new.parent))
    assert a.kind == b.kind == "subvolume" and a.ino == b.ino  # a snapshot keeps inode numbers
    assert a.subvolume_uuid == subvolume_uuid(str(base.parent)) != b.subvolume_uuid


@pytest.mark.root
def test_hole_against_hole_and_data_against_hole(fs: tuple[str, Path], area: Path) -> None:
    kind, _ = fs
    disk = make_tracked_disk(area / "disk.img", 4 * MIB, 9, ((MIB, MIB),))
    base = clone(kind, disk, "base.img")
    punch_hole(disk, 3 * MIB, 2 * PAGE)  # a TRIM: data -> hole
    fd = os.open(disk, os.O_RDWR)
    try:  # hole -> data, one byte
        xor_write(fd, MIB + 5 * PAGE + 100, 1, np.random.default_rng(0))
    finally:
        os.close(fd)
    new = clone(kind, disk, "new.img")
    assert changed_ranges(str(base), str(new), PAGE) == [(768, 770), (261, 262)][::-1]


@pytest.mark.root
def test_sizes_must_match_and_links_are_not_followed(fs: tuple[str, Path], area: Path
                                                     ) -> None:
    kind, _ = fs
    disk = make_tracked_disk(area / "disk.img", MIB, 1)
    base = clone(kind, disk, "base.img")
    os.truncate(disk, 2 * MIB)
    with pytest.raises(FiemapError, match="sizes differ"):
        changed_ranges(str(base), str(disk), PAGE)
    (area / "link.img").symlink_to(base)
    with pytest.raises(FiemapError, match=r"link\.img"):
        changed_ranges(str(area / "link.img"), str(base), PAGE)
    with pytest.raises(OSError, match=r"link\.img"):
        identify(str(area / "link.img"))


@pytest.mark.root
@pytest.mark.slow
def test_a_file_of_100k_extents_is_mapped_fast(tmp_path: Path) -> None:
    """Unwritten (preallocated) extents every other page: 100k+ extents, no data (XFS)."""
    with loop_fs(tmp_path, "xfs") as mnt:
        _many_extents(mnt)


def _many_extents(area: Path) -> None:
    kind = "xfs"
    path = area / "many.img"
    n = 100_500
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 2 * n * PAGE)
        for k in range(n):
            os.posix_fallocate(fd, 2 * k * PAGE, PAGE)
    finally:
        os.close(fd)
    other = clone(kind, path, "many-clone.img")
    started = time.perf_counter()
    ext = extents(str(path))
    assert len(ext) >= n
    assert changed_ranges(str(path), str(other), PAGE) == []
    # the other way round: data written into every other preallocated page
    fd = os.open(other, os.O_RDWR)
    try:
        for k in range(0, n, 1000):
            os.pwrite(fd, b"x", 2 * k * PAGE)
    finally:
        os.close(fd)
    assert blocks_of(changed_ranges(str(path), str(other), PAGE)) == set(range(0, 2 * n, 2000))
    assert time.perf_counter() - started < 10, time.perf_counter() - started


@pytest.mark.root
def test_unwritten_extents_read_as_holes(fs: tuple[str, Path], area: Path) -> None:
    """A preallocated (unwritten) range reads zeros like a hole: unchanged against a hole
    or another unwritten range; data written into it is a change."""
    kind, _ = fs
    disk = make_tracked_disk(area / "disk.img", 4 * MIB, 3, ((MIB, MIB),))
    base = clone(kind, disk, "base.img")
    fd = os.open(disk, os.O_RDWR)
    try:
        os.posix_fallocate(fd, MIB, MIB)  # hole -> unwritten: still zeros
        xor_write(fd, MIB + 10 * PAGE, 1, np.random.default_rng(1))  # one page of data
    finally:
        os.close(fd)
    assert changed_ranges(str(base), str(disk), PAGE) == [(266, 267)]
    check(base, clone(kind, disk, "new.img"))


def test_opaque_extents_count_as_changed() -> None:
    """An extent whose physical address means nothing (UNKNOWN, DELALLOC, ENCODED,
    ENCRYPTED, NOT_ALIGNED, INLINE, TAIL) is a change even at the same address."""
    from cbt.source.track import Extents, _changed_segments

    def one(flags: int) -> Extents:
        u = np.array([0], dtype=np.uint64)
        return Extents(2 * PAGE, u, np.array([PAGE], dtype=np.uint64),
                       np.array([1 << 20], dtype=np.uint64), np.array([flags], dtype=np.uint32))

    assert len(_changed_segments(one(0), one(0))[0]) == 0
    assert len(_changed_segments(one(0x2000), one(0))[0]) == 0  # SHARED: irrelevant
    for flag in (0x2, 0x4, 0x8, 0x80, 0x100, 0x200, 0x400):
        s, e = _changed_segments(one(flag), one(0))
        assert (s.tolist(), e.tolist()) == ([0], [PAGE]), hex(flag)


@pytest.mark.root
def test_btrfs_compressed_extents_are_read(tmp_path: Path) -> None:
    """btrfs compression (ENCODED extents): the map cannot say, so everything is changed."""
    with loop_fs(tmp_path, "btrfs") as mnt:
        disk = mnt / "disk.img"
        disk.touch()
        subprocess.run(["chattr", "+c", str(disk)], check=True)
        with open(disk, "wb") as f:
            f.write(b"compress me " * (MIB // 12 + 1))
        base = clone("btrfs", disk, "base.img")
        ext = extents(str(base))
        encoded = (ext.flags & 0x8) != 0
        assert encoded.sum() >= 8, ext.flags
        want = set()
        for lo, hi in zip(ext.start[encoded].tolist(), ext.end[encoded].tolist(), strict=True):
            want |= set(range(lo // PAGE, -(-hi // PAGE)))
        new = clone("btrfs", disk, "new.img")
        assert blocks_of(changed_ranges(str(base), str(new), PAGE)) == want


@pytest.mark.root
def test_a_file_system_without_fiemap_is_an_error_then_a_hash_scan(tmp_path: Path) -> None:
    """tmpfs maps no extents: changed_ranges fails naming the file; a SnapshotSet whose
    base lies there falls back to a hash scan with that error as the reason."""
    from helpers.system import tmpfs

    from cbt.source.snapshot import SnapshotSet

    with tmpfs(tmp_path / "t", 64) as mnt:
        base, new = mnt / "os.base.img", mnt / "os.job.img"
        for p in (base, new):
            p.write_bytes(b"x" * 3 * PAGE)
        with pytest.raises(FiemapError, match=r"os\.base\.img.*FIEMAP"):
            changed_ranges(str(base), str(new), PAGE)
        snaps = SnapshotSet("web", "job", {"os": "reflink"}, {"os": str(new)},
                            bases={"os": (str(new), str(base))})
        hint = snaps.changes("os", PAGE, 3 * PAGE, identify(str(base)))
        assert hint.source == "hash" and "FIEMAP" in str(hint.reason), hint
        assert str(base) in str(hint.reason)
        assert "Errno" not in str(hint.reason), hint  # read in show and backup: words only
