"""An independent reader of the pack layout (``cbt.format.pack``), for the tests.

It imports nothing of cbt: struct, ``blake3`` and pyarrow's zstd codec read what
the layout documents, so a pack cbt wrote wrongly cannot pass for a right one.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import blake3

# Layout documented in cbt.format.pack (little-endian):
#   header 16 B: b"CBTPACK\0", u32 version, u32 reserved
#   blob: b"CBTB", digest[32], u8 codec, u8 encryption, u16 reserved, u32 raw, u32 stored,
#         then the stored bytes
#   trailer: one 48 B entry per blob: digest[32], u64 offset, u32 stored, u32 raw
#   footer 48 B: u64 count, blake3(trailer)[32], b"CBTPEND1"
_BLOB = struct.Struct("<4s32sBBHII")
_ENTRY = struct.Struct("<32sQII")
_FOOTER = struct.Struct("<Q32s8s")


@dataclass(frozen=True)
class Blob:
    digest: bytes
    offset: int  # of the blob header
    codec: int
    encryption: int
    raw: int
    stored: int


def pack_files(vault: Path) -> list[Path]:
    return sorted((vault / "packs").rglob("*.pack"))


def trailer_entries(pack: Path) -> list[tuple[bytes, int, int, int]]:
    """(digest, offset, stored, raw) from a complete pack's trailer (checked)."""
    data = pack.read_bytes()
    count, checksum, end = _FOOTER.unpack_from(data, len(data) - _FOOTER.size)
    assert end == b"CBTPEND1", pack
    start = len(data) - _FOOTER.size - count * _ENTRY.size
    trailer = data[start:len(data) - _FOOTER.size]
    assert blake3.blake3(trailer).digest() == checksum, pack
    return [_ENTRY.unpack_from(trailer, i * _ENTRY.size) for i in range(count)]


def walk_pack(pack: Path) -> list[Blob]:
    """Every blob of a pack, walked from its header, each checked against its digest."""
    import pyarrow as pa

    data = pack.read_bytes()
    assert data[:8] == b"CBTPACK\0", pack
    entries = trailer_entries(pack)
    blobs = []
    for digest, offset, stored, raw in entries:
        magic, d, codec, enc, _res, raw_h, stored_h = _BLOB.unpack_from(data, offset)
        assert magic == b"CBTB" and d == digest and raw_h == raw and stored_h == stored
        payload = data[offset + _BLOB.size:offset + _BLOB.size + stored]
        assert enc == 0, "format 1 is unencrypted"
        if codec == 0:
            content = payload
        else:  # (1 zstd, 2 an lz4 block: pyarrow's lz4_raw, not the lz4 package cbt uses)
            assert codec in (1, 2), f"unknown codec {codec}"
            content = pa.Codec("zstd" if codec == 1 else "lz4_raw").decompress(
                payload, decompressed_size=raw, asbytes=True)
        assert len(content) == raw and blake3.blake3(content).digest() == digest
        blobs.append(Blob(digest, offset, codec, enc, raw, stored))
    return blobs


def pack_set(vault: Path) -> set[str]:
    """File names of the vault's packs."""
    return {p.name for p in pack_files(vault)}
