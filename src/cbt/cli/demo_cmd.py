"""Show the whole backup flow on generated data, in a new directory.

cbt demo makes a vault, a config (cbt.toml) and a VM "web" of two disks (a
file-system-like image and a database-like file) whose hooks quiesce the
"application"; runs three days of backup jobs with realistic changes between
them, the pre hook succeeding on days 1 and 3 and failing on day 2 (that point
falls back to crash consistency and says why); restores the last point and
checks it bit for bit; and diffs the points of days 2 and 3, checking the
answer against an independent numpy comparison.  Exit code 2 if any check
fails.  It says what each day did (day 1 is the full baseline: every block
taken, all but holes read; later days read and store only what changed), why the config's
snapshot = "auto" chose the provider it did on this file system, where its
files are, how much room they take and how to remove them.  Afterwards, try
the printed commands on the demo's vault.

--json prints {"dir","vault","config","password_file","days":[{"day",
"recovery_point","consistency","consistency_reason","changed_blocks","blocks",
"bytes_read","bytes_new","bytes_stored","snapshots","changes"}],"restored",
"restore_bit_identical","diff","diff_truth_changed_blocks","agrees_with_truth",
"seconds","snapshot_reason","bytes_on_disk","vault_bytes_on_disk",
"remove_command","warnings"}.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from cbt.cli._common import (
    EXIT_ERROR,
    EXIT_OK,
    add_json,
    demo_size_arg,
    now_arg,
    print_json,
    say,
)

if TYPE_CHECKING:
    from cbt.jobs.demo import DemoDay, DemoReport


def dir_arg(text: str) -> str:
    """argparse type of ``--dir``: a local directory (the demo's disks, hooks and vault are
    made in it: an ``s3://`` location, or what reads as another host's, is refused)."""
    from cbt.core.errors import CbtValueError
    from cbt.repo.storage import check_location

    try:
        return check_location(text, frozenset())
    except CbtValueError as exc:
        raise argparse.ArgumentTypeError(f"the demo runs in a local directory: "
                                         f"{exc}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", metavar="D", type=dir_arg,
                   help="new or empty local directory (default: a fresh one)")
    p.add_argument("--now", type=now_arg, metavar="ISO8601",
                   help="day 1's time (days 2 and 3 follow a day apart; default: now)")
    p.add_argument("--size", type=demo_size_arg, default="128M", metavar="SIZE",
                   help="size of the os disk (the db disk is half of it; default 128M)")
    add_json(p)


def run(args: argparse.Namespace) -> int:
    from cbt.core.timefmt import parse_now
    from cbt.jobs.demo import run_demo

    report = run_demo(args.dir, args.size, parse_now(args.now) if args.now else None)
    code = EXIT_OK if report.agrees_with_truth else EXIT_ERROR
    if args.json:
        print_json(report.to_dict())
        return code
    _tell(report, args.size)
    return code


def _tell(report: DemoReport, size: int) -> None:
    """What happened, day by day, and where it all is (nothing with -q: the exit code
    says whether every check passed)."""
    from cbt.core.sizes import human_bytes

    say(f"cbt demo in {report.dir}: VM web with disks os ({human_bytes(size)}, a "
        f"file-system-like image) and db ({human_bytes(size // 2)}, a database-like file), "
        f"backed up once a day by the job in {os.path.basename(report.config)}")
    chosen = sorted(set(report.days[0].snapshots.values()))
    say(f"  snapshot \"auto\" chose {' and '.join(chosen)}: {report.snapshot_reason}")
    previous: DemoDay | None = None
    for day in report.days:
        say(f"  day {day.day}: {day.recovery_point}  {day.consistency} "
            f"({day.consistency_reason})")
        cost = f"{human_bytes(day.bytes_new)} new, {human_bytes(day.bytes_stored)} stored"
        if previous is None:
            # every block is in the point, but holes are not read: "N blocks read" was not
            say(f"         full baseline: all {day.changed_blocks} blocks taken, "
                f"{human_bytes(day.bytes_read)} read (holes are not); {cost}")
        else:
            say(f"         {day.changed_blocks} of {day.blocks} blocks changed since day "
                f"{previous.day} ({day.changes} writes, zeroings and holes made); "
                f"read {human_bytes(day.bytes_read)}, {cost}")
        previous = day
    ok = "bit-identical" if report.restore_bit_identical else "DIFFERENT"
    say(f"  restore of day 3 into {report.restored}: {ok}")
    for label, _, cs in report.diff.disks:
        truth = report.diff_truth_changed_blocks[label]
        say(f"  diff day 2 -> day 3, disk {label}: {cs.changed_blocks} blocks "
            f"changed ({human_bytes(cs.changed_bytes)}); numpy comparison: {truth}")
    say(f"  {'all checks passed' if report.agrees_with_truth else 'A CHECK FAILED'} in "
        f"{report.seconds:.1f} s.")
    say(f"  The demo's files take {human_bytes(report.bytes_on_disk)} on disk (the vault "
        f"{human_bytes(report.vault_bytes_on_disk)}); remove them all with:")
    say(f"    {report.remove_command()}")
    say("  Look around:")
    for command in report.suggested_commands():
        say(f"    {command}")
