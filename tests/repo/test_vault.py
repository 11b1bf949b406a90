"""The vault as a block store: dedup, zero blocks, packs, the index, the config.

Truth: BLAKE3 of every block computed here, and an independent reader of the
pack layout (``helpers.packs.walk_pack``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from helpers import KIB, MIB, PAGE
from helpers.images import assert_same_disk, fs_image, read
from helpers.packs import pack_files, walk_pack
from helpers.truth import block_digests, distinct_raw

import cbt
from cbt.source.synth import make_db_file, punch_hole


def _random_file(path: Path, size: int, seed: int) -> Path:
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size, np.uint8).tobytes())
    return path


def _segment_digests(vault: Path) -> list[bytes]:
    """Every entry of every index segment (one per digest expected)."""
    from cbt.format.paged_index import PagedSegment

    out: list[bytes] = []
    for seg in sorted((vault / "index").glob("*.cbtidx")):
        data = seg.read_bytes()
        opened = PagedSegment.open(lambda o, n, d=data: d[o:o + n], len(data),  # type: ignore[misc]
                                   name=f"index/{seg.name}", where=str(seg))
        out.extend(bytes(d) for c in opened.chunks() for d in c["digests"])
    return out


def test_config_records_format_and_no_encryption(tmp_path: Path) -> None:
    cbt.Vault.init(tmp_path / "v")
    config = json.loads((tmp_path / "v" / "config").read_text())
    assert config["format_version"] == 3  # (paged index segments: cbt before them refuses it)
    assert config["encryption"] == "none"
    assert config["id_key"] == "none"
    assert cbt.Vault.open(tmp_path / "v").config == config


def test_two_vms_with_identical_disks_store_the_data_once(tmp_path: Path) -> None:
    fs_image(tmp_path / "a.img", 4 * MIB, 1)
    shutil.copyfile(tmp_path / "a.img", tmp_path / "b.img")
    truth = block_digests(read(tmp_path / "a.img"), 64 * KIB)
    vault = cbt.Vault.init(tmp_path / "v")
    first = vault.backup("vm1", [f"os={tmp_path / 'a.img'}"], block_size=64 * KIB)
    assert first.bytes_new == sum(truth.values()) > 0
    packs = {p.name for p in pack_files(tmp_path / "v")}
    second = vault.backup("vm2", [f"os={tmp_path / 'b.img'}"], block_size=64 * KIB)
    assert second.bytes_new == 0
    assert second.bytes_stored == 0
    assert second.disks[0].changed_blocks == second.disks[0].blocks  # its first backup
    assert {p.name for p in pack_files(tmp_path / "v")} == packs, "new packs for no new data"
    vault.restore(second.id, tmp_path / "out")
    assert_same_disk(tmp_path / "out" / "os.img", tmp_path / "a.img", 64 * KIB)


def test_a_point_with_no_change_stores_nothing_new(tmp_path: Path) -> None:
    make_db_file(tmp_path / "db.img", 2 * MIB, seed=2)
    vault = cbt.Vault.init(tmp_path / "v")
    vault.backup("vm", [tmp_path / "db.img"], block_size=4 * KIB)
    packs = {p.name for p in pack_files(tmp_path / "v")}
    again = vault.backup("vm", [tmp_path / "db.img"])
    assert again.bytes_new == 0 and again.bytes_stored == 0
    assert again.disks[0].changed_blocks == 0
    assert again.disks[0].block_size == 4 * KIB
    assert {p.name for p in pack_files(tmp_path / "v")} == packs


def test_moved_data_is_not_stored_again(tmp_path: Path) -> None:
    """A page copied elsewhere in the disk is a change, but not new data."""
    disk = _random_file(tmp_path / "d.img", 1 * MIB, seed=3)
    vault = cbt.Vault.init(tmp_path / "v")
    vault.backup("vm", [disk], block_size=4 * KIB)
    with open(disk, "r+b") as f:
        f.seek(5 * PAGE)
        page = f.read(PAGE)
        f.seek(100 * PAGE)
        f.write(page)
    point = vault.backup("vm", [disk])
    assert point.disks[0].changed_blocks == 1
    assert point.bytes_new == 0


def test_zero_blocks_and_holes_are_never_stored(tmp_path: Path) -> None:
    disk = tmp_path / "z.img"
    with open(disk, "wb") as f:
        f.truncate(3 * MIB + 1000)  # a hole
        f.seek(MIB)
        f.write(bytes(MIB))  # allocated zeros
    vault = cbt.Vault.init(tmp_path / "v")
    point = vault.backup("vm", [disk], block_size=64 * KIB)
    assert point.bytes_new == 0 and point.bytes_stored == 0
    assert point.disks[0].changed_blocks == point.disks[0].blocks == 49
    assert pack_files(tmp_path / "v") == []
    vault.restore(point.id, tmp_path / "out")
    assert_same_disk(tmp_path / "out" / "z.img", disk, 64 * KIB)


def test_parallel_identical_disks_keep_one_index_entry_per_digest(tmp_path: Path) -> None:
    """Two workers race to store the same blocks; the commit keeps one entry each."""
    bs = 64 * KIB
    fs_image(tmp_path / "a.img", 8 * MIB, 4)
    shutil.copyfile(tmp_path / "a.img", tmp_path / "b.img")
    truth = block_digests(read(tmp_path / "a.img"), bs)
    vault = cbt.Vault.init(tmp_path / "v")
    point = vault.backup("vm", [f"a={tmp_path / 'a.img'}", f"b={tmp_path / 'b.img'}"],
                         block_size=bs, workers=2)
    assert point.bytes_new == sum(truth.values()), "bytes_new counts each digest once"
    assert sum(d.bytes_new for d in point.disks) == point.bytes_new
    digests = _segment_digests(tmp_path / "v")
    assert len(set(digests)) == len(digests)
    assert set(digests) == set(truth)
    entries = _segment_digests(tmp_path / "v")
    assert len(entries) == len(set(entries)) == len(truth), "one index entry per digest"
    out = tmp_path / "out"
    vault.restore(point.id, out)
    assert_same_disk(out / "a.img", tmp_path / "a.img", bs)
    assert_same_disk(out / "b.img", tmp_path / "a.img", bs)
    report = vault.verify(data=True)
    assert report["problems"] == []


def test_parallel_duplicates_inside_one_disk(tmp_path: Path) -> None:
    """One disk split across workers whose halves are identical: each digest once."""
    bs = 64 * KIB
    half = np.random.default_rng(5).integers(0, 256, 4 * MIB, np.uint8).tobytes()
    disk = tmp_path / "twin.img"
    disk.write_bytes(half + half)
    vault = cbt.Vault.init(tmp_path / "v")
    point = vault.backup("vm", [disk], block_size=bs, workers=2)
    assert point.bytes_new == 4 * MIB
    entries = _segment_digests(tmp_path / "v")
    assert len(entries) == len(set(entries)) == 64
    again = vault.backup("vm", [disk])
    assert again.bytes_new == 0


def test_packs_are_self_describing_and_several_mib(tmp_path: Path) -> None:
    bs = 4 * KIB
    disk = tmp_path / "d.img"
    fs_image(disk, 24 * MIB, 6)
    with open(disk, "r+b") as f:
        punch_hole(f.fileno(), 8 * MIB, 2 * MIB)
    truth = block_digests(read(disk), bs)
    vault = cbt.Vault.init(tmp_path / "v")
    point = vault.backup("vm", [disk], block_size=bs, workers=1)
    packs = pack_files(tmp_path / "v")
    assert all(p.parent.parent == tmp_path / "v" / "packs" for p in packs)
    blobs = [b for p in packs for b in walk_pack(p)]
    assert {b.digest for b in blobs} == set(truth)
    assert distinct_raw((b.digest, b.raw) for b in blobs) == point.bytes_new
    assert sum(b.stored for b in blobs) == point.bytes_stored
    assert {b.codec for b in blobs} <= {0, 1} and {b.encryption for b in blobs} == {0}
    assert any(b.codec == 1 for b in blobs), "text-like blocks should be compressed"
    assert point.bytes_stored < point.bytes_new
    # several MiB per pack, never one file per block
    assert len(packs) <= 1 + point.bytes_stored // (2 * MIB)
    assert len(blobs) > 100 * len(packs)


def test_index_segment_round_trip_with_packs_sharing_uuid_prefixes() -> None:
    """A segment read back maps every digest to its own pack, offset and lengths, also
    when two pack uuids share their first 8 bytes (the fast path's key)."""
    import uuid

    from cbt.format.index_segment import segment_bytes
    from cbt.repo import index as index_mod

    rng = np.random.default_rng(7)
    n = 5000
    uuids = rng.integers(0, 256, (4, 16), dtype=np.uint8)
    uuids[1, :8] = uuids[0, :8]  # same first half, other pack
    digests = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    which = rng.integers(0, 4, n)
    entries = {"digests": digests, "pack_uuid": uuids[which],
               "offset": rng.integers(0, 1 << 40, n, dtype=np.uint64),
               "stored": rng.integers(0, 1 << 20, n, dtype=np.uint32),
               "raw": rng.integers(0, 1 << 20, n, dtype=np.uint32)}
    part = index_mod.read_segment(segment_bytes(entries), "test")
    got = {bytes(d): (part["pack_ids"][p], int(o), int(s), int(r)) for d, p, o, s, r in zip(
        part["digests"], part["pack"], part["offset"], part["stored"], part["raw"], strict=True)}
    want = {bytes(digests[i]): (uuid.UUID(bytes=uuids[which[i]].tobytes()).hex,
                                int(entries["offset"][i]), int(entries["stored"][i]),
                                int(entries["raw"][i])) for i in range(n)}
    assert got == want
    keys = index_mod.prefix_keys(part["digests"])
    assert (keys[1:] >= keys[:-1]).all(), "segments are written sorted"
