"""The vault commands as scripts see them: exit codes, one-line errors, --json shapes, names.

Every test runs the real ``cbt`` executable.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import KIB, MIB
from helpers.cli import backup_cli, cbt, cbt_json, json_lines, one_error_line
from helpers.images import assert_same_disk, fs_image, read
from helpers.shapes import (
    LIST_DISK_KEYS,
    LIST_KEYS,
    LIST_POINT_KEYS,
    POINT_DISK_KEYS,
    POINT_LINE_KEYS,
    PROBLEM_KEYS,
    PROGRESS_KEYS,
    RESTORE_DISK_KEYS,
    RESTORE_KEYS,
    VERIFY_KEYS,
)
from helpers.truth import block_digests, nblocks
from helpers.vaults import file_tree

import cbt as cbt_api
from cbt.source.synth import make_db_file

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
POINT_ID = re.compile(r"^(?P<vm>[A-Za-z0-9][A-Za-z0-9_-]{0,63})\.(?P<stamp>\d{8}T\d{6}Z)(-\d+)?$")


@pytest.fixture
def disks(tmp_path: Path) -> Path:
    d = tmp_path / "disks"
    d.mkdir()
    fs_image(d / "os.img", 3 * MIB, 101)
    make_db_file(d / "db.img", 1 * MIB + 4096 * 3 + 100, seed=102)
    return d


@pytest.fixture
def vault(tmp_path: Path) -> Path:
    r = cbt("init", "--encryption", "none", tmp_path / "v")
    assert r.returncode == 0, r.stderr
    return tmp_path / "v"


def _stamp(created: str) -> str:
    return created.replace("-", "").replace(":", "")


# -- init and opening ---------------------------------------------------------------


def test_init_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something").write_text("x")
    line = one_error_line(cbt("init", "--encryption", "none", tmp_path / "full"))
    assert str(tmp_path / "full") in line
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["something"]
    (tmp_path / "file").write_text("x")
    one_error_line(cbt("init", "--encryption", "none", tmp_path / "file"))
    (tmp_path / "empty").mkdir()
    assert cbt("init", "--encryption", "none", tmp_path / "empty").returncode == 0
    # now a vault: not empty
    one_error_line(cbt("init", "--encryption", "none", tmp_path / "empty"))
    assert cbt("init", "--encryption", "none", tmp_path / "new" / "nested").returncode == 0
    config = json.loads((tmp_path / "new" / "nested" / "config").read_text())
    assert (config["format_version"], config["encryption"], config["id_key"]) == (3, "none",
                                                                                 "none")


def test_every_command_on_a_non_vault(tmp_path: Path, disks: Path) -> None:
    path = tmp_path / "not-a-vault"
    path.mkdir()
    (path / "file.txt").write_text("hello")
    for args in (["backup", path, disks / "os.img", "--vm", "vm"], ["list", path],
                 ["show", path, "vm.latest"], ["restore", path, "vm.latest", "--to",
                                                tmp_path / "out"],
                 ["verify", path], ["verify", path, "--data"]):
        line = one_error_line(cbt(*args))
        assert line == f"cbt: error: not a cbt vault: {path} (run cbt init)", args
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in path.iterdir()) == ["file.txt"]
    missing = tmp_path / "missing"
    r = cbt("list", missing, "--json")
    assert one_error_line(r) == f"cbt: error: not a cbt vault: {missing} (run cbt init)"
    err = json.loads(r.stdout)
    assert err["type"] == "error" and err["message"] == f"not a cbt vault: {missing} (run cbt init)"
    assert not missing.exists()


@pytest.mark.slow
def test_a_newer_format_is_refused(vault: Path, disks: Path, tmp_path: Path) -> None:
    backup_cli(vault, "vm", disks / "os.img")
    config = json.loads((vault / "config").read_text())
    config["format_version"] = 99
    (vault / "config").write_text(json.dumps(config))
    before = file_tree(vault)
    for args in (["backup", vault, disks / "os.img", "--vm", "vm"], ["list", vault],
                 ["show", vault, "vm.latest"], ["verify", vault],
                 ["restore", vault, "vm.latest", "--to", tmp_path / "out"]):
        line = one_error_line(cbt(*args))
        assert "99" in line and str(vault) in line, line
    assert file_tree(vault) == before
    assert not (tmp_path / "out").exists()


# -- backup --json ----------------------------------------------------------------------


def test_backup_json_lines(vault: Path, disks: Path) -> None:
    r = cbt("backup", vault, disks / "os.img", f"data={disks / 'db.img'}", "--vm", "web",
            "--block-size", "4K", "--json")
    assert r.returncode == 0, r.stderr
    lines = json_lines(r.stdout)
    *progress, point = lines
    assert point["type"] == "point"
    assert set(point) == POINT_LINE_KEYS
    assert progress, "progress lines come first"
    for p in progress:
        assert set(p) == PROGRESS_KEYS and p["type"] == "progress" and p["vm"] == "web"
        assert p["disk"] in ("os", "data")
        assert isinstance(p["bytes_done"], int) and isinstance(p["bytes_total"], int)
        assert 0 <= p["bytes_done"] <= p["bytes_total"]
    assert POINT_ID.match(point["recovery_point"])
    assert point["recovery_point"].startswith("web.")
    assert RFC3339.match(point["created"])
    assert POINT_ID.match(point["recovery_point"])["stamp"] == _stamp(point["created"])
    assert point["vm"] == "web"
    assert (point["consistency"], point["consistency_reason"]) == ("crash", "live read")
    assert point["warnings"] == [] and isinstance(point["seconds"], float)
    assert [d["label"] for d in point["disks"]] == ["os", "data"]
    for d, path in zip(point["disks"], [disks / "os.img", disks / "db.img"], strict=True):
        assert set(d) == POINT_DISK_KEYS
        data = read(path)
        assert Path(d["path"]).resolve() == path.resolve()
        assert d["size"] == len(data) and d["block_size"] == 4 * KIB
        assert d["blocks"] == d["changed_blocks"] == nblocks(len(data), 4 * KIB)
        assert d["bytes_new"] == sum(block_digests(data, 4 * KIB).values())
        assert 0 < d["bytes_stored"] <= d["bytes_new"]
        assert 0 < d["bytes_read"] <= len(data)
        assert isinstance(d["seconds"], float)
        last = [p for p in progress if p["disk"] == d["label"]][-1]
        assert last["bytes_done"] == last["bytes_total"] == d["bytes_read"]


def test_backup_documented_argument_order(vault: Path, disks: Path) -> None:
    """Issue 3's form, ``cbt backup VAULT --vm NAME DISK [DISK ...]``, as scripts write it."""
    r = cbt("backup", vault, "--vm", "web", disks / "os.img", f"data={disks / 'db.img'}")
    assert r.returncode == 0, r.stderr
    point = cbt_api.Vault.open(vault).latest("web")
    assert point is not None and [d.label for d in point.disks] == ["os", "data"]


def test_backup_human_output(vault: Path, disks: Path) -> None:
    r = cbt("backup", vault, disks / "os.img", disks / "db.img", "--vm", "web")
    assert r.returncode == 0, r.stderr
    point = cbt_api.Vault.open(vault).latest("web")
    assert point is not None and point.id in r.stdout
    assert re.search(r"^\s+os\s", r.stdout, re.M) and re.search(r"^\s+db\s", r.stdout, re.M)
    assert not r.stdout.lstrip().startswith("{")
    assert r.stderr == ""


# -- list, show, restore, verify --json -------------------------------------------------


@pytest.mark.slow
def test_list_show_restore_verify_json(vault: Path, disks: Path, tmp_path: Path) -> None:
    first = backup_cli(vault, "web", disks / "os.img", disks / "db.img", "--block-size", "64K")
    with open(disks / "db.img", "r+b") as f:
        f.seek(3 * 4096)
        f.write(b"\x01" * 4096)
    second = backup_cli(vault, "web", disks / "os.img", disks / "db.img")
    other = backup_cli(vault, "mail", disks / "os.img", "--block-size", "64K")

    listed = cbt_json("list", vault)
    assert set(listed) == LIST_KEYS and listed["warnings"] == []
    ids = [p["recovery_point"] for p in listed["points"]]
    assert sorted(ids) == sorted([first["recovery_point"], second["recovery_point"],
                                  other["recovery_point"]])
    assert ids.index(first["recovery_point"]) < ids.index(second["recovery_point"])
    for p in listed["points"]:
        assert set(p) == LIST_POINT_KEYS
        assert RFC3339.match(p["created"]) and p["consistency"] == "crash"
        for d in p["disks"]:
            assert set(d) == LIST_DISK_KEYS
    by_id = {p["recovery_point"]: p for p in listed["points"]}
    assert by_id[first["recovery_point"]]["parent"] is None
    assert by_id[second["recovery_point"]]["parent"] == first["recovery_point"]
    assert by_id[other["recovery_point"]]["parent"] is None
    assert by_id[second["recovery_point"]]["bytes_new"] == 64 * KIB
    assert by_id[other["recovery_point"]]["bytes_new"] == 0
    assert [p["vm"] for p in cbt_json("list", vault, "--vm", "mail")["points"]] == ["mail"]

    shown = cbt_json("show", vault, "web.latest")
    assert set(shown) >= LIST_POINT_KEYS | {"consistency_reason"}
    assert shown["recovery_point"] == second["recovery_point"]
    assert shown["consistency_reason"] == "live read"
    changed = {d["label"]: d["changed_blocks"] for d in shown["disks"]}
    assert changed == {"os": 0, "db": 1}
    for d in shown["disks"]:
        assert set(d) >= LIST_DISK_KEYS | {"changed_blocks"}

    restored = cbt_json("restore", vault, second["recovery_point"], "--to", tmp_path / "out")
    assert set(restored) == RESTORE_KEYS
    assert restored["recovery_point"] == second["recovery_point"]
    for d in restored["disks"]:
        assert set(d) == RESTORE_DISK_KEYS
        src = disks / f"{d['label']}.img"
        assert Path(d["to"]).resolve() == (tmp_path / "out" / f"{d['label']}.img").resolve()
        assert d["size"] == src.stat().st_size
        nonzero = block_digests(read(src), 64 * KIB)
        data = read(src)
        n = nblocks(len(data), 64 * KIB)
        pad = np.zeros(n * 64 * KIB - len(data), np.uint8)
        rows = np.concatenate([data, pad]).reshape(n, 64 * KIB).any(axis=1)
        assert d["blocks_verified"] == int(rows.sum()) >= len(nonzero)
        assert d["bytes_written"] == sum(min(64 * KIB, len(data) - i * 64 * KIB)
                                         for i in np.flatnonzero(rows).tolist())
        assert_same_disk(d["to"], src, 64 * KIB)

    checked = cbt_json("verify", vault)
    assert set(checked) == VERIFY_KEYS
    assert (checked["points"], checked["data"], checked["problems"]) == (3, False, [])
    assert checked["unreferenced_bytes"] == 0 and checked["blocks_checked"] > 0
    checked = cbt_json("verify", vault, first["recovery_point"], "--data")
    assert (checked["points"], checked["data"], checked["problems"]) == (1, True, [])
    assert PROBLEM_KEYS  # the problem shape is checked in test_vault_damage


@pytest.mark.slow
def test_restore_target_rules(vault: Path, disks: Path, tmp_path: Path) -> None:
    bs = backup_cli(vault, "web", disks / "os.img")["disks"][0]["block_size"]
    out = tmp_path / "a" / "b"  # created if missing
    assert cbt("restore", vault, "web.latest", "--to", out).returncode == 0
    assert_same_disk(out / "os.img", disks / "os.img", bs)
    (out / "os.img").write_bytes(b"keep me")
    line = one_error_line(cbt("restore", vault, "web.latest", "--to", out))
    assert "os.img" in line
    assert (out / "os.img").read_bytes() == b"keep me"
    assert cbt("restore", vault, "web.latest", "--to", out, "--force").returncode == 0
    assert_same_disk(out / "os.img", disks / "os.img", bs)
    assert sorted(p.name for p in out.iterdir()) == ["os.img"]
    (tmp_path / "afile").write_text("x")
    one_error_line(cbt("restore", vault, "web.latest", "--to", tmp_path / "afile"))
    one_error_line(cbt("restore", vault, "nosuch.latest", "--to", tmp_path / "c"))
    assert not (tmp_path / "c").exists()


# -- names and references ---------------------------------------------------------------


@pytest.mark.slow
def test_point_ids_same_second_latest_and_prefixes(tmp_path: Path, disks: Path) -> None:
    v = cbt_api.Vault.init(tmp_path / "v")
    made = [v.backup("vm", [disks / "db.img"], created="2030-01-02T03:04:05Z").id
            for _ in range(11)]
    base = "vm.20300102T030405Z"
    assert made == [base] + [f"{base}-{n}" for n in range(2, 12)]
    other_point = v.backup("other", [disks / "os.img"])
    other = other_point.id
    vault = tmp_path / "v"
    listed = [p["recovery_point"] for p in cbt_json("list", vault, "--vm", "vm")["points"]]
    assert listed == made, "-10 and -11 sort after -9"
    assert cbt_json("show", vault, "vm.latest")["recovery_point"] == f"{base}-11"
    assert cbt_json("show", vault, base)["recovery_point"] == base  # exact id wins
    assert cbt_json("show", vault, f"{base}-11")["recovery_point"] == f"{base}-11"
    assert cbt_json("show", vault, "oth")["recovery_point"] == other  # unique prefix
    assert cbt_json("show", vault, "other.latest")["recovery_point"] == other
    one_error_line(cbt("show", vault, f"{base}-1"))  # -1x: ambiguous
    one_error_line(cbt("show", vault, "nosuchvm.latest"))
    one_error_line(cbt("show", vault, "zzz"))
    r = cbt("restore", vault, "oth", "--to", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert_same_disk(tmp_path / "out" / "os.img", disks / "os.img",
                     other_point.disks[0].block_size)


@pytest.mark.slow
def test_cli_point_ids(vault: Path, disks: Path) -> None:
    ids = [backup_cli(vault, "web", disks / "db.img")["recovery_point"] for _ in range(3)]
    assert len(set(ids)) == 3
    for pid in ids:
        m = POINT_ID.match(pid)
        assert m and m["vm"] == "web"
    assert [p["recovery_point"] for p in cbt_json("list", vault)["points"]] == ids


def test_disk_labels(vault: Path, disks: Path, tmp_path: Path) -> None:
    (disks / "noext").write_bytes(b"\x07" * 5000)
    (disks / "a=b.img").write_bytes(b"\x08" * 5000)
    point = backup_cli(vault, "vm", disks / "os.img", f"data={disks / 'db.img'}", disks / "noext",
                       f"L={disks / 'a=b.img'}")
    assert [d["label"] for d in point["disks"]] == ["os", "data", "noext", "L"]
    paths = [Path(d["path"]).resolve() for d in point["disks"]]
    assert paths == [(disks / n).resolve() for n in ("os.img", "db.img", "noext", "a=b.img")]
    # 'disks/a=b.img': what precedes '=' is no label, so it is a path (and a=b no label)
    line = one_error_line(cbt("backup", vault, disks / "a=b.img", "--vm", "vm2"))
    assert "label" in line
    # two disks with one label
    line = one_error_line(cbt("backup", vault, disks / "os.img", f"os={disks / 'db.img'}",
                              "--vm", "vm3"))
    assert "label" in line and "os" in line
    line = one_error_line(cbt("backup", vault, disks / "os.img", "--vm", "bad.name"))
    assert "bad.name" in line
    assert [p.vm for p in cbt_api.Vault.open(vault).points()] == ["vm"]


def _lock(name: str) -> bool:
    """A lock file: its holder is rewritten, a VM's made, by a backup that fails."""
    return name == "lock" or name.startswith("locks/")


@pytest.mark.slow
def test_block_size_is_fixed_by_the_first_backup(vault: Path, disks: Path) -> None:
    first = backup_cli(vault, "vm", disks / "os.img", "--block-size", "4K")
    assert first["disks"][0]["block_size"] == 4096
    before = file_tree(vault)
    line = one_error_line(cbt("backup", vault, disks / "os.img", "--vm", "vm",
                              "--block-size", "64K"))
    assert "block size" in line and "os" in line
    assert {k: v for k, v in file_tree(vault).items() if not _lock(k)} == \
        {k: v for k, v in before.items() if not _lock(k)}
    again = backup_cli(vault, "vm", disks / "os.img")
    assert again["disks"][0]["block_size"] == 4096
    assert backup_cli(vault, "vm", disks / "os.img", "--block-size", "4096")["disks"][0][
        "block_size"] == 4096
    one_error_line(cbt("backup", vault, disks / "os.img", "--block-size", "3K", "--vm", "vm2"))
    default = backup_cli(vault, "vm3", disks / "os.img")["disks"][0]["block_size"]
    assert default & (default - 1) == 0 and 4 * KIB <= default <= 4 * MIB


def test_missing_disk_makes_no_point(vault: Path, disks: Path, tmp_path: Path) -> None:
    backup_cli(vault, "vm", disks / "os.img")
    before = {k: v for k, v in file_tree(vault).items() if not _lock(k)}
    for bad in (tmp_path / "nope.img", tmp_path):
        r = cbt("backup", vault, disks / "os.img", bad, "--json", "--vm", "vm")
        line = one_error_line(r)
        assert str(bad) in line
        assert json_lines(r.stdout)[-1]["type"] == "error"
        assert {k: v for k, v in file_tree(vault).items() if not _lock(k)} == before
    assert len(cbt_json("list", vault)["points"]) == 1
