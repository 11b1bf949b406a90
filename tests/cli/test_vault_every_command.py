"""Issue 16: ``-r/--vault VAULT`` and ``$CBT_VAULT`` on *every* command that takes a vault.

``test_vault_option`` and ``test_vault_seam`` try the three forms on list, show,
restore, verify, backup and the parses of mount and key.  Here each remaining
command that takes a vault runs for real three ways (positional, ``-r``,
``$CBT_VAULT``) and must answer the same; and the table below must name every
command whose parser has a VAULT, so a command added later cannot miss it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from helpers.cli import cbt, cbt_json
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

    with_vault = set()
    for name in COMMANDS:
        parser, _ = command_parser(name)
        options = {o for a in parser._actions for o in a.option_strings}
        positional = any(a.metavar == "VAULT" and not a.option_strings
                         for a in parser._actions)
        assert positional == ("-r" in options) == ("--vault" in options), name
        if positional:
            with_vault.add(name)
    assert with_vault == set(RUNS) | ELSEWHERE


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
