"""Pack files: many compressed blocks in one self-describing file of a few MiB.

Layout (all integers little-endian)::

    header   16 B   b"CBTPACK\\0", u32 format version, u32 reserved
    blob*           48 B blob header + payload
        b"CBTB", digest[32], u8 codec, u8 encryption, u16 reserved,
        u32 raw length, u32 stored length, then the stored bytes
    trailer         one 48 B entry per blob: digest[32], u64 offset, u32 stored, u32 raw
    footer   48 B   u64 entry count, BLAKE3 of the trailer entries [32], b"CBTPEND1"

Every blob names its codec (0 none, 1 zstd, 2 lz4) and encryption (0 none, 1 sealed
with the vault's AEAD: the stored bytes are ``nonce || ciphertext || tag`` of the
coded payload, the associated data the blob's id, codec and raw length), so
both can change without a format break.  In an encrypted vault (format 2) the
digest is the block's keyed BLAKE3 id; the pack header and trailer are the same.
A pack can be indexed from its trailer alone, or rebuilt blob by blob from the
headers if the trailer is lost.

A block is compressed with the vault's codec (its config's ``compression``):
zstd (level 1, :data:`ZSTD_LEVEL`, the default) or lz4 (an lz4 *block*, no frame:
the blob header has both lengths already; about 1.8x faster to compress and 2.3x
to decompress than zstd level 1 on file-system and database content, for 45% more
stored, by bench/codec_speed.py: a vault of format 4).  When that does not make it
smaller it is stored raw (codec none), so incompressible data costs no
decompression.  After a block that did not compress, the next few are stored raw
without trying (1, 2, 4, then 8 blocks, reset by the next block that compresses:
:class:`Coder`): a disk of random data costs one compression attempt in 9 blocks,
and a compressible region after an incompressible one loses at most 8 blocks.  A
run of blocks whose first one compresses is coded by one zstd call for the rest
(:func:`encode_blocks`), each tried.  Each thread compresses with a zstd context
of its own, made once and reused block after block (:func:`compressor`), so
blocks can be coded on several threads at once (:func:`encode_blocks`, which
releases the GIL while it compresses and seals) and appended in order
(:meth:`PackWriter.add_coded`).
"""

from __future__ import annotations

import os
import re
import struct
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import overload

import blake3
import lz4.block
import numpy as np
import numpy.typing as npt
import zstandard

from cbt.core.crypto import AuthenticationError, Cipher
from cbt.core.errors import CbtError
from cbt.format.codecs import CODEC_LZ4 as CODEC_LZ4  # (the codes: there; here too)
from cbt.format.codecs import CODEC_NONE as CODEC_NONE
from cbt.format.codecs import CODEC_ZSTD as CODEC_ZSTD
from cbt.format.records import MAX_BLOCK

# Do not modify: these magics, versions, layouts and codes identify and decode
# every pack ever written (vault format 1).
PACK_MAGIC = b"CBTPACK\0"
PACK_VERSION = 1
BLOB_MAGIC = b"CBTB"
END_MAGIC = b"CBTPEND1"
HEADER = struct.Struct("<8sII")
BLOB = struct.Struct("<4s32sBBHII")
ENTRY = struct.Struct("<32sQII")
FOOTER = struct.Struct("<Q32s8s")
ENCRYPTION_NONE = 0
ENCRYPTION_AEAD = 1  # format 2: sealed with the vault's AEAD (its config names it)
# The same layouts as numpy records, to read many at once (same bytes as BLOB, ENTRY).
BLOB_DTYPE = np.dtype([("magic", np.uint8, (4,)), ("digest", np.uint8, (32,)),
                       ("codec", "u1"), ("encryption", "u1"), ("reserved", "<u2"),
                       ("raw", "<u4"), ("stored", "<u4")])
ENTRY_DTYPE = np.dtype([("digest", "V32"), ("offset", "<u8"), ("stored", "<u4"),
                        ("raw", "<u4")])
assert BLOB_DTYPE.itemsize == BLOB.size and ENTRY_DTYPE.itemsize == ENTRY.size

# zstd level 1, chosen by measurement on an ext4 image of /usr/share and a SQLite
# database (16 KiB blocks, CPU time, zstandard contexts reused): level 1 compressed
# 1.35x faster than level 3 (db 259 vs 193 MB/s, fs 455 vs 362) and stored 1.3% more
# (db 249.3 vs 246.1 MB, fs 118.0 vs 116.4); level -1 stored 13-15% more.
ZSTD_LEVEL = 1
TARGET_PACK_SIZE = 8 << 20
MAX_BACKOFF = 8

_BLOB_MAGIC_U8 = np.frombuffer(BLOB_MAGIC, dtype=np.uint8)


class CorruptPackError(CbtError, ValueError):
    """A pack or a blob in it fails its checks."""


_local = threading.local()


def compressor() -> zstandard.ZstdCompressor:
    """This thread's zstd compressor at :data:`ZSTD_LEVEL`: one context, made once and
    reused (pyarrow's codec made a context per block: 5% of an incremental backup)."""
    c: zstandard.ZstdCompressor | None = getattr(_local, "zstd", None)
    if c is None:
        c = _local.zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return c


@dataclass
class Coder:
    """Compresses blocks one after another with ``codec`` (:data:`CODEC_ZSTD` or
    :data:`CODEC_LZ4`), storing raw what does not shrink, and backing off after it: the
    next 1, 2, 4, then 8 blocks are stored raw untried."""

    codec: int = CODEC_ZSTD
    skip: int = 0  # blocks left to store raw without trying to compress
    backoff: int = 0

    def code(self, data: memoryview | bytes) -> tuple[int, bytes | memoryview]:
        """(codec, payload) of one block: compressed when that made it smaller, else as
        it is."""
        if self.skip:
            self.skip -= 1
            return CODEC_NONE, data
        packed = (compressor().compress(data) if self.codec == CODEC_ZSTD
                  else lz4.block.compress(data, store_size=False))
        if len(packed) < len(data):
            self.backoff = 0
            return self.codec, packed
        self.backoff = min(2 * self.backoff or 1, MAX_BACKOFF)
        self.skip = self.backoff
        return CODEC_NONE, data


# (digest, codec, encryption, payload, raw length): a blob ready to append
Coded = tuple[bytes, int, int, "bytes | memoryview", int]


def encode_block(coder: Coder, cipher: Cipher | None, digest: bytes,
                 data: memoryview | bytes) -> Coded:
    """One block as a blob's fields: compressed by ``coder``, sealed with ``cipher``."""
    codec, payload = coder.code(data)
    return _sealed(cipher, digest, codec, payload, len(data))


def _sealed(cipher: Cipher | None, digest: bytes, codec: int, payload: bytes | memoryview,
            raw: int) -> Coded:
    """A coded block's blob fields, its payload sealed with ``cipher`` (if any)."""
    if cipher is None:
        return digest, codec, ENCRYPTION_NONE, payload, raw
    return digest, codec, ENCRYPTION_AEAD, cipher.seal(payload, blob_aad(digest, codec, raw)), raw


def encode_blocks(blocks: Sequence[tuple[bytes, bytes]], cipher: Cipher | None = None,
                  codec: int = CODEC_ZSTD) -> list[Coded]:
    """Blocks ``(digest, data)`` as blobs' fields, in order, with a :class:`Coder` of their
    own (``codec``): what a thread of a backup worker runs on a batch (zstd, lz4 and the
    cipher release the GIL), while the worker goes on reading and hashing.

    With zstd, when the first block compresses, the rest are compressed by one call
    (``multi_compress_to_buffer``: the same frames as one call each, the GIL let go once
    for all, not once a block: a thread that must take the GIL back after every block
    waits on the worker's own Python each time), each kept raw if it did not shrink.  A
    first block that does not compress means data that may not: block by block, backing
    off as :class:`Coder` does."""
    coder = Coder(codec)
    # (zstandard's many-input call refuses empty inputs: no block is empty, but be sure)
    if codec != CODEC_ZSTD or len(blocks) < 2 or not all(len(data) for _, data in blocks):
        return [encode_block(coder, cipher, d, data) for d, data in blocks]
    first = encode_block(coder, cipher, *blocks[0])
    if first[1] != CODEC_ZSTD:
        return [first, *(encode_block(coder, cipher, d, data) for d, data in blocks[1:])]
    frames = compressor().multi_compress_to_buffer([data for _, data in blocks[1:]],
                                                   threads=0)
    out = [first]
    for k, (digest, data) in enumerate(blocks[1:]):
        frame = frames[k]
        if len(frame) < len(data):
            out.append(_sealed(cipher, digest, CODEC_ZSTD, memoryview(frame),  # type: ignore[arg-type]
                               len(data)))
        else:
            out.append(_sealed(cipher, digest, CODEC_NONE, data, len(data)))
    return out


def pack_name(pack_id: str) -> str:
    return f"packs/{pack_id[:2]}/{pack_id}.pack"


_PACK_NAME = re.compile(r"^packs/([0-9a-f]{2})/\1[0-9a-f]{30}\.pack$")


def is_pack_name(name: str) -> bool:
    """Whether ``name`` is where :func:`pack_name` puts a pack (32 hex digits)."""
    return _PACK_NAME.match(name) is not None


def new_pack_id() -> str:
    return uuid.uuid4().hex


@dataclass
class PackWriter:
    """Accumulates blobs in memory and writes the pack in one durable put."""

    pack_id: str = field(default_factory=new_pack_id)
    buf: bytearray = field(default_factory=bytearray)
    entries: list[tuple[bytes, int, int, int]] = field(default_factory=list)
    cipher: Cipher | None = None  # an encrypted vault's blob cipher
    codec: int = CODEC_ZSTD  # the vault's (Vault.codec), for blocks added by add()
    coder: Coder = field(init=False)

    def __post_init__(self) -> None:
        self.coder = Coder(self.codec)
        self.buf += HEADER.pack(PACK_MAGIC, PACK_VERSION, 0)

    def fresh(self) -> PackWriter:
        """A new, empty pack writer of the same vault (its cipher and codec)."""
        return PackWriter(cipher=self.cipher, codec=self.codec)

    def add(self, digest: bytes, data: memoryview | bytes) -> tuple[int, int]:
        """Append one block; returns (offset of its blob header, stored length)."""
        return self.add_coded(encode_block(self.coder, self.cipher, digest, data))

    def add_coded(self, coded: Coded) -> tuple[int, int]:
        """Append one block coded already (:func:`encode_blocks`); returns (offset of its
        blob header, stored length)."""
        digest, codec, encryption, payload, raw = coded
        offset = len(self.buf)
        stored = len(payload)
        self.buf += BLOB.pack(BLOB_MAGIC, digest, codec, encryption, 0, raw, stored)
        self.buf += payload
        self.entries.append((digest, offset, stored, raw))
        return offset, stored

    def add_blob(self, digest: bytes, blob: bytes | memoryview, stored: int, raw: int) -> int:
        """Append an existing blob (header and payload) as it is; returns its offset.

        gc uses this to move live blobs into a new pack without touching them.
        """
        offset = len(self.buf)
        self.buf += blob
        self.entries.append((digest, offset, stored, raw))
        return offset

    def __len__(self) -> int:
        return len(self.buf)

    def finish(self) -> list[bytes | bytearray]:
        """The pack as buffers to write one after another (no copy of the blobs)."""
        trailer = b"".join(ENTRY.pack(*e) for e in self.entries)
        footer = FOOTER.pack(len(self.entries), blake3.blake3(trailer).digest(), END_MAGIC)
        return [self.buf, trailer, footer]


BLOB_AAD_PREFIX = b"cbt-blob\0"
BLOB_AAD_SIZE = len(BLOB_AAD_PREFIX) + 32 + 1 + 4


def blob_aad(digest: bytes, codec: int, raw: int) -> bytes:
    """A sealed blob's associated data: what its header claims, bound to its payload."""
    return BLOB_AAD_PREFIX + digest + bytes([codec]) + raw.to_bytes(4, "little")


def blob_aads(digests: npt.NDArray[np.uint8], codec: int | npt.NDArray[np.integer],
              raw: npt.NDArray[np.integer]) -> npt.NDArray[np.uint8]:
    """:func:`blob_aad` of many blobs at once (one codec, or one each): one row each."""
    n = len(digests)
    out = np.empty((n, BLOB_AAD_SIZE), dtype=np.uint8)
    out[:, :len(BLOB_AAD_PREFIX)] = np.frombuffer(BLOB_AAD_PREFIX, dtype=np.uint8)
    out[:, len(BLOB_AAD_PREFIX):-5] = digests
    out[:, -5] = codec
    out[:, -4:] = np.asarray(raw, dtype="<u4").reshape(n, 1).view(np.uint8)
    return out


@overload
def blob_length(stored: int) -> int: ...
@overload
def blob_length(stored: npt.NDArray[np.integer]) -> npt.NDArray[np.int64]: ...
def blob_length(stored: int | npt.NDArray[np.integer]) -> int | npt.NDArray[np.int64]:
    """Bytes to read for a blob (or for each of an array of them): header plus payload."""
    if isinstance(stored, int):
        return BLOB.size + stored
    return stored.astype(np.int64) + BLOB.size


def blob_headers(pack: bytes | memoryview, offsets: npt.NDArray[np.integer]
                 ) -> npt.NDArray[np.void]:
    """The headers of the blobs at ``offsets`` of a pack, as one BLOB_DTYPE array.

    One gather for thousands of headers (restore reads every blob of a pack this
    way): no Python per blob.  The headers are copied out of ``pack``; a header
    that would lie past its end is a :class:`CorruptPackError`.
    """
    arr = np.frombuffer(pack, dtype=np.uint8)
    offs = np.asarray(offsets, dtype=np.int64)
    if len(offs) and (int(offs.max()) + BLOB.size > len(arr) or int(offs.min()) < 0):
        raise CorruptPackError("blob header past the end of the pack")
    rows = arr[offs[:, None] + np.arange(BLOB.size)]
    headers: npt.NDArray[np.void] = rows.view(BLOB_DTYPE).reshape(len(offs))
    return headers


def blobs_match(headers: npt.NDArray[np.void], digests: npt.NDArray[np.uint8],
                stored: npt.NDArray[np.integer], raw: npt.NDArray[np.integer],
                encryption: int = ENCRYPTION_NONE) -> npt.NDArray[np.bool_]:
    """Which headers are sound blobs of ``digests`` with these lengths, all at once.

    Sound: the blob magic, the expected digest, a known codec, the vault's
    ``encryption``, and the stored and raw lengths expected.  A header that fails says nothing
    of why; :func:`decode_blob` on that blob names the problem.
    """
    codec = headers["codec"]
    ok: npt.NDArray[np.bool_] = (
        (headers["magic"] == _BLOB_MAGIC_U8).all(axis=1)
        & (headers["digest"] == digests).all(axis=1)
        & (headers["encryption"] == encryption)
        & (codec <= CODEC_LZ4)
        & (headers["stored"].astype(np.int64) == np.asarray(stored, dtype=np.int64))
        & (headers["raw"].astype(np.int64) == np.asarray(raw, dtype=np.int64)))
    return ok


def decode_blob(data: bytes | memoryview, digest: bytes, where: str,
                check: bool = True, cipher: Cipher | None = None,
                id_key: bytes | None = None, want: int | None = None) -> bytes | memoryview:
    """Check a blob's header, open (``cipher``) and decompress it, and check its
    BLAKE3 (keyed with ``id_key`` in an encrypted vault) against ``digest``.

    With ``check=False`` the caller re-hashes the content itself (restore does it
    for many blocks at once in the core); a raw blob then comes back as a view.
    A vault with a ``cipher`` accepts only sealed blobs, one without only plain.
    ``want``: the block's length, where the caller knows it; a header that says another
    is refused before anything is decompressed (a frame of 4 GiB of zeros is 128 KiB).
    """
    if len(data) < BLOB.size:
        raise CorruptPackError(f"{where}: blob truncated")
    magic, d, codec, enc, _, raw, stored = BLOB.unpack_from(data, 0)
    if magic != BLOB_MAGIC:
        raise CorruptPackError(f"{where}: no blob header at this offset")
    if d != digest:
        raise CorruptPackError(f"{where}: blob holds another block")
    if (want is not None and raw != want) or raw > MAX_BLOCK:  # (no block is larger)
        raise CorruptPackError(f"{where}: content has the wrong length")
    payload = memoryview(data)[BLOB.size:BLOB.size + stored]
    if len(payload) != stored:
        raise CorruptPackError(f"{where}: blob truncated")
    if enc != (ENCRYPTION_NONE if cipher is None else ENCRYPTION_AEAD):
        raise CorruptPackError(f"{where}: blob encryption {enc} is not this vault's")
    if cipher is not None:
        try:
            payload = memoryview(cipher.open(payload, blob_aad(d, codec, raw)))
        except AuthenticationError:
            raise CorruptPackError(f"{where}: blob fails authentication") from None
    out: bytes | memoryview
    if codec == CODEC_NONE:
        out = payload if not check else bytes(payload)
    elif codec == CODEC_ZSTD:
        out = decompress(payload, raw, where)
    elif codec == CODEC_LZ4:
        out = decompress_lz4(payload, raw, where)
    else:
        raise CorruptPackError(f"{where}: unknown codec {codec}")
    if len(out) != raw or (check and block_id(out, id_key) != digest):
        raise CorruptPackError(f"{where}: content does not match its digest")
    return out


_local = threading.local()


def _dctx() -> zstandard.ZstdDecompressor:
    """This thread's zstd decompression context, made once and reused."""
    dctx: zstandard.ZstdDecompressor | None = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def decompress(payload: bytes | memoryview, raw: int, where: str = "") -> bytes:
    """A zstd blob's content (``raw`` bytes expected; the caller checks the length).

    Every block that is read back goes through here (restore, mount, verify --data,
    copy), by this thread's own ``zstandard`` context, made once and reused: measured
    on file-system content, 30 us a 16 KiB block against pyarrow's codec's 49 (which
    makes and frees a context for every call), 41 against 47 for 64 KiB.  A frame that
    says it holds more than ``raw`` bytes is refused before anything is allocated for
    it; bytes after the frame are an error.  The message starts with ``where``."""
    dctx = _dctx()
    try:
        if zstandard.frame_content_size(payload) > raw:
            raise CorruptPackError(f"{where}: content has the wrong length")
        out: bytes = dctx.decompress(payload, max_output_size=raw, allow_extra_data=False)
        return out
    except zstandard.ZstdError as exc:
        raise CorruptPackError(f"{where}: cannot decompress ({exc})") from None


def decompress_lz4(payload: bytes | memoryview, raw: int, where: str = "") -> bytes:
    """An lz4 blob's content: exactly ``raw`` bytes, or an error starting with ``where``.

    The payload is one lz4 block with no size before it (the blob header has it):
    decompressed into a buffer of ``raw`` bytes, which a malformed or hostile block
    cannot write past (lz4's safe decoder); one that decodes to fewer bytes is refused.
    ``raw`` is allocated before a byte is decoded: no more than a block's (a negative one
    would have lz4 allocate what the payload's first 4 bytes say, up to 2 GiB)."""
    if not 0 <= raw <= MAX_BLOCK:
        raise CorruptPackError(f"{where}: content has the wrong length")
    try:
        out: bytes = lz4.block.decompress(payload, uncompressed_size=raw)
    except (lz4.block.LZ4BlockError, ValueError) as exc:  # (ValueError: older releases)
        raise CorruptPackError(f"{where}: cannot decompress ({exc})") from None
    if len(out) != raw:
        raise CorruptPackError(f"{where}: content has the wrong length")
    return out


def _lz4_many(data: bytes | memoryview, starts: npt.NDArray[np.int64],
              ends: npt.NDArray[np.int64], raw: npt.NDArray[np.int64],
              take: npt.NDArray[np.intp], out: list[memoryview | bytes | None]) -> None:
    """:func:`decompress_many`'s lz4 blocks ``take``, into ``out``: one tight loop, no
    per-block checks of its own.  A block that fails, or decodes to another length, is
    left None for the careful path (:func:`decompress_lz4`, which names the problem)."""
    view = memoryview(data)
    dec = lz4.block.decompress
    for j, a, b, n in zip(take.tolist(), starts[take].tolist(), ends[take].tolist(),
                          raw[take].tolist(), strict=True):
        if not 0 <= n <= MAX_BLOCK:
            continue  # (no block has that length: the careful path names it)
        try:
            got = dec(view[a:b], uncompressed_size=n)
        except (lz4.block.LZ4BlockError, ValueError):
            continue
        if len(got) == n:
            out[j] = got


# zstd's frame format (RFC 8878, section 3.1.1), as far as decompress_many reads it
ZSTD_MAGIC = 0xFD2FB528
ZSTD_BLOCK_MAX = 128 << 10  # a block's content, at most: a frame of n bytes has >= n/128K
_DID_SIZE = np.array([0, 1, 2, 4], dtype=np.int64)  # by Dictionary_ID_flag
_FCS_SIZE = np.array([0, 2, 4, 8], dtype=np.int64)  # by Frame_Content_Size_flag (0: see SS)


def exact_frames(data: bytes | memoryview, starts: npt.NDArray[np.int64],
                 ends: npt.NDArray[np.int64], raw: npt.NDArray[np.int64]
                 ) -> npt.NDArray[np.bool_]:
    """Which of the spans ``data[starts[i]:ends[i]]`` are each exactly one zstd frame (no
    byte before or after it) whose header says it holds ``raw[i]`` bytes: all at once, no
    Python per frame.

    1. The frame header: the magic number; the descriptor (its reserved bit clear; the
       sizes of the window, dictionary id and content size fields it implies); the
       content size, which must be given and equal ``raw``.
    2. The blocks, every frame a step at a time together: a block header (3 bytes: last
       flag, type, size), its content (one byte for an RLE block, none past the span;
       type 3 is reserved, refused) until the last block.  A frame with more blocks than
       its content needs (128 KiB each), and one that fails a check, is not exact.
    3. The checksum (4 bytes) when the descriptor says there is one, then the span's end.

    Not exact says nothing of why: :func:`decompress` of that frame names the problem (or
    decompresses a sound frame this does not take, such as one without a content size).
    """
    arr = np.frombuffer(data, dtype=np.uint8)
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    raw = np.asarray(raw, dtype=np.int64)
    if not len(starts):
        return np.zeros(0, dtype=bool)
    last = len(arr) - 1
    ok = (starts >= 0) & (ends <= len(arr)) & (ends - starts >= 8) & (last >= 0)

    def le(pos: npt.NDArray[np.int64], width: int | npt.NDArray[np.int64]
           ) -> npt.NDArray[np.int64]:  # little-endian integers of ``width`` bytes at pos
        out = np.zeros(len(pos), dtype=np.int64)
        for k in range(int(np.max(width))):
            byte = arr[np.clip(pos + k, 0, last)].astype(np.int64)
            out |= np.where(k < width, byte, 0) << (8 * k)
        return out

    ok &= le(starts, 4) == ZSTD_MAGIC  # 1.
    desc = le(starts + 4, 1)
    fcs_flag, single = desc >> 6, (desc >> 5) & 1
    ok &= ((desc >> 3) & 1 == 0) & ((fcs_flag > 0) | (single == 1))
    fcs_size = np.where(fcs_flag == 0, 1, _FCS_SIZE[fcs_flag])
    pos = starts + 5 + (1 - single) + _DID_SIZE[desc & 3]
    ok &= pos + fcs_size <= ends
    ok &= le(pos, fcs_size) + np.where(fcs_size == 2, 256, 0) == raw
    pos = pos + fcs_size
    done = np.zeros(len(starts), dtype=bool)
    for _ in range(int(raw.max()) // ZSTD_BLOCK_MAX + 1):  # 2.
        active = ok & ~done
        if not active.any():
            break
        ok &= ~active | (pos + 3 <= ends)
        head = le(pos, 3)
        kind = (head >> 1) & 3
        ok &= ~active | (kind != 3)
        pos = np.where(active, pos + 3 + np.where(kind == 1, 1, head >> 3), pos)
        ok &= ~active | (pos <= ends)
        done |= active & (head & 1 == 1)
    pos = pos + 4 * ((desc >> 2) & 1)  # 3.
    exact: npt.NDArray[np.bool_] = ok & done & (pos == ends)
    return exact


class FrameError(CorruptPackError):
    """A frame of :func:`decompress_many` that fails; ``item`` is its position."""

    def __init__(self, message: str, item: int) -> None:
        super().__init__(message)
        self.item = item


def decompress_many(data: bytes | memoryview, starts: npt.NDArray[np.int64],
                    ends: npt.NDArray[np.int64], raw: npt.NDArray[np.int64],
                    exact: npt.NDArray[np.bool_] | None = None,
                    codecs: npt.NDArray[np.uint8] | None = None
                    ) -> list[memoryview | bytes]:
    """The content of the compressed payloads ``data[starts[i]:ends[i]]`` (``raw[i]``
    bytes each; zstd frames, or lz4 blocks where ``codecs`` says :data:`CODEC_LZ4`), in
    order: what restore decompresses, a pack's worth of blocks at a time.

    1. The zstd frames that are each exactly one frame of ``raw`` bytes
       (:func:`exact_frames`) are decompressed by one call into zstandard
       (``multi_decompress_to_buffer``, which lets go of the GIL for all of them and
       decompresses into one buffer allocated for all: no Python, no allocation per
       frame).  It takes bytes after a frame, hence the check first.
    2. Any other payload, or all of them if that call fails, goes through
       :func:`decompress` (:func:`decompress_lz4` for lz4) one by one: it decompresses
       what is sound, and the first payload that is not (or whose content is not
       ``raw`` bytes) raises :class:`FrameError` naming its position.

    ``exact``: :func:`exact_frames` of these frames, when the caller has it (one call
    for a whole pack costs less than one per batch).  A view points into the buffer
    of step 1 (which it keeps alive).
    """
    n = len(starts)
    out: list[memoryview | bytes | None] = [None] * n
    lz4s = (np.zeros(n, dtype=bool) if codecs is None
            else np.asarray(codecs[:n]) == CODEC_LZ4)
    take = np.flatnonzero((exact_frames(data, starts, ends, raw) if exact is None else exact)
                          & ~lz4s)
    if len(take):
        segs = np.empty((len(take), 2), dtype="<u8")
        segs[:, 0] = starts[take]
        segs[:, 1] = ends[take] - starts[take]
        dctx = _dctx()
        try:
            got = dctx.multi_decompress_to_buffer(
                zstandard.BufferWithSegments(data, segs.tobytes()),
                decompressed_sizes=np.asarray(raw, dtype="<u8")[take].tobytes(), threads=0)
        except zstandard.ZstdError:
            pass  # (step 2 finds which frame, and says why)
        else:
            for i, j in enumerate(take.tolist()):
                out[j] = memoryview(got[i])  # type: ignore[arg-type]
    _lz4_many(data, starts, ends, raw, np.flatnonzero(lz4s), out)
    for j, got_j in enumerate(out):
        if got_j is None:
            try:
                got_j = (decompress_lz4 if lz4s[j] else decompress)(
                    data[int(starts[j]):int(ends[j])], int(raw[j]))
            except CorruptPackError as exc:
                raise FrameError(str(exc), j) from None
            if len(got_j) != int(raw[j]):
                raise FrameError(": content has the wrong length", j)
            out[j] = got_j
    return out  # type: ignore[return-value]  # (no None is left)


def block_id(data: bytes | memoryview, id_key: bytes | None) -> bytes:
    """A block's id: its BLAKE3, keyed with ``id_key`` in an encrypted vault (as the
    core's ``hash_blocks``, one block at a time)."""
    h = blake3.blake3() if id_key is None else blake3.blake3(key=id_key)
    h.update(data)
    return h.digest()


def read_trailer(data: bytes, where: str) -> npt.NDArray[np.void]:
    """The entries of a whole pack's trailer as an ENTRY_DTYPE array (checked)."""
    if len(data) < HEADER.size + FOOTER.size:
        raise CorruptPackError(f"{where}: pack truncated")
    magic, version, _ = HEADER.unpack_from(data, 0)
    if magic != PACK_MAGIC:
        raise CorruptPackError(f"{where}: not a cbt pack")
    if version > PACK_VERSION:
        raise CorruptPackError(f"{where}: pack format {version} is newer than this cbt")
    count, checksum, end = FOOTER.unpack_from(data, len(data) - FOOTER.size)
    start = len(data) - FOOTER.size - count * ENTRY.size
    if end != END_MAGIC or start < HEADER.size:
        raise CorruptPackError(f"{where}: pack truncated (no trailer)")
    trailer = data[start:len(data) - FOOTER.size]
    if blake3.blake3(trailer).digest() != checksum:
        raise CorruptPackError(f"{where}: trailer checksum mismatch")
    return np.frombuffer(trailer, dtype=ENTRY_DTYPE).copy()


def read_pack_trailer(read_range: Callable[[int, int], bytes], size: int,
                      where: str) -> npt.NDArray[np.void]:
    """The checked trailer entries of a pack of ``size`` bytes, without reading its blobs.

    ``read_range(offset, length)`` reads from the pack: its header, its footer,
    then the trailer the footer counts (indexing a pack from its trailer alone).
    """
    if size < HEADER.size + FOOTER.size:
        raise CorruptPackError(f"{where}: pack truncated")
    count, _checksum, _end = FOOTER.unpack(read_range(size - FOOTER.size, FOOTER.size))
    tail = min(size - HEADER.size, FOOTER.size + count * ENTRY.size)
    # read_trailer checks a whole pack; the blobs between do not matter to it
    head = read_range(0, HEADER.size)
    return read_trailer(head + read_range(size - tail, tail), where)


def scan_blobs(data: bytes) -> list[tuple[bytes, int, int, int]]:
    """Walk blob headers from the start (repair path when the trailer is lost).

    Returns (digest, offset, stored, raw) for every blob whose header parses;
    stops at the first thing that is not a blob.
    """
    out = []
    pos = HEADER.size
    while pos + BLOB.size <= len(data):
        magic, d, _codec, _enc, _, raw, stored = BLOB.unpack_from(data, pos)
        if magic != BLOB_MAGIC or pos + BLOB.size + stored > len(data):
            break
        out.append((d, pos, stored, raw))
        pos += BLOB.size + stored
    return out


def pack_id_of(name: str) -> str:
    return os.path.basename(name).removesuffix(".pack")
