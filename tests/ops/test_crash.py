"""Crash safety: kill -9 of a backup at every durable step and at random times.

``CBT_CRASH_AT=N`` SIGKILLs the run's whole process group at its N-th durable
step (each fsync of a file or directory, counted across processes in the file
named by ``CBT_CRASH_COUNTER``).  A clean run on an identical vault counts the
steps and says what the run stores; then for every N a copy of a vault with
earlier points sees its next backup killed at step N, and afterwards:

- every earlier point restores bit-identical to the copy of its disks;
- ``cbt verify`` exits 0 (the killed run's data is only *unreferenced*);
- the next backup succeeds, restores bit-identical, and stores exactly what the
  clean run stores minus the blocks the killed run had already put in complete
  packs (resume, not restart); afterwards nothing is left unreferenced.

A last test runs a backup and a restore under ``strace -f`` and checks the
commit protocol: fsync of the temporary file, rename, fsync of its directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from helpers import KIB, MIB
from helpers.cli import cbt, cbt_argv, clean_env, json_lines
from helpers.images import assert_same_disk, fs_image, keep_copy
from helpers.packs import pack_files, trailer_entries
from helpers.system import need_root_tools
from helpers.truth import distinct_raw
from helpers.vaults import temp_files

import cbt as cbt_api
from cbt.ops.gc import gc
from cbt.source.synth import make_db_file, mutate

BS = 64 * KIB


@dataclass
class Scenario:
    root: Path
    base: Path  # a vault with earlier points; every iteration works on a copy
    vm: str
    disk_args: list[str]  # DISK arguments of the next backup
    earlier: list[tuple[str, dict[str, Path]]]  # point id -> copies of its disks
    today: dict[str, Path] = field(default_factory=dict)  # the disks the next backup reads
    steps: int = 0  # durable steps of a clean run
    clean_new: int = 0  # bytes_new of a clean run
    work_seconds: float = 0.0  # from taking the lock to the end of a clean run


def _backup_proc(scn: Scenario, vault: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(cbt_argv("backup", vault, *scn.disk_args, "--json", "--vm", scn.vm),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=clean_env(env), start_new_session=True)


def _live_members(pgid: int) -> list[int]:
    """Processes of a process group that are not dead (zombies awaiting reaping are dead)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            out.append(int(entry))
    return out


def _gone(pgid: int) -> bool:
    """The whole process group was killed (give the kernel a moment to finish the job)."""
    deadline = time.monotonic() + 5
    while _live_members(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _wait_for_lock(vault: Path, pid: int, proc: subprocess.Popen[str]) -> bool:
    """Wait until ``pid`` shares the vault (its line is in a ``locks/shared-*`` file)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        for f in (vault / "locks").glob("shared-*"):
            try:
                if json.loads(f.read_text() or "{}").get("pid") == pid:
                    return True
            except (OSError, ValueError):
                pass
        time.sleep(0.002)
    return False


def _count_clean_run(scn: Scenario) -> None:
    vault = scn.root / "clean"
    shutil.copytree(scn.base, vault)
    counter = scn.root / "clean.counter"
    counter.write_text("")
    proc = _backup_proc(scn, vault, {"CBT_CRASH_AT": str(10**9),
                                     "CBT_CRASH_COUNTER": str(counter)})
    assert _wait_for_lock(vault, proc.pid, proc)
    started = time.monotonic()
    out, err = proc.communicate(timeout=120)
    scn.work_seconds = time.monotonic() - started
    assert proc.returncode == 0, err
    point = json_lines(out)[-1]
    scn.steps = int(counter.read_text())
    scn.clean_new = sum(d["bytes_new"] for d in point["disks"])
    assert scn.steps >= 6, "a point needs at least packs, manifests, index and record"
    assert scn.clean_new > 0


def _two_disk_scenario(root: Path) -> Scenario:
    disks, copies = root / "disks", root / "copies"
    disks.mkdir()
    copies.mkdir()
    os_img, db_img = disks / "os.img", disks / "db.img"
    fs_image(os_img, 4 * MIB, 31)
    make_db_file(db_img, 2 * MIB, seed=32)
    vault = cbt_api.Vault.init(root / "base")
    args = [f"os={os_img}", f"db={db_img}"]
    scn = Scenario(root, root / "base", "web", args, [])
    for day in range(3):
        if day:
            mutate(os_img, seed=40 + day, page_writes=8, runs=2, run_length=512 * KIB)
            mutate(db_img, seed=50 + day, page_writes=60, runs=0, zero_runs=0, holes=0)
        snap = {lb: keep_copy(disks / f"{lb}.img", copies / f"{lb}.{day}.img")
                for lb in ("os", "db")}
        if day < 2:
            point = vault.backup(scn.vm, args, block_size=BS)
            scn.earlier.append((point.id, snap))
        else:
            scn.today = snap
    _count_clean_run(scn)
    return scn


def _many_segments_scenario(root: Path) -> Scenario:
    """WIDTH - 1 earlier points, each with a small (lowest tier) paged index segment: the
    next run's segment crowds the tier, and the run merges the WIDTH of them into one
    after its commit, then retires them to the trash."""
    from cbt.repo.compact import WIDTH

    disks, copies = root / "disks", root / "copies"
    disks.mkdir()
    copies.mkdir()
    img = disks / "small.img"
    img.write_bytes(np.random.default_rng(60).integers(0, 256, 1 * MIB, np.uint8).tobytes())
    vault = cbt_api.Vault.init(root / "base")
    scn = Scenario(root, root / "base", "small", [str(img)], [])
    for day in range(WIDTH):
        if day:
            mutate(img, seed=60 + day, page_writes=3, runs=0, zero_runs=0, holes=0)
        snap = {"small": keep_copy(img, copies / f"small.{day}.img")}
        if day < WIDTH - 1:
            point = vault.backup(scn.vm, scn.disk_args, block_size=BS)
            scn.earlier.append((point.id, snap))
        else:
            scn.today = snap
    assert len(list((root / "base" / "index").glob("*.cbtidx"))) == WIDTH - 1
    _count_clean_run(scn)
    merged = list((root / "clean" / "index").glob("*.cbtidx"))
    assert len(merged) == 1 and merged[0].name.startswith("merged-"), merged
    assert len(list((root / "clean" / "trash" / "index").iterdir())) == WIDTH
    return scn


@pytest.fixture(scope="module")
def two_disks(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    return _two_disk_scenario(tmp_path_factory.mktemp("crash2"))


@pytest.fixture(scope="module")
def many_segments(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    return _many_segments_scenario(tmp_path_factory.mktemp("crash16"))


def _check_after_kill(scn: Scenario, vault: Path, what: str) -> None:
    """Everything that must hold after a backup of ``vault`` was killed (or finished)."""
    base_packs = {p.name for p in pack_files(scn.base)}
    left_packs = [p for p in pack_files(vault) if p.name not in base_packs]
    reused = distinct_raw((d, raw) for p in left_packs for d, _o, _s, raw in trailer_entries(p))
    v = cbt_api.Vault.open(vault)
    earlier_ids = [pid for pid, _ in scn.earlier]
    committed = [p for p in v.point_ids() if p not in earlier_ids]
    assert len(committed) <= 1, f"{what}: points {committed}"
    # every earlier point restores bit-identical (the last two, and the first)
    for k in sorted({0, len(scn.earlier) - 2, len(scn.earlier) - 1} - {-1}):
        pid, snap = scn.earlier[k]
        out = vault.parent / f"r{k}"
        v.restore(pid, out)
        for lb, copy in snap.items():
            assert_same_disk(out / f"{lb}.img", copy, BS)
    if committed:  # killed after its commit: the point is whole
        out = vault.parent / "r-killed"
        v.restore(committed[0], out)
        for lb, copy in scn.today.items():
            assert_same_disk(out / f"{lb}.img", copy, BS)
    r = cbt("verify", vault, "--json")
    assert r.returncode == 0, f"{what}: cbt verify: {r.stdout} {r.stderr}"
    report = json.loads(r.stdout)
    assert report["problems"] == [], what
    if left_packs and not committed:
        assert report["unreferenced_bytes"] > 0, what
    # the next backup resumes: what the killed run put in complete packs is not sent again
    v = cbt_api.Vault.open(vault)
    follow = v.backup(scn.vm, scn.disk_args)
    expected_new = 0 if committed else scn.clean_new - reused
    assert follow.bytes_new == expected_new, (
        f"{what}: follow-up stored {follow.bytes_new} new bytes; a clean run stores "
        f"{scn.clean_new}, the killed run left {reused} in complete packs")
    out = vault.parent / "r-next"
    v.restore(follow.id, out)
    for lb, copy in scn.today.items():
        assert_same_disk(out / f"{lb}.img", copy, BS)
    assert temp_files(vault) == [], f"{what}: temporary files left after the next backup"
    after = v.verify()
    assert after["problems"] == [], what
    assert after["unreferenced_bytes"] == 0, f"{what}: the next backup did not reuse everything"


def _kill_at_step(scn: Scenario, n: int, work: Path) -> str:
    """Copy the base vault, run the next backup with CBT_CRASH_AT=n, check; returns a note."""
    vault = work / "vault"
    shutil.copytree(scn.base, vault)
    counter = work / "counter"
    counter.write_text("")
    proc = _backup_proc(scn, vault, {"CBT_CRASH_AT": str(n), "CBT_CRASH_COUNTER": str(counter)})
    out, err = proc.communicate(timeout=120)
    steps_done = int(counter.read_text() or 0)
    if proc.returncode == 0:  # this run had fewer durable steps (no new pack folder)
        assert steps_done < n, f"step {n}: exit 0 after {steps_done} steps"
    else:
        assert proc.returncode == -signal.SIGKILL, f"step {n}: rc {proc.returncode}: {err}"
        # another worker may finish a step of its own before the kill reaches it
        assert steps_done >= n
        assert '"type":"point"' not in out
    assert _gone(proc.pid), f"step {n}: processes of the killed run survive"
    _check_after_kill(scn, vault, f"crash at step {n} of {scn.steps}")
    return "completed" if proc.returncode == 0 else "killed"


@pytest.mark.slow
def test_crash_at_every_durable_step(two_disks: Scenario, tmp_path: Path) -> None:
    scn = two_disks
    outcomes = []
    for n in range(1, scn.steps + 1):
        work = tmp_path / f"n{n}"
        work.mkdir()
        outcomes.append(_kill_at_step(scn, n, work))
        shutil.rmtree(work)
    assert outcomes.count("killed") >= scn.steps - 2, outcomes


@pytest.mark.slow
def test_crash_while_merging_the_index(many_segments: Scenario, tmp_path: Path) -> None:
    """The run whose segment crowds the lowest tier merges the tier after its commit:
    killed at each durable step from its first to its last (the merged segment's
    write, each input's retirement), nothing is lost (see :func:`_check_after_kill`),
    and a gc then finds every block it must keep (each point restores again)."""
    scn = many_segments
    outcomes = []
    for n in range(1, scn.steps + 1):
        work = tmp_path / f"n{n}"
        work.mkdir()
        outcomes.append(_kill_at_step(scn, n, work))
        v = cbt_api.Vault.open(work / "vault")
        gc(v, grace=0)
        for pid, snap in scn.earlier:
            v.restore(pid, work / f"g-{pid}")
            for lb, copy in snap.items():
                assert_same_disk(work / f"g-{pid}" / f"{lb}.img", copy, BS)
        assert v.verify()["problems"] == [], f"step {n}: after gc"
        shutil.rmtree(work)
    assert outcomes.count("killed") >= scn.steps - 1, outcomes


@pytest.mark.slow
def test_kill_at_random_times(two_disks: Scenario, tmp_path: Path) -> None:
    scn = two_disks
    rng = np.random.default_rng(7)
    outcomes = []
    for i, frac in enumerate([0.1, 0.3, 0.5, 0.7]):
        work = tmp_path / f"k{i}"
        work.mkdir()
        vault = work / "vault"
        shutil.copytree(scn.base, vault)
        proc = _backup_proc(scn, vault, {})
        if _wait_for_lock(vault, proc.pid, proc):
            time.sleep(scn.work_seconds * float(np.clip(frac + rng.uniform(-0.1, 0.1), 0, 1)))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=120)
        outcomes.append(proc.returncode)
        _check_after_kill(scn, vault, f"kill at {frac:.0%} of the run")
        shutil.rmtree(work)
    assert outcomes.count(-signal.SIGKILL) >= 2, f"most kills should land mid-run: {outcomes}"


# -- strace: the commit protocol ---------------------------------------------------------

_LINE = re.compile(r"^(\d+)\s+(.*)$")
_FSYNC = re.compile(r"^f(?:data)?sync\(\d+<(.*)>")
_RENAME = re.compile(r"^rename(?:at2?)?\(")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_AT_DIR = re.compile(r'\d+<([^>]*)>, "((?:[^"\\]|\\.)*)"')
Event = tuple[str, str, str, str]  # pid, "fsync" or "rename", path or old name, new name


def _trace_events(path: Path, cwd: Path) -> list[Event]:
    """Successful fsyncs and renames in the order they completed."""
    events: list[Event] = []
    pending: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        m = _LINE.match(raw)
        if not m:
            continue
        pid, rest = m.groups()
        if rest.endswith("<unfinished ...>"):
            pending[pid] = rest[: -len("<unfinished ...>")]
            continue
        if rest.startswith("<..."):
            rest = pending.pop(pid, "") + rest.split("resumed>", 1)[1]
        if not re.search(r"=\s*0\s*$", rest):
            continue
        f = _FSYNC.match(rest)
        if f:
            events.append((pid, "fsync", f.group(1), ""))
        elif _RENAME.match(rest):
            at = _AT_DIR.findall(rest)  # renameat(dirfd<dir>, "name", dirfd<dir>, "name")
            if len(at) == 2:
                old, new = (os.path.join(d, n) for d, n in at)
            else:
                old, new = _QUOTED.findall(rest)[-2:]
            old, new = (p if p.startswith("/") else str(cwd / p) for p in (old, new))
            events.append((pid, "rename", old, new))
    return events


def _check_protocol(events: list[Event]) -> dict[int, int]:
    """Every rename of a temporary file follows an fsync of that file (same process)
    and is followed by an fsync of its directory; returns rename -> directory fsync."""
    dir_synced: dict[int, int] = {}
    for i, (pid, kind, old, new) in enumerate(events):
        if kind != "rename":
            continue
        assert re.fullmatch(r"\..+\.tmp-\d+", os.path.basename(old)), (
            f"rename of {old}, not a temporary file")
        assert os.path.dirname(old) == os.path.dirname(new)
        assert any(e == (pid, "fsync", old, "") for e in events[:i]), (
            f"pid {pid}: rename {old} -> {new} without an fsync of {old} before it")
        after = [j for j in range(i + 1, len(events))
                 if events[j] == (pid, "fsync", os.path.dirname(new), "")]
        assert after, f"pid {pid}: rename {old} -> {new} and no fsync of its directory after"
        dir_synced[i] = after[0]
    return dir_synced


@pytest.mark.slow
def test_commit_renames_follow_fsync_and_precede_directory_fsync(tmp_path: Path) -> None:
    need_root_tools("strace")
    disks = tmp_path / "disks"
    disks.mkdir()
    fs_image(disks / "os.img", 4 * MIB, 71)
    make_db_file(disks / "db.img", 2 * MIB, seed=72)
    vault = tmp_path / "vault"
    cbt_api.Vault.init(vault).backup("web", [disks / "os.img"], block_size=BS)
    mutate(disks / "os.img", seed=73)
    trace = ["strace", "-f", "-y", "-qq", "-e",
             "trace=fsync,fdatasync,rename,renameat,renameat2", "-o"]
    log = tmp_path / "backup.trace"
    r = subprocess.run([*trace, str(log), *cbt_argv("backup", vault, disks / "os.img",
                                                     disks / "db.img", "--vm", "web")],
                       capture_output=True, text=True, env=clean_env(), cwd=tmp_path,
                       timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    events = _trace_events(log, tmp_path)
    synced = _check_protocol(events)
    renames = {i: events[i][3] for i in synced}
    kinds = {k: [i for i, n in renames.items() if f"/{k}/" in n]
             for k in ("packs", "manifests", "index", "points")}
    assert len(kinds["packs"]) >= 2 and len(kinds["manifests"]) == 2
    assert len(kinds["index"]) == 1 and len(kinds["points"]) == 1
    assert sum(map(len, kinds.values())) == len(renames)
    # the point record's rename is the commit: everything it names is durable before it
    commit = kinds["points"][0]
    for i in kinds["packs"] + kinds["manifests"] + kinds["index"]:
        assert synced[i] < commit, f"{renames[i]} not durable before the point's commit"

    log = tmp_path / "restore.trace"
    r = subprocess.run([*trace, str(log), *cbt_argv("restore", vault, "web.latest",
                                                     "--to", tmp_path / "out")],
                       capture_output=True, text=True, env=clean_env(), cwd=tmp_path,
                       timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    restored = _check_protocol(_trace_events(log, tmp_path))
    assert len(restored) == 2
