"""On-disk format 1, byte for byte: a vault written before the refactor still works.

``tests/fixtures/vault-format1/`` was written by cbt at commit c1ec584 (before the
layered refactor of issue 10) with ``tests/fixtures/make_format1_vault.py``, which says
how.  These tests run today's cbt on a copy of it (the committed files are never
touched) and check it against truth computed without cbt: the images are rebuilt from
the generator's description (pure hashlib) and checked against the SHA-256 recorded in
``vault-format1.json``; block digests come from the ``blake3`` package, manifests are
read with plain pyarrow.

1. The committed files are exactly the ones pinned below (a changed fixture fails).
2. ``cbt list`` shows every point with its VM, time, parent and disks.
3. Every manifest is a plain Arrow file with the documented schema and metadata, and
   the skip chain of full manifest and deltas resolves to the truth's block digests.
4. Every point restores to exactly the truth's bytes, zero blocks as holes.
5. ``cbt verify --data`` finds no problem and checks every data block.
6. A new incremental backup by today's cbt extends the chains in format 1, restores,
   and leaves every old file as it was and every old point restorable.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import blake3
import numpy as np
import pyarrow as pa
import pytest
from helpers.cli import backup_cli, cbt_json
from helpers.images import assert_same_disk
from helpers.shapes import (
    LIST_DISK_KEYS,
    LIST_KEYS,
    LIST_POINT_KEYS,
    POINT_DISK_KEYS,
    RESTORE_KEYS,
    VERIFY_KEYS,
)
from helpers.truth import block_digests, nblocks, truth_changed

FIXTURES = Path(__file__).parents[1] / "fixtures"
COMMITTED = FIXTURES / "vault-format1"
TRUTH: dict[str, Any] = json.loads((FIXTURES / "vault-format1.json").read_text())
POINTS: list[dict[str, Any]] = TRUTH["points"]

# SHA-256 of every file of the committed vault, as c1ec584 wrote it.
FIXTURE_SHA256 = {
    "config":
        "f38f394306ce0b70e099c27e8da5d2b9d2da0ea197bc360eda2a36ff94466b52",
    "gc.lock":
        "47fbb10dc1d935529e5c312ac7248b6da1b94df8a7241bfc514fcf2dac441743",
    "index/db.20260102T033000Z.arrow":
        "635582bfb7663b765d6529374e58aa8d63e9bf8aeb4a8363983414f7fda630f6",
    "index/db.20260104T033000Z.arrow":
        "8fbc5780f3367d7cda224c361f03c4f44d344e04270ab6adc9a157daff459471",
    "index/web.20260101T020000Z.arrow":
        "44a52086433dd10d96c83cb44c648a727e52d32c83fd54916f1eb8d9e2d9de26",
    "index/web.20260102T020000Z.arrow":
        "3d5df670cd3d451fea077f123cdfe9a0e4f38a71b314f9c6a96b2d78b545f86a",
    "index/web.20260103T020000Z.arrow":
        "3ddfdea1fcd4e8c419ce1f8b085221e21f45c7d891aaee4ab27e9e374d0ea19a",
    "index/web.20260104T020000Z.arrow":
        "356b8fd445b4501bbee9de8ada2f07ad931bd4a736ad90b7e006a2de3a0ba299",
    "lock":
        "17a94f88a646c40ca5b0aebb1d0ff98b2240f6204f734c8dadb16fdb5bc5d243",
    "manifests/db.20260102T033000Z/db.arrow":
        "fc6234ae5b611b09910046f5355b3856a6dd4f45c3d9272aac679f983ff09ba4",
    "manifests/db.20260104T033000Z/db.arrow":
        "a4ad5e61a45fd9ce2ad1b40bfa6835befa16c210d8e4d89dad40a522d1aeac9e",
    "manifests/web.20260101T020000Z/data.arrow":
        "3138def733497d7a387600950b3b3de8921cc1ce493d952f6525d1b1c9a6c8e9",
    "manifests/web.20260101T020000Z/os.arrow":
        "62fa2342cdb957e2639edd257adf2c3cdd6b171b8fd201babd468f3c5ff29944",
    "manifests/web.20260102T020000Z/data.arrow":
        "f73b4a16d75e20f5429b5efd030be885a088e6d7c1c238811e522199118cf8ed",
    "manifests/web.20260102T020000Z/os.arrow":
        "69e2d967e0ab1a412ac7b2a9b96c18fde86f366f6748c523faf9671c7cb72ae7",
    "manifests/web.20260103T020000Z/data.arrow":
        "acea1765a792208ac37c9559ec1de0ee3a205ab59b0da9f321e5ae2374f2afa5",
    "manifests/web.20260103T020000Z/logs.arrow":
        "027edd7baf72acc4fc1e680e08d12bfb4d37443205e7ec73219602d758984d5a",
    "manifests/web.20260103T020000Z/os.arrow":
        "4b0dbbb680ac54382cd4702a93f7ca37123ec2894531a58a6c119d42110882c2",
    "manifests/web.20260104T020000Z/data.arrow":
        "886e02e995fea4ffa15de9fc7f5acc6393e8ac125aff993e8ce8414040dc84f2",
    "manifests/web.20260104T020000Z/logs.arrow":
        "1dbb75481e4c89850cde69a485e57d59c143c6f3680b4be8b02effa9d40731dc",
    "manifests/web.20260104T020000Z/os.arrow":
        "981aef1604475f10d63902bf04108033b571704b74247d93b4a8ab1610b6724b",
    "packs/02/0276a2613f374fb48be2508beb0ee207.pack":
        "876dde50e24a1aca8e1fef976704c53aa1f138b40d61d1ed64508b801a478526",
    "packs/1d/1d520a27ce1b45ab92bb9e630855b32d.pack":
        "2760a132a2b278fe53b90fc1f192f11e8dabef70ccf716f47c94c9c777052d81",
    "packs/2d/2d325dce478646e09826f6498dabf88f.pack":
        "52e19998c503d1c99779e6745190007b81466e78ba7f2072363cfcbd22a963f0",
    "packs/36/365d471dd07245ee9b23108e9fa6bbcf.pack":
        "2d9eee41cc8e848b6bd94e8db193a5a0c2ddbbc7dac2976781c9e9bc1c9568ae",
    "packs/52/526ac749335b4404a4fa710f6ce2d6a9.pack":
        "2132dc1f04ac6532e48087bed2105c32a0014abf68a5545fbf4551114d977eeb",
    "packs/58/5895581d3adb4e1fb7745c3ff29a4eff.pack":
        "c2a3ae37deae91bc185d85a44b94a9c51839d2045853a2ddfb94eecce5237f56",
    "packs/7b/7b9d86fcdcc44e4f869f61c09e7ea96b.pack":
        "ab56e084e4122f2ade17ece083a5e6adf51e56e04b4e3ced6fa492efe666fda1",
    "packs/87/8749946d39e14670aecb68e4f7ca6029.pack":
        "d4638cc5278bce0f5b0fe1604a1f915d07775bca87bc8dcabd7672c2061c1ef5",
    "packs/92/921740627d8e4c0991fb2e9eafdfb965.pack":
        "cf16f1c7e9338488ab729284f9dd6897aa3a5f8d4889a5c73b9ab4120ddc09ef",
    "packs/d7/d7c9958c418649bb98ccea781786d601.pack":
        "7d10acf28c95305d86cd32405255e8a29c6ab894f6e61b6ec40531a008a3d227",
    "packs/fe/fec724a4635a48419a53fd69144b7535.pack":
        "1f8b953db39aef1adaad093f65262235094707dadf9bd3aa5d6de56cb8049ea6",
    "points/db.20260102T033000Z.json":
        "e2f409e31163e4f91f94dfce184a37e04a152fde556d656468ffb5aa321fda83",
    "points/db.20260104T033000Z.json":
        "e8012b6372b97f0a10bc035e2435fb82f466847961cd0ca95f41630bf997b588",
    "points/web.20260101T020000Z.json":
        "00bbd713c54290335bca72d3565e4c6a1f89069796f3a260e097a35eb2979dee",
    "points/web.20260102T020000Z.json":
        "53a432aa4459bb619c9913560bb69ea1083e856d2bd850e4d70ca401561b6684",
    "points/web.20260103T020000Z.json":
        "b090d0a71a8ab59846cffd4df499294997780fd5475307be78d918d94cbd0013",
    "points/web.20260104T020000Z.json":
        "4308ede696d190978c126f76728c4c6dc8dd57eb2f2f4a2b28d2afb5844ea1af",
}

# Files a writer rewrites in place: the holder line of the lock files.
LOCK_FILES = {"lock", "gc.lock"}

MANIFEST_KEYS = {"cbt.magic", "cbt.format_version", "cbt.kind", "cbt.disk_size",
                 "cbt.block_size", "cbt.digest_checksum", "cbt.checksum"}
FULL_KEYS = MANIFEST_KEYS | {"cbt.source", "cbt.created"}
DELTA_KEYS = MANIFEST_KEYS | {"cbt.base", "cbt.seq"}
DATA, ZERO, HOLE = 0, 1, 2


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_format1_vault",
                                                  FIXTURES / "make_format1_vault.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


RECORDED_SHA256 = {(p["vm"], label, p["day"]): d["sha256"]
                   for p in POINTS for label, d in p["disks"].items()}


@functools.cache
def truth(vm: str, label: str, day: int) -> bytes:
    """The bytes of a disk on a day, checked against the SHA-256 the fixture recorded."""
    content = bytes(gen.image(vm, label, day).content)
    assert hashlib.sha256(content).hexdigest() == RECORDED_SHA256[vm, label, day], (vm, label)
    return content


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def vault_files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def save_truth(vm: str, label: str, day: int, to: Path) -> Path:
    """The truth image as a file (holes where the generator leaves them)."""
    gen.image(vm, label, day).save(to)
    assert to.read_bytes() == truth(vm, label, day)
    return to


@pytest.fixture
def vault(tmp_path: Path) -> Path:
    """A private copy of the committed vault."""
    return Path(shutil.copytree(COMMITTED, tmp_path / "vault"))


# -- 1. the fixture itself ------------------------------------------------------------------


def test_committed_fixture_is_unchanged() -> None:
    assert vault_files(COMMITTED) == FIXTURE_SHA256


def test_truth_rebuilds_the_recorded_images() -> None:
    assert TRUTH["commit"] == "c1ec584" and TRUTH["seed"] == gen.SEED.decode()
    assert [(p["vm"], p["day"], p["created"]) for p in POINTS] == [tuple(x) for x in gen.POINTS]
    for p in POINTS:
        assert p["id"] == gen.point_id(p["vm"], p["created"])
        assert list(p["disks"]) == gen.labels(p["vm"], p["day"])
        for label, d in p["disks"].items():
            content = truth(p["vm"], label, p["day"])
            assert hashlib.sha256(content).hexdigest() == d["sha256"], (p["id"], label)
            assert len(content) == d["size"]
            assert d["size"] % d["block_size"], "every disk ends in a short tail block"
    # Between them the images hold every kind of block, at both block sizes.
    kinds = {(d["block_size"], int(f)) for p in POINTS for label, d in p["disks"].items()
             for f in truth_rows(p["vm"], label, p["day"], d["block_size"])[0]}
    assert kinds == {(bs, f) for bs in (4096, 16384) for f in (DATA, ZERO, HOLE)}


# -- 2. listing ------------------------------------------------------------------------------


def _parent(i: int) -> str | None:
    earlier = [p["id"] for p in POINTS[:i] if p["vm"] == POINTS[i]["vm"]]
    return earlier[-1] if earlier else None


def _bytes_new() -> list[int]:
    """Raw bytes of the distinct blocks each point was the first to hold."""
    held: set[bytes] = set()
    out = []
    for p in POINTS:
        new: dict[bytes, int] = {}
        for label in p["disks"]:
            data = np.frombuffer(truth(p["vm"], label, p["day"]), np.uint8)
            for d, raw in block_digests(data, p["disks"][label]["block_size"]).items():
                if d not in held:
                    new[d] = raw
        held |= set(new)
        out.append(sum(new.values()))
    return out


def test_list_shows_every_point(vault: Path) -> None:
    out = cbt_json("list", vault)
    assert set(out) == LIST_KEYS and out["warnings"] == []
    listed = out["points"]
    assert [p["recovery_point"] for p in listed] == [p["id"] for p in POINTS]
    for i, (got, want) in enumerate(zip(listed, POINTS, strict=True)):
        assert set(got) == LIST_POINT_KEYS
        assert got["vm"] == want["vm"] and got["consistency"] == "crash"
        assert got["created"] == want["created"].replace("+00:00", "Z")
        assert got["parent"] == _parent(i)
        assert all(set(d) == LIST_DISK_KEYS for d in got["disks"])
        assert {d["label"]: (d["size"], d["block_size"]) for d in got["disks"]} == {
            label: (d["size"], d["block_size"]) for label, d in want["disks"].items()}
    assert [p["bytes_new"] for p in listed] == _bytes_new()
    db = cbt_json("list", vault, "--vm", "db")["points"]
    assert [p["recovery_point"] for p in db] == [p["id"] for p in POINTS if p["vm"] == "db"]


def test_python_api_opens_the_vault(vault: Path) -> None:
    import cbt

    v = cbt.Vault.open(vault)
    assert [r.id for r in v.points()] == [p["id"] for p in POINTS]
    assert v.config["format_version"] == 1 and v.config["encryption"] == "none"
    latest = v.latest("web")
    assert latest is not None and latest.id == POINTS[4]["id"]


# -- 3. manifests, read with plain pyarrow ----------------------------------------------------


def read_arrow(path: Path) -> pa.Table:
    with pa.OSFile(str(path)) as f:
        return pa.ipc.open_file(f).read_all()


def truth_rows(vm: str, label: str, day: int, bs: int) -> tuple[np.ndarray, np.ndarray]:
    """(flags, digests) of every block of a truth image, as a full manifest has them."""
    image = gen.image(vm, label, day)
    content = bytes(image.content)
    n = nblocks(len(content), bs)
    flags = np.full(n, ZERO, np.uint8)
    digests = np.zeros((n, 32), np.uint8)
    pages = bs // gen.PAGE
    for i in range(n):
        block = content[i * bs:(i + 1) * bs]
        if any(block):
            flags[i] = DATA
            digests[i] = np.frombuffer(blake3.blake3(block).digest(), np.uint8)
        elif all(p in image.holes for p in range(i * pages, (i + 1) * pages)
                 if p * gen.PAGE < len(content)):
            flags[i] = HOLE
    return flags, digests


def _columns(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    blocks = table.column("block").to_numpy()
    flags = table.column("flags").to_numpy()
    raw = b"".join(c.buffers()[1].to_pybytes()[c.offset * 32:(c.offset + len(c)) * 32]
                   for c in table.column("digest").chunks)
    return blocks, flags, np.frombuffer(raw, np.uint8).reshape(-1, 32)


def test_manifests_are_plain_arrow_and_resolve_to_the_truth() -> None:
    records = {p["id"]: json.loads((COMMITTED / "points" / f"{p['id']}.json").read_text())
               for p in POINTS}
    for p in POINTS:
        for disk in records[p["id"]]["disks"]:
            label, bs = disk["label"], disk["block_size"]
            # The skip chain: seq n rests on seq n & (n - 1), down to the full manifest.
            chain, point, seq = [], p["id"], disk["seq"]
            while True:
                rec = next(d for d in records[point]["disks"] if d["label"] == label)
                assert rec["seq"] == seq
                chain.append((COMMITTED / rec["manifest"], rec))
                if seq == 0:
                    assert rec["base"] is None
                    break
                point, seq = rec["base"], seq & (seq - 1)
            flags = digests = np.zeros(0)
            for path, rec in reversed(chain):
                table = read_arrow(path)
                meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
                kind = "full" if rec["seq"] == 0 else "delta"
                assert set(meta) >= (FULL_KEYS if kind == "full" else DELTA_KEYS), meta
                assert meta["cbt.magic"] == "cbt-manifest" and meta["cbt.kind"] == kind
                assert meta["cbt.format_version"] == "1"
                assert (int(meta["cbt.disk_size"]), int(meta["cbt.block_size"])) == (
                    rec["size"], bs)
                assert blake3.blake3(path.read_bytes()).hexdigest() == rec["manifest_checksum"]
                blocks, fl, dg = _columns(table)
                assert meta["cbt.digest_checksum"] == blake3.blake3(dg.tobytes()).hexdigest()
                n = nblocks(rec["size"], bs)
                if kind == "full":
                    assert blocks.tolist() == list(range(n))
                    flags, digests = fl.copy(), dg.copy()
                else:
                    assert meta["cbt.base"] == rec["base"] and int(meta["cbt.seq"]) == rec["seq"]
                    flags = np.resize(flags, n) if n <= len(flags) else np.concatenate(
                        [flags, np.full(n - len(flags), HOLE, np.uint8)])
                    digests = np.concatenate([digests, np.zeros((n, 32), np.uint8)])[:n]
                    flags[blocks], digests[blocks] = fl, dg
            want_flags, want_digests = truth_rows(p["vm"], label, p["day"], bs)
            assert np.array_equal(flags, want_flags), (p["id"], label)
            assert np.array_equal(digests, want_digests), (p["id"], label)


# -- 4 and 5. restore and verify ------------------------------------------------------------


def restore_and_compare(vault: Path, point: dict[str, Any], tmp_path: Path) -> None:
    to = tmp_path / "restored" / point["id"]
    out = cbt_json("restore", vault, point["id"], "--to", to, "--workers", "1")
    assert set(out) == RESTORE_KEYS and out["recovery_point"] == point["id"]
    assert [d["label"] for d in out["disks"]] == list(point["disks"])
    expect = tmp_path / "expected"
    expect.mkdir(exist_ok=True)
    for d in out["disks"]:
        label, bs = d["label"], point["disks"][d["label"]]["block_size"]
        assert d["size"] == point["disks"][label]["size"]
        want = save_truth(point["vm"], label, point["day"], expect / f"{label}.img")
        assert_same_disk(to / f"{label}.img", want, bs)
    shutil.rmtree(to)


def test_every_point_restores_bit_for_bit(vault: Path, tmp_path: Path) -> None:
    for p in POINTS:
        restore_and_compare(vault, p, tmp_path)


def data_blocks(points: list[dict[str, Any]]) -> int:
    """Blocks holding a non-zero byte, over every disk of every point."""
    total = 0
    for p in points:
        for label, d in p["disks"].items():
            flags, _ = truth_rows(p["vm"], label, p["day"], d["block_size"])
            total += int((flags == DATA).sum())
    return total


def test_verify_data_passes(vault: Path) -> None:
    out = cbt_json("verify", vault, "--data")
    assert set(out) >= VERIFY_KEYS
    assert out["problems"] == [] and out["warnings"] == []
    assert out["points"] == len(POINTS) and out["data"] is True
    assert out["blocks_checked"] == data_blocks(POINTS)
    assert out["unreferenced_bytes"] == 0


# -- 6. a new backup by today's code --------------------------------------------------------


def day5(label: str) -> Any:
    """web's disks on day 5: a hole filled, data punched, a disk grown, one unchanged."""
    image = gen.image("web", label, 4)
    if label == "os":
        image.fill(40, 2, "rand", "os/day5")
        image.punch(76, 2)
    elif label == "data":
        image.resize(400 * 1024 + 17)
        image.fill(60, 3, "text", "data/day5")
    return image


def test_new_backup_extends_the_old_vault(vault: Path, tmp_path: Path) -> None:
    old = vault_files(vault)
    disks = tmp_path / "disks"
    disks.mkdir()
    images = {label: day5(label) for label in gen.labels("web", 4)}
    for label, image in images.items():
        image.save(disks / f"{label}.img")
    line = backup_cli(vault, "web", *(disks / f"{label}.img" for label in images),
                      "--now", "2026-01-05T02:00:00+00:00", "--workers", "1")
    new_id = "web.20260105T020000Z"
    assert line["recovery_point"] == new_id
    held = set()
    for p in POINTS:
        for label, d in p["disks"].items():
            held |= set(block_digests(np.frombuffer(truth(p["vm"], label, p["day"]), np.uint8),
                                      d["block_size"]))
    for d in line["disks"]:
        assert set(d) == POINT_DISK_KEYS
        now = np.frombuffer(bytes(images[d["label"]].content), np.uint8)
        before = np.frombuffer(truth("web", d["label"], 4), np.uint8)
        assert d["block_size"] == gen.BLOCK_SIZE["web"] and d["size"] == len(now)
        assert d["changed_blocks"] == truth_changed(before, now, d["block_size"]), d
        assert d["bytes_new"] == sum(raw for dg, raw in block_digests(now, 4096).items()
                                     if dg not in held), d
    assert {d["label"]: d["changed_blocks"] > 0 for d in line["disks"]} == {
        "os": True, "data": True, "logs": False}

    # Format 1 still: the record and manifests extend the skip chains.
    record = json.loads((vault / "points" / f"{new_id}.json").read_text())
    assert record["magic"] == "cbt-point" and record["format_version"] == 1
    assert record["parent"] == POINTS[4]["id"]
    chain = {d["label"]: (d["seq"], d["base"]) for d in record["disks"]}
    # os and data: seq 4 rests on seq 0 (day 1); logs: seq 2 rests on its seq 0 (day 3).
    assert chain == {"os": (4, POINTS[0]["id"]), "data": (4, POINTS[0]["id"]),
                     "logs": (2, POINTS[3]["id"])}
    for d in record["disks"]:
        meta = read_arrow(vault / d["manifest"]).schema.metadata
        assert {k.decode() for k in meta} >= DELTA_KEYS
        assert meta[b"cbt.kind"] == b"delta" and meta[b"cbt.format_version"] == b"1"

    # Nothing old was rewritten: only new files (and the lock holder lines) differ; the
    # old Arrow index segments were merged into a paged one, and moved whole to the trash.
    # The config alone is rewritten: format 3 (cbt before paged segments refuses the vault
    # now, rather than misread an index it cannot see), every other field as it was.
    after = vault_files(vault)
    moved = {k for k in old if k.startswith("index/")}
    assert moved and all(f"trash/{k}" in after and k not in after for k in moved)
    assert {k: after[k] for k in old if k not in LOCK_FILES | moved | {"config"}} == {
        k: v for k, v in old.items() if k not in LOCK_FILES | moved | {"config"}}
    config = json.loads((vault / "config").read_text())
    assert config == {**json.loads((COMMITTED / "config").read_text()), "format_version": 3}
    assert {k: after[f"trash/{k}"] for k in moved} == {k: old[k] for k in moved}

    to = tmp_path / "restored" / new_id
    cbt_json("restore", vault, new_id, "--to", to, "--workers", "1")
    for label, img in images.items():
        assert (to / f"{label}.img").read_bytes() == bytes(img.content), label
        img.save(tmp_path / f"want-{label}.img")
        assert_same_disk(to / f"{label}.img", tmp_path / f"want-{label}.img", 4096)
    for p in POINTS:
        restore_and_compare(vault, p, tmp_path)
    out = cbt_json("verify", vault, "--data")
    assert out["problems"] == [] and out["points"] == len(POINTS) + 1
    assert out["unreferenced_bytes"] == 0


# -- 7. damage stays local (issue 12) --------------------------------------------------------


def test_a_damaged_record_of_the_old_vault_hides_only_its_point(vault: Path,
                                                                 tmp_path: Path) -> None:
    """A flipped byte in one point record of the format 1 vault: list shows the others and
    names the file, and every other point still restores to the truth."""
    from helpers.cli import cbt

    leaf = POINTS[1]  # web day 2: seq 1, no point is based on it
    record = vault / "points" / f"{leaf['id']}.json"
    raw = bytearray(record.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    record.write_bytes(bytes(raw))
    r = cbt("list", vault, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [p["recovery_point"] for p in out["points"]] == sorted(
        (p["id"] for p in POINTS if p is not leaf), key=lambda i: (i.split(".")[1], i))
    assert any(str(record) in w for w in out["warnings"]) and str(record) in r.stderr
    for p in POINTS:
        if p is not leaf:
            restore_and_compare(vault, p, tmp_path)
