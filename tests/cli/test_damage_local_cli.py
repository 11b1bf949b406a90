"""Issue 12: a damaged point record makes only its own point (and those based on it)
unavailable.

A real history (``helpers.damage``: VM web on four days, VM db once) in a plain and
an encrypted vault; one record is damaged on disk (a flipped byte, a cut file, a
checksum that no longer matches; in an encrypted vault a bad AEAD tag).  ``list``
shows the rest and names the file, exit 0; restores of other points, backups of
either VM and gc work; verify names it and ``--repair`` sets it aside.  The truth
of every restore is the copy of the disk taken at its backup.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from helpers.cli import cbt, cbt_json, one_error_line, result_lines
from helpers.damage import (
    BS,
    RECORD_DAMAGE,
    RECORD_DAMAGE_IDS,
    History,
    damage_record,
    flip_byte,
    pristine,
)
from helpers.images import assert_same_disk, keep_copy, scribble
from helpers.shapes import LIST_KEYS, LIST_POINT_KEYS, PROBLEM_KEYS, VERIFY_KEYS


@pytest.fixture(params=[False, True], ids=["plain", "sealed"])
def h(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
      tmp_path: Path) -> History:
    return pristine(tmp_path_factory, request.param).clone(tmp_path / "h")


def _list(h: History, tmp_path: Path) -> tuple[list[str], list[str], str]:
    """``cbt list --json`` must succeed: the ids, its warnings, and what went to stderr."""
    r = cbt("list", h.vault, "--json", env=h.env(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    out = json.loads(r.stdout)
    assert set(out) == LIST_KEYS
    for p in out["points"]:
        assert set(p) == LIST_POINT_KEYS
    return [p["recovery_point"] for p in out["points"]], out["warnings"], r.stderr


def _restores(h: History, point: str, out: Path, tmp_path: Path) -> None:
    """``cbt restore`` of ``point`` succeeds, bit for bit against the copies."""
    r = cbt("restore", h.vault, point, "--to", out, "--json", env=h.env(tmp_path))
    assert r.returncode == 0, r.stderr
    for label, copy in h.copies[point].items():
        assert_same_disk(out / f"{label}.img", copy, BS)


def _backup(h: History, vm: str, tmp_path: Path) -> dict:
    labels = ("os", "data") if vm == "web" else ("db",)
    r = cbt("backup", h.vault, "--vm", vm, *[f"{lb}={h.disks / f'{lb}.img'}" for lb in labels],
            "--json", env=h.env(tmp_path))
    assert r.returncode == 0, r.stderr
    (line,) = result_lines(r.stdout)
    assert line["type"] == "point", line
    return dict(line)


@pytest.mark.parametrize(("encrypted", "how"), RECORD_DAMAGE, ids=RECORD_DAMAGE_IDS)
def test_list_shows_every_other_point_and_names_the_damaged_file(
        tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, encrypted: bool,
        how: str) -> None:
    h = pristine(tmp_path_factory, encrypted).clone(tmp_path / "h")
    path = damage_record(h, h.web[1], how)  # a leaf: no point is based on it
    ids, warnings, stderr = _list(h, tmp_path)
    assert ids == [h.web[0], h.db, h.web[2], h.web[3]]
    assert len(warnings) == 1 and str(path) in warnings[0], warnings
    assert str(path) in stderr
    # the human form too: exit 0, the rest listed, the file named on stderr
    r = cbt("list", h.vault, env=h.env(tmp_path))
    assert r.returncode == 0 and str(path) in r.stderr, r.stderr
    assert all(pid in r.stdout for pid in ids) and h.web[1] not in r.stdout
    # every other point restores; the damaged one is one clear error naming the file
    for pid in (h.web[0], h.web[3], h.db):
        _restores(h, pid, tmp_path / f"out-{pid}", tmp_path)
    line = one_error_line(cbt("restore", h.vault, h.web[1], "--to", tmp_path / "no",
                              env=h.env(tmp_path)))
    assert str(path) in line, line
    assert not (tmp_path / "no").exists() or not any((tmp_path / "no").iterdir())


def test_a_damaged_base_takes_the_points_based_on_it_along(h: History, tmp_path: Path) -> None:
    path = damage_record(h, h.web[2], "flip")  # web[3]'s deltas are based on it
    ids, warnings, _ = _list(h, tmp_path)
    assert ids == [h.web[0], h.db, h.web[1]]
    assert any(str(path) in w for w in warnings)
    assert any(h.web[3] in w and "unavailable" in w for w in warnings), warnings
    for pid in (h.web[0], h.web[1], h.db):
        _restores(h, pid, tmp_path / f"out-{pid}", tmp_path)
    for pid in (h.web[2], h.web[3]):
        line = one_error_line(cbt("restore", h.vault, pid, "--to", tmp_path / "no",
                                  env=h.env(tmp_path)))
        assert str(path) in line, line
    # only the VM's own list
    r = cbt("list", h.vault, "--vm", "db", "--json", env=h.env(tmp_path))
    assert r.returncode == 0
    assert [p["recovery_point"] for p in json.loads(r.stdout)["points"]] == [h.db]


@pytest.mark.parametrize("which", [3, 2])
def test_backup_bases_on_the_latest_point_that_can_be_read(h: History, tmp_path: Path,
                                                            which: int) -> None:
    """The latest record damaged (3), or the base of the latest (2): the next backup of web
    follows the latest point that can be read, says so, and restores bit for bit."""
    path = damage_record(h, h.web[which], "flip")
    follows = h.web[2] if which == 3 else h.web[1]
    scribble(h.disks / "os.img", 150, pages=4)
    line = _backup(h, "web", tmp_path)
    assert any(str(path) in w for w in line["warnings"]), line["warnings"]
    assert any(f"backing up against {follows}" in w for w in line["warnings"]), line["warnings"]
    new = line["recovery_point"]
    record = h.opened().load_point(new)
    assert record.parent == follows
    assert record.disk("os").seq == h.opened().load_point(follows).disk("os").seq + 1
    copies = {lb: keep_copy(h.disks / f"{lb}.img", tmp_path / f"{lb}.now.img")
              for lb in ("os", "data")}
    h.copies = {**h.copies, new: copies}
    _restores(h, new, tmp_path / "out-new", tmp_path)
    # and a backup of the other VM is not disturbed
    line = _backup(h, "db", tmp_path)
    if not h.encrypted:  # the file name says the damaged record is web's
        assert line["warnings"] == [], line["warnings"]


def test_a_damaged_manifest_of_the_latest_point_starts_a_new_baseline(h: History,
                                                                      tmp_path: Path) -> None:
    manifest = h.manifest(h.web[3], "os")
    flip_byte(manifest)
    scribble(h.disks / "os.img", 160, pages=4)
    line = _backup(h, "web", tmp_path)
    assert any("disk os" in w and "full baseline" in w and h.web[3] in w
               for w in line["warnings"]), line["warnings"]
    new = line["recovery_point"]
    record = h.opened().load_point(new)
    assert (record.disk("os").seq, record.disk("os").base) == (0, None)
    assert record.disk("data").seq == 4  # the healthy disk stays on its chain
    h.copies = {**h.copies, new: {lb: keep_copy(h.disks / f"{lb}.img", tmp_path / f"{lb}.n")
                                  for lb in ("os", "data")}}
    _restores(h, new, tmp_path / "out-new", tmp_path)
    # the one after it is incremental again, on the new baseline
    line = _backup(h, "web", tmp_path)
    assert not any("baseline" in w for w in line["warnings"]), line["warnings"]
    assert h.opened().load_point(line["recovery_point"]).disk("os").base == new


def _forget_db(h: History) -> None:
    """VM db's point removed by hand, as prune does (record, then manifests): its blocks
    are dead."""
    opened = h.opened()
    (h.vault / opened.point_name(h.db)).unlink()
    (h.vault / opened.manifest_name(h.db, "db")).unlink()


def test_gc_works_beside_a_damaged_record_and_never_frees_its_blocks(h: History,
                                                                     tmp_path: Path) -> None:
    record = h.record(h.web[3])
    original = record.read_bytes()
    damage_record(h, h.web[3], "flip")  # the only point holding day 3's changes
    _forget_db(h)
    r = cbt("gc", h.vault, "--grace", "0", "--json", env=h.env(tmp_path))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["packs_removed"] >= 1, out  # db's pack was freed
    assert any(str(record) in w for w in out["warnings"]), out["warnings"]
    # the record put back: its point restores, bit for bit (gc kept every block of it)
    record.write_bytes(original)
    _restores(h, h.web[3], tmp_path / "out3", tmp_path)
    _restores(h, h.web[1], tmp_path / "out1", tmp_path)


def test_gc_frees_nothing_when_a_damaged_point_cannot_be_named(h: History,
                                                               tmp_path: Path) -> None:
    """A damaged record whose manifest is damaged too: its blocks cannot be named, so gc
    frees nothing, and says why."""
    record = h.record(h.web[3])
    original = record.read_bytes()
    damage_record(h, h.web[3], "flip")
    manifest = h.manifest(h.web[3], "os")
    saved = manifest.read_bytes()
    flip_byte(manifest)
    _forget_db(h)
    packs = sorted(p.name for p in (h.vault / "packs").rglob("*.pack"))
    r = cbt("gc", h.vault, "--grace", "0", "--json", env=h.env(tmp_path))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["packs_removed"], out["packs_rewritten"]) == (0, 0), out
    assert any("frees nothing" in w for w in out["warnings"]), out["warnings"]
    assert sorted(p.name for p in (h.vault / "packs").rglob("*.pack")) == packs
    record.write_bytes(original)
    manifest.write_bytes(saved)
    _restores(h, h.web[3], tmp_path / "out3", tmp_path)


def test_verify_names_it_and_repair_sets_it_aside(h: History, tmp_path: Path) -> None:
    path = damage_record(h, h.web[2], "flip")
    name = str(path.relative_to(h.vault))
    folder = h.vault / h.opened().manifest_dir(h.web[2])
    manifests = sorted(p.relative_to(h.vault) for p in folder.iterdir())
    assert manifests
    r = cbt("verify", h.vault, "--json", env=h.env(tmp_path))
    assert r.returncode == 2, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == VERIFY_KEYS and all(set(p) == PROBLEM_KEYS for p in out["problems"])
    assert any(str(path) in p["problem"] for p in out["problems"]), out["problems"]
    assert {p["point"] for p in out["problems"] if p["point"]} <= {h.web[2], h.web[3]}
    assert any(p["point"] == h.web[3] for p in out["problems"]), out["problems"]
    r = cbt("verify", h.vault, "--repair", "--json", env=h.env(tmp_path))
    out = json.loads(r.stdout)
    assert r.returncode == 2, r.stderr  # web[3] stays lost
    assert out["repair"]["records_quarantined"] == [name]
    assert out["repair"]["lost_points"] == [h.web[2], h.web[3]]
    assert not path.exists()
    assert (h.vault / "quarantine" / name).read_bytes() != b""
    for m in manifests:
        assert (h.vault / "quarantine" / m).is_file() and not (h.vault / m).exists()
    for d in (h.vault / "quarantine", (h.vault / "quarantine" / name).parent):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    ids, warnings, _ = _list(h, tmp_path)
    assert ids == [h.web[0], h.db, h.web[1]]
    assert any(h.web[3] in w for w in warnings)
    # gc frees again what only the lost points held; the others restore bit for bit
    out = cbt_json("gc", h.vault, "--grace", "0", env=h.env(tmp_path))
    assert not any("frees nothing" in w for w in out["warnings"]), out["warnings"]
    assert out["bytes_freed"] > 0, out
    for pid in (h.web[0], h.web[1], h.db):
        _restores(h, pid, tmp_path / f"after-gc-{pid}", tmp_path)
    # the human form says which points are lost
    path = damage_record(h, h.web[1], "flip")
    r = cbt("verify", h.vault, "--repair", env=h.env(tmp_path))
    assert "quarantine" in r.stdout and path.name in r.stdout, r.stdout
    # (a sealed record's name is opaque: with no point based on it, its id is unknown)
    lost = h.web[1] if not h.encrypted else "unknown"
    assert f"points lost: {lost}" in r.stdout, r.stdout
    # a backup after it works, and its point restores
    line = _backup(h, "web", tmp_path)
    h.copies = {**h.copies, line["recovery_point"]: {
        lb: keep_copy(h.disks / f"{lb}.img", tmp_path / f"{lb}.n") for lb in ("os", "data")}}
    _restores(h, line["recovery_point"], tmp_path / "out-new", tmp_path)


def test_repair_never_follows_a_link_to_quarantine(h: History, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, h.vault / "quarantine")
    path = damage_record(h, h.web[1], "flip")
    r = cbt("verify", h.vault, "--repair", env=h.env(tmp_path))
    line = one_error_line(r)
    assert "link" in line, line
    assert list(outside.iterdir()) == []
    assert path.exists()
    assert cbt_json("list", h.vault, env=h.env(tmp_path))["points"]


def test_repair_sets_aside_a_point_whose_manifest_is_damaged(h: History,
                                                             tmp_path: Path) -> None:
    """Its record and manifests go to quarantine/ (the point is lost: nothing resolves it);
    gc is no longer held back by it, and every other point restores bit for bit."""
    record = h.record(h.web[3])
    flip_byte(h.manifest(h.web[3], "os"))
    out = cbt_json("gc", h.vault, "--grace", "0", env=h.env(tmp_path))
    assert any("frees nothing" in w for w in out["warnings"]), out["warnings"]
    r = cbt("verify", h.vault, "--repair", "--json", env=h.env(tmp_path))
    assert r.returncode == 0, r.stderr
    repair = json.loads(r.stdout)["repair"]
    assert repair["records_quarantined"] == [str(record.relative_to(h.vault))]
    assert repair["lost_points"] == [h.web[3]]
    assert not record.exists() and (h.vault / "quarantine" / record.relative_to(h.vault)).is_file()
    out = cbt_json("gc", h.vault, "--grace", "0", env=h.env(tmp_path))
    assert not any("frees nothing" in w for w in out["warnings"]), out["warnings"]
    assert out["bytes_freed"] > 0, out
    for pid in (*h.web[:3], h.db):
        _restores(h, pid, tmp_path / f"out-{pid}", tmp_path)
