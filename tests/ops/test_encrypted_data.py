"""The data path of an encrypted vault: backup, incremental, restore, diff.

Truth is the ``blake3`` package over the disks' own bytes (plain, and keyed with
the vault's id key), numpy copies of the disks as they were, SHA-256 of whole
files, and the pack layout read by ``helpers.packs`` (which imports no cbt).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import blake3
import numpy as np
import pytest
from helpers import KIB, MIB
from helpers.cli import cbt, cbt_json, one_error_line
from helpers.images import fs_image, keep_copy, read, write_at
from helpers.packs import pack_files, trailer_entries
from helpers.truth import nblocks, nonzero_blocks, sha256, truth_changed
from helpers.vaults import PASSWORD, encrypted_env, fast_kdf, file_tree

import cbt as cbt_api
from cbt.format.pack import CODEC_NONE, CODEC_ZSTD, blob_aad
from cbt.ops.backup import BackupRequest, backup
from cbt.ops.early_scan import start_early_scan
from cbt.ops.restore import DamagedPointError
from cbt.repo.storage import MemoryStorage
from cbt.source.disks import DiskSpec
from cbt.source.scan import start_scan

BS = 16 * KIB
SIZE = 3 * MIB


def _encrypted(path: Path) -> cbt_api.Vault:
    return cbt_api.Vault.init(path, encryption="aes-256-gcm", passphrase=PASSWORD,
                              kdf=fast_kdf())


def _ids(data: np.ndarray, bs: int, key: bytes | None) -> dict[bytes, int]:
    """Block id -> raw length of every non-zero block of ``data`` (keyed with ``key``)."""
    out: dict[bytes, int] = {}
    mv = memoryview(data.tobytes())
    mask = nonzero_blocks(data, bs)
    for i in range(nblocks(len(data), bs)):
        if mask[i]:
            block = mv[i * bs:(i + 1) * bs]
            h = blake3.blake3() if key is None else blake3.blake3(key=key)
            h.update(block)
            out[h.digest()] = len(block)
    return out


def _stored(vault: Path) -> dict[bytes, int]:
    """Digest -> raw length of every blob in the vault's packs (read without cbt)."""
    return {d: raw for p in pack_files(vault) for d, _off, _st, raw in trailer_entries(p)}


def _change(disk: Path, seed: int) -> None:
    """Rewrite 1000 bytes in each of three data blocks."""
    data = read(disk)
    rows = np.flatnonzero(nonzero_blocks(data, BS))
    rng = np.random.default_rng(seed)
    for b in rng.choice(rows, 3, replace=False).tolist():
        write_at(disk, b * BS + 77, rng.integers(1, 256, 1000, np.uint8).tobytes())


@pytest.fixture
def history(tmp_path: Path) -> tuple[cbt_api.Vault, list[str], list[Path]]:
    """An encrypted vault with two points of disk ``os`` (full, then three blocks changed),
    each backed up by two forked workers, and copies of the disk as it was each time."""
    disk = fs_image(tmp_path / "os.img", SIZE, 11)
    v = _encrypted(tmp_path / "v")
    ids, copies = [], []
    for day in range(2):
        if day:
            _change(disk, 12)
        ids.append(v.backup("vm", [disk], block_size=BS, workers=2).id)
        copies.append(keep_copy(disk, tmp_path / f"os.{day}.img"))
    return v, ids, copies


def test_block_ids_are_keyed_blake3_never_plain(history: tuple[cbt_api.Vault, list[str],
                                                               list[Path]]) -> None:
    v, _ids_, copies = history
    key = v.id_key
    assert key is not None and len(key) == 32
    stored = _stored(Path(v.root))
    keyed = {**_ids(read(copies[0]), BS, key), **_ids(read(copies[1]), BS, key)}
    plain = {**_ids(read(copies[0]), BS, None), **_ids(read(copies[1]), BS, None)}
    assert stored == keyed  # every block once, under its keyed id, and nothing else
    assert not set(stored) & set(plain)
    # the index the vault loads and the manifests it resolves say the same
    index = v.load_index()
    assert {index.entry(i).digest for i in range(len(index))} == set(keyed)
    m = v.resolve(v.point(_ids_[1]), "os")
    data_rows = m.digests[m.flags == 0]
    assert {r.tobytes() for r in data_rows} == set(_ids(read(copies[1]), BS, key))


def test_plain_vault_still_stores_plain_blake3(tmp_path: Path) -> None:
    disk = fs_image(tmp_path / "os.img", SIZE, 11)
    v = cbt_api.Vault.init(tmp_path / "v")
    v.backup("vm", [disk], block_size=BS, workers=2)
    assert v.id_key is None
    assert _stored(tmp_path / "v") == _ids(read(disk), BS, None)
    assert sorted(os.listdir(tmp_path / "v" / "index"))[0].startswith("vm.")  # (its run named)
    assert os.listdir(tmp_path / "v" / "points")[0].startswith("vm.")


def test_incremental_stores_only_changed_blocks_and_restores_bit_for_bit(
        history: tuple[cbt_api.Vault, list[str], list[Path]], tmp_path: Path) -> None:
    v, ids, copies = history
    key = v.id_key
    first, second = _ids(read(copies[0]), BS, key), _ids(read(copies[1]), BS, key)
    new = {d: n for d, n in second.items() if d not in first}
    assert len(new) == 3
    p2 = v.point(ids[1])
    assert p2.bytes_new == sum(new.values())
    assert p2.disks[0].changed_blocks == truth_changed(read(copies[0]), read(copies[1]), BS)
    for day, pid in enumerate(ids):
        out = tmp_path / f"out{day}"
        res = cbt_api.Vault.open(v.root, passphrase=PASSWORD).restore(pid, out, workers=2)
        assert res.disks[0].blocks_verified == int(nonzero_blocks(read(copies[day]), BS).sum())
        assert sha256(out / "os.img") == sha256(copies[day])
        assert (out / "os.img").stat().st_size == SIZE


def test_identical_disks_are_stored_once(tmp_path: Path) -> None:
    a = fs_image(tmp_path / "a.img", SIZE, 21)
    b = shutil.copyfile(a, tmp_path / "b.img")
    v = _encrypted(tmp_path / "v")
    p = v.backup("vm", [a, b], block_size=BS, workers=2)
    ids = _ids(read(a), BS, v.id_key)
    assert _stored(tmp_path / "v") == ids
    assert p.bytes_new == sum(ids.values())
    v.backup("vm2", [b], block_size=BS, workers=1)  # another VM, same content: nothing new
    assert _stored(tmp_path / "v") == ids


def test_in_place_restore_rewrites_only_changed_blocks(
        history: tuple[cbt_api.Vault, list[str], list[Path]], tmp_path: Path) -> None:
    v, ids, copies = history
    target = tmp_path / "restored.img"
    v.restore(ids[0], target, disk="os")
    res = v.restore(ids[1], target, disk="os", in_place=True)
    assert res.disks[0].bytes_written == 3 * BS  # the target was hashed with the keyed ids
    assert sha256(target) == sha256(copies[1])


def test_memory_storage_encrypted_vault(tmp_path: Path) -> None:
    disk = fs_image(tmp_path / "os.img", SIZE, 31)
    v = cbt_api.Vault.create(MemoryStorage(), encryption="aes-256-gcm", passphrase=PASSWORD,
                             kdf=fast_kdf())
    p1 = v.backup("vm", [disk], block_size=BS, workers=2)  # threads share the storage
    copy0 = keep_copy(disk, tmp_path / "os.0.img")
    _change(disk, 32)
    p2 = v.backup("vm", [disk], block_size=BS, workers=2)
    assert p2.bytes_new == 3 * BS
    assert p1.bytes_new == sum(_ids(read(copy0), BS, v.id_key).values())
    index = v.load_index()
    assert {index.entry(i).digest for i in range(len(index))} == (
        set(_ids(read(copy0), BS, v.id_key)) | set(_ids(read(disk), BS, v.id_key)))
    v.restore(p2.id, tmp_path / "out")
    assert sha256(tmp_path / "out" / "os.img") == sha256(disk)


def test_early_scan_hashes_with_the_vault_key(tmp_path: Path) -> None:
    disk = fs_image(tmp_path / "os.img", SIZE, 41)
    v = _encrypted(tmp_path / "v")
    v.backup("vm", [disk], block_size=BS, workers=1)
    _change(disk, 42)
    specs = [DiskSpec("os", str(disk))]
    early = start_early_scan(v, "vm", specs, workers=2)
    assert early is not None and early.key == v.id_key
    # by path with a passphrase too (what a caller with only the path does)
    by_path = start_early_scan(v.root, "vm", specs, workers=1, passphrase=PASSWORD)
    assert by_path is not None and by_path.key == v.id_key
    by_path.cancel()
    p = backup(v, BackupRequest("vm", specs, workers=2, early=early))
    assert p.bytes_new == 3 * BS
    m = v.resolve(p, "os")
    assert {r.tobytes() for r in m.digests[m.flags == 0]} == set(_ids(read(disk), BS, v.id_key))


def test_a_plain_early_scan_is_not_taken_by_an_encrypted_backup(tmp_path: Path) -> None:
    disk = fs_image(tmp_path / "os.img", SIZE, 51)
    v = _encrypted(tmp_path / "v")
    v.backup("vm", [disk], block_size=BS, workers=1)
    _change(disk, 52)
    plain = start_scan([(str(disk), BS)], 1)  # plain BLAKE3: not this vault's ids
    p = backup(v, BackupRequest("vm", [DiskSpec("os", str(disk))], workers=1, early=plain))
    keyed = _ids(read(disk), BS, v.id_key)
    m = v.resolve(p, "os")
    assert {r.tobytes() for r in m.digests[m.flags == 0]} == set(keyed)
    assert p.bytes_new == 3 * BS
    assert set(keyed) <= set(_stored(tmp_path / "v"))
    assert not set(_stored(tmp_path / "v")) & set(_ids(read(disk), BS, None))


def test_cli_backup_incremental_and_restore_with_password_file(tmp_path: Path) -> None:
    env = encrypted_env(tmp_path)
    disk = fs_image(tmp_path / "os.img", SIZE, 61)
    _encrypted(tmp_path / "v")
    cbt_json("backup", tmp_path / "v", disk, "--vm", "vm", "--block-size", "16K", env=env)
    _change(disk, 62)
    line = cbt_json("backup", tmp_path / "v", disk, "--vm", "vm", env=env)  # early scan on
    assert line["disks"][0]["bytes_new"] == 3 * BS
    out = cbt_json("restore", tmp_path / "v", line["recovery_point"], "--to", tmp_path / "out",
                   env=env)
    assert out["disks"][0]["size"] == SIZE
    assert sha256(tmp_path / "out" / "os.img") == sha256(disk)
    v = cbt_api.Vault.open(tmp_path / "v", passphrase=PASSWORD)
    assert set(_ids(read(disk), BS, v.id_key)) <= set(_stored(tmp_path / "v"))
    assert not set(_stored(tmp_path / "v")) & set(_ids(read(disk), BS, None))


def test_flipped_byte_in_a_sealed_blob_fails_restore_naming_the_pack(
        history: tuple[cbt_api.Vault, list[str], list[Path]], tmp_path: Path) -> None:
    v, ids, copies = history
    used = _ids(read(copies[0]), BS, v.id_key)
    pack, offset, stored = next((p, off, st) for p in pack_files(Path(v.root))
                                for d, off, st, _raw in trailer_entries(p) if d in used)
    with open(pack, "r+b") as f:  # a byte of the sealed payload (past nonce, before tag)
        f.seek(offset + 48 + 12 + stored // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    out = tmp_path / "out"
    with pytest.raises(DamagedPointError, match=f"pack {pack.stem}.*fails authentication"):
        v.restore(ids[0], out, workers=2)
    assert file_tree(out) == {}  # nothing half-written, no temporary file
    env = encrypted_env(tmp_path)
    line = one_error_line(cbt("restore", v.root, ids[0], "--to", tmp_path / "cli", env=env))
    assert pack.stem in line and "authentication" in line
    assert file_tree(tmp_path / "cli") == {}


# -- diff ---------------------------------------------------------------------------------


def test_diff_of_two_points_and_point_against_image(
        history: tuple[cbt_api.Vault, list[str], list[Path]], tmp_path: Path) -> None:
    v, ids, copies = history
    changed = truth_changed(read(copies[0]), read(copies[1]), BS)
    assert changed == 3
    root = v.root
    whole = cbt_api.diff(f"{root}::{ids[0]}", f"{root}::{ids[1]}", passphrase=PASSWORD)
    assert whole.to_dict()["changed_blocks"] == changed
    disk = cbt_api.diff(f"{root}::{ids[0]}/os", f"{root}::{ids[1]}/os", passphrase=PASSWORD)
    assert disk.changed_blocks == changed
    # an image is hashed with the vault's keyed ids: equal to its own point, 3 off the other
    assert cbt_api.diff(f"{root}::{ids[1]}/os", copies[1], passphrase=PASSWORD).identical
    assert cbt_api.diff(copies[1], f"{root}::{ids[0]}/os",
                        passphrase=PASSWORD).changed_blocks == changed
    env = encrypted_env(tmp_path)
    r = cbt("diff", f"{root}::{ids[0]}/os", copies[1], "--json", env=env)
    assert r.returncode == 1, r.stderr  # (1: they differ, as diff(1))
    out = json.loads(r.stdout)
    assert out["changed_blocks"] == changed and out["block_size"] == BS


def test_diff_point_against_scan_manifest_is_an_error_saying_why(
        history: tuple[cbt_api.Vault, list[str], list[Path]], tmp_path: Path) -> None:
    v, ids, copies = history
    manifest = tmp_path / "os.arrow"
    cbt_json("scan", copies[1], "-o", manifest, "--block-size", "16K")
    with pytest.raises(ValueError, match="plain BLAKE3 digests; the encrypted vault's ids "
                                         "are keyed: diff the point against the image"):
        cbt_api.diff(f"{v.root}::{ids[1]}/os", manifest, passphrase=PASSWORD)
    line = one_error_line(cbt("diff", manifest, f"{v.root}::{ids[1]}/os",
                              env=encrypted_env(tmp_path)))
    assert str(manifest) in line and "plain BLAKE3" in line
    # the same scan against a plain vault's point still works (identical disks)
    plain = cbt_api.Vault.init(tmp_path / "plain")
    p = plain.backup("vm", [f"os={copies[1]}"], block_size=BS, workers=1)
    assert cbt_api.diff(f"{tmp_path / 'plain'}::{p.id}/os", manifest).identical
    # points of a plain and an encrypted vault: digests of two kinds, an error
    with pytest.raises(ValueError, match="one vault is encrypted"):
        cbt_api.diff(f"{tmp_path / 'plain'}::{p.id}/os", f"{v.root}::{ids[1]}/os",
                     passphrase=PASSWORD)


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_executor_workers_reopen_the_encrypted_vault_from_its_spec(tmp_path: Path,
                                                                   context: str) -> None:
    """Pool processes get the vault's spec (its keys included, no passphrase): a spawned
    one shares nothing with this process, yet stores keyed ids and sealed blobs, and
    deduplicates against the sealed index it loads itself."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    disk = fs_image(tmp_path / "os.img", SIZE, 71)
    v = _encrypted(tmp_path / "v")
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context(context)) as pool:
        first = v.backup("vm", [disk], block_size=BS, workers=2, executor=pool)
        copy0 = keep_copy(disk, tmp_path / "os.0.img")
        _change(disk, 72)
        second = v.backup("vm", [disk], block_size=BS, workers=2, executor=pool)
    assert first.bytes_new == sum(_ids(read(copy0), BS, v.id_key).values())
    assert second.bytes_new == 3 * BS
    assert _stored(tmp_path / "v") == {**_ids(read(copy0), BS, v.id_key),
                                       **_ids(read(disk), BS, v.id_key)}
    v.restore(second.id, tmp_path / "out")
    assert sha256(tmp_path / "out" / "os.img") == sha256(disk)


def test_a_blob_sealed_by_a_key_holder_over_other_content_fails_restore(tmp_path: Path) -> None:
    """Authentication is not enough: a blob that a key holder sealed with the right
    associated data (its id) over other content still fails restore, because every
    opened block is hashed against its id before it is written."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(np.random.default_rng(5).bytes(SIZE))  # incompressible: stored raw
    v = _encrypted(tmp_path / "v")
    point = v.backup("vm", [disk], block_size=BS, workers=1).id
    pack = pack_files(Path(v.root))[0]
    digest, offset, stored, raw = trailer_entries(pack)[3]
    assert v.keys is not None
    with open(pack, "r+b") as f:
        f.seek(offset)
        header = f.read(48)
        assert header[36] == CODEC_NONE and stored == raw + 28
        forged = v.keys.cipher.seal(b"\x5a" * raw, blob_aad(digest, CODEC_NONE, raw))
        f.seek(offset + 48)
        f.write(forged)
    with pytest.raises(DamagedPointError, match=f"pack {pack.stem}.*does not match its digest"):
        v.restore(point, tmp_path / "out", workers=1)
    assert file_tree(tmp_path / "out") == {}


@pytest.mark.parametrize("forgery", ["flipped byte", "not zstd", "other content"])
def test_a_compressed_sealed_blob_forged_or_altered_fails_restore(tmp_path: Path,
                                                                 forgery: str) -> None:
    """Compressed blobs are opened in batches too: a flipped byte fails authentication; a
    key holder's seal (right associated data) over bytes that are not zstd, or over
    another block compressed, fails decompression or the digest check; nothing is written."""
    import pyarrow as pa

    disk = tmp_path / "disk.img"
    text = b"".join(b"line %d of a compressible disk\n" % i for i in range(SIZE // 16))
    disk.write_bytes(text[:SIZE])
    v = _encrypted(tmp_path / "v")
    point = v.backup("vm", [disk], block_size=BS, workers=1).id
    pack = pack_files(Path(v.root))[0]
    digest, offset, stored, raw = trailer_entries(pack)[2]
    assert v.keys is not None
    with open(pack, "r+b") as f:
        f.seek(offset)
        assert f.read(48)[36] == CODEC_ZSTD and stored < raw  # (compressed)
        aad = blob_aad(digest, CODEC_ZSTD, raw)
        if forgery == "flipped byte":
            f.seek(offset + 48 + 12 + stored // 3)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x20]))
            problem = "fails authentication"
        else:
            size = stored - 28
            if forgery == "not zstd":
                payload = b"\x01" * size
            else:  # another block, compressed, then a skippable frame to fill the length
                frame = pa.Codec("zstd").compress(b"\x5a" * raw, asbytes=True)
                pad = size - len(frame) - 8
                assert pad >= 0
                payload = frame + (0x184D2A50).to_bytes(4, "little") + pad.to_bytes(
                    4, "little") + b"\0" * pad
            f.seek(offset + 48)
            f.write(v.keys.cipher.seal(payload, aad))
            # (the restore's decompressor refuses a frame followed by anything, a
            # skippable frame included: cbt never writes one)
            problem = ("cannot decompress" if forgery == "not zstd" else
                       "does not match its digest|cannot decompress")
    with pytest.raises(DamagedPointError, match=f"pack {pack.stem}.*({problem})"):
        v.restore(point, tmp_path / "out", workers=1)
    assert file_tree(tmp_path / "out") == {}
