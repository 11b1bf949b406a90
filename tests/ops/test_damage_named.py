"""Every kind of damage is found, named (point, disk, block, pack), and never restored.

A three-point history (``helpers.vaults.build_history3``) is built once and
cloned for each test, then damaged: a flipped byte in a pack, a truncated pack,
a missing pack, a truncated or altered manifest, an index that disagrees with
the packs, a point record naming a missing manifest.  Which (point, disk,
block) hold a damaged blob is worked out here, from BLAKE3 of the disk copies.
A restore that stops must leave no target and no temporary file, and a restore
onto an existing copy or a device must never have written a wrong block.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from helpers import KIB, MIB, segments
from helpers.cli import cbt, one_error_line
from helpers.images import assert_same_disk, read, read_device
from helpers.packs import trailer_entries
from helpers.shapes import PROBLEM_KEYS, VERIFY_KEYS
from helpers.system import loop_device
from helpers.vaults import History3, day1_blob, temp_files

import cbt as cbt_api

BS = 64 * KIB


def _verify(vault: Path, *args: str) -> tuple[int, list[dict]]:
    r = cbt("verify", vault, *args, "--json")
    out = json.loads(r.stdout)
    assert set(out) == VERIFY_KEYS, out
    for p in out["problems"]:
        assert set(p) == PROBLEM_KEYS
    assert r.returncode == (2 if out["problems"] else 0), (r.returncode, out)
    return r.returncode, out["problems"]


def _counted(problems: list[dict]) -> dict[tuple[str, str], int]:
    """(point, disk) -> blocks the problems count (grouped per damaged file, issue 12)."""
    out: dict[tuple[str, str], int] = {}
    for p in problems:
        assert isinstance(p["count"], int) and p["count"] >= 1, p
        out[(p["point"], p["disk"])] = out.get((p["point"], p["disk"]), 0) + p["count"]
    return out


def _per_disk(blocks: set[tuple[str, str, int]]) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for pid, lb, _b in blocks:
        out[(pid, lb)] = out.get((pid, lb), 0) + 1
    return out


def _first_blocks_named(problems: list[dict], blocks: set[tuple[str, str, int]]) -> None:
    """Each problem names a block it counts: the first of its disk's damaged ones."""
    for p in problems:
        assert (p["point"], p["disk"], p["block"]) in blocks, p


def _expand(owners: dict[tuple[str, str], set[int]]) -> set[tuple[str, str, int]]:
    return {(pid, lb, b) for (pid, lb), blocks in owners.items() for b in blocks}


def _restore_fails(vh: History3, point: str, label: str, out_dir: Path) -> str:
    """``restore --disk`` to a new file must fail leaving nothing in ``out_dir``."""
    out_dir.mkdir(exist_ok=True)
    target = out_dir / f"{label}.raw"
    line = one_error_line(cbt("restore", vh.vault, point, "--disk", label, "--to", target))
    assert list(out_dir.iterdir()) == [], f"a failed restore left {list(out_dir.iterdir())}"
    return line


def _restores(vh: History3, day: int, label: str, out: Path) -> None:
    """An undamaged disk still restores bit for bit (through the API: not the point here)."""
    cbt_api.Vault.open(vh.vault).restore(vh.points[day], out, disk=label)
    assert_same_disk(out, vh.copies[day][label], BS)


# -- a flipped byte ------------------------------------------------------------------------


@pytest.mark.slow
def test_flipped_byte_in_a_pack(vh: History3, tmp_path: Path) -> None:
    pack, digest, offset, stored = day1_blob(vh)
    raw = bytearray(pack.read_bytes())
    raw[offset + 48 + stored // 2] ^= 0x10
    pack.write_bytes(bytes(raw))
    owners = vh.owners(digest)
    assert _verify(vh.vault)[0] == 0, "a flipped payload byte needs --data to be seen"
    _code, problems = _verify(vh.vault, "--data")
    assert _counted(problems) == _per_disk(_expand(owners))
    _first_blocks_named(problems, _expand(owners))
    assert {p["pack"] for p in problems} == {pack.stem}
    p1 = vh.points[1]
    line = _restore_fails(vh, p1, "os", tmp_path / "out")
    blocks = owners[(p1, "os")]
    assert p1 in line and "disk os" in line and pack.stem in line, line
    assert any(f"block {b}" in line for b in blocks), line
    # the other disk of the point and the other points are unaffected
    _restores(vh, 1, "db", tmp_path / "db1.raw")
    _restores(vh, 0, "os", tmp_path / "os0.raw")


def _blocks_each_old_or_new(after: np.ndarray, before: np.ndarray, truth: np.ndarray,
                            bad: set[int]) -> None:
    """Every block is what it was or what it should be; the damaged ones were not written."""
    for i in range(-(-len(truth) // BS)):
        lo, hi = i * BS, min((i + 1) * BS, len(truth))
        now = after[lo:hi]
        if i in bad:
            assert np.array_equal(now, before[lo:hi]), f"damaged block {i} was written"
        else:
            assert np.array_equal(now, before[lo:hi]) or np.array_equal(now, truth[lo:hi]), \
                f"block {i} holds neither its old nor its restored content"


def test_flipped_byte_never_reaches_an_existing_copy_or_device(vh: History3,
                                                               tmp_path: Path) -> None:
    pack, digest, offset, stored = day1_blob(vh)
    raw = bytearray(pack.read_bytes())
    raw[offset + 48 + stored - 1] ^= 0x01
    pack.write_bytes(bytes(raw))
    p1 = vh.points[1]
    bad = vh.owners(digest)[(p1, "os")]
    truth = read(vh.copies[1]["os"])
    # --in-place onto the day-0 copy
    target = tmp_path / "os-copy.img"
    target.write_bytes(read(vh.copies[0]["os"]).tobytes())
    before = read(target)
    line = one_error_line(cbt("restore", vh.vault, p1, "--disk", "os", "--to", target,
                              "--in-place"))
    assert pack.stem in line
    _blocks_each_old_or_new(read(target), before, truth, bad)
    assert temp_files(tmp_path) == []
    # a device full of garbage
    backing = tmp_path / "dev.img"
    backing.write_bytes(np.random.default_rng(9).integers(
        1, 256, len(truth) + MIB, np.uint8).tobytes())
    before = read(backing)
    with loop_device(backing) as dev:
        line = one_error_line(cbt("restore", vh.vault, p1, "--disk", "os", "--to", dev))
        after = read_device(dev)
    assert pack.stem in line
    _blocks_each_old_or_new(after, before, truth, bad)
    assert np.array_equal(after[len(truth):], before[len(truth):])


# -- truncated and missing packs --------------------------------------------------------------


@pytest.mark.parametrize("how", ["truncated", "missing"])
def test_truncated_or_missing_pack(vh: History3, tmp_path: Path, how: str) -> None:
    pack = day1_blob(vh)[0]  # the pack of day 1's changes to os
    entries = trailer_entries(pack)
    every = set().union(*(_expand(vh.owners(d)) for d, _o, _s, _r in entries))
    if how == "missing":
        pack.unlink()
        lost = every
    else:
        cut = entries[len(entries) // 2][1] + 10  # inside a blob header, half-way through
        with open(pack, "r+b") as f:
            f.truncate(cut)
        lost = set().union(*(_expand(vh.owners(d)) for d, o, s, _r in entries
                             if o + 48 + s > cut))
    assert lost
    _code, problems = _verify(vh.vault)  # no --data: the pack's size and trailer tell
    assert {p["pack"] for p in problems} == {pack.stem}
    counted, low, high = _counted(problems), _per_disk(lost), _per_disk(every)
    assert set(low) <= set(counted) <= set(high)
    assert all(low.get(k, 0) <= n <= high[k] for k, n in counted.items()), (counted, low)
    _first_blocks_named(problems, every)
    if how == "missing":
        assert all(p["problem"] == "pack missing" for p in problems)
    point, label, _block = min(lost)
    day = vh.points.index(point)
    line = _restore_fails(vh, point, label, tmp_path / "out")
    assert point in line and f"disk {label}" in line and pack.stem in line, line
    # day 0 stored nothing in this pack: it restores bit for bit
    assert day > 0
    _restores(vh, 0, "os", tmp_path / "os0.raw")
    _restores(vh, 0, "db", tmp_path / "db0.raw")


# -- manifests and point records ---------------------------------------------------------------


@pytest.mark.parametrize("how", ["truncated", "altered"])
def test_damaged_manifest(vh: History3, tmp_path: Path, how: str) -> None:
    p0, p1 = vh.points[0], vh.points[1]
    target = vh.vault / "manifests" / p1 / "db.arrow"
    raw = bytearray(target.read_bytes())
    if how == "truncated":
        raw = raw[: len(raw) * 2 // 3]
    else:
        table = pa.ipc.open_file(pa.py_buffer(bytes(raw))).read_all()
        first = table.column("digest")[0].as_py()
        raw[bytes(raw).index(first) + 5] ^= 0xFF  # still a readable Arrow file
    target.write_bytes(bytes(raw))
    _code, problems = _verify(vh.vault)
    assert {(p["point"], p["disk"]) for p in problems} == {(p1, "db")}
    line = _restore_fails(vh, p1, "db", tmp_path / "out")
    assert "db" in line and p1 in line, line
    _restores(vh, 1, "os", tmp_path / "os1.raw")
    _restores(vh, 2, "db", tmp_path / "db2.raw")
    # diff must say "error", never "different" or "identical"
    for a, b in ((f"{vh.vault}::{p1}/db", vh.copies[1]["db"]),
                 (f"{vh.vault}::{p0}", f"{vh.vault}::{p1}")):
        r = cbt("diff", a, b)
        one_error_line(r)
        assert r.stdout == ""


def test_point_record_names_a_missing_manifest(vh: History3, tmp_path: Path) -> None:
    p2 = vh.points[2]
    (vh.vault / "manifests" / p2 / "os.arrow").unlink()
    _code, problems = _verify(vh.vault)
    assert {(p["point"], p["disk"]) for p in problems} == {(p2, "os")}
    assert all(p["block"] is None for p in problems)
    assert _verify(vh.vault, vh.points[1])[0] == 0
    line = _restore_fails(vh, p2, "os", tmp_path / "out")
    assert p2 in line and "os" in line, line
    _restores(vh, 2, "db", tmp_path / "db2.raw")
    _restores(vh, 1, "os", tmp_path / "os1.raw")


# -- an index that disagrees with the packs ------------------------------------------------------


def _rewrite_entry(vh: History3, digest: bytes, how: str) -> str:
    """Rewrite the index segment holding ``digest``; returns the pack the entry now names."""
    vault = cbt_api.Vault.open(vh.vault)
    name = segments.holding(vault, digest)
    part = segments.read_paged(vault, name)
    hit = np.flatnonzero((part["digests"] == np.frombuffer(digest, np.uint8)).all(axis=1))
    i = int(hit[0])
    uuids = np.array([np.frombuffer(uuid.UUID(hex=p).bytes, np.uint8)
                      for p in part["pack_ids"]])
    entries = {"digests": part["digests"].copy(), "pack_uuid": uuids[part["pack"]].copy(),
               "offset": part["offset"].copy(), "stored": part["stored"].copy(),
               "raw": part["raw"].copy()}
    same_pack = np.flatnonzero(part["pack"] == part["pack"][i])
    if how == "other-blob":
        entries["offset"][i] = part["offset"][int(same_pack[same_pack != i][0])]
    elif how == "off-by-one":
        entries["offset"][i] += 1
    else:  # another pack, at an offset where that pack holds another blob
        other = vh.pack_path(vh.packs[0][0])
        entries["pack_uuid"][i] = np.frombuffer(uuid.UUID(hex=other.stem).bytes, np.uint8)
        entries["offset"][i] = trailer_entries(other)[1][1]
    segments.rewrite(vault, name, entries)
    return uuid.UUID(bytes=entries["pack_uuid"][i].tobytes()).hex


@pytest.mark.parametrize("how", ["other-blob", "off-by-one", "other-pack"])
def test_index_disagrees_with_the_packs(vh: History3, tmp_path: Path, how: str) -> None:
    _pack, digest, _offset, _stored = day1_blob(vh)
    named_pack = _rewrite_entry(vh, digest, how)
    owners = vh.owners(digest)
    _code, problems = _verify(vh.vault)  # plain verify: the trailers tell
    assert _counted(problems) == _per_disk(_expand(owners))
    _first_blocks_named(problems, _expand(owners))
    assert {p["pack"] for p in problems} == {named_pack}
    p1 = vh.points[1]
    line = _restore_fails(vh, p1, "os", tmp_path / "out")
    assert p1 in line and "disk os" in line and named_pack in line, line
    assert any(f"block {b}" in line for b in owners[(p1, "os")]), line
    _restores(vh, 0, "os", tmp_path / "os0.raw")
