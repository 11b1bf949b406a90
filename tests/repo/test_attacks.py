"""Attacks on an encrypted vault by someone who can write to it but holds no passphrase,
and by a careless user (the adversarial review of issue 11).

Each test replays one attack on a real vault and checks, without cbt, that it
fails cleanly: one line naming the file, exit 2, nothing written or deleted.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import KIB
from helpers.cli import cbt
from helpers.images import fs_image
from helpers.vaults import PASSWORD, encrypted_env, fast_kdf, vault_state

import cbt as cbt_api
from cbt.core.crypto import KdfParams
from cbt.repo.keys import BadKeySlotError, KeySlot


@pytest.fixture(scope="module")
def sealed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An encrypted vault with two points of VM ``web``: built once, cloned per test."""
    root = tmp_path_factory.mktemp("attacks")
    fs_image(root / "os.img", 512 * KIB, 1)
    v = cbt_api.Vault.init(root / "vault", encryption="aes-256-gcm", passphrase=PASSWORD,
                           kdf=fast_kdf())
    for day in (1, 2):
        fs_image(root / "os.img", 512 * KIB, day)
        v.backup("web", [f"os={root / 'os.img'}"], block_size=64 * KIB, workers=1,
                 created=f"2026-01-0{day}T00:00:00Z")
    return root / "vault"


@pytest.fixture
def vault(sealed: Path, tmp_path: Path) -> Path:
    shutil.copytree(sealed, tmp_path / "vault", symlinks=True)
    return tmp_path / "vault"


def _downgrade(vault: Path) -> None:
    """The config rewritten to say ``none`` and ``keys/`` deleted: what an attacker who wants
    the next backups in the clear would do."""
    config = json.loads((vault / "config").read_text())
    config.update(format_version=1, encryption="none", id_key="none")
    del config["check"]
    (vault / "config").write_text(json.dumps(config))
    shutil.rmtree(vault / "keys")


@pytest.mark.parametrize("argv", [("list",), ("verify",), ("verify", "--repair"), ("gc",),
                                  ("backup", "--vm", "web", "IMAGE")])
def test_a_downgraded_config_is_refused_while_sealed_files_remain(vault: Path, tmp_path: Path,
                                                                   argv: tuple[str, ...]) -> None:
    _downgrade(vault)
    before = vault_state(vault)
    image = tmp_path / "web.img"
    fs_image(image, 512 * KIB, 3)
    args = [a if a != "IMAGE" else f"os={image}" for a in argv]
    r = cbt(args[0], vault, *args[1:], env=encrypted_env(tmp_path))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "config says unencrypted" in r.stderr and str(vault) in r.stderr
    assert vault_state(vault) == before  # no pack deleted, nothing written in the clear


@pytest.mark.parametrize("params", [(24, 32, 16), (22, 8, 16), (20, 32, 1), (21, 8, 1)])
def test_a_key_slot_asking_for_a_huge_scrypt_cost_is_refused_not_run(
        vault: Path, tmp_path: Path, params: tuple[int, int, int]) -> None:
    slot = next((vault / "keys").glob("*.json"))
    body = json.loads(slot.read_text())
    body.update(log_n=params[0], r=params[1], p=params[2])
    slot.write_text(json.dumps(body))
    with pytest.raises(BadKeySlotError, match=str(slot)):
        KeySlot.from_json(slot.read_bytes(), str(slot))
    r = cbt("list", vault, env=encrypted_env(tmp_path), timeout=30)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"bad key slot {slot}" in r.stderr


def test_the_costliest_scrypt_allowed_runs(tmp_path: Path) -> None:
    """The bound is no lower than what ``cbt init --kdf-log-n`` offers: its highest cost is
    within what scrypt can run (its memory limit), checked without running it."""
    from cbt.cli.init_cmd import KDF_LOG_N_MAX

    top = KdfParams(log_n=KDF_LOG_N_MAX)
    top.check()
    assert top.maxmem < 2**31 - 1

