"""Manifest: the per-block digests of one disk, stored as an Arrow IPC file.

Rows in block order::

    block  uint64                 block index
    digest fixed_size_binary(32)  BLAKE3 of the block; 32 zero bytes for ZERO and HOLE
    flags  uint8                  0 DATA, 1 ZERO, 2 HOLE

Schema metadata says what the file is (any Arrow tool can read it: pyarrow,
DuckDB, polars)::

    cbt.magic            "cbt-manifest"
    cbt.format_version   "1": one row per block; "2": no row for a HOLE block
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

Format 1 (``cbt scan -o``, and any full manifest of a disk without holes,
byte for byte as ever) has one row per block.  Format 2, a vault's full
manifest of a disk with holes (and ``cbt show --manifest -o`` of one), has rows
only for DATA and ZERO blocks: a block without a row is a HOLE, so a 1 TiB thin
disk's manifest is as small as its data.  A delta (format 1 still: its rows
mean the same to both) lists the blocks that differ from its base; a block
past the base's end without a row is a hole.  Both versions are read.

Every reader checks all of it; a file that fails any check is a
:class:`~cbt.errors.CorruptManifestError`, never a silently wrong manifest.
Writes go through :mod:`cbt.durable` (temporary name, fsync, rename).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, NamedTuple

import blake3
import numpy as np
import numpy.typing as npt

from cbt.core.durable import atomic_write
from cbt.core.errors import CorruptManifestError
from cbt.core.native import fast

# Do not modify: these identify every manifest ever written.
MAGIC = "cbt-manifest"
FORMAT_VERSION = 2  # the newest this cbt reads and writes
DENSE_VERSION = 1  # one row per block (``cbt scan -o``, exports, a full manifest without holes)
ROWS_PER_BATCH = 1 << 20
MAX_DISK_SIZE = 2**63  # bytes, exclusive: as a point record's sizes

DIGEST_KIND = "cbt.digest_kind"
VAULT_ID = "cbt.vault_id"
PLAIN_DIGESTS = "blake3"

DATA, ZERO, HOLE = fast.FLAG_DATA, fast.FLAG_ZERO, fast.FLAG_HOLE

U64 = npt.NDArray[np.uint64]


class Manifest:
    """Digests and flags of the blocks of one disk: holes take no memory.

    Held sparse: ``rows`` (sorted ``uint64`` block numbers), ``row_digests``
    (``(k, 32) uint8``) and ``row_flags`` (DATA or ZERO) of the blocks that are
    not holes; every other block of the disk is a HOLE.  So a 1 TiB thin disk
    costs what its data costs.  ``digests`` and ``flags`` are the dense
    ``(n, 32)`` and ``(n,)`` arrays (one row per block, made on first use: for
    small disks and tests; cbt itself never asks for them).

    ``Manifest(block_size, disk_size, digests, flags)`` takes dense arrays (none: every
    block a hole);
    :meth:`sparse` takes rows.
    """

    def __init__(self, block_size: int, disk_size: int,
                 digests: npt.NDArray[np.uint8] | None = None,
                 flags: npt.NDArray[np.uint8] | None = None, source: str = "",
                 created: str = "", bytes_read: int = 0, seconds: float = 0.0,
                 metadata: dict[str, str] | None = None) -> None:
        self.block_size = block_size
        self.disk_size = disk_size
        self.source = source
        self.created = created
        self.bytes_read = bytes_read
        self.seconds = seconds
        self.metadata: dict[str, str] = dict(metadata or {})
        self._dense: tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]] | None = None
        if flags is None or digests is None:  # all holes
            self.rows: U64 = np.zeros(0, dtype=np.uint64)
            self.row_digests: npt.NDArray[np.uint8] = np.zeros((0, fast.DIGEST_SIZE), np.uint8)
            self.row_flags: npt.NDArray[np.uint8] = np.zeros(0, dtype=np.uint8)
            return
        n = fast.nblocks(disk_size, block_size)
        if len(flags) != n or len(digests) != n:
            raise ValueError(f"{len(flags)} rows for a disk of {n} blocks")
        rows = np.nonzero(flags != HOLE)[0]
        self.rows = rows.astype(np.uint64)
        self.row_digests = np.ascontiguousarray(digests[rows])
        self.row_flags = np.ascontiguousarray(flags[rows])

    @classmethod
    def sparse(cls, block_size: int, disk_size: int, rows: npt.NDArray[Any],
               digests: npt.NDArray[np.uint8], flags: npt.NDArray[np.uint8], source: str = "",
               created: str = "", metadata: dict[str, str] | None = None) -> Manifest:
        """A manifest from the rows of its non-hole blocks (ascending; HOLE rows dropped)."""
        m = cls(block_size, 0, source=source, created=created, metadata=metadata)
        m.disk_size = disk_size
        keep = np.asarray(flags) != HOLE
        rows = np.asarray(rows, dtype=np.uint64)
        if keep.all():  # (no hole row: nothing to drop, nothing to copy)
            m.rows = np.ascontiguousarray(rows)
            m.row_digests = np.ascontiguousarray(digests, dtype=np.uint8)
            m.row_flags = np.ascontiguousarray(flags, dtype=np.uint8)
            return m
        m.rows = np.ascontiguousarray(rows[keep])
        m.row_digests = digest_records(digests)[keep].view(np.uint8).reshape(-1, fast.DIGEST_SIZE)
        m.row_flags = np.ascontiguousarray(flags[keep], dtype=np.uint8)
        return m

    @property
    def blocks(self) -> int:
        """Blocks of the disk (holes included)."""
        return int(fast.nblocks(self.disk_size, self.block_size))

    def count(self, flag: int) -> int:
        if flag == HOLE:
            return self.blocks - len(self.rows)
        return int(np.count_nonzero(self.row_flags == flag))

    @property
    def data_blocks(self) -> int:
        return self.count(DATA)

    @property
    def zero_blocks(self) -> int:
        return self.count(ZERO)

    @property
    def hole_blocks(self) -> int:
        return self.count(HOLE)

    def data_rows(self) -> tuple[U64, npt.NDArray[np.uint8]]:
        """Block numbers and digests of the DATA blocks."""
        is_data = self.row_flags == DATA
        return self.rows[is_data], self.row_digests[is_data]

    def at(self, blocks: npt.NDArray[Any]) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
        """Digests and flags of any block numbers (HOLE with a zero digest where none is held)."""
        want = np.asarray(blocks, dtype=np.uint64)
        digests = np.zeros((len(want), fast.DIGEST_SIZE), dtype=np.uint8)
        flags = np.full(len(want), HOLE, dtype=np.uint8)
        if len(self.rows) and len(want):
            pos = np.minimum(np.searchsorted(self.rows, want), len(self.rows) - 1)
            hit = self.rows[pos] == want
            held = pos[hit]
            # (moved as 32-byte records: numpy copies an (n, 32) uint8 row byte by byte)
            digests.view("V32").ravel()[hit] = digest_records(self.row_digests)[held]
            flags[hit] = self.row_flags[held]
        return digests, flags

    @property
    def digests(self) -> npt.NDArray[np.uint8]:
        """Dense ``(n, 32)`` digests, one row per block (allocated per block: small disks)."""
        return self._dense_arrays()[0]

    @property
    def flags(self) -> npt.NDArray[np.uint8]:
        """Dense ``(n,)`` flags, one per block (allocated per block: small disks)."""
        return self._dense_arrays()[1]

    def _dense_arrays(self) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
        if self._dense is None:
            self._dense = self._dense_window(0, self.blocks)
        return self._dense

    def _dense_window(self, lo: int, hi: int) -> tuple[npt.NDArray[np.uint8],
                                                        npt.NDArray[np.uint8]]:
        """Dense digests and flags of blocks ``[lo, hi)``."""
        digests = np.zeros((hi - lo, fast.DIGEST_SIZE), dtype=np.uint8)
        flags = np.full(hi - lo, HOLE, dtype=np.uint8)
        a, b = np.searchsorted(self.rows, [lo, hi])
        at = self.rows[a:b].astype(np.int64) - lo
        digests[at] = self.row_digests[a:b]
        flags[at] = self.row_flags[a:b]
        return digests, flags

    @property
    def digest_kind(self) -> str:
        """``blake3`` (plain digests) or the kind of a vault's keyed ids (``cbt.digest_kind``)."""
        return self.metadata.get(DIGEST_KIND, PLAIN_DIGESTS)

    def digest_checksum(self) -> str:
        """BLAKE3 of the dense digest column (one row per block), computed in windows."""
        h = blake3.blake3()
        for lo, hi in self._windows():
            h.update(self._dense_window(lo, hi)[0].data)
        return h.hexdigest()

    def _windows(self) -> list[tuple[int, int]]:
        return _windows(self.blocks)

    # -- Arrow ---------------------------------------------------------------

    def _dense_metadata(self) -> dict[str, str]:
        """Schema metadata of the dense (one row per block, format 1) file."""
        h = blake3.blake3(f"full:{self.disk_size}:{self.block_size}:".encode())
        for lo, hi in self._windows():
            h.update(np.arange(lo, hi, dtype="<u8").view(np.uint8).data)
        for lo, hi in self._windows():
            h.update(self._dense_window(lo, hi)[1].data)
        for lo, hi in self._windows():
            h.update(self._dense_window(lo, hi)[0].data)
        meta = {
            "cbt.magic": MAGIC,
            "cbt.format_version": str(DENSE_VERSION),
            "cbt.kind": "full",
            "cbt.disk_size": str(self.disk_size),
            "cbt.block_size": str(self.block_size),
            "cbt.source": self.source,
            "cbt.created": self.created,
            "cbt.digest_checksum": self.digest_checksum(),
            "cbt.checksum": h.hexdigest(),
        }
        meta.update(self.metadata)
        return meta

    def schema_metadata(self) -> dict[str, str]:
        return self._dense_metadata()

    def to_arrow(self) -> Any:
        """The manifest as a ``pyarrow.Table``, one row per block (the documented export)."""
        digests, flags = self._dense_arrays()
        return _table(np.arange(self.blocks, dtype=np.uint64), digests, flags,
                      self._dense_metadata())

    def to_bytes(self) -> bytes:
        """The vault's file: rows of the non-hole blocks only (format 2; format 1, byte for
        byte as before, when the disk has no hole)."""
        version = DENSE_VERSION if len(self.rows) == self.blocks else FORMAT_VERSION
        meta = {
            "cbt.magic": MAGIC,
            "cbt.format_version": str(version),
            "cbt.kind": "full",
            "cbt.disk_size": str(self.disk_size),
            "cbt.block_size": str(self.block_size),
            "cbt.source": self.source,
            "cbt.created": self.created,
            "cbt.digest_checksum": blake3.blake3(self.row_digests.data).hexdigest(),
            "cbt.checksum": content_checksum("full", self.disk_size, self.block_size,
                                             self.rows, self.row_digests, self.row_flags),
        }
        meta.update(self.metadata)
        return _ipc_bytes(_table(self.rows, self.row_digests, self.row_flags, meta))

    def delta_from(self, base: Manifest) -> Delta:
        """The rows where this manifest differs from ``base`` (a newer point's delta).

        Only blocks either holds are compared (both holes: equal); a block this
        one holds past the end of ``base`` is included; a hole past it is implied.
        """
        n = self.blocks
        k = int(np.searchsorted(base.rows, np.uint64(n)))  # base rows below this disk's end
        if np.array_equal(self.rows, base.rows[:k]):  # the same blocks held (no lookups)
            union, new_d, new_f = self.rows, self.row_digests, self.row_flags
            old_d, old_f = base.row_digests[:k], base.row_flags[:k]
        else:
            union = union_rows(self.rows, base.rows[:k])
            new_d, new_f = self.at(union)
            old_d, old_f = base.at(union)
        differ = np.zeros(len(union), dtype=np.uint8)
        if len(union):
            fast.compare_digests(new_d, old_d, differ)
        rows = np.nonzero(differ.astype(bool) | (new_f != old_f))[0]
        return Delta(self.block_size, self.disk_size, union[rows], new_d[rows], new_f[rows])

    def write(self, path: str | os.PathLike[str], mode: int = 0o666, dense: bool = True) -> None:
        """Durably write the manifest to ``path`` (temporary name, fsync, rename), created
        with ``mode`` less the umask: one row per block, as documented (format 1), written
        in batches (memory follows the batch, not the disk); ``dense=False``: no row for
        a hole (format 2 where there are holes), as a vault keeps it."""
        import pyarrow as pa

        if not dense:
            data = self.to_bytes()

            def write_bytes(f: BinaryIO) -> None:
                f.write(data)

            atomic_write(path, write_bytes, mode)
            return
        meta = self._dense_metadata()

        def write_all(f: BinaryIO) -> None:
            schema = _table(np.zeros(0, np.uint64), np.zeros((0, 32), np.uint8),
                            np.zeros(0, np.uint8), meta).schema
            with pa.ipc.new_file(f, schema) as writer:
                for lo, hi in self._windows():
                    digests, flags = self._dense_window(lo, hi)
                    t = _table(np.arange(lo, hi, dtype=np.uint64), digests, flags, meta)
                    writer.write_table(t, max_chunksize=ROWS_PER_BATCH)

        atomic_write(path, write_all, mode)

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> Manifest:
        """Read and fully check a manifest file."""
        import pyarrow as pa

        p = os.fspath(path)
        try:
            with pa.OSFile(p) as source:  # (batch by batch: not the whole file in memory)
                return cls.from_arrow(pa.ipc.open_file(source), p)
        except FileNotFoundError:
            raise FileNotFoundError(f"no such manifest: {p}") from None
        except (pa.ArrowException, OSError) as exc:
            raise CorruptManifestError(f"corrupt manifest {p}: {exc}") from None

    @classmethod
    def from_arrow(cls, table: Any, where: str = "manifest") -> Manifest:
        """A table (or an open Arrow file, read batch by batch), fully checked."""
        rows = _checked_rows(table, where, "full")
        return cls.sparse(rows.block_size, rows.disk_size, rows.blocks, rows.digests,
                          rows.flags, source=rows.meta.get("cbt.source", ""),
                          created=rows.meta.get("cbt.created", ""),
                          metadata={k: v for k, v in rows.meta.items() if k not in _CORE_KEYS})


def _windows(n: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` windows of ROWS_PER_BATCH rows over ``n``."""
    return [(lo, min(n, lo + ROWS_PER_BATCH)) for lo in range(0, n, ROWS_PER_BATCH)]


def digest_records(digests: npt.NDArray[np.uint8]) -> npt.NDArray[np.void]:
    """An ``(n, 32)`` digest array as ``n`` 32-byte records (a view where it can be)."""
    return np.ascontiguousarray(digests, dtype=np.uint8).view("V32").ravel()


def range_rows(ranges: Sequence[tuple[int, int]]) -> U64:
    """The block numbers of ``[first, end)`` ranges, in order, as one array (no loop per
    range: a tracked disk's reads are thousands of short ranges)."""
    r = np.asarray(ranges, dtype=np.int64).reshape(-1, 2)
    lengths = np.maximum(r[:, 1] - r[:, 0], 0)
    before = np.cumsum(lengths) - lengths  # where each range starts in the output
    out: U64 = (np.repeat(r[:, 0] - before, lengths)
                + np.arange(int(lengths.sum()), dtype=np.int64)).astype(np.uint64)
    return out


def row_runs(rows: npt.NDArray[Any]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The runs of consecutive numbers in the sorted ``rows``: (first of each, end of each)."""
    r = np.asarray(rows).astype(np.int64)
    if not len(r):
        return r, r
    breaks = np.flatnonzero(np.diff(r) != 1) + 1
    return r[np.r_[0, breaks]], r[np.r_[breaks - 1, len(r) - 1]] + 1


def union_rows(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> U64:
    """The sorted union of two ascending arrays of block numbers (a merge, not a hash:
    ``np.union1d`` takes a second for a million rows)."""
    both = np.concatenate([np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64)])
    if len(a) == 0 or len(b) == 0:
        return both
    both.sort(kind="stable")  # two sorted runs: merged in one pass
    keep = np.ones(len(both), dtype=bool)
    keep[1:] = both[1:] != both[:-1]
    out: U64 = both[keep]
    return out


@dataclass
class _Rows:
    meta: dict[str, str]
    version: int
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


class _Batches(NamedTuple):
    """The record batches of an Arrow file (read one at a time) or table."""

    schema: Any
    batches: int
    get: Callable[[int], Any]


def _batches(source: Any) -> _Batches:
    """A ``RecordBatchFileReader`` (each batch read when asked) or a table's batches."""
    if hasattr(source, "get_batch"):
        return _Batches(source.schema, source.num_record_batches, source.get_batch)
    batches = source.to_batches()
    return _Batches(source.schema, len(batches), batches.__getitem__)


def _checked_rows(source: Any, where: str, kind: str) -> _Rows:
    """Every check a manifest or delta must pass before a single row is believed.

    Batch by batch: memory follows one batch and the rows kept (a full
    manifest's HOLE rows, which only format 1 has, are dropped), not the file.
    """
    import pyarrow as pa

    def bad(why: str) -> CorruptManifestError:
        return CorruptManifestError(f"corrupt manifest {where}: {why}")

    src = _batches(source)
    meta, version, disk_size, block_size = _checked_meta(src, where, kind)
    try:
        rows = _checked_batches(src, version, kind, disk_size, block_size, meta, bad)
    except CorruptManifestError:  # (a ValueError already naming the file: not named twice)
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise bad(str(exc)) from None
    return rows


def _checked_meta(src: _Batches, where: str, kind: str
                  ) -> tuple[dict[str, str], int, int, int]:
    """The schema's metadata and columns: (metadata, version, disk size, block size)."""
    import pyarrow as pa

    schema = src.schema
    def bad(why: str) -> CorruptManifestError:
        return CorruptManifestError(f"corrupt manifest {where}: {why}")

    meta = schema_metadata(src, where)
    if meta.get("cbt.magic") != MAGIC:
        raise bad("not a cbt manifest (no cbt.magic)")
    try:
        version = int(meta["cbt.format_version"])
        disk_size = int(meta["cbt.disk_size"])
        block_size = int(meta["cbt.block_size"])
        if "cbt.digest_checksum" not in meta:
            raise KeyError("cbt.digest_checksum")
    except (KeyError, ValueError) as exc:
        raise bad(f"missing or malformed metadata {exc}") from None
    if version < DENSE_VERSION:
        raise bad(f"format version {version} is not one cbt ever wrote")
    if version > FORMAT_VERSION:
        raise bad(f"format version {version} is newer than this cbt reads "
                  f"({FORMAT_VERSION}); upgrade cbt")
    if meta.get("cbt.kind", "full") != kind:
        raise bad(f"a {meta.get('cbt.kind')} manifest where a {kind} one belongs")
    if not 0 <= disk_size < MAX_DISK_SIZE:  # (a point record's bound: nblocks is an ssize_t)
        raise bad(f"disk size {disk_size} is not from 0 to 2**63")
    try:
        fast.check_block_size(block_size)
    except ValueError:
        raise bad(f"invalid block size {block_size}") from None
    expected = {"block": pa.uint64(), "digest": pa.binary(fast.DIGEST_SIZE), "flags": pa.uint8()}
    for name, typ in expected.items():
        if name not in schema.names or schema.field(name).type != typ:
            raise bad(f"column {name!r} missing or not {typ}")
    if "cbt.checksum" not in meta:
        raise bad("no cbt.checksum")
    return meta, version, disk_size, block_size


def _batch_columns(batch: Any) -> tuple[U64, npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """A batch's block, flags and digest columns as numpy views (nulls: ValueError)."""
    for name in ("block", "digest", "flags"):
        if batch.column(name).null_count:
            raise ValueError(f"column {name!r} has nulls")
    n = batch.num_rows
    return (from_arrow(batch.column("block"), np.uint64),
            from_arrow(batch.column("flags"), np.uint8),
            _digest_array(batch.column("digest"), n))


def _checked_batches(src: _Batches, version: int, kind: str, disk_size: int, block_size: int,
                     meta: dict[str, str],
                     bad: Callable[[str], CorruptManifestError]) -> _Rows:
    """The rows of every batch, checked; then both checksums (three passes: the content
    checksum is of every block number, then every flag, then every digest)."""
    n = fast.nblocks(disk_size, block_size)
    dense = version == DENSE_VERSION and kind == "full"
    drop_holes = kind == "full"
    digest_sum = blake3.blake3()
    content = blake3.blake3(f"{kind}:{disk_size}:{block_size}:".encode())
    kept: list[tuple[U64, npt.NDArray[np.uint8], npt.NDArray[np.uint8]]] = []
    pos, last = 0, -1
    for i in range(src.batches):
        blocks, flags, digests = _batch_columns(src.get(i))
        k = len(blocks)
        if k == 0:
            continue
        if int(flags.max()) > HOLE:
            raise bad("unknown block flag")
        is_data, has_digest = flags == DATA, digests.any(axis=1)
        if (has_digest & ~is_data).any():
            raise bad("a ZERO or HOLE block has a digest")
        if (is_data & ~has_digest).any():
            raise bad("a DATA block has no digest")
        if dense:
            if pos + k > n or not np.array_equal(blocks, np.arange(pos, pos + k,
                                                                     dtype=np.uint64)):
                raise bad(f"rows are not blocks 0..{n - 1} of a {disk_size}-byte disk")
        elif (int(blocks[0]) <= last or int(blocks[-1]) >= n
              or (k > 1 and bool((blocks[1:] <= blocks[:-1]).any()))):
            raise bad("block rows out of range or not ascending")
        elif drop_holes and (flags == HOLE).any():
            raise bad("a HOLE row in a manifest of format 2 (holes have no rows)")
        digest_sum.update(np.ascontiguousarray(digests).data)
        content.update(np.ascontiguousarray(blocks, dtype="<u8").view(np.uint8).data)
        keep = flags != HOLE if drop_holes else slice(None)
        kept.append((blocks[keep].copy(), digests[keep].copy(), flags[keep].copy()))
        pos, last = pos + k, int(blocks[-1])
    if dense and pos != n:
        raise bad(f"rows are not blocks 0..{n - 1} of a {disk_size}-byte disk")
    if digest_sum.hexdigest() != meta["cbt.digest_checksum"]:
        raise bad("digest checksum mismatch (the file was altered or damaged)")
    for column in (1, 2):  # every flag, then every digest
        for i in range(src.batches):
            part = _batch_columns(src.get(i))[column]
            content.update(np.ascontiguousarray(part).data)
    if content.hexdigest() != meta["cbt.checksum"]:
        raise bad("checksum mismatch (the file was altered or damaged)")
    return _Rows(meta, version, disk_size, block_size,
                 np.concatenate([b for b, _, _ in kept]) if kept else np.zeros(0, np.uint64),
                 np.concatenate([d for _, d, _ in kept]) if kept
                 else np.zeros((0, fast.DIGEST_SIZE), np.uint8),
                 np.concatenate([f for _, _, f in kept]) if kept else np.zeros(0, np.uint8))


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

    col = column.combine_chunks() if hasattr(column, "combine_chunks") else column
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

    def data_rows(self) -> tuple[U64, npt.NDArray[np.uint8]]:
        """Block numbers and digests of the DATA rows (as :meth:`Manifest.data_rows`)."""
        is_data = self.flags == DATA
        return self.rows[is_data], self.digests[is_data]

    def to_bytes(self) -> bytes:
        # (format 1: a delta's rows mean the same in both; a hole past the base's end
        # it omits is a hole to format 1's reader too)
        meta = {
            "cbt.magic": MAGIC,
            "cbt.format_version": str(DENSE_VERSION),
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
        """The full manifest this delta describes on top of ``base``: the delta's rows
        replace the base's; a block past the base's end that the delta omits is a hole."""
        n = fast.nblocks(self.disk_size, self.block_size)
        keep = base.rows < n
        b_rows = base.rows[keep]
        if len(self.rows) and len(b_rows):
            pos = np.minimum(np.searchsorted(self.rows, b_rows), len(self.rows) - 1)
            keep_base = self.rows[pos] != b_rows
        else:
            keep_base = np.ones(len(b_rows), dtype=bool)
        rows = np.concatenate([b_rows[keep_base], self.rows])
        taken = np.flatnonzero(keep)[keep_base]  # (digests moved as 32-byte records)
        digests = np.concatenate([digest_records(base.row_digests)[taken],
                                  digest_records(self.digests)])
        flags = np.concatenate([base.row_flags[taken], self.flags])
        order = np.argsort(rows, kind="stable")
        return Manifest.sparse(self.block_size, self.disk_size, rows[order],
                               digests[order].view(np.uint8).reshape(-1, fast.DIGEST_SIZE),
                               flags[order], metadata=dict(self.metadata))

    @classmethod
    def from_arrow(cls, table: Any, where: str) -> Delta:
        rows = _checked_rows(table, where, "delta")
        return cls(rows.block_size, rows.disk_size, rows.blocks, rows.digests, rows.flags,
                   {k: v for k, v in rows.meta.items() if k not in _CORE_KEYS})


def read_manifest_bytes(data: bytes, where: str) -> Manifest | Delta:
    """A full manifest or a delta, by its ``cbt.kind``, fully checked."""
    import pyarrow as pa

    try:
        reader = pa.ipc.open_file(pa.py_buffer(data))
    except (pa.ArrowException, OSError) as exc:
        raise CorruptManifestError(f"corrupt manifest {where}: {exc}") from None
    kind = (reader.schema.metadata or {}).get(b"cbt.kind", b"full")
    if kind == b"delta":
        return Delta.from_arrow(reader, where)
    return Manifest.from_arrow(reader, where)


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
