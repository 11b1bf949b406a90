"""Manifests: the Arrow IPC format, its round trip, and corruption detection.

The format is checked with plain pyarrow (any Arrow tool must read it), and
every kind of damage must end in ``CorruptManifestError``, never in a silently
different manifest nor in another exception (which the CLI would turn into a
traceback).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pyarrow as pa
import pytest
from helpers import PAGE
from helpers.images import SparseImage
from helpers.system import need
from helpers.truth import DATA, HOLE, ZERO, fs_has_page_holes, truth_hash

import cbt
from cbt.format.manifest import Manifest

META_KEYS = {"cbt.magic", "cbt.format_version", "cbt.disk_size", "cbt.block_size",
             "cbt.source", "cbt.created", "cbt.digest_checksum"}
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


@pytest.fixture
def image(tmp_path: Path) -> SparseImage:
    """Six 4K blocks and a 100-byte tail: data, zero, data, hole, data, data, data."""
    need(fs_has_page_holes(tmp_path), f"no 4 KiB holes on the file system of {tmp_path}")
    img = SparseImage(tmp_path / "disk.img", 6 * PAGE + 100)
    img.write_random(0, 2 * PAGE, seed=1)
    img.write(PAGE, bytes(PAGE))
    img.write_random(2 * PAGE, PAGE, seed=2)
    img.write_random(4 * PAGE, 2 * PAGE + 100, seed=3)
    return img


@pytest.fixture
def manifest_file(image: SparseImage, tmp_path: Path) -> tuple[Manifest, Path]:
    m = cbt.scan(image.path, PAGE, workers=1)
    assert m.flags.tolist() == [DATA, ZERO, DATA, HOLE, DATA, DATA, DATA]
    path = tmp_path / "disk.arrow"
    m.write(path)
    return m, path


def same_content(a: Manifest, b: Manifest) -> bool:
    return (a.block_size == b.block_size and a.disk_size == b.disk_size
            and np.array_equal(a.flags, b.flags) and np.array_equal(a.digests, b.digests))


# -- the format -------------------------------------------------------------------


def test_roundtrip(manifest_file: tuple[Manifest, Path], image: SparseImage) -> None:
    m, path = manifest_file
    r = Manifest.read(path)
    assert same_content(r, m)
    assert (r.source, r.created) == (m.source, m.created)
    assert r.source == str(image.path.absolute())
    assert RFC3339_UTC.match(r.created)
    digests, flags, _ = image.expected(PAGE)
    assert np.array_equal(r.digests, digests)
    assert np.array_equal(r.flags, flags)
    assert r.digests.shape == (7, 32) and r.digests.dtype == np.uint8
    assert r.flags.dtype == np.uint8


def test_readable_with_plain_pyarrow(manifest_file: tuple[Manifest, Path],
                                     image: SparseImage) -> None:
    _, path = manifest_file
    with pa.OSFile(str(path), "rb") as f:
        table = pa.ipc.open_file(f).read_all()
    schema = table.schema
    assert [(fld.name, fld.type) for fld in schema] == [
        ("block", pa.uint64()), ("digest", pa.binary(32)), ("flags", pa.uint8())]
    assert schema.field("digest").type == pa.binary(32)  # fixed_size_binary(32)
    meta = {k.decode(): v.decode() for k, v in schema.metadata.items()}
    assert set(meta) >= META_KEYS
    assert meta["cbt.magic"] == "cbt-manifest"
    assert meta["cbt.format_version"] == "1"
    assert meta["cbt.disk_size"] == str(image.size)
    assert meta["cbt.block_size"] == str(PAGE)
    assert meta["cbt.source"] == str(image.path.absolute())
    assert RFC3339_UTC.match(meta["cbt.created"])
    assert table.column("block").to_pylist() == list(range(7))
    assert table.column("flags").to_pylist() == [0, 1, 0, 2, 0, 0, 0]
    digest_bytes = b"".join(table.column("digest").to_pylist())
    want_digests, _ = truth_hash(image.content, PAGE)
    assert digest_bytes == want_digests.tobytes()
    assert meta["cbt.digest_checksum"] == blake3.blake3(digest_bytes).hexdigest()
    assert table.column("digest").null_count == 0


def test_to_arrow_is_what_is_written(manifest_file: tuple[Manifest, Path]) -> None:
    m, path = manifest_file
    written = pa.ipc.open_file(str(path)).read_all()
    table = m.to_arrow()
    assert table.equals(written)
    assert table.schema.metadata == written.schema.metadata


def test_write_leaves_only_the_manifest(manifest_file: tuple[Manifest, Path]) -> None:
    m, path = manifest_file
    assert sorted(p.name for p in path.parent.iterdir()) == ["disk.arrow", "disk.img"]
    m.write(path)  # over an existing manifest: replaced, nothing left behind
    assert sorted(p.name for p in path.parent.iterdir()) == ["disk.arrow", "disk.img"]
    assert same_content(Manifest.read(path), m)


def test_write_into_missing_directory_fails_cleanly(tmp_path: Path) -> None:
    m = Manifest(PAGE, 0, np.zeros((0, 32), np.uint8), np.zeros(0, np.uint8))
    with pytest.raises(OSError):
        m.write(tmp_path / "nope" / "m.arrow")
    assert list(tmp_path.iterdir()) == []


def test_empty_disk_roundtrip(tmp_path: Path) -> None:
    (tmp_path / "empty.img").write_bytes(b"")
    m = cbt.scan(tmp_path / "empty.img", PAGE)
    assert (m.blocks, m.disk_size) == (0, 0)
    m.write(tmp_path / "e.arrow")
    r = Manifest.read(tmp_path / "e.arrow")
    assert (r.blocks, r.disk_size, r.digests.shape) == (0, 0, (0, 32))
    assert pa.ipc.open_file(str(tmp_path / "e.arrow")).read_all().num_rows == 0


@pytest.mark.slow
def test_many_rows_roundtrip(tmp_path: Path) -> None:
    """More rows than one record batch holds: several batches, read back whole."""
    n = (1 << 20) + 3
    rng = np.random.default_rng(5)
    flags = rng.choice(np.array([DATA, ZERO, HOLE], np.uint8), size=n, p=[0.8, 0.1, 0.1])
    digests = rng.integers(0, 256, size=(n, 32), dtype=np.uint8)
    digests[flags != DATA] = 0
    m = Manifest(PAGE, n * PAGE - 100, digests, flags, source="/dev/fake", created="x")
    path = tmp_path / "big.arrow"
    m.write(path)
    reader = pa.ipc.open_file(str(path))
    assert reader.num_record_batches > 1
    r = Manifest.read(path)
    assert same_content(r, m)
    assert r.digest_checksum() == blake3.blake3(digests.tobytes()).hexdigest()


# -- damage -------------------------------------------------------------------------


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Manifest.read(tmp_path / "missing.arrow")


@pytest.mark.parametrize("keep", [0, 6, 8, 64, "half", -12, -1])
def test_truncated(manifest_file: tuple[Manifest, Path], tmp_path: Path,
                   keep: int | str) -> None:
    _, path = manifest_file
    raw = path.read_bytes()
    cut = len(raw) // 2 if keep == "half" else int(keep) % len(raw)
    bad = tmp_path / "bad.arrow"
    bad.write_bytes(raw[:cut])
    with pytest.raises(cbt.CorruptManifestError, match=re.escape(str(bad))):
        Manifest.read(bad)


@pytest.mark.parametrize("row", [0, 2, 6])
def test_flipped_digest_byte(manifest_file: tuple[Manifest, Path], tmp_path: Path,
                             row: int) -> None:
    m, path = manifest_file
    raw = bytearray(path.read_bytes())
    at = bytes(raw).index(m.digests[row].tobytes()) + 17
    raw[at] ^= 0x01
    bad = tmp_path / "bad.arrow"
    bad.write_bytes(raw)
    with pytest.raises(cbt.CorruptManifestError, match="checksum"):
        Manifest.read(bad)


def _meta(**changes: str | None) -> Callable[[pa.Table], pa.Table]:
    def apply(t: pa.Table) -> pa.Table:
        meta = dict(t.schema.metadata)
        for key, value in changes.items():
            k = ("cbt." + key).encode()
            if value is None:
                meta.pop(k)
            else:
                meta[k] = value.encode("latin-1")
        return t.replace_schema_metadata(meta)
    return apply


def _column(name: str, values: Any) -> Callable[[pa.Table], pa.Table]:
    def apply(t: pa.Table) -> pa.Table:
        arr = values(t) if callable(values) else values
        return t.set_column(t.column_names.index(name), name, arr).replace_schema_metadata(
            t.schema.metadata)
    return apply


def _flags(t: pa.Table, at: int, value: int | None) -> pa.Array:
    flags: list[int | None] = t.column("flags").to_pylist()
    flags[at] = value
    return pa.array(flags, pa.uint8())


def _both(*steps: Callable[[pa.Table], pa.Table]) -> Callable[[pa.Table], pa.Table]:
    def apply(t: pa.Table) -> pa.Table:
        for step in steps:
            t = step(t)
        return t
    return apply


def _digest_variable(t: pa.Table) -> pa.Array:
    return pa.array(t.column("digest").to_pylist(), pa.binary())


ALTERATIONS: dict[str, Callable[[pa.Table], pa.Table]] = {
    "magic-changed": _meta(magic="cbt-manifesto"),
    "magic-missing": _meta(magic=None),
    "newer-format": _meta(format_version="3"),
    "format-zero": _meta(format_version="0"),
    "format-garbage": _meta(format_version="one"),
    "block-size-not-power-of-two": _meta(block_size="5000"),
    "block-size-other": _meta(block_size="8192"),
    "block-size-missing": _meta(block_size=None),
    "disk-size-more-blocks": _meta(disk_size=str(8 * PAGE)),
    "disk-size-negative": _meta(disk_size="-1"),
    "disk-size-same-block-count": _meta(disk_size=str(6 * PAGE + 99)),
    "checksum-changed": _meta(digest_checksum="0" * 64),
    "checksum-missing": _meta(digest_checksum=None),
    "checksum-of-everything-changed": _meta(checksum="0" * 64),
    "kind-delta": _meta(kind="delta"),
    "kind-unknown": _meta(kind="partial"),
    # Dropping the whole-content checksum must not switch its checks off.
    "no-checksum-of-everything-and-disk-size-altered": _both(
        _meta(checksum=None), _meta(disk_size=str(6 * PAGE + 99))),
    "no-checksum-of-everything-and-flags-altered": _both(
        _meta(checksum=None), _column("flags", lambda t: _flags(t, 1, DATA))),
    "source-not-utf8": _meta(source="\xff\xfe/disk.img"),
    "flags-data-to-zero": _column("flags", lambda t: _flags(t, 2, ZERO)),
    "flags-zero-to-data": _column("flags", lambda t: _flags(t, 1, DATA)),
    "flags-null": _column("flags", lambda t: _flags(t, 0, None)),
    "flags-unknown": _column("flags", lambda t: _flags(t, 0, 3)),
    "block-reversed": _column("block", pa.array(list(range(6, -1, -1)), pa.uint64())),
    "block-type": _column("block", pa.array(list(range(7)), pa.int64())),
    "digest-variable-binary": _column("digest", _digest_variable),
    "flags-missing": lambda t: t.drop_columns(["flags"]).replace_schema_metadata(
        t.schema.metadata),
}


@pytest.mark.parametrize("alteration", list(ALTERATIONS))
def test_altered_manifest(manifest_file: tuple[Manifest, Path], tmp_path: Path,
                          alteration: str) -> None:
    _, path = manifest_file
    table = pa.ipc.open_file(str(path)).read_all()
    table = ALTERATIONS[alteration](table)
    bad = tmp_path / "altered.arrow"
    with pa.OSFile(str(bad), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    with pytest.raises(cbt.CorruptManifestError) as info:
        Manifest.read(bad)
    assert str(bad) in str(info.value)
    assert "\n" not in str(info.value)


# -- every single-byte flip ----------------------------------------------------------


@pytest.fixture(scope="module")
def flip_outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[int, str]:
    """Flip each byte of a small manifest in turn and record what reading it does."""
    d = tmp_path_factory.mktemp("flips")
    data = np.random.default_rng(9).integers(1, 256, size=5 * PAGE + 100, dtype=np.uint8)
    data[PAGE:2 * PAGE] = 0
    (d / "disk.img").write_bytes(data.tobytes())
    m = cbt.scan(d / "disk.img", PAGE, workers=1)
    m.write(d / "m.arrow")
    raw = (d / "m.arrow").read_bytes()
    bad = d / "bad.arrow"
    outcomes: dict[int, str] = {}
    for i in range(len(raw)):
        flipped = bytearray(raw)
        flipped[i] ^= 0x01
        bad.write_bytes(flipped)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = Manifest.read(bad)
        except cbt.CorruptManifestError:
            outcomes[i] = "corrupt"
        except Exception as exc:
            outcomes[i] = f"{type(exc).__name__}: {str(exc)[:80]}"
        else:
            outcomes[i] = "same" if same_content(r, m) else (
                f"silently different: disk_size {r.disk_size} flags {r.flags.tolist()}")
    return outcomes


@pytest.mark.slow
def test_flipped_byte_raises_nothing_but_corrupt_manifest_error(
        flip_outcomes: dict[int, str]) -> None:
    others = {i: o for i, o in flip_outcomes.items()
              if o not in ("corrupt", "same") and not o.startswith("silently")}
    assert not others, f"{len(others)} flipped bytes raise other errors: {others}"


def test_flipped_byte_never_reads_as_a_different_manifest(
        flip_outcomes: dict[int, str]) -> None:
    wrong = {i: o for i, o in flip_outcomes.items() if o.startswith("silently")}
    assert not wrong, f"{len(wrong)} flipped bytes read as a different manifest: {wrong}"
    assert list(flip_outcomes.values()).count("corrupt") > len(flip_outcomes) // 4
