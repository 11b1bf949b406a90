"""Manifest: the per-block digests of one disk, stored as an Arrow IPC file.

One row per block, in block order::

    block  uint64                 block index
    digest fixed_size_binary(32)  BLAKE3 of the block; 32 zero bytes for ZERO and HOLE
    flags  uint8                  0 DATA, 1 ZERO, 2 HOLE

Schema metadata says what the file is (any Arrow tool can read it: pyarrow,
DuckDB, polars)::

    cbt.magic            "cbt-manifest"
    cbt.format_version   "1"
    cbt.disk_size        bytes
    cbt.block_size       bytes
    cbt.source           absolute path the disk was read from
    cbt.created          RFC 3339 UTC
    cbt.digest_checksum  BLAKE3 hex of the digest column's 32*n bytes
    cbt.kind             "full" (or "delta" inside a vault: only changed rows)
    cbt.checksum         BLAKE3 hex over kind, sizes and every column

A manifest exported from an encrypted vault (``cbt show --manifest -o``) says
whose ids its digests are: ``cbt.digest_kind`` "blake3-keyed" (the vault's
keyed BLAKE3 block ids) and ``cbt.vault_id``; without it the digests are plain
BLAKE3 ("blake3"), as every ``cbt scan -o`` manifest's.  Only manifests of one
digest kind (and one vault) compare.

Every reader checks all of it; a file that fails any check is a
:class:`~cbt.errors.CorruptManifestError`, never a silently wrong manifest.
Writes go through :mod:`cbt.durable` (temporary name, fsync, rename).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import blake3
import numpy as np
import numpy.typing as npt

from cbt.core.durable import atomic_write
from cbt.core.errors import CbtIOError, CorruptManifestError
from cbt.core.native import fast

# Do not modify: these identify every manifest ever written.
MAGIC = "cbt-manifest"
FORMAT_VERSION = 1
ARROW_FILE_MAGIC = b"ARROW1"
ROWS_PER_BATCH = 1 << 20

DIGEST_KIND = "cbt.digest_kind"
VAULT_ID = "cbt.vault_id"
PLAIN_DIGESTS = "blake3"

DATA, ZERO, HOLE = fast.FLAG_DATA, fast.FLAG_ZERO, fast.FLAG_HOLE


@dataclass
class Manifest:
    """Digests and flags of every block of one disk.

    ``digests`` is an ``(n, 32) uint8`` array and ``flags`` an ``(n,) uint8``
    array (numpy views; no copies are made when reading a file).
    """

    block_size: int
    disk_size: int
    digests: npt.NDArray[np.uint8]
    flags: npt.NDArray[np.uint8]
    source: str = ""
    created: str = ""
    bytes_read: int = 0
    seconds: float = 0.0
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def blocks(self) -> int:
        return int(self.flags.shape[0])

    def count(self, flag: int) -> int:
        return int(np.count_nonzero(self.flags == flag))

    @property
    def data_blocks(self) -> int:
        return self.count(DATA)

    @property
    def zero_blocks(self) -> int:
        return self.count(ZERO)

    @property
    def hole_blocks(self) -> int:
        return self.count(HOLE)

    @property
    def digest_kind(self) -> str:
        """``blake3`` (plain digests) or the kind of a vault's keyed ids (``cbt.digest_kind``)."""
        return self.metadata.get(DIGEST_KIND, PLAIN_DIGESTS)

    def digest_checksum(self) -> str:
        return blake3.blake3(np.ascontiguousarray(self.digests).data).hexdigest()

    # -- Arrow ---------------------------------------------------------------

    def schema_metadata(self) -> dict[str, str]:
        meta = {
            "cbt.magic": MAGIC,
            "cbt.format_version": str(FORMAT_VERSION),
            "cbt.kind": "full",
            "cbt.disk_size": str(self.disk_size),
            "cbt.block_size": str(self.block_size),
            "cbt.source": self.source,
            "cbt.created": self.created,
            "cbt.digest_checksum": self.digest_checksum(),
            "cbt.checksum": content_checksum("full", self.disk_size, self.block_size,
                                             np.arange(self.blocks, dtype=np.uint64),
                                             self.digests, self.flags),
        }
        meta.update(self.metadata)
        return meta

    def to_arrow(self) -> Any:
        """The manifest as a ``pyarrow.Table`` (digest and flags columns share memory)."""
        return _table(np.arange(self.blocks, dtype=np.uint64), self.digests, self.flags,
                      self.schema_metadata())

    def to_bytes(self) -> bytes:
        return _ipc_bytes(self.to_arrow())

    def delta_from(self, base: Manifest) -> Delta:
        """The rows where this manifest differs from ``base`` (a newer point's delta).

        Blocks past the end of ``base`` are always included; blocks past this
        manifest's end are implied by its size.
        """
        common = min(self.blocks, base.blocks)
        differ = np.zeros(self.blocks, dtype=np.uint8)
        if common:
            fast.compare_digests(self.digests[:common], base.digests[:common], differ[:common])
            differ[:common] |= (self.flags[:common] != base.flags[:common])
        differ[common:] = 1
        rows = np.nonzero(differ)[0].astype(np.uint64)
        return Delta(self.block_size, self.disk_size, rows, self.digests[rows],
                     self.flags[rows])

    def write(self, path: str | os.PathLike[str], mode: int = 0o666) -> None:
        """Durably write the manifest to ``path`` (temporary name, fsync, rename), created
        with ``mode`` less the umask."""
        data = self.to_bytes()

        def write_all(f: BinaryIO) -> None:
            f.write(data)

        atomic_write(path, write_all, mode)

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> Manifest:
        """Read and fully check a manifest file."""
        import pyarrow as pa

        p = os.fspath(path)
        try:
            with pa.memory_map(p) as source:
                table = pa.ipc.open_file(source).read_all()
        except FileNotFoundError:
            raise FileNotFoundError(f"no such manifest: {p}") from None
        except (pa.ArrowException, OSError) as exc:
            raise CorruptManifestError(f"corrupt manifest {p}: {exc}") from None
        return cls.from_arrow(table, p)

    @classmethod
    def from_arrow(cls, table: Any, where: str = "manifest") -> Manifest:
        rows = _checked_rows(table, where, "full")
        n = fast.nblocks(rows.disk_size, rows.block_size)
        if len(rows.blocks) != n or (n and not np.array_equal(
                rows.blocks, np.arange(n, dtype=np.uint64))):
            raise CorruptManifestError(f"corrupt manifest {where}: rows are not blocks 0..{n - 1}"
                                       f" of a {rows.disk_size}-byte disk")
        return cls(block_size=rows.block_size, disk_size=rows.disk_size,
                   digests=rows.digests, flags=rows.flags, source=rows.meta.get("cbt.source", ""),
                   created=rows.meta.get("cbt.created", ""),
                   metadata={k: v for k, v in rows.meta.items() if k not in _CORE_KEYS})


@dataclass
class _Rows:
    meta: dict[str, str]
    disk_size: int
    block_size: int
    blocks: npt.NDArray[np.uint64]
    digests: npt.NDArray[np.uint8]
    flags: npt.NDArray[np.uint8]


def content_checksum(kind: str, disk_size: int, block_size: int, blocks: npt.NDArray[Any],
                     digests: npt.NDArray[np.uint8], flags: npt.NDArray[np.uint8]) -> str:
    """BLAKE3 over everything a manifest says (``cbt.checksum``)."""
    h = blake3.blake3(f"{kind}:{disk_size}:{block_size}:".encode())
    h.update(np.ascontiguousarray(blocks, dtype="<u8").view(np.uint8).data)
    h.update(np.ascontiguousarray(flags, dtype=np.uint8).data)
    h.update(np.ascontiguousarray(digests, dtype=np.uint8).reshape(-1).data)
    return h.hexdigest()


def _checked_rows(table: Any, where: str, kind: str) -> _Rows:
    """Every check a manifest or delta must pass before a single row is believed."""
    import pyarrow as pa

    def bad(why: str) -> CorruptManifestError:
        return CorruptManifestError(f"corrupt manifest {where}: {why}")

    meta = schema_metadata(table, where)
    if meta.get("cbt.magic") != MAGIC:
        raise bad("not a cbt manifest (no cbt.magic)")
    try:
        version = int(meta["cbt.format_version"])
        disk_size = int(meta["cbt.disk_size"])
        block_size = int(meta["cbt.block_size"])
        digest_checksum = meta["cbt.digest_checksum"]
    except (KeyError, ValueError) as exc:
        raise bad(f"missing or malformed metadata {exc}") from None
    if version > FORMAT_VERSION:
        raise bad(f"format version {version} is newer than this cbt reads "
                  f"({FORMAT_VERSION}); upgrade cbt")
    if meta.get("cbt.kind", "full") != kind:
        raise bad(f"a {meta.get('cbt.kind')} manifest where a {kind} one belongs")
    if disk_size < 0:
        raise bad(f"negative disk size {disk_size}")
    try:
        fast.check_block_size(block_size)
    except ValueError:
        raise bad(f"invalid block size {block_size}") from None
    expected = {"block": pa.uint64(), "digest": pa.binary(fast.DIGEST_SIZE), "flags": pa.uint8()}
    for name, typ in expected.items():
        if name not in table.column_names or table.schema.field(name).type != typ:
            raise bad(f"column {name!r} missing or not {typ}")
        if table.column(name).null_count:
            raise bad(f"column {name!r} has nulls")
    n = table.num_rows
    try:
        blocks = from_arrow(table.column("block"), np.uint64)
        flags = from_arrow(table.column("flags"), np.uint8)
        digests = _digest_array(table.column("digest").combine_chunks(), n)
    except (pa.ArrowException, ValueError) as exc:
        raise bad(str(exc)) from None
    if n and int(flags.max()) > HOLE:
        raise bad("unknown block flag")
    if blake3.blake3(np.ascontiguousarray(digests).data).hexdigest() != digest_checksum:
        raise bad("digest checksum mismatch (the file was altered or damaged)")
    checksum = meta.get("cbt.checksum")
    if checksum is None:
        raise bad("no cbt.checksum")
    if checksum != content_checksum(kind, disk_size, block_size, blocks, digests, flags):
        raise bad("checksum mismatch (the file was altered or damaged)")
    if n:
        is_data = flags == DATA
        if (digests[~is_data] != 0).any():
            raise bad("a ZERO or HOLE block has a digest")
        if not digests[is_data].any(axis=1).all():
            raise bad("a DATA block has no digest")
    return _Rows(meta, disk_size, block_size, blocks, digests, flags)


def to_arrow(values: npt.NDArray[Any]) -> Any:
    """A 1-D numpy array of unsigned integers as an Arrow array over the same memory.

    (``pa.array`` would import numpy.ma to look for a mask: 10 ms of start-up.)
    """
    import pyarrow as pa

    values = np.ascontiguousarray(values)
    typ = {1: pa.uint8(), 2: pa.uint16(), 4: pa.uint32(), 8: pa.uint64()}[values.itemsize]
    return pa.Array.from_buffers(typ, len(values), [None, pa.py_buffer(values)])


def from_arrow(column: Any, dtype: Any) -> npt.NDArray[Any]:
    """An Arrow column of ``dtype`` numbers (no nulls) as a numpy view of its memory.

    Raises ``ValueError`` when the column holds another type (a damaged file).
    (``to_numpy`` on a chunked column would try to import pandas.)
    """
    import pyarrow as pa

    col = column.combine_chunks()
    want = pa.from_numpy_dtype(np.dtype(dtype))
    if col.type != want or col.null_count:
        raise ValueError(f"column of {col.type}, expected {want} without nulls")
    if len(col) == 0:
        return np.zeros(0, dtype=dtype)
    return np.frombuffer(col.buffers()[1], dtype=dtype, count=len(col),
                         offset=col.offset * np.dtype(dtype).itemsize)


def schema_metadata(table: Any, where: str) -> dict[str, str]:
    """An Arrow table's schema metadata as text; undecodable bytes mean a damaged file."""
    try:
        return {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    except UnicodeDecodeError:
        raise CorruptManifestError(f"corrupt file {where}: metadata is not UTF-8") from None


def _ipc_bytes(table: Any) -> bytes:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=ROWS_PER_BATCH)
    return sink.getvalue().to_pybytes()  # type: ignore[no-any-return]


def _table(blocks: npt.NDArray[np.uint64], digests: npt.NDArray[np.uint8],
           flags: npt.NDArray[np.uint8], metadata: dict[str, str]) -> Any:
    import pyarrow as pa

    n = len(blocks)
    digests = np.ascontiguousarray(digests, dtype=np.uint8)
    table = pa.table({
        "block": to_arrow(np.asarray(blocks, dtype=np.uint64)),
        "digest": pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(fast.DIGEST_SIZE), n, [None, pa.py_buffer(digests)]),
        "flags": to_arrow(np.asarray(flags, dtype=np.uint8)),
    })
    return table.replace_schema_metadata(metadata)


@dataclass
class Delta:
    """The changed rows of a manifest relative to a base manifest.

    Stored like a manifest (same columns, ``cbt.kind = "delta"``), with only the
    rows that differ, so metadata grows with change, not with disk size.
    """

    block_size: int
    disk_size: int
    rows: npt.NDArray[np.uint64]
    digests: npt.NDArray[np.uint8]
    flags: npt.NDArray[np.uint8]
    metadata: dict[str, str] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        meta = {
            "cbt.magic": MAGIC,
            "cbt.format_version": str(FORMAT_VERSION),
            "cbt.kind": "delta",
            "cbt.disk_size": str(self.disk_size),
            "cbt.block_size": str(self.block_size),
            "cbt.digest_checksum": blake3.blake3(
                np.ascontiguousarray(self.digests).data).hexdigest(),
            "cbt.checksum": content_checksum("delta", self.disk_size, self.block_size,
                                             self.rows, self.digests, self.flags),
            **self.metadata,
        }
        return _ipc_bytes(_table(self.rows, self.digests, self.flags, meta))

    def apply(self, base: Manifest) -> Manifest:
        """The full manifest this delta describes on top of ``base``."""
        n = fast.nblocks(self.disk_size, self.block_size)
        digests = np.zeros((n, fast.DIGEST_SIZE), dtype=np.uint8)
        flags = np.full(n, HOLE, dtype=np.uint8)
        common = min(n, base.blocks)
        digests[:common] = base.digests[:common]
        flags[:common] = base.flags[:common]
        rows = self.rows.astype(np.int64)
        digests[rows] = self.digests
        flags[rows] = self.flags
        return Manifest(self.block_size, self.disk_size, digests, flags,
                        metadata=dict(self.metadata))

    @classmethod
    def from_arrow(cls, table: Any, where: str) -> Delta:
        rows = _checked_rows(table, where, "delta")
        n = fast.nblocks(rows.disk_size, rows.block_size)
        b = rows.blocks
        if len(b) and (int(b.max()) >= n or np.any(np.diff(b.astype(np.int64)) <= 0)):
            raise CorruptManifestError(f"corrupt manifest {where}: block rows out of range or "
                                       "not ascending")
        return cls(rows.block_size, rows.disk_size, b, rows.digests, rows.flags,
                   {k: v for k, v in rows.meta.items() if k not in _CORE_KEYS})


def read_manifest_bytes(data: bytes, where: str) -> Manifest | Delta:
    """A full manifest or a delta, by its ``cbt.kind``, fully checked."""
    import pyarrow as pa

    try:
        table = pa.ipc.open_file(pa.py_buffer(data)).read_all()
    except (pa.ArrowException, OSError) as exc:
        raise CorruptManifestError(f"corrupt manifest {where}: {exc}") from None
    kind = (table.schema.metadata or {}).get(b"cbt.kind", b"full")
    if kind == b"delta":
        return Delta.from_arrow(table, where)
    return Manifest.from_arrow(table, where)


_CORE_KEYS = {"cbt.kind", "cbt.checksum", "cbt.magic", "cbt.format_version", "cbt.disk_size",
              "cbt.block_size", "cbt.source", "cbt.created", "cbt.digest_checksum"}


def _digest_array(col: Any, n: int) -> npt.NDArray[np.uint8]:
    """Zero-copy ``(n, 32)`` view of a fixed_size_binary(32) column."""
    if n == 0:
        return np.zeros((0, fast.DIGEST_SIZE), dtype=np.uint8)
    buf = col.buffers()[1]
    flat = np.frombuffer(buf, dtype=np.uint8)
    start = col.offset * fast.DIGEST_SIZE
    return flat[start:start + n * fast.DIGEST_SIZE].reshape(n, fast.DIGEST_SIZE)


def manifest_file_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """A manifest file's schema metadata only (no rows read, nothing checked)."""
    import pyarrow as pa

    p = os.fspath(path)
    try:
        with pa.memory_map(p) as source:
            reader = pa.ipc.open_file(source)  # .schema: what schema_metadata reads
    except (pa.ArrowException, OSError) as exc:
        raise CorruptManifestError(f"corrupt manifest {p}: {exc}") from None
    return schema_metadata(reader, p)


def is_manifest_file(path: str | os.PathLike[str]) -> bool:
    """True when the file starts with Arrow's file magic (``ARROW1``).

    A first page that cannot be read (a disk image with a read error) is a
    :class:`CbtIOError` naming the file, the byte and the error, as a disk read names it.
    """
    with open(path, "rb") as f:
        try:
            return f.read(len(ARROW_FILE_MAGIC)) == ARROW_FILE_MAGIC
        except OSError as exc:
            raise CbtIOError(exc.errno or errno.EIO, f"read error on {os.fspath(path)} at "
                             f"byte 0: {exc.strerror or exc}") from None
