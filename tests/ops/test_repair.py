"""``cbt verify --repair``: the index is rebuilt from the packs alone.

The three-point history of ``helpers.vaults.build_history3`` is cloned for
each test and damaged.  Truth: the packs' own trailers read by the independent
reader in ``helpers.packs`` (taken before the damage), BLAKE3 of the disk
copies for which points use a block, and SHA-256 of every pack file before and
after (repair must not touch healthy data).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import KIB
from helpers.cli import cbt, one_error_line
from helpers.images import assert_same_disk
from helpers.packs import pack_files, trailer_entries
from helpers.segments import read_paged
from helpers.shapes import VERIFY_KEYS
from helpers.truth import sha256, tree_hashes
from helpers.vaults import History3, day1_blob

import cbt as cbt_api

BS = 64 * KIB
REPAIR_KEYS = {"packs_read", "blobs_indexed", "blobs_damaged", "packs_quarantined",
               "damaged_points", "records_quarantined", "lost_points"}


def _all_entries(vault: Path) -> set[tuple[bytes, str, int, int, int]]:
    return {(d, p.stem, o, s, r) for p in pack_files(vault) for d, o, s, r in trailer_entries(p)}


def _repair(vault: Path) -> tuple[int, dict]:
    r = cbt("verify", vault, "--repair", "--json")
    out = json.loads(r.stdout)
    assert set(out) == VERIFY_KEYS | {"repair"}, out
    assert set(out["repair"]) == REPAIR_KEYS
    assert r.returncode == (2 if out["problems"] else 0), (r.returncode, out, r.stderr)
    return r.returncode, out


def _grouped_as(problems: list[dict], owners: dict[tuple[str, str], set[int]]) -> None:
    """Problems are grouped per damaged file (issue 12): per point and disk they count the
    damaged blocks, each naming the first of its group."""
    counted: dict[tuple[str, str], int] = {}
    for p in problems:
        key = (p["point"], p["disk"])
        assert p["block"] in owners[key], p
        counted[key] = counted.get(key, 0) + p["count"]
    assert counted == {k: len(v) for k, v in owners.items()}


def _verify_code(vault: Path, *args: str) -> int:
    return cbt("verify", vault, *args).returncode


def _restores(vh: History3, day: int, out: Path) -> None:
    r = cbt("restore", vh.vault, vh.points[day], "--to", out)
    assert r.returncode == 0, r.stderr
    for lb, copy in vh.copies[day].items():
        assert_same_disk(out / f"{lb}.img", copy, BS)


def _flip(pack: Path, offset: int, stored: int) -> None:
    raw = bytearray(pack.read_bytes())
    raw[offset + 48 + stored // 3] ^= 0x20
    pack.write_bytes(bytes(raw))


@pytest.mark.slow
def test_repair_rebuilds_a_deleted_index(vh: History3, tmp_path: Path) -> None:
    entries = _all_entries(vh.vault)
    packs = tree_hashes(vh.vault / "packs")
    for seg in (vh.vault / "index").glob("*.cbtidx"):
        seg.unlink()
    code, out = _repair(vh.vault)
    assert code == 0 and out["problems"] == []
    assert out["repair"] == {"packs_read": len(pack_files(vh.vault)),
                             "blobs_indexed": len(entries), "blobs_damaged": 0,
                             "packs_quarantined": 0, "damaged_points": [],
                             "records_quarantined": [], "lost_points": []}
    segments = sorted((vh.vault / "index").glob("*.cbtidx"))
    assert len(segments) == 1
    part = read_paged(cbt_api.Vault.open(vh.vault), f"index/{segments[0].name}")
    rebuilt = {(bytes(part["digests"][i]), part["pack_ids"][int(part["pack"][i])],
                int(part["offset"][i]), int(part["stored"][i]), int(part["raw"][i]))
               for i in range(len(part["offset"]))}
    assert rebuilt == entries
    assert tree_hashes(vh.vault / "packs") == packs
    assert _verify_code(vh.vault, "--data") == 0
    for day in range(3):
        _restores(vh, day, tmp_path / f"out{day}")


def test_repair_names_the_points_a_corrupt_blob_damages(vh: History3, tmp_path: Path) -> None:
    pack, digest, offset, stored = day1_blob(vh)
    total = len(_all_entries(vh.vault))
    _flip(pack, offset, stored)
    packs = tree_hashes(vh.vault / "packs")
    owners = vh.owners(digest)
    damaged = sorted({pid for pid, _lb in owners})
    assert vh.points[0] not in damaged and vh.points[1] in damaged
    code, out = _repair(vh.vault)
    assert code == 2
    assert out["repair"] == {"packs_read": len(pack_files(vh.vault)), "blobs_indexed": total - 1,
                             "blobs_damaged": 1, "packs_quarantined": 0,
                             "damaged_points": damaged, "records_quarantined": [],
                             "lost_points": []}
    _grouped_as(out["problems"], owners)
    assert tree_hashes(vh.vault / "packs") == packs, "repair rewrote a pack"
    # the undamaged point restores; a damaged one stops without leaving anything
    _restores(vh, 0, tmp_path / "out0")
    out_dir = tmp_path / "out1"
    line = one_error_line(cbt("restore", vh.vault, vh.points[1], "--to", out_dir))
    assert vh.points[1] in line and "os" in line
    assert not out_dir.exists() or list(out_dir.iterdir()) == []
    r = cbt("verify", vh.vault, "--data", "--json")
    assert r.returncode == 2
    assert {p["point"] for p in json.loads(r.stdout)["problems"]} == set(damaged)


def test_a_backup_after_repair_heals_the_damaged_points(vh: History3, tmp_path: Path) -> None:
    """Repairable where the data allows: the block is stored again from a disk that has it."""
    pack, _digest, offset, stored = day1_blob(vh)
    _flip(pack, offset, stored)
    assert _repair(vh.vault)[0] == 2
    vault = cbt_api.Vault.open(vh.vault)
    vault.backup("vm", [f"os={vh.copies[1]['os']}"], block_size=BS, workers=1)
    for day in (1, 2):
        _restores(vh, day, tmp_path / f"out{day}")
    assert _verify_code(vh.vault, "--data") == 0


def test_repair_of_a_pack_whose_only_blob_is_corrupt(vh: History3, tmp_path: Path) -> None:
    """Day 2's run wrote one pack holding one blob; when that blob is corrupt the pack
    has nothing healthy to index, and the point that uses the block stays damaged."""
    pack = vh.pack_path(vh.packs[2][0])
    [(digest, offset, stored, _raw)] = trailer_entries(pack)
    owners = vh.owners(digest)
    damaged = sorted({pid for pid, _lb in owners})
    assert damaged == [vh.points[2]]
    _flip(pack, offset, stored)
    code, out = _repair(vh.vault)
    assert out["repair"]["blobs_damaged"] == 1
    assert out["repair"]["damaged_points"] == damaged, out
    assert code == 2
    assert _verify_code(vh.vault) == 2, "after repair, plain verify must still see the loss"


def test_repair_indexes_a_pack_whose_trailer_is_lost(vh: History3, tmp_path: Path) -> None:
    entries = _all_entries(vh.vault)
    pack = max(pack_files(vh.vault), key=lambda p: p.stat().st_size)
    others = {p: sha256(p) for p in pack_files(vh.vault) if p != pack}
    with open(pack, "r+b") as f:
        f.truncate(pack.stat().st_size - 20)  # the footer is gone, every blob is whole
    _code, out = _repair(vh.vault)
    assert out["repair"]["blobs_indexed"] == len(entries)
    assert out["repair"]["blobs_damaged"] == 0
    assert {p: sha256(p) for p in others} == others
    for day in range(3):
        _restores(vh, day, tmp_path / f"out{day}")
    # every block is held by a pack: no point is damaged
    assert out["repair"]["damaged_points"] == [], out["problems"][:3]


def test_repair_of_a_truncated_pack_names_what_was_cut(vh: History3, tmp_path: Path) -> None:
    pack = day1_blob(vh)[0]
    entries = trailer_entries(pack)
    total = len(_all_entries(vh.vault))
    cut = entries[len(entries) // 2][1] + 30
    with open(pack, "r+b") as f:
        f.truncate(cut)
    lost = [d for d, o, s, _r in entries if o + 48 + s > cut]
    owners: dict[tuple[str, str], set[int]] = {}
    for d in lost:
        for k, v in vh.owners(d).items():
            owners.setdefault(k, set()).update(v)
    code, out = _repair(vh.vault)
    assert code == 2
    assert out["repair"]["blobs_indexed"] == total - len(lost)
    assert out["repair"]["damaged_points"] == sorted({pid for pid, _lb in owners})
    _grouped_as(out["problems"], owners)
    _restores(vh, 0, tmp_path / "out0")


def test_repair_never_runs_beside_gc(vh: History3) -> None:
    """Both rewrite the index (and gc trashes packs repair would index): repair waits for a
    running gc, or refuses naming it."""
    from cbt.ops.verify import repair
    from cbt.repo.lock import VaultLockedError, gc_lock
    from cbt.repo.vault import Vault

    vault = Vault.open(vh.vault)
    before = sorted(vault.segment_names())
    with gc_lock(vault.storage), \
            pytest.raises(VaultLockedError, match=r"^\[Errno 11\] vault .* is locked by pid"):
        repair(vault)
    assert sorted(vault.segment_names()) == before
    assert not repair(vault).verify.problems  # free again
