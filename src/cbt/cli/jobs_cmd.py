"""List the backup jobs recorded in a vault's job history, oldest first.

Every run of 'cbt backup --config' is recorded: its id, VM, policy, start and
end, status (running, succeeded, failed, interrupted), consistency, the
recovery point it made, per-disk bytes and seconds, its error, and the hooks
it ran.

--json prints {"jobs":[{"id","vm","policy","start","end","status",
"consistency","recovery_point","disks","error","hooks"}],"warnings"}; each of
"hooks" is {"phase","ok","exit_code","timed_out","seconds","error","stdout",
"stderr"} (phase pre, post or recover; the last 4 KiB of the hook's stdout and
stderr; exit_code null when it timed out or could not start).  A QEMU VM's guest
agent calls are listed there too, phase guest-freeze or guest-thaw, with
"file_systems" (how many it froze or thawed; null when it failed) and the
agent's error in "error".
"""

from __future__ import annotations

import argparse

from cbt.cli._common import (
    EXIT_OK,
    add_json,
    add_password_file,
    add_vault,
    open_vault,
    print_json,
    print_table,
    say,
    warn,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_vault(p, "the vault")
    p.add_argument("--vm", metavar="NAME", help="only this VM's jobs")
    add_password_file(p)
    add_json(p)


def run(args: argparse.Namespace) -> int:
    from cbt.repo.registry import list_jobs

    warnings: list[str] = []
    jobs = [j.to_dict() for j in list_jobs(open_vault(args), args.vm, warnings)]
    if args.json:
        print_json({"jobs": jobs, "warnings": warnings})
        return EXIT_OK
    for w in warnings:
        warn(w)
    if not jobs:
        say("no jobs")
        return EXIT_OK
    rows = [[j["start"], j["vm"], j["status"], j["consistency"] or "-",
             j["recovery_point"] or j["error"] or ""] for j in jobs]
    print_table(["start", "vm", "status", "consistency", "point or error"], rows)
    return EXIT_OK
