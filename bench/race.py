#!/usr/bin/env python3
"""Speed race: ``cbt`` against ``borg``, ``restic`` and ``cp`` on the same disks, same run.

Usage (from anywhere; needs cbt importable and ``cbt`` installed)::

    python bench/race.py [--dir /var/tmp/cbt-race] [--size 2G] [--runs 3] [--block-size 16K]
                          [--sets ext4db,random,realistic]
                          [--tools cbt,cbt-enc,cbt-lz4,borg,restic,cp] [--json] [--keep]

``--sets`` and ``--tools`` narrow the race (cbt always runs: every ratio is
against it); only the targets whose tools ran are judged.

1. Installs ``borg`` (borgbackup) and ``restic`` with ``apt-get install -y``
   if either is missing.
2. Makes the data sets in ``--dir``, each as a day-0 and a day-1 copy, so
   every run starts from the same state:
   - *ext4db* (the default, and the set issue 17's targets are judged on:
     most data is compressible file-system and database content):
     ``bench/realset.py``, whose docstring has the recipe.  An ext4 image of
     ``--size``/2 made by ``mke2fs -t ext4 -d`` from the first files of
     /usr/share and /usr/lib of this machine (55% of the image; the tree's
     roots, file count, bytes and a digest of its files are in the recipe),
     changed over a day on a loop mount: 1% of its files deleted, 1%
     rewritten in place (1-4 pages each), 0.5% appended to, plus a growing
     syslog, new files (1% of the image) and an incompressible download
     (0.5%), and a directory tree copied in (2%).  A SQLite database of
     about ``--size``/4 (documents, customers, orders, events; four
     indexes; vacuumed): day 1 updates 3% of the orders and customers,
     prunes the oldest 5% of the events, deletes 1% of the orders, inserts
     4% more rows, then VACUUMs.  Needs root (a loop device).
   The other two sets are synthetic: their day-1 copy is
   ``cbt.synth.copy_sparse`` of day 0, then changed by ``cbt.synth.mutate``:
   - *random*: two fully allocated, incompressible disks of ``--size``
     (numpy ``default_rng``).  Day 1: scattered 4 KiB page writes, as many
     as 1% of the 16 KiB blocks, plus 4 runs of 0.5-1 MiB at unaligned
     offsets (no zeros, no holes: the disks stay fully allocated);
   - *realistic*: a file-system-like image of ``--size``
     (``make_fs_image``: random and text extents, zero regions, holes),
     changed like the random disks plus one zeroed region and one punched
     hole; and a database-like file of ``--size``/2 (``make_db_file``: 4 KiB
     pages, one in ten zero, a sparse tail) with 1% of its 4 KiB pages
     rewritten (which touches ~4% of the 16 KiB blocks and ~15% of the 64 KiB
     ones), 2 runs, one zeroed region and one hole.
   The change pattern does not depend on ``--block-size``: the 1% is
   counted in 16 KiB blocks, cbt's default.  The share of blocks that did
   change, as cbt counts them, is printed for every disk of every set.
3. Reads the set's files into the page cache (and checks with mincore that
   they stayed there) before each tool's turn.
4. Runs, ``--runs`` times (at least 3), interleaved run by run and in a
   rotating order (cbt borg restic cp, then borg restic cp cbt, ...), for
   each set:
   - ``cbt``: a fresh unencrypted vault (``cbt init --encryption none``, as
     borg runs ``-e none``), full backup of day 0, incremental backup of day 1
     (``--block-size``), restore of day 1 followed by ``sync`` of the restored
     files;
   - ``cbt-enc``: the same with an encrypted vault (``cbt init``'s default
     AEAD and scrypt cost, the passphrase in ``CBT_PASSWORD``); its one-time
     unlock (``cbt list`` of the new encrypted vault less ``cbt list`` of the
     new plain one: start-up is in both) is not counted in the encryption
     cost target (at most 15% on incremental backup and on restore);
   - ``cbt-lz4``: the same as ``cbt`` with a vault of ``cbt init --compression
     lz4`` (borg's codec here);
   - ``borg``: a fresh repository (``borg init --encryption none``), ``borg
     create --chunker-params fixed,BS -C lz4`` of day 0 then of day 1 (BS =
     cbt's block size in bytes), ``borg extract --sparse`` of day 1 + sync;
   - ``restic``: a fresh repository (``restic init``, a fixed password, the
     repository version and compression restic defaults to), ``restic
     backup`` of day 0 then of day 1, ``restic restore`` of day 1 + sync;
   - ``cp --sparse=always --reflink=never`` of the day-1 files + sync: the
     copy limit for a restore that fsyncs, as cbt's does.
   Times are the whole processes' wall clock (``time.perf_counter`` around
   ``subprocess.run``; a restore's includes its ``sync``), with their CPU time
   (user + sys, workers included).  ``sync FILE...`` flushes the restored
   files (an fsync of each) rather than the whole machine, so that other
   work's dirty pages are not charged to the restore.  The first run checks
   every tool's restored files against day 1, byte for byte (untimed).
   Vaults, repositories and restored files are removed as soon as they are
   measured, so the disk holds the data, one repository and one restore.
5. Peak memory of a backup of the largest disk: a dedicated run, full then
   incremental; ``max RSS`` is the largest single process (cbt or one of its
   workers: ``getrusage(RUSAGE_CHILDREN)`` in a small launcher, since a
   process's max RSS also counts the process it was forked from), ``peak PSS
   sum`` the peak of the summed proportional set size of cbt and its
   workers, sampled every 50 ms from /proc.

Bytes stored = growth of the vault or repository directory (apparent size
of its files, as ``du -sb``) over a backup; the tools' own figures are shown
beside it (cbt ``bytes_stored``, borg ``deduplicated_size`` of the archive,
restic ``data_added``, which is before compression).  ratio = peer seconds
/ cbt seconds, so > 1 means cbt is faster.

Targets (issue 17; printed with pass/miss for each set, judged on ext4db,
shown for reference on the others): incremental backup >= 5x faster than
borg, storing no more than borg; restore + sync >= 0.8x the speed of ``cp
--sparse=always`` + sync, and >= 3x faster than ``borg extract`` + sync
(cbt ``--encryption none``, borg ``-e none``; judged for ``cbt`` and, when it
ran, ``cbt-lz4``).  Exit status: 0 when everything ran (targets missed or
not), 2 on an error.

Disk use: the data (~1.2x ``--size`` for the ext4db set, ~4x for the random
set, ~3x for the realistic one), plus one repository and one restore at a
time; checked against the free space before starting (at the default 2G and
ext4db alone: ~5 GB at the peak).  Without ``--keep`` everything made in ``--dir`` is removed at the
end; with ``--keep`` the data sets (reused by the next run when made the
same way: a ``recipe.json`` vouches for them) and each set's last cbt vault
are kept.  borg's and restic's caches live in the run's scratch directory,
not in ``~/.cache``.

The ``cbt`` measured is the one installed beside this Python (not a pyenv
shim, whose own start-up would be charged to cbt); ``--cbt PATH`` picks
another.  Only numpy and cbt are needed besides the standard library; what
this script shares with ``bench/peers.py`` (options, page cache, timing,
tables) is in ``bench/harness.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import harness
import realset

from cbt.core.sizes import format_size, human_bytes
from cbt.source.synth import copy_sparse, make_db_file, make_fs_image, mutate

FORMAT = 1  # bump when the way the data sets are made changes
REF_BLOCK = 16 << 10  # "1% of blocks" is counted in these, whatever --block-size is
RESTIC_PASSWORD = "cbt-race"  # restic 0.14 has no --insecure-no-password
TOOLS = ("cbt", "cbt-enc", "cbt-lz4", "borg", "restic", "cp")
CBT_PASSWORD = "race-passphrase"  # cbt-enc's vault, given as CBT_PASSWORD
ENCRYPTION = "aes-256-gcm"  # cbt init's default; the scrypt cost is the default too
MAX_ENCRYPTION_COST = 0.15  # encrypted / plain - 1, the unlock (scrypt) not counted
OPS = (("full", "full backup (day 0)"), ("incr", "incremental backup (day 1)"),
       ("restore", "restore (day 1) + sync"))


# --------------------------------------------------------------------------- data sets

@dataclass
class Disk:
    label: str
    day0: Path
    day1: Path

    @property
    def name(self) -> str:
        return self.day0.name

    @property
    def size(self) -> int:
        return self.day1.stat().st_size


@dataclass
class DataSet:
    key: str
    title: str
    root: Path
    disks: list[Disk]
    recipe: dict[str, Any]

    def day(self, n: int) -> Path:
        return self.root / f"day{n}"

    @property
    def logical(self) -> int:
        return sum(d.size for d in self.disks)

    def files(self) -> list[Path]:
        return [p for d in self.disks for p in (d.day0, d.day1)]


def _stamp(paths: list[Path]) -> dict[str, list[int]]:
    """{"day0/disk1.img": [size, mtime_ns], ...}"""
    return {f"{p.parent.name}/{p.name}": [p.stat().st_size, p.stat().st_mtime_ns]
            for p in paths}


def _is_current(ds: DataSet) -> bool:
    try:
        meta = json.loads((ds.root / "recipe.json").read_text())
        return bool(meta.get("recipe") == ds.recipe
                    and meta.get("files") == _stamp(ds.files()))
    except (OSError, ValueError):
        return False


def random_set(work: Path, size: int) -> DataSet:
    root = work / "random"
    disks = [Disk(f"disk{i}", root / "day0" / f"disk{i}.img", root / "day1" / f"disk{i}.img")
             for i in (1, 2)]
    changes = {"page_writes": max(1, size // REF_BLOCK // 100), "runs": 4,
               "run_length": 1 << 20, "zero_runs": 0, "holes": 0}
    recipe = {"format": FORMAT, "kind": "random", "size": size, "seeds": [11, 12],
              "change_seeds": [111, 112], "changes": changes}
    return DataSet("random", "random set: 2 fully allocated incompressible disks", root,
                   disks, recipe)


def realistic_set(work: Path, size: int) -> DataSet:
    root = work / "realistic"
    db_size = max(size // 2 // harness.PAGE * harness.PAGE, harness.PAGE)
    disks = [Disk("fs", root / "day0" / "fs.img", root / "day1" / "fs.img"),
             Disk("db", root / "day0" / "db.img", root / "day1" / "db.img")]
    recipe = {
        "format": FORMAT, "kind": "realistic", "fs_size": size, "db_size": db_size,
        "seeds": [21, 22], "change_seeds": [121, 122],
        "fs_changes": {"page_writes": max(1, size // REF_BLOCK // 100), "runs": 4,
                       "run_length": 1 << 20, "zero_runs": 1, "holes": 1},
        "db_changes": {"page_writes": max(1, db_size // harness.PAGE // 100), "runs": 2,
                       "run_length": 1 << 20, "zero_runs": 1, "holes": 1},
    }
    return DataSet("realistic", "realistic set: a file-system image and a database file "
                   "(text, zeros, holes)", root, disks, recipe)


def ext4db_set(work: Path, size: int) -> DataSet:
    """The set the issue's targets are judged on (``bench/realset.py``): an ext4
    image of ``--size``/2 holding real files of this machine, and a SQLite
    database of about ``--size``/4."""
    root = work / "ext4db"
    fs_size = max(size // 2 // harness.PAGE * harness.PAGE, 32 << 20)
    recipe = realset.recipe(fs_size, max(size // 4, 4 << 20))
    disks = [Disk("ext4", root / "day0" / realset.IMAGE, root / "day1" / realset.IMAGE),
             Disk("db", root / "day0" / realset.DATABASE, root / "day1" / realset.DATABASE)]
    t = recipe["tree"]
    return DataSet("ext4db", f"ext4db set: an ext4 image of {t['files']} files "
                   f"({human_bytes(t['bytes'])}) from {', '.join(t['roots'])}, and a SQLite "
                   "database, changed over a day", root, disks, recipe)


def build(ds: DataSet) -> None:
    if _is_current(ds):
        harness.log(f"reusing {ds.root}")
        return
    harness.log(f"making {ds.root} ...")
    started = time.perf_counter()
    shutil.rmtree(ds.root, ignore_errors=True)
    if ds.recipe["kind"] == "ext4db":
        realset.build(ds.root, ds.recipe)
        _write_recipe(ds)
        harness.log(f"  done in {time.perf_counter() - started:.1f} s")
        return
    ds.day(0).mkdir(parents=True)
    ds.day(1).mkdir(parents=True)
    r = ds.recipe
    for i, d in enumerate(ds.disks):
        if r["kind"] == "random":
            harness.write_random(d.day0, r["size"], r["seeds"][i])
            changes = r["changes"]
        elif d.label == "fs":
            make_fs_image(d.day0, r["fs_size"], seed=r["seeds"][i])
            changes = r["fs_changes"]
        else:
            make_db_file(d.day0, r["db_size"], seed=r["seeds"][i])
            changes = r["db_changes"]
        harness.fsync_path(d.day0)
        copy_sparse(d.day0, d.day1)
        mutate(d.day1, r["change_seeds"][i], **changes)  # fsyncs
    _write_recipe(ds)
    harness.log(f"  done in {time.perf_counter() - started:.1f} s")


def _write_recipe(ds: DataSet) -> None:
    (ds.root / "recipe.json").write_text(
        json.dumps({"recipe": ds.recipe, "files": _stamp(ds.files())}, indent=1) + "\n")


# --------------------------------------------------------------------------- helpers

def regular_files(path: Path) -> list[Path]:
    return sorted(Path(d) / n for d, _dirs, names in os.walk(path) for n in names
                  if (Path(d) / n).is_file())


def same_content(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        if os.fstat(fa.fileno()).st_size != os.fstat(fb.fileno()).st_size:
            return False
        while True:
            x, y = fa.read(8 << 20), fb.read(8 << 20)
            if x != y:
                return False
            if not x:
                return True


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- running

class Runner:
    """Runs commands with the benchmark's environment and records their argv."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.env = harness.tool_env()
        self.env.update({
            "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
            "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
            "BORG_CHECK_I_KNOW_WHAT_I_AM_DOING": "NO",
            "RESTIC_PASSWORD": RESTIC_PASSWORD,
            "CBT_PASSWORD": CBT_PASSWORD,
        })
        self.commands: dict[str, str] = {}  # "set/tool/op" -> exact shell line

    def set_borg_home(self, home: Path) -> None:
        """borg's cache, config and security dirs in the scratch dir, not in ~."""
        self.env.update({"BORG_BASE_DIR": str(home), "BORG_CACHE_DIR": str(home / "cache"),
                         "BORG_CONFIG_DIR": str(home / "config"),
                         "BORG_SECURITY_DIR": str(home / "security")})

    def run(self, argv: list[str], cwd: Path | None = None, capture: bool = False,
            record: str | None = None) -> tuple[float, float, str]:
        """(wall seconds, cpu seconds, stdout) of one command; an error raises."""
        if record:
            line = shlex.join(argv)
            self.commands[record] = (f"cd {shlex.quote(str(cwd))} && {line}" if cwd
                                     else line)
        return harness.run_timed(argv, cwd=cwd, env=self.env, capture=capture)

    def restore(self, argv: list[str], out: Path, cwd: Path | None = None,
                record: str | None = None) -> tuple[float, float, str]:
        """A restore (or copy) into ``out``, then ``sync`` of the files it wrote: one time."""
        t, cpu, stdout = self.run(argv, cwd=cwd, capture=True, record=record)
        started = time.perf_counter()
        files = regular_files(out)
        if not files:
            raise harness.BenchError(f"{shlex.join(argv)} wrote nothing into {out}")
        _, cpu2, _ = self.run(["sync", *map(str, files)])
        t += time.perf_counter() - started  # the walk, then the sync
        if record:
            self.commands[record] += (f" && sync FILE...  (every file it wrote under "
                                      f"{shlex.quote(str(out))})")
        return t, cpu + cpu2, stdout


@dataclass
class Sample:
    """One run of one tool on one set."""

    seconds: dict[str, float] = field(default_factory=dict)  # op -> wall s
    cpu: dict[str, float] = field(default_factory=dict)
    growth: dict[str, int] = field(default_factory=dict)  # op -> repo growth (bytes)
    reported: dict[str, int] = field(default_factory=dict)  # op -> the tool's own figure
    total: int = 0  # repo size after day 1
    extra: dict[str, Any] = field(default_factory=dict)


def _last_json(stdout: str, key: str, value: str, missing: str) -> dict[str, Any]:
    """The last line of ``stdout`` that is a JSON object with ``key`` = ``value``."""
    for line in reversed(stdout.splitlines()):
        with contextlib.suppress(ValueError):
            obj = json.loads(line)
            if obj.get(key) == value:
                return obj  # type: ignore[no-any-return]
    raise harness.BenchError(f"{missing}: {stdout[-500:]}")


def _point_line(stdout: str) -> dict[str, Any]:
    return _last_json(stdout, "type", "point", "cbt backup printed no point line")


def _restic_summary(stdout: str) -> dict[str, Any]:
    return _last_json(stdout, "message_type", "summary", "restic backup printed no summary")


def verify_restore(ds: DataSet, out: Path, tool: str) -> dict[str, Any]:
    """Restored files equal the day-1 files, byte for byte (untimed)."""
    got = {p.name: p for p in regular_files(out)}
    alloc = 0
    for d in ds.disks:
        p = got.get(d.name) or got.get(f"{d.label}.img")  # cbt names a disk by its label
        if p is None:
            raise harness.BenchError(f"{tool} restore: {d.name} missing from {out} "
                             f"(found {sorted(got)})")
        if not same_content(p, d.day1):
            raise harness.BenchError(f"{tool} restore: {p} differs from {d.day1}")
        alloc += harness.allocated(p)
    return {"restored_allocated": alloc}


class Race:
    def __init__(self, args: argparse.Namespace, work: Path, runner: Runner,
                 exe: dict[str, str]) -> None:
        self.args = args
        self.work = work
        self.scratch = work / "run"
        self.runner = runner
        self.exe = exe
        self.bs = args.block_size

    # Each tool: fresh repository, full backup of day 0, incremental of day 1, restore.

    def run_cbt_enc(self, ds: DataSet, first: bool, last: bool) -> Sample:
        return self.run_cbt(ds, first, last, encrypted=True)

    def run_cbt_lz4(self, ds: DataSet, first: bool, last: bool) -> Sample:
        return self.run_cbt(ds, first, last, compression="lz4")

    def run_cbt(self, ds: DataSet, first: bool, last: bool, encrypted: bool = False,
                compression: str = "zstd") -> Sample:
        s = Sample()
        c = self.exe["cbt"]
        vault = self.scratch / "cbt-vault"
        tool = "cbt-enc" if encrypted else "cbt" if compression == "zstd" else f"cbt-{compression}"
        rec = f"{ds.key}/{tool}"
        self.runner.run([c, "init", "--encryption", ENCRYPTION if encrypted else "none",
                         "--compression", compression, str(vault)], record=f"{rec}/init")
        # The one-time unlock (scrypt): `cbt list` of the empty vault, timed for both
        # vaults; the difference is what unlocking costs (start-up is in both).
        s.extra["list"] = self.runner.run([c, "list", "--json", str(vault)],
                                          capture=True, record=f"{rec}/list")[0]
        size0 = harness.apparent(vault)
        points = []
        for day, op in ((0, "full"), (1, "incr")):
            disks = [f"{d.label}={d.day1 if day else d.day0}" for d in ds.disks]
            argv = [c, "backup", "--vm", ds.key, "--block-size", format_size(self.bs),
                    "--json", str(vault), *disks]
            t, cpu, out = self.runner.run(argv, capture=True, record=f"{rec}/{op}")
            point = _point_line(out)
            points.append(point)
            size1 = harness.apparent(vault)
            s.seconds[op], s.cpu[op] = t, cpu
            s.growth[op], size0 = size1 - size0, size1
            s.reported[op] = sum(d["bytes_stored"] for d in point["disks"])
        s.total = harness.apparent(vault)
        s.extra["changed"] = {d["label"]: [d["changed_blocks"], d["blocks"]]
                              for d in points[1]["disks"]}
        out_dir = self.scratch / "restore"
        argv = [c, "restore", "--json", str(vault), points[1]["recovery_point"],
                "--to", str(out_dir)]
        s.seconds["restore"], s.cpu["restore"], _ = self.runner.restore(
            argv, out_dir, record=f"{rec}/restore")
        if first:
            s.extra.update(verify_restore(ds, out_dir, tool))
        rmtree(out_dir)
        if self.args.keep and last:
            kept = self.work / "kept" / f"{ds.key}-{tool}-vault"
            rmtree(kept)
            kept.parent.mkdir(exist_ok=True)
            vault.rename(kept)
        rmtree(vault)
        return s

    def run_borg(self, ds: DataSet, first: bool, last: bool) -> Sample:
        s = Sample()
        b = self.exe["borg"]
        repo = self.scratch / "borg-repo"
        self.runner.set_borg_home(self.scratch / "borg-home")
        rec = f"{ds.key}/borg"
        names = [d.name for d in ds.disks]
        self.runner.run([b, "init", "--encryption", "none", str(repo)], record=f"{rec}/init")
        size0 = harness.apparent(repo)
        for day, op in ((0, "full"), (1, "incr")):
            argv = [b, "create", "--chunker-params", f"fixed,{self.bs}", "-C", "lz4",
                    f"{repo}::day{day}", *names]
            t, cpu, _ = self.runner.run(argv, cwd=ds.day(day), record=f"{rec}/{op}")
            size1 = harness.apparent(repo)
            s.seconds[op], s.cpu[op] = t, cpu
            s.growth[op], size0 = size1 - size0, size1
            _, _, info = self.runner.run([b, "info", "--json", f"{repo}::day{day}"],
                                         capture=True, record=f"{rec}/info" if day else None)
            s.reported[op] = int(json.loads(info)["archives"][0]["stats"]["deduplicated_size"])
        s.total = harness.apparent(repo)
        out_dir = self.scratch / "restore"
        out_dir.mkdir()
        argv = [b, "extract", "--sparse", f"{repo}::day1"]
        s.seconds["restore"], s.cpu["restore"], _ = self.runner.restore(
            argv, out_dir, cwd=out_dir, record=f"{rec}/restore")
        if first:
            s.extra.update(verify_restore(ds, out_dir, "borg"))
        rmtree(out_dir)
        rmtree(repo)
        rmtree(self.scratch / "borg-home")
        return s

    def run_restic(self, ds: DataSet, first: bool, last: bool) -> Sample:
        s = Sample()
        r = self.exe["restic"]
        repo = self.scratch / "restic-repo"
        cache = self.scratch / "restic-cache"
        base = [r, "-r", str(repo), "--cache-dir", str(cache)]
        rec = f"{ds.key}/restic"
        names = [d.name for d in ds.disks]
        self.runner.run([*base, "init"], record=f"{rec}/init")
        size0 = harness.apparent(repo)
        snap = ""
        for day, op in ((0, "full"), (1, "incr")):
            argv = [*base, "backup", "-q", "--json", *names]
            t, cpu, out = self.runner.run(argv, cwd=ds.day(day), capture=True,
                                          record=f"{rec}/{op}")
            summary = _restic_summary(out)
            snap = summary["snapshot_id"]
            size1 = harness.apparent(repo)
            s.seconds[op], s.cpu[op] = t, cpu
            s.growth[op], size0 = size1 - size0, size1
            s.reported[op] = int(summary.get("data_added", 0))
        s.total = harness.apparent(repo)
        out_dir = self.scratch / "restore"
        argv = [*base, "restore", snap, "--target", str(out_dir)]
        s.seconds["restore"], s.cpu["restore"], _ = self.runner.restore(
            argv, out_dir, record=f"{rec}/restore")
        if first:
            s.extra.update(verify_restore(ds, out_dir, "restic"))
        rmtree(out_dir)
        rmtree(repo)
        rmtree(cache)
        return s

    def run_cp(self, ds: DataSet, first: bool, last: bool) -> Sample:
        s = Sample()
        out_dir = self.scratch / "restore"
        out_dir.mkdir()
        argv = ["cp", "--sparse=always", "--reflink=never", *(str(d.day1) for d in ds.disks),
                str(out_dir)]
        s.seconds["restore"], s.cpu["restore"], _ = self.runner.restore(
            argv, out_dir, record=f"{ds.key}/cp/restore")
        if first:
            s.extra.update(verify_restore(ds, out_dir, "cp"))
        rmtree(out_dir)
        return s

    def race(self, ds: DataSet) -> dict[str, list[Sample]]:
        runs = self.args.runs
        tools = self.args.tools
        samples: dict[str, list[Sample]] = {t: [] for t in tools}
        fn = {"cbt": self.run_cbt, "cbt-enc": self.run_cbt_enc, "cbt-lz4": self.run_cbt_lz4,
              "borg": self.run_borg,
              "restic": self.run_restic, "cp": self.run_cp}
        for rnd in range(runs):
            order = tools[rnd % len(tools):] + tools[:rnd % len(tools)]
            line = []
            for tool in order:
                rmtree(self.scratch)
                self.scratch.mkdir(parents=True)
                cached = harness.ensure_cached(ds.files())
                if cached is not None and cached < 0.99:
                    harness.log(f"  warning: only {100 * cached:.0f}% of {ds.key} is in the "
                                "page cache")
                s = fn[tool](ds, rnd == 0, rnd == runs - 1)
                s.extra["cached_before"] = cached
                samples[tool].append(s)
                line.append(f"{tool} " + "/".join(f"{s.seconds[o]:.2f}" for o, _ in OPS
                                                 if o in s.seconds))
            harness.log(f"  {ds.key} run {rnd + 1}/{runs} (full/incr/restore s): "
                        + ", ".join(line))
        rmtree(self.scratch)
        return samples

    # Peak memory of a backup of the largest disk.

    def memory(self, disk: Disk, key: str) -> dict[str, Any]:
        c = self.exe["cbt"]
        rmtree(self.scratch)
        self.scratch.mkdir(parents=True)
        vault = self.scratch / "cbt-vault"
        self.runner.run([c, "init", "--encryption", "none", str(vault)])
        harness.ensure_cached([disk.day0, disk.day1])
        out: dict[str, Any] = {"disk": str(disk.day0), "size": disk.size}
        for day, op in ((0, "full"), (1, "incr")):
            argv = [c, "backup", "--vm", key, "--block-size", format_size(self.bs),
                    str(vault), f"{disk.label}={disk.day1 if day else disk.day0}"]
            self.runner.commands[f"memory/{op}"] = shlex.join(argv)
            out[op] = measure_memory(argv, self.runner.env)
        rmtree(self.scratch)
        return out


def _proc_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


# A small launcher between us and cbt: the max RSS the kernel reports for a process
# includes the RSS of the process it was forked from (the copy it exec'ed over), so
# cbt started from this benchmark's big process directly would report ours.
_LAUNCHER = ("import resource, subprocess, sys; "
             "rc = subprocess.run(sys.argv[1:], stdin=subprocess.DEVNULL, "
             "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode; "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def measure_memory(argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run ``argv``: max RSS of its largest process (getrusage(RUSAGE_CHILDREN) in a
    small launcher) and peak summed PSS of it and its workers (sampled)."""
    proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, *argv], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    peak = [0, 0]  # PSS sum, number of processes then
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            pids = [p for p in _proc_tree(proc.pid) if p != proc.pid]  # not the launcher
            total = sum(_pss(p) for p in pids)
            if total > peak[0]:
                peak[:] = [total, len(pids)]

    th = threading.Thread(target=sample, daemon=True)
    started = time.perf_counter()
    th.start()
    out, _ = proc.communicate()
    seconds = time.perf_counter() - started
    done.set()
    th.join()
    if proc.returncode != 0:
        raise harness.BenchError(f"{shlex.join(argv)} exited {proc.returncode}")
    return {"seconds": round(seconds, 3), "max_rss": int(out.split()[-1]) * 1024,
            "peak_pss_sum": peak[0], "processes_at_peak": peak[1]}


# --------------------------------------------------------------------------- report

def summarize(ds: DataSet, samples: dict[str, list[Sample]]) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for op, title in OPS:
        cbt_t = harness.median([s.seconds[op] for s in samples["cbt"]])
        for tool in samples:
            runs = [s for s in samples[tool] if op in s.seconds]
            if not runs:
                continue
            times = [s.seconds[op] for s in runs]
            row: dict[str, Any] = {
                "op": op, "operation": title, "tool": tool, "seconds": times,
                "median": harness.median(times), "min": min(times), "max": max(times),
                "cpu_median": harness.median([s.cpu[op] for s in runs]),
                "gbps": ds.logical / harness.median(times) / 1e9,
                "ratio": harness.median(times) / cbt_t,
                "spread": harness.spread(times),
            }
            if op in runs[0].growth:
                row["stored"] = int(harness.median([s.growth[op] for s in runs]))
                row["reported"] = int(harness.median([s.reported[op] for s in runs]))
                row["total"] = int(harness.median([s.total for s in runs]))
            rows.append(row)
    unlock = None
    if "cbt-enc" in samples:
        unlock = max(0.0, harness.median([s.extra["list"] for s in samples["cbt-enc"]])
                     - harness.median([s.extra["list"] for s in samples["cbt"]]))
    return {"rows": rows, "unlock": unlock, "targets": targets(rows, unlock)}


def _row(rows: list[dict[str, Any]], op: str, tool: str) -> dict[str, Any]:
    return next(r for r in rows if r["op"] == op and r["tool"] == tool)


def _ran(rows: list[dict[str, Any]], op: str, tool: str) -> bool:
    return any(r["op"] == op and r["tool"] == tool for r in rows)


def targets(rows: list[dict[str, Any]], unlock: float | None) -> list[dict[str, Any]]:
    """The targets whose tools ran (``--tools``)."""
    out = []
    for op in ("incr", "restore") if unlock is not None else ():
        plain, enc = _row(rows, op, "cbt")["median"], _row(rows, op, "cbt-enc")["median"]
        cost = (enc - unlock) / plain - 1
        out.append({"what": f"{dict(OPS)[op]}: encryption cost (cbt-enc - unlock) / cbt - 1",
                    "value": f"{100 * cost:+.1f}% (unlock {unlock:.2f} s not counted)",
                    "want": f"<= {100 * MAX_ENCRYPTION_COST:.0f}%",
                    "pass": cost <= MAX_ENCRYPTION_COST})
    for mine in ("cbt", "cbt-lz4"):  # (cbt-lz4: a vault of --compression lz4)
        if not _ran(rows, "incr", mine):
            continue
        for op, peer, want in (("incr", "borg", 5.0), ("restore", "cp", 0.8),
                               ("restore", "borg", 3.0)):
            if not _ran(rows, op, peer):
                continue
            r = _row(rows, op, peer)["median"] / _row(rows, op, mine)["median"]
            out.append({"what": f"{dict(OPS)[op]}: {peer} s / {mine} s", "value": round(r, 3),
                        "want": f">= {want:g}x", "pass": r >= want})
        if not _ran(rows, "incr", "borg"):
            continue
        a, b = _row(rows, "incr", mine)["stored"], _row(rows, "incr", "borg")["stored"]
        out.append({"what": f"incremental backup (day 1): bytes stored, {mine} vs borg",
                    "value": f"{human_bytes(a)} vs {human_bytes(b)} ({a / b:.2f}x)" if b else "-",
                    "want": f"{mine} <= borg", "pass": a <= b})
    return out


def _hb(n: int | None) -> str:
    return "-" if n is None else human_bytes(n)


def set_lines(ds: DataSet, info: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    out = [f"{ds.title} ({ds.root}/day0, day1):"]
    out += [f"  {d['label']}: {human_bytes(d['size'])} ({human_bytes(d['allocated'])} "
            f"allocated); day 1 differs in {d['changed_blocks']} of {d['blocks']} blocks of "
            f"{format_size(d['block_size'])} ({100 * d['changed_blocks'] / d['blocks']:.2f}%)"
            for d in info["disks"]]
    rows = [["operation", "tool", "median s", "min-max s", "cpu s", "GB/s", "stored",
             "(tool says)", "repo total", "ratio"]]
    for r in summary["rows"]:
        rows.append([r["operation"], r["tool"], f"{r['median']:.2f}",
                     f"{r['min']:.2f}-{r['max']:.2f}", f"{r['cpu_median']:.2f}",
                     f"{r['gbps']:.2f}", _hb(r.get("stored")), _hb(r.get("reported")),
                     _hb(r.get("total")) if r["op"] == "incr" else "",
                     "" if r["tool"] == "cbt" else f"{r['ratio']:.2f}x"])
    out += harness.table(rows, {2, 3, 4, 5, 6, 7, 8, 9})
    noisy = [f"{r['tool']} {r['op']}" for r in summary["rows"] if r["spread"] > harness.NOISY]
    if noisy:
        out.append(f"  noisy (max - min > {harness.NOISY:.0%} of the median): " + ", ".join(noisy))
    out += ["", "  targets (issue 17 judges them on this set):" if ds.key == JUDGED
            else f"  targets (for reference: issue 17 judges them on the {JUDGED} set):"]
    rows = [["", "measured", "want", "result"]]
    for t in summary["targets"]:
        v = t["value"] if isinstance(t["value"], str) else f"{t['value']:.2f}x"
        rows.append([t["what"], v, t["want"], "pass" if t["pass"] else "MISS"])
    out += ["  " + x for x in harness.table(rows, set())]
    return out


def human_report(result: dict[str, Any], sets: list[DataSet]) -> str:
    m = result["machine"]
    out = [
        harness.machine_line(m),
        f"software: cbt {m['cbt']} (Python {m['python']}), {m['borg']}, {m['restic']}, "
        f"{m['cp']}",
        f"runs: median of {result['runs']}, interleaved run by run in rotating order; "
        f"cbt block size {format_size(result['block_size'])}, borg fixed chunks of the "
        "same size; whole-process wall clock",
        f"cbt: a vault made with --encryption none (as borg -e none); cbt-enc: an encrypted "
        f"vault ({ENCRYPTION}, keyed BLAKE3 ids, default scrypt cost), its one-time unlock "
        "timed as `cbt list` of the new encrypted vault less `cbt list` of the new plain one; "
        "cbt-lz4: a plain vault of --compression lz4",
        "",
    ]
    for ds in sets:
        out += set_lines(ds, result["sets"][ds.key], result["sets"][ds.key]["summary"])
        out.append("")
    mem = result["memory"]
    out.append(f"peak memory of cbt backup of the largest disk ({mem['disk']}, "
               f"{human_bytes(mem['size'])}):")
    for op in ("full", "incr"):
        x = mem[op]
        out.append(f"  {dict(OPS)[op]}: max RSS {human_bytes(x['max_rss'])} (largest "
                   f"process); peak PSS sum {human_bytes(x['peak_pss_sum'])} over "
                   f"{x['processes_at_peak']} processes; {x['seconds']:.2f} s")
    out += [
        "",
        "ratio = peer seconds / cbt seconds (> 1: cbt faster); GB/s = logical size of the "
        "set's disks / median seconds; stored = growth of the vault/repository (apparent "
        "size of its files) over that backup, median; (tool says) = cbt bytes_stored, borg "
        "deduplicated_size, restic data_added (before compression); cpu s = median user + "
        "sys of the process and its workers; a restore's time includes sync of its files.",
        "",
        f"commands (exact; W = {result['dir']}):",
        f"  env: BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes "
        f"BORG_RELOCATED_REPO_ACCESS_IS_OK=yes BORG_BASE_DIR=$W/run/borg-home (and its "
        f"cache/, config/, security/) RESTIC_PASSWORD={RESTIC_PASSWORD} "
        f"CBT_PASSWORD={CBT_PASSWORD}",
    ]
    w = result["dir"]
    for key, line in result["commands"].items():
        out.append(f"  {key:<24} {line.replace(w, '$W')}")
    return "\n".join(out)


def set_result(ds: DataSet, samples: dict[str, list[Sample]], block_size: int) -> dict[str, Any]:
    """A set's part of the JSON: its disks as cbt saw them, every sample, the summary."""
    first = {t: samples[t][0].extra for t in samples}
    return {
        "disks": [{"label": d.label, "day0": str(d.day0), "day1": str(d.day1),
                   "size": d.size, "allocated": harness.allocated(d.day1),
                   "changed_blocks": first["cbt"]["changed"][d.label][0],
                   "blocks": first["cbt"]["changed"][d.label][1],
                   "block_size": block_size}
                  for d in ds.disks],
        "recipe": ds.recipe,
        "restored_allocated": {t: first[t].get("restored_allocated") for t in samples},
        "cached_after": min((c for c in map(harness.cached_fraction, ds.files())
                             if c is not None), default=None),
        "summary": summarize(ds, samples),
        "samples": {t: [{"seconds": s.seconds, "cpu": s.cpu, "growth": s.growth,
                         "reported": s.reported, "total": s.total}
                        for s in samples[t]] for t in samples},
    }


# --------------------------------------------------------------------------- main

SETS = {"random": random_set, "realistic": realistic_set, "ext4db": ext4db_set}
JUDGED = "ext4db"  # the set issue 17's targets are judged on


def _choice(p: argparse.ArgumentParser, option: str, text: str, known: Any,
            must: tuple[str, ...] = ()) -> tuple[str, ...]:
    """A comma-separated ``option`` as a tuple in ``known``'s order (``must`` added)."""
    names = {n.strip() for n in text.split(",") if n.strip()} | set(must)
    unknown = sorted(names - set(known))
    if unknown or not names:
        p.error(f"{option}: unknown {', '.join(unknown) or '(empty)'}; "
                f"choose from {', '.join(known)}")
    return tuple(k for k in known if k in names)


def estimate_disk_use(sets: tuple[str, ...], size: int, keep: bool,
                      kept_tools: int = 1) -> int:
    """Bytes at the peak: the sets' two days, one repository and one restore of a set,
    and with ``keep`` the last vault of each set and each cbt tool (``kept_tools``)."""
    day = {"random": 2 * size,
           "realistic": size * 8 // 10 + size // 2 * 7 // 8,  # holes
           "ext4db": size * 6 // 10}  # the image half full, the database; staging
    per_set = [day[k] for k in sets]
    data = 2 * sum(per_set)
    work = 2 * max(per_set) * 102 // 100
    kept = sum(per_set) * kept_tools if keep else 0
    return data + work + kept


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(
        "cbt against borg, restic and cp on the same data (see the module docstring)",
        "/var/tmp/cbt-race", "work directory",
        "2G", "size of each random disk (default 2G)")
    p.add_argument("--block-size", default="16K",
                   help="cbt's block size, and borg's fixed chunk size (default 16K)")
    harness.add_output_options(p)
    p.add_argument("--keep", action="store_true",
                   help="keep the data sets (reused next time) and the last cbt vaults")
    p.add_argument("--sets", default=JUDGED,
                   help=f"data sets to race, comma-separated, from {', '.join(SETS)} "
                        f"(default: {JUDGED}, the set the targets are judged on)")
    p.add_argument("--tools", default=",".join(TOOLS),
                   help=f"tools to race, comma-separated; cbt always runs (ratios are "
                        f"against it) (default: {','.join(TOOLS)})")
    args, size = harness.parse(p, argv)
    args.tools = _choice(p, "--tools", args.tools, TOOLS, must=("cbt",))
    args.sets = _choice(p, "--sets", args.sets, SETS)
    args.block_size = harness.size_arg(p, args.block_size)
    if size < (4 << 20) or size % harness.PAGE:
        p.error("--size must be a multiple of 4K, at least 4M")

    work = Path(args.dir).absolute()
    made_work = not work.exists()
    sets: list[DataSet] = []
    try:
        exe = {"cbt": harness.find_cbt(args.cbt)}
        for tool, package in (("borg", "borgbackup"), ("restic", "restic")):
            exe[tool] = harness.ensure_tool(tool, package) if tool in args.tools else ""

        work.mkdir(parents=True, exist_ok=True)
        sets = [make(work, size) for key, make in SETS.items() if key in args.sets]
        need = estimate_disk_use(args.sets, size, args.keep,
                                 sum(1 for t in args.tools if t.startswith("cbt")))
        have = shutil.disk_usage(work).free + sum(
            p.stat().st_size for ds in sets if _is_current(ds) for p in ds.files())
        harness.log(f"disk use at the peak: about {human_bytes(need)} "
                    f"({human_bytes(have)} available)")
        if need > have * 0.95:
            raise harness.BenchError(f"not enough space in {work}: need about {human_bytes(need)}, "
                             f"{human_bytes(have)} available (lower --size)")
        host = harness.machine({
            "borg": harness.version_of([exe["borg"], "--version"]) if exe["borg"] else "-",
            "restic": harness.version_of([exe["restic"], "version"]) if exe["restic"] else "-",
            "cp": harness.version_of(["cp", "--version"])})
        for ds in sets:
            build(ds)
        runner = Runner(work)
        race = Race(args, work, runner, exe)
        result: dict[str, Any] = {"dir": str(work), "runs": args.runs, "size": size,
                                  "block_size": args.block_size, "sets": {}}
        for ds in sets:
            harness.log(f"{ds.key}: reading into the page cache ...")
            cached = harness.ensure_cached(ds.files())
            harness.log(f"{ds.key}: {args.runs} runs of {', '.join(args.tools)} "
                        f"(cached {cached}) ...")
            result["sets"][ds.key] = set_result(ds, race.race(ds), args.block_size)
        largest = max((d for ds in sets for d in ds.disks), key=lambda d: harness.allocated(d.day0))
        harness.log(f"peak memory: cbt backup of {largest.day0} alone ...")
        result["memory"] = race.memory(largest, "memory")
        result["commands"] = runner.commands
        host["loadavg_after"] = list(os.getloadavg())
        result["machine"] = host
    except (harness.BenchError, realset.SetError) as exc:
        harness.log(f"{harness.prog()}: {exc}")
        return 2
    finally:
        rmtree(work / "run")
        if not args.keep:
            for ds in sets:
                rmtree(ds.root)
            rmtree(work / "kept")
            if made_work:
                with contextlib.suppress(OSError):
                    work.rmdir()

    harness.emit(args.json, lambda: result, lambda: human_report(result, sets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
