"""The vault is untrusted input: what an attacker with write access to it can make cbt do
(the command-line side is tests/cli/test_untrusted_cli.py).

Each attack of issue 11 is replayed as the attacker would: a point record is
rewritten and its checksum recomputed here (it is an unkeyed BLAKE3 of the
canonical JSON, which anyone can compute), a folder is swapped for a symbolic
link.  Truth is the host's file system, looked at without cbt.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import KIB
from helpers.images import fs_image
from helpers.system import loop_xfs, need_root_tools
from helpers.vaults import (
    PASSWORD,
    clone_two_points,
    fast_kdf,
    forge_record,
    make_two_points,
    set_disk,
    vault_state,
)

import cbt as cbt_api
from cbt.core.errors import CbtError
from cbt.core.native import fast
from cbt.format import records
from cbt.format.records import CorruptPointError, DiskRecord, PointRecord
from cbt.ops.gc import gc
from cbt.ops.prune import PruneRequest, prune
from cbt.ops.restore import image_name
from cbt.repo.storage import LocalStorage, MemoryStorage, Storage

BS = 64 * KIB


# -- a small vault, and the attacker's tools ------------------------------------------------


two_points = pytest.fixture(scope="module")(make_two_points)
vault = pytest.fixture(clone_two_points)
forge = forge_record


def set_key(key: str, value: object) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        body[key] = value
    return change


# -- attack 1: restore writes outside --to --------------------------------------------------


def test_restore_refuses_a_label_that_is_no_plain_name() -> None:
    """Restore's own guard, behind the record's checks: a label is a file name, nothing more."""
    disk = DiskRecord("../../x", "/d", 4096, 4096, 1, 1, 0, 0, 0, 0.0,
                      "manifests/web.20260101T020000Z/x.arrow", "0" * 64, 0, None)
    point = PointRecord("web.20260101T020000Z", "web", "2026-01-01T02:00:00Z", "crash", "",
                        None, [disk], 0, 0, 0.0)
    for bad in ("../../x", "/abs", "a/b", "..", "", "a\0b", "os\n"):
        with pytest.raises(CbtError, match=r"web\.20260101T020000Z"):
            image_name(point, bad)
    assert image_name(point, "os") == "os.img"


def test_a_name_with_a_final_newline_is_no_plain_name() -> None:
    """A label, a VM name or a point id ending in a newline (which a pattern ending in
    ``$`` lets through) makes the record damaged: no file ``os\n.img`` is restored or
    mounted, no folder named so."""
    disk = DiskRecord("os", "/d", 4096, 4096, 1, 1, 0, 0, 0, 0.0,
                      "manifests/web.20260101T020000Z/os.arrow", "0" * 64, 0, None)
    point = PointRecord("web.20260101T020000Z", "web", "2026-01-01T02:00:00Z", "crash", "",
                        None, [disk], 0, 0, 0.0)
    assert point.problem() is None
    disk.label = "os\n"
    assert "invalid disk label" in (point.problem() or "")
    disk.label = "os"
    point.vm = "web\n"
    assert point.problem() is not None
    point.vm, point.id = "web", "web.20260101T020000Z\n"
    assert "is not <vm>" in (point.problem() or "")
    assert not records.is_point_id("web.20260101T020000Z\n")


# -- attack 2: prune deletes any file ---------------------------------------------------------


def _keep_latest(points: list[PointRecord]) -> dict[str, list[str]]:
    return {p.id: (["latest"] if p is points[-1] else []) for p in points}


def test_attack2_prune_never_deletes_a_manifest_named_by_a_record(
        vault: tuple[Path, list[str]], tmp_path: Path) -> None:
    v, ids = vault
    victim = tmp_path / "precious.txt"
    victim.write_text("not yours")
    forge(v, ids[0], set_disk("manifest", str(victim)))
    state = vault_state(v)
    # issue 12: the bad record is damage that stays local: prune leaves it (and the point
    # based on it) where it is, names it, and deletes nothing it names
    result = prune(cbt_api.Vault.open(v), PruneRequest(keep=_keep_latest,
                                                       expired=lambda vm, created: False))
    assert any(f"points/{ids[0]}.json" in w for w in result.warnings), result.warnings
    assert victim.read_text() == "not yours"
    assert vault_state(v) == state, "prune changed nothing"


def test_attack2_a_relative_manifest_name_is_refused_too(vault: tuple[Path, list[str]]) -> None:
    """A manifest name inside the vault, but not this disk's, is refused as well."""
    v, ids = vault
    forge(v, ids[0], set_disk("manifest", f"manifests/{ids[1]}/os.arrow"))
    with pytest.raises(CorruptPointError, match="manifest"):
        cbt_api.Vault.open(v).load_point(ids[0])


def test_manifest_name_is_computed_by_the_vault(vault: tuple[Path, list[str]]) -> None:
    v, ids = vault
    opened = cbt_api.Vault.open(v)
    assert opened.manifest_name(ids[0], "os") == f"manifests/{ids[0]}/os.arrow"
    names: list[str] = []
    opened.resolve(opened.load_point(ids[1]), "db", names)
    assert names[0] == opened.manifest_name(ids[1], "db")


def test_prune_removes_only_snapshot_shaped_paths(vault: tuple[Path, list[str]],
                                                  tmp_path: Path) -> None:
    """The kept-snapshots registry names host paths; prune removes only what a job of
    the VM could have made, never a file or folder the registry merely names."""
    v, ids = vault
    victim_dir = tmp_path / "home"
    victim_dir.mkdir()
    (victim_dir / "f").write_text("x")
    snap_dir = tmp_path / "snaps" / "web"
    snap_dir.mkdir(parents=True)
    real = snap_dir / "os.web.20260101T020000Z.a1b2c3.img"
    real.write_text("snapshot")
    entry = {"recovery_point": ids[0], "vm": "web", "created": "2026-01-01T02:00:00Z",
             "disks": {"os": str(real)},
             "paths": [str(victim_dir), str(tmp_path / "snaps" / "web" / ".." / "x"),
                       "relative.img", str(real)]}
    (v / "snapshots").mkdir()
    (v / "snapshots" / f"{ids[0]}.json").write_text(json.dumps(entry))
    prune(cbt_api.Vault.open(v), PruneRequest(keep=_keep_latest,
                                              expired=lambda vm, created: False))
    assert (victim_dir / "f").read_text() == "x"
    assert not real.exists()


# -- attack 3: gc empties whatever trash/ points to --------------------------------------------


# -- the storage never follows a link inside the vault -----------------------------------------


def test_storage_refuses_links_inside_the_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.json").write_text("secret")
    root = tmp_path / "v"
    s = LocalStorage.create(root)
    s.put("points/a.json", b"a")
    (root / "points" / "link.json").symlink_to(outside / "secret.json")
    (root / "jobs").symlink_to(outside)
    for call in (lambda: s.get("points/link.json"), lambda: s.map("points/link.json"),
                 lambda: s.read_range("points/link.json", 0, 3),
                 lambda: s.stat("points/link.json"), lambda: s.touch("points/link.json"),
                 lambda: s.get("jobs/secret.json"), lambda: s.list("jobs"),
                 lambda: s.put("jobs/new.json", b"x"), lambda: s.delete("jobs/secret.json"),
                 lambda: s.rename("points/a.json", "jobs/a.json"),
                 lambda: s.rename("points/link.json", "points/b.json"),
                 lambda: s.sync("jobs"), lambda: s.make_prefix("jobs")):
        with pytest.raises(OSError) as info:
            call()
        assert isinstance(info.value, CbtError)
        assert info.value.errno in (errno.ELOOP, errno.ENOENT), info.value
    assert not s.exists("points/link.json")
    assert s.list("points") == ["points/a.json"], "links are not listed"
    assert s.list("") == ["points/a.json"]
    s.delete("points/link.json")  # the link itself goes, never what it names
    assert not (root / "points" / "link.json").is_symlink()
    assert sorted(os.listdir(outside)) == ["secret.json"]
    assert (outside / "secret.json").read_text() == "secret"


def test_storage_lock_is_never_a_link(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.write_text("do not truncate")
    s = LocalStorage.create(tmp_path / "v")
    (tmp_path / "v" / "lock").symlink_to(outside)
    with pytest.raises(OSError) as info:
        s.lock("lock").acquire(0)
    assert info.value.errno == errno.ELOOP
    assert outside.read_text() == "do not truncate"


def test_the_vault_root_may_be_a_link(vault: tuple[Path, list[str]], tmp_path: Path) -> None:
    v, ids = vault
    link = tmp_path / "link"
    link.symlink_to(v)
    opened = cbt_api.Vault.open(link)
    assert [p.id for p in opened.points()] == ids
    opened.restore(ids[1], tmp_path / "out")
    assert (tmp_path / "out" / "os.img").is_file()


@pytest.mark.parametrize("make", [LocalStorage, lambda root: MemoryStorage()])
@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a//b", "a/../../b", "a\0b", "",
                                  "./a", "a/"])
def test_storage_names_stay_inside_the_root(tmp_path: Path,
                                            make: Callable[[Path], Storage],
                                            name: str) -> None:
    s = make(tmp_path / "v")
    (tmp_path / "v").mkdir()
    for call in (lambda: s.get(name), lambda: s.put(name, b"x"), lambda: s.delete(name),
                 lambda: s.exists(name), lambda: s.rename("a", name)):
        with pytest.raises(ValueError, match="invalid name"):
            call()
    assert list(tmp_path.iterdir()) == [tmp_path / "v"]
    assert not os.listdir(tmp_path / "v")
    if name not in ("", "a/"):
        with pytest.raises(ValueError, match="invalid name"):
            s.list(name)


# -- point records are checked when read -----------------------------------------------------

BAD_RECORDS: dict[str, Callable[[dict[str, Any]], None]] = {
    "id of another vm": set_key("id", "db.20260101T020000Z"),
    "id without a time": set_key("id", "web.yesterday"),
    "id with a path": set_key("id", "../web.20260101T020000Z"),
    "vm not a name": set_key("vm", "web/x"),
    "vm not a string": set_key("vm", 7),
    "label not a name": set_disk("label", "os disk"),
    "label too long": set_disk("label", "a" * 65),
    "label twice": set_disk("label", "db", 0),
    "size negative": set_disk("size", -1),
    "size a float": set_disk("size", 1048576.0),
    "seq a bool": set_disk("seq", True),
    "size too large": set_disk("size", 2**63 + 1),
    "block size not a power of two": set_disk("block_size", 3 * 4096),
    "block size too small": set_disk("block_size", 2048),
    "block size too large": set_disk("block_size", 8 << 20),
    "blocks disagree with size": set_disk("blocks", 3),
    "changed blocks negative": set_disk("changed_blocks", -1),
    "seq negative": set_disk("seq", -2),
    "base not a point id": set_disk("base", "/etc/passwd"),
    "parent not a point id": set_key("parent", "../../x"),
    "path not a string": set_disk("path", ["x"]),
    "checksum of manifest not hex": set_disk("manifest_checksum", "zz"),
    "created not a string": set_key("created", 20260101),
    "hidden not a bool": set_key("hidden", "yes"),
    "warnings not strings": set_key("warnings", [1]),
    "bytes_new a string": set_key("bytes_new", "5"),
    "seconds negative": set_key("seconds", -1.0),
    "disks not a list": set_key("disks", {"os": 1}),
    "disk not an object": set_key("disks", [1]),
    "an unknown disk key": set_disk("extra", 1),
    "format version a string": set_key("format_version", "1"),
}


@pytest.mark.parametrize("what", sorted(BAD_RECORDS))
def test_a_bad_record_is_corrupt_naming_its_file(vault: tuple[Path, list[str]],
                                                 what: str) -> None:
    v, ids = vault
    forge(v, ids[1], BAD_RECORDS[what])
    with pytest.raises(CorruptPointError, match=f"points/{ids[1]}.json"):
        cbt_api.Vault.open(v).load_point(ids[1])


def test_a_record_whose_name_is_not_its_id_is_corrupt(vault: tuple[Path, list[str]]) -> None:
    v, ids = vault
    other = "web.20260103T020000Z"
    forge(v, ids[1], lambda body: None, name=other)  # a copy under another name
    opened = cbt_api.Vault.open(v)
    with pytest.raises(CorruptPointError, match=f"points/{other}.json.*{ids[1]}"):
        opened.load_point(other)
    (v / "points" / f"{other}.json").rename(v / "points" / "evil name.json")
    # issue 12: skipped and named, the other records still read
    warnings: list[str] = []
    assert [r.id for r in opened.records(warnings=warnings)] == ids
    assert len(warnings) == 1 and "points/evil name.json" in warnings[0], warnings
    assert [d.name for d in opened.damaged_records()] == ["points/evil name.json"]


def test_good_records_still_read(vault: tuple[Path, list[str]]) -> None:
    """Every field at its bound is accepted (the forged copy only changes the checksum)."""
    v, ids = vault
    forge(v, ids[1], lambda body: None)
    point = cbt_api.Vault.open(v).load_point(ids[1])
    assert point.id == ids[1] and [d.label for d in point.disks] == ["os", "db"]
    assert records.is_point_id("web.20260101T020000Z-12")
    assert not records.is_point_id("web.20260101T020000Z-0")
    assert (records.MIN_BLOCK, records.MAX_BLOCK) == (fast.MIN_BLOCK, fast.MAX_BLOCK)


def test_a_delta_chain_that_loops_is_corrupt(vault: tuple[Path, list[str]]) -> None:
    v, ids = vault
    forge(v, ids[1], set_disk("base", ids[1], disk=1))  # a delta based on itself
    opened = cbt_api.Vault.open(v)
    with pytest.raises(CorruptPointError, match="not earlier in the chain"):
        opened.resolve(opened.load_point(ids[1]), "db")


def test_verify_names_a_bad_record_as_a_problem(vault: tuple[Path, list[str]]) -> None:
    v, ids = vault
    forge(v, ids[0], set_key("vm", "db"))
    result = cbt_api.Vault.open(v).verify()
    # the later point's deltas are based on the bad one: damaged too, naming the same file
    assert result.problems[0].point == ids[0]
    assert {p.point for p in result.problems} == set(ids)
    assert all(f"points/{ids[0]}.json" in p.problem for p in result.problems), result.problems


# -- permissions ----------------------------------------------------------------------------


def _modes(root: Path) -> tuple[set[str], set[str]]:
    dirs, files = set(), set()
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            dirs.add(oct(stat.S_IMODE(os.stat(Path(dirpath, d)).st_mode)))
        for f in filenames:
            files.add(oct(stat.S_IMODE(os.stat(Path(dirpath, f)).st_mode)))
    dirs.add(oct(stat.S_IMODE(os.stat(root).st_mode)))
    return dirs, files


@pytest.mark.usefixtures("umask0")
def test_vault_folders_are_0700_and_files_0600(tmp_path: Path) -> None:
    fs_image(tmp_path / "os.img", 1 << 20, 5)
    v = cbt_api.Vault.init(tmp_path / "deep" / "vault")
    v.backup("web", [f"os={tmp_path / 'os.img'}"], block_size=BS, workers=1)
    gc(v, grace=0)
    dirs, files = _modes(tmp_path / "deep" / "vault")
    assert dirs == {"0o700"}, dirs
    assert files == {"0o600"}, files
    assert {"locks", "gc.lock", "config"} <= set(os.listdir(tmp_path / "deep" / "vault"))


@pytest.mark.usefixtures("umask0")
@pytest.mark.parametrize("provider", ["copy", "reflink"])
def test_snapshots_keep_the_mode_of_their_disk(tmp_path: Path, provider: str) -> None:
    if provider == "reflink":  # on a file system that clones: a loop-mounted XFS
        need_root_tools("mkfs.xfs", "losetup")
        with loop_xfs(tmp_path) as mnt:
            _snapshot_modes(mnt, provider)
    else:
        _snapshot_modes(tmp_path, provider)


def _snapshot_modes(tmp_path: Path, provider: str) -> None:
    from cbt.source.snapshot import take

    disk = fs_image(tmp_path / "os.img", 1 << 20, 6)
    for mode in (0o600, 0o640):
        os.chmod(disk, mode)
        snaps = take("web", f"j{mode}", {"os": str(disk)}, {"os": provider},
                     str(tmp_path / "snaps"))
        try:
            assert stat.S_IMODE(os.stat(snaps.read_paths["os"]).st_mode) == mode
        finally:
            snaps.discard()


# -- JSON nested too deeply for the parser ----------------------------------------------------

DEEP = b"[" * 2000 + b"]" * 2000  # (json recurses: past ~1000 levels a RecursionError)


def test_json_nested_too_deeply_is_damage_named_by_every_reader_of_a_vault(
        vault: tuple[Path, list[str]], tmp_path: Path) -> None:
    """A point record, a key slot, a lock holder's record and the config itself, each a
    JSON document nested 2,000 deep: each is damage named by its file, not a traceback."""
    from helpers.cli import cbt, one_error_line

    v, ids = vault
    record = v / "points" / f"{ids[1]}.json"
    record.chmod(0o600)
    record.write_bytes(DEEP)
    with pytest.raises(CorruptPointError, match=f"points/{ids[1]}.json"):
        cbt_api.Vault.open(v).load_point(ids[1])
    r = cbt("list", v)
    assert r.returncode == 0 and f"points/{ids[1]}.json" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    (v / "config").chmod(0o600)
    (v / "config").write_bytes(DEEP)
    line = one_error_line(cbt("list", v))
    assert "config" in line and "damaged" in line, line
    enc = tmp_path / "enc"
    cbt_api.Vault.init(enc, encryption="aes-256-gcm", passphrase=PASSWORD, kdf=fast_kdf())
    (slot,) = (enc / "keys").iterdir()
    slot.chmod(0o600)
    slot.write_bytes(DEEP)
    with pytest.raises(CbtError, match=slot.name):
        cbt_api.Vault.open(enc, passphrase=PASSWORD)
