"""Show one recovery point: its disks, what changed, and its consistency.

POINT is an id, a unique prefix of one, or VM.latest.
--json prints the point as in 'cbt list --json' plus "consistency_reason",
"seconds", and per disk "changed_blocks", "bytes_read", "bytes_new",
"bytes_stored", "path" and "blocks".
"""

from __future__ import annotations

import argparse

from cbt.cli._common import EXIT_OK, add_json, print_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("vault", metavar="VAULT", help="the vault")
    p.add_argument("point", metavar="POINT", help="point id, unique prefix, or VM.latest")
    add_json(p)


def run(args: argparse.Namespace) -> int:
    from cbt.api import Vault
    from cbt.core.sizes import format_size, human_bytes

    p = Vault.open(args.vault).point(args.point)
    out = p.summary()
    out.update({"consistency_reason": p.consistency_reason, "seconds": p.seconds,
                "disks": [d.public() for d in p.disks], "warnings": p.warnings})
    if args.json:
        print_json(out)
        return EXIT_OK
    print(f"recovery point {p.id}")
    print(f"  vm {p.vm}, created {p.created}, parent {p.parent or '-'}")
    print(f"  consistency {p.consistency} ({p.consistency_reason})")
    for d in p.disks:
        print(f"  disk {d.label}: {human_bytes(d.size)} from {d.path}, {d.blocks} blocks of "
              f"{format_size(d.block_size)}, {d.changed_blocks} changed, "
              f"new {human_bytes(d.bytes_new)}, stored {human_bytes(d.bytes_stored)}")
    return EXIT_OK
