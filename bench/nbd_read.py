#!/usr/bin/env python3
"""NBD read: cbt's own NBD client against libnbd (and QEMU's C tools) on the same exports.

Usage::

    python bench/nbd_read.py [--dir /var/tmp/cbt-nbd-read] [--size 2G] [--runs 3]
                             [--in-flight 8] [--request 512K] [--seed 14] [--json]

1. The disk: a ``--size`` qcow2 whose first half is seeded random bytes and
   whose second half alternates 1 MiB of compressible text and 1 MiB of
   zeros (written as a raw file, then ``qemu-img convert -O qcow2``: the
   zeros stay unallocated).
2. Two servers export it read-only on unix sockets: ``qemu-nbd`` (host page
   cache: after the first read every read comes from memory) and
   ``qemu-storage-daemon`` with ``cache.direct=on`` (O_DIRECT, how VM disks
   run: every read is a read of the host's disk).
3. Three patterns, each read by every reader, in an order rotating run by run:
   - ``sequential``: every allocated extent (``base:allocation``) in full;
   - ``bitmap-1%``: 1% of the disk in 64 KiB ranges at random 64 KiB-aligned
     offsets, in disk order (a dirty-bitmap incremental's reads);
   - ``sample-1/32``: 1/32 of the disk in 256 KiB runs at random offsets
     (the verification sample's reads).
4. Readers, each its own process:
   - ``cbt``: ``NbdSource.windows_of`` over the ranges in 64 KiB blocks
     (``--in-flight`` requests of ``--request`` bytes, cbt's defaults);
   - ``libnbd-aio``: Debian's ``python3-libnbd`` run by the system python3
     in isolated mode (``-I``: it cannot import cbt's venv), the same
     requests through ``h.aio_pread`` with the same number in flight, reused
     buffers, ``set_pread_initialize(False)``;
   - ``libnbd-window``: the same, but each request read in place into 64 MiB
     windows (``nbd.Buffer.from_buffer`` of the window's slice; three windows
     reused), as cbt would have to use it: its hash reads whole windows;
   - ``libnbd-pread``: the same through ``h.pread``, one request at a time;
   - ``qemu-img`` (sequential only): ``qemu-img convert`` of the export into a
     ``null-co`` target (C, 8 coroutines, its own block status);
   - ``qemu-io`` (scattered only): ``qemu-io -c "read OFF LEN"`` per range (C,
     one at a time).

The ranges are worked out once, untimed (the extents by cbt's
``NbdSource.extents``), and given to every reader in a JSON file.  The
Python readers time their reads only: wall clock and CPU (user + sys) of the
read loop, connection and start-up excluded (``open_s`` in the JSON);
``qemu-img``/``qemu-io`` are whole processes.  ``server cpu`` is what the
server process spent meanwhile (``/proc/PID/stat``).
Medians of ``--runs``; noisy figures (spread > 25%) are flagged.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# The libnbd reader: run by the system python3 with -I (no venv, no PYTHONPATH, no cwd).
LIBNBD_READER = r"""
import json, resource, sys, time
import nbd
sock, export, ranges_file, mode, in_flight, request = sys.argv[1:7]
in_flight, request = int(in_flight), int(request)
assert not any("venv" in p for p in sys.path), sys.path
t0 = time.perf_counter()
h = nbd.NBD()
h.set_pread_initialize(False)
h.set_export_name(export)
h.connect_unix(sock)
with open(ranges_file) as f:
    ranges = json.load(f)
reqs = [(o + a, min(request, n - a)) for o, n in ranges for a in range(0, n, request)]
open_s = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_SELF)
cpu0 = ru.ru_utime + ru.ru_stime
t0 = time.perf_counter()
total = 0
if mode == "pread":
    for off, n in reqs:
        total += len(h.pread(n, off))
elif mode == "window":
    # as cbt would use it: each range in windows of at most 64 MiB (three reused, like
    # NbdSource.windows_of), every request read in place into its window (from_buffer)
    wins = [(o + a, min(64 << 20, n - a)) for o, n in ranges for a in range(0, n, 64 << 20)]
    pool = {}
    pending = []
    for k, (woff, wlen) in enumerate(wins):
        win = pool.pop(k % 3, None)
        if win is None or len(win) != wlen:
            win = bytearray(wlen)
        view = memoryview(win)
        for a in range(0, wlen, request):
            while len(pending) >= in_flight:  # (in flight across windows, as cbt's)
                h.poll(-1)
                pending = [(c, j) for c, j in pending if not h.aio_command_completed(c)]
            buf = nbd.Buffer.from_buffer(view[a:a + request])
            pending.append((h.aio_pread(buf, woff + a), k))
        while any(j <= k - 2 for _c, j in pending):  # window k - 2 done: its slot reused
            h.poll(-1)
            pending = [(c, j) for c, j in pending if not h.aio_command_completed(c)]
        total += wlen
        pool[k % 3] = win
    while pending:
        h.poll(-1)
        pending = [(c, j) for c, j in pending if not h.aio_command_completed(c)]
else:
    free = []
    pending = []
    i = 0
    while i < len(reqs) or pending:
        while i < len(reqs) and len(pending) < in_flight:
            off, n = reqs[i]
            i += 1
            buf = free.pop() if free and n == request else nbd.Buffer(n)
            pending.append((h.aio_pread(buf, off), buf, n))
        h.poll(-1)
        still = []
        for c, buf, n in pending:
            if h.aio_command_completed(c):
                total += n
                if n == request:
                    free.append(buf)
            else:
                still.append((c, buf, n))
        pending = still
seconds = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_SELF)
h.shutdown()
print(json.dumps({"seconds": seconds, "cpu": ru.ru_utime + ru.ru_stime - cpu0,
                  "bytes": total, "open_s": open_s}))
"""

BLOCK = 64 << 10  # cbt's block size for these reads (a QEMU bitmap's granularity)
SCATTER = {"bitmap-1%": (0.01, 64 << 10), "sample-1/32": (1 / 32, 256 << 10)}
PATTERNS = ("sequential", *SCATTER)
SYSTEM_PYTHON = "/usr/bin/python3"


def cbt_reader(argv: list[str]) -> None:
    """``--reader-cbt SOCKET EXPORT RANGES IN_FLIGHT REQUEST``: read and print JSON."""
    import resource

    from cbt.source import nbd

    sock, export, ranges_file, in_flight, request = argv
    t0 = time.perf_counter()
    # windows_of reads with read_many's defaults (cbt's IN_FLIGHT, READ_REQUEST): set them
    nbd.NbdClient.read_many.__defaults__ = (int(in_flight), int(request))
    src = nbd.NbdSource(sock, export)
    with open(ranges_file) as f:
        ranges = json.load(f)
    blocks = [(o // BLOCK, -(-(o + n) // BLOCK)) for o, n in ranges]
    open_s = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = ru.ru_utime + ru.ru_stime
    t0 = time.perf_counter()
    total = sum(len(buf) for _first, buf in src.windows_of(BLOCK, blocks))
    seconds = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    src.close()
    print(json.dumps({"seconds": seconds, "cpu": ru.ru_utime + ru.ru_stime - cpu0,
                      "bytes": total, "open_s": open_s}))


if __name__ == "__main__" and sys.argv[1:2] == ["--reader-cbt"]:
    cbt_reader(sys.argv[2:])
    sys.exit(0)

import harness  # noqa: E402  (the readers above import nothing of the bench)
import numpy as np  # noqa: E402

from cbt.core.sizes import human_bytes, parse_size  # noqa: E402


def sh(argv: list[str]) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    if out.returncode:
        raise harness.BenchError(f"{shlex.join(argv)} exited {out.returncode}: "
                                 f"{out.stderr.strip()[-500:]}")
    return out.stdout


def make_disk(work: Path, size: int, seed: int) -> Path:
    raw, disk = work / "disk.raw", work / "disk.qcow2"
    rng = np.random.default_rng(seed)
    half = size // 2 // (1 << 20) * (1 << 20)
    text = (b"cbt nbd bench: a line of compressible text, " * 30000)[:1 << 20]
    fd = os.open(raw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for pos in range(0, half, harness.CHUNK):
            harness.write_all(fd, rng.bytes(min(harness.CHUNK, half - pos)))
        for pos in range(half, size - (1 << 20) + 1, 2 << 20):
            os.pwrite(fd, text, pos)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    sh(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(disk)])
    raw.unlink()
    return disk


class Server:
    """One read-only export of the disk on a unix socket."""

    def __init__(self, name: str, work: Path, disk: Path) -> None:
        self.name = name
        self.sock = work / f"{name}.sock"
        self.disk = disk
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.name == "qemu-nbd":
            argv = ["qemu-nbd", "-r", "-t", "--shared=16", "-f", "qcow2", "-x", "disk",
                    "-k", str(self.sock), str(self.disk)]
        else:
            argv = ["qemu-storage-daemon", "--blockdev",
                    f"driver=file,node-name=file0,filename={self.disk},cache.direct=on,"
                    "read-only=on",
                    "--blockdev", "driver=qcow2,node-name=disk0,file=file0,read-only=on",
                    "--nbd-server", f"addr.type=unix,addr.path={self.sock},max-connections=16",
                    "--export", "type=nbd,id=disk,node-name=disk0,name=disk"]
        self.proc = harness.start_server(argv, [self.sock], self.name)

    def cpu(self) -> float:
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    @property
    def uri(self) -> str:
        return f"nbd+unix:///disk?socket={self.sock}"

    def stop(self) -> None:
        harness.stop_server(self.proc)
        self.proc = None


def patterns(work: Path, server: Server, size: int, seed: int) -> dict[str, Path]:
    """Each pattern's byte ranges ``[offset, length]`` in a JSON file."""
    from cbt.source.nbd import NbdSource

    with NbdSource(str(server.sock), "disk") as src:
        extents = src.extents()
    out = {"sequential": [[a, b - a] for a, b in extents]}
    rng = np.random.default_rng(seed)
    for name, (share, length) in SCATTER.items():
        slots = size // length
        picked = np.sort(rng.choice(slots, size=max(1, round(size * share / length)),
                                    replace=False))
        out[name] = [[int(s) * length, length] for s in picked]
    files = {}
    for name, ranges in out.items():
        f = work / f"{name.replace('/', '_')}.json"
        f.write_text(json.dumps(ranges))
        files[name] = f
    return files


def readers(pattern: str) -> tuple[str, ...]:
    c = ("qemu-img",) if pattern == "sequential" else ("qemu-io",)
    return ("cbt", "libnbd-aio", "libnbd-window", "libnbd-pread", *c)


def run_one(reader: str, server: Server, ranges: Path, args: Any,
            total: int) -> tuple[dict[str, Any], str]:
    sock = str(server.sock)
    if reader == "cbt":
        argv = [sys.executable, os.path.abspath(__file__), "--reader-cbt", sock, "disk",
                str(ranges), str(args.in_flight), str(args.request)]
    elif reader.startswith("libnbd"):
        argv = [SYSTEM_PYTHON, "-I", "-c", LIBNBD_READER, sock, "disk", str(ranges),
                reader.split("-")[1], str(args.in_flight), str(args.request)]
    elif reader == "qemu-img":
        argv = ["qemu-img", "convert", "-n", server.uri, "--target-image-opts",
                f"driver=null-co,size={args.bytes}"]
    else:
        cmds = [x for o, n in json.loads(ranges.read_text()) for x in ("-c", f"read {o} {n}")]
        argv = ["qemu-io", "-r", "-f", "raw", server.uri, *cmds]
    server_cpu = server.cpu()
    seconds, cpu, out = harness.run_timed(argv, capture=True)
    said: dict[str, Any] = {"seconds": seconds, "cpu": cpu, "bytes": total}
    if reader == "cbt" or reader.startswith("libnbd"):
        said = json.loads(out)
        if said["bytes"] != total:
            raise harness.BenchError(f"{reader} read {said['bytes']} bytes of {total}")
    said["server_cpu"] = server.cpu() - server_cpu
    shown = argv if reader != "qemu-io" else [*argv[:5], "-c", "'read OFF LEN' ..."]
    if reader.startswith("libnbd"):
        shown = [*argv[:3], "LIBNBD_READER", *argv[4:]]
    return said, shlex.join(str(a) for a in shown)


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__.splitlines()[0], "/var/tmp/cbt-nbd-read",
                       "work directory (removed at the end)", "2G", "virtual disk size")
    p.add_argument("--in-flight", type=int, default=8, help="requests in flight (8)")
    p.add_argument("--request", default="512K", help="bytes of one request (512K)")
    p.add_argument("--seed", type=int, default=14)
    p.add_argument("--json", action="store_true", help="machine output on stdout")
    args, size = harness.parse(p, argv)
    args.request = parse_size(args.request)
    size = size // (2 << 20) * (2 << 20)
    args.bytes = size
    if not os.path.exists(SYSTEM_PYTHON) or subprocess.run(
            [SYSTEM_PYTHON, "-I", "-c", "import nbd"], capture_output=True).returncode:
        harness.log("python3-libnbd missing: apt-get install -y python3-libnbd")
        subprocess.run(["apt-get", "install", "-y", "python3-libnbd"], stdout=sys.stderr,
                       check=False)
    for tool, pkg in (("qemu-img", "qemu-utils"), ("qemu-nbd", "qemu-utils"),
                      ("qemu-storage-daemon", "qemu-system-common")):
        harness.ensure_tool(tool, pkg)
    work = Path(args.dir)
    if work.exists():
        raise harness.BenchError(f"{work} exists: remove it or give another --dir")
    work.mkdir(parents=True)
    servers = [Server(n, work, work / "disk.qcow2") for n in ("qemu-nbd", "qsd-direct")]
    try:
        harness.log(f"making a {human_bytes(size)} qcow2 ...")
        make_disk(work, size, args.seed)
        for s in servers:
            s.start()
        files = patterns(work, servers[0], size, args.seed)
        totals = {k: sum(n for _o, n in json.loads(f.read_text())) for k, f in files.items()}
        results, commands = measure(args, servers, files, totals)
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(work, ignore_errors=True)
    versions = {"libnbd": harness.version_of(
        [SYSTEM_PYTHON, "-I", "-c", "import nbd; print(nbd.NBD().get_version())"]),
        "qemu": harness.version_of(["qemu-img", "--version"])}
    host = harness.machine(versions)
    harness.emit(args.json, lambda: {"machine": host, "size": size, "bytes": totals,
                                     "in_flight": args.in_flight, "request": args.request,
                                     "results": results, "commands": commands,
                                     "command": shlex.join(sys.argv)},
                 lambda: report(host, totals, results))
    return 0


def measure(args: Any, servers: list[Server], files: dict[str, Path],
            totals: dict[str, int]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    runs: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    commands: dict[str, str] = {}
    for rnd in range(args.runs):
        for s in servers:
            for pat in PATTERNS:
                order = readers(pat)
                k = rnd % len(order)
                for r in order[k:] + order[:k]:
                    said, cmd = run_one(r, s, files[pat], args, totals[pat])
                    runs.setdefault((s.name, pat, r), []).append(said)
                    commands[r] = cmd
                    harness.log(f"run {rnd + 1} {s.name:10} {pat:11} {r:12} "
                                f"{said['seconds']:.3f} s cpu {said['cpu']:.3f} s")
    results = []
    for (server, pat, reader), xs in runs.items():
        secs = [x["seconds"] for x in xs]
        med = harness.median(secs)
        results.append({"server": server, "pattern": pat, "reader": reader,
                        "seconds": round(med, 4),
                        "mib_s": round(totals[pat] / med / (1 << 20), 1),
                        "cpu": round(harness.median([x["cpu"] for x in xs]), 4),
                        "server_cpu": round(harness.median([x["server_cpu"] for x in xs]), 4),
                        "open_s": round(harness.median([x.get("open_s", 0.0) for x in xs]), 4),
                        "noisy": harness.spread(secs) > harness.NOISY, "runs": secs})
    return results, commands


def report(host: dict[str, Any], totals: dict[str, int], results: list[dict[str, Any]]) -> str:
    lines = [f"{host['cpu_model']}, {host['nproc']} CPUs; libnbd {host['libnbd']}; "
             f"{host['qemu']}",
             "bytes read: " + ", ".join(f"{k} {human_bytes(v)}" for k, v in totals.items()), ""]
    rows = [["server", "pattern", "reader", "seconds", "MiB/s", "cpu s", "server cpu s", ""]]
    for r in results:
        rows.append([r["server"], r["pattern"], r["reader"], f"{r['seconds']:.3f}",
                     f"{r['mib_s']:.0f}", f"{r['cpu']:.3f}", f"{r['server_cpu']:.3f}",
                     "noisy" if r["noisy"] else ""])
    return "\n".join(lines + harness.table(rows, {3, 4, 5, 6}))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except harness.BenchError as exc:
        sys.exit(f"{harness.prog()}: {exc}")
    except KeyboardInterrupt:
        sys.exit(130)
