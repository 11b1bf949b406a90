#!/usr/bin/env python3
"""Reads through ``cbt mount`` against ``cbt restore`` of the same point.

Usage (root: FUSE)::

    python bench/mount_read.py [--dir /var/tmp/cbt-mount-read] [--size 256M] [--runs 3]
                               [--random-reads 4000] [--seed 16] [--plain] [--json]

1. Two disks of ``--size``: ``ext4``, a file system made with ``mkfs.ext4 -d`` from a
   tree of files (about 60% of it: half random bytes, half text; sizes 4 KiB to
   8 MiB), and ``random``, every byte random.
2. One vault (encrypted, the default, unless ``--plain``), one backup of each disk
   (64 KiB blocks, cbt's default).
3. Each run, for each disk, in this order:
   - ``restore``: ``cbt restore VAULT VM.latest --to DIR --force`` (the whole process);
   - ``sequential``: a fresh ``cbt mount VAULT VM.latest MNT``, then the whole image
     read in 1 MiB reads (``dd``-like, timed from the first read to the last);
   - ``random``: another fresh mount, ``--random-reads`` reads of 4 KiB at random
     4 KiB-aligned offsets (``--seed``).
   Mount start-up (to the line it prints once mounted) is timed apart (``mount_s``).
   The vault's files are in the page cache for every reader (read in before).
4. Throughput in MiB/s (2**20 bytes) of the disk's size (restore, sequential; and the
   sequential read with the mount's start-up counted, as restore's is) or of the bytes
   read (random); medians of the runs; ratios against restore.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (
    BenchError,
    add_output_options,
    emit,
    find_cbt,
    log,
    machine,
    machine_line,
    median,
    parse,
    parser,
    preread,
    run_timed,
    spread,
    table,
    tool_env,
    write_random,
)

PASSWORD = "bench mount read"


def _tree(root: Path, size: int, seed: int) -> None:
    """Files filling about 60% of ``size``: half random, half text, 4 KiB to 8 MiB."""
    rng = np.random.default_rng(seed)
    left, n = int(size * 0.6), 0
    while left > 0:
        length = min(left, int(rng.integers(4096, 8 << 20)))
        d = root / f"d{n % 16}"
        d.mkdir(parents=True, exist_ok=True)
        if n % 2:
            data = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
        else:
            line = b"".join(f"{i} the quick brown fox {n}\n".encode() for i in range(200))
            data = (line * (length // len(line) + 1))[:length]
        (d / f"f{n}").write_bytes(data)
        left -= length
        n += 1


def _disks(work: Path, size: int, seed: int) -> dict[str, Path]:
    out = {"ext4": work / "ext4.img", "random": work / "random.img"}
    if not out["ext4"].exists():
        tree = work / "tree"
        shutil.rmtree(tree, ignore_errors=True)
        _tree(tree, size, seed)
        with open(out["ext4"], "wb") as f:
            f.truncate(size)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(out["ext4"])],
                       check=True)
        shutil.rmtree(tree)
    if not out["random"].exists():
        write_random(out["random"], size, seed)
    return out


def _mount(cbt: str, vault: Path, point: str, mnt: Path, env: dict[str, str]
           ) -> tuple[subprocess.Popen[str], float]:
    """A ``cbt mount`` running; seconds until it said it is mounted."""
    started = time.perf_counter()
    p = subprocess.Popen([cbt, "mount", str(vault), point, str(mnt), "--json"], env=env,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None
    ready, _, _ = select.select([p.stdout], [], [], 120)
    if not ready or not p.stdout.readline():
        p.kill()
        raise BenchError(f"cbt mount did not mount: {p.communicate()[1].strip()}")
    return p, time.perf_counter() - started


def _unmount(p: subprocess.Popen[str]) -> None:
    p.send_signal(signal.SIGTERM)
    try:
        if p.wait(60) != 0:
            err = p.stderr.read() if p.stderr else ""
            raise BenchError(f"cbt mount exited {p.returncode}: {err.strip()}")
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise BenchError("cbt mount did not stop on SIGTERM") from None


def _sequential(image: Path) -> float:
    fd = os.open(image, os.O_RDONLY)
    try:
        started = time.perf_counter()
        while os.read(fd, 1 << 20):
            pass
        return time.perf_counter() - started
    finally:
        os.close(fd)


def _random(image: Path, offsets: list[int]) -> float:
    fd = os.open(image, os.O_RDONLY)
    try:
        started = time.perf_counter()
        for off in offsets:
            os.pread(fd, 4096, off)
        return time.perf_counter() - started
    finally:
        os.close(fd)


def _one_run(cbt: str, vault: Path, vm: str, size: int, offsets: list[int], work: Path,
             env: dict[str, str]) -> dict[str, float]:
    restore_s, _cpu, _ = run_timed([cbt, "restore", str(vault), f"{vm}.latest", "--to",
                                    str(work / "restored"), "--force"], env=env)
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    p, mount_s = _mount(cbt, vault, f"{vm}.latest", mnt, env)
    try:
        seq_s = _sequential(mnt / "disk.img")
    finally:
        _unmount(p)
    p, _ = _mount(cbt, vault, f"{vm}.latest", mnt, env)
    try:
        rand_s = _random(mnt / "disk.img", offsets)
    finally:
        _unmount(p)
    return {"restore_mib_s": size / restore_s / 2**20, "sequential_mib_s": size / seq_s / 2**20,
            "sequential_with_start_mib_s": size / (mount_s + seq_s) / 2**20,
            "random_mib_s": len(offsets) * 4096 / rand_s / 2**20,
            "random_iops": len(offsets) / rand_s, "mount_s": mount_s}


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0], "/var/tmp/cbt-mount-read",
               "work directory (disks, vault, restores)", "256M", "size of each disk")
    p.add_argument("--random-reads", type=int, default=4000, help="4 KiB random reads a run")
    p.add_argument("--seed", type=int, default=16)
    p.add_argument("--plain", action="store_true", help="an unencrypted vault")
    add_output_options(p)
    args, size = parse(p, argv)
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        raise BenchError("needs root and /dev/fuse (FUSE)")
    cbt = find_cbt(args.cbt)
    host = machine({"cbt": cbt})
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    env = tool_env(CBT_PASSWORD=PASSWORD)
    disks = _disks(work, size, args.seed)
    vault = work / ("vault-plain" if args.plain else "vault")
    if not vault.exists():
        log(f"backing up the disks into {vault}")
        run_timed([cbt, "init", str(vault), *(["--encryption", "none"] if args.plain else [])],
                  env=env)
        for vm, disk in disks.items():
            run_timed([cbt, "backup", str(vault), f"disk={disk}", "--vm", vm], env=env)
    for f in sorted(vault.rglob("*")):
        if f.is_file():
            preread(f)
    rng = np.random.default_rng(args.seed)
    offsets = (rng.integers(0, size // 4096, args.random_reads) * 4096).tolist()
    runs: dict[str, list[dict[str, float]]] = {vm: [] for vm in disks}
    for r in range(args.runs):
        for vm in disks:
            log(f"run {r + 1}/{args.runs}: {vm}")
            runs[vm].append(_one_run(cbt, vault, vm, size, offsets, work, env))
    shutil.rmtree(work / "restored", ignore_errors=True)
    host["loadavg_after"] = list(os.getloadavg())
    keys = ["restore_mib_s", "sequential_mib_s", "sequential_with_start_mib_s", "random_mib_s",
            "random_iops", "mount_s"]
    result: dict[str, Any] = {
        "machine": host, "size": size, "encrypted": not args.plain,
        "random_reads": args.random_reads,
        "disks": {vm: {k: median([x[k] for x in rs]) for k in keys}
                  | {"noisy": [k for k in keys if spread([x[k] for x in rs]) > 0.25]}
                  for vm, rs in runs.items()}}

    def report() -> str:
        rows = [["disk", "restore MiB/s", "mount seq MiB/s", "seq/restore", "seq+start MiB/s",
                 "mount 4K rand MiB/s", "rand/restore", "4K IOPS", "mount start s"]]
        for vm, d in result["disks"].items():
            rows.append([vm, f"{d['restore_mib_s']:.0f}", f"{d['sequential_mib_s']:.0f}",
                         f"{d['sequential_mib_s'] / d['restore_mib_s']:.2f}",
                         f"{d['sequential_with_start_mib_s']:.0f}",
                         f"{d['random_mib_s']:.1f}",
                         f"{d['random_mib_s'] / d['restore_mib_s']:.3f}",
                         f"{d['random_iops']:.0f}", f"{d['mount_s']:.2f}"])
        head = (f"{machine_line(result['machine'])}\n{size >> 20} MiB disks, "
                f"{'encrypted' if not args.plain else 'plain'} vault, medians of {args.runs}")
        return head + "\n" + "\n".join(table(rows, set(range(1, 9))))

    emit(args.json, lambda: result, report)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench/mount_read.py: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
