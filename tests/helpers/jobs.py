"""Backup jobs for the tests: config files, the hook script, and the job commands.

Hooks are one small Python script run as real processes ([sys.executable, script]).
Every call appends one JSON line to ``STATE/log`` (phase, vm, point, pid, time, and
what it observed: the listing of the paths it was asked to watch), then does what
the control file ``STATE/ctl-<phase>`` says (exit code, stderr text, sleep, hang
with a child, SIGKILL of cbt's process group, pause the one-moment writer, once
only, ...).  Truth about the run comes from these logs, the disks themselves and
plain numpy, never from cbt's own code.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from helpers.cli import cbt, json_lines, result_lines
from helpers.shapes import (
    ERROR_LINE_KEYS,
    JOB_KEYS,
    JOBS_KEYS,
    RAN_KEYS,
    SKIPPED_KEYS,
    SUMMARY_KEYS,
)

# -- the hook ---------------------------------------------------------------------------

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
    """The hook's argv (its script written if need be); it lists ``watch`` when it runs."""
    script = write_hook(state)
    return [sys.executable, str(script), str(state), *map(str, watch)]


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


def hook_lines(state: Path) -> list[str]:
    """The hook's calls as ``"PHASE VM TIME"`` lines."""
    return [f"{e['phase']} {e['vm']} {e['time']}" for e in hook_log(state)]


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
        if vm.get("hooks") is not None:
            lines.append(f"[vm.{name}.hooks]")
            lines += [f"{k} = {toml_value(v)}" for k, v in vm["hooks"].items()]
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def job_config(path: Path, vms: Mapping[str, Mapping[str, Any]], vault: str = "vault",
               policy: str = "daily", schedule: str = "daily 02:00") -> Path:
    """A config of one policy ``policy`` (``schedule``), every VM on it unless it names another."""
    return write_config(path, {policy: {"schedule": schedule}},
                        {name: {"policy": policy, **vm} for name, vm in vms.items()}, vault)


# -- job commands -------------------------------------------------------------------------


def backup_config(cfg: Path, *args: object, env: Mapping[str, str] | None = None,
                  timeout: float = 120) -> tuple[subprocess.CompletedProcess[str],
                                                 list[dict[str, Any]]]:
    """``cbt backup --config CFG --json``: the process and its result lines (not progress)."""
    r = cbt("backup", "--config", cfg, "--json", *args, env=env, timeout=timeout)
    return r, result_lines(r.stdout)


def one_point(cfg: Path, *args: object, now: str | None = None,
              vm: str | None = None) -> dict[str, Any]:
    """``cbt backup --config CFG [--vm VM] [--now T] ARGS`` of one VM that must succeed:
    its point line."""
    if vm:
        args = ("--vm", vm, *args)
    if now:
        args = ("--now", now, *args)
    r, lines = backup_config(cfg, *args, timeout=300)
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
