"""``cbt gc`` and ``cbt verify --read-data-subset`` on the command line (issue 16): the
human lines say what was deleted, trashed, kept, and the vault's size; -q prints nothing;
bad values are one error line; on a terminal (a real pty) the progress bars run."""

from __future__ import annotations

import os
import pty
import subprocess
from pathlib import Path

from helpers.cli import cbt, cbt_argv, cbt_json, clean_env, one_error_line
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
    quiet = cbt("gc", v, "-q")
    assert quiet.returncode == 0 and quiet.stdout == "", quiet
    out = cbt_json("gc", v, "--dry-run", "--max-unused", "2.5%")
    assert out["max_unused"] == 2.5 and out["vault_bytes_after"] is None, out


def test_gc_refuses_bad_percentages(tmp_path: Path) -> None:
    for bad in ("101", "-1", "x", "nan"):
        line = one_error_line(cbt("gc", tmp_path / "none", "--max-unused", bad))
        assert "not a percentage from 0 to 100" in line, line


def _on_a_terminal(*args: object) -> tuple[int, str, bytes]:
    """Run cbt with stderr on a pty (a terminal: progress bars on); exit code, stdout, and
    what the terminal got."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(cbt_argv(*args), stdout=subprocess.PIPE, stderr=slave,
                                text=True, env=clean_env({"COLUMNS": "100"}))
        os.close(slave)
        seen = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # (EIO: the last writer closed the pty)
                break
            if not chunk:
                break
            seen += chunk
        out = proc.communicate(timeout=120)[0]
    finally:
        os.close(master)
    assert b"Traceback" not in seen, seen.decode(errors="replace")
    return proc.returncode, out, seen


def test_progress_on_a_terminal_does_not_disturb(tmp_path: Path) -> None:
    v = _dead_vault(tmp_path)
    code, out, seen = _on_a_terminal("gc", v, "--max-unused", "0")
    assert code == 0 and out.startswith("gc: removed "), out
    assert b"gc: marking" in seen and b"gc: sweeping" in seen, seen
    code, out, seen = _on_a_terminal("verify", v, "--read-data-subset", "1/2")
    assert code == 0 and "with the data of part 1/2" in out, out
    assert b"verify" in seen and b"iB / " in seen, seen  # binary units, as every summary
    code, out, seen = _on_a_terminal("gc", v, "-q")
    assert code == 0 and out == "" and b"gc:" not in seen, seen
