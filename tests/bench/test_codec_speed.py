"""bench/codec_speed.py reads a vault's compressed blocks back to their content and measures
both codecs on them: the blocks it measures are the disk's own (truth: BLAKE3 of the
disk's 16 KiB blocks), and what it reports adds up."""

from __future__ import annotations

import json
from pathlib import Path

import blake3
import codec_speed as bench_codecs
import pytest
from helpers import KIB, MIB
from helpers.images import fs_image

import cbt as cbt_api

BS = 16 * KIB


def test_the_blocks_measured_are_the_disks_compressible_blocks(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    disk = fs_image(tmp_path / "d.img", 4 * MIB, seed=5)
    v = cbt_api.Vault.init(tmp_path / "v")
    v.backup("vm", [disk], block_size=BS)
    data = disk.read_bytes()
    own = {blake3.blake3(data[i:i + BS]).digest() for i in range(0, len(data), BS)}
    got = bench_codecs.blocks_of(tmp_path / "v", 10_000)
    assert got and all(len(b) == BS for b in got)
    assert {blake3.blake3(b).digest() for b in got} <= own
    assert bench_codecs.main(["--vault", str(tmp_path / "v"), "--runs", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["blocks"] == len(got) and r["mb"] == round(len(got) * BS / 1e6, 1)
    assert 0 < r["stored_mb"]["zstd"] < r["mb"] and 0 < r["stored_mb"]["lz4"] < r["mb"]
    # (both ways of a restore's work checked every block against its digest, or exited)
    assert set(r["lz4_decode_verify_cpu_s"]) == {"lz4 package", "cbt core"}


def test_no_vault_is_one_line_and_exit_2(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_codecs.main(["--vault", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no vault at" in err[0]
