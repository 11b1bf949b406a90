"""Review of the ``-r/--vault`` / ``$CBT_VAULT`` seam: the parses that went wrong.

With ``$CBT_VAULT`` set, a command whose last positional takes a list (backup's disks,
forget's and stats' points) read its first disk or point as the vault; a directory in
the current one named like a point was read as a vault; ``-r`` beside a positional vault
was read as a point of the ``-r`` one.  Each is checked against what the vault holds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from helpers.cli import cbt, cbt_json, one_error_line
from helpers.vaults import make_two_points

two_points = pytest.fixture(scope="module")(make_two_points)


def _env(vault: Path) -> dict[str, str]:
    return {"CBT_VAULT": str(vault)}


def test_env_vault_with_two_disks(tmp_path: Path) -> None:
    """``CBT_VAULT=V cbt backup --vm w D1 D2``: both are disks (D1 was taken as the vault)."""
    vault = tmp_path / "v"
    assert cbt("init", "--encryption", "none", vault).returncode == 0
    disks = []
    for name in ("d1", "d2"):
        disk = tmp_path / f"{name}.img"
        disk.write_bytes(name.encode() * 65536)
        disks.append(disk)
    out = cbt_json("backup", "--vm", "w", *disks, env=_env(vault))
    assert sorted(d["label"] for d in out["disks"]) == ["d1", "d2"]
    assert len(cbt_json("list", vault)["points"]) == 1


def test_env_vault_with_two_points(two_points: tuple[Path, list[str]]) -> None:
    """``forget P1 P2`` and ``stats P1 P2`` under ``$CBT_VAULT``: both are points."""
    vault, ids = two_points
    out = cbt_json("forget", "--dry-run", *ids, env=_env(vault))
    assert sorted(p["recovery_point"] for p in out["points"] if not p["keep"]) == ids
    out = cbt_json("stats", *ids, env=_env(vault))
    assert sorted(p["recovery_point"] for p in out["points"]) == ids
    # the positional vault still wins when it is one
    out = cbt_json("stats", vault, *ids, env={"CBT_VAULT": "/nonexistent/x"})
    assert sorted(p["recovery_point"] for p in out["points"]) == ids


def test_point_named_directory_in_cwd(two_points: tuple[Path, list[str]],
                                      tmp_path: Path) -> None:
    """A directory named like the point (a restore's, say) is not a vault."""
    vault, ids = two_points
    (tmp_path / ids[1]).mkdir()
    r = cbt("verify", ids[1], "--json", env=_env(vault), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert '"points":1' in r.stdout


def test_two_vaults_refused(two_points: tuple[Path, list[str]], tmp_path: Path) -> None:
    """``-r V2`` beside a positional vault: refused, not read as a point of V2."""
    vault, ids = two_points
    other = tmp_path / "other"
    assert cbt("init", "--encryption", "none", other).returncode == 0
    for argv in (["stats", vault, "-r", other], ["forget", vault, ids[0], "-r", other],
                 ["verify", "-r", other, vault]):
        r = cbt(*argv)
        assert "two vaults given" in one_error_line(r), argv
    r = cbt("list", "-r", vault, "--vault", other)
    assert "two vaults given" in one_error_line(r)
    assert cbt_json("list", "-r", vault, "--vault", vault)["points"]
    # -r and one argument too many: named as such, not as a second vault
    r = cbt("show", "-r", vault, ids[0], "--", "extra")
    assert "unrecognized arguments: extra" in one_error_line(r)


def _parse(argv: list[str]) -> argparse.Namespace:
    from cbt.cli.main import _settle_common, command_parser

    parser, _ = command_parser(argv[0])
    args = parser.parse_intermixed_args(argv[1:])
    _settle_common(parser, args)
    return args


@pytest.mark.parametrize(("argv", "env", "want"), [
    (["mount", "-r", "V", "MNT"], None, ("V", None, "MNT")),
    (["mount", "-r", "V", "P", "MNT"], None, ("V", "P", "MNT")),
    (["mount", "P", "MNT", "--vault", "V"], None, ("V", "P", "MNT")),
    (["mount", "MNT"], "V", ("V", None, "MNT")),
    (["mount", "P", "MNT"], "V", ("V", "P", "MNT")),
    (["mount", "V2", "P", "MNT"], "V", ("V2", "P", "MNT")),
])
def test_mount_parses(argv: list[str], env: str | None, want: tuple[object, ...],
                      monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CBT_VAULT", raising=False)
    if env:
        monkeypatch.setenv("CBT_VAULT", env)
    args = _parse(argv)
    assert (args.vault, args.point, args.mountpoint) == want


def test_key_remove_parses(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CBT_VAULT", raising=False)
    args = _parse(["key", "remove", "-r", "V", "ID"])
    assert (args.action, args.vault, args.id) == ("remove", "V", "ID")
    monkeypatch.setenv("CBT_VAULT", "V")
    args = _parse(["key", "remove", "ID"])
    assert (args.vault, args.id) == ("V", "ID")
    args = _parse(["key", "remove", "V2", "ID"])
    assert (args.vault, args.id) == ("V2", "ID")


def test_copy_names_both_vaults(two_points: tuple[Path, list[str]], tmp_path: Path) -> None:
    """copy takes SRC DST only: $CBT_VAULT does not move them, -r is refused, --help says
    why (restic's -r is a copy's destination, cbt's would be the source)."""
    vault, ids = two_points
    dst = tmp_path / "dst"
    assert cbt("init", "--encryption", "none", dst).returncode == 0
    r = cbt("copy", vault, dst, ids[0], "-q", env={"CBT_VAULT": str(tmp_path / "nope")})
    assert r.returncode == 0, r.stderr
    r = cbt("copy", "-r", vault, dst)
    assert "unrecognized arguments: -r" in one_error_line(r)
    assert [p["recovery_point"] for p in cbt_json("list", dst)["points"]] == [ids[0]]
    text = " ".join(cbt("copy", "--help").stdout.split())
    assert "copy takes no -r/--vault and does not read $CBT_VAULT" in text


def test_blank_vault_refused(tmp_path: Path) -> None:
    """CBT_VAULT=" " (or -r " "): one line; no folder " " made by init."""
    r = cbt("init", "--encryption", "none", env={"CBT_VAULT": "  "}, cwd=tmp_path)
    assert "$CBT_VAULT: the vault location '  ' is only blanks" in one_error_line(r)
    r = cbt("list", "-r", " ", cwd=tmp_path)
    assert "only blanks" in one_error_line(r)
    assert list(tmp_path.iterdir()) == []


def test_options_before_the_command(two_points: tuple[Path, list[str]],
                                    tmp_path: Path) -> None:
    """``cbt -r VAULT list`` (restic's order) and ``cbt -q ...``: as after the command
    (they were 'invalid choice' errors naming the vault as a command)."""
    vault, ids = two_points
    want = cbt_json("list", vault)
    assert cbt_json("-r", vault, "list") == want
    assert cbt_json(f"--vault={vault}", "-q", "list") == want
    assert cbt_json("-r", vault, "show", ids[0]) == cbt_json("show", vault, ids[0])
    r = cbt("-q", "--vault", vault, "verify")
    assert r.returncode == 0 and r.stdout == cbt("verify", vault, "-q").stdout
    r = cbt("-r", vault, "copy", vault, tmp_path / "x")
    assert "unrecognized arguments: -r" in one_error_line(r)
    assert cbt("-r", vault).returncode == 2
