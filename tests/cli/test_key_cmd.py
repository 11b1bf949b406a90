"""``cbt key list | add | remove | passwd``: the passphrases of an encrypted vault.

Every test runs the real ``cbt``; the truth is the vault's keys/ folder and which
passphrases open the vault afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.cli import cbt, cbt_json, one_error_line
from helpers.vaults import vault_state
from test_encryption_cli import init_encrypted, on_pty, password_file

from cbt.repo.lock import exclusive_lock
from cbt.repo.storage import LocalStorage


@pytest.fixture
def vault(tmp_path: Path) -> Path:
    init_encrypted(tmp_path / "v", password_file(tmp_path / "a", "passphrase A"))
    return tmp_path / "v"


def slots(vault: Path) -> list[str]:
    return sorted(p.name[:-5] for p in (vault / "keys").iterdir() if p.suffix == ".json")


def opens(vault: Path, passphrase: str) -> bool:
    r = cbt("list", vault, env={"CBT_PASSWORD": passphrase})
    if r.returncode:
        assert one_error_line(r) == "cbt: error: wrong passphrase"
    return r.returncode == 0


def test_list_add_remove(tmp_path: Path, vault: Path) -> None:
    a, b = tmp_path / "a", password_file(tmp_path / "b", "passphrase B")
    (first,) = slots(vault)
    out = cbt_json("key", "list", vault, "--password-file", a)
    assert set(out) == {"vault", "encryption", "keys", "warnings"}
    assert set(out["keys"][0]) == {"id", "created", "kdf", "log_n", "r", "p", "opened"}
    assert out["encryption"] == "aes-256-gcm"
    assert [(k["id"], k["kdf"], k["log_n"], k["r"], k["p"], k["opened"]) for k in out["keys"]] \
        == [(first, "scrypt", 10, 8, 1, True)]
    created = json.loads((vault / "keys" / f"{first}.json").read_text())["created"]
    assert out["keys"][0]["created"] == created
    r = cbt("key", "list", vault, "--password-file", a)
    assert r.returncode == 0 and r.stdout.startswith(f"* {first}  {created}  scrypt log_n 10")

    added = cbt_json("key", "add", vault, "--password-file", a, "--new-password-file", b,
                     "--kdf-log-n", 11)
    assert set(added) == {"vault", "added", "removed", "warnings"}
    assert added["removed"] is None and slots(vault) == sorted([first, added["added"]])
    assert opens(vault, "passphrase A") and opens(vault, "passphrase B")
    assert not opens(vault, "passphrase C")
    listed = cbt_json("key", "list", vault, "--password-file", b)["keys"]
    assert {k["id"]: (k["opened"], k["log_n"]) for k in listed} == {
        first: (False, 10), added["added"]: (True, 11)}

    removed = cbt_json("key", "remove", vault, first, "--password-file", b)
    assert removed == {"vault": str(vault), "removed": first, "warnings": []}
    assert slots(vault) == [added["added"]]
    assert not opens(vault, "passphrase A") and opens(vault, "passphrase B")


def test_the_last_key_cannot_be_removed(tmp_path: Path, vault: Path) -> None:
    """Refused under the writer lock: nothing changes but who held the lock last."""
    (only,) = slots(vault)
    before = vault_state(vault)
    line = one_error_line(cbt("key", "remove", vault, only, "--password-file", tmp_path / "a"))
    assert "cannot remove the last key" in line
    assert vault_state(vault) == before and opens(vault, "passphrase A")
    line = one_error_line(cbt("key", "remove", vault, "0123456789abcdef",
                              "--password-file", tmp_path / "a"))
    assert "no key '0123456789abcdef'" in line
    assert vault_state(vault) == before


def test_passwd_replaces_the_passphrase_that_opened(tmp_path: Path, vault: Path) -> None:
    a, b = tmp_path / "a", password_file(tmp_path / "b", "passphrase B")
    c = password_file(tmp_path / "c", "passphrase C")
    cbt_json("key", "add", vault, "--password-file", a, "--new-password-file", b,
             "--kdf-log-n", 10)
    (slot_a,) = [k["id"] for k in cbt_json("key", "list", vault, "--password-file", a)["keys"]
                 if k["opened"]]
    out = cbt_json("key", "passwd", vault, "--password-file", a, "--new-password-file", c,
                   "--kdf-log-n", 10)
    assert out["removed"] == slot_a and out["added"] in slots(vault)
    assert slot_a not in slots(vault) and len(slots(vault)) == 2
    assert not opens(vault, "passphrase A")
    assert opens(vault, "passphrase B") and opens(vault, "passphrase C")
    # the plain output
    d = password_file(tmp_path / "d", "passphrase D")
    r = cbt("key", "passwd", vault, "--password-file", c, "--new-password-file", d,
            "--kdf-log-n", 10)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("added key ") and f"removed key {out['added']}" in r.stdout
    assert not opens(vault, "passphrase C") and opens(vault, "passphrase D")


def test_key_refusals_change_nothing(tmp_path: Path, vault: Path) -> None:
    a = tmp_path / "a"
    before = vault_state(vault)
    line = one_error_line(cbt("key", "add", vault, "--password-file", a))
    assert "--new-password-file FILE" in line and "terminal" in line
    one_error_line(cbt("key", "remove", vault, "--password-file", a))  # no ID
    one_error_line(cbt("key", "list", vault, slots(vault)[0], "--password-file", a))
    one_error_line(cbt("key", "rotate", vault, "--password-file", a))
    empty = tmp_path / "empty"
    empty.write_text("\n")
    line = one_error_line(cbt("key", "add", vault, "--password-file", a,
                              "--new-password-file", empty))
    assert "first line is empty" in line
    assert vault_state(vault) == before
    # an unencrypted vault has no keys
    cbt_json("init", tmp_path / "plain", "--encryption", "none")
    for action in ("list", "add", "passwd"):
        line = one_error_line(cbt("key", action, tmp_path / "plain"))
        assert line == f"cbt: error: vault {tmp_path / 'plain'} is not encrypted: it has no keys"


def test_key_edits_take_the_writer_lock(tmp_path: Path, vault: Path) -> None:
    b = password_file(tmp_path / "b", "passphrase B")
    before = slots(vault)
    with exclusive_lock(LocalStorage(vault)):
        line = one_error_line(cbt("key", "add", vault, "--password-file", tmp_path / "a",
                                  "--new-password-file", b, "--kdf-log-n", 10))
        assert "retry later or pass --wait SECONDS" in line
        # listing is reading: no lock
        assert len(cbt_json("key", "list", vault, "--password-file", tmp_path / "a")["keys"]) == 1
    assert slots(vault) == before


def test_add_on_a_terminal_asks_twice(tmp_path: Path, vault: Path) -> None:
    env = {"CBT_PASSWORD_FILE": str(tmp_path / "a")}
    code, _, transcript = on_pty(["key", "add", vault, "--kdf-log-n", 10], ["one", "two"],
                                 env=env)
    assert code == 2 and "do not match" in transcript and len(slots(vault)) == 1
    code, stdout, transcript = on_pty(["key", "passwd", vault, "--kdf-log-n", 10, "--json"],
                                      ["typed B", "typed B"], env=env)
    assert code == 0, transcript
    assert "new passphrase" in transcript and "repeat it" in transcript
    assert json.loads(stdout)["added"] == slots(vault)[0]
    assert opens(vault, "typed B") and not opens(vault, "passphrase A")
    # the vault's own passphrase asked first, then the new one
    code, stdout, transcript = on_pty(["key", "add", vault, "--kdf-log-n", 10],
                                      ["typed B", "typed C", "typed C"])
    assert code == 0, transcript
    assert transcript.index("passphrase of") < transcript.index("new passphrase")
    assert opens(vault, "typed C") and opens(vault, "typed B")
