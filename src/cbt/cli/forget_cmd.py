"""Remove named recovery points from a vault (ids, unique id prefixes, or VM.latest).

Works as prune does, with the vault alone (a running backup makes it fail, or
wait with --wait): a named point that points kept are based on is hidden
instead (it no longer lists, but still resolves for them); so is a VM's
newest point when it goes, until the VM's next point (that backup then uses no
change hint: one kept since the last backup would miss what changed in
between); each named point says which happened.  A name that matches no
point (or several), or an unavailable one, is one error line, and nothing is
removed.  Kept snapshots of removed points go too.  The blocks are freed later
by 'cbt gc'.

--json prints {"dry_run","points":[{"recovery_point","vm","keep","reasons"}],
"snapshots_expired","warnings"} (prune's shape; "points" lists the named points).
"""

from __future__ import annotations

import argparse

from cbt.cli._common import (
    EXIT_OK,
    add_json,
    add_password_file,
    add_removal_options,
    add_vault,
    emit_warnings,
    open_vault,
    print_json,
    progress_bar,
    say,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_vault(p, "the vault")
    p.add_argument("points", nargs="+", metavar="POINT",
                   help="a point to remove: its id, a unique prefix of it, or VM.latest")
    add_removal_options(p)
    add_password_file(p)
    add_json(p)


def run(args: argparse.Namespace) -> int:
    from cbt.ops.prune import forget

    vault = open_vault(args)
    with progress_bar("forget", "points") as progress:
        result = forget(vault, list(args.points), args.dry_run, args.wait, progress)
    if args.json:
        print_json(result.to_dict())
        return EXIT_OK
    emit_warnings(result.warnings)
    for p in result.points:
        print(f"remove {p.recovery_point:<40} {', '.join(p.reasons)}")
    verb = "would remove" if args.dry_run else "removed"
    n = len(result.points)
    say(f"{verb} {n} point{'s' if n != 1 else ''}, {result.snapshots_expired} kept "
        "snapshots; run 'cbt gc' to free their blocks")
    return EXIT_OK
