#!/usr/bin/env python3
"""Compare ``cbt scan`` / ``cbt diff`` with ``b3sum`` on the same files, same run.

Usage (from anywhere; needs cbt importable and ``cbt`` installed)::

    python bench/peers.py [--dir /var/tmp/cbt-bench] [--size 4G] [--runs 3]
                          [--ext4db] [--ext4db-size 2G] [--json]

1. Installs ``b3sum`` with ``apt-get install -y b3sum`` if it is missing.
2. Makes, in ``--dir``, three files of ``--size`` bytes (kept for the next run;
   a sidecar ``NAME.json`` records how each was made, and a file is rebuilt
   only when it no longer matches):
   - ``a.img``: fully allocated, incompressible (numpy ``default_rng``,
     written in 64 MiB chunks);
   - ``b.img``: a copy of ``a.img`` in which 1% of the 64 KiB blocks
     (scattered) differ, each by one rewritten 4 KiB page;
   - ``mixed.img``: a realistic file-system-like image from
     ``cbt.synth.make_fs_image`` (random and text extents, zeros, holes);
   plus ``tiny.img`` (64 KiB) to show the fixed start-up cost of a process;
   with ``--ext4db``, also the ext4db set of ``bench/race.py`` (made in
   ``--dir/ext4db`` at ``--ext4db-size``, as race's ``--size``; needs root):
   its ext4 image of real files on day 0 and day 1 (E0, E) and its SQLite
   database on day 1 (D).
3. Reads them all into the page cache; before every round, re-reads any
   file the kernel has partly evicted since (mincore), and reports it.
4. Runs every command once to warm up, then ``--runs`` more times (at least
   3), interleaved round by round (A B C ... A B C ...) so drift in the
   machine hits every command alike, and reports the median wall-clock time
   of the whole process (``time.perf_counter`` around ``subprocess.run``,
   output to /dev/null), with its CPU time (user + sys, workers included:
   less sensitive than wall clock to other load on the machine).  Commands
   whose runs spread by more than 25% of the median are flagged as noisy.

GB/s = logical size of one input file (1e9 bytes) / median seconds; ``cbt
diff`` reads two files, its figure counts one, as the comparison with hashing
one file does.  ratio = peer seconds / cbt seconds, so > 1 means cbt is faster.

Targets (issue 17; printed with pass/miss): ``cbt scan --workers 1
--block-size 64K`` >= 0.95x ``b3sum --num-threads 1``; ``cbt scan
--block-size 64K`` on all cores >= 0.95x ``b3sum``; ``cbt scan --workers 1
--block-size 4K`` >= 0.9x ``b3sum --num-threads 1``; ``cbt diff F G`` (two
files of ``--size``, 4G by default) >= 1.5x ``b3sum --num-threads 1 F``.
With ``--ext4db`` the same thresholds are judged again on real data (kind
``ext4db``): the scans of E against b3sum of E, the diff of E0 and E
against b3sum of E, and the one-worker scans of D.  The mixed file is
reported separately, without targets.  Exit status: 0 when everything ran
(targets missed or not), 2 on an error.

The ``cbt`` measured is the one installed beside this Python (not a pyenv
shim, whose own start-up would be charged to cbt); ``--cbt PATH`` picks another.
Only numpy and cbt are needed besides the standard library; what this script
shares with ``bench/race.py`` (options, page cache, timing, tables) is in
``bench/harness.py``.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import harness
import numpy as np
import race
import realset

from cbt.core.sizes import format_size, human_bytes
from cbt.source.synth import make_fs_image

BLOCK = 64 << 10
CHANGED = 0.01
FORMAT = 1  # bump when the way files are generated changes
SEED_A, SEED_CHANGES, SEED_MIXED = 1, 2, 3


# --------------------------------------------------------------------------- data files

def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _is_current(path: Path, recipe: dict[str, Any]) -> bool:
    """True when ``path`` exists as the sidecar says and was made by ``recipe``."""
    try:
        meta = json.loads(_sidecar(path).read_text())
        st = path.stat()
    except (OSError, ValueError):
        return False
    return bool(meta.get("recipe") == recipe and meta.get("st_size") == st.st_size
                and meta.get("mtime_ns") == st.st_mtime_ns)


def _commit(tmp: Path, path: Path, recipe: dict[str, Any]) -> None:
    """fsync, rename into place, then write the sidecar that vouches for it."""
    harness.fsync_path(tmp)
    os.replace(tmp, path)
    st = path.stat()
    meta = {"recipe": recipe, "st_size": st.st_size, "mtime_ns": st.st_mtime_ns}
    _sidecar(path).write_text(json.dumps(meta, indent=1) + "\n")


def make_random_pair(a: Path, b: Path, size: int) -> int:
    """Write ``a`` (incompressible, fully allocated) and ``b`` (1% of blocks
    differ); returns the number of differing 64 KiB blocks."""
    nblocks = -(-size // BLOCK)
    k = max(1, round(nblocks * CHANGED))
    recipe_a = {"format": FORMAT, "kind": "random", "size": size, "seed": SEED_A}
    recipe_b = {**recipe_a, "kind": "random-changed", "changed_blocks": k,
                "block_size": BLOCK, "changes_seed": SEED_CHANGES}
    if _is_current(a, recipe_a) and _is_current(b, recipe_b):
        harness.log(f"reusing {a} and {b}")
        return k
    harness.log(f"writing {a} and {b} ({human_bytes(size)} each, {k} blocks of 64K differ) ...")
    started = time.perf_counter()
    for p in (a, b):
        _sidecar(p).unlink(missing_ok=True)
    rng = np.random.default_rng(SEED_A)
    changes = np.random.default_rng(SEED_CHANGES)
    picks = np.sort(changes.choice(nblocks, size=k, replace=False))
    ta, tb = a.with_name(a.name + ".tmp"), b.with_name(b.name + ".tmp")
    fa = os.open(ta, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    fb = os.open(tb, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for pos in range(0, size, harness.CHUNK):
            n = min(harness.CHUNK, size - pos)
            chunk = rng.bytes(n)
            harness.write_all(fa, chunk)
            lo, hi = np.searchsorted(picks, [pos // BLOCK, -(-(pos + n) // BLOCK)])
            if lo == hi:
                harness.write_all(fb, chunk)
                continue
            other = bytearray(chunk)
            for blk in picks[lo:hi]:
                start = int(blk) * BLOCK - pos
                length = min(BLOCK, n - start)
                page = int(changes.integers(0, -(-length // harness.PAGE))) * harness.PAGE
                end = min(page + harness.PAGE, length)
                old = other[start + page:start + end]
                new = changes.bytes(end - page)
                while new == old:  # never "changed" to the same bytes
                    new = changes.bytes(end - page)
                other[start + page:start + end] = new
            harness.write_all(fb, other)
    finally:
        os.close(fa)
        os.close(fb)
    _commit(ta, a, recipe_a)
    _commit(tb, b, recipe_b)
    harness.log(f"  done in {time.perf_counter() - started:.1f} s")
    return k


def make_mixed(path: Path, size: int) -> None:
    recipe = {"format": FORMAT, "kind": "make_fs_image", "size": size, "seed": SEED_MIXED}
    if _is_current(path, recipe):
        harness.log(f"reusing {path}")
        return
    harness.log(f"writing {path} ({human_bytes(size)}, cbt.synth.make_fs_image) ...")
    started = time.perf_counter()
    _sidecar(path).unlink(missing_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    make_fs_image(tmp, size, seed=SEED_MIXED)
    _commit(tmp, path, recipe)
    harness.log(f"  done in {time.perf_counter() - started:.1f} s")


def make_tiny(path: Path) -> None:
    recipe = {"format": FORMAT, "kind": "random", "size": BLOCK, "seed": SEED_A}
    if _is_current(path, recipe):
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(np.random.default_rng(SEED_A).bytes(BLOCK))
    _commit(tmp, path, recipe)


# --------------------------------------------------------------------------- page cache

class CacheKeeper:
    """Before each round, re-read any file the kernel has partly evicted.

    On a machine whose page cache is under pressure (other jobs' files), a
    round would otherwise time disk reads for some commands and not others.
    Every re-read is counted and reported."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self.rereads: list[dict[str, Any]] = []

    def __call__(self, rnd: int) -> None:
        harness.ensure_cached(self.files, partial(self._evicted, rnd))

    def _evicted(self, rnd: int, f: Path, frac: float | None) -> None:
        if frac is not None:  # None: mincore could not tell, nothing to report
            harness.log(f"  {f.name} only {100 * frac:.1f}% in the page cache: reading it again")
            self.rereads.append({"round": rnd, "file": str(f), "cached": round(frac, 4)})


# --------------------------------------------------------------------------- timing

@dataclass
class Command:
    key: str
    label: str
    argv: list[str]
    nbytes: int  # logical size of one input, for GB/s (0: none)
    peer: str | None = None  # key of the command it is compared with
    ok_codes: tuple[int, ...] = (0,)
    section: str = "random"
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return harness.median(self.times)

    @property
    def gbps(self) -> float | None:
        return self.nbytes / self.median / 1e9 if self.nbytes and self.times else None


def measure(commands: list[Command], runs: int,
            before: Callable[[int], None] | None = None) -> None:
    """Round 0 warms up (discarded); rounds 1..runs are kept.  Interleaved.

    ``before(round)`` runs ahead of each round (untimed)."""
    for rnd in range(runs + 1):
        if before:
            before(rnd)
        what = "warm-up" if rnd == 0 else f"run {rnd}/{runs}"
        line = []
        for cmd in commands:
            t, cpu, _ = harness.run_timed(cmd.argv, cmd.ok_codes)
            if rnd:
                cmd.times.append(t)
                cmd.cpu.append(cpu)
            line.append(f"{cmd.key} {t:.2f}")
        harness.log(f"  {what}: " + ", ".join(line))


# --------------------------------------------------------------------------- report

TARGETS = [
    # (cbt key, peer key, threshold, strictly greater, kind): issue 17's table
    ("scan1", "b3sum1", 0.95, False, "target"),
    ("scanN", "b3sumN", 0.95, False, "target"),
    ("scan1_4k", "b3sum1", 0.9, False, "target"),
    ("diff", "b3sum1", 1.5, False, "target"),
    # the same on real data (--ext4db): the ext4 image, the database
    ("ext_scan1", "ext_b3sum1", 0.95, False, "ext4db"),
    ("ext_scanN", "ext_b3sumN", 0.95, False, "ext4db"),
    ("ext_scan1_4k", "ext_b3sum1", 0.9, False, "ext4db"),
    ("ext_diff", "ext_b3sum1", 1.5, False, "ext4db"),
    ("db_scan1", "db_b3sum1", 0.95, False, "ext4db"),
    ("db_scan1_4k", "db_b3sum1", 0.9, False, "ext4db"),
    ("mixed_scan1", "mixed_b3sum1", None, False, "info"),
    ("mixed_scanN", "mixed_b3sum1", None, False, "info"),
    ("mixed_scanN", "mixed_b3sumN", None, False, "info"),
]


def ratio(by_key: dict[str, Command], a: str, b: str) -> float:
    return by_key[b].median / by_key[a].median


def comparisons(by_key: dict[str, Command]) -> list[dict[str, Any]]:
    out = []
    for a, b, threshold, strict, kind in TARGETS:
        if a not in by_key or b not in by_key:
            continue
        r = ratio(by_key, a, b)
        # min over runs: the least disturbed run of each, a check on a noisy median
        r_min = min(by_key[b].times) / min(by_key[a].times)
        ok = None if threshold is None else (r > threshold if strict else r >= threshold)
        want = None if threshold is None else (f"> {threshold:g}x" if strict
                                               else f">= {threshold:g}x")
        out.append({"kind": kind, "cbt": by_key[a].label, "peer": by_key[b].label,
                    "ratio": round(r, 3), "ratio_of_mins": round(r_min, 3), "want": want,
                    "pass": ok})
    return out


def human_report(info: dict[str, Any], commands: list[Command],
                 comps: list[dict[str, Any]], files: dict[str, Any]) -> str:
    by_key = {c.key: c for c in commands}
    m = info["machine"]
    out = [
        f"machine: {m['cpu_model']}, nproc {m['nproc']} (usable {m['usable_cpus']}), "
        f"{human_bytes(m['memory'])} RAM, SIMD {' '.join(m['simd']) or '-'}, "
        f"Linux {m['kernel']}",
        f"software: cbt {m['cbt']}, Python {m['python']}, {m['b3sum']}",
        f"load average before/after: {harness.loadavg(m['loadavg_before'])}"
        f" / {harness.loadavg(m['loadavg_after'])}",
        f"runs: median of {info['runs']} (after 1 warm-up), interleaved; whole-process "
        "wall clock",
        "",
    ]
    if info["rereads"]:
        out.append(f"page cache: {len(info['rereads'])} re-read(s) of evicted files between "
                   "rounds (memory pressure from other jobs; see --json 'rereads')")
    for name, f in files.items():
        cached = "?" if f["cached"] is None else f"{100 * f['cached']:.0f}%"
        out.append(f"{name}: {f['path']}  {human_bytes(f['size'])} ({f['size']} bytes), "
                   f"{human_bytes(f['allocated'])} allocated, in page cache at the end {cached}"
                   + (f", {f['changed_blocks']} blocks of 64K differ from a.img"
                      if "changed_blocks" in f else ""))
    for section, title in (("random", "incompressible, fully allocated file (a.img, b.img)"),
                           ("mixed", "realistic mixed file (mixed.img: data, text, zeros, "
                                     "holes)"),
                           ("ext4db", "real data (--ext4db): the ext4db set's day-1 ext4 "
                                      "image (E) and database (D); the diff is of the "
                                      "image's day 0 (E0) and day 1"),
                           ("startup", "fixed start-up cost (tiny.img, 64 KiB)")):
        rows = [["command", "median s", "min s", "max s", "cpu s", "GB/s", "vs", "ratio"]]
        if not any(c.section == section for c in commands):
            continue
        for c in commands:
            if c.section != section:
                continue
            r = f"{ratio(by_key, c.key, c.peer):.2f}x" if c.peer else ""
            rows.append([c.label, f"{c.median:.3f}", f"{min(c.times):.3f}",
                         f"{max(c.times):.3f}", f"{harness.median(c.cpu):.3f}",
                         f"{c.gbps:.2f}" if c.gbps is not None else "-",
                         by_key[c.peer].label if c.peer else "", r])
        out += ["", title + ":", *harness.table(rows, {1, 2, 3, 4, 5, 7})]
    out += ["", "ratio = peer seconds / cbt seconds (> 1: cbt faster); GB/s = size of one "
            "input / median seconds; cpu s = median user + sys of the process and its workers"]
    noisy = [c.label for c in commands if c.nbytes and harness.spread(c.times) > harness.NOISY]
    if noisy:
        out.append(f"noisy (max - min > {harness.NOISY:.0%} of the median; rerun, or raise "
                   "--runs): " + "; ".join(noisy))
    out += ["", "targets:"]
    rows = [["", "cbt", "peer", "ratio", "want", "result", "ratio of mins"]]
    for comp in comps:
        res = "-" if comp["pass"] is None else ("pass" if comp["pass"] else "MISS")
        rows.append([comp["kind"], comp["cbt"], comp["peer"], f"{comp['ratio']:.2f}x",
                     comp["want"] or "-", res, f"{comp['ratio_of_mins']:.2f}x"])
    out += harness.table(rows, {3, 6})
    out.append("(result: from the ratio of medians; ratio of mins = fastest run against "
               "fastest run, for reference)")
    out += ["", "commands (exact argv; F = a.img, G = b.img, M = mixed.img; E0, E, D: the "
            "ext4db set's day-0 and day-1 ext4 images and day-1 database):"]
    out += [f"  {c.key:<13} {shlex.join(c.argv)}" for c in commands]
    return "\n".join(out)


def json_result(info: dict[str, Any], files: dict[str, Any], commands: list[Command],
                comps: list[dict[str, Any]]) -> dict[str, Any]:
    by_key = {cmd.key: cmd for cmd in commands}
    return {
        **info,
        "files": files,
        "commands": [{"key": cmd.key, "label": cmd.label, "argv": cmd.argv,
                      "command": shlex.join(cmd.argv), "seconds": cmd.times,
                      "median": round(cmd.median, 4),
                      "spread": round(harness.spread(cmd.times), 3),
                      "cpu_seconds": [round(x, 4) for x in cmd.cpu],
                      "gbps": None if cmd.gbps is None else round(cmd.gbps, 3),
                      "peer": cmd.peer,
                      "ratio": (round(ratio(by_key, cmd.key, cmd.peer), 3)
                                if cmd.peer else None)}
                     for cmd in commands],
        "comparisons": comps,
    }


# --------------------------------------------------------------------------- main

def ext_commands(c: str, b3sum: str, ext: list[Path]) -> list[Command]:
    """The ext4db set's commands: scans of its day-1 ext4 image (E) and database (D),
    and the diff of the image's two days (E0, E)."""
    e0, e, d = map(str, ext)
    ne, nd = ext[1].stat().st_size, ext[2].stat().st_size
    sec = "ext4db"
    return [
        Command("ext_scan1", "cbt scan --workers 1 --block-size 64K E",
                [c, "scan", "--workers", "1", "--block-size", "64K", e], ne, "ext_b3sum1",
                section=sec),
        Command("ext_b3sum1", "b3sum --num-threads 1 E", [b3sum, "--num-threads", "1", e],
                ne, section=sec),
        Command("ext_scanN", "cbt scan --block-size 64K E", [c, "scan", "--block-size", "64K", e],
                ne, "ext_b3sumN", section=sec),
        Command("ext_b3sumN", "b3sum E", [b3sum, e], ne, section=sec),
        Command("ext_scan1_4k", "cbt scan --workers 1 --block-size 4K E",
                [c, "scan", "--workers", "1", "--block-size", "4K", e], ne, "ext_b3sum1",
                section=sec),
        Command("ext_diff", "cbt diff E0 E", [c, "diff", e0, e], ne, "ext_b3sum1", (1,),
                section=sec),
        Command("db_scan1", "cbt scan --workers 1 --block-size 64K D",
                [c, "scan", "--workers", "1", "--block-size", "64K", d], nd, "db_b3sum1",
                section=sec),
        Command("db_b3sum1", "b3sum --num-threads 1 D", [b3sum, "--num-threads", "1", d],
                nd, section=sec),
        Command("db_scan1_4k", "cbt scan --workers 1 --block-size 4K D",
                [c, "scan", "--workers", "1", "--block-size", "4K", d], nd, "db_b3sum1",
                section=sec),
    ]


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(
        "cbt scan/diff against b3sum on the same files (see the module docstring)",
        "/var/tmp/cbt-bench", "work directory (kept)",
        "4G", "size of each generated file (default 4G)")
    p.add_argument("--ext4db", action="store_true",
                   help="also time the ext4db set's images (bench/realset.py; made in "
                        "--dir/ext4db, needs root)")
    p.add_argument("--ext4db-size", default="2G",
                   help="the ext4db set's size, as bench/race.py --size (default 2G: a 1 GiB "
                        "image and a database of about 512 MiB)")
    harness.add_output_options(p)
    args, size = harness.parse(p, argv)
    if size < BLOCK:
        p.error("--size must be at least 64K")
    ext4db_size = harness.size_arg(p, args.ext4db_size)

    try:
        b3sum = harness.ensure_tool("b3sum", "b3sum")
        host = harness.machine({"b3sum": harness.version_of(["b3sum", "--version"])}, cpus=True)
        cbt_exe = harness.find_cbt(args.cbt)
        work = Path(args.dir)
        work.mkdir(parents=True, exist_ok=True)
        fa, fb, fm, ft = (work / n for n in ("a.img", "b.img", "mixed.img", "tiny.img"))
        changed = make_random_pair(fa, fb, size)
        make_mixed(fm, size)
        make_tiny(ft)
        inputs = [fa, fb, fm, ft]
        ext: list[Path] = []  # E0, E, D: the ext4 image on day 0 and 1, the database
        if args.ext4db:
            ds = race.ext4db_set(work.absolute(), ext4db_size)
            race.build(ds)
            ext = [ds.disks[0].day0, ds.disks[0].day1, ds.disks[1].day1]
            inputs += ext
        harness.log("reading the files into the page cache ...")
        for f in inputs:
            harness.preread(f)

        F, G, M, T = str(fa), str(fb), str(fm), str(ft)
        c = cbt_exe
        commands = [
            Command("scan1", "cbt scan --workers 1 --block-size 64K F",
                    [c, "scan", "--workers", "1", "--block-size", "64K", F], size, "b3sum1"),
            Command("b3sum1", "b3sum --num-threads 1 F", [b3sum, "--num-threads", "1", F], size),
            Command("scanN", "cbt scan --block-size 64K F",
                    [c, "scan", "--block-size", "64K", F], size, "b3sumN"),
            Command("b3sumN", "b3sum F", [b3sum, F], size),
            Command("diff", "cbt diff F G", [c, "diff", F, G], size, "b3sum1", (1,)),
            Command("scan1_4k", "cbt scan --workers 1 --block-size 4K F",
                    [c, "scan", "--workers", "1", "--block-size", "4K", F], size, "b3sum1"),
            Command("mixed_scan1", "cbt scan --workers 1 --block-size 64K M",
                    [c, "scan", "--workers", "1", "--block-size", "64K", M], size,
                    "mixed_b3sum1", section="mixed"),
            Command("mixed_b3sum1", "b3sum --num-threads 1 M",
                    [b3sum, "--num-threads", "1", M], size, section="mixed"),
            Command("mixed_scanN", "cbt scan --block-size 64K M",
                    [c, "scan", "--block-size", "64K", M], size, "mixed_b3sumN",
                    section="mixed"),
            Command("mixed_b3sumN", "b3sum M", [b3sum, M], size, section="mixed"),
            *(ext_commands(c, b3sum, ext) if ext else []),
            Command("tiny_scan1", "cbt scan --workers 1 --block-size 64K tiny",
                    [c, "scan", "--workers", "1", "--block-size", "64K", T], 0,
                    "tiny_b3sum1", section="startup"),
            Command("tiny_b3sum1", "b3sum --num-threads 1 tiny",
                    [b3sum, "--num-threads", "1", T], 0, section="startup"),
            Command("tiny_help", "cbt --help", [c, "--help"], 0, section="startup"),
        ]

        # Sanity, untimed: the diff finds exactly the blocks made to differ.
        out = subprocess.run([c, "diff", "--json", F, G], capture_output=True, text=True,
                             check=False)
        if out.returncode != 1:
            raise harness.BenchError(f"cbt diff --json exited {out.returncode}: "
                                     f"{out.stderr.strip()}")
        try:
            found = json.loads(out.stdout)["changed_blocks"]
        except (ValueError, KeyError, TypeError):
            raise harness.BenchError(f"{c} diff --json printed no changed_blocks: "
                             f"{out.stdout[:200]!r}") from None
        if found != changed:
            raise harness.BenchError(f"cbt diff found {found} changed blocks, "
                                     f"{changed} were made")

        harness.log(f"timing {len(commands)} commands, 1 warm-up + {args.runs} runs, "
                    "interleaved ...")
        keeper = CacheKeeper(inputs)
        measure(commands, args.runs, keeper)
        load_after = list(os.getloadavg())
        names = ["F", "G", "M"] + (["E0", "E", "D"] if ext else [])
        files: dict[str, Any] = {
            name: {"path": str(f), "size": f.stat().st_size, "allocated": harness.allocated(f),
                   "cached": harness.cached_fraction(f)}
            for name, f in zip(names, [fa, fb, fm, *ext], strict=True)}
        files["G"]["changed_blocks"] = changed
    # a failed command, a full disk, no root for the ext4db set: one line, exit 2
    except (harness.BenchError, realset.SetError, OSError) as exc:
        harness.log(f"{harness.prog()}: {exc}")
        return 2

    by_key = {cmd.key: cmd for cmd in commands}
    comps = comparisons(by_key)
    info: dict[str, Any] = {"machine": host | {"loadavg_after": load_after},
                            "runs": args.runs, "size": size, "dir": str(work),
                            "rereads": keeper.rereads}
    harness.emit(args.json, lambda: json_result(info, files, commands, comps),
         lambda: human_report(info, commands, comps, files), f"size {format_size(size)}; ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
