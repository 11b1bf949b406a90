"""bench/lz4_decoder.py builds its C harness with cbt's decoder and with the system's
liblz4 and times both on the same blocks: the blocks it times are the data's nonzero
blocks that lz4 shrinks (truth: counted here block by block), and both harnesses
decode every one of them to its full length (or the script exits 1)."""

from __future__ import annotations

import ctypes.util
import json
import shutil
from pathlib import Path

import lz4.block
import lz4_decoder as bench_lz4
import numpy as np
import pytest
from helpers import KIB
from helpers.system import need

BS = 16 * KIB


def test_it_times_both_decoders_on_the_compressible_blocks(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    need(shutil.which("cc") is not None, "needs a C compiler (cc)")
    need(ctypes.util.find_library("lz4") is not None,
         "needs liblz4.so.1 (apt-get install liblz4-1; ci/system-deps.sh does)")
    rng = np.random.default_rng(3)
    text = Path(bench_lz4.__file__).read_bytes()
    parts = [rng.integers(0, 256, BS, dtype=np.uint8).tobytes(), bytes(BS),
             (text * (BS // len(text) + 1))[:BS], bytes(BS - 5) + b"tail!", b"x" * 1000]
    data = b"".join(parts[int(i)] for i in rng.integers(0, len(parts), 40))
    f = tmp_path / "disk.img"
    f.write_bytes(data)
    want = [b for b in (data[i:i + BS] for i in range(0, len(data), BS))
            if b.count(0) != len(b) and len(lz4.block.compress(b, store_size=False)) < len(b)]
    assert bench_lz4.main(["--data", str(f), "--runs", "2", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["blocks"] == len(want) > 0
    assert r["raw_mb"] == round(sum(map(len, want)) / 1e6, 1)
    assert set(r["best_s"]) == {"cbt", "liblz4"} and min(r["best_s"].values()) > 0
    assert r["cbt_speed_vs_liblz4"] > 0


def test_missing_data_is_one_line_and_exit_2(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_lz4.main(["--data", str(tmp_path / "none.img")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none.img" in err[0]
