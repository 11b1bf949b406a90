"""Free the blocks no recovery point references.

Removes packs with no live block and rewrites packs that are mostly dead.  It
takes its own lock and may run beside one backup: it only sweeps packs older
than the start of the running backup, and moves dead packs to a trash area
emptied after a grace period, so a restore reading at the time never fails
and a backup that reused a block gc found dead brings it back at its commit.

--json prints {"dry_run","packs_removed","packs_rewritten","bytes_freed",
"trash_emptied","warnings"}.
"""

from __future__ import annotations

import argparse

from cbt.cli._common import (
    EXIT_OK,
    MAX_GRACE,
    MAX_WAIT,
    add_json,
    add_password_file,
    add_vault,
    emit_warnings,
    open_vault,
    print_json,
    say,
    seconds_arg,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_vault(p, "the vault")
    p.add_argument("--dry-run", action="store_true", help="say what would be freed")
    p.add_argument("--grace", type=seconds_arg(MAX_GRACE), default=3600.0, metavar="SECONDS",
                   help="how long trashed packs stay readable (default 3600)")
    p.add_argument("--wait", type=seconds_arg(MAX_WAIT), default=600.0, metavar="SECONDS",
                   help="how long to wait for another gc, or a backup's commit (default 600)")
    add_password_file(p)
    add_json(p)


def run(args: argparse.Namespace) -> int:
    from cbt.core.sizes import human_bytes
    from cbt.ops.gc import gc

    result = gc(open_vault(args), args.dry_run, args.grace, args.wait)
    if args.json:
        print_json(result.to_dict())
        return EXIT_OK
    emit_warnings(result.warnings)
    verb = "would free" if args.dry_run else "freed"
    # a dry run's answer is what was asked; a run's summary is left out with -q
    out = print if args.dry_run else say
    out(f"gc: {result.packs_removed} packs removed, {result.packs_rewritten} rewritten, "
        f"{verb} {human_bytes(result.bytes_freed)}; {result.trash_emptied} trashed "
        "packs deleted")
    return EXIT_OK
