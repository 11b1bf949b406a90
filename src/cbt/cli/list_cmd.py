"""List the recovery points of a vault, oldest first.

--json prints {"points":[{"recovery_point","vm","created","consistency",
"parent","disks":[{"label","size","block_size"}],"bytes_new","bytes_stored",
"copied_from"}],"warnings"} ("copied_from": the id of the vault `cbt copy` copied
the point from, null for a point backed up here).

A point record that cannot be read (damaged, failing authentication) hides only
its own point and the points based on it: each is named in a warning (stderr,
and the JSON's "warnings"), and the rest are listed (exit 0).
"""

from __future__ import annotations

import argparse

from cbt.cli._common import (
    EXIT_OK,
    add_json,
    add_password_file,
    add_vault,
    emit_warnings,
    open_vault,
    print_json,
    print_table,
    say,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_vault(p, "the vault")
    p.add_argument("--vm", metavar="NAME", help="only this VM's points")
    add_password_file(p)
    add_json(p)


def run(args: argparse.Namespace) -> int:
    from cbt.core.sizes import human_bytes

    warnings: list[str] = []
    points = open_vault(args).points(args.vm, warnings)
    emit_warnings(warnings)
    if args.json:
        print_json({"points": [{**p.summary(), "copied_from": p.copied_from} for p in points],
                    "warnings": warnings})
        return EXIT_OK
    if not points:
        say("no recovery points")
        return EXIT_OK
    rows = [[p.id, p.vm, p.created, p.consistency, human_bytes(p.bytes_new),
             ", ".join(f"{d.label} {human_bytes(d.size)}" for d in p.disks)
             + (f" (copied from vault {p.copied_from})" if p.copied_from else "")]
            for p in points]
    print_table(["point", "vm", "created", "consistency", "new", "disks"], rows, right={4})
    return EXIT_OK
