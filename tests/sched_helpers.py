"""Helpers for the schedule, retention, gc, daemon and instant-restore tests (issue 6).

Truth comes from hand-written tables in the tests, from copies of the disks
taken at backup time (compared byte for byte with plain numpy) and from the
files on disk, never from cbt's own code.  Every cbt run here is a real
process (``cbt ...``); races are real processes too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import blake3
import numpy as np
from jobs_helpers import toml_value
from vault_helpers import cbt, cbt_argv, clean_env, json_lines

KIB = 1 << 10
MIB = 1 << 20
PAGE = 4096

# The exact --json shapes of issue 6 (prune and run-due are exact; gc names at least these).
SUMMARY_KEYS = {"type", "now", "ran", "skipped", "warnings"}
RAN_KEYS = {"vm", "slot", "status", "recovery_point"}
SKIPPED_KEYS = {"vm", "reason"}
PRUNE_KEYS = {"dry_run", "points", "snapshots_expired", "warnings"}
PRUNE_POINT_KEYS = {"recovery_point", "vm", "keep", "reasons"}
GC_KEYS = {"dry_run", "packs_removed", "packs_rewritten", "bytes_freed", "warnings"}
ERROR_LINE_KEYS = {"type", "vm", "message", "warnings"}


# -- configs (TOML values written by jobs_helpers.toml_value) -----------------------------


def write_config(path: Path, policies: Mapping[str, Mapping[str, Any]],
                 vms: Mapping[str, Mapping[str, Any]], vault: str = "vault") -> Path:
    """A config file: ``policies`` and ``vms`` map names to their keys; a VM's
    ``hooks`` (a dict) becomes its ``[vm.NAME.hooks]`` table."""
    lines = [f"vault = {toml_value(vault)}", ""]
    for name, pol in policies.items():
        lines.append(f"[policy.{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in pol.items()]
        lines.append("")
    for name, vm in vms.items():
        lines.append(f"[vm.{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in vm.items() if k != "hooks"]
        if vm.get("hooks"):
            lines.append(f"[vm.{name}.hooks]")
            lines += [f"{k} = {toml_value(v)}" for k, v in vm["hooks"].items()]
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


# -- disks and their truth -------------------------------------------------------------------


def random_bytes(size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=size, dtype=np.uint8)


def write_disk(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".writing")
    data.tofile(tmp)
    os.replace(tmp, path)  # a new inode: a reflink or copy taken earlier is untouched
    return path


def fast_random(size: int, seed: int) -> bytes:
    """``size`` pseudo-random bytes (64-bit words of SFC64: fast for large disks)."""
    words = np.random.Generator(np.random.SFC64(seed)).integers(
        0, 2**64, size=-(-size // 8), dtype=np.uint64)
    return words.tobytes()[:size]


def write_random_disk(path: Path, size: int, seed: int) -> Path:
    """A fully written disk of random bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for k, off in enumerate(range(0, size, 64 * MIB)):
            f.write(fast_random(min(64 * MIB, size - off), seed * 1000 + k))
    return path


def copy_disk(src: Path, dst: Path) -> Path:
    """The ground truth of a disk at this moment: a plain byte copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def assert_same_bytes(got: Path, want: Path) -> None:
    a = np.fromfile(got, dtype=np.uint8)
    b = np.fromfile(want, dtype=np.uint8)
    assert len(a) == len(b), f"{got}: {len(a)} bytes, expected {len(b)} ({want})"
    if not np.array_equal(a, b):
        first = int(np.flatnonzero(a != b)[0])
        raise AssertionError(f"{got} differs from {want}: first at byte {first}")


def file_digest(path: Path) -> str:
    h = blake3.blake3()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MIB):
            h.update(chunk)
    return h.hexdigest()


LOCK_FILES = {"lock", "gc.lock"}


def vault_state(vault: Path) -> dict[str, str]:
    """Relative path -> content digest of every file under the vault (lock files aside:
    they say who held the lock last, not what the vault holds)."""
    out = {}
    for dirpath, _dirs, files in os.walk(vault):
        for f in files:
            p = Path(dirpath, f)
            rel = str(p.relative_to(vault))
            if rel in LOCK_FILES:
                continue
            out[rel] = file_digest(p)
    return out


def dir_bytes(d: Path) -> int:
    """Bytes in the files under ``d`` (0 when it does not exist)."""
    total = 0
    for dirpath, _dirs, files in os.walk(d):
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.path.getsize(os.path.join(dirpath, f))
    return total


def pack_set(vault: Path) -> set[str]:
    return {p.name for p in (vault / "packs").rglob("*.pack")}


# -- running cbt ------------------------------------------------------------------------------


def ok_json(*args: object, env: Mapping[str, str] | None = None,
            timeout: float = 300) -> dict[str, Any]:
    """A ``--json`` command that must succeed: its one JSON object."""
    r = cbt(*args, "--json", env=env, timeout=timeout)
    assert r.returncode == 0, (args, r.returncode, r.stdout, r.stderr)
    lines = json_lines(r.stdout)
    assert len(lines) == 1, r.stdout
    return lines[0]


def backup_point(vault: Path, vm: str, *disks: object, now: str | None = None,
                 extra: tuple[object, ...] = ()) -> dict[str, Any]:
    """``cbt backup VAULT DISK... --vm VM [--now T] --json``: the point line."""
    args: list[object] = ["backup", vault, *disks, "--vm", vm, *extra]
    if now:
        args += ["--now", now]
    r = cbt(*args, "--json", timeout=300)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    lines = [x for x in json_lines(r.stdout) if x.get("type") != "progress"]
    assert len(lines) == 1 and lines[0]["type"] == "point", lines
    return lines[0]


def backup_config(cfg: Path, now: str | None = None, vm: str | None = None) -> dict[str, Any]:
    """``cbt backup --config CFG [--vm VM] [--now T] --json`` of one VM: its point line."""
    args: list[object] = ["backup", "--config", cfg, "--json"]
    if vm:
        args += ["--vm", vm]
    if now:
        args += ["--now", now]
    r = cbt(*args, timeout=300)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    lines = [x for x in json_lines(r.stdout) if x.get("type") != "progress"]
    assert len(lines) == 1 and lines[0]["type"] == "point", lines
    return lines[0]


def run_due(cfg: Path, now: str | None = None
            ) -> tuple[int, dict[str, Any], list[dict[str, Any]], str]:
    """``cbt run-due --config CFG [--now T] --json``, its output shape checked.

    Returns (exit code, summary, result lines (point/error, in order), stderr).
    The summary is the last line and the only one; one result line per job run,
    in the order of ``ran``; exit 0 exactly when every job run succeeded.
    """
    args: list[object] = ["run-due", "--config", cfg, "--json"]
    if now is not None:
        args += ["--now", now]
    r = cbt(*args, timeout=300)
    lines = json_lines(r.stdout)
    assert lines, (r.returncode, r.stdout, r.stderr)
    summaries = [x for x in lines if x.get("type") == "summary"]
    assert len(summaries) == 1 and lines[-1] is summaries[0], r.stdout
    s = summaries[0]
    assert set(s) == SUMMARY_KEYS, s
    assert isinstance(s["warnings"], list)
    for x in s["ran"]:
        assert set(x) == RAN_KEYS, x
        assert x["status"] in ("succeeded", "failed"), x
    for x in s["skipped"]:
        assert set(x) == SKIPPED_KEYS, x
        assert isinstance(x["reason"], str) and x["reason"], x
    results = [x for x in lines[:-1] if x.get("type") in ("point", "error")]
    assert all(x.get("type") in ("point", "error", "progress") for x in lines[:-1]), r.stdout
    assert [x["vm"] for x in results] == [x["vm"] for x in s["ran"]], (results, s)
    for line, ran in zip(results, s["ran"], strict=True):
        if ran["status"] == "succeeded":
            assert line["type"] == "point", line
            assert line["recovery_point"] == ran["recovery_point"], (line, ran)
        else:
            assert line["type"] == "error" and set(line) == ERROR_LINE_KEYS, line
            assert ran["recovery_point"] is None, ran
    want_rc = 0 if all(x["status"] == "succeeded" for x in s["ran"]) else 2
    assert r.returncode == want_rc, (r.returncode, r.stdout, r.stderr)
    return r.returncode, s, results, r.stderr


def prune(cfg: Path, now: str, dry_run: bool = False) -> dict[str, Any]:
    """``cbt prune --config CFG --now T [--dry-run] --json``, its shape checked."""
    args: list[object] = ["prune", "--config", cfg, "--now", now]
    if dry_run:
        args.append("--dry-run")
    out = ok_json(*args)
    assert set(out) == PRUNE_KEYS, out
    assert out["dry_run"] is dry_run
    assert isinstance(out["snapshots_expired"], int) and isinstance(out["warnings"], list)
    for p in out["points"]:
        assert set(p) == PRUNE_POINT_KEYS, p
        assert isinstance(p["keep"], bool) and isinstance(p["reasons"], list), p
        assert p["reasons"], f"every point says why it is kept or removed: {p}"
    return out


def gc(vault: Path, *args: object) -> dict[str, Any]:
    """``cbt gc VAULT ARGS --json``, its shape checked."""
    out = ok_json("gc", vault, *args)
    assert set(out) >= GC_KEYS, out
    for k in ("packs_removed", "packs_rewritten", "bytes_freed"):
        assert isinstance(out[k], int) and out[k] >= 0, out
    return out


def verify_data_clean(vault: Path) -> dict[str, Any]:
    out = ok_json("verify", vault, "--data")
    assert out["problems"] == [], out["problems"][:5]
    return out


def listed(vault: Path) -> list[dict[str, Any]]:
    """``cbt list --json`` points, oldest first."""
    return list(ok_json("list", vault)["points"])


def listed_ids(vault: Path, vm: str | None = None) -> list[str]:
    return [p["recovery_point"] for p in listed(vault) if vm is None or p["vm"] == vm]


def restore(vault: Path, point: str, to: Path, *extra: object) -> dict[str, Any]:
    return ok_json("restore", vault, point, "--to", to, *extra)


def point_record(vault: Path, point: str) -> dict[str, Any]:
    """The committed record ``points/<id>.json`` (the issue names its ``slot``)."""
    return dict(json.loads((vault / "points" / f"{point}.json").read_text()))


# -- processes ----------------------------------------------------------------------------


def start_cbt(*args: object, env: Mapping[str, str] | None = None,
              stdout: Any = subprocess.PIPE, stderr: Any = subprocess.PIPE
              ) -> subprocess.Popen[str]:
    """A cbt process in a new session (its process group can be signalled alone)."""
    return subprocess.Popen(cbt_argv(*args), env=clean_env(env), stdout=stdout,
                            stderr=stderr, text=True, start_new_session=True)


def run_in_session(*args: object, env: Mapping[str, str] | None = None,
                   timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run cbt to the end in its own session (a CBT_CRASH_AT kill spares pytest)."""
    p = start_cbt(*args, env=env)
    try:
        out, err = p.communicate(timeout=timeout)
    except BaseException:
        kill_group(p)
        raise
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def kill_group(p: subprocess.Popen[Any]) -> None:
    """SIGCONT then SIGKILL this test's own process group, and reap it."""
    for sig in (signal.SIGCONT, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, sig)
    with contextlib.suppress(Exception):
        p.wait(timeout=10)


@contextlib.contextmanager
def cleanup_group(p: subprocess.Popen[Any]) -> Iterator[subprocess.Popen[Any]]:
    try:
        yield p
    finally:
        if p.poll() is None:
            kill_group(p)


def wait_for(cond: Callable[[], Any], timeout: float = 60.0, what: str = "condition",
             interval: float = 0.005) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    return ticks / os.sysconf("SC_CLK_TCK")


# -- hooks ---------------------------------------------------------------------------------

# A pre/post hook as a real process: appends "PHASE VM TIME" to STATE/log, then
# fails once if STATE/fail-once exists (removing it), and sleeps for the number
# of seconds in STATE/sleep-PHASE if that file exists.
HOOK = r'''
import os, sys, time
state = sys.argv[1]
phase = os.environ.get("CBT_PHASE", "?")
with open(os.path.join(state, "log"), "a") as f:
    f.write(f"{phase} {os.environ.get('CBT_VM')} {time.time()}\n")
    f.flush()
    os.fsync(f.fileno())
flag = os.path.join(state, "fail-once")
if phase == "pre" and os.path.exists(flag):
    os.unlink(flag)
    sys.stderr.write("pre hook told to fail once\n")
    sys.exit(3)
nap = os.path.join(state, "sleep-" + phase)
if os.path.exists(nap):
    with open(nap) as f:
        time.sleep(float(f.read()))
sys.exit(0)
'''


def hook_argv(state: Path) -> list[str]:
    state.mkdir(parents=True, exist_ok=True)
    script = state / "hook.py"
    script.write_text(HOOK)
    return [sys.executable, str(script), str(state)]


def hook_log(state: Path) -> list[str]:
    p = state / "log"
    return p.read_text().splitlines() if p.exists() else []


# -- a loop-mounted XFS (reflink) ---------------------------------------------------------------


@contextlib.contextmanager
def loop_xfs(tmp_path: Path, size: int = 512 * MIB) -> Iterator[Path]:
    """A fresh XFS with reflink on a sparse file through a loop device, mounted (root).

    mkfs.xfs refuses file systems under 300 MB, hence a sparse 512 MiB backing file.
    """
    from jobs_helpers import loop_fs

    with loop_fs(tmp_path, "xfs", size) as mnt:
        yield mnt


def files_equal_to(root: Path, truth: Path) -> list[Path]:
    """Files under ``root`` whose bytes equal ``truth``'s (found by content, not by name)."""
    want = file_digest(truth)
    size = truth.stat().st_size
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath, f)
            if p.is_file() and p.stat().st_size == size and file_digest(p) == want:
                out.append(p)
    return sorted(out)
