#!/usr/bin/env python3
"""QEMU race: a running VM's incremental from its dirty bitmap against a hash read of it.

Usage (as root: it loop-mounts the guest file system while it fills it, and
drops the page cache)::

    python bench/qemu_race.py [--dir /var/tmp/cbt-qemu-race] [--size 4G] [--runs 3]
                              [--change 0.01] [--write 64K] [--fill 0.7] [--seed 17]
                              [--encrypted] [--check] [--cbt PATH] [--json]

1. The VM's disk: an ext4 file system of real files (copies of ``/usr``
   until ``--fill`` of the disk is used, plus 10% of random bytes: the
   tracking race's disk, :func:`tracking_race.make_disk`), made as a raw image
   and converted to a ``--size`` qcow2 (``qemu-img convert``: free space stays
   unallocated in the qcow2).
2. A ``qemu-storage-daemon`` serves it as the running VM: its QMP socket, and
   its own NBD server with a writable export of the disk (the "guest" writes
   through it); the VM's config names both (``qmp``, ``nbd``: cbt adds its
   read-only exports to that server).  The disk is opened with
   ``cache.direct=on`` (O_DIRECT: "cache=none", how Proxmox and libvirt run
   VM disks by default), so every read of it is a read of the host's disk,
   whatever the page cache holds; the page cache is not dropped (cbt's
   program files stay warm, as on a host that backs up every day).  One vault (plain unless
   ``--encrypted``), one config, a first ``cbt backup --config`` (not timed).
3. ``--runs`` rounds; each round times two incrementals of the same VM, in an
   order rotating round by round, each after its own rewrite of ``--change``
   (1%) of the disk through the NBD export (``qemu-io`` writes of ``--write``
   bytes of fresh random data at random ``--write``-aligned offsets, seeded)
   and ``sync``:
   - ``bitmap``: ``cbt backup --config vm.toml --json`` (the dirty bitmap of
     the previous point says what changed: ``change_source`` ``qemu-bitmap``;
     the default ``verify_fraction`` re-hashes its sample of the rest);
   - ``bitmap-0``: the same VM and vault through a second config that only
     adds ``verify_fraction = 0`` (no sample: what the bitmap alone costs);
   - ``hash``: the same with ``--full-scan`` (every allocated block read over
     NBD and hashed: what a run without the bitmap costs).
4. With ``--check``: the last point is restored and compared (``cmp``) with
   the guest's view of the disk read through the NBD export
   (``qemu-img convert -O raw``).

Times are whole processes' wall clock; ratio = hash seconds / the run's seconds.
Target (issue 14): the bitmap incremental at least 20x faster.  Everything
(the daemon, the files, the mount) is removed at the end, also after an error
or Ctrl-C.  Disk space: the qcow2 (``--fill`` + 10% of ``--size``), the
vault (about half of that: the files compress), a restore with ``--check``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import harness
import numpy as np
import tracking_race as tr

from cbt.core.sizes import format_size, human_bytes, parse_size

TARGET = 20.0
TOOLS = ("bitmap", "bitmap-0", "hash")
PASSPHRASE = "qemu race passphrase"


class Vm:
    """The qcow2 disk served by a qemu-storage-daemon: QMP, NBD server, writable export."""

    def __init__(self, work: Path, disk: Path) -> None:
        self.work = work
        self.disk = disk
        self.qmp = work / "qmp.sock"
        self.nbd = work / "nbd.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///guest?socket={self.nbd}"

    def start(self) -> None:
        argv = ["qemu-storage-daemon",
                "--blockdev",
                f"driver=file,node-name=file0,filename={self.disk},cache.direct=on",
                "--blockdev", "driver=qcow2,node-name=disk0,file=file0",
                "--nbd-server", f"addr.type=unix,addr.path={self.nbd}",
                "--export", "type=nbd,id=guest,node-name=disk0,name=guest,writable=on",
                "--chardev", f"socket,id=qmp0,path={self.qmp},server=on,wait=off",
                "--monitor", "chardev=qmp0"]
        self.proc = harness.start_server(argv, [self.qmp, self.nbd], "qemu-storage-daemon")

    def stop(self) -> None:
        harness.stop_server(self.proc)
        self.proc = None

    def rewrite(self, share: float, write: int, seed: int) -> int:
        """Fresh random bytes over ``share`` of the disk through the NBD export; how many
        writes (of ``write`` bytes at ``write``-aligned offsets)."""
        size = self.disk_size()
        slots = size // write
        k = max(1, round(slots * share))
        rng = np.random.default_rng(seed)
        picked = np.sort(rng.choice(slots, size=k, replace=False))
        src = self.work / "writes"
        src.mkdir()
        try:
            cmds = []
            for i, slot in enumerate(picked.tolist()):
                f = src / f"{i}"
                f.write_bytes(rng.bytes(write))
                cmds += ["-c", f"write -q -s {f} {slot * write} {write}"]
            tr.sh(["qemu-io", "-f", "raw", self.uri, *cmds, "-c", "flush"])
        finally:
            shutil.rmtree(src, ignore_errors=True)
        return k

    def disk_size(self) -> int:
        out = tr.sh(["qemu-img", "info", "--output=json", "-U", str(self.disk)])
        import json

        return int(json.loads(out)["virtual-size"])


class Race:
    def __init__(self, args: Any, work: Path, cbt: str, vm: Vm) -> None:
        self.args = args
        self.cbt = cbt
        self.vm = vm
        self.vault = work / "vault"
        self.config = work / "vm.toml"
        self.config_0 = work / "vm-0.toml"  # the same VM and vault, verify_fraction = 0
        self.password = work / "password"
        self.env = harness.tool_env()
        self.commands: dict[str, str] = {}

    def argv(self, tool: str) -> list[str]:
        extra = ["--full-scan"] if tool == "hash" else []
        pw = ["--password-file", str(self.password)] if self.args.encrypted else []
        config = self.config_0 if tool == "bitmap-0" else self.config
        return [self.cbt, "backup", "--config", str(config), *extra, *pw, "--json"]

    def setup(self) -> float:
        enc = ["--password-file", str(self.password)] if self.args.encrypted else [
            "--encryption", "none"]
        self.password.write_text(PASSPHRASE + "\n")
        self.password.chmod(0o600)
        tr.sh([self.cbt, "init", *enc, str(self.vault)])
        text = (f'vault = "{self.vault}"\n[policy.daily]\nschedule = "daily 02:00"\n'
                f'[vm.vm]\npolicy = "daily"\nqmp = "{self.vm.qmp}"\nnbd = "{self.vm.nbd}"\n'
                'disks = { disk = "disk0" }\n')
        self.config.write_text(text)
        self.config_0.write_text(text + "verify_fraction = 0\n")
        harness.log("first backup (full) ...")
        t, _, _, out = tr.timed(self.argv("bitmap"), self.env)
        point = tr.cbt_point(out)
        harness.log(f"  {t:.1f} s, read {human_bytes(point['bytes_read'] or 0)}")
        return round(t, 2)

    def measure(self, tool: str, rnd: int) -> tr.Run:
        before = harness.apparent(self.vault)
        argv = self.argv(tool)
        self.commands[tool] = " ".join(argv)
        os.sync()
        t, cpu, inblock, out = tr.timed(argv, self.env)
        return tr.Run(tool, rnd, round(t, 3), round(cpu, 3), inblock,
                      harness.apparent(self.vault) - before, tr.cbt_point(out))

    def rounds(self) -> tuple[list[tr.Run], list[int]]:
        runs: list[tr.Run] = []
        writes: list[int] = []
        for rnd in range(1, self.args.runs + 1):
            order = TOOLS[rnd % 3:] + TOOLS[:rnd % 3]  # rotating round by round
            line = []
            for j, tool in enumerate(order):
                writes.append(self.vm.rewrite(self.args.change, self.args.write,
                                              self.args.seed * 100 + 2 * rnd + j))
                r = self.measure(tool, rnd)
                runs.append(r)
                line.append(f"{tool} {r.seconds:.2f} s {r.said.get('change_source') or ''}")
            harness.log(f"round {rnd}/{self.args.runs}: " + ", ".join(line))
        return runs, writes

    def check(self) -> dict[str, bool]:
        target = self.vault.parent / "restored.img"
        guest = self.vault.parent / "guest.img"
        harness.log("check: restoring the last point and reading the guest's view ...")
        pw = ["--password-file", str(self.password)] if self.args.encrypted else []
        tr.sh([self.cbt, "restore", str(self.vault), "vm.latest", "--disk", "disk",
               "--to", str(target), *pw])
        tr.sh(["qemu-img", "convert", "-f", "raw", "-O", "raw", self.vm.uri, str(guest)])
        try:
            return {"equal_guest_view": tr._cmp(target, guest)}
        finally:
            target.unlink()
            guest.unlink()


def summarize(runs: list[tr.Run]) -> list[dict[str, Any]]:
    hashed = harness.median([r.seconds for r in runs if r.tool == "hash"])
    rows = []
    for tool in TOOLS:
        summary = tr.row(tool, [r for r in runs if r.tool == tool])
        # how much faster than the hash read
        rows.append({**summary, "ratio": hashed / summary["median"]})
    return rows


def human_report(res: dict[str, Any]) -> str:
    m, d = res["machine"], res["disk"]
    out = [
        harness.machine_line(m),
        f"software: cbt {m['cbt']} (Python {m['python']}), {m['qemu']}",
        f"disk: {human_bytes(d['size'])} qcow2 of an ext4 file system: {d['copies']} "
        f"varied copies of {tr.TREE} ({human_bytes(d['files_bytes'])} of files) and "
        f"{human_bytes(d['random_bytes'])} of random bytes; {human_bytes(d['qcow2_bytes'])} "
        f"allocated in the qcow2; served by qemu-storage-daemon (QMP, its own NBD server)",
        f"before each timed run: {res['writes'][0]} writes of {format_size(res['write'])} "
        f"random bytes ({res['change']:.0%} of the disk) through the NBD export with "
        "qemu-io; the disk opened with O_DIRECT (cache=none)",
        f"cbt: {'encrypted' if res['encrypted'] else 'plain'} vault, default verify_fraction; "
        f"runs: median of {res['runs']}, order rotating; whole-process wall clock",
    ]
    rows = [["run", "median s", "min-max s", "cpu s", "cbt says read", "stored",
             "change source", "verified", "ratio"]]
    for r in res["summary"]:
        rows.append([r["tool"], f"{r['median']:.2f}", f"{r['min']:.2f}-{r['max']:.2f}",
                     f"{r['cpu_median']:.2f}", human_bytes(r["bytes_read_median"]),
                     human_bytes(r["stored_median"]), ", ".join(r["change_sources"]),
                     str(r["verified_median"]),
                     "" if r["tool"] == "hash" else f"{r['ratio']:.1f}x"])
    out += ["", *harness.table(rows, {1, 2, 3, 4, 5, 7, 8})]
    if any(r["hint_mismatches"] for r in res["summary"]):
        out.append("HINT MISMATCHES: the bitmap missed a change (hash-scanned)")
    noisy = [r["tool"] for r in res["summary"] if r["spread"] > harness.NOISY]
    if noisy:
        out.append(f"noisy (max - min > {harness.NOISY:.0%} of the median): " + ", ".join(noisy))
    t = res["target"]
    out += ["", f"target: hash s / bitmap s >= {TARGET:g}x: {t['ratio']:.1f}x "
                f"{'pass' if t['pass'] else 'MISS'} (without the sample, bitmap-0: "
                f"{t['ratio_no_sample']:.1f}x)"]
    if res.get("check"):
        out.append(f"check: last point equal to the guest's view: "
                   f"{res['check']['equal_guest_view']}")
    out += ["", "wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in res["phases"].items()),
            f"first (full) backup: {res['first_backup_seconds']:.1f} s", "",
            f"commands (W = {res['dir']}):"]
    out += [f"  {k:<7} {v.replace(res['dir'], 'W')}" for k, v in res["commands"].items()]
    return "\n".join(out)


def make_qcow2(scratch: tr.Scratch, work: Path, size: int, fill: float,
               seed: int) -> tuple[Path, dict[str, Any]]:
    raw = work / "disk.raw"
    harness.log(f"making the disk ({human_bytes(size)}) ...")
    info = tr.make_disk(scratch, raw, size, fill, seed)
    disk = work / "disk.qcow2"
    tr.sh(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(disk)])
    raw.unlink()
    info["qcow2_bytes"] = harness.allocated(disk)
    return disk, info


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(
        "a QEMU VM's bitmap incremental against a hash read (see the module docstring)",
        "/var/tmp/cbt-qemu-race", "work directory (made, and removed at the end)",
        "4G", "size of the VM's disk (default 4G)")
    p.add_argument("--change", type=float, default=0.01,
                   help="share of the disk rewritten before each run (default 0.01)")
    p.add_argument("--write", default="64K", help="size of each write (default 64K)")
    p.add_argument("--fill", type=float, default=tr.FILL,
                   help=f"share of the disk filled with copies of {tr.TREE}")
    p.add_argument("--seed", type=int, default=17, help="seed of the content and the writes")
    p.add_argument("--encrypted", action="store_true", help="an encrypted vault (default plain)")
    p.add_argument("--check", action="store_true",
                   help="restore the last point and cmp it with the guest's view")
    harness.add_output_options(p)
    args, size = harness.parse(p, argv)
    args.write = parse_size(args.write)
    if size < (256 << 20) or size % args.write or args.write % 512:
        p.error("--size must be at least 256M and a multiple of --write (a multiple of 512)")
    if not 0 < args.change <= 0.5 or not 0.05 <= args.fill <= 0.8:
        p.error("--change must be in (0, 0.5], --fill in [0.05, 0.8]")
    if os.geteuid() != 0:
        p.error("run as root: it loop-mounts the guest file system and drops the page cache")
    work = Path(args.dir).absolute()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, tr._on_signal)
    scratch = tr.Scratch(work)
    vm: Vm | None = None
    started = time.perf_counter()
    phases: dict[str, float] = {}
    try:
        for tool in ("qemu-storage-daemon", "qemu-img", "qemu-io", "mke2fs", "mount", "cmp"):
            if not shutil.which(tool):
                raise harness.BenchError(f"{tool} is not installed (Debian: qemu-utils, "
                                         "qemu-system-common, e2fsprogs)")
        cbt = harness.find_cbt(args.cbt)
        need = int(size * (args.fill + tr.RANDOM + 0.05) * (2.6 if args.check else 1.6))
        have = shutil.disk_usage(work if work.exists() else work.parent).free
        if need > have:
            raise harness.BenchError(f"not enough space: need about {human_bytes(need)}, "
                                     f"{human_bytes(have)} free")
        host = harness.machine({"qemu": tr.sh(["qemu-storage-daemon", "--version"])
                                .splitlines()[0]})
        scratch.make_dir()
        disk, disk_info = make_qcow2(scratch, work, size, args.fill, args.seed)
        phases["make disk"] = time.perf_counter() - started
        vm = Vm(work, disk)
        vm.start()
        race = Race(args, work, cbt, vm)
        t0 = time.perf_counter()
        first = race.setup()
        runs, writes = race.rounds()
        phases["rounds"] = time.perf_counter() - t0
        check = race.check() if args.check else None
        phases["total"] = time.perf_counter() - started
        summary = summarize(runs)
        ratios = {r["tool"]: r["ratio"] for r in summary}
        host["loadavg_after"] = list(os.getloadavg())
        result: dict[str, Any] = {
            "dir": str(work), "size": size, "runs": args.runs, "seed": args.seed,
            "change": args.change, "write": args.write, "encrypted": args.encrypted,
            "machine": host, "disk": disk_info, "writes": writes,
            "first_backup_seconds": first, "summary": summary,
            "target": {"ratio": ratios["bitmap"], "ratio_no_sample": ratios["bitmap-0"],
                       "want": TARGET, "pass": ratios["bitmap"] >= TARGET},
            "check": check, "vault_bytes": harness.apparent(race.vault),
            "phases": {k: round(v, 1) for k, v in phases.items()},
            "commands": race.commands, "samples": [r.__dict__ for r in runs],
        }
    except (harness.BenchError, OSError) as exc:
        harness.log(f"{harness.prog()}: {exc}")
        return 2
    except (KeyboardInterrupt, tr.Interrupted) as exc:
        harness.log(f"{harness.prog()}: interrupted ({str(exc) or 'Ctrl-C'}); cleaning up")
        return 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        harness.log("cleaning up (the daemon, the files) ...")
        if vm is not None:
            vm.stop()
        scratch.cleanup()

    harness.emit(args.json, lambda: result, lambda: human_report(result))
    if check is not None and not all(check.values()):
        harness.log(f"{harness.prog()}: the restored point differs from the guest's view")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
