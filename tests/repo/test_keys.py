"""An encrypted vault's keys: creation, unlocking, passphrase sources, key slots, and a
config or key slot altered by someone with write access to the vault."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import blake3
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cbt.core.crypto import KdfParams
from cbt.repo.keys import (
    BadKeySlotError,
    PassphraseRequiredError,
    WrongPassphraseError,
    passphrase_from_env,
    read_password_file,
)
from cbt.repo.vault import Vault, VaultVersionError

FAST = KdfParams(log_n=10)  # cheap for tests; the default costs ~0.4 s and 128 MiB


def make(tmp_path: Path, pw: str = "correct horse") -> Vault:
    return Vault.init(tmp_path / "v", encryption="aes-256-gcm", passphrase=pw, kdf=FAST)


def test_encrypted_vault_opens_with_its_passphrase_only(tmp_path: Path) -> None:
    v = make(tmp_path)
    assert v.encrypted and v.config["format_version"] == 3
    again = Vault.open(tmp_path / "v", passphrase="correct horse")
    assert again.keys is not None and v.keys is not None
    assert again.keys.master == v.keys.master
    with pytest.raises(WrongPassphraseError, match="wrong passphrase"):
        Vault.open(tmp_path / "v", passphrase="Correct horse")


def test_no_passphrase_anywhere_is_a_clear_error(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    make(tmp_path)
    monkeypatch.delenv("CBT_PASSWORD", raising=False)
    monkeypatch.delenv("CBT_PASSWORD_FILE", raising=False)
    with pytest.raises(PassphraseRequiredError, match="--password-file"):
        Vault.open(tmp_path / "v")
    monkeypatch.setenv("CBT_PASSWORD", "correct horse")
    assert Vault.open(tmp_path / "v").encrypted


def test_passphrase_sources_in_order(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    f.write_bytes(b"from file\r\nsecond line\n")
    assert read_password_file(f) == b"from file"
    assert passphrase_from_env({"CBT_PASSWORD_FILE": str(f), "CBT_PASSWORD": "x"}) == b"from file"
    assert passphrase_from_env({"CBT_PASSWORD": "x"}) == b"x"
    assert passphrase_from_env({}) is None
    f.write_bytes(b"\n")
    with pytest.raises(ValueError, match="empty"):
        read_password_file(f)


def test_unencrypted_vault_ignores_any_passphrase(tmp_path: Path) -> None:
    Vault.init(tmp_path / "v")
    v = Vault.open(tmp_path / "v", passphrase=lambda: pytest.fail("asked for a passphrase"))
    assert not v.encrypted
    assert json.loads((tmp_path / "v" / "config").read_bytes())["format_version"] == 3


def test_key_slots_add_remove_and_the_last_stays(tmp_path: Path) -> None:
    v = make(tmp_path)
    first = v.key_slots()[0].id
    second = v.add_key(b"second pass", FAST)
    assert {k.id for k in v.key_slots()} == {first, second.id}
    assert Vault.open(tmp_path / "v", passphrase="second pass").keys.master == v.keys.master  # type: ignore[union-attr]
    v.remove_key(first)
    with pytest.raises(WrongPassphraseError):
        Vault.open(tmp_path / "v", passphrase="correct horse")
    with pytest.raises(ValueError, match="last key"):
        v.remove_key(second.id)
    assert Vault.open(tmp_path / "v", passphrase="second pass").encrypted


def test_key_slot_holds_no_key_in_the_clear(tmp_path: Path) -> None:
    v = make(tmp_path)
    assert v.keys is not None
    slot = next((tmp_path / "v" / "keys").iterdir()).read_bytes()
    assert v.keys.master not in slot
    assert base64.b64encode(v.keys.master) not in slot


def test_altered_config_is_refused(tmp_path: Path) -> None:
    make(tmp_path)
    cfg_path = tmp_path / "v" / "config"
    cfg = json.loads(cfg_path.read_bytes())
    cfg["encryption"] = "chacha20-poly1305"  # a swap to another cipher
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(VaultVersionError, match="fails authentication"):
        Vault.open(tmp_path / "v", passphrase="correct horse")
    cfg.update(encryption="none", id_key="none", format_version=1)  # a downgrade
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(VaultVersionError, match="holds keys"):
        Vault.open(tmp_path / "v", passphrase="correct horse")


def test_crafted_key_slot_is_refused(tmp_path: Path) -> None:
    make(tmp_path)
    slot_path = next((tmp_path / "v" / "keys").iterdir())
    body = json.loads(slot_path.read_bytes())
    # an attacker's own master key, wrapped under a key they chose: AES-GCM with a
    # key that is not scrypt of any passphrase cannot verify
    mine = AESGCM(b"k" * 32)
    body["wrapped"] = base64.b64encode(b"n" * 12 + mine.encrypt(b"n" * 12, b"m" * 32, b"")).decode()
    slot_path.write_text(json.dumps(body))
    with pytest.raises(WrongPassphraseError):
        Vault.open(tmp_path / "v", passphrase="correct horse")
    body["log_n"] = 40  # a KDF cost that would take forever: refused before running it
    slot_path.write_text(json.dumps(body))
    with pytest.raises(BadKeySlotError, match="out of range"):
        Vault.open(tmp_path / "v", passphrase="correct horse")


def test_names_are_opaque_and_files_sealed(tmp_path: Path) -> None:
    v = make(tmp_path)
    name = v.point_name("web01.20261129T101010Z")
    assert "web01" not in name and name.startswith("points/") and name.endswith(".sealed")
    assert "root" not in v.manifest_name("web01.20261129T101010Z", "root")
    v.put_sealed("point", name, b'{"vm": "web01"}')
    raw = (tmp_path / "v" / name).read_bytes()
    assert b"web01" not in raw
    assert v.get_sealed("point", name) == b'{"vm": "web01"}'
    other = v.point_name("web01.20261129T101011Z")
    (tmp_path / "v" / other).write_bytes(raw)  # moved to another name: fails
    with pytest.raises(ValueError, match="fails authentication"):
        v.get_sealed("point", other)
    assert v.id_key is not None
    assert v.id_key != blake3.blake3(b"").digest()


def test_a_format_2_vault_is_raised_to_3_by_its_first_paged_segment_only(
        tmp_path: Path) -> None:
    """cbt before paged index segments reads formats 1 and 2 only: an encrypted vault that
    old cbt wrote (format 2) becomes format 3 when a paged segment is first written into
    it, its ``check`` sealed anew (it covers the version); reading does not change it, and
    a version edited without the key fails authentication."""
    from helpers.images import make_disk, scribble

    import cbt
    from cbt.repo.vault import _config_check

    v = make(tmp_path)
    assert v.keys is not None
    cfg_path = tmp_path / "v" / "config"

    def as_format_2() -> bytes:
        """The config as cbt before paged segments wrote it."""
        cfg = {k: val for k, val in json.loads(cfg_path.read_bytes()).items() if k != "check"}
        cfg["format_version"] = 2
        cfg["check"] = _config_check(cfg, v.keys)  # type: ignore[arg-type]
        data = (json.dumps(cfg, indent=1) + "\n").encode()
        cfg_path.write_bytes(data)
        return data

    as_format_2()
    disk = make_disk(tmp_path / "d.img", 1 << 20, 3)
    opened = cbt.Vault.open(tmp_path / "v", passphrase="correct horse")
    assert opened.config["format_version"] == 2
    point = opened.backup("vm", [disk], block_size=16384, workers=1).id
    assert json.loads(cfg_path.read_bytes())["format_version"] == 3
    assert Vault.open(tmp_path / "v", passphrase="correct horse").config["format_version"] == 3

    before = as_format_2()  # reading (list, restore, verify): the config stays as it is
    again = cbt.Vault.open(tmp_path / "v", passphrase="correct horse")
    assert [p.id for p in again.points()] == [point]
    again.restore(point, tmp_path / "out", workers=1)
    assert (tmp_path / "out" / "d.img").read_bytes() == disk.read_bytes()
    assert again.verify(data=True).problems == []
    assert cfg_path.read_bytes() == before

    scribble(disk, 4)
    again.backup("vm", [disk], block_size=16384, workers=1)  # (a new segment: format 3)
    assert json.loads(cfg_path.read_bytes())["format_version"] == 3
    cfg = json.loads(cfg_path.read_bytes())
    cfg["format_version"] = 2  # edited without the key
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(VaultVersionError, match="fails authentication"):
        Vault.open(tmp_path / "v", passphrase="correct horse")
