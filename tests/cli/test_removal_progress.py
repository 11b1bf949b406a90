"""Issue 16: ``prune`` shows progress on a terminal, and ``forget`` (prune's machinery
on named points) does too: a bar counting points on stderr when it is a real pty,
never on stdout, none with ``-q``, ``--json`` or stderr piped; the points are removed
either way."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.cli import cbt, on_a_terminal
from helpers.jobs import write_config
from helpers.vaults import listed_ids, two_point_vault


def _removal(tmp_path: Path, command: str) -> tuple[list[str], list[str]]:
    """A vault of two points of VM web and the argv that removes the older one."""
    vault, ids = two_point_vault(tmp_path)
    if command == "forget":
        return ids, ["forget", vault, ids[0]]
    cfg = write_config(tmp_path / "cbt.toml",
                       {"p": {"schedule": "daily 02:00", "retention": {"last": 1}}},
                       {"web": {"policy": "p", "snapshot": "none",
                                "disks": {"os": "os.img", "db": "db.img"}}})
    return ids, ["prune", "--config", cfg, "--now", "2026-01-03T00:00:00Z"]


@pytest.mark.parametrize("command", ["prune", "forget"])
def test_a_bar_on_a_terminal_only(tmp_path: Path, command: str) -> None:
    ids, argv = _removal(tmp_path, command)
    code, out, seen = on_a_terminal(*argv)
    assert code == 0, (out, seen)
    assert f"remove {ids[0]}" in out and "\x1b" not in out and "\r" not in out, out
    assert command.encode() in seen and b"points" in seen, seen
    assert listed_ids(tmp_path / "vault") == [ids[1]]


@pytest.mark.parametrize("command", ["prune", "forget"])
@pytest.mark.parametrize("extra", [["-q"], ["--json"]])
def test_no_bar_when_quiet_or_json(tmp_path: Path, command: str, extra: list[str]) -> None:
    ids, argv = _removal(tmp_path, command)
    code, out, seen = on_a_terminal(*argv, *extra)
    assert code == 0 and seen == b"", (out, seen)
    assert listed_ids(tmp_path / "vault") == [ids[1]]


@pytest.mark.parametrize("command", ["prune", "forget"])
def test_no_bar_when_stderr_is_piped(tmp_path: Path, command: str) -> None:
    ids, argv = _removal(tmp_path, command)
    r = cbt(*argv)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert listed_ids(tmp_path / "vault") == [ids[1]]
