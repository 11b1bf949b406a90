"""``cbt.diff`` and ``cbt diff`` against ground truth computed with numpy.

Every case is a pair of image files; the truth compares their bytes block by
block under issue 2's rules (``helpers.truth.truth_diff``).  Each case runs at 4 KiB,
64 KiB and 1 MiB blocks and in every mix of inputs: image/image,
manifest/image, image/manifest, manifest/manifest.
"""

from __future__ import annotations

import json
import os
import shutil
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
from helpers.shapes import DIFF_KEYS
from helpers.system import need
from helpers.truth import fs_has_page_holes, truth_bitmap, truth_diff
from hypothesis import given
from hypothesis import strategies as st

import cbt
from cbt.format.manifest import Manifest
from cbt.source.synth import copy_sparse, make_db_file, make_fs_image, mutate

KIB = 1024
MIB = 1024 * KIB
BLOCK_SIZES = [4 * KIB, 64 * KIB, MIB]
MIXES = ["image/image", "manifest/image", "image/manifest", "manifest/manifest"]
BASE_SIZE = 2 * MIB + 777  # not a multiple of any block size: a short tail block


def _random(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8).tobytes()


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _patch(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def _base(a: Path, b: Path, size: int = BASE_SIZE, seed: int = 1) -> None:
    _write(a, _random(size, seed))
    shutil.copyfile(a, b)


# Each case makes a.img and b.img in a directory of its own.
def case_identical(a: Path, b: Path) -> None:
    _base(a, b)


def case_straddling_writes(a: Path, b: Path) -> None:
    _base(a, b)
    _patch(b, MIB - 50, _random(100, 2))  # across a 4K, 64K and 1M boundary
    _patch(b, 5 * 64 * KIB - 3, _random(7, 3))  # across a 4K and 64K boundary
    _patch(b, 3 * PAGE - 1, _random(2, 4))  # across a 4K boundary only
    _patch(b, 2 * MIB - 64 * KIB - 1, _random(64 * KIB + 2, 5))  # three 64K blocks


def case_first_and_last_byte(a: Path, b: Path) -> None:
    _base(a, b)
    _patch(b, 0, b"\x00" if a.read_bytes()[0] else b"\x01")
    last = BASE_SIZE - 1
    _patch(b, last, bytes([a.read_bytes()[last] ^ 0xFF]))  # in the short tail block


def case_grow(a: Path, b: Path) -> None:
    _base(a, b)
    with open(b, "ab") as f:
        f.write(_random(5000, 6))


def case_grow_with_zeros(a: Path, b: Path) -> None:
    """Appended zeros still change the size: the blocks past A's end are changed."""
    _base(a, b)
    with open(b, "ab") as f:
        f.write(bytes(3 * MIB))


def case_shrink(a: Path, b: Path) -> None:
    _base(a, b)
    os.truncate(b, BASE_SIZE - 123_456)


def case_grow_exact_multiples(a: Path, b: Path) -> None:
    _base(a, b, size=2 * MIB)
    with open(b, "ab") as f:
        f.write(_random(MIB, 7))


def case_shrink_to_exact_multiple(a: Path, b: Path) -> None:
    _base(a, b)
    os.truncate(b, 2 * MIB)


def case_shrink_one_byte(a: Path, b: Path) -> None:
    _base(a, b, size=2 * MIB)
    os.truncate(b, 2 * MIB - 1)


def case_empty_and_data(a: Path, b: Path) -> None:
    _write(a, b"")
    _write(b, _random(70_000, 8))


def case_both_empty(a: Path, b: Path) -> None:
    _write(a, b"")
    _write(b, b"")


def case_everything_differs(a: Path, b: Path) -> None:
    _write(a, _random(BASE_SIZE, 9))
    _write(b, _random(BASE_SIZE, 10))


def case_holes_equal_zeros(a: Path, b: Path) -> None:
    """A has holes where B has written zeros: content decides, they are equal."""
    img = SparseImage(a, BASE_SIZE)
    img.write_random(0, MIB // 2, seed=11)
    img.write_random(MIB + 64 * KIB, 256 * KIB, seed=12)
    img.write_random(2 * MIB, 777, seed=13)
    b.write_bytes(img.content.tobytes())  # dense: no holes at all


def case_hole_filled(a: Path, b: Path) -> None:
    img = SparseImage(a, BASE_SIZE)
    img.write_random(0, 256 * KIB, seed=14)
    img.write_random(MIB + 3 * PAGE, MIB - 3 * PAGE + 777, seed=15)
    copy_sparse(a, b)
    _patch(b, 512 * KIB + 100, _random(10_000, 16))  # data where A has a hole
    _patch(b, 300 * KIB, bytes(8 * PAGE))  # zeros where A has a hole: no change


def case_data_punched(a: Path, b: Path) -> None:
    img = SparseImage(b, BASE_SIZE)
    img.write_random(0, BASE_SIZE, seed=17)
    a.write_bytes(img.content.tobytes())
    img.punch(64 * KIB + PAGE, 3 * PAGE)  # B loses data to a hole
    img.punch(MIB, MIB)


def case_sparse_both_same(a: Path, b: Path) -> None:
    img = SparseImage(a, 3 * MIB)
    img.write_random(MIB - PAGE, 2 * PAGE, seed=18)
    copy_sparse(a, b)


def case_fs_image_day(a: Path, b: Path) -> None:
    make_fs_image(a, 4 * MIB + 3 * PAGE + 5, seed=19)
    copy_sparse(a, b)
    mutate(b, seed=20, page_writes=40, runs=3, run_length=256 * KIB, zero_runs=1, holes=1)


def case_fs_image_grows(a: Path, b: Path) -> None:
    make_fs_image(a, 4 * MIB, seed=21)
    copy_sparse(a, b)
    mutate(b, seed=22, page_writes=20, runs=2, run_length=128 * KIB, resize=3 * PAGE + 1000)


def case_db_file_shrinks(a: Path, b: Path) -> None:
    make_db_file(a, 4 * MIB + 1000, seed=23)
    copy_sparse(a, b)
    mutate(b, seed=24, page_writes=100, runs=1, run_length=64 * KIB, resize=-(MIB + 5))


CASES: dict[str, Callable[[Path, Path], None]] = {
    name.removeprefix("case_").replace("_", "-"): fn
    for name, fn in dict(globals()).items() if name.startswith("case_")
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, Path]]:
    """Build each case's images once for all block sizes and mixes."""
    root = tmp_path_factory.mktemp("pairs")
    need(fs_has_page_holes(root), f"no 4 KiB holes on the file system of {root}")
    built: dict[str, tuple[Path, Path]] = {}

    def get(case: str) -> tuple[Path, Path]:
        if case not in built:
            d = root / case
            d.mkdir()
            a, b = d / "a.img", d / "b.img"
            CASES[case](a, b)
            built[case] = (a, b)
        return built[case]

    return get


def _source(path: Path, kind: str, bs: int) -> Path:
    if kind == "image":
        return path
    out = path.with_name(f"{path.stem}.{bs}.arrow")
    if not out.exists():
        cbt.scan(path, bs).write(out)
    return out


def check(cs: cbt.ChangeSet, a: Path, b: Path, bs: int) -> None:
    x, y = read_image(a), read_image(b)
    want = truth_diff(x, y, bs)
    # first the counts (an image diff makes them from its bitmap's bytes, before any array)
    assert (cs.changed_blocks, cs.changed_bytes, cs.runs) == (
        want["changed_blocks"], want["changed_bytes"], len(want["ranges"]))
    got = cs.to_dict()  # (an image diff lists its runs from the bitmap's bytes)
    assert set(got) == DIFF_KEYS
    assert got == want
    assert cs.ranges.tolist() == want["ranges"]  # the array, made now
    assert np.array_equal(cs.bitmap, truth_bitmap(x, y, bs))
    assert cs.identical == (want["changed_blocks"] == 0)


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("bs", BLOCK_SIZES, ids=["4K", "64K", "1M"])
@pytest.mark.parametrize("case", list(CASES))
def test_diff_against_truth(pairs: Callable[[str], tuple[Path, Path]], case: str, bs: int,
                            mix: str) -> None:
    a, b = pairs(case)
    kind_a, kind_b = mix.split("/")
    cs = cbt.diff(_source(a, kind_a, bs), _source(b, kind_b, bs), block_size=bs)
    check(cs, a, b, bs)


def test_the_cases_mean_what_they_say(pairs: Callable[[str], tuple[Path, Path]]) -> None:
    """Guard the fixtures: identical cases are identical, the others are not."""
    for case in CASES:
        a, b = pairs(case)
        x, y = read_image(a), read_image(b)
        same = len(x) == len(y) and np.array_equal(x, y)
        assert same == (case in ("identical", "holes-equal-zeros", "sparse-both-same",
                                 "both-empty")), case
    a, _ = pairs("holes-equal-zeros")
    assert a.stat().st_blocks * 512 < a.stat().st_size  # A really is sparse


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_image_diff_any_number_of_workers(pairs: Callable[[str], tuple[Path, Path]],
                                          workers: int) -> None:
    for case in ("fs-image-day", "hole-filled", "db-file-shrinks"):
        a, b = pairs(case)
        check(cbt.diff_images(a, b, 64 * KIB, workers=workers), a, b, 64 * KIB)


def test_in_memory_manifests(pairs: Callable[[str], tuple[Path, Path]]) -> None:
    a, b = pairs("fs-image-grows")
    ma, mb = cbt.scan(a, 4 * KIB), cbt.scan(b, 4 * KIB)
    check(cbt.diff(ma, mb), a, b, 4 * KIB)
    check(cbt.diff(ma, b), a, b, 4 * KIB)
    check(cbt.diff_manifests(ma, mb), a, b, 4 * KIB)


def test_default_block_size_is_the_documented_one(
        pairs: Callable[[str], tuple[Path, Path]]) -> None:
    a, b = pairs("straddling-writes")
    cs = cbt.diff(a, b)
    assert cs.block_size == cbt.DEFAULT_BLOCK_SIZE
    check(cs, a, b, cbt.DEFAULT_BLOCK_SIZE)


def test_manifest_block_size_wins(pairs: Callable[[str], tuple[Path, Path]]) -> None:
    a, b = pairs("straddling-writes")
    ma = _source(a, "manifest", 4 * KIB)
    cs = cbt.diff(ma, b, block_size=64 * KIB)
    assert cs.block_size == 4 * KIB
    assert len(cs.warnings) == 1 and "4K" in cs.warnings[0]
    x, y = read_image(a), read_image(b)
    assert np.array_equal(cs.bitmap, truth_bitmap(x, y, 4 * KIB))
    assert cbt.diff(ma, b, block_size=4 * KIB).warnings == []


def test_manifests_of_different_block_sizes(pairs: Callable[[str], tuple[Path, Path]]) -> None:
    a, b = pairs("identical")
    with pytest.raises(cbt.CbtValueError, match="block size"):
        cbt.diff(_source(a, "manifest", 4 * KIB), _source(b, "manifest", 64 * KIB))
    with pytest.raises(ValueError):
        cbt.diff_manifests(Manifest.read(_source(a, "manifest", 4 * KIB)),
                           Manifest.read(_source(b, "manifest", MIB)))


def test_bad_inputs(tmp_path: Path) -> None:
    img = tmp_path / "a.img"
    img.write_bytes(b"x" * 5000)
    with pytest.raises(cbt.CbtIOError):
        cbt.diff(img, tmp_path / "missing.img")
    with pytest.raises(cbt.CbtIOError):
        cbt.diff(tmp_path, img)
    with pytest.raises(cbt.CbtValueError):
        cbt.diff(img, img, block_size=5000)
    bad = tmp_path / "bad.arrow"
    bad.write_bytes(b"ARROW1\x00\x00garbage")
    with pytest.raises(cbt.CorruptManifestError):
        cbt.diff(bad, img)


# -- the command, against the same truth ------------------------------------------------


@pytest.mark.parametrize(("case", "bs", "mix"), [
    ("fs-image-day", 64 * KIB, "image/image"),
    ("fs-image-day", 64 * KIB, "manifest/image"),
    ("fs-image-grows", 4 * KIB, "image/manifest"),
    ("db-file-shrinks", MIB, "manifest/manifest"),
    ("holes-equal-zeros", 64 * KIB, "manifest/image"),
    ("straddling-writes", 4 * KIB, "image/image"),
])
def test_cli_diff_against_truth(pairs: Callable[[str], tuple[Path, Path]], case: str, bs: int,
                                mix: str) -> None:
    a, b = pairs(case)
    kind_a, kind_b = mix.split("/")
    sa, sb = _source(a, kind_a, bs), _source(b, kind_b, bs)
    want = truth_diff(read_image(a), read_image(b), bs)
    r = run_cli("diff", "--json", "--block-size", bs, sa, sb)
    assert r.returncode == (1 if want["changed_blocks"] else 0), r.stderr
    assert r.stderr == ""
    assert json.loads(r.stdout) == want
    assert len(r.stdout.splitlines()) == 1


@pytest.mark.parametrize("case", ["straddling-writes", "db-file-shrinks", "fs-image-grows",
                                  "identical", "first-and-last-byte"])
def test_cli_image_diff_loads_neither_numpy_nor_pyarrow(
        pairs: Callable[[str], tuple[Path, Path]], case: str) -> None:
    """Start-up counts against ``b3sum``: ``cbt diff`` of two images (``--ranges``, ``--json``)
    loads no numpy, pyarrow or rich, and what it says is the truth (tail block, sizes that
    differ)."""
    a, b = pairs(case)
    want = truth_diff(read_image(a), read_image(b), 64 * KIB)
    probe = ("import sys; from cbt.cli.main import main; code = main(sys.argv[1:]); "
             "print(code, sorted(m for m in ('numpy', 'pyarrow', 'rich', 'cbt.repo.vault') "
             "if m in sys.modules))")
    said = {}
    for how in ("--ranges", "--json"):
        r = subprocess.run([sys.executable, "-c", probe, "diff", how, str(a), str(b)],
                           capture_output=True, text=True)
        assert r.stderr == "", r.stderr
        *said[how], loaded = r.stdout.splitlines()
        assert loaded == f"{1 if want['changed_blocks'] else 0} []"
    assert json.loads(said["--json"][0]) == want
    if not want["changed_blocks"]:
        assert said["--ranges"] == [f"identical: {want['blocks']} blocks of 64K"]
        return
    first, *runs = said["--ranges"]
    assert first.startswith(
        f"differ: {want['changed_blocks']} of {want['blocks']} blocks of 64K changed, ")
    assert f"({want['changed_bytes']} bytes) in {len(want['ranges'])} runs" in first
    assert [[int(x) for x in line.split()] for line in runs] == want["ranges"]


# -- property-based: random sizes, patches, resizes ---------------------------------------


@st.composite
def image_pairs(draw: st.DrawFn) -> tuple[bytes, bytes, int]:
    bs = 1 << draw(st.integers(12, 16))
    size_a = draw(st.integers(0, 5 * bs + bs // 2))
    a = bytearray(_random(size_a, draw(st.integers(0, 2**32 - 1))))
    b = bytearray(a)
    for _ in range(draw(st.integers(0, 4))):
        if not b:
            break
        off = draw(st.integers(0, len(b) - 1))
        b[off:off + draw(st.integers(1, 2 * bs))] = bytes(draw(st.integers(1, 2 * bs)))
    resize = draw(st.sampled_from(["none", "grow", "shrink", "grow-to-multiple"]))
    if resize == "grow":
        b += _random(draw(st.integers(1, 2 * bs)), 1)
    elif resize == "shrink":
        del b[draw(st.integers(0, len(b))):]
    elif resize == "grow-to-multiple":
        b += bytes(-len(b) % bs + bs)
    return bytes(a), bytes(b), bs


@pytest.mark.slow
@given(image_pairs(), st.sampled_from(MIXES))
def test_property_diff(case: tuple[bytes, bytes, int], mix: str) -> None:
    a_bytes, b_bytes, bs = case
    with tempfile.TemporaryDirectory() as d:
        a, b = Path(d) / "a.img", Path(d) / "b.img"
        a.write_bytes(a_bytes)
        b.write_bytes(b_bytes)
        kind_a, kind_b = mix.split("/")
        cs = cbt.diff(_source(a, kind_a, bs), _source(b, kind_b, bs), block_size=bs,
                      workers=2)
        check(cs, a, b, bs)
