"""Issue 13 part B on the command line: ``cbt backup --changed-ranges LABEL=FILE``,
``--full-scan`` and ``--verify-fraction``; ``show`` and ``backup --json`` say how each
disk's changes were found; a bad hint file is one error line naming it (exit 2) and
leaves the vault as it was.  Plain and encrypted vaults; restores compared byte for
byte with the kept copy of the disk.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.cli import backup_cli, cbt, cbt_json, json_lines, one_error_line
from helpers.jobs import job_config, one_point
from helpers.shapes import POINT_DISK_KEYS
from helpers.vaults import init_cli_vault, vault_state

BS = 4096
SIZE = 64 * BS


def _setup(tmp_path: Path, encrypted: bool) -> tuple[Path, Path, dict[str, str] | None]:
    vault = tmp_path / "vault"
    env = init_cli_vault(vault, encrypted, tmp_path)
    disk = tmp_path / "d.img"
    disk.write_bytes(np.random.default_rng(5).integers(0, 256, SIZE, np.uint8).tobytes())
    return vault, disk, env


def _hint(path: Path, ranges: list[list[int]], size_a: int = SIZE, size_b: int = SIZE,
          **extra: Any) -> Path:
    path.write_text(json.dumps({"block_size": BS, "size_a": size_a, "size_b": size_b,
                                "ranges": ranges, **extra}))
    return path


def _write(path: Path, off: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


@pytest.mark.parametrize("encrypted", [False, True])
def test_changed_ranges_reads_the_change_and_says_so(tmp_path: Path, encrypted: bool) -> None:
    vault, disk, env = _setup(tmp_path, encrypted)
    first = backup_cli(vault, "vm", f"d={disk}", "--block-size", "4K", env=env)
    assert first["disks"][0]["change_source"] == "hash"
    assert first["disks"][0]["change_source_reason"] is None
    _write(disk, 9 * BS - 3, b"straddle")  # blocks 8 and 9
    hint = _hint(tmp_path / "h.json", [[9 * BS - 3, 8]], changed_blocks=2)  # (extra key)
    line = backup_cli(vault, "vm", f"d={disk}", "--changed-ranges", f"d={hint}",
                      "--verify-fraction", "0", env=env)
    d = line["disks"][0]
    assert set(d) == POINT_DISK_KEYS
    assert (d["change_source"], d["change_source_reason"]) == ("hint-file", None)
    assert (d["verified_blocks"], d["hint_mismatches"]) == (0, 0)
    assert d["bytes_read"] == 2 * BS and d["changed_blocks"] == 2
    shown = cbt_json("show", vault, line["recovery_point"], env=env)
    assert {k: shown["disks"][0][k] for k in ("change_source", "change_source_reason",
                                              "verified_blocks", "hint_mismatches")} == \
        {"change_source": "hint-file", "change_source_reason": None, "verified_blocks": 0,
         "hint_mismatches": 0}
    text = cbt("show", vault, line["recovery_point"], env=env)
    assert text.returncode == 0 and "change source hint-file" in text.stdout
    out = tmp_path / "restored"
    r = cbt("restore", vault, line["recovery_point"], "--to", out, env=env)
    assert r.returncode == 0, r.stderr
    assert (out / "d.img").read_bytes() == disk.read_bytes()


def test_lying_hint_warns_and_the_point_is_right(tmp_path: Path) -> None:
    vault, disk, _env = _setup(tmp_path, False)
    backup_cli(vault, "vm", f"d={disk}", "--block-size", "4K")
    _write(disk, 3 * BS, b"named")
    _write(disk, 40 * BS + 1, b"unnamed")
    hint = _hint(tmp_path / "h.json", [[3 * BS, 5]])
    r = cbt("backup", vault, "--vm", "vm", f"d={disk}", "--changed-ranges", f"d={hint}",
            "--verify-fraction", "1")
    assert r.returncode == 0, r.stderr
    assert "cbt: warning: disk d: change source hint-file missed changes" in r.stderr
    assert "hint mismatch at block 40" in r.stdout  # (the disk's line says why)
    pid = r.stdout.split()[2]
    shown = cbt_json("show", vault, pid)["disks"][0]
    assert (shown["change_source"], shown["change_source_reason"], shown["hint_mismatches"]) \
        == ("hash", "hint mismatch at block 40", 1)
    out = tmp_path / "restored"
    assert cbt("restore", vault, pid, "--to", out).returncode == 0
    assert (out / "d.img").read_bytes() == disk.read_bytes()


@pytest.mark.parametrize("encrypted", [False, True])
def test_full_scan(tmp_path: Path, encrypted: bool) -> None:
    vault, disk, env = _setup(tmp_path, encrypted)
    backup_cli(vault, "vm", f"d={disk}", "--block-size", "4K", env=env)
    hint = _hint(tmp_path / "h.json", [])
    d = backup_cli(vault, "vm", f"d={disk}", "--changed-ranges", f"d={hint}", "--full-scan",
                   env=env)["disks"][0]
    assert (d["change_source"], d["change_source_reason"]) == ("hash", "--full-scan")
    assert d["bytes_read"] == SIZE


BAD_HINTS: list[tuple[str, object, str]] = [
    ("not-json", "{nope", "not JSON"),
    ("not-object", [[0, 1]], "not a JSON object"),
    ("no-size-b", {"block_size": BS, "size_a": SIZE, "ranges": []}, "size_b"),
    ("size-b-wrong", {"block_size": BS, "size_a": SIZE, "size_b": SIZE + 1, "ranges": []},
     "size_b"),
    ("size-float", {"block_size": BS, "size_a": 1.5, "size_b": SIZE, "ranges": []}, "size_a"),
    ("bs-zero", {"block_size": 0, "size_a": SIZE, "size_b": SIZE, "ranges": []}, "block_size"),
    ("ranges-not-list", {"block_size": BS, "size_a": SIZE, "size_b": SIZE, "ranges": "0,1"},
     "ranges"),
    ("range-short", {"block_size": BS, "size_a": SIZE, "size_b": SIZE, "ranges": [[0]]},
     "range 0"),
    ("range-bool", {"block_size": BS, "size_a": SIZE, "size_b": SIZE, "ranges": [[True, 1]]},
     "range 0"),
    ("range-float", {"block_size": BS, "size_a": SIZE, "size_b": SIZE, "ranges": [[0, 1.0]]},
     "range 0"),
    ("negative-offset", {"block_size": BS, "size_a": SIZE, "size_b": SIZE,
                         "ranges": [[-1, 5]]}, "range 0"),
    ("negative-length", {"block_size": BS, "size_a": SIZE, "size_b": SIZE,
                         "ranges": [[0, 5], [100, -4]]}, "range 1"),
    ("huge", {"block_size": BS, "size_a": SIZE, "size_b": SIZE, "ranges": [[2**70, 1]]},
     "range 0"),
    ("overlap", {"block_size": BS, "size_a": SIZE, "size_b": SIZE,
                 "ranges": [[0, 100], [99, 5]]}, "overlaps"),
    ("out-of-order", {"block_size": BS, "size_a": SIZE, "size_b": SIZE,
                      "ranges": [[500, 5], [0, 5]]}, "range 1"),
    ("past-end", {"block_size": BS, "size_a": SIZE, "size_b": SIZE,
                  "ranges": [[SIZE - 10, 11]]}, "past the disk's end"),
    ("too-many", {"block_size": BS, "size_a": SIZE, "size_b": SIZE,
                  "ranges": [[k, 1] for k in range(SIZE + 1)]}, "ranges"),
    ("deep", "[" * 100000 + "]" * 100000, "hint file"),
]


@pytest.mark.parametrize("encrypted", [False, True])
def test_bad_hint_files_fail_cleanly(tmp_path: Path, encrypted: bool) -> None:
    vault, disk, env = _setup(tmp_path, encrypted)
    backup_cli(vault, "vm", f"d={disk}", "--block-size", "4K", env=env)
    _write(disk, 0, b"changed")
    before = vault_state(vault)
    cases = BAD_HINTS if not encrypted else BAD_HINTS[:3]
    for name, content, what in cases:
        f = tmp_path / f"{name}.json"
        f.write_text(content if isinstance(content, str) else json.dumps(content))
        r = cbt("backup", vault, "--vm", "vm", f"d={disk}", "--changed-ranges", f"d={f}",
                env=env)
        line = one_error_line(r)
        assert str(f) in line and what in line, (name, line)
        assert vault_state(vault) == before, name


def test_hint_file_arguments(tmp_path: Path) -> None:
    vault, disk, _ = _setup(tmp_path, False)
    backup_cli(vault, "vm", f"d={disk}", "--block-size", "4K")
    before = vault_state(vault)
    hint = _hint(tmp_path / "h.json", [])
    missing = tmp_path / "missing.json"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.json"  # sparse: refused by its size, never read
    with open(huge, "wb") as f:
        f.truncate(2 << 40)
    for args, what in [
        (["--changed-ranges", f"x={hint}"], "'x'"),
        (["--changed-ranges", f"d={hint}", "--changed-ranges", f"d={hint}"], "two hint files"),
        (["--changed-ranges", str(hint)], "LABEL=FILE"),
        (["--changed-ranges", f"d={missing}"], str(missing)),
        (["--changed-ranges", f"d={fifo}"], "not a regular file"),
        (["--changed-ranges", f"d={tmp_path}"], str(tmp_path)),
        (["--changed-ranges", f"d={huge}"], "larger than"),
    ]:
        line = one_error_line(cbt("backup", vault, "--vm", "vm", f"d={disk}", *args))
        assert what in line, (args, line)
    for bad in ("2", "-0.1", "nan", "x"):
        r = cbt("backup", vault, "--vm", "vm", f"d={disk}", "--verify-fraction", bad)
        assert r.returncode == 2 and "fraction" in r.stderr, (bad, r.stderr)
    assert vault_state(vault) == before


def test_first_backup_with_a_hint_is_a_hash_scan(tmp_path: Path) -> None:
    vault, disk, _ = _setup(tmp_path, False)
    hint = _hint(tmp_path / "h.json", [[0, 1]])
    d = backup_cli(vault, "vm", f"d={disk}", "--changed-ranges", f"d={hint}")["disks"][0]
    assert (d["change_source"], d["change_source_reason"], d["bytes_read"]) == \
        ("hash", None, SIZE)


def test_help_explains(tmp_path: Path) -> None:
    r = cbt("backup", "--help")
    assert r.returncode == 0
    for word in ("--changed-ranges", "--full-scan", "--verify-fraction", "hint file"):
        assert word in r.stdout, word


def test_progress_counts_the_bytes_read(tmp_path: Path) -> None:
    vault, disk, _ = _setup(tmp_path, False)
    backup_cli(vault, "vm", f"d={disk}", "--block-size", "4K")
    _write(disk, 20 * BS, b"abc")
    hint = _hint(tmp_path / "h.json", [[20 * BS, 3]])
    r = cbt("backup", vault, "--vm", "vm", f"d={disk}", "--changed-ranges", f"d={hint}",
            "--verify-fraction", "0", "--json")
    assert r.returncode == 0, r.stderr
    lines = json_lines(r.stdout)
    progress = [x for x in lines if x["type"] == "progress"]
    assert progress and progress[-1]["bytes_done"] == progress[-1]["bytes_total"] == BS
    assert lines[-1]["disks"][0]["bytes_read"] == BS


def test_config_backup_takes_full_scan_and_refuses_hint_files(tmp_path: Path) -> None:
    vault, disk, _ = _setup(tmp_path, False)
    cfg = job_config(tmp_path / "cbt.toml", {"web": {"disks": {"d": str(disk)},
                                                     "snapshot": "none"}}, vault=str(vault))
    first = one_point(cfg)
    assert first["disks"][0]["change_source"] == "hash"
    again = one_point(cfg, "--full-scan")  # (the job passes it on: part A's wiring)
    assert again["disks"][0]["change_source"] == "hash"
    for args in (["--changed-ranges", f"d={tmp_path / 'h.json'}"], ["--verify-fraction", "1"]):
        line = one_error_line(cbt("backup", "--config", cfg, *args))
        assert "direct backup" in line, line
