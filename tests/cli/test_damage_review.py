"""Issue 12 review of "damage stays local": attacks on the landed code that found a problem.

The same real history as ``test_damage_local_cli`` (``helpers.damage``: VM web on four
days, whose os and data manifests form the chain seq 0..3 with bases web[0], web[0],
web[2]; VM db once), plain and encrypted.  Every restore is compared with the copy
of the disk taken at its backup.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers.cli import cbt, result_lines
from helpers.damage import BS, History, damage_record, pristine
from helpers.images import assert_same_disk, keep_copy, scribble


@pytest.fixture(params=[False, True], ids=["plain", "sealed"])
def h(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
      tmp_path: Path) -> History:
    return pristine(tmp_path_factory, request.param).clone(tmp_path / "h")


def _ok(r: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return r


def _restore_is_true_or_refused(h: History, pid: str, out: Path, tmp_path: Path) -> bool:
    """``cbt restore`` of ``pid``: either one clear error (exit 2, False), or bit for bit
    the disks as they were at its backup (True).  Never other data."""
    r = cbt("restore", h.vault, pid, "--to", out, "--json", env=h.env(tmp_path))
    assert "Traceback" not in r.stderr
    if r.returncode != 0:
        assert r.returncode == 2, r.stderr
        return False
    for label, copy in h.copies[pid].items():
        assert_same_disk(out / f"{label}.img", copy, BS)
    return True


def test_a_new_point_never_takes_the_id_of_a_set_aside_base(h: History, tmp_path: Path) -> None:
    """web[2]'s record is damaged; repair sets it aside, web[3] (a delta on it) is lost.  A
    backup at web[2]'s time (``--now``) must not take web[2]'s id: web[3]'s deltas would then
    resolve through the new point's manifests and restore other data, verify saying ok."""
    damage_record(h, h.web[2], "flip")
    r = cbt("verify", h.vault, "--repair", "--json", env=h.env(tmp_path))
    assert r.returncode == 2, r.stderr
    assert json.loads(r.stdout)["repair"]["lost_points"] == [h.web[2], h.web[3]]
    scribble(h.disks / "os.img", 170, pages=12)
    scribble(h.disks / "data.img", 171, pages=6)
    created = h.opened().load_point(h.web[3]).created.replace("04T", "03T")
    r = _ok(cbt("backup", h.vault, "--vm", "web", f"os={h.disks / 'os.img'}",
                f"data={h.disks / 'data.img'}", "--now", created, "--json",
                env=h.env(tmp_path)))
    (line,) = result_lines(r.stdout)
    new = line["recovery_point"]
    h.copies = {**h.copies, new: {lb: keep_copy(h.disks / f"{lb}.img", tmp_path / f"{lb}.new")
                                  for lb in ("os", "data")}}
    assert _restore_is_true_or_refused(h, new, tmp_path / "out-new", tmp_path)
    assert not _restore_is_true_or_refused(h, h.web[3], tmp_path / "out3", tmp_path)
    assert new != h.web[2], new
