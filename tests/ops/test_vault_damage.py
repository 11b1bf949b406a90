"""Damage is found and named, and restore never writes wrong data.

A vault with two points of a two-disk VM is damaged on purpose (a flipped byte
in a pack, an altered or truncated manifest, a missing pack); ``cbt verify``
must exit 2 naming point, disk, block and pack, and ``cbt restore`` must exit 2
leaving no target (and no temporary file) behind.  Which blocks hold a damaged
blob is worked out here, from BLAKE3 of the disk copies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import blake3
import numpy as np
import pyarrow as pa
import pytest
from helpers import KIB, MIB
from helpers.cli import cbt, one_error_line
from helpers.images import assert_same_disk, fs_image, keep_copy, read
from helpers.packs import pack_files, trailer_entries
from helpers.shapes import PROBLEM_KEYS, VERIFY_KEYS

import cbt as cbt_api
from cbt.source.synth import make_db_file, mutate

BS = 64 * KIB


@dataclass
class Damaged:
    vault: Path
    points: list[str]
    copies: list[dict[str, Path]]  # per point: label -> copy of the disk


@pytest.fixture
def dv(tmp_path: Path) -> Damaged:
    disks = tmp_path / "disks"
    disks.mkdir()
    fs_image(disks / "os.img", 3 * MIB, 91)
    make_db_file(disks / "db.img", 2 * MIB, seed=92)
    vault = cbt_api.Vault.init(tmp_path / "v")
    points, copies = [], []
    for day in range(2):
        if day:
            mutate(disks / "os.img", seed=93, page_writes=10, runs=1, run_length=256 * KIB)
            mutate(disks / "db.img", seed=94, page_writes=20, runs=0, zero_runs=0, holes=0)
        p = vault.backup("vm", [disks / "os.img", disks / "db.img"], block_size=BS)
        points.append(p.id)
        copies.append({lb: keep_copy(disks / f"{lb}.img", tmp_path / f"{lb}.{day}.img")
                       for lb in ("os", "db")})
    return Damaged(tmp_path / "v", points, copies)


def _blocks_with(copy: Path, digest: bytes) -> set[int]:
    data = read(copy)
    mv = memoryview(data)
    return {i for i in range(-(-len(data) // BS))
            if blake3.blake3(mv[i * BS:(i + 1) * BS]).digest() == digest}


def _verify(vault: Path, *args: str) -> tuple[int, dict]:
    r = cbt("verify", vault, *args, "--json")
    out = json.loads(r.stdout)
    assert set(out) == VERIFY_KEYS
    for p in out["problems"]:
        assert set(p) == PROBLEM_KEYS
    return r.returncode, out


def _restore_fails(dv: Damaged, point: str, to: Path) -> str:
    r = cbt("restore", dv.vault, point, "--to", to)
    line = one_error_line(r)
    assert not to.exists() or list(to.iterdir()) == [], f"restore left {list(to.iterdir())}"
    return line


@pytest.mark.slow
def test_flipped_byte_in_a_pack(dv: Damaged, tmp_path: Path) -> None:
    assert _verify(dv.vault, "--data")[0] == 0
    # the first blob of a pack holding a block of day 0's os disk
    os0 = {blake3.blake3(memoryview(read(dv.copies[0]["os"]))[i * BS:(i + 1) * BS]).digest()
           for i in range(3 * MIB // BS)}
    pack, digest, offset, stored = next(
        (p, d, o, s) for p in pack_files(dv.vault) for d, o, s, _r in trailer_entries(p)
        if d in os0)
    blob = bytearray(pack.read_bytes())
    blob[offset + 48 + stored // 2] ^= 0x40
    pack.write_bytes(bytes(blob))
    owners = {(pid, lb): _blocks_with(copies[lb], digest)
              for pid, copies in zip(dv.points, dv.copies, strict=True) for lb in copies}
    owners = {k: v for k, v in owners.items() if v}
    assert (dv.points[0], "os") in owners

    code, out = _verify(dv.vault, "--data")
    assert code == 2
    named = [p for p in out["problems"] if p["pack"] == pack.stem]
    assert named, out["problems"]
    for p in named:
        assert (p["point"], p["disk"]) in owners, p
        assert p["block"] in owners[(p["point"], p["disk"])], p
    assert {(p["point"], p["disk"]) for p in named} == set(owners)
    # restore stops: no target, no temporary file
    line = _restore_fails(dv, dv.points[0], tmp_path / "out")
    assert dv.points[0] in line and pack.stem in line and "os" in line
    block = min(owners[(dv.points[0], "os")])
    assert f"block {block}" in line, line
    # --force over an existing file: the failed restore leaves the old file as it was
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "os.img").write_bytes(b"the old file")
    one_error_line(cbt("restore", dv.vault, dv.points[0], "--to", keep, "--force"))
    assert sorted(p.name for p in keep.iterdir()) == ["os.img"]
    assert (keep / "os.img").read_bytes() == b"the old file"
    # the human form names them too, one problem a line
    r = cbt("verify", dv.vault, "--data")
    assert r.returncode == 2 and pack.stem in r.stderr


def test_altered_manifest(dv: Damaged, tmp_path: Path) -> None:
    target = dv.vault / "manifests" / dv.points[1] / "db.arrow"
    raw = bytearray(target.read_bytes())
    table = pa.ipc.open_file(pa.py_buffer(bytes(raw))).read_all()
    first = table.column("digest")[0].as_py()
    at = bytes(raw).index(first)  # alter a digest in place: still a readable Arrow file
    raw[at] ^= 0xFF
    target.write_bytes(bytes(raw))
    code, out = _verify(dv.vault)
    assert code == 2
    assert {(p["point"], p["disk"]) for p in out["problems"]} == {(dv.points[1], "db")}
    line = _restore_fails(dv, dv.points[1], tmp_path / "out")
    assert "db" in line
    # the other point is untouched
    assert cbt("restore", dv.vault, dv.points[0], "--to", tmp_path / "ok").returncode == 0
    assert_same_disk(tmp_path / "ok" / "db.img", dv.copies[0]["db"], BS)


def test_truncated_base_manifest_names_every_point_built_on_it(dv: Damaged,
                                                               tmp_path: Path) -> None:
    target = dv.vault / "manifests" / dv.points[0] / "os.arrow"
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    code, out = _verify(dv.vault)
    assert code == 2
    named = {(p["point"], p["disk"]) for p in out["problems"]}
    assert (dv.points[0], "os") in named
    assert (dv.points[1], "os") in named, "the later point resolves through this manifest"
    assert not any(p["disk"] == "db" for p in out["problems"])
    code, out = _verify(dv.vault, dv.points[1])
    assert code == 2 and {p["point"] for p in out["problems"]} == {dv.points[1]}
    _restore_fails(dv, dv.points[0], tmp_path / "out0")
    _restore_fails(dv, dv.points[1], tmp_path / "out1")


def test_altered_flags_of_a_base_manifest(dv: Damaged, tmp_path: Path) -> None:
    """A block turned into a hole in the full manifest a later point's delta builds on."""
    target = dv.vault / "manifests" / dv.points[0] / "db.arrow"
    table = pa.ipc.open_file(pa.py_buffer(target.read_bytes())).read_all()
    flags = table.column("flags").to_numpy().copy()
    flags[int(np.flatnonzero(flags == 0)[3])] = 2
    table = table.set_column(table.schema.get_field_index("flags"), "flags",
                             pa.array(flags, pa.uint8()))
    table = table.replace_schema_metadata(
        pa.ipc.open_file(pa.py_buffer(target.read_bytes())).schema.metadata)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    target.write_bytes(sink.getvalue().to_pybytes())
    code, out = _verify(dv.vault, dv.points[1])
    assert code == 2
    assert {(p["point"], p["disk"]) for p in out["problems"]} == {(dv.points[1], "db")}
    _restore_fails(dv, dv.points[1], tmp_path / "out")


def test_missing_pack(dv: Damaged, tmp_path: Path) -> None:
    pack = pack_files(dv.vault)[0]
    pack.unlink()
    code, out = _verify(dv.vault)
    assert code == 2
    missing = [p for p in out["problems"] if p["problem"] == "pack missing"]
    assert missing and all(p["pack"] == pack.stem for p in missing)
    assert all(p["point"] in dv.points and p["disk"] in ("os", "db") and p["block"] is not None
               for p in missing)
    r = cbt("verify", dv.vault)
    assert r.returncode == 2 and "pack missing" in r.stderr
    for i, pid in enumerate(dv.points):
        if any(p["point"] == pid for p in missing):
            _restore_fails(dv, pid, tmp_path / f"out{i}")


def test_corrupt_point_record_and_index_segment(dv: Damaged) -> None:
    record = dv.vault / "points" / f"{dv.points[1]}.json"
    body = json.loads(record.read_text())
    body["disks"][0]["size"] += 1
    record.write_text(json.dumps(body))
    code, out = _verify(dv.vault)
    assert code == 2 and any(p["point"] == dv.points[1] for p in out["problems"])
    seg = sorted((dv.vault / "index").glob("*.cbtidx"))[0]
    seg.write_bytes(seg.read_bytes()[:100])
    code, out = _verify(dv.vault)
    assert code == 2 and any(seg.name in p["problem"] for p in out["problems"])
