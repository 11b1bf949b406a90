"""Index segments: the on-disk layout of the vault index (``index/<run>.arrow``).

An Arrow IPC file, one row per stored blob, sorted by the digest's first 8
bytes (so loading many segments is a merge of sorted runs, not a sort):
``digest`` fixed_size_binary(32), ``pack`` fixed_size_binary(16) (the pack's
uuid), ``offset`` uint64, ``stored`` and ``raw`` uint32.  Schema metadata:
``cbt.magic`` (``cbt-index``), ``cbt.format_version``, ``cbt.checksum`` (BLAKE3
of every column's bytes), verified by every reader.
"""

from __future__ import annotations

from typing import Any

import blake3
import numpy as np
import numpy.typing as npt

from cbt.core.errors import CbtError
from cbt.format.manifest import from_arrow, schema_metadata, to_arrow

# Do not modify: identifies every index segment ever written.
INDEX_MAGIC = "cbt-index"
INDEX_VERSION = 1


class CorruptIndexError(CbtError, ValueError):
    """An index segment fails its checks."""


def prefix_keys(digests: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint64]:
    """The first 8 bytes of each digest as a big-endian integer (sort order = byte order)."""
    if len(digests) == 0:
        return np.zeros(0, dtype=np.uint64)
    return np.ascontiguousarray(digests[:, :8]).view(">u8").ravel().astype(np.uint64)


def segment_bytes(entries: dict[str, Any]) -> bytes:
    """Serialise entries (digests, pack uuid bytes, offset, stored, raw) as a segment."""
    import pyarrow as pa

    n = len(entries["offset"])
    digests = np.ascontiguousarray(entries["digests"], dtype=np.uint8).reshape(n, 32)
    # sorted by digest prefix, so that loading many segments is a merge, not a sort
    order = np.argsort(prefix_keys(digests), kind="stable")
    digests = digests[order]
    packs = np.ascontiguousarray(entries["pack_uuid"], dtype=np.uint8).reshape(n, 16)[order]
    offset = np.asarray(entries["offset"], dtype=np.uint64)[order]
    stored = np.asarray(entries["stored"], dtype=np.uint32)[order]
    raw = np.asarray(entries["raw"], dtype=np.uint32)[order]
    table = pa.table({
        "digest": pa.FixedSizeBinaryArray.from_buffers(pa.binary(32), n,
                                                       [None, pa.py_buffer(digests)]),
        "pack": pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), n,
                                                     [None, pa.py_buffer(packs)]),
        "offset": to_arrow(offset),
        "stored": to_arrow(stored),
        "raw": to_arrow(raw),
    })
    meta = {"cbt.magic": INDEX_MAGIC, "cbt.format_version": str(INDEX_VERSION),
            "cbt.checksum": _checksum(digests, packs, offset, stored, raw)}
    table = table.replace_schema_metadata(meta)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()  # type: ignore[no-any-return]


def _checksum(*arrays: npt.NDArray[Any]) -> str:
    h = blake3.blake3()
    for a in arrays:
        h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def read_segment(data: bytes, where: str) -> dict[str, Any]:
    import pyarrow as pa

    try:
        table = pa.ipc.open_file(pa.py_buffer(data)).read_all()
    except (pa.ArrowException, OSError) as exc:
        raise CorruptIndexError(f"corrupt index segment {where}: {exc}") from None
    try:
        meta = schema_metadata(table, where)
    except CbtError as exc:
        raise CorruptIndexError(str(exc)) from None
    if meta.get("cbt.magic") != INDEX_MAGIC:
        raise CorruptIndexError(f"corrupt index segment {where}: not a cbt index")
    try:
        version = int(meta.get("cbt.format_version", "0"))
    except ValueError:
        raise CorruptIndexError(f"corrupt index segment {where}: format version is not an "
                                "integer") from None
    if version > INDEX_VERSION:
        raise CorruptIndexError(f"index segment {where} is from a newer cbt")
    n = table.num_rows

    def fsb(name: str, width: int) -> npt.NDArray[np.uint8]:
        col = table.column(name).combine_chunks()
        if n == 0:
            return np.zeros((0, width), dtype=np.uint8)
        flat = np.frombuffer(col.buffers()[1], dtype=np.uint8)
        return flat[col.offset * width:(col.offset + n) * width].reshape(n, width)

    try:
        digests, packs = fsb("digest", 32), fsb("pack", 16)
        offset = from_arrow(table.column("offset"), np.uint64)
        stored = from_arrow(table.column("stored"), np.uint32)
        raw = from_arrow(table.column("raw"), np.uint32)
    except (KeyError, ValueError, pa.ArrowException) as exc:
        raise CorruptIndexError(f"corrupt index segment {where}: {exc}") from None
    if _checksum(digests, packs, offset, stored, raw) != meta.get("cbt.checksum"):
        raise CorruptIndexError(f"corrupt index segment {where}: checksum mismatch")
    return {
        "digests": digests,
        "packs": packs,
        "offset": offset,
        "stored": stored,
        "raw": raw,
    }
