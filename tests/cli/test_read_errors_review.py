"""Review of the read-error handling (issue 12, "Sources"): the edges of a disk.

An unreadable first page (the page a manifest's magic is looked for in), the
tail block shorter than the block size, and a vault pack that cannot be read:
each ends with one line that names the file, the byte and the error, once.
The read errors are real (``helpers.badblocks``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import MIB
from helpers.badblocks import bad_btrfs, random_file
from helpers.cli import cbt, one_error_line
from helpers.jobs import job_config, jobs_json, statuses
from helpers.vaults import init_cli_vault


def _eio(img: Path, page: int) -> str:
    return f"read error on {img} at byte {page}: Input/output error"


def test_diff_of_an_image_whose_first_page_is_unreadable(tmp_path: Path) -> None:
    """``cbt diff`` looks for a manifest's magic in the first bytes of each side: an
    unreadable first page is named there too, not a bare 'Input/output error'."""
    with bad_btrfs(tmp_path) as fs:
        img, other = fs.mnt / "disk.img", fs.mnt / "other.img"
        random_file(img, 2 * MIB)
        random_file(other, 2 * MIB, seed=3)
        page = fs.corrupt(img, 10)
        lines = [one_error_line(cbt("diff", *pair)) for pair in ((other, img), (img, other))]
        scan = one_error_line(cbt("scan", img))
    assert lines == [f"cbt: error: {_eio(img, page)}"] * 2, lines
    assert scan == f"cbt: error: {_eio(img, page)}", scan


def test_unreadable_tail_block(tmp_path: Path) -> None:
    """The last block is shorter than the block size; its last page cannot be read."""
    vault = tmp_path / "vault"
    assert cbt("init", "--encryption", "none", vault).returncode == 0
    with bad_btrfs(tmp_path) as fs:
        img = fs.mnt / "disk.img"
        random_file(img, 4 * MIB + 8192)
        page = fs.corrupt(img, 4 * MIB + 8191)
        got = {w: one_error_line(cbt("backup", vault, f"vda={img}", "--vm", "vm",
                                     "--workers", w)) for w in ("1", "2")}
        scan = one_error_line(cbt("scan", img, "-o", tmp_path / "m.arrow"))
    assert set(got.values()) == {f"cbt: error: disk vda: {_eio(img, page)}"}, got
    assert scan == f"cbt: error: {_eio(img, page)}"
    assert not (tmp_path / "m.arrow").exists()
    r = cbt("list", vault, "--json")
    assert json.loads(r.stdout.splitlines()[-1])["points"] == []


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_restore_reads_only_the_blocks_it_needs_of_a_pack(tmp_path: Path,
                                                         encrypted: bool) -> None:
    """A restore faults in only the byte ranges of a pack its blocks lie in (not the
    whole pack): a point that uses a few blocks of a pack restores although another
    part of that pack cannot be read (and reads less: the README's measurement);
    the point that needs the unreadable part names it."""
    disk, head = tmp_path / "x.img", tmp_path / "y.img"
    data = random_file(disk, 3 * MIB)
    head.write_bytes(data[:MIB])
    with bad_btrfs(tmp_path) as fs:
        vault = fs.mnt / "vault"
        env = init_cli_vault(vault, encrypted, tmp_path)
        for vm, img in (("x", disk), ("y", head)):
            r = cbt("backup", vault, f"vda={img}", "--vm", vm, "--workers", "1", env=env)
            assert r.returncode == 0, r.stderr
        (pack,) = (vault / "packs").rglob("*.pack")
        page = fs.corrupt(pack, pack.stat().st_size * 5 // 6)
        ok = cbt("restore", vault, "y.latest", "--to", tmp_path / "y", env=env)
        bad = cbt("restore", vault, "x.latest", "--to", tmp_path / "x", env=env)
        assert ok.returncode == 0, ok.stderr
        assert (tmp_path / "y" / "vda.img").read_bytes() == data[:MIB]
        line = one_error_line(bad)
    assert f"unreadable in vault: {pack} at byte {page}: Input/output error" in line, line
    assert not (tmp_path / "x" / "vda.img").exists()


# cbt on a kernel without MADV_POPULATE_READ (before Linux 5.14): the advice
# number replaced by one no kernel knows, so madvise fails with EINVAL as there.
OLD_KERNEL = ("import sys, cbt.core.blockio as b; b.MADV_POPULATE_READ = 0x7fff; "
              "from cbt.cli.main import main; sys.exit(main(sys.argv[1:]))")


def _old_kernel_cbt(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", OLD_KERNEL, *map(str, args)],
                          capture_output=True, text=True, timeout=120, check=False)


def test_unreadable_pack_and_target_without_populate_advice(tmp_path: Path) -> None:
    """Without the advice, what a restore maps is checked with ``pread`` instead: an
    unreadable pack or ``--in-place`` target is the one line, not a SIGBUS of cbt."""
    disk = tmp_path / "disk.img"
    random_file(disk, 4 * MIB)
    with bad_btrfs(tmp_path) as fs:
        vault, target = fs.mnt / "vault", fs.mnt / "target.img"
        random_file(target, 4 * MIB, seed=5)
        assert cbt("init", "--encryption", "none", vault).returncode == 0
        assert cbt("backup", vault, f"vda={disk}", "--vm", "vm",
                   "--workers", "1").returncode == 0
        (pack,) = (vault / "packs").rglob("*.pack")
        page = fs.corrupt(pack, pack.stat().st_size // 2)
        tpage = fs.corrupt(target, 3 * MIB)
        restored = _old_kernel_cbt("restore", vault, "vm.latest", "--to", tmp_path / "out")
        in_place = _old_kernel_cbt("restore", vault, "vm.latest", "--disk", "vda",
                                   "--to", target, "--in-place")
    line = one_error_line(restored)
    assert f"unreadable in vault: {pack} at byte {page}: Input/output error" in line, line
    assert one_error_line(in_place).endswith(_eio(target, tpage)), in_place.stderr


def test_run_due_job_of_a_disk_unreadable_after_a_hole(tmp_path: Path) -> None:
    """``cbt run-due`` of a config job whose disk has an unreadable page just after a
    hole (the first page of a data extent): exit 2, the one line, and the job record
    says failed with that line."""
    vault = tmp_path / "vault"
    assert cbt("init", "--encryption", "none", vault).returncode == 0
    with bad_btrfs(tmp_path) as fs:
        img = fs.mnt / "disk.img"
        random_file(img, 6 * MIB)
        with open(img, "r+b") as f:  # a hole of 1 MiB at 2 MiB
            os.truncate(img, 2 * MIB)
            f.seek(3 * MIB)
            f.write(os.urandom(3 * MIB))
        page = fs.corrupt(img, 3 * MIB)
        cfg = job_config(tmp_path / "cbt.toml", {"web": {"disks": {"vda": str(img)}}},
                         vault=str(vault))
        r = cbt("run-due", "--config", cfg, "--now", "2026-01-01T00:00:00Z")
        jobs = jobs_json(vault)
    line = one_error_line(r)
    assert line.endswith(f"disk.img at byte {page}: Input/output error"), line
    assert statuses(jobs) == ["failed"], jobs
    assert line.endswith(jobs[0]["error"]), (line, jobs[0]["error"])
