"""Run every VM whose latest schedule slot at or before now has no point.

Running it twice in a slot backs up once; after downtime only the latest
missed slot runs (once); a failed slot is retried at the next call.  Meant for
cron (e.g. every 10 minutes); 'cbt daemon' does the same in a loop.

--now ISO8601 (with an offset) pretends it is that time: it becomes the
created time of the points made.  Exit 0 if every due job succeeded, else 2.
--json prints JSON Lines: each job's backup lines ('cbt backup --json'), then
{"type":"summary","now","ran":[{"vm","slot","status","recovery_point"}],
"skipped":[{"vm","reason"}],"warnings"}.

--metrics FILE writes Prometheus textfile metrics at the end (node_exporter's
textfile collector; a temporary file, then renamed): per VM of the config, of
its newest point cbt_last_success_timestamp_seconds (its creation time),
cbt_last_duration_seconds, cbt_last_read_bytes, cbt_last_new_bytes,
cbt_last_stored_bytes, cbt_last_consistency{consistency=...} (1 for its level,
0 for the others); cbt_slot_missed (1: its latest slot has no point: its job
failed or did not run) and cbt_job_failures_total (jobs failed in this run).
"""

from __future__ import annotations

import argparse
import sys

from cbt.cli._common import (
    EXIT_ERROR,
    EXIT_OK,
    add_json,
    add_password_file,
    emit_warnings,
    finder,
    now_arg,
    print_json,
    say,
    workers_arg,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, metavar="FILE", help="the configuration file")
    p.add_argument("--now", type=now_arg, metavar="ISO8601",
                   help="the time to act at (default: now)")
    p.add_argument("--workers", type=workers_arg, default=None, metavar="N",
                   help="worker processes (default: number of cores)")
    p.add_argument("--metrics", type=metrics_arg, default=None, metavar="FILE",
                   help="write Prometheus textfile metrics here at the end")
    add_password_file(p)
    add_json(p)


def metrics_arg(text: str) -> str:
    """argparse type of ``--metrics``: a file name in a folder that exists (checked
    before any job runs, not after)."""
    import os

    folder = os.path.dirname(os.path.abspath(text)) if text else ""
    if not text or text.endswith("/") or not os.path.isdir(folder) or os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"not a file in an existing folder: {text!r}")
    return text


def run(args: argparse.Namespace) -> int:
    import datetime as dt
    from collections import Counter
    from dataclasses import replace

    from cbt.cli import _common
    from cbt.cli.backup_cmd import _print_point, _progress, point_json
    from cbt.core.timefmt import parse_now
    from cbt.jobs.config import load
    from cbt.jobs.job import JobRequest, JobResult
    from cbt.jobs.runner import asked_once
    from cbt.jobs.scheduler import run_due, write_metrics

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
        elif _common.VERBOSITY < 0:  # -q: its warnings only
            emit_warnings(result.point.warnings)
        else:
            _print_point(result.point, result.snapshots)

    request = JobRequest(workers=args.workers, passphrase=asked_once(finder(args, config.vault)))
    with _progress(args, [label for v in config.vms.values() for label in v.disks]) as progress:
        summary = run_due(config, now, replace(request, progress=progress), on_result=on_result)
    code = EXIT_OK if summary.ok else EXIT_ERROR
    if args.metrics:
        failed = Counter(r.vm for r in summary.ran if r.status == "failed")
        try:
            write_metrics(args.metrics, config, now, dict(failed), request.passphrase)
        except OSError as exc:
            sys.stderr.write(f"cbt: error: --metrics {args.metrics}: {exc.strerror or exc}\n")
            code = EXIT_ERROR
    if args.json:
        print_json(summary.to_dict())
        return code
    for r in summary.ran:
        say(f"{r.vm}: slot {r.slot} {r.status} {r.recovery_point or ''}")
    for s in summary.skipped:
        say(f"{s.vm}: skipped, {s.reason}")
    return code
