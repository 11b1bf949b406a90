"""Generate two days of a realistic disk image, scan and diff them.

In a new directory (--dir, default a fresh temporary one) cbt writes day0.img,
a file-system-like image with data, text, zero regions and holes; day1.img,
the same after a day of changes (scattered 4 KiB writes, runs straddling block
boundaries, a zeroed region, a punched hole, an append); and day0.arrow, the
manifest of day 0.  It diffs the manifest against day 1 and the two images
directly, and checks both answers against an independent numpy comparison.
Exit code 2 if they disagree.
"""

from __future__ import annotations

import argparse

from cbt.cli._common import EXIT_ERROR, EXIT_OK, add_json, print_json, size_arg


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", metavar="D", help="new or empty directory for the demo files")
    p.add_argument("--size", default="256M", metavar="SIZE",
                   help="size of the generated image (default 256M)")
    p.add_argument("--block-size", type=size_arg, default=None, metavar="SIZE",
                   help="block size (default 64K)")
    add_json(p)


def run(args: argparse.Namespace) -> int:
    from cbt.demo import run_demo
    from cbt.scan import DEFAULT_BLOCK_SIZE
    from cbt.sizes import format_size, human_bytes, parse_size

    report = run_demo(args.dir, parse_size(args.size), args.block_size or DEFAULT_BLOCK_SIZE)
    code = EXIT_OK if report["agrees_with_truth"] else EXIT_ERROR
    if args.json:
        print_json(report)
        return code
    s, cs = report["day0_scan"], report["diff"]
    print(f"cbt demo in {report['dir']}")
    print(f"  day0.img: {human_bytes(s['size'])}, {s['blocks']} blocks of "
          f"{format_size(s['block_size'])}: {s['data_blocks']} data, {s['zero_blocks']} zero, "
          f"{s['hole_blocks']} hole (holes never read)")
    kinds: dict[str, int] = {}
    for c in report["changes"]:
        kinds[c["kind"]] = kinds.get(c["kind"], 0) + 1
    print("  day1.img: day0 plus " + ", ".join(f"{n} {k}" for k, n in kinds.items()))
    print("  day0.arrow: the manifest of day 0 (an Arrow IPC file)")
    print(f"  cbt diff day0.arrow day1.img: {cs['changed_blocks']} of {cs['blocks']} blocks "
          f"changed, {human_bytes(cs['changed_bytes'])} in {len(cs['ranges'])} runs")
    verdict = "agrees" if report["agrees_with_truth"] else "DISAGREES"
    print(f"  byte-for-byte numpy comparison: {report['truth_changed_blocks']} changed blocks; "
          f"cbt {verdict} (manifest vs image and image vs image)")
    print(f"  done in {report['seconds']:.1f} s.  Try: cbt diff --ranges {report['day0']} "
          f"{report['day1']}")
    return code
