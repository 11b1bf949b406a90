"""Run due backup jobs in a loop: 'cbt run-due' whenever a slot comes, and maintenance.

Sleeps until the next slot of any VM (it does not poll), runs what is due, then
prune and gc when the config's [maintenance] slot comes, for example::

    [maintenance]
    schedule = "daily 03:00"   # the syntax of policy schedules; timezone = "UTC"
    prune = true               # retention of the policies (as 'cbt prune --config')
    gc = true                  # then 'cbt gc'; gc_grace = 3600 (seconds)
    max_unused = 5             # gc --max-unused (percent; default: gc's own rule)
    wait = 3600                # prune waits this long for running backups, then
                               # gives up until the next slot

Without that table it never prunes nor collects.  Maintenance runs once a slot:
the slot tried is recorded in a state folder (state_dir, else $STATE_DIRECTORY,
$XDG_STATE_HOME/cbt, ~/.local/state/cbt), so a restart does not run it again and
a daemon down at the slot runs it when it starts; a step that failed or gave up
is tried at the next slot.  A job that fails (its vault locked by a prune
elsewhere, a hook, the network), or a round that fails as a whole (the vault
out of reach), is logged and tried again in ten minutes (what is still due);
the daemon goes on.

Logs one line per event on stderr (journald collects it): "TIME LEVEL text",
for example "2026-11-30T12:00:00Z INFO backup web: point web.2026... 12.3 MiB new
in 4.1 s (application: ...)"; events: start, stop, each job's start and end,
VMs skipped, maintenance steps, failures (ERROR), warnings (WARNING).  With -q
only WARNING and ERROR lines; with -v also DEBUG ones (sleeping, not due).

--metrics FILE writes Prometheus textfile metrics after each round (for
node_exporter's textfile collector; written to a temporary file, then renamed):
per VM cbt_last_success_timestamp_seconds, cbt_last_duration_seconds,
cbt_last_read_bytes, cbt_last_new_bytes, cbt_last_stored_bytes (its newest
point), cbt_last_consistency{consistency=...} (1 for its level), cbt_slot_missed
(1: its latest slot has no point), cbt_job_failures_total (since the daemon
started); cbt_maintenance_last_run_timestamp_seconds,
cbt_maintenance_last_run_success, cbt_maintenance_last_success_timestamp_seconds.

SIGTERM or SIGINT stops it after the job in flight has finished (exit 0); a
maintenance step waiting for the vault stops at once.  SIGHUP (systemctl
reload cbt-daemon) reads the config file again once the round in flight ends,
then runs what is due by it; a config that does not load is said (ERROR) and
the one in use is kept.
"""

from __future__ import annotations

import argparse

from cbt.cli._common import add_password_file, finder, workers_arg
from cbt.cli.run_due_cmd import metrics_arg


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, metavar="FILE", help="the configuration file")
    p.add_argument("--workers", type=workers_arg, default=None, metavar="N",
                   help="worker processes (default: number of cores)")
    p.add_argument("--metrics", type=metrics_arg, default=None, metavar="FILE",
                   help="write Prometheus textfile metrics here after each round")
    add_password_file(p)


LEVELS = {"DEBUG": 1, "INFO": 0, "WARNING": -1, "ERROR": -1}  # the least VERBOSITY to show


def one_line(text: str) -> str:
    """A log line of ``text``, whatever it holds (a hook's or a server's words, a path
    from the config): its runs of white space (newlines too) one space, and every other
    character that does not print (an escape sequence, a bidi override, a lone
    surrogate) written as its Python escape, ``\\x1b``: journald keeps the line as
    text (it shows a line with control characters as "[blob data]") and a terminal
    reading it is not driven by it."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in " ".join(text.split()))


def run(args: argparse.Namespace) -> int:
    import datetime as dt
    import sys

    from cbt.cli import _common
    from cbt.core.timefmt import rfc3339
    from cbt.jobs.config import load
    from cbt.jobs.scheduler import daemon

    config = load(args.config)

    def log(level: str, text: str) -> None:
        if LEVELS[level] <= _common.VERBOSITY:
            sys.stderr.write(f"{rfc3339(dt.datetime.now(dt.UTC))} {level} {one_line(text)}\n")
            sys.stderr.flush()

    return daemon(config, log, workers=args.workers, passphrase=finder(args, config.vault),
                  metrics=args.metrics)
