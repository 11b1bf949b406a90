"""bench/diff_map_picture.py, the README's picture of ``cbt diff --map``: made from a
tiny ext4db set (a 32 MiB image; root for its loop device), the picture is a PNG and
the caption line counts the 64 KiB blocks that differ between day 0 and day 1, counted
here with numpy."""

from __future__ import annotations

from pathlib import Path

import diff_map_picture
import numpy as np
import pytest
import realset
from helpers.system import need_root_tools

pytestmark = pytest.mark.root
BLOCK = 64 << 10


def test_the_picture_and_its_caption(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                     ) -> None:
    need_root_tools("mke2fs", "e2fsck", "losetup", "mount")
    out = tmp_path / "map.png"
    assert diff_map_picture.main(["--dir", str(tmp_path / "work"), "--size", "64M",
                                  "--out", str(out), "--width", "200"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    root = tmp_path / "work" / "ext4db"
    a = np.fromfile(root / "day0" / realset.IMAGE, dtype=np.uint8).reshape(-1, BLOCK)
    b = np.fromfile(root / "day1" / realset.IMAGE, dtype=np.uint8).reshape(-1, BLOCK)
    changed = int((a != b).any(axis=1).sum())
    assert 0 < changed < len(a)
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"differ: {changed} of {len(a)} blocks of 64K changed"), line
