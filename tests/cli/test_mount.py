"""``cbt mount`` for real: a FUSE mount served by a ``cbt`` process, an ext4 image on it
loop-mounted read-only and its files compared with the tree it was made from; the
every-point layout; write opens refused; a damaged block read as EIO; stopped by
SIGTERM, SIGINT or an external umount, leaving nothing mounted.  Every test cleans up
in ``finally`` (loop mounts, the FUSE mount, the process)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pytest
from helpers import KIB, MIB
from helpers.cli import cbt, kill_group, one_error_line, start_cbt
from helpers.images import fast_random
from helpers.packs import pack_files, walk_pack
from helpers.s3 import S3Server, fresh_bucket
from helpers.shapes import MOUNT_FILE_KEYS, MOUNT_KEYS
from helpers.system import need, need_root_tools
from helpers.truth import tree_hashes
from helpers.vaults import PASSWORD, encrypted_env

import cbt as cbt_api

pytestmark = pytest.mark.root

BS = 64 * KIB


def _need_fuse() -> None:
    need_root_tools("mount", "umount", "losetup", "mkfs.ext4", "fusermount3")
    need(os.path.exists("/dev/fuse"), "needs /dev/fuse")


def _in_mounts(path: Path) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


@contextlib.contextmanager
def _serving(*args: object, mnt: Path, env: dict[str, str] | None = None
             ) -> Iterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    """``cbt mount ARGS --json`` running; its JSON line once mounted.  Afterwards the
    process is stopped (SIGTERM, then killed) and the mount point released."""
    p = start_cbt("mount", *args, "--json", env=env)
    try:
        assert p.stdout is not None
        ready, _, _ = select.select([p.stdout], [], [], 60)
        line = p.stdout.readline() if ready else ""
        if not line:
            p.kill()
            raise AssertionError(f"cbt mount did not mount: {p.communicate()[1]}")
        yield p, json.loads(line)
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(30)
        if p.poll() is None:
            kill_group(p)
        if _in_mounts(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


def _stopped(p: subprocess.Popen[str], mnt: Path) -> str:
    """Wait for the process to end by itself: exit 0, nothing mounted; its stderr."""
    _out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert not _in_mounts(mnt)
    return err


@contextlib.contextmanager
def _loop_mounted(image: Path, at: Path) -> Iterator[Path]:
    at.mkdir()
    r = subprocess.run(["mount", "-o", "ro,loop", str(image), str(at)], capture_output=True,
                       text=True, check=False)
    assert r.returncode == 0, r.stderr
    try:
        yield at
    finally:
        subprocess.run(["umount", str(at)], capture_output=True, check=False)


def _tree(root: Path) -> Path:
    """Files worth comparing: empty, odd sizes, a block's worth, larger, text, sparse,
    nested, a symlink."""
    rng = np.random.default_rng(16)
    (root / "etc" / "deep" / "er").mkdir(parents=True)
    (root / "empty").write_bytes(b"")
    for i, n in enumerate((1, 4095, 4096, 65537, 300 * KIB, 1536 * KIB)):
        (root / f"r{i}.bin").write_bytes(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
    (root / "etc" / "fstab").write_text("".join(f"line {i}\n" for i in range(20000)))
    with open(root / "etc" / "deep" / "er" / "sparse", "wb") as f:
        f.truncate(3 * MIB)
        f.seek(2 * MIB)
        f.write(b"tail of a sparse file")
    (root / "etc" / "link").symlink_to("fstab")
    return root


def test_an_ext4_image_mounts_and_its_files_read_back(tmp_path: Path) -> None:
    """Encrypted vault, one point: MOUNTPOINT/LABEL.img, loop-mounted read-only, holds
    every file of the tree as it was; opens for writing fail (EROFS, root too);
    SIGTERM unmounts and exits 0."""
    _need_fuse()
    tree = _tree(tmp_path / "tree")
    image = tmp_path / "os.img"
    with open(image, "wb") as f:
        f.truncate(24 * MIB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image)], check=True)
    env = encrypted_env(tmp_path)
    assert cbt("init", tmp_path / "v", "--kdf-log-n", "10", env=env).returncode == 0
    r = cbt("backup", tmp_path / "v", f"os={image}", "--vm", "web", "--block-size", "16K",
            env=env)
    assert r.returncode == 0, r.stderr
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with _serving(tmp_path / "v", "web.latest", mnt, mnt=mnt, env=env) as (p, out):
        assert set(out) == MOUNT_KEYS and out["mountpoint"] == str(mnt)
        assert [set(f) for f in out["files"]] == [MOUNT_FILE_KEYS]
        served = mnt / "os.img"
        assert out["files"][0] == {"path": str(served), "size": 24 * MIB}
        assert sorted(os.listdir(mnt)) == ["os.img"]
        st = served.stat()
        assert st.st_size == 24 * MIB and st.st_mode & 0o222 == 0
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
            with pytest.raises(OSError) as exc:
                os.close(os.open(served, flags))
            assert exc.value.errno in (errno.EROFS, errno.EACCES)
        with _loop_mounted(served, tmp_path / "fs") as fs:
            assert tree_hashes(fs) == tree_hashes(tree)  # (lost+found: no files)
            assert os.readlink(fs / "etc" / "link") == "fstab"
        p.send_signal(signal.SIGTERM)
        _stopped(p, mnt)
    assert os.listdir(mnt) == []


def _plain_history(tmp_path: Path) -> tuple[Path, dict[str, dict[str, bytes]]]:
    """A plain vault: VM web (disks os and db) twice, VM db once; point -> label -> bytes."""
    vault = cbt_api.Vault.init(tmp_path / "v")
    truth: dict[str, dict[str, bytes]] = {}
    for vm, day, seed in (("web", 1, 1), ("web", 2, 2), ("db", 1, 3)):
        disks = {}
        for k, label in enumerate(("os", "db") if vm == "web" else ("data",)):
            data = bytearray(MIB + 3 * KIB)
            data[: 300 * KIB] = fast_random(300 * KIB, seed * 10 + k)
            data[-KIB:] = fast_random(KIB, seed * 10 + k + 5)
            (tmp_path / f"{label}.img").write_bytes(bytes(data))
            disks[label] = bytes(data)
        p = vault.backup(vm, [f"{label}={tmp_path / f'{label}.img'}" for label in disks],
                         block_size=BS, workers=1, created=f"2026-01-0{day}T02:00:00Z")
        truth[p.id] = disks
    return tmp_path / "v", truth


def test_every_point_layout_and_sigint(tmp_path: Path) -> None:
    """No POINT (the vault given with -r): VM/POINT/LABEL.img for every point, each
    reading as its disk did; the shared lock is held while mounted; SIGINT stops it."""
    _need_fuse()
    vault, truth = _plain_history(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with _serving("-r", vault, mnt, mnt=mnt) as (p, out):
        assert sorted(out["points"]) == sorted(truth)
        want = {str(mnt / pid.split(".")[0] / pid / f"{label}.img"): data
                for pid, disks in truth.items() for label, data in disks.items()}
        assert {f["path"] for f in out["files"]} == set(want)
        assert sorted(os.listdir(mnt)) == ["db", "web"]
        for path, data in want.items():
            assert Path(path).read_bytes() == data, path
        assert any(n.startswith("shared-") for n in os.listdir(vault / "locks"))
        p.send_signal(signal.SIGINT)
        _stopped(p, mnt)
    assert not any(n.startswith("shared-") for n in os.listdir(vault / "locks"))


def test_an_external_umount_ends_it(tmp_path: Path) -> None:
    _need_fuse()
    vault, truth = _plain_history(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with _serving(vault, "db.latest", mnt, mnt=mnt) as (p, _out):
        assert (mnt / "data.img").read_bytes() == next(iter(truth[min(
            i for i in truth if i.startswith("db."))].values()))
        assert subprocess.run(["umount", str(mnt)], check=False).returncode == 0
        _stopped(p, mnt)


def test_a_damaged_block_reads_as_eio(tmp_path: Path) -> None:
    """One blob's payload flipped in its pack (found with the independent pack reader):
    a read of its block fails with EIO and a warning naming it; other blocks and the
    holes read right."""
    _need_fuse()
    vault, truth = _plain_history(tmp_path)
    pid = next(i for i in truth if i.startswith("db."))
    data = truth[pid]["data"]
    digests = {blake3.blake3(data[i * BS:(i + 1) * BS]).digest(): i for i in range(4)}
    blob = next(b for pack in pack_files(vault) for b in walk_pack(pack)
                if b.digest in digests)
    pack = next(pk for pk in pack_files(vault) if blob in walk_pack(pk))
    raw = bytearray(pack.read_bytes())
    raw[blob.offset + 48 + blob.stored // 2] ^= 0xFF
    pack.chmod(0o644)
    pack.write_bytes(bytes(raw))
    bad = digests[blob.digest]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with _serving(vault, pid, mnt, mnt=mnt) as (p, _out):
        fd = os.open(mnt / "data.img", os.O_RDONLY)
        try:
            with pytest.raises(OSError) as exc:
                os.pread(fd, 4096, bad * BS)
            assert exc.value.errno == errno.EIO
            good = (bad + 1) % 4
            assert os.pread(fd, BS, good * BS) == data[good * BS:(good + 1) * BS]
            assert os.pread(fd, 128 * KIB, 512 * KIB) == bytes(128 * KIB)
        finally:
            os.close(fd)
        p.send_signal(signal.SIGTERM)
        err = _stopped(p, mnt)
    warned = [ln for ln in err.splitlines() if "warning" in ln]
    assert warned and all(f"block {bad} " in ln for ln in warned), err


@pytest.mark.parametrize("case", ["missing", "file", "not-empty"])
def test_a_bad_mount_point_is_one_line(tmp_path: Path, case: str) -> None:
    vault = cbt_api.Vault.init(tmp_path / "v")
    (tmp_path / "d.img").write_bytes(b"\1" * 8192)
    vault.backup("web", [str(tmp_path / "d.img")], workers=1)
    mnt = tmp_path / "mnt"
    if case == "file":
        mnt.write_bytes(b"")
    elif case == "not-empty":
        mnt.mkdir()
        (mnt / "x").write_bytes(b"")
    r = cbt("mount", tmp_path / "v", "web.latest", mnt)
    msg = one_error_line(r)
    assert str(mnt) in msg and {"missing": "does not exist", "file": "not a directory",
                                "not-empty": "not empty"}[case] in msg, msg
    assert not _in_mounts(mnt)


def test_an_unknown_point_is_one_line(tmp_path: Path) -> None:
    cbt_api.Vault.init(tmp_path / "v")
    (tmp_path / "mnt").mkdir()
    msg = one_error_line(cbt("mount", tmp_path / "v", "nope.latest", tmp_path / "mnt"))
    assert "nope" in msg
    assert not _in_mounts(tmp_path / "mnt")


def test_a_bad_cache_size_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    msg = one_error_line(cbt("mount", tmp_path, "x.latest", tmp_path / "mnt", "--cache",
                             "lots"))
    assert "--cache" in msg and "lots" in msg, msg


def test_gc_while_mounted_keeps_what_the_mount_reads(tmp_path: Path) -> None:
    """The mount holds the shared lock from its start: a gc run meanwhile may rewrite the
    packs it reads (into gc's trash), but no later gc empties that trash while it is
    mounted, so every block still reads back (without the lock, the second gc with
    --grace 0 would remove the old pack and the read would fail)."""
    _need_fuse()
    from cbt.ops.prune import PruneRequest, prune

    vault = cbt_api.Vault.init(tmp_path / "v")
    first = fast_random(MIB, 31)
    second = first[:2 * BS] + fast_random(MIB - 2 * BS, 32)  # 14 of 16 blocks new
    (tmp_path / "d.img").write_bytes(first)
    old = vault.backup("web", [f"os={tmp_path / 'd.img'}"], block_size=BS, workers=1,
                       created="2026-01-01T02:00:00Z").id
    (tmp_path / "d.img").write_bytes(second)
    new = vault.backup("web", [f"os={tmp_path / 'd.img'}"], block_size=BS, workers=1,
                       created="2026-01-02T02:00:00Z").id
    prune(vault, PruneRequest(keep=lambda pts: {p.id: [] if p.id == old else ["kept"]
                                                for p in pts},
                              expired=lambda _vm, _created: False))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with _serving(tmp_path / "v", new, mnt, mnt=mnt) as (p, _out):
        runs = []
        for _ in range(2):
            r = cbt("gc", tmp_path / "v", "--grace", "0", "--json")
            assert r.returncode == 0, r.stderr
            runs.append(json.loads(r.stdout))
        assert runs[0]["packs_rewritten"] + runs[0]["packs_removed"] >= 1, runs
        assert runs[1]["trash_emptied"] == 0, runs
        assert (mnt / "os.img").read_bytes() == second
        p.send_signal(signal.SIGTERM)
        _stopped(p, mnt)


def test_a_killed_mount_leaves_a_dead_mount_named_in_one_line(tmp_path: Path) -> None:
    """SIGKILL leaves the kernel's side of the mount with no server ('Transport endpoint
    is not connected'): a new cbt mount there is one line saying how to release it, and
    'fusermount3 -u' does; then it mounts again."""
    _need_fuse()
    vault, truth = _plain_history(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with _serving(vault, "db.latest", mnt, mnt=mnt) as (p, _out):
        kill_group(p)
        assert _in_mounts(mnt)
        with pytest.raises(OSError) as exc:
            os.listdir(mnt)
        assert exc.value.errno == errno.ENOTCONN
        msg = one_error_line(cbt("mount", vault, "db.latest", mnt))
        assert str(mnt) in msg and "fusermount3 -u" in msg, msg
        assert subprocess.run(["fusermount3", "-u", str(mnt)], check=False).returncode == 0
        assert not _in_mounts(mnt)
    data = next(d for pid, disks in truth.items() if pid.startswith("db.")
                for d in disks.values())
    with _serving(vault, "db.latest", mnt, mnt=mnt) as (p, _out):
        assert (mnt / "data.img").read_bytes() == data


def test_an_s3_vault_mounts_and_keeps_its_lease(s3_env: S3Server, tmp_path: Path) -> None:
    """An encrypted vault in S3 (SeaweedFS on 127.0.0.1): the image reads back as the
    disk was; the mount's shared lock (a lease of 5 s here) is renewed while it is
    mounted, so a forget long after the lease still finds it and fails, naming it, and
    removes nothing; stopped, the mount leaves no lock object."""
    _need_fuse()
    env = {**encrypted_env(tmp_path), **s3_env.env}
    url = f"s3://{fresh_bucket()}/m"
    data = bytearray(3 * MIB + 5 * KIB)
    data[:MIB] = fast_random(MIB, 41)
    data[-5 * KIB:] = fast_random(5 * KIB, 42)
    (tmp_path / "d.img").write_bytes(bytes(data))
    assert cbt("init", url, "--kdf-log-n", "10", env=env).returncode == 0
    r = cbt("backup", url, f"os={tmp_path / 'd.img'}", "--vm", "web", "--block-size", "16K",
            env=env)
    assert r.returncode == 0, r.stderr
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with _serving(url, "web.latest", mnt, mnt=mnt, env={**env, "CBT_LOCK_LEASE": "5"}
                  ) as (p, _out):
        assert (mnt / "os.img").read_bytes() == bytes(data)
        # (past two leases: only renewals keep the lock alive; a lease is measured from
        # the server's Last-Modified, in whole seconds, so one of 1 s is too short; renewals
        # come every third of a lease, and a loaded machine may delay one)
        time.sleep(11)
        msg = one_error_line(cbt("forget", url, "web.latest", env=env))
        assert "locked by pid" in msg, msg
        with open(mnt / "os.img", "rb") as f:
            f.seek(3 * MIB)
            assert f.read() == bytes(data[3 * MIB:])
        p.send_signal(signal.SIGTERM)
        _stopped(p, mnt)
    listed = cbt("list", url, "--json", env=env)
    assert listed.returncode == 0 and "web." in listed.stdout, listed.stderr
    vault = cbt_api.Vault.open(url, passphrase=PASSWORD)
    assert vault.storage.list_locks("locks") == []


def test_nothing_changes_mmap_reads_and_other_users_see_nothing(tmp_path: Path) -> None:
    """As root: every call that would change the mount fails (EROFS, or EACCES/EBUSY where
    the kernel answers first); a read-only mmap of the image is its bytes, a shared
    writable one is refused.  Another user cannot even look (no allow_other: the images
    hold every file of the guest, whatever its own permissions say)."""
    import mmap

    _need_fuse()
    vault, truth = _plain_history(tmp_path)
    pid = next(i for i in truth if i.startswith("db."))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with _serving(vault, pid, mnt, mnt=mnt) as (p, _out):
        f = mnt / "data.img"
        calls = {"chmod": lambda: os.chmod(f, 0o644), "chown": lambda: os.chown(f, 1, 1),
                 "unlink": lambda: os.unlink(f), "rename": lambda: os.rename(f, mnt / "x"),
                 "mkdir": lambda: os.mkdir(mnt / "d"), "rmdir": lambda: os.rmdir(mnt),
                 "create": lambda: os.close(os.open(mnt / "n", os.O_CREAT | os.O_WRONLY)),
                 "symlink": lambda: os.symlink("data.img", mnt / "l"),
                 "link": lambda: os.link(f, mnt / "l"), "truncate": lambda: os.truncate(f, 0),
                 "setxattr": lambda: os.setxattr(f, "user.x", b"1"),
                 "utime": lambda: os.utime(f, (1, 1))}
        for name, call in calls.items():
            with pytest.raises(OSError) as exc:
                call()
            assert exc.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.EBUSY), \
                (name, exc.value)
        assert sorted(os.listdir(mnt)) == ["data.img"]
        fd = os.open(f, os.O_RDONLY)
        try:
            with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as mm:
                assert mm[:] == truth[pid]["data"]
            with pytest.raises(OSError):
                mmap.mmap(fd, 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)

        def nobody() -> None:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
        r = subprocess.run(["cat", str(f)], preexec_fn=nobody, capture_output=True,
                           check=False)
        assert r.returncode != 0 and r.stdout == b"" and b"denied" in r.stderr, r
        p.send_signal(signal.SIGTERM)
        _stopped(p, mnt)


def test_a_vault_held_alone_fails_at_once_or_is_waited_for(tmp_path: Path) -> None:
    """While a prune (here: the lock it takes) has the vault alone, cbt mount fails at
    once in one line naming the holder and --wait; with --wait it mounts once the
    vault is free."""
    from cbt.repo.lock import exclusive_lock

    _need_fuse()
    vault, truth = _plain_history(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    held = cbt_api.Vault.open(vault)
    with exclusive_lock(held.storage):
        msg = one_error_line(cbt("mount", vault, "db.latest", mnt))
        assert "locked by" in msg and "--wait" in msg, msg
        assert not _in_mounts(mnt)
    data = next(d for pid, disks in truth.items() if pid.startswith("db.")
                for d in disks.values())
    with exclusive_lock(held.storage):
        p = start_cbt("mount", vault, "db.latest", mnt, "--wait", "60", "--json")
        try:
            assert p.stdout is not None
            ready, _, _ = select.select([p.stdout], [], [], 1)
            assert not ready and p.poll() is None  # (waiting for the lock, released below)
        except BaseException:
            kill_group(p)
            raise
    try:
        ready, _, _ = select.select([p.stdout], [], [], 60)
        assert ready and json.loads(p.stdout.readline())["mountpoint"] == str(mnt)
        assert (mnt / "data.img").read_bytes() == data
        p.send_signal(signal.SIGTERM)
        _stopped(p, mnt)
    finally:
        if p.poll() is None:
            kill_group(p)
        if _in_mounts(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
