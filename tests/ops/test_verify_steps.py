"""verify's bounded passes (referenced entries located a range at a time, unreferenced
bytes summed a small chunk at a time, marks a bit each) say exactly what one pass over
everything says: the same problems, blocks and unreferenced bytes at every step size."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from helpers import KIB, MIB
from helpers.images import write_random_disk
from helpers.packs import pack_files, trailer_entries

import cbt.ops.backup as backup_mod
import cbt.ops.verify as verify_mod
from cbt.api import Vault
from cbt.ops.verify import VerifyResult, verify

BS = 16 * KIB
BLOB_HEADER = struct.calcsize("<4s32sBBHII")  # documented blob header


def _summary(r: VerifyResult) -> tuple[object, ...]:
    return (r.blocks_checked, r.unreferenced_bytes, r.packs_data_checked,
            sorted((p.point, p.disk, p.block, p.pack, p.problem, p.count) for p in r.problems))


def test_bounded_steps_say_what_one_pass_says(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backup_mod, "TARGET_PACK_SIZE", 256 * KIB)
    disk = write_random_disk(tmp_path / "d.img", 4 * MIB, seed=3)
    vault = Vault.init(tmp_path / "v")
    vault.backup("vm", [f"d={disk}"], block_size=BS, workers=1)
    write_random_disk(disk, 4 * MIB, seed=4)  # every block new: a second point
    vault.backup("vm", [f"d={disk}"], block_size=BS, workers=1)
    packs = sorted(pack_files(tmp_path / "v"))
    # a byte of a blob's data in one pack; another pack gone
    f = packs[len(packs) // 2]
    _digest, offset, stored, _raw = trailer_entries(f)[1]
    data = bytearray(f.read_bytes())
    data[offset + BLOB_HEADER + stored // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    packs[0].unlink()
    want = [_summary(verify(Vault.open(tmp_path / "v"), data=d)) for d in (False, True)]
    assert want[1][3] and len(want[1][3]) > len(want[0][3]) > 0  # both damages found
    for step in (1, 8, 100):
        monkeypatch.setattr(verify_mod, "LOCATE_STEP", step)
        monkeypatch.setattr(verify_mod, "UNREFERENCED_CHUNK", step)
        got = [_summary(verify(Vault.open(tmp_path / "v"), data=d)) for d in (False, True)]
        assert got == want
