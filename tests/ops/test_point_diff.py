"""``cbt diff`` with recovery points: ``VAULT::POINT/LABEL`` and ``VAULT::POINT``.

A VM ``web`` is backed up on three days: os and db on day 0; on day 1 both
change (os grows) and a logs disk is added; on day 2 db is dropped, os is left
as it was and logs changes.  Every expected diff is computed with numpy from
copies of the disks as they were (``helpers.truth.truth_diff``, the diff rules of
issue 2).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from helpers import KIB, MIB
from helpers.cli import cbt, one_error_line
from helpers.images import fs_image, keep_copy, read
from helpers.shapes import DIFF_KEYS
from helpers.truth import truth_diff

import cbt as cbt_api
from cbt.source.synth import make_db_file, mutate

BS = 16 * KIB
DAYS = ["2024-01-01T00:00:00Z", "2024-01-02T00:00:00Z", "2024-01-03T00:00:00Z"]
POINT_KEYS = {"a", "b", "disks", "changed_blocks", "changed_bytes", "warnings"}
POINT_DISK_KEYS = {"label", "status", "block_size", "size_a", "size_b", "blocks",
                   "changed_blocks", "changed_bytes", "ranges"}
EMPTY = np.zeros(0, dtype=np.uint8)


@dataclass
class Points:
    vault: Path
    ids: list[str]
    copies: list[dict[str, Path]]  # per day: label -> copy of the disks backed up that day

    def ref(self, day: int, label: str | None = None) -> str:
        return f"{self.vault}::{self.ids[day]}" + (f"/{label}" if label else "")

    def data(self, day: int, label: str) -> np.ndarray:
        return read(self.copies[day][label]) if label in self.copies[day] else EMPTY


@pytest.fixture(scope="module")
def pts(tmp_path_factory: pytest.TempPathFactory) -> Points:
    root = tmp_path_factory.mktemp("point-diff")
    d = root / "disks"
    d.mkdir()
    vault = cbt_api.Vault.init(root / "vault")
    ids, copies = [], []
    for day in range(3):
        if day == 0:
            fs_image(d / "os.img", 3 * MIB + 777, 51)
            make_db_file(d / "db.img", 2 * MIB, seed=52)
            labels = ["os", "db"]
        elif day == 1:
            mutate(d / "os.img", seed=53, page_writes=25, runs=1, run_length=200 * KIB,
                   zero_runs=1, holes=1, resize=100 * KIB + 3)
            mutate(d / "db.img", seed=54, page_writes=40, runs=0, zero_runs=0, holes=0)
            fs_image(d / "logs.img", MIB + 4097, 55)
            labels = ["os", "db", "logs"]
        else:
            mutate(d / "logs.img", seed=56, page_writes=12, runs=0, zero_runs=0, holes=0)
            labels = ["os", "logs"]
        p = vault.backup("web", [d / f"{lb}.img" for lb in labels], block_size=BS,
                         created=DAYS[day])
        ids.append(p.id)
        copies.append({lb: keep_copy(d / f"{lb}.img", root / f"{lb}.{day}.img")
                       for lb in labels})
    # a second VM whose os disk has another block size
    vault.backup("other", [f"os={d / 'os.img'}"], block_size=64 * KIB, created=DAYS[0])
    assert ids == ["web.20240101T000000Z", "web.20240102T000000Z", "web.20240103T000000Z"]
    return Points(root / "vault", ids, copies)


def _diff(*args: object, code: int | None = None, cwd: Path | None = None) -> dict:
    r = cbt("diff", *args, "--json", cwd=cwd)
    assert r.returncode in (0, 1), (r.returncode, r.stdout, r.stderr)
    out = json.loads(r.stdout)
    if code is not None:
        assert r.returncode == code, out
    changed = out["changed_blocks"]
    assert r.returncode == (1 if changed else 0)
    return out


def _expected_points(pts: Points, a: int, b: int) -> dict:
    labels_a, labels_b = list(pts.copies[a]), list(pts.copies[b])
    disks = []
    for lb in labels_a + [x for x in labels_b if x not in labels_a]:
        t = truth_diff(pts.data(a, lb), pts.data(b, lb), BS)
        t.pop("warnings")
        status = ("only_a" if lb not in labels_b else "only_b" if lb not in labels_a
                  else "same" if t["changed_blocks"] == 0 else "changed")
        disks.append({"label": lb, "status": status, **t})
    return {"a": pts.ids[a], "b": pts.ids[b], "disks": disks,
            "changed_blocks": sum(x["changed_blocks"] for x in disks),
            "changed_bytes": sum(x["changed_bytes"] for x in disks), "warnings": []}


# -- one disk of a point against an image, a manifest, another point ------------------


@pytest.mark.slow
def test_point_disk_against_an_image(pts: Points) -> None:
    out = _diff(pts.ref(1, "os"), pts.copies[0]["os"], code=1)
    assert set(out) == DIFF_KEYS
    assert out == truth_diff(pts.data(1, "os"), pts.data(0, "os"), BS)
    assert out["size_a"] != out["size_b"]  # the disk grew
    out = _diff(pts.copies[0]["db"], pts.ref(1, "db"), code=1)
    assert out == truth_diff(pts.data(0, "db"), pts.data(1, "db"), BS)
    out = _diff(pts.ref(2, "logs"), pts.copies[2]["logs"], code=0)
    assert out == truth_diff(pts.data(2, "logs"), pts.data(2, "logs"), BS)


@pytest.mark.slow
def test_point_disk_against_a_manifest(pts: Points, tmp_path: Path) -> None:
    manifest = tmp_path / "os0.arrow"
    r = cbt("scan", pts.copies[0]["os"], "--block-size", "16K", "-o", manifest)
    assert r.returncode == 0, r.stderr
    out = _diff(manifest, f"{pts.vault}::web.latest/os", code=1)
    assert out == truth_diff(pts.data(0, "os"), pts.data(2, "os"), BS)
    out = _diff(pts.ref(0, "os"), manifest, code=0)
    assert out == truth_diff(pts.data(0, "os"), pts.data(0, "os"), BS)
    # a manifest of another block size cannot be compared with the point's
    other = tmp_path / "os0-64k.arrow"
    assert cbt("scan", pts.copies[0]["os"], "--block-size", "64K", "-o", other).returncode == 0
    line = one_error_line(cbt("diff", other, pts.ref(0, "os")))
    assert "block size" in line


@pytest.mark.slow
def test_point_disk_against_another_points_disk(pts: Points) -> None:
    out = _diff(pts.ref(0, "db"), pts.ref(1, "db"), code=1)
    assert out == truth_diff(pts.data(0, "db"), pts.data(1, "db"), BS)
    # <vm>.latest and a unique prefix
    out = _diff(f"{pts.vault}::web.latest/logs", f"{pts.vault}::web.20240102/logs", code=1)
    assert out == truth_diff(pts.data(2, "logs"), pts.data(1, "logs"), BS)
    out = _diff(f"{pts.vault}::web.latest/os", f"{pts.vault}::web.20240102T/os", code=0)
    assert out == truth_diff(pts.data(2, "os"), pts.data(1, "os"), BS)
    # a relative vault path, from the vault's folder
    out = _diff("vault::web.20240101/os", "vault::web.latest/os", cwd=pts.vault.parent, code=1)
    assert out == truth_diff(pts.data(0, "os"), pts.data(2, "os"), BS)
    # another VM's disk with another block size: an error, not a difference
    line = one_error_line(cbt("diff", f"{pts.vault}::other.latest/os", pts.ref(0, "os")))
    assert "block size" in line


# -- whole points --------------------------------------------------------------------------


@pytest.mark.parametrize("a,b", [(0, 2), (0, 1), (1, 2), (2, 0), (2, 2)])
def test_whole_points(pts: Points, a: int, b: int) -> None:
    out = _diff(pts.ref(a), pts.ref(b))
    assert set(out) == POINT_KEYS
    for disk in out["disks"]:
        assert set(disk) == POINT_DISK_KEYS, disk
    assert out == _expected_points(pts, a, b)
    statuses = {x["label"]: x["status"] for x in out["disks"]}
    if (a, b) == (0, 2):
        assert statuses == {"os": "changed", "db": "only_a", "logs": "only_b"}
    if (a, b) == (1, 2):
        assert statuses == {"os": "same", "db": "only_a", "logs": "changed"}
    if a == b:
        assert set(statuses.values()) == {"same"} and out["changed_blocks"] == 0


def test_whole_points_by_latest_and_prefix(pts: Points) -> None:
    out = _diff(f"{pts.vault}::web.20240101", f"{pts.vault}::web.latest", code=1)
    assert out == _expected_points(pts, 0, 2)
    line = one_error_line(cbt("diff", f"{pts.vault}::web.2024", f"{pts.vault}::web.latest"))
    assert "web.2024" in line


def test_whole_points_human_output(pts: Points) -> None:
    r = cbt("diff", pts.ref(0), pts.ref(2), "--ranges")
    assert r.returncode == 1, r.stderr
    lines = r.stdout.splitlines()
    for label, status in (("os", "changed"), ("db", "only_a"), ("logs", "only_b")):
        assert any(ln.split()[:2] == [label, status] for ln in lines), r.stdout
    assert r.stderr == ""
    r = cbt("diff", pts.ref(1), pts.ref(1))
    assert r.returncode == 0 and "identical" in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("pair", ["point-image", "image-point", "point-disk", "disk-point"])
def test_whole_point_against_one_disk_is_an_error(pts: Points, pair: str) -> None:
    image = str(pts.copies[0]["os"])
    a, b = {"point-image": (pts.ref(0), image), "image-point": (image, pts.ref(0)),
            "point-disk": (pts.ref(0), pts.ref(1, "os")),
            "disk-point": (pts.ref(1, "os"), pts.ref(0))}[pair]
    for extra in ([], ["--json"]):
        r = cbt("diff", a, b, *extra)
        line = one_error_line(r)
        assert "VAULT::POINT" in line or "whole point" in line, line
        if extra:
            assert json.loads(r.stdout)["type"] == "error"
        else:
            assert r.stdout == ""


@pytest.mark.parametrize("case", ["no-point", "no-label", "not-a-vault"])
def test_bad_point_references(pts: Points, tmp_path: Path, case: str) -> None:
    a = {"no-point": f"{pts.vault}::web.1999", "no-label": pts.ref(0, "nope"),
         "not-a-vault": f"{tmp_path}::web.latest/os"}[case]
    line = one_error_line(cbt("diff", a, pts.ref(0, "os")))
    assert {"no-point": "web.1999", "no-label": "nope", "not-a-vault": "not a cbt vault"}[case] \
        in line


def test_point_diff_reads_only_metadata(pts: Points, tmp_path: Path) -> None:
    """With every pack (and the index) gone, points still diff: only manifests are read."""
    vault = tmp_path / "vault"
    shutil.copytree(pts.vault, vault)
    shutil.move(vault / "packs", tmp_path / "packs-moved")
    shutil.move(vault / "index", tmp_path / "index-moved")
    (vault / "packs").mkdir()
    (vault / "index").mkdir()
    out = _diff(f"{vault}::{pts.ids[0]}", f"{vault}::web.latest", code=1)
    assert out == _expected_points(pts, 0, 2)
    out = _diff(f"{vault}::{pts.ids[0]}/os", f"{vault}::{pts.ids[1]}/os", code=1)
    assert out == truth_diff(pts.data(0, "os"), pts.data(1, "os"), BS)
    # and it needs no write access either
    for p in [vault, *vault.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    out = _diff(f"{vault}::{pts.ids[1]}", f"{vault}::{pts.ids[2]}", code=1)
    assert out == _expected_points(pts, 1, 2)
