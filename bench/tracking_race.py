#!/usr/bin/env python3
"""Tracking race: a tracked incremental against ``--full-scan`` and ``borg create``.

Usage (as root: it makes a loop device, mounts file systems and drops the
page cache)::

    python bench/tracking_race.py [--dir /var/tmp/cbt-tracking] [--size 8G] [--runs 3]
                                  [--no-borg] [--check] [--fill 0.7] [--seed 13]
                                  [--cbt PATH] [--json]

1. Makes an XFS file system (``mkfs.xfs -m reflink=1``) on a loop device
   (``losetup --direct-io=on``, so the backing file is not cached twice)
   whose backing file is a sparse file in ``--dir``; everything below lives in
   it, and all of it (mounts, loop devices, files) is removed at the end, also
   after an error or Ctrl-C.
2. Makes the VM's disk there: a thin ``--size`` image holding an ext4 file
   system (``mke2fs -t ext4``, loop-mounted) filled with real files: copies of
   ``/usr``, each a seeded random selection (4 in 5) of its second-level
   directories in a seeded order, until ``--fill`` (default 70%) of the disk
   is used, plus one file of random bytes (10% of the disk); the rest is free
   space, holes in the image.  What it holds is printed.
3. Two encrypted vaults (``cbt init``'s default cipher, the passphrase in a
   0600 file given as ``--password-file``), each with a config of one VM with
   that one disk, ``snapshot = "reflink"``, its own ``snapshot_dir`` (so each
   keeps its own tracking base) and the default ``verify_fraction``; a first
   ``cbt backup --config`` into each (not timed); a borg repository
   (``borg init -e repokey-blake2``, ``BORG_PASSPHRASE``) and a first ``borg
   create`` of the image (not timed).
4. ``--runs`` rounds (at least 3).  Each changes 1% of the disk's 16 KiB
   blocks, one 4 KiB write of random bytes each, at a random 512-byte aligned
   offset inside the block (numpy ``default_rng(seed + round)``), fsyncs, then
   times, each after ``sync`` and ``echo 3 > /proc/sys/vm/drop_caches``, in an
   order rotating round by round:
   - ``tracked``: ``cbt backup --config tracked.toml --json`` (change tracking
     as cbt picks it: ``auto``);
   - ``full-scan``: ``cbt backup --config full.toml --full-scan --json`` (the
     other vault: the same change since its previous point);
   - ``borg``: ``borg create --chunker-params fixed,16384 --sparse -C lz4`` of
     the image file (borg has no block tracking: it reads the whole file).
   A cbt without ``--full-scan`` (before change tracking) runs the same
   command without it, and the report says so.
5. With ``--check``: the borg repository is removed (disk space), then the
   last point of each vault is restored (``cbt restore --disk disk``) and
   compared (``cmp``) with the snapshot it was made from (the vault's
   tracking base) and with the disk image.

Times are whole processes' wall clock (``time.perf_counter`` around
``subprocess.run``); cpu s = user + sys of the process and its workers;
"read from storage" = the processes' ``ru_inblock`` (bytes the block layer
read for them); "cbt says read" = ``bytes_read`` of ``--json``; stored =
growth of the vault or repository (apparent size of its files).  ratio =
seconds of the run / seconds of the tracked run.  Target (issue 13): tracked
at least 10x faster than ``--full-scan`` at 8 GiB.

Disk space: the image (``--fill`` + 14% of ``--size`` allocated), two vaults
and the borg repository (each 40-60% of the image's allocated bytes: the
files compress), a restore with ``--check`` (the borg repository is removed
first); checked against the free space in ``--dir`` before starting, with a
margin (the vaults counted at 60%).  At 8G with ``--check``: about 22 GiB
and 10 minutes; at 32G the default needs about 78 GiB (62 GiB with
``--no-borg``): lower ``--fill`` or run it where there is room.

Exit status: 0 when everything ran (target met or not, restores equal), 2 on
an error or a restore that differs, 130 when interrupted (after the cleanup).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import harness
import numpy as np

from cbt.core.sizes import format_size, human_bytes

BLOCK = 16 << 10  # cbt's default block size; "1% of blocks" is counted in these
WRITE = 4 << 10  # each change is one write of this many bytes
SECTOR = 512  # changes start on a sector boundary, as a guest's writes do
CHANGED = 0.01
FILL = 0.70  # share of the disk the copies of the tree fill (--fill)
RANDOM = 0.10  # share of the disk in one file of random bytes
TREE = Path("/usr")
PASSPHRASE = "tracking-race-passphrase"
TARGET = 10.0  # --full-scan seconds / tracked seconds
TOOLS = ("tracked", "full-scan", "borg")
VAULT_SHARE = 0.6  # a vault or borg repository, as a share of the image's allocated bytes


# --------------------------------------------------------------------------- scratch

class Interrupted(Exception):
    """SIGTERM or SIGHUP: unwind like Ctrl-C."""


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(f"signal {signal.Signals(signum).name}")


def run(argv: list[str], env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv``, its output captured.  Interrupted (Ctrl-C, SIGTERM), the command
    gets SIGTERM and up to 30 s to abort cleanly (cbt removes its snapshots) before
    SIGKILL, so that nothing of it holds the mounts the cleanup removes."""
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate()
    except BaseException:
        proc.terminate()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def sh(argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    """Run an untimed helper command, its stdout; an error raises :class:`harness.BenchError`."""
    proc = run(argv, env, cwd)
    if proc.returncode:
        raise harness.BenchError(f"{shlex.join(argv)} exited {proc.returncode}: "
                                 f"{proc.stderr.decode(errors='replace').strip()[-1000:]}")
    return proc.stdout.decode(errors="replace")


class Scratch:
    """The work directory, the loop device and the mounts: undone in reverse order."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.undo: list[tuple[str, str]] = []  # ("umount", dir) | ("detach", dev) | ("rm", dir)

    def make_dir(self) -> None:
        if self.work.exists():
            raise harness.BenchError(f"{self.work} exists (a previous run's leftovers?): "
                                     "remove it or pick another --dir")
        self.work.mkdir(parents=True)
        self.undo.append(("rm", str(self.work)))

    def loop(self, backing: Path) -> str:
        dev = sh(["losetup", "--find", "--show", "--direct-io=on", str(backing)]).strip()
        self.undo.append(("detach", dev))
        return dev

    def mount(self, what: str, where: Path, *options: str) -> None:
        where.mkdir(parents=True, exist_ok=True)
        sh(["mount", *options, what, str(where)])
        self.undo.append(("umount", str(where)))

    def umount(self, where: Path) -> None:
        """Unmount now (the mount is no longer needed)."""
        self.undo.remove(("umount", str(where)))
        _umount(str(where))

    def cleanup(self) -> None:
        while self.undo:
            what, arg = self.undo.pop()
            try:
                if what == "umount":
                    _umount(arg)
                elif what == "detach":
                    subprocess.run(["losetup", "-d", arg], check=False,
                                   stderr=subprocess.DEVNULL)
                else:
                    shutil.rmtree(arg, ignore_errors=True)
            except Exception as exc:  # keep undoing the rest
                harness.log(f"cleanup: {what} {arg}: {exc}")


def _umount(where: str) -> None:
    for _ in range(20):  # busy for a moment after a killed process
        if subprocess.run(["umount", where], stderr=subprocess.DEVNULL, check=False
                          ).returncode == 0 or not os.path.ismount(where):
            return
        time.sleep(0.5)
    harness.log(f"cleanup: {where} still busy: lazy unmount")
    subprocess.run(["umount", "-l", where], check=False)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


# --------------------------------------------------------------------------- the disk

def tree_units(root: Path) -> list[tuple[str, int]]:
    """``root``'s second-level entries (relative path, bytes allocated), first-level
    files and directories without subdirectories as themselves."""
    def allocated_under(p: Path) -> int:
        if not p.is_dir() or p.is_symlink():
            return p.lstat().st_blocks * 512
        total = 0
        for d, _dirs, names in os.walk(p):
            for n in names:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(d, n)).st_blocks * 512
        return total

    units = []
    for top in sorted(root.iterdir()):
        kids = sorted(top.iterdir()) if top.is_dir() and not top.is_symlink() else []
        for p in kids if any(k.is_dir() and not k.is_symlink() for k in kids) else [top]:
            units.append((str(p.relative_to(root)), allocated_under(p)))
    return units


def fill_tree(guest: Path, size: int, fill: float, seed: int) -> dict[str, Any]:
    """Copies of :data:`TREE` into ``guest`` until ``fill`` of ``size`` is used."""
    units = tree_units(TREE)
    target = int(size * fill)
    copies, files_bytes = 0, 0
    while True:
        st = os.statvfs(guest)
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        rng = np.random.default_rng(seed * 1000 + copies)
        order = rng.permutation(len(units))
        budget, picked = target - used, []
        for i in order:
            name, n = units[int(i)]
            if rng.random() < 0.8 and 0 < n <= budget:
                picked.append(name)
                budget -= n
        if not picked:
            break
        dest = guest / f"copy{copies}"
        dest.mkdir()
        harness.log(f"  copy {copies}: {len(picked)} directories of {TREE} ...")
        sh(["cp", "-a", "--parents", *picked, str(dest)], cwd=TREE)
        copies += 1
        files_bytes = harness.apparent(guest)
        if budget < target // 50:
            break
    return {"copies": copies, "files_bytes": files_bytes}


def make_disk(scratch: Scratch, disk: Path, size: int, fill: float,
              seed: int) -> dict[str, Any]:
    """A thin image of ``size`` holding an ext4 file system of real files and random data."""
    disk.parent.mkdir(parents=True, exist_ok=True)
    with open(disk, "wb") as f:
        f.truncate(size)
    sh(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "cbt-guest",
        "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard", str(disk)])
    guest = scratch.work / "guest"
    scratch.mount(str(disk), guest, "-o", "loop")
    info = fill_tree(guest, size, fill, seed)
    rnd = int(size * RANDOM) // harness.PAGE * harness.PAGE
    harness.log(f"  random.bin: {human_bytes(rnd)} of random bytes ...")
    harness.write_random(guest / "random.bin", rnd, seed)
    st = os.statvfs(guest)
    info["fs_used"] = (st.f_blocks - st.f_bfree) * st.f_frsize
    scratch.umount(guest)
    harness.fsync_path(disk)
    info |= {"random_bytes": rnd, "size": size, "allocated": harness.allocated(disk)}
    return info


def mutate(disk: Path, seed: int) -> int:
    """One 4 KiB write of random bytes in 1% of the 16 KiB blocks; returns how many."""
    size = disk.stat().st_size
    nblocks = size // BLOCK
    k = max(1, round(nblocks * CHANGED))
    rng = np.random.default_rng(seed)
    blocks = np.sort(rng.choice(nblocks, size=k, replace=False))
    within = rng.integers(0, (BLOCK - WRITE) // SECTOR + 1, size=k) * SECTOR
    data = rng.bytes(k * WRITE)
    fd = os.open(disk, os.O_RDWR)
    try:
        for i, (b, w) in enumerate(zip(blocks.tolist(), within.tolist(), strict=True)):
            os.pwrite(fd, data[i * WRITE:(i + 1) * WRITE], b * BLOCK + w)
        os.fsync(fd)
    finally:
        os.close(fd)
    return k


# --------------------------------------------------------------------------- running

@dataclass
class Run:
    tool: str
    round: int
    seconds: float
    cpu: float
    inblock: int  # bytes read from storage (ru_inblock)
    stored: int  # growth of the vault / repository
    said: dict[str, Any] = field(default_factory=dict)  # what the tool's --json said


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float, int, str]:
    """(wall s, cpu s, bytes read from storage, stdout) of one whole process."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = run(argv, env)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        tail = proc.stderr.decode(errors="replace").strip()[-2000:]
        raise harness.BenchError(f"{shlex.join(argv)} exited {proc.returncode}: {tail}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return seconds, cpu, (after.ru_inblock - before.ru_inblock) * 512, proc.stdout.decode()


def cbt_point(stdout: str) -> dict[str, Any]:
    """The ``point`` line of ``backup --config --json``: its one disk's figures."""
    for line in stdout.splitlines():
        msg = json.loads(line) if line.startswith("{") else {}
        if msg.get("type") == "error":
            raise harness.BenchError(f"cbt job failed: {msg.get('message')}")
        if msg.get("type") == "point":
            d = msg["disks"][0]
            keys = ("bytes_read", "changed_blocks", "blocks", "bytes_stored", "snapshot",
                    "change_source", "change_source_reason", "verified_blocks",
                    "hint_mismatches")
            return {k: d.get(k) for k in keys} | {"point": msg["recovery_point"],
                                                  "warnings": msg.get("warnings", [])}
    raise harness.BenchError("cbt backup --json printed no point")


class Race:
    def __init__(self, args: Any, scratch: Scratch, cbt: str) -> None:
        self.args = args
        self.cbt = cbt
        self.mnt = scratch.work / "mnt"
        self.disk = self.mnt / "vm" / "disk.img"
        self.password = scratch.work / "password"
        self.borg_repo = self.mnt / "borg"
        home = self.mnt / "borg-home"
        self.env = harness.tool_env(
            BORG_PASSPHRASE=PASSPHRASE, BORG_BASE_DIR=str(home),
            BORG_CACHE_DIR=str(home / "cache"), BORG_CONFIG_DIR=str(home / "config"),
            BORG_SECURITY_DIR=str(home / "security"))
        self.full_scan = "--full-scan" in sh([cbt, "backup", "--help"])
        self.commands: dict[str, str] = {}

    def vault(self, kind: str) -> Path:
        return self.mnt / f"vault-{kind}"

    def snapdir(self, kind: str) -> Path:
        return self.mnt / f"snap-{kind}"

    def config(self, kind: str) -> Path:
        return self.mnt / f"{kind}.toml"

    def argv(self, tool: str, archive: str = "") -> list[str]:
        if tool == "borg":
            return ["borg", "create", "--json", "--chunker-params", f"fixed,{BLOCK}", "--sparse",
                    "-C", "lz4", f"{self.borg_repo}::{archive}", str(self.disk)]
        kind = "tracked" if tool == "tracked" else "full"
        extra = ["--full-scan"] if tool == "full-scan" and self.full_scan else []
        return [self.cbt, "backup", "--config", str(self.config(kind)), *extra,
                "--password-file", str(self.password), "--json"]

    def setup(self) -> dict[str, float]:
        """Vaults, configs, borg repository, and the first (untimed) backups."""
        self.password.write_text(PASSPHRASE + "\n")
        self.password.chmod(0o600)
        for kind in ("tracked", "full"):
            sh([self.cbt, "init", "--password-file", str(self.password), str(self.vault(kind))])
            self.config(kind).write_text(
                f'vault = "{self.vault(kind)}"\n'
                '[policy.daily]\nschedule = "daily 02:00"\n'
                f'[vm.vm]\npolicy = "daily"\ndisks = {{ disk = "{self.disk}" }}\n'
                f'snapshot = "reflink"\nsnapshot_dir = "{self.snapdir(kind)}"\n')
        first: dict[str, float] = {}
        for tool in TOOLS:
            if tool == "borg" and self.args.no_borg:
                continue
            if tool == "borg":
                self._borg_init()
            drop_caches()
            harness.log(f"first backup: {tool} ...")
            t, _, _, out = timed(self.argv(tool, "r0"), self.env)
            if tool != "borg":
                point = cbt_point(out)
                harness.log(f"  {t:.1f} s, read {human_bytes(point['bytes_read'] or 0)}")
            first[tool] = round(t, 2)
        return first

    def _borg_init(self) -> None:
        sh(["borg", "init", "-e", "repokey-blake2", str(self.borg_repo)], self.env)

    def measure(self, tool: str, rnd: int) -> Run:
        repo = self.borg_repo if tool == "borg" else self.vault(
            "tracked" if tool == "tracked" else "full")
        before = harness.apparent(repo)
        argv = self.argv(tool, f"r{rnd}")
        self.commands[tool] = shlex.join(argv)
        drop_caches()
        t, cpu, inblock, out = timed(argv, self.env)
        said: dict[str, Any]
        if tool == "borg":
            stats = json.loads(out)["archive"]["stats"]
            said = {"deduplicated_size": stats.get("deduplicated_size")}
        else:
            said = cbt_point(out)
        return Run(tool, rnd, round(t, 3), round(cpu, 3), inblock, harness.apparent(repo) - before,
                   said)

    def rounds(self) -> tuple[list[Run], list[int]]:
        tools = [t for t in TOOLS if not (t == "borg" and self.args.no_borg)]
        runs: list[Run] = []
        changed: list[int] = []
        for rnd in range(1, self.args.runs + 1):
            changed.append(mutate(self.disk, self.args.seed + rnd))
            order = tools[rnd - 1:] + tools[:rnd - 1]  # rotates round by round
            line = []
            for tool in order:
                r = self.measure(tool, rnd)
                runs.append(r)
                src = r.said.get("change_source") or ""
                line.append(f"{tool} {r.seconds:.1f} s {src}".rstrip())
            harness.log(f"round {rnd}/{self.args.runs} ({changed[-1]} blocks changed): "
                        + ", ".join(line))
        return runs, changed

    def check(self) -> dict[str, Any]:
        """Restore the last point of each vault; compare it with its snapshot and the disk."""
        shutil.rmtree(self.borg_repo, ignore_errors=True)  # room for the restore
        out: dict[str, Any] = {}
        target = self.mnt / "restored.img"
        for kind in ("tracked", "full"):
            harness.log(f"check: restoring the last point of vault-{kind} ...")
            sh([self.cbt, "restore", str(self.vault(kind)), "vm.latest", "--disk", "disk",
                "--to", str(target), "--password-file", str(self.password)])
            base = self.snapdir(kind) / "vm" / "disk.base.img"  # the tracking base
            res = {"equal_disk": _cmp(target, self.disk)}
            if base.exists():
                res["equal_snapshot"] = _cmp(target, base)
            out[kind] = res
            target.unlink()
        return out


def _cmp(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)], check=False).returncode == 0


# --------------------------------------------------------------------------- report

def _source(said: dict[str, Any]) -> str:
    """``fiemap``, or ``hash (--full-scan)`` with the reason of a fallback."""
    reason = said.get("change_source_reason")
    return str(said["change_source"]) + (f" ({reason})" if reason else "")


def row(tool: str, mine: list[Run]) -> dict[str, Any]:
    """One tool's summary over its runs ``mine``: times, CPU, reads, growth and what the tool
    said (None where it said nothing); the caller adds its ``ratio``."""
    secs = [r.seconds for r in mine]
    sources = sorted({_source(r.said) for r in mine if r.said.get("change_source")})
    verified = [r.said["verified_blocks"] for r in mine
                if r.said.get("verified_blocks") is not None]
    said_read = [r.said["bytes_read"] for r in mine if r.said.get("bytes_read") is not None]
    return {
        "tool": tool, "seconds": secs, "median": harness.median(secs),
        "min": min(secs), "max": max(secs), "spread": harness.spread(secs),
        "cpu_median": harness.median([r.cpu for r in mine]),
        "inblock_median": int(harness.median([r.inblock for r in mine])),
        "bytes_read_median": int(harness.median(said_read)) if said_read else None,
        "stored_median": int(harness.median([r.stored for r in mine])),
        "change_sources": sources,
        "verified_median": int(harness.median(verified)) if verified else None,
        "hint_mismatches": sum(r.said.get("hint_mismatches") or 0 for r in mine),
    }


def summarize(runs: list[Run]) -> list[dict[str, Any]]:
    rows = []
    tracked = harness.median([r.seconds for r in runs if r.tool == "tracked"])
    for tool in TOOLS:
        mine = [r for r in runs if r.tool == tool]
        if mine:
            summary = row(tool, mine)
            rows.append({**summary, "ratio": summary["median"] / tracked})
    return rows


def human_report(res: dict[str, Any]) -> str:
    m, d = res["machine"], res["disk"]
    out = [
        harness.machine_line(m),
        f"software: cbt {m['cbt']} (Python {m['python']})"
        + (f", {m['borg']}" if res["borg"] else "; borg not run (--no-borg)"),
        f"file system: XFS (reflink=1) on a loop device (direct I/O) backed by a sparse file "
        f"in {res['dir']}",
        f"disk: {human_bytes(d['size'])} thin image of an ext4 file system: {d['copies']} "
        f"varied cop{'y' if d['copies'] == 1 else 'ies'} of {TREE} "
        f"({human_bytes(d['files_bytes'])} of files) and "
        f"{human_bytes(d['random_bytes'])} of random bytes; {human_bytes(d['fs_used'])} used "
        f"in the guest, {human_bytes(d['allocated'])} allocated in the image",
        f"each round: {res['changed'][0]} of {d['size'] // BLOCK} blocks of "
        f"{format_size(BLOCK)} changed (1%), one {format_size(WRITE)} write of random bytes "
        f"each at a {SECTOR}-byte aligned offset (seed {res['seed']} + round); page cache "
        "dropped before every timed run; order rotating round by round",
        f"cbt: encrypted vaults ({res['encryption']}), snapshot reflink, default "
        "verify_fraction" + (f"; borg: -e repokey-blake2, fixed {BLOCK}-byte chunks, --sparse, "
                             "-C lz4" if res["borg"] else ""),
        f"runs: median of {res['runs']}; whole-process wall clock",
    ]
    if not res["full_scan_flag"]:
        out.append("NOTE: this cbt has no --full-scan (change tracking not in it): the "
                   "'full-scan' run is the same command as the tracked one")
    rows = [["run", "median s", "min-max s", "cpu s", "GB/s", "cbt says read",
             "read from storage", "stored", "change source", "verified", "ratio"]]
    for r in res["summary"]:
        rows.append([r["tool"], f"{r['median']:.2f}", f"{r['min']:.2f}-{r['max']:.2f}",
                     f"{r['cpu_median']:.2f}", f"{d['size'] / r['median'] / 1e9:.2f}",
                     "-" if r["bytes_read_median"] is None else
                     human_bytes(r["bytes_read_median"]),
                     human_bytes(r["inblock_median"]), human_bytes(r["stored_median"]),
                     ", ".join(r["change_sources"]) or "-",
                     "-" if r["verified_median"] is None else str(r["verified_median"]),
                     "" if r["tool"] == "tracked" else f"{r['ratio']:.2f}x"])
    out += ["", *harness.table(rows, {1, 2, 3, 4, 5, 6, 7, 9, 10})]
    lied = [r["tool"] for r in res["summary"] if r["hint_mismatches"]]
    if lied:
        out.append("hint mismatches (the change source missed a change: hash-scanned): "
                   + ", ".join(lied))
    noisy = [r["tool"] for r in res["summary"] if r["spread"] > harness.NOISY]
    if noisy:
        out.append(f"noisy (max - min > {harness.NOISY:.0%} of the median): " + ", ".join(noisy))
    t = res["target"]
    out += ["", f"target: --full-scan s / tracked s >= {TARGET:g}x: {t['ratio']:.2f}x "
                f"{'pass' if t['pass'] else 'MISS'}"]
    for kind, c in (res.get("check") or {}).items():
        out.append(f"check: vault-{kind} last point restored: equal to the disk "
                   f"{c['equal_disk']}, to its snapshot {c.get('equal_snapshot', '-')}")
    warn = sorted({w for r in res["samples"] for w in r["said"].get("warnings") or []})
    out += [f"warning from cbt: {w}" for w in warn]
    p = res["phases"]
    out += ["", "wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in p.items()),
            f"vaults after the rounds: tracked {human_bytes(res['sizes']['tracked'])}, "
            f"full {human_bytes(res['sizes']['full'])}"
            + (f", borg {human_bytes(res['sizes']['borg'])}" if "borg" in res["sizes"] else ""),
            "first backups (untimed in the table): " + ", ".join(
                f"{k} {v:.1f} s" for k, v in res["first_backup_seconds"].items()),
            "", "ratio = run seconds / tracked seconds (> 1: tracked faster); GB/s = disk size "
            "/ median seconds; cbt says read = bytes_read; read from storage = ru_inblock of "
            "the process and its workers; stored = growth of the vault/repository (median); "
            "verified = verified_blocks (the sample of blocks the change source called "
            "unchanged, re-hashed)",
            "", f"commands (W = {res['dir']}, M = W/mnt, the XFS mount):"]
    out += [f"  {k:<10} {v.replace(res['mnt'], 'M').replace(res['dir'], 'W')}"
            for k, v in res["commands"].items()]
    return "\n".join(out)


# --------------------------------------------------------------------------- main

def need_bytes(size: int, fill: float, borg: bool, check: bool) -> int:
    """Host bytes at the peak: the image, the vaults and repository, a restore."""
    alloc = int(size * (fill + RANDOM + 0.04))
    repo = int(alloc * VAULT_SHARE)
    cow = 4 * size * CHANGED  # old and new extents of changed blocks, bases and rounds
    peak = alloc + 2 * repo + (repo if borg else 0) + int(cow)
    if check:
        peak = max(peak, alloc + 2 * repo + alloc + int(cow))  # borg removed first
    return peak + (2 << 30)


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(
        "tracked cbt incremental against --full-scan and borg (see the module docstring)",
        "/var/tmp/cbt-tracking", "work directory (made, and removed at the end)",
        "8G", "size of the VM's disk (default 8G)")
    p.add_argument("--no-borg", action="store_true", help="skip borg (disk space at 32G)")
    p.add_argument("--check", action="store_true",
                   help="restore the last point of each vault and cmp it with its snapshot")
    p.add_argument("--seed", type=int, default=13, help="seed of the content and the changes")
    p.add_argument("--fill", type=float, default=FILL,
                   help=f"share of the disk filled with copies of {TREE} (default {FILL}; "
                        f"{RANDOM} more is random bytes)")
    harness.add_output_options(p)
    args, size = harness.parse(p, argv)
    if size < (256 << 20) or size % BLOCK:
        p.error("--size must be a multiple of 16K, at least 256M")
    if not 0.05 <= args.fill <= 0.8:
        p.error("--fill must be from 0.05 to 0.8")
    if os.geteuid() != 0:
        p.error("run as root: it makes a loop device, mounts and drops the page cache")
    work = Path(args.dir).absolute()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    scratch = Scratch(work)
    started = time.perf_counter()
    phases: dict[str, float] = {}
    try:
        for tool in ("mkfs.xfs", "mke2fs", "losetup", "mount", "cmp", "cp"):
            if not shutil.which(tool):
                raise harness.BenchError(f"{tool} is not installed")
        if not args.no_borg and not shutil.which("borg"):
            raise harness.BenchError("borg is not installed (apt-get install borgbackup), "
                                     "or use --no-borg")
        cbt = harness.find_cbt(args.cbt)
        probe = work if work.exists() else work.parent
        need = need_bytes(size, args.fill, not args.no_borg, args.check)
        have = shutil.disk_usage(probe).free
        harness.log(f"disk space at the peak: about {human_bytes(need)} "
                    f"({human_bytes(have)} free in {probe})")
        if need > have:
            raise harness.BenchError(
                f"not enough space in {probe}: need about {human_bytes(need)}, "
                f"{human_bytes(have)} free (lower --size or --fill, or --no-borg)")
        host = harness.machine({"borg": "-" if args.no_borg
                                else harness.version_of(["borg", "--version"])})
        scratch.make_dir()
        backing = work / "xfs.img"
        with open(backing, "wb") as f:
            f.truncate(3 * size + (16 << 30))  # sparse: host space follows what is written
        dev = scratch.loop(backing)
        sh(["mkfs.xfs", "-q", "-m", "reflink=1", dev])
        race = Race(args, scratch, cbt)
        scratch.mount(dev, race.mnt)
        harness.log(f"making the disk ({human_bytes(size)}) ...")
        disk_info = make_disk(scratch, race.disk, size, args.fill, args.seed)
        phases["make disk"] = time.perf_counter() - started
        t0 = time.perf_counter()
        first = race.setup()
        phases["first backups"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        runs, changed = race.rounds()
        phases["rounds"] = time.perf_counter() - t0
        sizes = {k: harness.apparent(race.vault(k)) for k in ("tracked", "full")}
        if not args.no_borg:
            sizes["borg"] = harness.apparent(race.borg_repo)
        check = None
        if args.check:
            t0 = time.perf_counter()
            check = race.check()
            phases["check"] = time.perf_counter() - t0
        phases["total"] = time.perf_counter() - started
        summary = summarize(runs)
        full = next(r for r in summary if r["tool"] == "full-scan")
        host["loadavg_after"] = list(os.getloadavg())
        result: dict[str, Any] = {
            "dir": str(work), "mnt": str(race.mnt), "size": size, "runs": args.runs,
            "seed": args.seed, "fill": args.fill, "borg": not args.no_borg,
            "encryption": "aes-256-gcm", "machine": host,
            "full_scan_flag": race.full_scan, "disk": disk_info, "changed": changed,
            "first_backup_seconds": first, "summary": summary,
            "target": {"ratio": full["ratio"], "want": TARGET, "pass": full["ratio"] >= TARGET},
            "check": check, "sizes": sizes, "phases": {k: round(v, 1) for k, v in phases.items()},
            "commands": race.commands,
            "samples": [r.__dict__ for r in runs],
        }
    except (harness.BenchError, OSError) as exc:
        harness.log(f"{harness.prog()}: {exc}")
        return 2
    except (KeyboardInterrupt, Interrupted) as exc:
        harness.log(f"{harness.prog()}: interrupted ({str(exc) or 'Ctrl-C'}); cleaning up")
        return 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # let the cleanup finish
            signal.signal(sig, signal.SIG_IGN)
        harness.log("cleaning up (unmount, detach the loop device, remove the files) ...")
        scratch.cleanup()

    harness.emit(args.json, lambda: result, lambda: human_report(result))
    bad = [k for k, c in (check or {}).items() if not all(c.values())]
    if bad:
        harness.log(f"{harness.prog()}: restored points differ: {', '.join(bad)}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
