"""SIGKILL at random moments during backup, gc and copy into an S3 vault.

After each kill: ``verify --data`` finds nothing wrong, every committed point
restores bit for bit, and the next run succeeds; a backup after a killed one
reuses the packs that run finished (its orphan packs are adopted: it stores
fewer new bytes than a fresh backup of the same data would).  Kill moments are
drawn from a seeded generator over the measured length of an unkilled run, a
few rounds each, so the time stays bounded.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from helpers import MIB
from helpers.cli import cbt, result_lines, start_cbt
from helpers.images import assert_same_bytes, write_at, write_random_disk
from helpers.s3 import fresh_bucket
from helpers.vaults import PASSWORD

ROUNDS = 4
MAX_ROUNDS = 8  # the backup test goes on until a kill has landed after a finished pack
DISK = 24 * MIB  # three packs of 8 MiB: a kill lands between finished packs


def ok(*args: object, env: dict[str, str]) -> list[dict[str, Any]]:
    r = cbt(*args, "--json", env=env, timeout=300)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return result_lines(r.stdout)


def killed(args: list[object], env: dict[str, str], after: float, vault: str,
           packs_first: bool = False) -> bool:
    """Run cbt ARGS, SIGKILL its process group ``after`` seconds in (with
    ``packs_first``: ``after`` seconds after a new pack has appeared in ``vault``);
    whether it finished first (then it must have succeeded).  The locks the killed run
    held are left: the next run breaks them (their holder is a dead process of this
    host)."""
    before = _pack_count(vault, env) if packs_first else 0
    proc = start_cbt(*args, env=env)
    try:
        if packs_first:
            deadline = time.monotonic() + 120
            while proc.poll() is None and _pack_count(vault, env) <= before:
                assert time.monotonic() < deadline, "no pack appeared"
                time.sleep(0.01)
        proc.wait(timeout=after)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return False
    out, err = proc.communicate()
    assert proc.returncode == 0, (args, out, err)
    return True


def _pack_count(vault: str, env: dict[str, str]) -> int:
    from cbt.repo.stores import storage_at

    with _aws(env):
        return len(storage_at(vault).list("packs"))


@contextlib.contextmanager
def _aws(env: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, val in saved.items():
            if val is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = val


def timed(args: list[object], env: dict[str, str]) -> tuple[float, list[dict[str, Any]]]:
    t0 = time.monotonic()
    lines = ok(*args, env=env)
    return time.monotonic() - t0, lines


def check_vault(vault: str, truths: dict[str, Path], env: dict[str, str],
                out: Path) -> list[str]:
    """verify --data clean; every committed point (of those with a truth) restores bit for
    bit; returns the committed point ids."""
    verified = ok("verify", vault, "--data", env=env)[-1]
    assert verified["problems"] == [], verified
    ids = [p["recovery_point"] for p in ok("list", vault, env=env)[-1]["points"]]
    for pid in ids:
        if pid not in truths:
            continue
        dest = out / f"r-{pid}-{time.monotonic_ns()}"
        ok("restore", vault, pid, "--to", dest, env=env)
        assert_same_bytes(dest / "os.img", truths[pid])
    return ids


def _stored(line: dict[str, Any]) -> int:
    return sum(int(d["bytes_stored"]) for d in line["disks"])


def _orphans(vault: str, env: dict[str, str]) -> int:
    """Bytes of the packs no index segment covers (a killed run's finished packs)."""
    from cbt.repo.vault import Vault

    with _aws(env):
        v = Vault.open(vault, PASSWORD.encode())
        index = v.load_index()
        return sum(v.storage.size(n) for n in index.orphans)


def test_backup_killed_at_random_moments(env: dict[str, str], tmp_path: Path) -> None:
    vault = f"s3://{fresh_bucket()}/v"
    ok("init", vault, "--kdf-log-n", "10", env=env)
    disk = write_random_disk(tmp_path / "os.img", DISK, seed=7)
    truths: dict[str, Path] = {}
    rng = random.Random(15)
    full, _ = timed(["backup", vault, "--vm", "probe", f"os={disk}"], env)
    reused = 0
    for i in range(MAX_ROUNDS):
        if i >= ROUNDS and reused:
            break
        # new data each round: a fresh backup of it would store DISK bytes
        disk = write_random_disk(tmp_path / "os.img", DISK, seed=100 + i)
        now = f"2026-01-{i + 1:02d}T00:00:00Z"
        pid = f"web.202601{i + 1:02d}T000000Z"
        truth = tmp_path / f"truth-{i}.img"
        truth.write_bytes(disk.read_bytes())
        truths[pid] = truth
        # every other round: just after a pack is finished (the reuse is checked then)
        after = rng.uniform(0.0, 0.1 if i % 2 else 1.0) * full
        finished = killed(["backup", vault, "--vm", "web", "--now", now, f"os={disk}"], env,
                          after, vault, packs_first=bool(i % 2))
        ids = check_vault(vault, truths, env, tmp_path)
        if finished or pid in ids:
            continue
        orphans = _orphans(vault, env)
        line = ok("backup", vault, "--vm", "web", "--now", now, f"os={disk}", env=env)[-1]
        assert line["recovery_point"] == pid, line
        if orphans:
            assert _stored(line) <= DISK + MIB - orphans, (line, orphans)
            reused += 1
        check_vault(vault, truths, env, tmp_path)
    assert reused >= 1, "no kill landed after a finished pack: retune the moments"


def test_gc_killed_at_random_moments(env: dict[str, str], tmp_path: Path) -> None:
    """Each round: a new point replaces the old one (prune by a config), then gc is killed
    midway; what is committed stays whole, and a gc run to the end after it is clean."""
    vault = f"s3://{fresh_bucket()}/g"
    ok("init", vault, "--kdf-log-n", "10", env=env)
    disk = tmp_path / "os.img"
    cfg = tmp_path / "cbt.toml"
    cfg.write_text(f'vault = "{vault}"\n[policy.p]\nschedule = "daily 02:00"\n'
                   'retention = { daily = 1 }\n'
                   f'[vm.web]\npolicy = "p"\nsnapshot = "none"\ndisks = {{ os = "{disk}" }}\n')
    truths: dict[str, Path] = {}
    rng = random.Random(16)
    landed = 0
    for i in range(ROUNDS + 1):
        write_random_disk(disk, DISK // 2, seed=200 + i)
        # a part of the old data stays: gc rewrites packs, not only removes them
        if i:
            write_at(disk, 0, truths[f"web.2026010{i}T020000Z"].read_bytes()[:DISK // 4])
        now = f"2026-01-0{i + 1}T02:00:00Z"
        r = cbt("backup", "--config", cfg, "--now", now, "--json", env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        truth = tmp_path / f"truth-{i}.img"
        truth.write_bytes(disk.read_bytes())
        truths[f"web.2026010{i + 1}T020000Z"] = truth
        ok("prune", "--config", cfg, "--now", f"2026-01-0{i + 1}T03:00:00Z", env=env)
        if i == 0:
            continue
        full, _ = timed(["gc", vault, "--dry-run"], env)  # (its marking: most of a gc)
        landed += not killed(["gc", vault, "--grace", "0"], env,
                             rng.uniform(0.2, 1.0) * full, vault)
        check_vault(vault, truths, env, tmp_path)
        ok("gc", vault, "--grace", "0", env=env)
        ids = check_vault(vault, truths, env, tmp_path)
        assert ids == [f"web.2026010{i + 1}T020000Z"], ids
    assert landed, "no kill landed during a gc: retune the moments"


def test_copy_killed_at_random_moments(env: dict[str, str], tmp_path: Path) -> None:
    """A directory vault copied into S3, killed midway, again and again: DST stays whole,
    and the copy run to the end after it sends only what was not sent yet."""
    src = tmp_path / "src"
    ok("init", src, "--kdf-log-n", "10", env=env)
    disk = tmp_path / "os.img"
    truths: dict[str, Path] = {}
    for i in range(3):
        write_random_disk(disk, DISK // 2, seed=300 + i)
        now = f"2026-01-0{i + 1}T00:00:00Z"
        ok("backup", src, "--vm", "web", "--now", now, f"os={disk}", env=env)
        truth = tmp_path / f"truth-{i}.img"
        truth.write_bytes(disk.read_bytes())
        truths[f"web.2026010{i + 1}T000000Z"] = truth
    probe = f"s3://{fresh_bucket()}/probe"
    ok("init", probe, "--kdf-log-n", "10", env=env)
    full, lines = timed(["copy", src, probe, "--to-password-file", env["CBT_PASSWORD_FILE"]],
                        env)
    total_sent = lines[-1]["bytes_sent"]
    rng = random.Random(17)
    dst = f"s3://{fresh_bucket()}/copy"
    ok("init", dst, "--kdf-log-n", "10", env=env)
    landed = 0
    for _ in range(ROUNDS):
        if killed(["copy", src, dst, "--to-password-file", env["CBT_PASSWORD_FILE"]], env,
                  rng.uniform(0.1, 0.9) * full, dst):
            break
        landed += 1
        check_vault(dst, truths, env, tmp_path)
    assert landed, "no kill landed during a copy: retune the moments"
    lines = ok("copy", src, dst, "--to-password-file", env["CBT_PASSWORD_FILE"], env=env)
    assert lines[-1]["bytes_sent"] < total_sent, (lines[-1], total_sent)
    ids = check_vault(dst, truths, env, tmp_path)
    assert ids == sorted(truths), ids
