"""Create a vault in a new or empty directory.

Format 1 stores blocks compressed but unencrypted (encryption = "none") and
names them by their plain BLAKE3 digest (id_key = "none").

--json prints {"vault","format_version","encryption","id_key","warnings"}.
"""

from __future__ import annotations

import argparse

from cbt.cli._common import EXIT_OK, add_json, print_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("vault", metavar="VAULT", help="directory for the new vault")
    add_json(p)


def run(args: argparse.Namespace) -> int:
    from cbt.api import Vault

    v = Vault.init(args.vault)
    if args.json:
        print_json({"vault": v.root, "format_version": v.config["format_version"],
                    "encryption": v.config["encryption"], "id_key": v.config["id_key"],
                    "warnings": []})
    else:
        print(f"initialised cbt vault (format {v.config['format_version']}, unencrypted) in "
              f"{v.root}")
    return EXIT_OK
