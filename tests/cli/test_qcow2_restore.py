"""Issue 14 part O: ``cbt restore --format qcow2``: a sparse qcow2 of the disk that QEMU
boots again.  ``qemu-img compare`` against the source image says identical; ``qemu-img
map`` shows no data where the point has none; every failure (full disk, a killed
restore, a bad point, refused options, no qemu-img) leaves nothing half-written.
Real ``qemu-img``; plain and encrypted vaults.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import MIB
from helpers.cli import cbt, cbt_json, kill_group, one_error_line, start_cbt
from helpers.qemu import allocated, create, guest_writes, need_qemu, raw_bytes, run
from helpers.system import fill, loop_device, small_fs
from helpers.vaults import init_cli_vault

from cbt.core.errors import CbtError

SIZE = 16 * MIB


@pytest.fixture(autouse=True)
def _qemu() -> None:
    need_qemu("qemu-img", "qemu-io", "qemu-nbd")


def _point(tmp_path: Path, encrypted: bool = False
           ) -> tuple[Path, Path, str, dict[str, str] | None]:
    vault = tmp_path / "vault"
    env = init_cli_vault(vault, encrypted, tmp_path)
    image = create(tmp_path / "os.qcow2", SIZE)
    guest_writes(image, 11, 10, SIZE)
    guest_writes(image, 12, 2, SIZE)  # (some rewritten)
    run("qemu-io", "-f", "qcow2", "-c", f"write -z {2 * MIB} {MIB}", str(image))  # zeros
    line = cbt_json("backup", vault, f"os={image}", "--vm", "web", env=env)
    return vault, image, line["recovery_point"], env


def _restore(vault: Path, point: str, to: Path, *extra: object,
             env: dict[str, str] | None = None) -> dict[str, Any]:
    return cbt_json("restore", vault, point, "--to", to, "--format", "qcow2", *extra, env=env)


def _hanging_convert(tmp_path: Path, convert_first: bool) -> dict[str, str]:
    """The environment of a cbt whose qemu-img, in ``convert``, touches ``tmp_path/hung`` and
    hangs (with ``convert_first``, after converting: the target is written)."""
    real = run("sh", "-c", "command -v qemu-img").strip()
    convert = f'"{real}" "$@"; ' if convert_first else ""
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "qemu-img").write_text(
        f'#!/bin/sh\nif [ "$1" = convert ]; then {convert}touch "{tmp_path}/hung"; '
        f'exec sleep 600; fi\nexec "{real}" "$@"\n')
    (shim / "qemu-img").chmod(0o755)
    return {"PATH": f"{shim}:{os.environ['PATH']}"}


def _within(inner: list[tuple[int, int]], outer: list[tuple[int, int]]) -> bool:
    return all(any(a <= lo and hi <= b for a, b in outer) for lo, hi in inner)


@pytest.mark.slow
@pytest.mark.parametrize("encrypted", [False, True])
def test_restore_qcow2_round_trip(tmp_path: Path, encrypted: bool) -> None:
    vault, image, point, env = _point(tmp_path, encrypted)
    out = tmp_path / "out"
    res = _restore(vault, point, out, env=env)
    target = out / "os.qcow2"
    assert res["disks"][0]["to"] == str(target) and res["disks"][0]["size"] == SIZE
    assert sorted(p.name for p in out.iterdir()) == ["os.qcow2"]  # nothing beside it
    assert target.read_bytes()[:4] == b"QFI\xfb"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(target),
               str(image)).startswith("Images are identical")
    assert raw_bytes(target, "qcow2", tmp_path) == raw_bytes(image, "qcow2", tmp_path)
    # holes stay holes: data only where the source has data (its zeroed MiB is none)
    data = allocated(target, "qcow2")
    assert data and _within(data, allocated(image, "qcow2"))
    assert not any(lo < 3 * MIB and hi > 2 * MIB for lo, hi in data)
    # one disk to a file, with --disk
    one = tmp_path / "one.qcow2"
    _restore(vault, point, one, "--disk", "os", "--mode", "640", env=env)
    assert stat.S_IMODE(one.stat().st_mode) == 0o640
    assert raw_bytes(one, "qcow2", tmp_path) == raw_bytes(image, "qcow2", tmp_path)


@pytest.mark.parametrize("flag", ["--in-place", "--instant", "--assume-zeroed"])
def test_restore_qcow2_refuses_what_makes_no_sense(tmp_path: Path, flag: str) -> None:
    vault, _image, point, _ = _point(tmp_path)
    out = tmp_path / "out.qcow2"
    r = cbt("restore", vault, point, "--to", out, "--disk", "os", "--format", "qcow2", flag)
    assert r.returncode == 2
    assert one_error_line(r) == (f"cbt: error: --format qcow2 makes a new image file: not "
                                 f"with {flag}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["os.qcow2", "vault"]


def test_restore_qcow2_refuses_a_block_device(tmp_path: Path) -> None:
    vault, _image, point, _ = _point(tmp_path)
    backing = tmp_path / "dev.img"
    backing.write_bytes(b"\1" * SIZE)
    with loop_device(backing) as dev:
        r = cbt("restore", vault, point, "--to", dev, "--disk", "os", "--format", "qcow2",
                "--force")
    assert r.returncode == 2
    assert one_error_line(r) == (f"cbt: error: --format qcow2 makes an image file: {dev} is "
                                 "a block device (restore it raw)")
    assert backing.read_bytes() == b"\1" * SIZE


def test_restore_qcow2_of_a_bad_point_leaves_nothing(tmp_path: Path) -> None:
    vault, _image, point, _ = _point(tmp_path)
    out = tmp_path / "out"
    r = cbt("restore", vault, point + "x", "--to", out, "--format", "qcow2")
    assert r.returncode != 0
    assert not out.exists() or not list(out.iterdir())
    # a block gone from its pack: found while writing the raw file, nothing left
    packs = sorted((vault / "packs").rglob("*.pack"))
    assert packs
    for p in packs:
        blob = bytearray(p.read_bytes())
        blob[len(blob) // 3] ^= 0xFF
        p.write_bytes(bytes(blob))
    r = cbt("restore", vault, point, "--to", out, "--format", "qcow2")
    assert r.returncode != 0
    assert not out.exists() or not list(out.iterdir())


def test_restore_qcow2_without_qemu_img_says_so(tmp_path: Path) -> None:
    vault, _image, point, _ = _point(tmp_path)
    empty = tmp_path / "bin"
    empty.mkdir()
    out = tmp_path / "out"
    r = cbt("restore", vault, point, "--to", out, "--format", "qcow2", env={"PATH": str(empty)})
    assert r.returncode != 0
    assert one_error_line(r) == ("cbt: error: qemu-img not found: reading a qcow2 image needs "
                                 "QEMU's tools (Debian package qemu-utils)")
    assert not out.exists()


@pytest.mark.slow
def test_restore_qcow2_on_a_full_disk_leaves_nothing(tmp_path: Path) -> None:
    vault, image, point, _ = _point(tmp_path)
    raw = tmp_path / "raw.img"
    cbt_json("restore", vault, point, "--disk", "os", "--to", raw)
    need_bytes = raw.stat().st_blocks * 512
    with small_fs("tmpfs", 64, tmp_path) as mnt:
        # room for the raw file, not for the qcow2 beside it
        fill(mnt / "ballast", need_bytes + need_bytes // 2)
        out = mnt / "out"
        r = cbt("restore", vault, point, "--to", out, "--format", "qcow2")
        assert r.returncode != 0
        assert "No space left on device" in one_error_line(r)
        assert sorted(p.name for p in mnt.iterdir()) == ["ballast", "out"]
        assert list(out.iterdir()) == []
        (mnt / "ballast").unlink()
        _restore(vault, point, out)  # room again: it works
        assert raw_bytes(out / "os.qcow2", "qcow2", tmp_path) == raw_bytes(image, "qcow2",
                                                                           tmp_path)


@pytest.mark.slow
def test_a_killed_qcow2_restore_is_cleaned_by_the_next(tmp_path: Path) -> None:
    vault, image, point, _ = _point(tmp_path)
    # qemu-img that hangs in convert (after it began writing): the restore is killed there
    out = tmp_path / "out"
    p = start_cbt("restore", vault, point, "--to", out, "--format", "qcow2",
                  env=_hanging_convert(tmp_path, convert_first=True))
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "hung").exists() and p.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert (tmp_path / "hung").exists(), p.communicate()
    finally:
        kill_group(p)
        for f in (p.stdout, p.stderr):
            if f is not None:
                f.close()
    left = sorted(f.name for f in out.iterdir())
    assert left == [f".os.qcow2.q.tmp-{p.pid}", f".os.qcow2.tmp-{p.pid}"]  # no os.qcow2
    res = _restore(vault, point, out)
    assert len(res["warnings"]) == 2 and all("left by a restore" in w for w in res["warnings"])
    assert sorted(f.name for f in out.iterdir()) == ["os.qcow2"]
    assert raw_bytes(out / "os.qcow2", "qcow2", tmp_path) == raw_bytes(image, "qcow2", tmp_path)


def test_restore_qcow2_never_writes_through_a_planted_link(tmp_path: Path) -> None:
    """In a shared directory someone links the conversion's temporary name to another
    file: qemu-img must not write the qcow2 through it (cbt creates the file itself,
    O_EXCL, and hands qemu-img the open file)."""
    from cbt.api import Vault
    from cbt.ops.restore import qcow2_temp

    vault, _image, point, _ = _point(tmp_path)
    shared = tmp_path / "shared"
    shared.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    final = shared / "os.qcow2"
    planted = qcow2_temp(final)  # (this process restores: its pid names the temp file)
    planted.symlink_to(victim)
    with pytest.raises(CbtError, match=r"cannot convert .*os\.qcow2 to qcow2: .*exists"):
        Vault.open(vault).restore(point, final, disk="os", format="qcow2")
    assert victim.read_bytes() == b"precious\n"
    assert sorted(p.name for p in shared.iterdir()) == [planted.name]  # (raw temp gone)
    planted.unlink()
    Vault.open(vault).restore(point, final, disk="os", format="qcow2")
    assert final.read_bytes()[:4] == b"QFI\xfb"
    assert sorted(p.name for p in shared.iterdir()) == ["os.qcow2"]


@pytest.mark.slow
def test_a_raw_point_restored_as_qcow2_backs_up_the_same(tmp_path: Path) -> None:
    """A point of a raw image, restored as qcow2 and backed up again: the same disk,
    block for block (nothing new stored), and the same bytes restored raw."""
    vault = tmp_path / "vault"
    init_cli_vault(vault, False, tmp_path)
    raw = create(tmp_path / "os.img", SIZE, fmt="raw")
    guest_writes(raw, 21, 10, SIZE, fmt="raw")
    p1 = cbt_json("backup", vault, f"os={raw}", "--vm", "web")["recovery_point"]
    q = tmp_path / "os.qcow2"
    _restore(vault, p1, q, "--disk", "os")
    again = cbt_json("backup", vault, f"os={q}", "--vm", "web")
    d = again["disks"][0]
    assert (d["size"], d["changed_blocks"], d["bytes_new"]) == (SIZE, 0, 0)
    assert d["change_source"] == "hash"  # (the image has no bitmap of p1: said why)
    out = tmp_path / "back.img"
    cbt_json("restore", vault, again["recovery_point"], "--disk", "os", "--to", out)
    assert out.read_bytes() == raw.read_bytes()


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


@pytest.mark.slow
def test_qemu_img_dies_with_a_killed_restore(tmp_path: Path) -> None:
    """cbt SIGKILLed (alone, not its process group) while qemu-img converts: qemu-img
    must not keep running (PR_SET_PDEATHSIG)."""
    vault, _image, point, _ = _point(tmp_path)
    p = start_cbt("restore", vault, point, "--to", tmp_path / "out", "--format", "qcow2",
                  env=_hanging_convert(tmp_path, convert_first=False))
    kids: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "hung").exists() and p.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        kids = _children(p.pid)
        assert kids, p.communicate()
        os.kill(p.pid, signal.SIGKILL)
        p.wait(30)
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{k}").exists() for k in kids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(Path(f"/proc/{k}").exists() for k in kids)
    finally:
        kill_group(p)
        for k in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(k, signal.SIGKILL)
        for f in (p.stdout, p.stderr):
            if f is not None:
                f.close()


def test_restore_qcow2_refuses_a_pipe_or_stdout(tmp_path: Path) -> None:
    """A qcow2 cannot be streamed: a FIFO (or /dev/stdout, a terminal) as --to is refused,
    even with --force (which would make the file beside it and rename it over it)."""
    vault, _image, point, _ = _point(tmp_path)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    r = cbt("restore", vault, point, "--to", fifo, "--disk", "os", "--format", "qcow2",
            "--force")
    assert r.returncode == 2
    assert one_error_line(r) == (f"cbt: error: --format qcow2 makes an image file: {fifo} is "
                                 "not a regular file (a qcow2 image cannot be streamed)")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
