"""A 1 TiB thin disk holding a few MiB costs what its data costs (issue 12).

Backup (full and incremental), restore and ``verify --data`` each run as a real
``cbt`` process; its peak RSS (of the largest process, forked workers included)
is measured from a wrapper process that runs nothing else, with
``getrusage(RUSAGE_CHILDREN)``.  Before manifests and scans went sparse, these
commands peaked at 6.5 to 12.4 GB on such a disk and its full manifest took
2.6 GB.  The restored disk is checked bit for bit on every data region
against the bytes written, holes read as zeros, and its apparent size is the
disk's.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest
from helpers.cli import cbt_argv, clean_env, run_measured
from helpers.vaults import PASSWORD

TIB = 1 << 40
MIB = 1 << 20
PEAK_RSS_BOUND = 200 * MIB  # measured: 70-80 MiB; one byte per block alone would be 64 MiB more
MANIFESTS_BOUND = 1 * MIB
PAGE = 64 << 10  # of the expected content

def _run_measured(*args: object, env: dict[str, str]) -> tuple[str, int]:
    """Run ``cbt ARGS`` under a fresh wrapper: (stdout, peak RSS in bytes)."""
    rc, out, err, peak = run_measured(cbt_argv(*args), env=env)
    assert rc == 0, (args, err)
    return out, peak


def _write_scattered(path: Path, seed: int, places: int, each: int) -> list[tuple[int, bytes]]:
    """Random and text data at unaligned offsets all over the disk: what was written where."""
    rng = random.Random(seed)
    written = []
    with open(path, "r+b") as f:
        for i in range(places):
            off = rng.randrange(0, TIB - each)
            if i % 2:
                data = rng.randbytes(each)
            else:
                data = (b"line %d of a text region, lorem ipsum dolor sit amet\n" % i
                        * (each // 40 + 1))[:each]
            f.seek(off)
            f.write(data)
            written.append((off, data))
    return written


def _expected_regions(written: list[tuple[int, bytes]]) -> dict[int, bytes]:
    """Page offset -> what the page must hold, later writes over earlier ones (the rest of
    a page touched by a write reads as zeros: the disk was a hole there)."""
    pages: dict[int, bytearray] = {}
    for off, data in written:
        pos = 0
        while pos < len(data):
            p = (off + pos) // PAGE
            at = (off + pos) % PAGE
            buf = pages.setdefault(p, bytearray(PAGE))
            take = min(PAGE - at, len(data) - pos)
            buf[at:at + take] = data[pos:pos + take]
            pos += take
    return {p * PAGE: bytes(b) for p, b in pages.items()}


@pytest.mark.parametrize("encrypted", [False, True])
def test_a_1tib_thin_disk_costs_what_its_data_costs(tmp_path: Path, encrypted: bool) -> None:
    disk = tmp_path / "thin.img"
    with open(disk, "wb") as f:
        f.truncate(TIB)
    written = _write_scattered(disk, 7, 40, 100_000)  # about 4 MB in 40 places
    vault = tmp_path / "vault"
    env = clean_env()
    if encrypted:
        pw = tmp_path / "password"
        pw.write_text(PASSWORD + "\n")
        pw.chmod(0o600)
        env["CBT_PASSWORD_FILE"] = str(pw)
        init = ("init", vault, "--kdf-log-n", 10)
    else:
        init = ("init", vault, "--encryption", "none")
    subprocess.run(cbt_argv(*init), env=env, check=True, capture_output=True)

    peaks = {}
    _, peaks["full backup"] = _run_measured("backup", vault, "--vm", "vm", f"thin={disk}",
                                            "--now", "2026-01-01T00:00:00Z", env=env)
    written += _write_scattered(disk, 8, 10, 50_000)
    out, peaks["incremental backup"] = _run_measured(
        "backup", vault, "--vm", "vm", f"thin={disk}", "--now", "2026-01-02T00:00:00Z",
        "--json", env=env)
    point = [json.loads(line) for line in out.splitlines()][-1]
    assert point["type"] == "point", point
    assert 0 < point["disks"][0]["changed_blocks"] <= 10 * 5  # 50 KB spans <= 5 16K blocks
    to = tmp_path / "restored"
    _, peaks["restore"] = _run_measured("restore", vault, "vm.latest", "--to", to, env=env)
    _, peaks["verify --data"] = _run_measured("verify", vault, "--data", env=env)
    assert all(p < PEAK_RSS_BOUND for p in peaks.values()), peaks

    manifests = sum(p.stat().st_size for p in (vault / "manifests").rglob("*") if p.is_file())
    assert manifests < MANIFESTS_BOUND, manifests

    restored = to / "thin.img"
    st = restored.stat()
    assert st.st_size == TIB
    assert st.st_blocks * 512 < 64 * MIB, "holes stayed holes"
    expected = _expected_regions(written)
    with open(restored, "rb") as f:
        for off, page in expected.items():
            f.seek(off)
            assert f.read(len(page)) == page, off
        rng = random.Random(9)
        for _ in range(200):  # anywhere else: zeros
            off = rng.randrange(0, TIB - 4096) & ~4095
            if off // PAGE * PAGE not in expected:
                f.seek(off)
                assert f.read(4096) == bytes(4096), off
        # and what the restored file holds lies in those regions, or is zeros
        pos = 0
        while True:
            try:
                start = os.lseek(f.fileno(), pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(f.fileno(), start, os.SEEK_HOLE)
            for page_off in range(start // PAGE * PAGE, end, PAGE):
                if page_off not in expected:
                    lo, hi = max(start, page_off), min(end, page_off + PAGE)
                    f.seek(lo)
                    assert f.read(hi - lo) == bytes(hi - lo), page_off
            pos = end


def test_a_dense_manifest_of_a_1tib_thin_disk_is_read_a_batch_at_a_time(tmp_path: Path) -> None:
    """``cbt scan -o`` keeps one row per block (16M rows at 64K: a 690 MB file); reading it
    back (``cbt diff`` against the image) holds one record batch and the rows that are not
    holes, not the file (before: 2.5 GB peak)."""
    disk = tmp_path / "thin.img"
    with open(disk, "wb") as f:
        f.truncate(TIB)
    _write_scattered(disk, 11, 20, 30_000)
    manifest = tmp_path / "thin.arrow"
    env = clean_env()
    _, scan_peak = _run_measured("scan", disk, "-o", manifest, env=env)
    assert manifest.stat().st_size > 16 * (1 << 20) * 32, "one row per block"
    out, diff_peak = _run_measured("diff", manifest, disk, "--json", env=env)
    assert json.loads(out)["changed_blocks"] == 0
    assert scan_peak < PEAK_RSS_BOUND and diff_peak < 2 * PEAK_RSS_BOUND, (scan_peak, diff_peak)
