"""Helpers for the backup-job tests: configs, real hook scripts, loop-mounted file systems.

Hooks are small Python scripts run as real processes ([sys.executable, script]).
Every hook appends one JSON line to ``STATE/log`` (phase, vm, point, pid, and
what it observed: the listing of the paths it was asked to watch), then does
what the control file ``STATE/ctl-<phase>`` says (exit code, stderr text,
sleep, hang with a child, SIGKILL of cbt's process group, ...).  Truth about
the run comes from these logs, the disks themselves and plain numpy, never
from cbt's own code.
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
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from conftest import need, need_root_tools
from vault_helpers import cbt, cbt_argv, clean_env, json_lines

MIB = 1 << 20

# The exact --json shapes of issue 5.
CHECK_KEYS = {"vault", "vms", "warnings"}
CHECK_VM_KEYS = {"name", "policy", "disks"}
CHECK_DISK_KEYS = {"label", "path", "snapshot"}
JOBS_KEYS = {"jobs", "warnings"}
JOB_KEYS = {"id", "vm", "policy", "start", "end", "status", "consistency", "recovery_point",
            "disks", "error"}
ERROR_LINE_KEYS = {"type", "vm", "message", "warnings"}

HOOK = r'''
import json, os, signal, subprocess, sys, time

state = sys.argv[1]
watch = sys.argv[2:]
phase = os.environ.get("CBT_PHASE", "?")
ctl_path = os.path.join(state, "ctl-" + phase)
ctl = {}
if os.path.exists(ctl_path):
    with open(ctl_path) as f:
        ctl = json.load(f)
    if ctl.get("once"):
        os.unlink(ctl_path)
observed = {}
for w in watch:
    observed[w] = sorted(os.listdir(w)) if os.path.isdir(w) else None
entry = {"phase": phase, "vm": os.environ.get("CBT_VM"), "point": os.environ.get("CBT_POINT"),
         "pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd(), "time": time.time(),
         "observed": observed, "argv0": sys.argv[0]}
counter = os.environ.get("CBT_CRASH_COUNTER")  # durable steps the run has taken so far
if counter and os.path.exists(counter):
    with open(counter) as f:
        entry["steps"] = int(f.read().strip() or 0)
if ctl.get("hang"):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    entry["child"] = child.pid
if ctl.get("quiesce"):  # the one-moment writer: ask it to pause and wait until it has
    token = os.environ.get("CBT_POINT", "") + "-" + str(os.getpid())
    with open(os.path.join(ctl["quiesce"], "quiesce.tmp"), "w") as f:
        f.write(token)
    os.rename(os.path.join(ctl["quiesce"], "quiesce.tmp"), os.path.join(ctl["quiesce"], "quiesce"))
    deadline = time.time() + 20
    paused = os.path.join(ctl["quiesce"], "paused")
    while True:
        try:
            with open(paused) as f:
                got = f.read()
        except FileNotFoundError:
            got = ""
        if got.split(" ")[0] == token:
            entry["paused_at"] = int(got.split(" ")[1])
            break
        if time.time() > deadline:
            sys.stderr.write("writer did not pause\n")
            sys.exit(9)
        time.sleep(0.002)
if ctl.get("resume"):
    try:
        os.unlink(os.path.join(ctl["resume"], "quiesce"))
    except FileNotFoundError:
        pass
with open(os.path.join(state, "log"), "a") as f:
    f.write(json.dumps(entry) + "\n")
    f.flush()
    os.fsync(f.fileno())
if ctl.get("killgroup"):  # kill -9 of the cbt run that started this hook (not of this hook)
    os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)
if ctl.get("term_parent"):
    os.kill(os.getppid(), signal.SIGTERM)
if ctl.get("stderr"):
    sys.stderr.write(ctl["stderr"])
    sys.stderr.flush()
if ctl.get("sleep"):
    time.sleep(ctl["sleep"])
if ctl.get("hang"):
    while True:
        time.sleep(1)
sys.exit(int(ctl.get("exit", 0)))
'''


def write_hook(state: Path) -> Path:
    """The hook script and its state directory (``state/log``, ``state/ctl-PHASE``)."""
    state.mkdir(parents=True, exist_ok=True)
    script = state / "hook.py"
    script.write_text(HOOK)
    return script


def hook_argv(state: Path, *watch: object) -> list[str]:
    return [sys.executable, str(state / "hook.py"), str(state), *map(str, watch)]


def set_ctl(state: Path, phase: str, **ctl: Any) -> None:
    (state / f"ctl-{phase}").write_text(json.dumps(ctl))


def clear_ctl(state: Path) -> None:
    for p in state.glob("ctl-*"):
        p.unlink()


def hook_log(state: Path) -> list[dict[str, Any]]:
    p = state / "log"
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def phases(state: Path) -> list[str]:
    return [e["phase"] for e in hook_log(state)]


# -- configs ------------------------------------------------------------------------------


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)


def write_config(path: Path, vms: Mapping[str, Mapping[str, Any]], vault: str = "vault",
                 policy: str = "daily", schedule: str = "daily 02:00") -> Path:
    """A config file; each VM's hooks (a dict) become a ``[vm.NAME.hooks]`` table."""
    lines = [f"vault = {toml_value(vault)}", "", f"[policy.{policy}]",
             f"schedule = {toml_value(schedule)}", ""]
    for name, vm in vms.items():
        lines.append(f"[vm.{name}]")
        lines.append(f"policy = {toml_value(vm.get('policy', policy))}")
        for key, value in vm.items():
            if key not in ("policy", "hooks"):
                lines.append(f"{key} = {toml_value(value)}")
        if vm.get("hooks") is not None:
            lines.append(f"[vm.{name}.hooks]")
            for key, value in vm["hooks"].items():
                lines.append(f"{key} = {toml_value(value)}")
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def make_disk(path: Path, size: int, seed: int, zero_share: float = 0.2) -> Path:
    """A fully written disk image: random data with some all-zero stretches."""
    rng = np.random.default_rng(seed)
    data = rng.integers(1, 256, size=size, dtype=np.uint8)
    page = 4096
    pages = size // page
    for p in rng.choice(pages, size=int(pages * zero_share), replace=False).tolist():
        data[p * page:(p + 1) * page] = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    data.tofile(path)
    return path


def write_random(path: Path, size: int, seed: int) -> None:
    """A fully written file of ``size`` random bytes, in chunks (large disks)."""
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 32 * MIB)
            f.write(rng.integers(0, 256, size=n, dtype=np.uint8).tobytes())
            left -= n


def scribble(path: Path, seed: int, pages: int = 20) -> None:
    """Overwrite ``pages`` random 4 KiB pages of a disk in place with random bytes (fsynced)."""
    rng = np.random.default_rng(seed)
    size = os.path.getsize(path)
    fd = os.open(path, os.O_WRONLY)
    try:
        for _ in range(pages):
            page = int(rng.integers(0, max(1, size // 4096)))
            os.pwrite(fd, rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), page * 4096)
        os.fsync(fd)
    finally:
        os.close(fd)


# -- running cbt ----------------------------------------------------------------------------


def backup_config(cfg: Path, *args: object, env: Mapping[str, str] | None = None,
                  timeout: float = 120) -> tuple[subprocess.CompletedProcess[str],
                                                 list[dict[str, Any]]]:
    """``cbt backup --config CFG --json``: the process and its result lines (not progress)."""
    r = cbt("backup", "--config", cfg, "--json", *args, env=env, timeout=timeout)
    lines = [x for x in json_lines(r.stdout) if x.get("type") != "progress"]
    return r, lines


def one_point(cfg: Path, *args: object) -> dict[str, Any]:
    r, lines = backup_config(cfg, *args)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert len(lines) == 1 and lines[0]["type"] == "point", lines
    return lines[0]


def jobs_json(vault: Path, vm: str | None = None) -> list[dict[str, Any]]:
    args: list[object] = ["jobs", vault, "--json"]
    if vm is not None:
        args += ["--vm", vm]
    r = cbt(*args)
    assert r.returncode == 0, (r.stdout, r.stderr)
    obj = json.loads(r.stdout)
    assert set(obj) == JOBS_KEYS, obj
    for j in obj["jobs"]:
        assert set(j) == JOB_KEYS, j
    return list(obj["jobs"])


def statuses(jobs: list[dict[str, Any]]) -> list[str]:
    """The jobs' statuses, sorted (jobs started in the same second may list in any order)."""
    return sorted(j["status"] for j in jobs)


def job_with(jobs: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    """The one job whose keys have these values."""
    found = [j for j in jobs if all(j.get(k) == v for k, v in match.items())]
    assert len(found) == 1, (match, jobs)
    return found[0]


def point_ids(vault: Path) -> list[str]:
    r = cbt("list", vault, "--json")
    assert r.returncode == 0, r.stderr
    return [p["recovery_point"] for p in json.loads(r.stdout)["points"]]


def restore_point(vault: Path, point: str, to: Path) -> Path:
    r = cbt("restore", vault, point, "--to", to, "--json")
    assert r.returncode == 0, (r.stdout, r.stderr)
    return to


def start_cbt(*args: object, env: Mapping[str, str] | None = None,
              stdout: Any = subprocess.PIPE) -> subprocess.Popen[str]:
    """A cbt process in its own session (so a kill of its group spares pytest)."""
    return subprocess.Popen(cbt_argv(*args), env=clean_env(env), stdout=stdout,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(cond: Any, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def process_gone(pid: int) -> bool:
    """No such process, or only a zombie nobody reaped yet (it no longer runs)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def kill_if_alive(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


def can_reflink(directory: Path) -> bool:
    """Does ``cp --reflink=always`` work here (independent of cbt's own probe)?"""
    src, dst = directory / ".reflink-src", directory / ".reflink-dst"
    src.write_bytes(b"x" * 4096)
    try:
        r = subprocess.run(["cp", "--reflink=always", str(src), str(dst)], capture_output=True,
                           check=False)
        return r.returncode == 0
    finally:
        src.unlink()
        with contextlib.suppress(FileNotFoundError):
            dst.unlink()


@contextlib.contextmanager
def no_clone_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder on a file system that cannot clone files.

    ``tmp_path`` itself where it cannot; otherwise (a /tmp on XFS or btrfs) a small
    tmpfs mounted for the test (root), so the test still runs instead of skipping.
    """
    if not can_reflink(tmp_path):
        yield tmp_path
        return
    need(os.geteuid() == 0 and shutil.which("mount") is not None,
         "tmp_path clones files and mounting a tmpfs without clones needs root")
    mnt = tmp_path / "noclone"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(mnt)], check=True,
                   capture_output=True)
    try:
        assert not can_reflink(mnt)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def stamps(path: Path) -> np.ndarray:
    """The writer's stamps of a disk: slot k (offset 8*k) holds k; slot 0 unused."""
    return np.fromfile(path, dtype="<u8")[1:]


def prefix_length(path: Path) -> int:
    """n such that the disk holds stamps 1..n and nothing after: else AssertionError."""
    s = stamps(path)
    n = int(np.count_nonzero(s))
    assert np.array_equal(s[:n], np.arange(1, n + 1, dtype=np.uint64)), \
        f"{path}: the stamps are not a prefix 1..{n}"
    return n


# -- loop-mounted file systems -----------------------------------------------------------------


@contextlib.contextmanager
def loop_fs(tmp_path: Path, kind: str, size: int = 512 * MIB) -> Iterator[Path]:
    """A fresh XFS (reflink) or btrfs on a sparse file through a loop device, mounted."""
    mkfs = {"xfs": "mkfs.xfs", "btrfs": "mkfs.btrfs"}[kind]
    need_root_tools("losetup", mkfs, "mount", "umount", *(["btrfs"] if kind == "btrfs" else []))
    backing = tmp_path / f"{kind}.backing"
    with open(backing, "wb") as f:
        f.truncate(size)
    mnt = tmp_path / f"mnt-{kind}"
    mnt.mkdir()
    r = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True,
                       text=True, check=False)
    need(r.returncode == 0, f"losetup failed: {r.stderr.strip()}")
    dev = r.stdout.strip()
    mounted = False
    try:
        args = ([mkfs, "-q", "-f", "-m", "reflink=1", dev] if kind == "xfs"
                else [mkfs, "-q", "-f", dev])
        subprocess.run(args, check=True, capture_output=True)
        subprocess.run(["mount", dev, str(mnt)], check=True, capture_output=True)
        mounted = True
        yield mnt
    finally:
        if mounted:
            for _ in range(50):
                if subprocess.run(["umount", str(mnt)], capture_output=True,
                                  check=False).returncode == 0:
                    break
                time.sleep(0.1)
            else:
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
        subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)
        backing.unlink()


def is_subvolume(path: Path) -> bool:
    return path.is_dir() and path.stat().st_ino == 256


def is_readonly_subvolume(path: Path) -> bool:
    r = subprocess.run(["btrfs", "property", "get", "-ts", str(path), "ro"],
                       capture_output=True, text=True, check=False)
    return r.returncode == 0 and r.stdout.strip() == "ro=true"
