"""The scanner on sparse files, odd sizes, several workers and a loop block device.

Truth: the bytes written (mirrored in numpy) hashed with the ``blake3`` package,
and the 4 KiB pages the test allocated, which say which blocks lie wholly in a
hole.  Holes are made with ftruncate and FALLOC_FL_PUNCH_HOLE.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from helpers import PAGE
from helpers.cli import cbt as run_cli
from helpers.images import SparseImage
from helpers.images import read as read_image
from helpers.system import need, need_root_tools
from helpers.truth import DATA, HOLE, ZERO, fs_has_page_holes, truth_hash
from hypothesis import given
from hypothesis import strategies as st

import cbt
from cbt.source.image import open_image
from cbt.source.scan import scan_blocks
from cbt.source.synth import make_db_file, make_fs_image

KIB = 1024
MIB = 1024 * KIB
BLOCK_SIZES = [4 * KIB, 64 * KIB, MIB]


@pytest.fixture
def sparse_dir(tmp_path: Path) -> Path:
    need(fs_has_page_holes(tmp_path),
         f"the file system of {tmp_path} does not report 4 KiB holes via SEEK_HOLE")
    return tmp_path


def _hole_at_start(img: SparseImage) -> None:
    img.write_random(MIB + 3 * PAGE, img.size - MIB - 3 * PAGE, seed=1)


def _hole_in_middle(img: SparseImage) -> None:
    img.write_random(0, img.size, seed=2)
    img.punch(MIB, MIB + 5 * PAGE)  # [1M, 2M+20K): wholly covers 1 MiB block 1
    img.punch(3 * MIB - 64 * KIB, 64 * KIB)  # exactly one 64K block


def _hole_at_end(img: SparseImage) -> None:
    img.write_random(0, 2 * MIB + 1000, seed=3)  # then never written: a hole to EOF


def _partial_holes(img: SparseImage) -> None:
    img.write_random(0, img.size, seed=4)
    img.punch(64 * KIB + 8 * KIB, 8 * KIB)  # inside a 64K block
    img.punch(128 * KIB, 60 * KIB)  # a 64K block but its last page
    img.punch(MIB + 4 * KIB, MIB - 4 * KIB)  # a 1M block but its first page


def _unaligned_writes(img: SparseImage) -> None:
    img.write(70_000, b"\x01")  # one byte: one allocated page
    img.write(MIB - 10, bytes(range(1, 21)))  # straddles a 1 MiB boundary
    img.write(2 * MIB + 5, bytes(50 * KIB))  # zeros written: data, not a hole


def _zeros_and_data(img: SparseImage) -> None:
    img.write_random(0, MIB, seed=5)
    img.write(MIB, bytes(MIB))  # written zeros: ZERO blocks, read, never HOLE
    img.write_random(2 * MIB, img.size - 2 * MIB, seed=6)


def _never_written(img: SparseImage) -> None:
    pass


def _dense(img: SparseImage) -> None:
    img.write_random(0, img.size, seed=7)


LAYOUTS: dict[str, Callable[[SparseImage], None]] = {
    "hole-at-start": _hole_at_start,
    "hole-in-middle": _hole_in_middle,
    "hole-at-end": _hole_at_end,
    "partial-holes": _partial_holes,
    "unaligned-writes": _unaligned_writes,
    "zeros-and-data": _zeros_and_data,
    "never-written": _never_written,
    "dense": _dense,
}


def check_scan(m: cbt.Manifest, img: SparseImage, bs: int) -> None:
    digests, flags, read = img.expected(bs)
    assert m.block_size == bs and m.disk_size == img.size
    assert m.blocks == len(flags)
    assert m.flags.tolist() == flags.tolist()
    assert np.array_equal(m.digests, digests)
    assert m.bytes_read == read
    assert (m.data_blocks, m.zero_blocks, m.hole_blocks) == (
        int((flags == DATA).sum()), int((flags == ZERO).sum()), int((flags == HOLE).sum()))


@pytest.mark.parametrize("bs", BLOCK_SIZES, ids=["4K", "64K", "1M"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sparse_layouts(sparse_dir: Path, layout: str, bs: int) -> None:
    img = SparseImage(sparse_dir / "disk.img", 3 * MIB + 777)
    LAYOUTS[layout](img)
    assert np.array_equal(read_image(img.path), img.content)  # the test's own mirror is right
    has_holes = layout not in ("dense", "zeros-and-data")
    assert bool(img.holes(PAGE).any()) == has_holes
    for workers in (1, 2):
        check_scan(cbt.scan(img.path, bs, workers=workers), img, bs)


@pytest.mark.parametrize("layout", ["hole-at-start", "partial-holes", "zeros-and-data"])
def test_block_scan_buffers_and_summary(sparse_dir: Path, layout: str) -> None:
    """What ``cbt scan`` without -o reports comes from the raw buffers, not a Manifest;
    the buffers hold one row per block read (none for a block wholly in a hole)."""
    bs = 16 * KIB
    img = SparseImage(sparse_dir / "disk.img", 3 * MIB + 777)
    LAYOUTS[layout](img)
    digests, flags, read = img.expected(bs)
    n = len(flags)
    for workers in (1, 2, 3):
        r = scan_blocks(img.path, bs, workers=workers)
        held = flags != HOLE
        k = int(held.sum())
        assert len(r.digests) <= max(1, k * 32) and len(r.flags) <= max(1, k)
        assert r.digests[:k * 32] == digests[held].tobytes()
        assert r.flags[:k] == flags[held].tobytes()
        assert r.block_numbers().tolist() == np.nonzero(held)[0].tolist()
        s = r.summary()
        del s["seconds"]
        assert s == {"path": str(img.path.absolute()), "size": img.size, "block_size": bs,
                     "blocks": n, "data_blocks": int((flags == DATA).sum()),
                     "zero_blocks": int((flags == ZERO).sum()),
                     "hole_blocks": int((flags == HOLE).sum()), "bytes_read": read}


def test_empty_disk_summary(tmp_path: Path) -> None:
    (tmp_path / "empty.img").write_bytes(b"")
    s = scan_blocks(tmp_path / "empty.img", 4 * KIB).summary()
    assert (s["blocks"], s["data_blocks"], s["zero_blocks"], s["hole_blocks"]) == (0, 0, 0, 0)


def test_cli_scan_imports_neither_numpy_nor_pyarrow(tmp_path: Path) -> None:
    """Start-up time is part of every whole-process race: ``cbt scan`` without -o
    must not load the heavy modules (with -o it needs them and loads them)."""
    path = tmp_path / "disk.img"
    path.write_bytes(np.random.default_rng(5).integers(0, 256, 3 * MIB, np.uint8).tobytes())
    probe = ("import sys; from cbt.cli.main import main; code = main(sys.argv[1:]); "
             "print(sorted(m for m in ('numpy', 'pyarrow', 'rich') if m in sys.modules))")
    for extra, heavy in (([], "[]"), (["-o", str(tmp_path / "m.arrow")], "['numpy', 'pyarrow']")):
        out = subprocess.run([sys.executable, "-c", probe, "scan", "--json", str(path), *extra],
                             capture_output=True, text=True, check=True).stdout.splitlines()
        assert json.loads(out[0])["data_blocks"] == 3 * MIB // (64 * KIB)
        assert out[1] == heavy


def test_partial_hole_block_is_read_with_zeros(sparse_dir: Path) -> None:
    """A 64K block with an 8K hole inside is DATA, hashed over its bytes with zeros."""
    import blake3

    bs = 64 * KIB
    img = SparseImage(sparse_dir / "disk.img", 4 * bs)
    img.write_random(0, img.size, seed=11)
    img.punch(bs + 8 * KIB, 8 * KIB)
    m = cbt.scan(img.path, bs, workers=1)
    block = bytearray(img.content[bs:2 * bs].tobytes())
    assert block[8 * KIB:16 * KIB] == bytes(8 * KIB)
    assert m.flags[1] == DATA
    assert m.digests[1].tobytes() == blake3.blake3(bytes(block)).digest()
    assert m.bytes_read == 4 * bs


def test_hole_only_when_wholly_inside(sparse_dir: Path) -> None:
    bs = 64 * KIB
    img = SparseImage(sparse_dir / "disk.img", 4 * bs)
    img.write_random(0, img.size, seed=12)
    img.punch(bs + PAGE, 2 * bs - PAGE)  # block 1 but its first page, block 2 wholly
    m = cbt.scan(img.path, bs, workers=2)
    assert m.flags.tolist() == [DATA, DATA, HOLE, DATA]
    assert m.bytes_read == 3 * bs
    assert m.digests[2].tobytes() == bytes(32)


@pytest.mark.parametrize("size", [0, 1, 4095, 4097, 64 * KIB - 1, 64 * KIB, 64 * KIB + 1,
                                  MIB + 12345])
def test_sizes(tmp_path: Path, size: int) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(np.random.default_rng(size).integers(1, 256, size, np.uint8).tobytes())
    for bs in (4 * KIB, 64 * KIB):
        want_digests, want_flags = truth_hash(read_image(path), bs)
        for workers in (1, 2):
            m = cbt.scan(path, bs, workers=workers)
            assert m.disk_size == size
            assert m.blocks == -(-size // bs)
            assert np.array_equal(m.flags, want_flags)
            assert np.array_equal(m.digests, want_digests)
            assert m.bytes_read == size


@pytest.mark.parametrize("bs", [4 * KIB, 64 * KIB])
def test_workers_agree_on_realistic_images(tmp_path: Path, bs: int) -> None:
    for name, make in (("fs.img", make_fs_image), ("db.img", make_db_file)):
        path = tmp_path / name
        make(path, 6 * MIB + 3 * PAGE, seed=21)
        data = read_image(path)
        scans = [cbt.scan(path, bs, workers=w) for w in (1, 2, 3)]
        for m in scans[1:]:
            assert np.array_equal(m.digests, scans[0].digests)
            assert np.array_equal(m.flags, scans[0].flags)
            assert m.bytes_read == scans[0].bytes_read
        m = scans[0]
        want_digests, want_flags = truth_hash(data, bs)
        # A HOLE block reads as zeros; every other block is exactly the truth.
        assert np.array_equal(m.digests, want_digests)
        holes = m.flags == HOLE
        assert np.array_equal(m.flags[~holes], want_flags[~holes])
        assert (want_flags[holes] == ZERO).all()
        read = sum(min(bs, len(data) - i * bs) for i in np.flatnonzero(~holes))
        assert m.bytes_read == read
        if name == "db.img":  # its last eighth is never written
            assert m.hole_blocks >= (len(data) // 8) // bs - 1


def test_scan_errors(tmp_path: Path) -> None:
    with pytest.raises(cbt.CbtIOError, match="no such"):
        cbt.scan(tmp_path / "missing.img")
    with pytest.raises(cbt.CbtIOError, match="directory"):
        cbt.scan(tmp_path)
    (tmp_path / "x.img").write_bytes(b"x")
    with pytest.raises(cbt.CbtValueError):
        cbt.scan(tmp_path / "x.img", block_size=5000)
    with pytest.raises(OSError):  # CbtIOError is an OSError too
        cbt.scan(tmp_path / "missing.img")


# -- a loop block device --------------------------------------------------------------


@pytest.mark.root
def test_loop_device(tmp_path: Path) -> None:
    need_root_tools("losetup")
    backing = tmp_path / "backing.img"
    size = 64 * MIB
    make_fs_image(backing, size, seed=31)  # data, text, zeros and holes
    assert backing.stat().st_size == size
    attach = subprocess.run(["losetup", "--find", "--show", str(backing)],
                            capture_output=True, text=True, check=False)
    need(attach.returncode == 0, f"losetup cannot attach a loop device: {attach.stderr.strip()}")
    dev = attach.stdout.strip()
    try:
        with open_image(dev) as disk:
            assert disk.kind == "block device"
            assert disk.size == size
        m_dev = cbt.scan(dev, 64 * KIB, workers=2)
        m_file = cbt.scan(backing, 64 * KIB, workers=2)
        assert m_dev.disk_size == size
        assert m_dev.source == dev
        assert np.array_equal(m_dev.digests, m_file.digests)
        # The device has no holes to report: the file's holes read as zero blocks.
        file_holes = m_file.flags == HOLE
        assert file_holes.any()
        assert (m_dev.flags[file_holes] == ZERO).all()
        assert np.array_equal(m_dev.flags[~file_holes], m_file.flags[~file_holes])
        assert m_dev.bytes_read == size
        assert cbt.diff(dev, backing, 64 * KIB).identical
        r = run_cli("scan", "--json", dev)  # the command line takes devices too
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert (out["path"], out["size"], out["bytes_read"]) == (dev, size, size)
        assert out["hole_blocks"] == 0 and out["blocks"] == size // (64 * KIB)
        r = run_cli("diff", "--json", dev, backing)
        assert (r.returncode, json.loads(r.stdout)["changed_blocks"]) == (0, 0), r.stderr
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)


def test_more_than_one_window(tmp_path: Path) -> None:
    """One worker's shard longer than a mapping window (64 MiB): blocks at the seam.

    Mostly written zeros (cheap to scan), with data straddling every MiB boundary
    and a short tail; then the same image diffed against a copy changed at the seam.
    """
    from cbt.source.image import WINDOW

    size = WINDOW + 2 * MIB + 100
    data = np.zeros(size, dtype=np.uint8)
    rng = np.random.default_rng(41)
    for off in range(MIB, size, MIB):
        data[off - 8:off + 8] = rng.integers(1, 256, 16, dtype=np.uint8)
    data[-50:] = 7
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    data.tofile(a)
    changed = data.copy()
    changed[WINDOW - 3:WINDOW + 3] ^= 0xFF  # across the window seam
    changed[WINDOW + MIB + 1] ^= 0x01
    changed.tofile(b)
    try:
        bs = 64 * KIB
        want_digests, want_flags = truth_hash(data, bs)
        m = cbt.scan(a, bs, workers=1)
        assert np.array_equal(m.flags, want_flags)
        assert np.array_equal(m.digests, want_digests)
        assert m.bytes_read == size
        for workers in (1, 2):
            cs = cbt.diff_images(a, b, bs, workers=workers)
            blocks = np.flatnonzero(cs.bitmap).tolist()
            assert blocks == [WINDOW // bs - 1, WINDOW // bs, (WINDOW + MIB) // bs]
        assert np.flatnonzero(cbt.diff(m, b).bitmap).tolist() == blocks
    finally:
        a.unlink()
        b.unlink()


# -- property-based: random sparse layouts ---------------------------------------------


@st.composite
def layouts(draw: st.DrawFn) -> tuple[int, list[tuple[str, int, int]], int, int]:
    pages = draw(st.integers(1, 160))
    size = pages * PAGE - draw(st.integers(0, PAGE - 1))
    ops: list[tuple[str, int, int]] = []
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["data", "zeros", "punch"]))
        if kind == "punch":
            first = draw(st.integers(0, pages - 1))
            ops.append((kind, first * PAGE, draw(st.integers(1, pages - first)) * PAGE))
        else:
            off = draw(st.integers(0, size - 1))
            ops.append((kind, off, draw(st.integers(1, size - off))))
    bs = 1 << draw(st.integers(12, 16))
    return size, ops, bs, draw(st.integers(1, 4))


@given(layouts())
def test_property_sparse_scan(case: tuple[int, list[tuple[str, int, int]], int, int]) -> None:
    size, ops, bs, workers = case
    with tempfile.TemporaryDirectory() as d:
        need(fs_has_page_holes(Path(d)), f"no 4 KiB holes on the file system of {d}")
        img = SparseImage(Path(d) / "disk.img", size)
        for i, (kind, off, length) in enumerate(ops):
            if kind == "data":
                img.write_random(off, length, seed=i)
            elif kind == "zeros":
                img.write(off, bytes(length))
            else:
                img.punch(off, min(length, -(-size // PAGE) * PAGE - off))
        check_scan(cbt.scan(img.path, bs, workers=workers), img, bs)


def test_package_api_names_after_any_import_order() -> None:
    """``cbt.scan`` and ``cbt.diff`` are the API functions whichever module loaded first,
    and the layers stay reachable as attributes."""
    probe = ("import cbt.format.manifest, cbt.source.scan, cbt.ops.diff, cbt.ops.backup, cbt\n"
             "import types\n"
             "assert callable(cbt.scan) and callable(cbt.diff), (cbt.scan, cbt.diff)\n"
             "assert isinstance(cbt.format, types.ModuleType)\n"
             "assert isinstance(cbt.jobs, types.ModuleType)\n"
             "from cbt import scan, diff, Manifest, Vault, ChangeSet\n"
             "assert scan is cbt.scan and diff is cbt.diff\n")
    subprocess.run([sys.executable, "-c", probe], check=True)


# -- the shard planner and the block source ------------------------------------------------


@st.composite
def disk_plans(draw: st.DrawFn) -> tuple[list[tuple[list[tuple[int, int]], int, int]], int]:
    disks = []
    for _ in range(draw(st.integers(1, 4))):
        bs = 1 << draw(st.integers(12, 16))
        blocks = draw(st.integers(0, 200))
        size = max(0, blocks * bs - draw(st.integers(0, bs - 1)))
        marks = sorted(set(draw(st.lists(st.integers(0, blocks), max_size=8))))
        ranges = [(lo, hi) for lo, hi in zip(marks[::2], marks[1::2], strict=False) if lo < hi]
        disks.append((ranges, bs, size))
    return disks, draw(st.integers(1, 8))


@given(disk_plans())
def test_plan_shards_cover_every_block_once(
        case: tuple[list[tuple[list[tuple[int, int]], int, int]], int]) -> None:
    """Shards, in disk order, cover each disk's ranges exactly; every disk has one at least;
    bytes to read are counted block by block (the last block ends at the disk's end)."""
    from cbt.source.plan import DiskPlan, bytes_to_read, plan_shards

    disks, parts = case
    plans = [DiskPlan(r, bs, size) for r, bs, size in disks]
    shards = plan_shards(plans, parts)
    assert [s.disk for s in shards] == sorted(s.disk for s in shards)
    assert {s.disk for s in shards} == set(range(len(disks)))
    for i, (ranges, bs, size) in enumerate(disks):
        want = [b for lo, hi in ranges for b in range(lo, hi)]
        got = [b for s in shards if s.disk == i for lo, hi in s.ranges for b in range(lo, hi)]
        assert got == want
        truth = sum(max(0, min(bs, size - b * bs)) for b in want)
        assert bytes_to_read(ranges, bs, size) == plans[i].to_read == truth
    total = sum(p.to_read for p in plans)
    assert len(shards) <= parts + len(disks) or total == 0


def test_image_source_reopened_from_its_spec(tmp_path: Path) -> None:
    """A worker reopens a source from its spec: read up to the planned size (a disk that
    grew since), refused when it shrank."""
    from cbt.core.errors import CbtIOError
    from cbt.source.image import open_source

    img = tmp_path / "d.img"
    img.write_bytes(b"a" * 10000)
    with open_image(img, live=True) as src:
        spec = src.spec()
        assert (spec.kind, spec.size, spec.live, src.kind) == ("image", 10000, True, "file")
        assert src.extents() == [(0, 10000)] and src.block_ranges(4096) == [(0, 3)]
    with open(img, "ab") as f:
        f.write(b"b" * 5000)
    with open_source(spec) as again:
        assert again.size == 10000 and again.live
        assert [len(w) for _, w in again.windows(4096, 0, 3)] == [10000]
    img.write_bytes(b"a" * 9999)
    with pytest.raises(CbtIOError, match="shrank"):
        open_source(spec)
