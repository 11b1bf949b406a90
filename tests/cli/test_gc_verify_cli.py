"""``cbt gc`` and ``cbt verify --read-data-subset`` on the command line (issue 16): the
human lines say what was deleted, trashed, kept, and the vault's size; -q prints nothing;
bad values are one error line; on a terminal (a real pty) the progress bars run."""

from __future__ import annotations

import json
from pathlib import Path

from helpers.cli import cbt, cbt_json, on_a_terminal, one_error_line
from helpers.vaults import dir_bytes, two_point_vault

from cbt.api import Vault
from cbt.core.sizes import human_bytes
from cbt.ops.prune import PruneRequest, prune


def _dead_vault(tmp_path: Path) -> Path:
    """Two points, the first pruned (hidden: the second's db is a delta on it)."""
    vault_dir, ids = two_point_vault(tmp_path)
    prune(Vault.open(vault_dir), PruneRequest(
        keep=lambda pts: {p.id: (["k"] if p.id == ids[1] else []) for p in pts},
        expired=lambda _vm, _c: False))
    return vault_dir


def test_gc_says_what_it_did(tmp_path: Path) -> None:
    v = _dead_vault(tmp_path)
    before = dir_bytes(v) - dir_bytes(v / "locks") - (v / "gc.lock").stat().st_size
    r = cbt("gc", v, "--max-unused", "0")
    assert r.returncode == 0, r
    lines = r.stdout.splitlines()
    assert lines[0].startswith("gc: removed "), lines
    assert any(ln.startswith("  freed now: ") for ln in lines), lines
    assert any(ln.startswith("  in the trash: ") and "after 20" in ln for ln in lines), lines
    assert lines[-1].startswith(f"  vault: {human_bytes(before)} -> "), lines
    dry = cbt("gc", v, "--dry-run")
    assert dry.returncode == 0 and "\n  would free now: " in dry.stdout, dry
    quiet = cbt("gc", v, "-q")
    assert quiet.returncode == 0 and quiet.stdout == "", quiet
    out = cbt_json("gc", v, "--dry-run", "--max-unused", "2.5%")
    assert out["max_unused"] == 2.5 and out["vault_bytes_after"] is None, out


def test_gc_refuses_bad_percentages(tmp_path: Path) -> None:
    for bad in ("101", "-1", "x", "nan", "inf", "", "1_0", "1e2", "5%%", "\u0665"):
        line = one_error_line(cbt("gc", tmp_path / "none", "--max-unused", bad))
        assert "not a percentage from 0 to 100" in line, line


def test_progress_on_a_terminal_does_not_disturb(tmp_path: Path) -> None:
    v = _dead_vault(tmp_path)
    code, out, seen = on_a_terminal("gc", v, "--max-unused", "0")
    assert code == 0 and out.startswith("gc: removed "), out
    assert b"gc: marking" in seen and b"gc: sweeping" in seen, seen
    code, out, seen = on_a_terminal("verify", v, "--read-data-subset", "1/2")
    assert code == 0 and "with the data of part 1/2" in out, out
    assert b"verify" in seen and b"iB / " in seen, seen  # binary units, as every summary
    code, out, seen = on_a_terminal("gc", v, "-q")
    assert code == 0 and out == "" and b"gc:" not in seen, seen
    for json_args in (("gc", v, "--max-unused", "0", "--json"),
                      ("verify", v, "--read-data-subset", "1/2", "--json")):
        code, out, seen = on_a_terminal(*json_args)
        assert code == 0 and json.loads(out), out
        assert seen == b"", seen  # no bar with --json: a script reads it
    code, out, seen = on_a_terminal("verify", v, "--data")
    assert code == 0 and b"verify" in seen, seen
    for columns in ("1", "5", "20"):
        code, out, seen = on_a_terminal("gc", v, "--max-unused", "0", columns=columns)
        assert code == 0 and out.startswith("gc: removed "), (columns, out, seen)
        assert "\x1b" not in out and "\r" not in out, out  # (bars never on stdout)


def test_gc_percentages_it_takes() -> None:
    from cbt.cli.gc_cmd import percent_arg

    for text, want in (("0", 0.0), ("100", 100.0), ("5.5", 5.5), ("5%", 5.0), (" 7 ", 7.0),
                       ("2.5 %", 2.5), (".5", 0.5)):
        assert percent_arg(text) == want, text
