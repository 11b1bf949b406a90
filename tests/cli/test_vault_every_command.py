"""Issue 16: ``-r/--vault VAULT`` and ``$CBT_VAULT`` on *every* command that takes a vault.

``test_vault_option`` and ``test_vault_seam`` try the three forms on list, show,
restore, verify, backup and the parses of mount and key.  Here each remaining
command that takes a vault runs for real three ways (positional, ``-r``,
``$CBT_VAULT``) and must answer the same; and the table below must name every
command whose parser has a VAULT, so a command added later cannot miss it.
``diff`` names points as ``VAULT::POINT``; with ``-r`` or ``$CBT_VAULT`` it takes
``::POINT`` (copy names two vaults and takes neither: ``test_vault_seam``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from helpers.cli import cbt, cbt_json, one_error_line
from helpers.vaults import encrypted_env, make_two_points

two_points = pytest.fixture(scope="module")(make_two_points)

# command -> what runs after the vault (a read-only or dry form, so the three runs
# see the same vault); "{p0}" is the vault's first point
RUNS: dict[str, list[str]] = {
    "list": [],
    "show": ["{p0}"],
    "verify": ["{p0}"],
    "jobs": [],
    "stats": ["{p0}"],
    "forget": ["{p0}", "--dry-run"],
    "gc": ["--dry-run"],
}
# run elsewhere for real (see the module doc) or below with their own vaults
ELSEWHERE = {"init", "backup", "restore", "mount", "key"}
# keys whose values differ from one run to the next by nature (clocks, sizes measured
# while the run's own lock file exists)
VOLATILE = {"seconds", "started", "ended", "now", "vault_bytes_before", "vault_bytes_after"}


def _steady(out: Any) -> Any:
    if isinstance(out, dict):
        return {k: _steady(v) for k, v in out.items() if k not in VOLATILE}
    if isinstance(out, list):
        return [_steady(v) for v in out]
    return out


def test_every_command_with_a_vault_is_in_the_table() -> None:
    from cbt.cli.main import COMMANDS, command_parser

    with_vault, with_r = set(), set()
    for name in COMMANDS:
        parser, _ = command_parser(name)
        options = {o for a in parser._actions for o in a.option_strings}
        if any(a.metavar == "VAULT" and not a.option_strings for a in parser._actions):
            with_vault.add(name)
        if "-r" in options:
            assert "--vault" in options, name
            with_r.add(name)
    assert with_vault == set(RUNS) | ELSEWHERE
    assert with_r == with_vault | {"diff"}


@pytest.mark.parametrize("command", sorted(RUNS))
def test_three_ways_one_answer(command: str, two_points: tuple[Path, list[str]]) -> None:
    vault, ids = two_points
    rest = [a.format(p0=ids[0]) for a in RUNS[command]]
    given = _steady(cbt_json(command, vault, *rest))
    assert _steady(cbt_json(command, "-r", vault, *rest)) == given
    assert _steady(cbt_json(command, *rest, "--vault", vault)) == given
    assert _steady(cbt_json(command, *rest, env={"CBT_VAULT": str(vault)})) == given
    assert _steady(cbt_json("-r", vault, command, *rest)) == given  # (before the command)


def test_init_and_key_from_the_environment(tmp_path: Path) -> None:
    """init makes the vault $CBT_VAULT names; key list/add read it from there."""
    env = encrypted_env(tmp_path)
    where = tmp_path / "v"
    r = cbt("init", "--kdf-log-n", "10", env={**env, "CBT_VAULT": str(where)})
    assert r.returncode == 0, r.stderr
    assert (where / "config").exists()
    keys = cbt_json("key", "list", env={**env, "CBT_VAULT": str(where)})
    assert keys == cbt_json("key", "list", where, env=env)
    assert keys == cbt_json("key", "list", "-r", where, env=env)
    shutil.rmtree(where)


def _differ(*args: object, env: dict[str, str] | None = None) -> Any:
    """``cbt diff ARGS --json`` that finds differences (exit 1): its object."""
    r = cbt("diff", *args, "--json", env=env)
    assert r.returncode == 1, (args, r.stdout, r.stderr)
    return json.loads(r.stdout)


def test_diff_points_of_the_vault_of_r_or_the_environment(
        two_points: tuple[Path, list[str]], tmp_path: Path) -> None:
    """``cbt diff -r V ::P1 ::P2`` (and ``CBT_VAULT=V``, and ``-r`` before diff) is
    ``cbt diff V::P1 V::P2``; a LABEL too; a ``VAULT::`` written out keeps its own."""
    vault, ids = two_points
    a, b = ids
    want = _differ(f"{vault}::{a}", f"{vault}::{b}")
    assert want["changed_blocks"] > 0
    assert _differ("-r", vault, f"::{a}", f"::{b}") == want
    assert _differ(f"::{a}", f"::{b}", "--vault", vault) == want
    before = cbt("-r", vault, "diff", f"::{a}", f"::{b}", "--json")  # (-r before diff)
    assert before.returncode == 1 and json.loads(before.stdout) == want, before
    env = {"CBT_VAULT": str(vault)}
    assert _differ(f"::{a}", f"::{b}", env=env) == want
    one = _differ(f"{vault}::{a}/db", f"{vault}::{b}/db")
    assert _differ("-r", vault, f"::{a}/db", f"::{b}/db") == one
    # a VAULT:: written out is that vault's, whatever $CBT_VAULT or -r say
    assert _differ(f"{vault}::{a}", f"{vault}::{b}",
                   env={"CBT_VAULT": str(tmp_path / "elsewhere")}) == want
    assert _differ("-r", vault, f"{vault}::{a}", f"{vault}::{b}") == want


def test_diff_vault_errors_are_one_line(two_points: tuple[Path, list[str]],
                                        tmp_path: Path) -> None:
    vault, ids = two_points
    r = cbt("diff", f"::{ids[0]}", f"::{ids[1]}")
    assert r.returncode == 2 and "give -r VAULT or set $CBT_VAULT" in one_error_line(r)
    x, y = tmp_path / "x.img", tmp_path / "y.img"
    x.write_bytes(bytes(4096))
    y.write_bytes(bytes(4096))
    r = cbt("diff", "-r", vault, x, y)
    assert r.returncode == 2 and "neither A nor B is a point" in one_error_line(r)
    # images under $CBT_VAULT: the environment names no operand, nothing to refuse
    r = cbt("diff", x, y, env={"CBT_VAULT": str(vault)})
    assert r.returncode == 0 and r.stdout.startswith("identical"), r
    r = cbt("diff", f"::{ids[0]}", f"::{ids[1]}", env={"CBT_VAULT": "ftp://host/x"})
    assert r.returncode == 2 and "$CBT_VAULT" in one_error_line(r)
    # two vaults by -r (before and after the command) are refused, as by every command
    r = cbt("-r", vault, "diff", "-r", tmp_path, f"::{ids[0]}", f"::{ids[1]}")
    assert r.returncode == 2 and "two vaults given" in r.stderr, r.stderr
