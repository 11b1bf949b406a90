"""Issue 12: damage stays local, for prune and for the index.

- A damaged index segment: restore indexes the packs it covered from their own
  trailers (blob headers where a trailer is lost too) and restores bit for bit;
  verify names the segment once; repair clears it.
- verify groups problems per damaged file: one problem per point, disk and pack,
  naming the first block and counting them all (the truth: which blocks of the
  disk copies have their id in the pack's trailer, computed here with blake3).
- prune beside a damaged record: it, the points based on it and the points its
  deltas are based on stay; the rest is pruned.
"""

from __future__ import annotations

import json
from pathlib import Path

import blake3
import pytest
from helpers import segments
from helpers.cli import cbt
from helpers.damage import BS, History, damage_record, flip_byte, pristine
from helpers.images import assert_same_disk, read
from helpers.packs import trailer_entries
from helpers.shapes import PROBLEM_KEYS, VERIFY_KEYS
from helpers.truth import nblocks

from cbt.ops.prune import PruneRequest, prune


@pytest.fixture(params=[False, True], ids=["plain", "sealed"])
def h(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
      tmp_path: Path) -> History:
    return pristine(tmp_path_factory, request.param).clone(tmp_path / "h")


def _restores(h: History, point: str, out: Path, tmp_path: Path) -> dict:
    r = cbt("restore", h.vault, point, "--to", out, "--json", env=h.env(tmp_path))
    assert r.returncode == 0, r.stderr
    for label, copy in h.copies[point].items():
        assert_same_disk(out / f"{label}.img", copy, BS)
    return dict(json.loads(r.stdout))


def _verify(h: History, tmp_path: Path, *args: str) -> tuple[int, dict]:
    r = cbt("verify", h.vault, *args, "--json", env=h.env(tmp_path))
    out = json.loads(r.stdout)
    assert set(out) == VERIFY_KEYS | ({"repair"} if "--repair" in args else set())
    for p in out["problems"]:
        assert set(p) == PROBLEM_KEYS, p
    assert r.returncode == (2 if out["problems"] else 0), (r.returncode, r.stderr)
    return r.returncode, out


def _segment_of(h: History, point: str) -> tuple[Path, list[str]]:
    """The index segment the backup of ``point`` wrote (or, merged since, the largest
    segment), and the packs it covers."""
    vault = h.opened()
    name = vault.segment_name(point)
    if not vault.storage.exists(name):
        name = segments.largest(vault)
    return h.vault / name, list(segments.opened(vault, name).pack_ids)


def _pack(h: History, pid: str) -> Path:
    return h.vault / "packs" / pid[:2] / f"{pid}.pack"


@pytest.mark.parametrize("trailer_too", [False, True])
def test_restore_reads_the_packs_of_a_damaged_segment(h: History, tmp_path: Path,
                                                      trailer_too: bool) -> None:
    segment, packs = _segment_of(h, h.web[0])
    flip_byte(segment, segments.head_fraction(segment))  # (every reader opens its head)
    if trailer_too:  # a pack of that segment loses its trailer: its blob headers remain
        pack = _pack(h, packs[0])
        raw = pack.read_bytes()
        pack.write_bytes(raw[:-8])
    for pid in (*h.web, h.db):
        out = _restores(h, pid, tmp_path / f"out-{pid}", tmp_path)
        assert any(str(segment) in w for w in out["warnings"]), out["warnings"]
    # verify names the segment once, with no problem per block
    _code, out = _verify(h, tmp_path)
    assert len(out["problems"]) == 1, out["problems"]
    (p,) = out["problems"]
    assert str(segment) in p["problem"] and p["count"] is None and p["block"] is None, p
    if trailer_too:
        return
    # a backup adopts the packs (from their trailers); repair rebuilds the index
    r = cbt("backup", h.vault, "--vm", "db", f"db={h.disks / 'db.img'}", env=h.env(tmp_path))
    assert r.returncode == 0, r.stderr
    code, out = _verify(h, tmp_path, "--repair")
    assert code == 0 and out["problems"] == [], out["problems"]
    assert _verify(h, tmp_path, "--data")[0] == 0
    assert not segment.exists()


def _block_ids(h: History, point: str, label: str) -> list[bytes]:
    """The vault's id of every block of a disk copy (keyed BLAKE3 in an encrypted vault)."""
    key = h.opened().id_key
    data = read(h.copies[point][label])
    mv = memoryview(data)
    return [(blake3.blake3(mv[i * BS:(i + 1) * BS], key=key) if key else
             blake3.blake3(mv[i * BS:(i + 1) * BS])).digest()
            for i in range(nblocks(len(data), BS))]


def test_verify_groups_the_blocks_of_a_lost_pack(h: History, tmp_path: Path) -> None:
    _segment, packs = _segment_of(h, h.web[0])
    pack = max(packs, key=lambda p: len(trailer_entries(_pack(h, p))))
    in_pack = {d for d, _o, _s, _r in trailer_entries(_pack(h, pack))}
    _pack(h, pack).unlink()
    truth: dict[tuple[str, str], list[int]] = {}
    for pid in (*h.web, h.db):
        for label in h.copies[pid]:
            zero = blake3.blake3(bytes(BS), key=h.opened().id_key) if h.encrypted \
                else blake3.blake3(bytes(BS))
            hit = [i for i, d in enumerate(_block_ids(h, pid, label))
                   if d in in_pack and d != zero.digest()]
            if hit:
                truth[(pid, label)] = hit
    assert len(truth) >= 2, truth
    _code, out = _verify(h, tmp_path)
    got = {(p["point"], p["disk"]): p for p in out["problems"]}
    assert len(got) == len(out["problems"]), "one problem per point, disk and pack"
    assert set(got) == set(truth)
    for key, blocks in truth.items():
        p = got[key]
        assert (p["pack"], p["problem"]) == (pack, "pack missing"), p
        assert (p["block"], p["count"]) == (min(blocks), len(blocks)), (p, blocks)
    r = cbt("verify", h.vault, env=h.env(tmp_path))
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if "problem" in ln]
    assert len(lines) == len(truth), r.stderr


def _keep_db_only(points: list) -> dict[str, list[str]]:
    return {p.id: (["latest"] if p.vm == "db" else []) for p in points}


def test_prune_leaves_a_damaged_record_and_what_it_needs(h: History, tmp_path: Path) -> None:
    record = h.record(h.web[2])
    original = record.read_bytes()
    damage_record(h, h.web[2], "flip")  # web[3] is based on it; it is based on web[0]
    kept3 = h.record(h.web[3]).read_bytes()
    result = prune(h.opened(), PruneRequest(keep=_keep_db_only,
                                            expired=lambda vm, created: False))
    assert any(str(record) in w for w in result.warnings), result.warnings
    verdicts = {v.recovery_point: v.keep for v in result.points}
    assert verdicts == {h.web[0]: False, h.web[1]: False, h.db: True}, verdicts
    assert not h.record(h.web[1]).exists()
    assert h.record(h.web[3]).read_bytes() == kept3
    assert h.opened().load_point(h.web[0]).hidden, "web[2]'s deltas are based on it"
    # the record put back: web[2] and web[3] restore bit for bit
    record.write_bytes(original)
    for pid in (h.web[2], h.web[3]):
        _restores(h, pid, tmp_path / f"out-{pid}", tmp_path)


def test_prune_deletes_nothing_when_a_damaged_records_bases_are_unknown(
        h: History, tmp_path: Path) -> None:
    record = h.record(h.web[2])
    original = record.read_bytes()
    damage_record(h, h.web[2], "flip")
    manifest = h.manifest(h.web[2], "os")
    saved = manifest.read_bytes()
    flip_byte(manifest)
    result = prune(h.opened(), PruneRequest(keep=_keep_db_only,
                                            expired=lambda vm, created: False))
    assert any("hides what it would delete" in w for w in result.warnings), result.warnings
    opened = h.opened()
    assert opened.load_point(h.web[0]).hidden and opened.load_point(h.web[1]).hidden
    record.write_bytes(original)
    manifest.write_bytes(saved)
    _restores(h, h.web[3], tmp_path / "out3", tmp_path)
