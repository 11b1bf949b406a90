"""A disk that cannot be read, or shrinks while it is read, through the real ``cbt``.

Each command that reads a disk (``backup``, a config job, ``scan``, ``diff``) ends
with one line naming the disk (label and path), the byte and the error, exit 2,
and commits nothing: the vault verifies clean afterwards.  The read errors are
real (a btrfs data checksum that no longer matches, ``helpers.badblocks``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import MIB
from helpers.badblocks import bad_btrfs, random_file
from helpers.cli import backup_cli, cbt, one_error_line, start_cbt
from helpers.jobs import backup_config, job_config
from helpers.vaults import encrypted_env, init_cli_vault

DISK = 6 * MIB
BAD = 5 * MIB + 4321  # a byte of the page made unreadable


def _init(tmp_path: Path, encrypted: bool) -> tuple[Path, dict[str, str] | None]:
    vault = tmp_path / "vault"
    if encrypted:
        env = encrypted_env(tmp_path)
        r = cbt("init", vault, "--kdf-log-n", "10", env=env)
    else:
        env = None
        r = cbt("init", "--encryption", "none", vault)
    assert r.returncode == 0, r.stderr
    return vault, env


def _points(vault: Path, env: dict[str, str] | None) -> list[str]:
    r = cbt("list", vault, "--json", env=env)
    assert r.returncode == 0, (r.stdout, r.stderr)
    return [p["recovery_point"] for p in json.loads(r.stdout.splitlines()[-1])["points"]]


def _verify_clean(vault: Path, env: dict[str, str] | None) -> None:
    r = cbt("verify", vault, "--data", "--json", env=env)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert json.loads(r.stdout.splitlines()[-1])["problems"] == []


def _read_error(img: Path, page: int) -> str:
    return f"read error on {img} at byte {page}: Input/output error"


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_backup_of_an_unreadable_disk(tmp_path: Path, encrypted: bool) -> None:
    vault, env = _init(tmp_path, encrypted)
    with bad_btrfs(tmp_path) as fs:
        good, img = fs.mnt / "good.img", fs.mnt / "bad.img"
        random_file(good, 2 * MIB, seed=1)
        random_file(img, DISK, seed=2)
        page = fs.corrupt(img, BAD)
        for workers in ("1", "2"):
            r = cbt("backup", vault, f"os={good}", f"data={img}", "--vm", "vm",
                    "--workers", workers, env=env)
            line = one_error_line(r)
            assert line == f"cbt: error: disk data: {_read_error(img, page)}", line
    assert _points(vault, env) == []
    _verify_clean(vault, env)


def test_incremental_backup_of_a_disk_gone_bad(tmp_path: Path) -> None:
    """The early scan of an incremental backup meets the error first: the backup still
    ends with the one line, and the first point stays the only one."""
    vault, env = _init(tmp_path, False)
    with bad_btrfs(tmp_path) as fs:
        img = fs.mnt / "disk.img"
        random_file(img, DISK)
        first = backup_cli(vault, "vm", f"vda={img}")["recovery_point"]
        page = fs.corrupt(img, BAD)
        line = one_error_line(cbt("backup", vault, f"vda={img}", "--vm", "vm"))
    assert line == f"cbt: error: disk vda: {_read_error(img, page)}"
    assert _points(vault, env) == [first]
    _verify_clean(vault, env)


def test_config_job_of_an_unreadable_disk(tmp_path: Path) -> None:
    vault, env = _init(tmp_path, False)
    with bad_btrfs(tmp_path) as fs:
        img = fs.mnt / "disk.img"
        random_file(img, DISK)
        page = fs.corrupt(img, BAD)
        cfg = job_config(tmp_path / "cbt.toml", {"web": {"disks": {"vda": str(img)}}},
                         vault=str(vault))
        r, lines = backup_config(cfg)
    # (the job reads a snapshot of the disk: a clone, with the same unreadable page)
    assert r.returncode == 2, (r.stdout, r.stderr)
    errors = [ln for ln in lines if ln["type"] == "error"]
    assert len(errors) == 1, lines
    message = errors[0]["message"]
    assert message.startswith(f"disk vda ({img}): read error on {fs.mnt}/"), message
    assert message.endswith(f"disk.img at byte {page}: Input/output error"), message
    assert r.stderr == f"cbt: error: VM web: {message}\n", r.stderr
    assert _points(vault, env) == []
    _verify_clean(vault, env)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_scan_and_diff_of_an_unreadable_disk(tmp_path: Path, workers: str) -> None:
    with bad_btrfs(tmp_path) as fs:
        img, other = fs.mnt / "disk.img", fs.mnt / "other.img"
        random_file(img, DISK)
        random_file(other, DISK, seed=3)
        page = fs.corrupt(img, BAD)
        scan = one_error_line(cbt("scan", "--workers", workers, img))
        diff = one_error_line(cbt("diff", "--workers", workers, other, img))
    assert scan == f"cbt: error: {_read_error(img, page)}"
    assert diff == f"cbt: error: {_read_error(img, page)}"


def test_disk_truncated_while_a_backup_reads_it(tmp_path: Path) -> None:
    """Truncated under a running backup (mid-window, or between windows): one line
    naming the disk, exit 2, no traceback, no point; the vault verifies clean."""
    vault, env = _init(tmp_path, False)
    img = tmp_path / "disk.img"
    caught = 0
    for attempt in range(3):  # (a machine so fast the backup ends first: again)
        random_file(img, 384 * MIB, seed=attempt)
        p = start_cbt("backup", vault, f"vda={img}", "--vm", "vm", "--workers", "1", "--json")
        assert p.stdout is not None and p.stderr is not None
        truncated = False
        for raw in p.stdout:
            line = json.loads(raw)
            if line["type"] == "progress" and 0 < line["bytes_done"] < line["bytes_total"]:
                os.truncate(img, 3 * MIB + 100)
                truncated = True
                break
        out, err = p.communicate(timeout=120)
        if not truncated:
            assert p.returncode == 0, err
            continue
        caught += 1
        assert p.returncode == 2, (out, err)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1, err
        assert lines[0].startswith(f"cbt: error: disk vda: {img} shrank while it was read: "
                                   f"it ends at byte {3 * MIB + 100}, it had {384 * MIB} "
                                   "bytes"), lines[0]
        break
    assert caught == 1
    assert _points(vault, env) == []
    _verify_clean(vault, env)


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_unreadable_pack_is_unreadable_not_missing(tmp_path: Path, encrypted: bool) -> None:
    """A vault on a disk with a read error: verify --data and restore say the pack is
    unreadable, with the error; not that it is missing (nor a SIGBUS)."""
    disk = tmp_path / "disk.img"
    random_file(disk, DISK)
    with bad_btrfs(tmp_path) as fs:
        vault = fs.mnt / "vault"
        env = init_cli_vault(vault, encrypted, tmp_path)
        point = json.loads(cbt("backup", vault, f"vda={disk}", "--vm", "vm", "--json",
                               env=env).stdout.splitlines()[-1])["recovery_point"]
        pack = max((vault / "packs").rglob("*.pack"), key=lambda p: p.stat().st_size)
        page = fs.corrupt(pack, pack.stat().st_size // 2)
        # (--data: without it verify reads a pack's header and trailer only, issue 16)
        r = cbt("verify", vault, "--data", "--json", env=env)
        problems = json.loads(r.stdout.splitlines()[-1])["problems"]
        restored = cbt("restore", vault, point, "--to", tmp_path / "out", env=env)
    assert r.returncode != 0 and problems, (r.stdout, r.stderr)
    reasons = {p["problem"] for p in problems}
    want = f"pack unreadable in vault: {pack} at byte {page}: Input/output error"
    assert reasons == {want}, reasons  # ("unreadable" said once)
    assert all(set(p) >= {"point", "disk", "block", "pack", "problem"} for p in problems)
    line = one_error_line(restored)
    assert f"unreadable in vault: {pack} at byte {page}: Input/output error" in line, line
    assert "missing" not in line and "Errno" not in line, line
    assert line.replace(str(tmp_path), "").count("unreadable") == 1, line
