"""Issue 12 review of "damage stays local": attacks on the landed code that found a problem.

The same real history as ``test_damage_local_cli`` (``helpers.damage``: VM web on four
days, whose os and data manifests form the chain seq 0..3 with bases web[0], web[0],
web[2]; VM db once), plain and encrypted.  Every restore is compared with the copy
of the disk taken at its backup.
"""

from __future__ import annotations

import json
import os
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


def test_repair_keeps_a_damaged_point_whose_healthy_manifests_others_need(
        h: History, tmp_path: Path) -> None:
    """web[0]'s os manifest is damaged: the next backup takes a new os baseline, but its data
    disk is still a delta whose chain goes down to web[0]'s (healthy) data manifest.  Repair
    must not set web[0] aside with that manifest: the new point does not need the damaged
    file, restored bit for bit before repair, and must after it (and after gc)."""
    manifest = h.manifest(h.web[0], "os")
    manifest.write_bytes(manifest.read_bytes()[:100])
    scribble(h.disks / "os.img", 180, pages=4)
    scribble(h.disks / "data.img", 181, pages=2)
    r = _ok(cbt("backup", h.vault, "--vm", "web", f"os={h.disks / 'os.img'}",
                f"data={h.disks / 'data.img'}", "--json", env=h.env(tmp_path)))
    (line,) = result_lines(r.stdout)
    new = line["recovery_point"]
    record = h.opened().load_point(new)
    assert record.disk("os").base is None
    assert record.disk("data").base is not None  # the data chain is healthy: kept
    h.copies = {**h.copies, new: {lb: keep_copy(h.disks / f"{lb}.img", tmp_path / f"{lb}.new")
                                  for lb in ("os", "data")}}
    assert _restore_is_true_or_refused(h, new, tmp_path / "before", tmp_path)
    r = cbt("verify", h.vault, "--repair", "--json", env=h.env(tmp_path))
    assert "Traceback" not in r.stderr
    repair = json.loads(r.stdout)["repair"]
    assert new not in repair["lost_points"], repair
    assert set(repair["lost_points"]) == set(h.web), repair
    # gc is not held back for ever by the damaged manifest: repair set that file aside
    r = _ok(cbt("gc", h.vault, "--grace", "0", "--json", env=h.env(tmp_path)))
    (out,) = result_lines(r.stdout)
    assert not any("frees nothing" in w for w in out["warnings"]), out["warnings"]
    assert not manifest.exists()
    assert _restore_is_true_or_refused(h, new, tmp_path / "after", tmp_path)
    assert _restore_is_true_or_refused(h, h.db, tmp_path / "db", tmp_path)


@pytest.mark.parametrize("how", ["flip", "empty"])
def test_a_damaged_key_slot_locks_out_only_its_own_passphrase(tmp_path: Path, how: str) -> None:
    """Two passphrases, two key slots; one slot damaged.  The other passphrase still opens
    the vault (every command: it was 'bad key slot' for both); the damaged one's passphrase
    gets one line naming the file; the damaged slot can be removed."""
    from helpers.images import fs_image
    from helpers.vaults import PASSWORD, encrypted_env

    env = encrypted_env(tmp_path)
    second = tmp_path / "second"
    second.write_text("another passphrase\n")
    env2 = {**env, "CBT_PASSWORD_FILE": str(second)}
    vault = tmp_path / "vault"
    _ok(cbt("init", vault, "--kdf-log-n", "10", env=env))
    r = _ok(cbt("key", "add", vault, "--new-password-file", second, "--kdf-log-n", "10",
                "--json", env=env))
    (added,) = result_lines(r.stdout)
    slot = vault / "keys" / f"{added['added']}.json"
    assert slot.is_file() and PASSWORD
    fs_image(tmp_path / "os.img", 256 * 1024, 5)
    _ok(cbt("backup", vault, "--vm", "web", f"os={tmp_path / 'os.img'}", "--json", env=env))
    raw = bytearray(slot.read_bytes())
    if how == "flip":
        raw[len(raw) // 2] ^= 0xFF
    slot.write_bytes(bytes(raw) if how == "flip" else b"")
    r = _ok(cbt("list", vault, "--json", env=env))
    assert [p["vm"] for p in json.loads(r.stdout)["points"]] == ["web"]
    _ok(cbt("restore", vault, "web.latest", "--to", tmp_path / "out", "--json", env=env))
    r = cbt("list", vault, env=env2)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert str(slot) in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    _ok(cbt("key", "remove", vault, added["added"], "--json", env=env))
    assert not slot.exists()


@pytest.mark.parametrize("how", ["flip", "empty", "other-json"])
def test_a_damaged_config_is_named_not_taken_for_no_vault(h: History, tmp_path: Path,
                                                          how: str) -> None:
    """The vault's config damaged: every command fails with one line naming the file as
    damaged, not 'not a cbt vault ... (run cbt init)' (init refuses a folder that holds one)."""
    config = h.vault / "config"
    raw = bytearray(config.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    config.write_bytes({"flip": bytes(raw), "empty": b"", "other-json": b"[1, 2]\n"}[how])
    for args in (["list", h.vault], ["restore", h.vault, h.web[0], "--to", tmp_path / "o"]):
        r = cbt(*args, env=h.env(tmp_path))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert str(config) in r.stderr and "run cbt init" not in r.stderr, r.stderr


@pytest.mark.parametrize("what", ["link", "folder"])
def test_a_record_replaced_by_a_link_or_a_folder_is_damage_not_absence(
        h: History, tmp_path: Path, what: str) -> None:
    """web[3]'s record replaced by a symbolic link (to another record) or a folder: the
    point is named damaged (list warns, verify names it), and a backup does not take its
    manifests for a killed run's leftovers and delete them (the record put back, the point
    restores); repair removes a link (its manifests to quarantine/), leaves a folder."""
    record = h.record(h.web[3])
    saved = record.read_bytes()
    record.unlink()
    if what == "link":
        record.symlink_to(h.record(h.web[1]))
    else:
        record.mkdir()
    manifests = sorted((h.vault / h.opened().manifest_dir(h.web[3])).iterdir())
    r = _ok(cbt("list", h.vault, "--json", env=h.env(tmp_path)))
    out = json.loads(r.stdout)
    assert h.web[3] not in [p["recovery_point"] for p in out["points"]]
    assert any(str(record) in w for w in out["warnings"]), out["warnings"]
    r = cbt("verify", h.vault, "--json", env=h.env(tmp_path))
    assert r.returncode == 2 and str(record) in r.stdout, r.stdout
    _ok(cbt("backup", h.vault, "--vm", "db", f"db={h.disks / 'db.img'}", "--json",
            env=h.env(tmp_path)))
    assert all(m.is_file() for m in manifests)
    if what == "link":
        record.unlink()
    else:
        record.rmdir()
    record.write_bytes(saved)
    assert _restore_is_true_or_refused(h, h.web[3], tmp_path / "back", tmp_path)
    # repair: a link goes, with the point's manifests to quarantine/; a folder stays
    record.unlink()
    if what == "link":
        record.symlink_to(h.record(h.web[1]))
    else:
        record.mkdir()
    r = cbt("verify", h.vault, "--repair", "--json", env=h.env(tmp_path))
    assert "Traceback" not in r.stderr and r.returncode in (0, 2), r.stderr
    assert json.loads(r.stdout)["repair"]["lost_points"] == [h.web[3]] or h.encrypted
    assert os.path.lexists(record) == (what == "folder")
    assert all(m.is_file() for m in manifests) == (what == "folder")
    _ok(cbt("gc", h.vault, "--grace", "0", "--json", env=h.env(tmp_path)))
    for pid in (h.web[0], h.web[1], h.web[2], h.db):
        assert _restore_is_true_or_refused(h, pid, tmp_path / f"o-{pid}", tmp_path)


def test_a_manifest_swapped_for_another_points_is_refused_not_restored(
        h: History, tmp_path: Path) -> None:
    """web[2]'s os manifest replaced by web[1]'s (a whole, valid manifest of the wrong
    point): restore of web[2] and of web[3] (a delta on it) wrote web[1]'s disk, exit 0.
    The record's manifest checksum says which file it committed."""
    h.manifest(h.web[2], "os").write_bytes(h.manifest(h.web[1], "os").read_bytes())
    for pid in (h.web[2], h.web[3]):
        assert not _restore_is_true_or_refused(h, pid, tmp_path / f"o-{pid}", tmp_path)
    for pid in (h.web[0], h.web[1], h.db):
        assert _restore_is_true_or_refused(h, pid, tmp_path / f"o-{pid}", tmp_path)
    # the next backup of web does not diff against the wrong manifest: it takes a new
    # baseline of os (said so), and restores bit for bit
    scribble(h.disks / "os.img", 190, pages=3)
    r = _ok(cbt("backup", h.vault, "--vm", "web", f"os={h.disks / 'os.img'}",
                f"data={h.disks / 'data.img'}", "--json", env=h.env(tmp_path)))
    (line,) = result_lines(r.stdout)
    new = line["recovery_point"]
    h.copies = {**h.copies, new: {lb: keep_copy(h.disks / f"{lb}.img", tmp_path / f"{lb}.new")
                                  for lb in ("os", "data")}}
    assert _restore_is_true_or_refused(h, new, tmp_path / "o-new", tmp_path)
