"""The block reader under ``cbt mount`` (:mod:`cbt.ops.mount`), without FUSE: any byte
range of a point's disk reads as the disk did (compared with the image's own bytes),
holes as zeros without the vault, a damaged block fails only the reads that touch it,
the cache keeps its bound, and a sequential reader finds the next blocks read ahead."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pytest
from helpers import KIB, MIB
from helpers.images import SparseImage
from helpers.packs import pack_files, walk_pack
from helpers.vaults import PASSWORD, fast_kdf

import cbt as cbt_api
from cbt.ops.mount import BlockCache, DiskReader, Shared, mount_tree
from cbt.ops.restore import DamagedPointError

BS = 16 * KIB
SIZE = 4 * MIB + 5 * KIB  # a short tail block


def _disk(path: Path) -> SparseImage:
    """Data, a written run of zeros, holes, and a short tail: the truth is its ``content``."""
    img = SparseImage(path, SIZE)
    img.write_random(0, 700 * KIB, 1)
    img.write(700 * KIB, bytes(100 * KIB))  # zeros written (no hole)
    img.write_random(1 * MIB + 3 * KIB, 300 * KIB, 2)  # not block-aligned
    img.write_random(2 * MIB, 64 * KIB, 3)
    img.write(2 * MIB + 64 * KIB, img.content[0:64 * KIB].tobytes())  # a duplicate block run
    img.write_random(SIZE - 3 * KIB, 3 * KIB, 4)  # the tail
    return img


@pytest.fixture(params=[False, True], ids=["plain", "encrypted"])
def point(request: Any, tmp_path: Path) -> tuple[cbt_api.Vault, Any, SparseImage]:
    img = _disk(tmp_path / "os.img")
    if request.param:
        vault = cbt_api.Vault.init(tmp_path / "vault", encryption="aes-256-gcm",
                                   passphrase=PASSWORD, kdf=fast_kdf())
    else:
        vault = cbt_api.Vault.init(tmp_path / "vault")
    p = vault.backup("web", [f"os={img.path}"], block_size=BS, workers=1,
                     created="2026-01-01T02:00:00Z")
    return vault, vault.point(p.id), img


def _reader(vault: cbt_api.Vault, point: Any, cache: int = 64 * MIB,
            ahead: int = 0) -> DiskReader:
    shared = Shared(vault, vault.load_index(headers=True), BlockCache(cache), read_ahead=ahead)
    return DiskReader(shared, point, "os")


def test_any_range_reads_as_the_disk(point: tuple[cbt_api.Vault, Any, SparseImage]) -> None:
    vault, p, img = point
    r = _reader(vault, p, ahead=256 * KIB)
    try:
        assert r.size == SIZE
        rng = np.random.default_rng(5)
        spans = [(0, SIZE), (SIZE - 1, 10), (SIZE, 4096), (SIZE + 5, 1), (BS - 1, 2)]
        spans += [(int(rng.integers(0, SIZE)), int(rng.integers(1, 200 * KIB)))
                  for _ in range(60)]
        for off, n in spans:
            want = img.content[off:min(off + n, SIZE)].tobytes()
            assert r.read(off, n) == want, (off, n)
        # sequential 4 KiB reads, as a loop device makes them
        got = b"".join(r.read(off, 4096) for off in range(0, SIZE, 4096))
        assert got == img.content.tobytes()
    finally:
        r.shared.close()


def test_holes_and_zero_blocks_read_without_the_vault(
        point: tuple[cbt_api.Vault, Any, SparseImage], tmp_path: Path) -> None:
    vault, p, img = point
    r = _reader(vault, p)
    r.manifest()  # (the manifest is the vault's too: read before the packs go)
    shutil.move(tmp_path / "vault" / "packs", tmp_path / "packs-away")
    try:
        hole = 3 * MIB  # a hole: 3 MiB .. the tail
        assert r.read(hole, 512 * KIB) == img.content[hole:hole + 512 * KIB].tobytes()
        assert not img.alloc[hole // 4096:(hole + 512 * KIB) // 4096].any()
        zeros = img.content[720 * KIB:784 * KIB]  # zeros written (allocated)
        assert r.read(720 * KIB, 64 * KIB) == zeros.tobytes() and not zeros.any()
        assert (r.shared.packs_read, r.shared.blocks_read) == (0, 0)
        with pytest.raises((DamagedPointError, OSError)):
            r.read(0, 4096)  # data: needs its pack
    finally:
        r.shared.close()
        shutil.move(tmp_path / "packs-away", tmp_path / "vault" / "packs")


def _damaged_one_block(tmp_path: Path, first: int) -> tuple[Any, Any, Any, int, Any]:
    """A plain vault of one point of ``_disk``: the payload of one blob holding a block
    from ``first`` on flipped in its pack (found with the independent pack reader).
    Returns the image, the vault, the point, the damaged block and its blob."""
    img = _disk(tmp_path / "os.img")
    vault = cbt_api.Vault.init(tmp_path / "vault")
    p = vault.point(vault.backup("web", [f"os={img.path}"], block_size=BS, workers=1).id)
    digests = {blake3.blake3(img.content[i * BS:(i + 1) * BS].tobytes()).digest(): i
               for i in range(first, 700 * KIB // BS)}
    pack = pack_files(tmp_path / "vault")[0]
    blob = next(b for b in walk_pack(pack) if b.digest in digests)
    raw = bytearray(pack.read_bytes())
    raw[blob.offset + 48 + blob.stored // 2] ^= 0xFF  # (a blob header is 48 bytes)
    pack.chmod(0o644)
    pack.write_bytes(bytes(raw))
    return img, vault, p, digests[blob.digest], blob


def test_a_damaged_block_fails_only_its_reads(tmp_path: Path) -> None:
    """Plain vault, uncompressed random blocks: one blob's payload flipped in its pack
    (found with the independent pack reader); reads touching it fail naming the block,
    the rest read right, and nothing of it is cached."""
    img, vault, p, bad, blob = _damaged_one_block(tmp_path, first=0)
    r = _reader(vault, p)
    try:
        with pytest.raises(DamagedPointError, match=f"block {bad}"):
            r.read(bad * BS + 10, 100)
        with pytest.raises(DamagedPointError):
            r.read(0, SIZE)
        other = 0 if bad else 1
        assert r.read(other * BS, BS) == img.content[other * BS:(other + 1) * BS].tobytes()
        assert r.shared.cache.get(blob.digest) is None
    finally:
        r.shared.close()


def test_the_cache_keeps_its_bound_and_read_ahead_fills_it(
        point: tuple[cbt_api.Vault, Any, SparseImage]) -> None:
    vault, p, img = point
    small = _reader(vault, p, cache=5 * BS)
    try:
        assert small.read(0, SIZE) == img.content.tobytes()
        assert 0 < small.shared.cache.used <= 5 * BS
    finally:
        small.shared.close()
    r = _reader(vault, p, ahead=128 * KIB)
    try:
        r.read(0, 4096)
        r.read(4096, 4096)  # sequential: the next 128 KiB of DATA blocks are fetched ahead
        r.shared.ahead.submit(lambda: None).result()  # (one thread: after the read-ahead)
        m = r.manifest()
        ahead = np.arange(1, 1 + 128 * KIB // BS)
        for digest in m.at(ahead)[0]:
            assert r.shared.cache.get(digest.tobytes()) is not None
        before = r.shared.packs_read
        assert r.read(BS, 100 * KIB) == img.content[BS:BS + 100 * KIB].tobytes()
        assert r.shared.packs_read == before  # all from the cache
    finally:
        r.shared.close()


def test_tree_layouts(tmp_path: Path) -> None:
    img = _disk(tmp_path / "os.img")
    vault = cbt_api.Vault.init(tmp_path / "vault")
    ids = [vault.backup("web", [f"os={img.path}", f"db={img.path}"], block_size=BS,
                        workers=1, created=f"2026-01-0{d}T02:00:00Z").id for d in (1, 2)]
    shared = Shared(vault, vault.load_index(), BlockCache(MIB))
    try:
        one = mount_tree(shared, [vault.point(ids[0])], one=True)
        assert [f.parts for f in one] == [("os.img",), ("db.img",)]
        every = mount_tree(shared, vault.points(), one=False)
        assert [f.parts for f in every] == [("web", i, f"{d}.img") for i in ids
                                            for d in ("os", "db")]
    finally:
        shared.close()


def test_many_threads_read_at_once(point: tuple[cbt_api.Vault, Any, SparseImage]) -> None:
    """Four threads over one cache (as libfuse's threads call it), with read-ahead and a
    cache smaller than the disk: every read right."""
    from concurrent.futures import ThreadPoolExecutor

    vault, p, img = point
    r = _reader(vault, p, cache=40 * BS, ahead=8 * BS)
    rng = np.random.default_rng(9)
    spans = [(int(rng.integers(0, SIZE)), int(rng.integers(1, 6 * BS))) for _ in range(200)]
    spans += [(off, 4096) for off in range(0, SIZE, 4096)]  # one sequential reader too
    try:
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda s: r.read(*s), spans))
        for (off, n), data in zip(spans, got, strict=True):
            assert data == img.content[off:min(off + n, SIZE)].tobytes(), (off, n)
        assert r.shared.cache.used <= 40 * BS
    finally:
        r.shared.close()


def test_a_block_id_of_another_length_is_refused_from_the_cache(tmp_path: Path) -> None:
    """A forged manifest (plain vault: anyone can rewrite it and the record's checksums)
    names, for a full block of disk db, the id of os's short tail block: that content
    checks against the id but is 5 KiB, not 16.  Read from the vault it is refused (the
    length is checked); read from the cache, where os's tail put it, it must be refused
    too, never served as a short or shifted block."""
    import blake3 as b3
    from helpers.vaults import forge_record

    from cbt.format.manifest import read_manifest_bytes

    img = _disk(tmp_path / "os.img")
    vault = cbt_api.Vault.init(tmp_path / "vault")
    pid = vault.backup("web", [f"os={img.path}", f"db={img.path}"], block_size=BS,
                       workers=1).id
    path = tmp_path / "vault" / "manifests" / pid / "db.arrow"
    m = read_manifest_bytes(path.read_bytes(), str(path))
    tail = b3.blake3(img.content[(SIZE // BS) * BS:].tobytes()).digest()
    assert m.rows[0] == 0
    m.row_digests[0] = np.frombuffer(tail, dtype=np.uint8)
    path.write_bytes(m.to_bytes())
    digest = b3.blake3(path.read_bytes()).hexdigest()

    def change(body: dict[str, Any]) -> None:
        next(d for d in body["disks"] if d["label"] == "db")["manifest_checksum"] = digest

    forge_record(tmp_path / "vault", pid, change)
    vault = cbt_api.Vault.open(tmp_path / "vault")
    p = vault.point(pid)
    shared = Shared(vault, vault.load_index(headers=True), BlockCache(64 * MIB), read_ahead=0)
    os_, db = DiskReader(shared, p, "os"), DiskReader(shared, p, "db")
    try:
        with pytest.raises(DamagedPointError, match=r"block 0[ :].*length"):
            db.read(0, 4096)  # from the vault
        assert os_.read(SIZE - 100, 100) == img.content[SIZE - 100:].tobytes()
        assert shared.cache.get(tail) is not None  # os's tail block, cached
        for off, n in ((0, 4096), (0, 2 * BS), (4 * KIB, 8 * KIB)):
            with pytest.raises(DamagedPointError, match=r"block 0[ :].*length"):
                db.read(off, n)  # from the cache
        assert db.read(BS, BS) == img.content[BS:2 * BS].tobytes()
    finally:
        shared.close()


def test_readers_of_one_block_at_once_fetch_it_once(
        point: tuple[cbt_api.Vault, Any, SparseImage], monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight threads read the same block at the same moment (the vault read slowed, so
    they all arrive while the first fetch runs): one fetch, eight right answers."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from cbt.ops import mount as mount_mod

    vault, p, img = point
    real = mount_mod.read_verified

    def slow(*args: Any) -> Any:
        time.sleep(0.3)
        return real(*args)
    monkeypatch.setattr(mount_mod, "read_verified", slow)
    r = _reader(vault, p)
    go = threading.Barrier(8)

    def read(k: int) -> bytes:
        go.wait()
        return r.read(BS + k * 100, 1000)
    try:
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(read, range(8)))
        for k, data in enumerate(got):
            assert data == img.content[BS + k * 100:BS + k * 100 + 1000].tobytes()
        assert (r.shared.packs_read, r.shared.blocks_read) == (1, 1)
    finally:
        r.shared.close()


def test_read_ahead_of_a_damaged_block_leaves_the_error_to_the_read(tmp_path: Path) -> None:
    """A sequential reader's read-ahead fetches a window holding a damaged block: the
    read-ahead fails quietly, the read of that block fails naming it (again on a second
    try: nothing of it cached), and the blocks before it read right."""
    img, vault, p, bad, blob = _damaged_one_block(tmp_path, first=4)
    r = _reader(vault, p, ahead=64 * BS)
    try:
        for off in range(0, bad * BS, 4096):  # sequential: the window ahead holds ``bad``
            assert r.read(off, 4096) == img.content[off:off + 4096].tobytes()
        r.shared.ahead.submit(lambda: None).result()  # (after the read-ahead)
        for _ in range(2):
            with pytest.raises(DamagedPointError, match=f"block {bad} "):
                r.read(bad * BS, 4096)
        assert r.shared.cache.get(blob.digest) is None
    finally:
        r.shared.close()


def test_resolved_manifests_are_kept_within_their_bound(tmp_path: Path) -> None:
    """Three points, the later ones deltas on the first: a mount of every point keeps at
    most ``manifest_limit`` bytes of resolved manifests (here: room for one, so only the
    last read), the vault none of its own (bases included); each disk still reads as it
    was, again after its manifest went; with room for all, all are kept."""
    img = _disk(tmp_path / "os.img")
    vault = cbt_api.Vault.init(tmp_path / "vault")
    truth = {}
    for day in (1, 2, 3):
        img.write_random(day * 64 * KIB, 16 * KIB, 10 + day)
        pid = vault.backup("web", [f"os={img.path}"], block_size=BS, workers=1,
                           created=f"2026-01-0{day}T02:00:00Z").id
        truth[pid] = img.content.tobytes()
    for limit, kept in ((1, 1), (64 * MIB, 3)):
        shared = Shared(vault, vault.load_index(headers=True), BlockCache(MIB),
                        read_ahead=0, manifest_limit=limit)
        try:
            files = mount_tree(shared, vault.points(), one=False)
            for _ in range(2):
                for f in files:
                    data = truth[f.parts[1]]
                    assert f.reader.read(0, 200 * KIB) == data[:200 * KIB]
                    assert f.reader.read(SIZE - 10, 10) == data[-10:]
            assert len(shared.manifests) == kept
            assert list(shared.manifests)[-1] == (files[-1].parts[1], "os")
            assert vault._manifest_cache == {}
        finally:
            shared.close()


def _bomb(size: int, seed: int) -> bytes:
    """A zstd frame of exactly ``size`` bytes that says nothing of its content size and
    inflates to 16 MiB and more: written by hand (RFC 8878), a raw block of random bytes
    to fill it out, then 128 RLE blocks of 128 KiB of zeros, 4 bytes each."""
    import struct

    def block(last: int, kind: int, n: int) -> bytes:
        return struct.pack("<I", last | kind << 1 | n << 3)[:3]

    rle = 128
    fill = size - 4 - 2 - 3 - 4 * rle
    assert 0 <= fill <= 128 * KIB
    frame = [struct.pack("<I", 0xFD2FB528), bytes([0x00, 7 << 3])]  # no size; 128K window
    frame += [block(0, 0, fill), np.random.default_rng(seed).bytes(fill)]
    frame += [block(int(i == rle - 1), 1, 128 * KIB) + b"\0" for i in range(rle)]
    out = b"".join(frame)
    assert len(out) == size
    return out


def test_a_blob_that_inflates_to_a_bomb_fails_its_reads(tmp_path: Path) -> None:
    """A compressed blob's payload replaced by a zstd frame of the same length that
    inflates to 16 MiB (and does not say so up front): the read fails naming the block,
    nothing larger than a block is made of it, and the other blocks read right."""
    img = SparseImage(tmp_path / "os.img", 1 * MIB)
    for k in range(16):
        img.write_random(k * 64 * KIB, 8 * KIB, 50 + k)  # half of each block: compressible
    vault = cbt_api.Vault.init(tmp_path / "vault")
    p = vault.point(vault.backup("web", [f"os={img.path}"], block_size=BS, workers=1).id)
    digests = {blake3.blake3(img.content[i * BS:(i + 1) * BS].tobytes()).digest(): i
               for i in range(1 * MIB // BS)}
    pack = pack_files(tmp_path / "vault")[0]
    blob = next(b for b in walk_pack(pack) if b.digest in digests and b.codec == 1)
    bad = digests[blob.digest]
    raw = bytearray(pack.read_bytes())
    raw[blob.offset + 48:blob.offset + 48 + blob.stored] = _bomb(blob.stored, bad)
    pack.chmod(0o644)
    pack.write_bytes(bytes(raw))
    r = _reader(vault, p)
    try:
        for _ in range(2):
            with pytest.raises(DamagedPointError, match=f"block {bad}[ :]"):
                r.read(bad * BS, 4096)
        other = (bad + 4) % (MIB // BS)
        assert r.read(other * BS, BS) == img.content[other * BS:(other + 1) * BS].tobytes()
    finally:
        r.shared.close()


def test_a_slow_resolve_holds_back_no_other_disk(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """While one disk's manifest is being resolved (held here until the test lets it go,
    as a stalled server would), a disk whose manifest is kept reads at once."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    img = _disk(tmp_path / "os.img")
    vault = cbt_api.Vault.init(tmp_path / "vault")
    p = vault.point(vault.backup("web", [f"os={img.path}", f"db={img.path}"], block_size=BS,
                                 workers=1).id)
    shared = Shared(vault, vault.load_index(headers=True), BlockCache(MIB), read_ahead=0)
    os_, db = DiskReader(shared, p, "os"), DiskReader(shared, p, "db")
    real, entered, go = vault.resolve, threading.Event(), threading.Event()

    def stalled(point: Any, label: str, *rest: Any) -> Any:
        if label == "db":
            entered.set()
            go.wait(60)
        return real(point, label, *rest)
    monkeypatch.setattr(vault, "resolve", stalled)
    try:
        assert os_.read(0, 4096) == img.content[:4096].tobytes()  # os: resolved, kept
        with ThreadPoolExecutor(2) as pool:
            slow = pool.submit(db.read, 0, 4096)
            assert entered.wait(60)
            fast = pool.submit(os_.read, BS, 4096)
            try:
                assert fast.result(timeout=30) == img.content[BS:BS + 4096].tobytes()
                assert not slow.done()
            finally:
                go.set()
            assert slow.result() == img.content[:4096].tobytes()
    finally:
        go.set()
        shared.close()
