"""``-r/--vault VAULT`` and ``$CBT_VAULT`` on every command that takes a vault, beside the
positional VAULT (which stays): the same answer each way, and one clear line when no
vault or two vaults are named."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.cli import cbt, cbt_json, one_error_line
from helpers.vaults import make_two_points

two_points = pytest.fixture(scope="module")(make_two_points)


def _ids(out: dict[str, object]) -> list[str]:
    return [p["recovery_point"] for p in out["points"]]  # type: ignore[attr-defined,index]


def test_list_three_ways(two_points: tuple[Path, list[str]], tmp_path: Path) -> None:
    vault, ids = two_points
    assert _ids(cbt_json("list", vault)) == ids
    assert _ids(cbt_json("list", "-r", vault)) == ids
    assert _ids(cbt_json("list", "--vault", vault)) == ids
    assert _ids(cbt_json("list", env={"CBT_VAULT": str(vault)})) == ids
    # the positional wins over the environment
    other = tmp_path / "other"
    assert cbt("init", "--encryption", "none", other).returncode == 0
    assert _ids(cbt_json("list", other, env={"CBT_VAULT": str(vault)})) == []


def test_point_moves_over(two_points: tuple[Path, list[str]], tmp_path: Path) -> None:
    """``show -r VAULT POINT`` and ``CBT_VAULT=... show POINT``: POINT is the point."""
    vault, ids = two_points
    want = cbt_json("show", vault, ids[0])
    assert cbt_json("show", "-r", vault, ids[0]) == want
    assert cbt_json("show", ids[0], "--vault", vault) == want
    assert cbt_json("show", ids[0], env={"CBT_VAULT": str(vault)}) == want
    out = tmp_path / "r"
    r = cbt("restore", ids[1], "--to", out, "-q", env={"CBT_VAULT": str(vault)})
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["db.img", "os.img"]
    checked = cbt_json("verify", "-r", vault, ids[1])
    assert checked["points"] == 1 and checked["problems"] == []


def test_backup_disks_move_over(tmp_path: Path) -> None:
    vault = tmp_path / "v"
    assert cbt("init", "--encryption", "none", vault).returncode == 0
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(range(256)) * 1024)
    out = cbt_json("backup", "-r", vault, "--vm", "w", f"a={disk}")
    assert [d["label"] for d in out["disks"]] == ["a"]
    out = cbt_json("backup", "--vm", "w", disk, env={"CBT_VAULT": str(vault)})
    assert [d["label"] for d in out["disks"]] == ["d"]
    assert len(_ids(cbt_json("list", vault))) == 2


def test_no_vault_and_two_vaults(two_points: tuple[Path, list[str]]) -> None:
    vault, _ = two_points
    r = cbt("list")
    assert r.returncode == 2 and "no vault given" in one_error_line(r)
    r = cbt("list", vault, "-r", vault)
    assert r.returncode == 2 and "two vaults given" in one_error_line(r)
    r = cbt("list", env={"CBT_VAULT": "ftp://host/x"})
    assert r.returncode == 2 and "$CBT_VAULT" in one_error_line(r)


def test_quiet_and_verbose_everywhere() -> None:
    """Every command takes -q and -v (not both)."""
    from cbt.cli.main import COMMANDS

    for name in COMMANDS:
        r = cbt(name, "--help")
        assert "--quiet" in r.stdout and "--verbose" in r.stdout, name
    r = cbt("list", "-q", "-v", "x")
    assert r.returncode == 2 and "not allowed with" in one_error_line(r)
