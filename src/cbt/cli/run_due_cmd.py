"""Run every VM whose latest schedule slot at or before now has no point.

Running it twice in a slot backs up once; after downtime only the latest
missed slot runs (once); a failed slot is retried at the next call.  Meant for
cron (e.g. every 10 minutes); 'cbt daemon' does the same in a loop.

--now ISO8601 (with an offset) pretends it is that time: it becomes the
created time of the points made.  Exit 0 if every due job succeeded, else 2.
--json prints JSON Lines: each job's backup lines ('cbt backup --json'), then
{"type":"summary","now","ran":[{"vm","slot","status","recovery_point"}],
"skipped":[{"vm","reason"}],"warnings"}.
"""

from __future__ import annotations

import argparse
import sys

from cbt.cli._common import (
    EXIT_ERROR,
    EXIT_OK,
    add_json,
    add_password_file,
    finder,
    now_arg,
    print_json,
    workers_arg,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, metavar="FILE", help="the configuration file")
    p.add_argument("--now", type=now_arg, metavar="ISO8601",
                   help="the time to act at (default: now)")
    p.add_argument("--workers", type=workers_arg, default=None, metavar="N",
                   help="worker processes (default: number of cores)")
    add_password_file(p)
    add_json(p)


def run(args: argparse.Namespace) -> int:
    import datetime as dt

    from cbt.cli.backup_cmd import _print_point, _progress, point_json
    from cbt.core.timefmt import parse_now
    from cbt.jobs.config import load
    from cbt.jobs.job import JobRequest, JobResult
    from cbt.jobs.scheduler import run_due

    config = load(args.config)
    now = parse_now(args.now) if args.now else dt.datetime.now(dt.UTC)

    def on_result(result: JobResult, slot: str) -> None:
        if result.point is None:
            sys.stderr.write(f"cbt: error: VM {result.vm} slot {slot}: {result.error}\n")
            if args.json:
                print_json({"type": "error", "vm": result.vm, "message": result.error,
                            "warnings": []})
        elif args.json:
            print_json(point_json(result.point, result.snapshots))
        else:
            _print_point(result.point, result.snapshots)

    with _progress(args, [label for v in config.vms.values() for label in v.disks]) as progress:
        summary = run_due(config, now, JobRequest(workers=args.workers, progress=progress,
                                                passphrase=finder(args, config.vault)),
                          on_result=on_result)
    code = EXIT_OK if summary.ok else EXIT_ERROR
    if args.json:
        print_json(summary.to_dict())
        return code
    for r in summary.ran:
        print(f"{r.vm}: slot {r.slot} {r.status} {r.recovery_point or ''}")
    for s in summary.skipped:
        print(f"{s.vm}: skipped, {s.reason}")
    return code
