"""cbt diff --map: the terminal strip against shares computed here from the bytes, the SVG
and PNG pictures, and the errors (a bad name, no matplotlib) in one line, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from helpers import KIB, MIB
from helpers.cli import cbt, clean_env, one_error_line
from helpers.images import random_bytes, write_disk
from helpers.vaults import make_two_points

two_points = pytest.fixture(scope="module")(make_two_points)

BS = 64 * KIB
SHADES = " ░▒▓█"


def _changed_mask(a: Path, b: Path, bs: int) -> npt.NDArray[np.bool_]:
    """Blocks that differ, by plain numpy over the two files (same size here)."""
    x, y = np.fromfile(a, np.uint8), np.fromfile(b, np.uint8)
    n = -(-len(x) // bs)
    pad = n * bs - len(x)
    x, y = np.pad(x, (0, pad)), np.pad(y, (0, pad))
    return (x.reshape(n, bs) != y.reshape(n, bs)).any(axis=1)


def _expected_strip(mask: npt.NDArray[np.bool_], cells: int) -> str:
    """Cell i holds blocks [i*n//W, (i+1)*n//W); shaded by quarters, any change shows."""
    n = len(mask)
    out = []
    for i in range(cells):
        part = mask[i * n // cells:(i + 1) * n // cells]
        share = part.mean()
        out.append(" " if share == 0 else SHADES[min(4, int(np.ceil(share * 4)))])
    return "".join(out)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path, npt.NDArray[np.bool_]]:
    """Two 8 MiB images (128 blocks of 64 KiB) differing in known places: all of blocks
    16-31, one page in each of blocks 64-71, every other block of 96-111, the last."""
    data = random_bytes(8 * MIB, 1)
    a = write_disk(tmp_path / "a.img", data)
    changed = data.copy()
    changed[16 * BS:32 * BS] ^= 1
    for blk in range(64, 72):
        changed[blk * BS + 5000] ^= 0xFF
    for blk in range(96, 112, 2):
        changed[blk * BS:(blk + 1) * BS] ^= 7
    changed[-1] ^= 1
    b = write_disk(tmp_path / "b.img", changed)
    mask = _changed_mask(a, b, BS)
    assert mask.sum() == 16 + 8 + 8 + 1
    return a, b, mask


@pytest.mark.parametrize("cells", [8, 13, 40, 128, 200])
def test_strip_shades_each_run_of_blocks_by_its_share(
        pair: tuple[Path, Path, npt.NDArray[np.bool_]], cells: int) -> None:
    a, b, mask = pair
    r = cbt("diff", a, b, "--block-size", "64K", "--map", "--width", cells)
    assert r.returncode == 1, r.stderr
    (line,) = [x for x in r.stdout.splitlines() if "|" in x]
    want = _expected_strip(mask, min(cells, len(mask)))
    assert line == f"disk 0 B |{want}| 8.0 MiB"


def test_strip_fills_the_terminal_width(pair: tuple[Path, Path, npt.NDArray[np.bool_]]
                                        ) -> None:
    a, b, mask = pair
    r = cbt("diff", a, b, "--block-size", "64K", "--map", env={"COLUMNS": "70"})
    (line,) = [x for x in r.stdout.splitlines() if "|" in x]
    assert len(line) == 70
    cells = len(line.split("|")[1])
    assert line.split("|")[1] == _expected_strip(mask, cells)
    quiet = cbt("diff", a, b, "--block-size", "64K", "--map", "-q", env={"COLUMNS": "70"})
    assert line in quiet.stdout.splitlines()


def test_strip_of_identical_images_is_blank(pair: tuple[Path, Path, npt.NDArray[np.bool_]]
                                            ) -> None:
    a, _, _ = pair
    r = cbt("diff", a, a, "--map", "--width", 20)
    assert r.returncode == 0 and "disk 0 B |" + " " * 20 + "| 8.0 MiB" in r.stdout


def test_points_draw_one_strip_per_disk(two_points: tuple[Path, list[str]],
                                        tmp_path: Path) -> None:
    vault, ids = two_points
    r = cbt("diff", f"{vault}::{ids[0]}", f"{vault}::{ids[1]}", "--map", "--width", 16)
    assert r.returncode == 1, r.stderr
    strips = {x.split()[0]: x for x in r.stdout.splitlines() if "|" in x}
    assert sorted(strips) == ["db", "os"]
    assert strips["os"].split("|")[1] == " " * 16  # os did not change
    got = json.loads(cbt("diff", f"{vault}::{ids[0]}", f"{vault}::{ids[1]}", "--json").stdout)
    (db,) = [d for d in got["disks"] if d["label"] == "db"]
    mask = np.zeros(db["blocks"], dtype=bool)
    for off, length in db["ranges"]:
        mask[off // db["block_size"]:-(-(off + length) // db["block_size"])] = True
    assert strips["db"].split("|")[1] == _expected_strip(mask, min(16, len(mask)))


def test_svg_and_png_pictures(pair: tuple[Path, Path, npt.NDArray[np.bool_]],
                              tmp_path: Path) -> None:
    a, b, _ = pair
    svg, png = tmp_path / "map.svg", tmp_path / "map.png"
    r = cbt("diff", a, b, "--block-size", "64K", "--map", svg)
    assert r.returncode == 1 and f"map written to {svg}" in r.stdout, r.stderr
    assert "|" not in r.stdout  # not a terminal: the picture only
    assert ET.parse(svg).getroot().tag.endswith("svg")
    words = svg.read_text()
    # the x axis counts in binary units (4.0 MiB, 8.0 MiB), never MB
    assert "MiB" in words and " MB" not in words
    got = cbt("diff", a, b, "--block-size", "64K", "--map", png, "--json")
    assert got.returncode == 1
    assert [line for line in got.stdout.splitlines() if line.startswith("{")] == \
        got.stdout.splitlines()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".cbt-map")] == []


def test_bad_map_requests_are_one_line_and_write_nothing(
        pair: tuple[Path, Path, npt.NDArray[np.bool_]], tmp_path: Path) -> None:
    a, b, _ = pair
    for args, words in (((a, b, "--map", tmp_path / "m.jpg"), "FILE.svg or FILE.png"),
                        ((a, b, "--map", "--json"), "not with --json"),
                        ((a, b, "--width", 30), "give --map too"),
                        ((a, b, "--map", tmp_path / "no" / "m.svg"), "no such folder"),
                        ((a, b, "--map", "--width", 3), "from 8 to")):
        line = one_error_line(cbt("diff", *args))
        assert words in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.img", "b.img"]


def test_without_matplotlib_a_picture_says_how_to_get_it(
        pair: tuple[Path, Path, npt.NDArray[np.bool_]], tmp_path: Path) -> None:
    a, b, _ = pair
    shadow = tmp_path / "shadow" / "matplotlib"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    r = cbt("diff", a, b, "--map", tmp_path / "m.svg",
            env={"PYTHONPATH": str(tmp_path / "shadow")})
    assert "pip install 'cbt[plot]'" in one_error_line(r)
    assert not (tmp_path / "m.svg").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".cbt-map")] == []


def test_matplotlib_is_loaded_only_for_a_picture(
        pair: tuple[Path, Path, npt.NDArray[np.bool_]], tmp_path: Path) -> None:
    a, b, _ = pair
    probe = ("import sys; from cbt.cli.main import main; main(sys.argv[1:]); "
             "sys.stderr.write(str('matplotlib' in sys.modules))")
    for extra, loaded in (([], "False"), (["--map"], "False"),
                          (["--map", str(tmp_path / "m.png")], "True")):
        r = subprocess.run([sys.executable, "-c", probe, "diff", str(a), str(b), *extra],
                           capture_output=True, text=True, env=clean_env(), timeout=120,
                           check=False)
        assert r.stderr.endswith(loaded), (extra, r.stderr)


def test_review_huge_columns_is_capped(tmp_path: Path) -> None:
    """$COLUMNS of a billion: the strip has at most --width's most cells (it drew one cell
    per block, 16 M of them for a 1 TiB disk)."""
    from cbt.cli.diffmap import MAX_CELLS

    a, b = tmp_path / "a.img", tmp_path / "b.img"
    for p in (a, b):
        with open(p, "wb") as f:
            f.truncate(2 * MAX_CELLS * BS)  # sparse: twice as many blocks as cells
    with open(b, "r+b") as f:
        f.write(b"x")
    r = subprocess.run([*_cbt_argv(), "diff", a, b, "--map"], capture_output=True, text=True,
                       env=clean_env({"COLUMNS": str(10**9)}), timeout=120, check=False)
    assert r.returncode == 1, r.stderr
    (line,) = [x for x in r.stdout.splitlines() if x.startswith("disk ")]
    strip = line.split("|")[1]
    # cell 0 holds blocks 0 and 1, one of them changed: half
    assert len(strip) == MAX_CELLS and strip[0] == SHADES[2] and not strip[1:].strip()


def test_review_map_onto_a_directory(tmp_path: Path) -> None:
    """--map NAME.svg that is a directory: refused before the diff, naming it."""
    a = write_disk(tmp_path / "a.img", random_bytes(MIB, 2))
    (tmp_path / "pic.svg").mkdir()
    r = cbt("diff", a, a, "--map", tmp_path / "pic.svg")
    line = one_error_line(r)
    assert "pic.svg: is a directory" in line and r.stdout == "", r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.img", "pic.svg"]


def _cbt_argv() -> list[str]:
    from helpers.cli import cbt_argv

    return cbt_argv()


def _small_files() -> None:
    """In the child: files may not grow past 4 KiB (a full disk, at the first write)."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


@pytest.mark.parametrize("suffix", ["svg", "png"])
@pytest.mark.parametrize("what", ["diff", "stats"])
def test_review_picture_never_half_written(what: str, suffix: str,
                                           two_points: tuple[Path, list[str]],
                                           tmp_path: Path) -> None:
    """A picture whose write fails (the disk full: files capped at 4 KiB) leaves no file
    (stats --map FILE.svg wrote in place: a 4 KiB stump stayed), nor a temporary one."""
    vault, ids = two_points
    argv = (["diff", f"{vault}::{ids[0]}", f"{vault}::{ids[1]}"] if what == "diff"
            else ["stats", vault])
    pics = tmp_path / "pics"
    pics.mkdir()
    out = pics / f"pic.{suffix}"
    # matplotlib's font cache: here (its write fails too, with a warning), not in ~/.cache
    env = clean_env({"MPLCONFIGDIR": str(tmp_path / "mpl")})
    r = subprocess.run([*_cbt_argv(), *argv, "--map", out], capture_output=True, text=True,
                       env=env, timeout=120, check=False, preexec_fn=_small_files)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.splitlines()[-1].startswith("cbt: error: File too large"), r.stderr
    assert list(pics.iterdir()) == []


def test_review_stats_map_onto_a_directory(two_points: tuple[Path, list[str]],
                                           tmp_path: Path) -> None:
    """stats --map NAME.svg that is a directory: refused before the work, naming it."""
    vault, _ = two_points
    (tmp_path / "pic.svg").mkdir()
    r = cbt("stats", vault, "--map", tmp_path / "pic.svg")
    assert "pic.svg: is a directory" in one_error_line(r) and r.stdout == ""


def test_review_legend_of_disks_of_different_sizes(two_points: tuple[Path, list[str]]) -> None:
    """Two whole points whose disks differ in size: the legend says each disk's cell (it
    gave the first disk's for all)."""
    vault, ids = two_points
    show = json.loads(cbt("show", vault, ids[1], "--json").stdout)
    sizes = {d["label"]: (d["blocks"], d["block_size"]) for d in show["disks"]}
    assert len(set(sizes.values())) == 2
    from cbt.core.sizes import human_bytes

    r = cbt("diff", f"{vault}::{ids[0]}", f"{vault}::{ids[1]}", "--map", "--width", "8")
    want = ", ".join(f"{label} ~{n // 8} blocks ({human_bytes(n // 8 * bs)})"
                     for label, (n, bs) in sizes.items())
    assert f"each cell: {want}; changed:" in r.stdout, r.stdout
