"""Review of the read-error handling (issue 12, "Sources"): the edges of a disk.

An unreadable first page (the page a manifest's magic is looked for in), the
tail block shorter than the block size, and a vault pack that cannot be read:
each ends with one line that names the file, the byte and the error, once.
The read errors are real (``helpers.badblocks``).
"""

from __future__ import annotations

import json
from pathlib import Path

from helpers import MIB
from helpers.badblocks import bad_btrfs, random_file
from helpers.cli import cbt, one_error_line


def _eio(img: Path, page: int) -> str:
    return f"read error on {img} at byte {page}: Input/output error"


def test_diff_of_an_image_whose_first_page_is_unreadable(tmp_path: Path) -> None:
    """``cbt diff`` looks for a manifest's magic in the first bytes of each side: an
    unreadable first page is named there too, not a bare 'Input/output error'."""
    with bad_btrfs(tmp_path) as fs:
        img, other = fs.mnt / "disk.img", fs.mnt / "other.img"
        random_file(img, 2 * MIB)
        random_file(other, 2 * MIB, seed=3)
        page = fs.corrupt(img, 10)
        lines = [one_error_line(cbt("diff", *pair)) for pair in ((other, img), (img, other))]
        scan = one_error_line(cbt("scan", img))
    assert lines == [f"cbt: error: {_eio(img, page)}"] * 2, lines
    assert scan == f"cbt: error: {_eio(img, page)}", scan


def test_unreadable_tail_block(tmp_path: Path) -> None:
    """The last block is shorter than the block size; its last page cannot be read."""
    vault = tmp_path / "vault"
    assert cbt("init", "--encryption", "none", vault).returncode == 0
    with bad_btrfs(tmp_path) as fs:
        img = fs.mnt / "disk.img"
        random_file(img, 4 * MIB + 8192)
        page = fs.corrupt(img, 4 * MIB + 8191)
        got = {w: one_error_line(cbt("backup", vault, f"vda={img}", "--vm", "vm",
                                     "--workers", w)) for w in ("1", "2")}
        scan = one_error_line(cbt("scan", img, "-o", tmp_path / "m.arrow"))
    assert set(got.values()) == {f"cbt: error: disk vda: {_eio(img, page)}"}, got
    assert scan == f"cbt: error: {_eio(img, page)}"
    assert not (tmp_path / "m.arrow").exists()
    r = cbt("list", vault, "--json")
    assert json.loads(r.stdout.splitlines()[-1])["points"] == []
