"""Show the whole backup flow on generated data, in a new directory.

cbt demo makes a vault, a config (cbt.toml) and a VM "web" of two disks (a
file-system-like image and a database-like file) whose hooks quiesce the
"application"; runs three days of backup jobs with realistic changes between
them, the pre hook succeeding on days 1 and 3 and failing on day 2 (that point
falls back to crash consistency and says why); restores the last point and
checks it bit for bit; and diffs the points of days 2 and 3, checking the
answer against an independent numpy comparison.  Exit code 2 if any check
fails.  Afterwards, try the printed commands on the demo's vault.
"""

from __future__ import annotations

import argparse

from cbt.cli._common import EXIT_ERROR, EXIT_OK, add_json, demo_size_arg, now_arg, print_json


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
    from cbt.core.sizes import human_bytes
    from cbt.core.timefmt import parse_now
    from cbt.jobs.demo import run_demo

    report = run_demo(args.dir, args.size, parse_now(args.now) if args.now else None)
    code = EXIT_OK if report.agrees_with_truth else EXIT_ERROR
    if args.json:
        print_json(report.to_dict())
        return code
    print(f"cbt demo in {report.dir}")
    for day in report.days:
        snaps = ", ".join(f"{k}: {v}" for k, v in day.snapshots.items())
        print(f"  day {day.day}: {day.recovery_point}  {day.consistency} "
              f"({day.consistency_reason})")
        print(f"         {day.changed_blocks} blocks changed, {human_bytes(day.bytes_new)}"
              f" new, {human_bytes(day.bytes_stored)} stored; snapshots {snaps}")
    ok = "bit-identical" if report.restore_bit_identical else "DIFFERENT"
    print(f"  restore of day 3 into {report.restored}: {ok}")
    for label, _, cs in report.diff.disks:
        truth = report.diff_truth_changed_blocks[label]
        print(f"  diff day 2 -> day 3, disk {label}: {cs.changed_blocks} blocks "
              f"changed ({human_bytes(cs.changed_bytes)}); numpy comparison: {truth}")
    print(f"  {'all checks passed' if code == EXIT_OK else 'A CHECK FAILED'} in "
          f"{report.seconds:.1f} s.  Look around:")
    for command in report.suggested_commands():
        print(f"    {command}")
    return code
