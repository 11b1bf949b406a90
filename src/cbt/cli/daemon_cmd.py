"""Run due backup jobs in a loop: 'cbt run-due' whenever a slot comes.

Sleeps until the next slot of any VM (it does not poll), runs what is due and
logs one line per job on stdout.  SIGTERM or SIGINT stops it after the job in
flight has finished (exit 0).
"""

from __future__ import annotations

import argparse

from cbt.cli._common import add_password_file, finder, workers_arg


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, metavar="FILE", help="the configuration file")
    p.add_argument("--workers", type=workers_arg, default=None, metavar="N",
                   help="worker processes (default: number of cores)")
    add_password_file(p)


def run(args: argparse.Namespace) -> int:
    import datetime as dt
    import sys

    from cbt.core.timefmt import rfc3339
    from cbt.jobs.config import load
    from cbt.jobs.scheduler import daemon

    config = load(args.config)

    def log(line: str) -> None:
        sys.stdout.write(f"{rfc3339(dt.datetime.now(dt.UTC))} {line}\n")
        sys.stdout.flush()

    return daemon(config, log, workers=args.workers, passphrase=finder(args, config.vault))
