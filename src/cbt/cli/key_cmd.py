"""List, add or remove the passphrases that open an encrypted vault.

An encrypted vault has one random master key; each passphrase that opens it
has a key slot (keys/<id>.json) holding the master key wrapped by a key scrypt
derives from that passphrase.  Adding or removing a slot changes no block: a
passphrase is changed, or shared and revoked, without re-encrypting anything.
The master key exists only in the slots: a copy of the vault must include
keys/ (and config), and one passphrase must be kept safe; without both the
vault cannot be read.  The last key cannot be removed.

  cbt key list VAULT          the slots: id, created, scrypt cost; * opened the vault
  cbt key add VAULT           a new slot for a new passphrase
  cbt key remove VAULT ID     remove a slot (another passphrase must remain)
  cbt key passwd VAULT        add a slot for a new passphrase, then remove the
                              slot of the passphrase that opened the vault

The vault opens with --password-file, CBT_PASSWORD_FILE, CBT_PASSWORD or a
prompt; the new passphrase comes from --new-password-file FILE or a prompt
(asked twice).  Key edits need the vault alone (no backup running).

--json: list prints {"vault","encryption","keys":[{"id","created","kdf","log_n",
"r","p","opened"}],"warnings"}; add and passwd print {"vault","added","removed",
"warnings"}; remove prints {"vault","removed","warnings"}.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from cbt.cli._common import (
    EXIT_OK,
    MAX_WAIT,
    add_json,
    add_password_file,
    add_vault,
    on_terminal,
    open_vault,
    print_json,
    prompt_passphrase,
    say,
    seconds_arg,
)

if TYPE_CHECKING:
    from cbt.api import Vault

ACTIONS = ("list", "add", "remove", "passwd")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from cbt.cli.init_cmd import add_kdf_log_n

    p.add_argument("action", choices=ACTIONS, metavar="ACTION",
                   help="list, add, remove or passwd")
    add_vault(p, "the vault")
    p.add_argument("id", nargs="?", metavar="ID", help="remove: the key slot to remove")
    add_password_file(p)
    p.add_argument("--new-password-file", metavar="FILE",
                   help="add, passwd: read the new passphrase from the first line of FILE "
                        "(else a prompt on a terminal, asked twice)")
    add_kdf_log_n(p)
    p.add_argument("--wait", type=seconds_arg(MAX_WAIT), default=0.0, metavar="SECONDS",
                   help="wait up to this long for running backups (and the like) to finish "
                        "(default: fail)")
    add_json(p)


def run(args: argparse.Namespace) -> int:
    from cbt.core.errors import CbtValueError

    if (args.action == "remove") != (args.id is not None):
        raise CbtValueError("give the key's ID with remove (see cbt key list), and only then")
    vault = open_vault(args)
    if not vault.encrypted:
        raise CbtValueError(f"vault {vault.root} is not encrypted: it has no keys")
    if args.action == "list":
        return _list(vault, args)
    new = _new_passphrase(args) if args.action in ("add", "passwd") else None
    from cbt.core.crypto import KdfParams
    from cbt.repo.lock import exclusive_lock

    assert vault.keys is not None
    added = removed = None
    with exclusive_lock(vault.storage, args.wait, reveal_command=False):
        if new is not None:
            added = vault.add_key(new, KdfParams(log_n=args.kdf_log_n)).id
        if args.action == "passwd":
            removed = vault.keys.slot
        elif args.action == "remove":
            removed = args.id
        if removed is not None:
            vault.remove_key(removed)
    if args.json:
        out: dict[str, Any] = {"vault": vault.root}
        if args.action != "remove":
            out["added"] = added
        out.update(removed=removed, warnings=[])
        print_json(out)
        return EXIT_OK
    if added is not None:
        say(f"added key {added}")
    if removed is not None:
        say(f"removed key {removed}")
    return EXIT_OK


def _new_passphrase(args: argparse.Namespace) -> bytes:
    from cbt.core.errors import CbtValueError
    from cbt.repo.keys import read_password_file

    if args.new_password_file:
        return read_password_file(args.new_password_file)
    if on_terminal():
        return prompt_passphrase("new passphrase: ", confirm=True)
    raise CbtValueError("no new passphrase: give it with --new-password-file FILE, or run on a "
                        "terminal to be asked")


def _list(vault: Vault, args: argparse.Namespace) -> int:
    opened = vault.keys.slot if vault.keys is not None else None
    slots = sorted(vault.key_slots(), key=lambda s: (s.created, s.id))
    rows = [{"id": s.id, "created": s.created, "kdf": "scrypt", "log_n": s.params.log_n,
             "r": s.params.r, "p": s.params.p, "opened": s.id == opened} for s in slots]
    if args.json:
        print_json({"vault": vault.root, "encryption": vault.config["encryption"],
                    "keys": rows, "warnings": []})
        return EXIT_OK
    for r in rows:
        print(f"{'*' if r['opened'] else ' '} {r['id']}  {r['created']}  scrypt log_n "
              f"{r['log_n']} r {r['r']} p {r['p']}")
    return EXIT_OK
