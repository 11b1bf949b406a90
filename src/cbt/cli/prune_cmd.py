"""Remove the recovery points the policies no longer keep (the config's vault).

Per VM (restic's --keep-*): last = N keeps the N newest; buckets are wall-clock
hours, calendar days, ISO weeks, months and years in the policy's time zone;
each count keeps the newest point of that many most recent buckets that have
one; within = "1y2m3d4h" keeps the points newer than the VM's newest point less
that duration; the newest point of each VM is always kept ("latest"); a
missing count is 0; no retention table keeps everything; points of VMs not in
the config are kept ("no policy").  A removed point that kept points are based
on is hidden instead (it still resolves for them).  Kept snapshots older than
instant_restore_days are removed (never a tracking base).  Blocks are freed
by 'cbt gc'.

--json prints {"dry_run","points":[{"recovery_point","vm","keep","reasons"}],
"snapshots_expired","warnings"}.
"""

from __future__ import annotations

import argparse

from cbt.cli._common import (
    EXIT_OK,
    add_json,
    add_password_file,
    add_removal_options,
    now_arg,
    open_vault,
    print_json,
    progress_bar,
    say,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, metavar="FILE", help="the configuration file")
    p.add_argument("--now", type=now_arg, metavar="ISO8601",
                   help="the time to judge ages at (default: now)")
    add_removal_options(p)
    add_password_file(p)
    add_json(p)


def run(args: argparse.Namespace) -> int:
    import datetime as dt

    from cbt.core.timefmt import parse_now
    from cbt.jobs.config import load
    from cbt.jobs.retention import prune_request
    from cbt.ops.prune import prune

    config = load(args.config)
    now = parse_now(args.now) if args.now else dt.datetime.now(dt.UTC)
    vault = open_vault(args, config.vault)
    with progress_bar("prune", "points") as progress:
        result = prune(vault, prune_request(config, now, args.dry_run, args.wait), progress)
    if args.json:
        print_json(result.to_dict())
        return EXIT_OK
    verb = "would remove" if args.dry_run else "removed"
    # with -q a run names what it removed (as forget does); a dry run answers in full
    for p in result.points:
        (say if p.keep and not args.dry_run else print)(
            f"{'keep  ' if p.keep else 'remove'} {p.recovery_point:<40} "
            f"{', '.join(p.reasons)}")
    gone = sum(not p.keep for p in result.points)
    (print if args.dry_run else say)(f"{verb} {gone} of {len(result.points)} points; "
                                     f"{result.snapshots_expired} kept snapshots expired")
    return EXIT_OK
