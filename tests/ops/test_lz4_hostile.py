"""A crafted lz4 vault (``cbt init --compression lz4``): one blob of a plain vault
rewritten by someone who can write the vault, or one byte of an encrypted vault's,
read by every reader: restore (1 and 2 workers), ``cbt mount``'s reader, ``verify
--data``, ``copy`` and ``verify --repair``.  Each refuses with one line naming the block
(and the pack), exit 2; restore leaves no file behind; nothing crashes.

The header's lengths (and so the index's) are kept where the case is about the payload,
so the blob passes every header check and reaches the decoder.

Truth: the disk's own bytes; the crafted payloads are built here by hand from the lz4
block format (not the ``lz4`` package cbt uses) and what each decodes to is checked
with pyarrow's ``lz4_raw``; the packs are walked with the tests' own reader.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path
from typing import Any

import blake3
import pyarrow as pa
import pytest
from helpers import KIB
from helpers.cli import cbt, one_error_line
from helpers.packs import pack_files, walk_pack
from helpers.vaults import PASSWORD, encrypted_env, fast_kdf

import cbt as cbt_api
from cbt.ops.mount import BlockCache, DiskReader, Shared
from cbt.ops.restore import DamagedPointError

BS = 16 * KIB
TAIL = 5000  # the disk's last block is short
BLOB = struct.Struct("<4s32sBBHII")  # the blob header (cbt.format.pack's layout)
LZ4_RAW = pa.Codec("lz4_raw")


def _disk_bytes() -> bytes:
    text = b"".join((f"block {i}: some text that compresses well " * 600).encode()[:BS]
                    for i in range(12))
    return text + (b"the short tail " * 400)[:TAIL]


# -- lz4 blocks by hand (the block format: token, literals, offset, match length) -------


def _length(n: int) -> bytes:
    return b"\xff" * (n // 255) + bytes([n % 255])


def _sequence_block(literals: bytes, match: int, last: bytes) -> bytes:
    """One sequence (``literals``, then ``match`` bytes copied from offset 1), then the
    final literals ``last`` (at least 5 bytes, as the format wants)."""
    lit, extra = len(literals), match - 4
    out = bytes([(min(lit, 15) << 4) | min(extra, 15)])
    out += (_length(lit - 15) if lit >= 15 else b"") + literals + struct.pack("<H", 1)
    out += _length(extra - 15) if extra >= 15 else b""
    out += bytes([min(len(last), 15) << 4]) + (_length(len(last) - 15) if len(last) >= 15
                                               else b"") + last
    return out


def crafted(n_out: int, size: int) -> bytes:
    """A valid lz4 block of exactly ``size`` bytes that decodes to ``n_out`` bytes (not
    any block of the disk), checked with pyarrow's lz4_raw."""
    for lit in range(1, size):
        block = _sequence_block(os.urandom(lit), n_out - lit - 5, os.urandom(5))
        if len(block) == size:
            got = LZ4_RAW.decompress(block, decompressed_size=n_out, asbytes=True)
            assert len(got) == n_out
            return block
    raise AssertionError(f"no block of {size} bytes decodes to {n_out}")


# -- the vault, and one blob of it changed ------------------------------------------


@pytest.fixture(scope="module")
def lz4_vaults(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A plain and an encrypted lz4 vault of one point of the disk, made once."""
    top = tmp_path_factory.mktemp("lz4-hostile")
    disk = top / "d.img"
    disk.write_bytes(_disk_bytes())
    out: dict[str, Any] = {"disk": disk}
    for kind in ("plain", "encrypted"):
        v = (cbt_api.Vault.init(top / kind, compression="lz4") if kind == "plain" else
             cbt_api.Vault.init(top / kind, encryption="aes-256-gcm", passphrase=PASSWORD,
                                kdf=fast_kdf(), compression="lz4"))
        out[kind] = (top / kind, v.backup("vm", [f"d={disk}"], block_size=BS, workers=1).id)
    return out


def _blob_of(vault: Path, block: int, data: bytes) -> tuple[Path, int, int, int]:
    """(pack, offset, stored, raw) of the blob holding ``block`` of a plain vault."""
    want = blake3.blake3(data[block * BS:(block + 1) * BS]).digest()
    for pack in pack_files(vault):
        for b in walk_pack(pack):
            if b.digest == want:
                assert b.codec == 2, "the disk's blocks are stored as lz4"
                return pack, b.offset, b.stored, b.raw
    raise AssertionError(f"block {block} not found")


def _rewrite(pack: Path, offset: int, blob: bytes) -> None:
    pack.chmod(0o644)
    data = bytearray(pack.read_bytes())
    data[offset:offset + len(blob)] = blob
    pack.write_bytes(bytes(data))


def _readers_refuse(tmp_path: Path, vault: Path, point: str, block: int, pack_id: str,
                    env: dict[str, str] | None = None) -> None:
    """Every reader of the point refuses, naming ``block`` and its pack; restore writes
    no file."""
    for workers in ("1", "2"):
        out = tmp_path / f"out-{workers}"
        line = one_error_line(cbt("restore", vault, point, "--to", out, "--workers",
                                  workers, env=env))
        assert f"block {block} pack {pack_id}: " in line, line
        assert not out.exists() or not any(out.iterdir()), list(out.iterdir())
    r = cbt("verify", "--data", vault, env=env)
    assert r.returncode == 2, r.stderr
    problems = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(problems) == 1 and f"block {block}, pack {pack_id}: " in problems[0], problems
    opened = (cbt_api.Vault.open(vault) if env is None
              else cbt_api.Vault.open(vault, passphrase=PASSWORD))
    shared = Shared(opened, opened.load_index(headers=True), BlockCache(8 << 20),
                    read_ahead=0)
    try:
        reader = DiskReader(shared, opened.point(point), "d")
        with pytest.raises(DamagedPointError, match=f"block {block} pack {pack_id}: "):
            reader.read(0, reader.size)
    finally:
        shared.close()
    dst = cbt_api.Vault.init(tmp_path / "dst", compression="lz4")
    line = one_error_line(cbt("copy", vault, dst.root, env=env))
    assert f"point {point}: block " in line and pack_id in line, line
    assert not list((tmp_path / "dst" / "points").iterdir())
    r = cbt("verify", "--repair", vault, env=env)  # the blob dropped, the block missing
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"block {block}: block missing from the vault index" in r.stderr, r.stderr


CASES = {
    "garbage": lambda stored, raw: (None, os.urandom(stored)),
    "zeros": lambda stored, raw: (None, bytes(stored)),
    "decodes to more": lambda stored, raw: (None, crafted(raw + 700, stored)),
    "decodes to less": lambda stored, raw: (None, crafted(raw - 100, stored)),
    "other content of its length": lambda stored, raw: (None, crafted(raw, stored)),
    "raw 0": lambda stored, raw: ({"raw": 0}, None),
    "raw 4 GiB": lambda stored, raw: ({"raw": 0xFFFFFFFF}, None),
    "unknown codec": lambda stored, raw: ({"codec": 3}, None),
    "stored cut short": lambda stored, raw: ({"stored": stored - 3}, None),
}


@pytest.mark.parametrize(("case", "block"), [
    *((case, 3) for case in CASES),
    *((case, 12) for case in ("decodes to more", "decodes to less", "other content of its length",
                              "raw 0")),  # (12: the short last block)
])
def test_a_crafted_lz4_blob_is_refused_by_every_reader(
        lz4_vaults: dict[str, Any], tmp_path: Path, case: str, block: int) -> None:
    vault = tmp_path / "v"
    shutil.copytree(lz4_vaults["plain"][0], vault)
    point = lz4_vaults["plain"][1]
    data = lz4_vaults["disk"].read_bytes()
    pack, offset, stored, raw = _blob_of(vault, block, data)
    assert raw == (TAIL if block == 12 else BS)
    fields, payload = CASES[case](stored, raw)
    header = list(BLOB.unpack_from(pack.read_bytes(), offset))
    for name, value in (fields or {}).items():
        header[{"codec": 2, "raw": 5, "stored": 6}[name]] = value
    _rewrite(pack, offset, BLOB.pack(*header) + (payload or b""))
    _readers_refuse(tmp_path, vault, point, block, pack.stem)


def test_a_damaged_blob_of_an_encrypted_lz4_vault_is_refused_by_every_reader(
        lz4_vaults: dict[str, Any], tmp_path: Path) -> None:
    """One byte of a sealed lz4 blob flipped: it fails authentication everywhere."""
    vault = tmp_path / "v"
    shutil.copytree(lz4_vaults["encrypted"][0], vault)
    point = lz4_vaults["encrypted"][1]
    (pack,) = pack_files(vault)
    raw = pack.read_bytes()
    offset = 16  # the first blob (after the pack header)
    stored = BLOB.unpack_from(raw, offset)[6]
    assert BLOB.unpack_from(raw, offset)[2] == 2
    _rewrite(pack, offset + BLOB.size + stored // 2,
             bytes([raw[offset + BLOB.size + stored // 2] ^ 0x40]))
    _readers_refuse(tmp_path, vault, point, 0, pack.stem, env=encrypted_env(tmp_path))


@pytest.mark.parametrize("forgery", ["not lz4", "decodes to more", "decodes to less",
                                     "other content of its length"])
def test_an_lz4_blob_a_key_holder_sealed_over_other_bytes_is_refused_by_every_reader(
        lz4_vaults: dict[str, Any], tmp_path: Path, forgery: str) -> None:
    """Authentication is not enough: sealed with the right associated data (the blob's
    id, codec lz4 and length) over bytes that are not the block's lz4 block, it is
    still refused everywhere: by the decoder, the length or the keyed digest."""
    from helpers.packs import trailer_entries

    from cbt.format.pack import CODEC_LZ4, blob_aad

    vault = tmp_path / "v"
    shutil.copytree(lz4_vaults["encrypted"][0], vault)
    point = lz4_vaults["encrypted"][1]
    (pack,) = pack_files(vault)
    digest, offset, stored, raw = trailer_entries(pack)[4]
    data = pack.read_bytes()
    assert BLOB.unpack_from(data, offset)[2] == CODEC_LZ4 and raw == BS
    keys = cbt_api.Vault.open(vault, passphrase=PASSWORD).keys
    assert keys is not None
    aad = blob_aad(digest, CODEC_LZ4, raw)
    size = len(keys.cipher.open(data[offset + BLOB.size:offset + BLOB.size + stored], aad))
    payload = {"not lz4": lambda: os.urandom(size),
               "decodes to more": lambda: crafted(raw + 700, size),
               "decodes to less": lambda: crafted(raw - 100, size),
               "other content of its length": lambda: crafted(raw, size)}[forgery]()
    sealed = keys.cipher.seal(payload, aad)
    assert len(sealed) == stored
    _rewrite(pack, offset + BLOB.size, sealed)
    _readers_refuse(tmp_path, vault, point, 4, pack.stem, env=encrypted_env(tmp_path))
