"""What ``bench/peers.py`` and ``bench/race.py`` share: one way to time a whole process.

Both scripts measure the ``cbt`` command against other tools on the same files
in the same run; this module holds every step they take alike, written once:

1. Options: ``--dir``, ``--size``, ``--runs`` (at least 3), ``--cbt``,
   ``--json`` (:func:`parser`, :func:`add_output_options`, :func:`parse`).
2. Tools: find the ``cbt`` beside this Python (:func:`find_cbt`), install a
   missing peer with ``apt-get install -y`` (:func:`ensure_tool`), and
   describe the machine and the versions measured (:func:`machine`).
3. Page cache: read the input files in before they are timed, and re-read
   any file the kernel has partly evicted since (mincore:
   :func:`cached_fraction`, :func:`ensure_cached`).
4. Timing: run one command with its output discarded, wall clock
   (``time.perf_counter`` around ``subprocess.run``) and CPU time (user +
   sys, forked workers included) of the whole process (:func:`run_timed`);
   the median of the runs and their spread, flagged as noisy beyond
   :data:`NOISY` (:func:`median`, :func:`spread`).
5. Report: aligned text tables (:func:`table`), or JSON on stdout, with the
   command line that reproduces the run (:func:`emit`).

Only numpy and cbt are needed besides the standard library.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import json
import mmap
import os
import platform
import resource
import shlex
import shutil
import stat
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np


def prog() -> str:
    """The running script as its errors name it: ``bench/peers.py``."""
    return f"bench/{Path(sys.argv[0]).name}"


try:
    import cbt
    from cbt.core.extents import data_extents
    from cbt.core.sizes import human_bytes, parse_size
except ImportError as exc:  # a missing or stale build: say so in one line
    sys.exit(f"{prog()}: cannot import cbt: {exc}")

CHUNK = 64 << 20  # numpy writes random data in pieces of this size
PAGE = 4096
NOISY = 0.25  # runs whose max - min exceeds this share of the median are flagged
CACHED = 0.999  # a file with less of its data in the page cache is read in again


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class BenchError(Exception):
    """A failed command, a missing tool, too little space: one line, exit status 2."""


# --------------------------------------------------------------------------- options

def parser(description: str, work_dir: str, work_help: str, size: str,
           size_help: str) -> argparse.ArgumentParser:
    """``--dir``, ``--size`` and ``--runs``; a script adds its own, then
    :func:`add_output_options`."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--dir", default=work_dir, help=work_help)
    p.add_argument("--size", default=size, help=size_help)
    p.add_argument("--runs", type=int, default=3, help="timed runs per command, >= 3")
    return p


def add_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cbt", default=None, metavar="PATH",
                   help="cbt executable (default: the one beside this Python)")
    p.add_argument("--json", action="store_true", help="machine output on stdout")


def size_arg(p: argparse.ArgumentParser, text: str) -> int:
    """``text`` ("4G", "16K", ...) in bytes; a usage error when it is not a size."""
    try:
        return parse_size(text)
    except cbt.CbtError as exc:
        p.error(str(exc))


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, int]:
    """The options and ``--size`` in bytes, ``--runs`` checked."""
    args = p.parse_args(argv)
    if args.runs < 3:
        p.error("--runs must be at least 3 (the median of fewer says little)")
    return args, size_arg(p, args.size)


# --------------------------------------------------------------------------- tools

def find_cbt(given: str | None = None) -> str:
    """``given`` (``--cbt``), else the ``cbt`` beside this Python: not a pyenv
    shim, whose own start-up would be charged to cbt."""
    if given:
        return os.path.abspath(given)
    beside = Path(sys.executable).parent / "cbt"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("cbt")
    if not found:
        raise BenchError("the cbt command is not installed (pip install .)")
    return found


def ensure_tool(cmd: str, package: str) -> str:
    """Path of ``cmd``; installs ``package`` with apt-get when it is missing."""
    found = shutil.which(cmd)
    if found:
        return found
    log(f"{cmd} missing: apt-get install -y {package}")
    for argv in (["apt-get", "install", "-y", package], ["apt-get", "update"],
                 ["apt-get", "install", "-y", package]):
        subprocess.run(argv, stdout=sys.stderr, check=False)
        found = shutil.which(cmd)
        if found:
            return found
    raise BenchError(f"{cmd} is not installed and 'apt-get install -y {package}' failed")


def version_of(argv: list[str]) -> str:
    """First line the command prints; "unknown" when it cannot run, "?" when it fails."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return "unknown"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if out.returncode == 0 and text else "?"


def _cpuinfo(key: str) -> str | None:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    return None


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or "unknown"


def cpu_simd() -> list[str]:
    flags = set((_cpuinfo("flags") or "").split())
    return [x for x in ("sse4_1", "avx2", "avx512f", "avx512vl") if x in flags]


def mem_total() -> int:
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def machine(versions: dict[str, str], cpus: bool = False) -> dict[str, Any]:
    """The machine, cbt's version, then ``versions`` (tool -> :func:`version_of`);
    ``cpus`` adds the CPUs this process may use and the SIMD the CPU has."""
    host: dict[str, Any] = {"nproc": os.cpu_count()}
    if cpus:
        host["usable_cpus"] = len(os.sched_getaffinity(0))
    host["cpu_model"] = cpu_model()
    if cpus:
        host["simd"] = cpu_simd()
    host |= {"memory": mem_total(), "kernel": platform.release(),
             "python": platform.python_version(), "cbt": cbt.__version__}
    return host | versions | {"loadavg_before": list(os.getloadavg())}


def loadavg(values: Iterable[float]) -> str:
    return " ".join(f"{x:.2f}" for x in values)


# --------------------------------------------------------------------------- files

def machine_line(m: dict[str, Any]) -> str:
    """A report's first line: the machine of :func:`machine` and its load before and after."""
    return (f"machine: {m['cpu_model']}, nproc {m['nproc']}, {human_bytes(m['memory'])} RAM, "
            f"Linux {m['kernel']}; load average before/after: "
            f"{loadavg(m['loadavg_before'])} / {loadavg(m['loadavg_after'])}")


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_random(path: Path, size: int, seed: int) -> None:
    """``size`` seeded random bytes into a new file ``path``, fsynced."""
    rng = np.random.default_rng(seed)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for pos in range(0, size, CHUNK):
            write_all(fd, rng.bytes(min(CHUNK, size - pos)))
        os.fsync(fd)
    finally:
        os.close(fd)


def apparent(path: Path) -> int:
    """Sum of the sizes of the regular files under ``path`` (``du -sb`` without directories
    or links)."""
    total = 0
    for dirpath, _dirs, names in os.walk(path):
        for n in names:
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(os.path.join(dirpath, n))
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
    return total


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def allocated(path: Path) -> int:
    """Bytes in data extents (SEEK_DATA/SEEK_HOLE)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return sum(e - s for s, e in data_extents(fd, os.fstat(fd).st_size))
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- page cache

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def cached_fraction(path: Path) -> float | None:
    """Share of the file's data pages in the page cache (mincore); holes are
    not counted.  None when it cannot be told."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        extents = data_extents(fd, size)
        total = sum(e - s for s, e in extents)
        if not total:
            return 1.0
        resident = 0
        for start, end in extents:
            lo = start // mmap.PAGESIZE * mmap.PAGESIZE
            length = end - lo
            addr = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, lo)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                vec = np.zeros(-(-length // mmap.PAGESIZE), dtype=np.uint8)
                if _libc.mincore(addr, length, vec.ctypes.data) != 0:
                    return None
                resident += int(np.count_nonzero(vec & 1)) * mmap.PAGESIZE
            finally:
                _libc.munmap(addr, length)
        return min(resident / total, 1.0)
    finally:
        os.close(fd)


def preread(path: Path) -> None:
    """Read every data extent once (holes are skipped, as every reader skips them)."""
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        for start, end in data_extents(fd, os.fstat(fd).st_size):
            pos = start
            while pos < end:
                n = os.preadv(fd, [view[:min(len(buf), end - pos)]], pos)
                if n <= 0:
                    break
                pos += n
    finally:
        os.close(fd)


def ensure_cached(paths: Iterable[Path],
                  evicted: Callable[[Path, float | None], None] | None = None) -> float | None:
    """Read again each file not (wholly) in the page cache, after telling
    ``evicted(path, share cached)``; returns the smallest share cached after
    (None when mincore cannot tell)."""
    worst: float | None = 1.0
    for p in paths:
        frac = cached_fraction(p)
        if frac is None or frac < CACHED:
            if evicted:
                evicted(p, frac)
            preread(p)
            frac = cached_fraction(p)
        worst = None if frac is None or worst is None else min(worst, frac)
    return worst


# --------------------------------------------------------------------------- timing

def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def tool_env(**extra: str) -> dict[str, str]:
    """The environment of a timed tool: this one, without cbt's passphrase variables, and
    without ``PYTHONDONTWRITEBYTECODE`` (with it, every run of an editable cbt compiles its
    modules again, a start-up cost a pip-installed cbt, whose bytecode pip wrote, does not
    pay), plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("CBT_PASSWORD", "CBT_PASSWORD_FILE", "PYTHONDONTWRITEBYTECODE")}
    return env | extra


def run_timed(argv: list[str], ok_codes: tuple[int, ...] = (0,), cwd: Path | None = None,
              env: dict[str, str] | None = None,
              capture: bool = False) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds, stdout) of one whole process (in ``env``, default
    :func:`tool_env`): CPU is user + sys, forked workers included; stdout is kept only
    with ``capture``.  An exit status outside ``ok_codes`` raises, with the end of its
    stderr."""
    cpu = _children_cpu()
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=tool_env() if env is None else env,
                          stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                          stderr=subprocess.PIPE, check=False)
    seconds = time.perf_counter() - started
    cpu = _children_cpu() - cpu
    if proc.returncode not in ok_codes:
        tail = proc.stderr.decode(errors="replace").strip()[-2000:]
        raise BenchError(f"{shlex.join(argv)} exited {proc.returncode}: {tail}")
    return seconds, cpu, (proc.stdout or b"").decode(errors="replace")


def start_server(argv: list[str], ready: Iterable[Path], name: str,
                 timeout: float = 30) -> subprocess.Popen[bytes]:
    """Start a server (qemu-nbd, qemu-storage-daemon) and wait until every path of
    ``ready`` (its sockets) exists.  One that exits first or takes over ``timeout``
    seconds is stopped and raises, with its stderr."""
    paths = list(ready)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc)
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise BenchError(f"{name} did not start: {err.strip()}")
        time.sleep(0.05)
    return proc


def stop_server(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL after 30 s; reaped either way (None: nothing to stop)."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> float:
    """(max - min) / median of the runs: above :data:`NOISY`, the figure is noisy."""
    return (max(xs) - min(xs)) / median(xs)


# --------------------------------------------------------------------------- report

def table(rows: list[list[str]], right: set[int]) -> list[str]:
    """``rows[0]`` is the heading, underlined; columns in ``right`` align right."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def emit(as_json: bool, result: Callable[[], dict[str, Any]], report: Callable[[], str],
         note: str = "") -> None:
    """Print ``result()`` as JSON, or ``report()`` then ``note`` and how to run this again."""
    if as_json:
        print(json.dumps(result(), indent=1))
    else:
        print(report())
        print(f"\n{note}reproduce: {shlex.join(sys.argv)}")
