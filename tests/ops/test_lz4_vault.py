"""A vault of ``cbt init --compression lz4``: format 4, every new block an lz4 block (or
raw), restored, mounted-for-reading paths, verified and copied like zstd's.

Truth: the disks' own bytes, pyarrow's ``lz4_raw`` and ``zstd`` codecs reading the packs
(``helpers.packs.walk_pack``: not the ``lz4`` package cbt writes with), and the config
file as JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import KIB, MIB
from helpers.cli import cbt, cbt_json, one_error_line
from helpers.images import fs_image, write_at
from helpers.packs import pack_files, walk_pack
from helpers.vaults import PASSWORD, fast_kdf, verify_data_clean

import cbt as cbt_api
from cbt.ops.copy import copy

BS = 16 * KIB
SIZE = 4 * MIB


def _codecs(vault: Path) -> set[int]:
    return {b.codec for p in pack_files(vault) for b in walk_pack(p)}


def _two_points(tmp_path: Path, vault: Path) -> tuple[list[str], list[bytes]]:
    """A full and an incremental backup of one fs-like disk; the points and the disk's
    bytes at each."""
    disk = fs_image(tmp_path / "d.img", SIZE, seed=7)
    truth, points = [], []
    for day in range(2):
        if day:
            write_at(disk, 5 * BS + 100, b"changed text " * 3000)
        truth.append(disk.read_bytes())
        out = cbt_json("backup", vault, "--vm", "vm", "--block-size", "16K", f"d={disk}")
        points.append(out["recovery_point"])
    return points, truth


def test_init_makes_format_4_and_backups_store_lz4_blocks_that_restore(tmp_path: Path) -> None:
    vault = tmp_path / "v"
    got = cbt_json("init", "--encryption", "none", "--compression", "lz4", vault)
    assert (got["format_version"], got["compression"]) == (4, "lz4")
    config = json.loads((vault / "config").read_text())
    assert (config["format_version"], config["compression"]) == (4, "lz4")
    points, truth = _two_points(tmp_path, vault)
    assert _codecs(vault) == {0, 2}  # (the image's random extents stay raw)
    for point, want in zip(points, truth, strict=True):
        for workers in ("1", "2"):
            out = tmp_path / f"out-{point}-{workers}"
            cbt_json("restore", vault, point, "--to", out, "--workers", workers)
            assert (out / "d.img").read_bytes() == want
    verify_data_clean(vault)


def test_the_default_stays_zstd_at_format_3(tmp_path: Path) -> None:
    vault = tmp_path / "v"
    got = cbt_json("init", "--encryption", "none", vault)
    assert (got["format_version"], got["compression"]) == (3, "zstd")
    _two_points(tmp_path, vault)
    assert _codecs(vault) == {0, 1}


def test_an_encrypted_lz4_vault_restores_and_verifies(tmp_path: Path) -> None:
    v = cbt_api.Vault.init(tmp_path / "v", encryption="aes-256-gcm", passphrase=PASSWORD,
                           kdf=fast_kdf(), compression="lz4")
    assert v.config["format_version"] == 4
    disk = fs_image(tmp_path / "d.img", SIZE, seed=11)
    v.backup("vm", [f"d={disk}"], block_size=BS)
    (point,) = [p.id for p in v.points()]
    v.restore(point, tmp_path / "out", workers=2)
    assert (tmp_path / "out" / "d.img").read_bytes() == disk.read_bytes()
    assert v.verify(data=True).problems == []


def test_copy_stores_blocks_with_the_destinations_codec(tmp_path: Path) -> None:
    """lz4 -> zstd and back: each destination holds only its own codec (and raw), and
    restores the same bytes; the zstd one stays format 3."""
    lz = tmp_path / "lz"
    cbt_json("init", "--encryption", "none", "--compression", "lz4", lz)
    points, truth = _two_points(tmp_path, lz)
    zs = cbt_api.Vault.init(tmp_path / "zs")
    copy(cbt_api.Vault.open(lz), zs)
    assert _codecs(tmp_path / "zs") == {0, 1}
    assert json.loads((tmp_path / "zs" / "config").read_text())["format_version"] == 3
    back = cbt_api.Vault.init(tmp_path / "back", compression="lz4")
    copy(zs, back)
    assert _codecs(tmp_path / "back") == {0, 2}
    for v in (zs, back):
        v.restore(points[1], tmp_path / f"out-{v.root[-2:]}", workers=1)
        assert (tmp_path / f"out-{v.root[-2:]}" / "d.img").read_bytes() == truth[1]


@pytest.mark.parametrize(("edit", "why"), [
    ({"compression": "lz4"}, "config names compression 'lz4' at format version 3"),
    ({"compression": "brotli"}, "config names compression 'brotli'"),
    ({"format_version": 4}, "config names compression 'zstd' at format version 4"),
    ({"compression": ["lz4"]}, "config names compression ['lz4']"),
])
def test_a_config_whose_compression_and_format_disagree_is_refused(
        tmp_path: Path, edit: dict[str, object], why: str) -> None:
    """A format-3 config that says lz4 would have lz4 blocks written where a cbt before
    lz4 reads them as damage; an unknown codec is refused before anything is read."""
    vault = tmp_path / "v"
    cbt_json("init", "--encryption", "none", vault)
    config = json.loads((vault / "config").read_text())
    (vault / "config").write_text(json.dumps({**config, **edit}))
    line = one_error_line(cbt("list", vault))
    assert why in line and str(vault) in line, line


def test_a_vault_without_a_compression_key_is_zstd(tmp_path: Path) -> None:
    """Vaults made before the choice have no ``compression``: they are zstd's."""
    vault = tmp_path / "v"
    cbt_json("init", "--encryption", "none", vault)
    config = json.loads((vault / "config").read_text())
    del config["compression"]
    (vault / "config").write_text(json.dumps(config))
    assert cbt_api.Vault.open(vault).codec == 1
    _two_points(tmp_path, vault)
    assert _codecs(vault) == {0, 1}


def test_an_unknown_compression_is_one_line_and_makes_nothing(tmp_path: Path) -> None:
    r = cbt("init", "--encryption", "none", "--compression", "brotli", tmp_path / "v")
    assert r.returncode == 2 and "invalid choice: 'brotli'" in r.stderr
    assert not (tmp_path / "v").exists()
    with pytest.raises(cbt_api.CbtError, match="unknown compression 'brotli'"):
        cbt_api.Vault.init(tmp_path / "w", compression="brotli")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("version", ["4", 4.5, True, None], ids=["string", "float", "bool",
                                                                   "null"])
@pytest.mark.parametrize("compression", ["zstd", "lz4"])
def test_a_format_version_that_is_not_an_integer_is_a_damaged_config(
        tmp_path: Path, compression: str, version: object) -> None:
    """cbt writes the format version as a JSON integer: "4" or 4.5 at lz4, or true at zstd
    (taken for format 1 before), is a config someone altered, refused as damaged by name
    and read no further."""
    vault = tmp_path / "v"
    cbt_json("init", "--encryption", "none", "--compression", compression, vault)
    config = json.loads((vault / "config").read_text())
    (vault / "config").write_text(json.dumps({**config, "format_version": version}))
    line = one_error_line(cbt("list", vault))
    assert f"its config {vault / 'config'} is damaged" in line, line
    assert f"format_version {version!r} is not an integer" in line, line
