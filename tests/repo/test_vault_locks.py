"""The vault alone (``exclusive_lock``, once the one writer lock): backups refused or
waiting while a holder has it, readers never blocked, a dead holder never blocks; and a
running backup shares the vault with another VM's but not with a command needing it alone.

The holder is a real process: either a small Python process holding
``cbt.repo.lock.exclusive_lock`` while it sleeps, or a real ``cbt backup`` frozen
with SIGSTOP while it holds the lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import KIB, MIB
from helpers.cli import cbt, cbt_argv, clean_env, json_lines, one_error_line
from helpers.images import assert_same_disk, fs_image, keep_copy
from helpers.system import need_root_tools

import cbt as cbt_api
from cbt.source.synth import mutate

HOLDER = """
import sys, time
root, hold = sys.argv[1], float(sys.argv[2])
sys.argv = ["cbt", "backup", "holder-of-the-lock"]
from cbt.repo.lock import exclusive_lock
from cbt.repo.storage import LocalStorage
with exclusive_lock(LocalStorage(root)):
    print("locked", flush=True)
    time.sleep(hold)
print("released", flush=True)
"""


@pytest.fixture
def vault(tmp_path: Path) -> Iterator[Path]:
    fs_image(tmp_path / "os.img", 2 * MIB, 81)
    cbt_api.Vault.init(tmp_path / "v").backup("vm", [tmp_path / "os.img"], block_size=64 * KIB)
    yield tmp_path / "v"


def _hold(vault: Path, seconds: float) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(vault), str(seconds)],
                         stdout=subprocess.PIPE, text=True, env=clean_env())
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "locked"
    return p


def _check_refusal(line: str, pid: int, command: str) -> None:
    assert f"pid {pid}" in line, line
    assert socket.gethostname() in line, line
    assert command in line, line
    assert re.search(r"since \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", line), line


@pytest.mark.slow
def test_second_writer_fails_at_once_naming_the_holder(vault: Path, tmp_path: Path) -> None:
    holder = _hold(vault, 120)
    try:
        r = cbt("backup", vault, tmp_path / "os.img", "--vm", "vm")
        assert holder.poll() is None, "the second writer waited for the holder"
        line = one_error_line(r)
        _check_refusal(line, holder.pid, "cbt backup holder-of-the-lock")
        r = cbt("backup", vault, tmp_path / "os.img", "--json", "--vm", "vm")
        assert r.returncode == 2
        err = json_lines(r.stdout)[-1]
        assert err["type"] == "error" and f"pid {holder.pid}" in err["message"]
        assert len(cbt_api.Vault.open(vault).point_ids()) == 1
        # readers take no lock
        listed = json.loads(cbt("list", vault, "--json").stdout)
        assert len(listed["points"]) == 1
        assert cbt("show", vault, "vm.latest", "--json").returncode == 0
        assert cbt("verify", vault).returncode == 0
        r = cbt("restore", vault, "vm.latest", "--to", tmp_path / "out")
        assert r.returncode == 0, r.stderr
        assert_same_disk(tmp_path / "out" / "os.img", tmp_path / "os.img", 64 * KIB)
        # a dead holder never blocks: flock dies with its process
        holder.kill()
        holder.wait()
        r = cbt("backup", vault, tmp_path / "os.img", "--vm", "vm")
        assert r.returncode == 0, r.stderr
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_wait_succeeds_once_the_holder_releases(vault: Path, tmp_path: Path) -> None:
    holder = _hold(vault, 1.0)
    try:
        r = cbt("backup", vault, tmp_path / "os.img", "--wait", "30", "--json", "--vm", "vm")
        assert r.returncode == 0, r.stderr
        assert holder.wait(timeout=30) == 0
        assert holder.stdout is not None and holder.stdout.read().strip() == "released"
        assert len(cbt_api.Vault.open(vault).point_ids()) == 2
    finally:
        holder.kill()
        holder.wait()
    holder = _hold(vault, 120)
    try:
        started = time.monotonic()
        r = cbt("backup", vault, tmp_path / "os.img", "--wait", "1", "--vm", "vm")
        assert time.monotonic() - started >= 1.0, "gave up before --wait expired"
        assert r.returncode == 2, r.stderr
        waiting, error = r.stderr.strip().splitlines()  # waiting says whom it waits for
        assert waiting.startswith("cbt: waiting (up to 1 s) for vault "), waiting
        _check_refusal(waiting, holder.pid, "holder-of-the-lock")
        _check_refusal(error, holder.pid, "holder-of-the-lock")
        assert holder.poll() is None
    finally:
        holder.kill()
        holder.wait()


def _shared_holders(vault: Path) -> list[int]:
    pids = []
    for f in (vault / "locks").glob("shared-*"):
        with contextlib.suppress(OSError, ValueError):
            pids.append(json.loads(f.read_text() or "{}").get("pid"))
    return pids


@pytest.mark.slow
def test_a_running_backup_shares_the_vault(vault: Path, tmp_path: Path) -> None:
    """(Before many writers: a running backup refused another VM's backup.)  Now another
    VM's backup runs beside it, a command needing the vault alone is refused naming it,
    and readers see no point in flight."""
    from cbt.ops.verify import repair
    from cbt.repo.lock import VaultLockedError

    big = tmp_path / "big.img"
    big.write_bytes(np.random.default_rng(82).integers(0, 256, 64 * MIB, np.uint8).tobytes())
    proc = subprocess.Popen(cbt_argv("backup", vault, big, "--block-size", "4K", "--vm", "other"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=clean_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if proc.pid in _shared_holders(vault):
                break
            time.sleep(0.001)
        os.killpg(proc.pid, signal.SIGSTOP)
        assert proc.poll() is None, "the backup finished before the test could freeze it"
        r = cbt("backup", vault, tmp_path / "os.img", "--vm", "vm")
        assert r.returncode == 0, r.stderr
        with pytest.raises(VaultLockedError) as info:
            repair(cbt_api.Vault.open(vault))
        _check_refusal(str(info.value), proc.pid, "backup")
        listed = json.loads(cbt("list", vault, "--json").stdout)
        assert [p["vm"] for p in listed["points"]] == ["vm", "vm"], "a point in flight is visible"
        assert cbt("verify", vault).returncode == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGCONT)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    listed = json.loads(cbt("list", vault, "--json").stdout)
    assert sorted(p["vm"] for p in listed["points"]) == ["other", "vm", "vm"]
    assert cbt("verify", vault).returncode == 0


@pytest.mark.slow
def test_readers_racing_an_index_merge(tmp_path: Path) -> None:
    """A reader that listed the index segments just before a backup merged them.

    Readers take no lock, so a backup may run while they read.  The reader's open
    of an index segment is held back by strace (fault injection: a delay on
    entry, only for that file) while a backup merges the segments into one and
    retires the old ones to the trash.  The reader must still succeed with a consistent
    view (the pages of a retired segment are read from the trash).
    """
    need_root_tools("strace")
    from cbt.repo.compact import WIDTH

    img = tmp_path / "d.img"
    img.write_bytes(np.random.default_rng(83).integers(0, 256, 1 * MIB, np.uint8).tobytes())
    vault = tmp_path / "v"
    v = cbt_api.Vault.init(vault)
    for day in range(WIDTH - 1):  # (a tier one short of a merge)
        if day:
            mutate(img, seed=830 + day, page_writes=2, runs=0, zero_runs=0, holes=0)
        v.backup("vm", [img], block_size=64 * KIB)
    keep_copy(img, tmp_path / "then.img")
    first = sorted((vault / "index").glob("*.cbtidx"))[0]
    readers = {}
    for name, args in (("verify", ["verify", vault]),
                       ("restore", ["restore", vault, "vm.latest", "--to", tmp_path / "out"])):
        log = tmp_path / f"{name}.trace"
        readers[name] = (log, subprocess.Popen(
            # the vault opens a file relative to its folder's descriptor: trace the opens
            # in index/, and hold the first (the first segment listed) for 3 s
            ["strace", "-f", "-qq", "-e", "signal=none", "-o", str(log), "-P",
             str(first.parent), "-e", "trace=openat",
             "-e", "inject=openat:delay_enter=3000000:when=1",
             *cbt_argv(*args)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env()))
    deadline = time.monotonic() + 30
    for log, proc in readers.values():  # each reader is now held at its open of `first`
        while time.monotonic() < deadline and proc.poll() is None and not (
                log.exists() and first.name in log.read_text()):
            time.sleep(0.01)
        assert proc.poll() is None
    mutate(img, seed=899, page_writes=2, runs=0, zero_runs=0, holes=0)
    v.backup("vm", [img])  # the WIDTH-th segment: merged, old segments retired to the trash
    assert not first.exists(), "the backup was to merge the index"
    failed = []
    for name, (_log, proc) in readers.items():
        _out, err = proc.communicate(timeout=60)
        if proc.returncode != 0:
            failed.append(f"cbt {name} exit {proc.returncode}: " + " | ".join(
                err.splitlines()[:2]))
    assert failed == [], failed
    assert_same_disk(tmp_path / "out" / "d.img", tmp_path / "then.img", 64 * KIB)
