"""Issue 14 part O on the command line: an offline qcow2 image named on ``cbt backup``'s
command line (or in a config job without ``qmp``) is read through ``qemu-nbd`` as the
guest sees it and tracked by the persistent bitmap ``cbt-<point id>``.

Real ``qemu-img``, ``qemu-io`` and ``qemu-nbd``; the truth is ``qemu-img convert -O
raw`` of the image (the guest's view), compared with a raw restore of each point.
Plain and encrypted vaults.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
from pathlib import Path
from typing import Any

import pytest
from helpers import MIB
from helpers.cli import cbt, cbt_json, crash_env, one_error_line, run_in_session
from helpers.jobs import backup_config, job_config
from helpers.qemu import (
    cbt_bitmap,
    create,
    guest_writes,
    held_open,
    image_bitmaps,
    kill_while_writing,
    nbd_servers_of,
    need_qemu,
    raw_bytes,
    run,
)
from helpers.system import loop_device
from helpers.vaults import init_cli_vault

SIZE = 16 * MIB


@pytest.fixture(autouse=True)
def _qemu() -> None:
    need_qemu("qemu-img", "qemu-io", "qemu-nbd")


def _setup(tmp_path: Path, encrypted: bool = False,
           name: str = "os.qcow2") -> tuple[Path, Path, dict[str, str] | None]:
    vault = tmp_path / "vault"
    env = init_cli_vault(vault, encrypted, tmp_path)
    image = create(tmp_path / name, SIZE)
    guest_writes(image, 1, 12, SIZE)
    return vault, image, env


def _backup(vault: Path, image: Path, env: dict[str, str] | None = None,
            *extra: object) -> dict[str, Any]:
    line = cbt_json("backup", vault, f"os={image}", "--vm", "web", *extra, env=env)
    assert line["type"] == "point", line
    return line


def _restored(vault: Path, point: str, tmp_path: Path,
              env: dict[str, str] | None = None) -> bytes:
    out = tmp_path / f"{point}.raw"
    cbt_json("restore", vault, point, "--disk", "os", "--to", out, env=env)
    data = out.read_bytes()
    out.unlink()
    return data


def _source(line: dict[str, Any]) -> tuple[str, str | None]:
    d = line["disks"][0]
    return d["change_source"], d["change_source_reason"]


@pytest.mark.slow
@pytest.mark.parametrize("encrypted", [False, True])
def test_full_then_incremental_read_the_guest_view(tmp_path: Path, encrypted: bool) -> None:
    vault, image, env = _setup(tmp_path, encrypted)
    first = _backup(vault, image, env)
    p1 = first["recovery_point"]
    assert _source(first) == ("hash", None)
    assert first["disks"][0]["size"] == SIZE  # the virtual disk, not the container file
    assert first["disks"][0]["path"] == str(image)
    assert (first["consistency"], first["consistency_reason"]) == ("crash",
                                                                   "offline qcow2 image")
    assert _restored(vault, p1, tmp_path, env) == raw_bytes(image, "qcow2", tmp_path)
    assert image_bitmaps(image) == {cbt_bitmap(vault, p1): ["auto"]}

    guest_writes(image, 2, 5, SIZE)
    second = _backup(vault, image, env)
    p2 = second["recovery_point"]
    assert _source(second) == ("qemu-bitmap", None)
    # only what the bitmap marked (64 KiB granularity) and the sample were read
    assert second["disks"][0]["bytes_read"] < SIZE // 4
    assert _restored(vault, p2, tmp_path, env) == raw_bytes(image, "qcow2", tmp_path)
    assert image_bitmaps(image) == {cbt_bitmap(vault, p2): ["auto"]}  # left for the next run
    assert nbd_servers_of(image) == []
    assert not list(tmp_path.glob("**/*.sock"))


@pytest.mark.slow
def test_a_qcow2_is_known_by_its_name_and_its_magic_together(tmp_path: Path) -> None:
    """Named .qcow2 and starting with the magic: the guest's view.  Either alone: a raw
    image, read as it lies (a qcow2 named .img with a warning saying how to name it)."""
    vault, image, _ = _setup(tmp_path)
    unnamed = create(tmp_path / "disk.img", SIZE)  # a qcow2 named .img
    fake = tmp_path / "raw.qcow2"  # a raw file named .qcow2
    fake.write_bytes(b"x" * 65536)
    line = cbt_json("backup", vault, f"os={image}", f"fake={fake}", f"other={unnamed}",
                    "--vm", "web")
    sizes = {d["label"]: d["size"] for d in line["disks"]}
    assert sizes == {"os": SIZE, "fake": 65536, "other": unnamed.stat().st_size}
    assert line["consistency_reason"] == "live read"  # (a raw disk read live beside it)
    assert _restored(vault, line["recovery_point"], tmp_path) == raw_bytes(image, "qcow2",
                                                                           tmp_path)
    assert list(image_bitmaps(image)) == [cbt_bitmap(vault, line['recovery_point'])]
    assert image_bitmaps(unnamed) == {}  # (never touched)
    assert [w for w in line["warnings"] if "qcow2 header" in w] == [
        f"disk other: {unnamed} starts with a qcow2 header but is not named .qcow2: backed "
        "up as a raw image (its container file, not the guest's view); name a qcow2 image "
        ".qcow2 to back up what its guest sees"]


@pytest.mark.slow
def test_a_guest_writing_a_qcow2_header_into_its_raw_disk_cannot_make_cbt_follow_it(
        tmp_path: Path) -> None:
    """A raw VM image (root's, as VM images are) whose guest wrote a qcow2 header naming a
    host file as its backing file: backed up raw, byte for byte; the host file is never
    read into the vault, no bitmap is written into the guest's data."""
    vault = tmp_path / "vault"
    init_cli_vault(vault, False, tmp_path)
    secret = tmp_path / "secret"
    secret.write_bytes(b"host secret " * 5000)
    secret.chmod(0o600)
    crafted = create(tmp_path / "crafted.qcow2", SIZE)
    run("qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "raw", "-b", str(secret),
        str(crafted))
    disk = tmp_path / "vm.img"  # the raw disk: the guest's header first, then its data
    disk.write_bytes(crafted.read_bytes().ljust(SIZE, b"\0"))
    before = disk.read_bytes()
    line = cbt_json("backup", vault, f"os={disk}", "--vm", "web")
    assert line["disks"][0]["size"] == SIZE
    assert disk.read_bytes() == before  # no bitmap added to the guest's data
    out = tmp_path / "restored.img"
    cbt("restore", vault, line["recovery_point"], "--disk", "os", "--to", out)
    assert out.read_bytes() == before
    assert b"host secret" not in b"".join(p.read_bytes() for p in vault.rglob("*")
                                           if p.is_file())


@pytest.mark.slow
def test_a_backing_file_is_part_of_the_guest_view(tmp_path: Path) -> None:
    vault = tmp_path / "vault"
    init_cli_vault(vault, False, tmp_path)
    base = create(tmp_path / "base.qcow2", SIZE)
    guest_writes(base, 7, 6, SIZE)
    image = tmp_path / "os.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(image))
    guest_writes(image, 8, 4, SIZE)
    p1 = _backup(vault, image)["recovery_point"]
    assert _restored(vault, p1, tmp_path) == raw_bytes(image, "qcow2", tmp_path)
    guest_writes(image, 9, 3, SIZE)
    second = _backup(vault, image)
    assert _source(second) == ("qemu-bitmap", None)
    assert _restored(vault, second["recovery_point"], tmp_path) == raw_bytes(image, "qcow2",
                                                                             tmp_path)
    # a backing file whose format the image does not name is refused (QEMU would probe it)
    # (qemu-img makes none any more: the header's backing format extension is renamed to
    # an unknown one, which QEMU ignores)
    head = image.read_bytes()[:65536]
    at = head.find(bytes.fromhex("e2792aca"))
    assert at > 0
    with open(image, "r+b") as f:
        f.seek(at)
        f.write(bytes.fromhex("0badcafe"))
    r = cbt("backup", vault, f"os={image}", "--vm", "web")
    assert r.returncode != 0
    assert "has no format in the image" in one_error_line(r)


def _removed(image: Path, bitmap: str) -> str:
    run("qemu-img", "bitmap", "--remove", "-f", "qcow2", str(image), bitmap)
    guest_writes(image, 3, 4, SIZE)
    return f"bitmap {bitmap} missing in {image}"


def _resized(image: Path, bitmap: str) -> str:
    guest_writes(image, 3, 4, SIZE)
    run("qemu-img", "resize", "-q", "-f", "qcow2", str(image), str(SIZE + MIB))
    return "disk resized"


def _inconsistent(image: Path, bitmap: str) -> str:
    kill_while_writing(image, [(5 * MIB, 65536, 9), (SIZE - 4096, 4096, 10)])
    assert image_bitmaps(image) == {bitmap: ["auto", "in-use"]}
    return f"bitmap {bitmap} in {image} is inconsistent (QEMU stopped uncleanly)"


@pytest.mark.slow
@pytest.mark.parametrize("damage", [_removed, _resized, _inconsistent],
                         ids=["removed", "resized", "inconsistent"])
def test_an_unusable_bitmap_hashes_with_the_reason(tmp_path: Path, damage: Any) -> None:
    vault, image, _ = _setup(tmp_path)
    p1 = _backup(vault, image)["recovery_point"]
    reason = damage(image, cbt_bitmap(vault, p1))
    second = _backup(vault, image)
    p2 = second["recovery_point"]
    assert _source(second) == ("hash", reason)
    assert _restored(vault, p2, tmp_path) == raw_bytes(image, "qcow2", tmp_path)
    assert image_bitmaps(image) == {cbt_bitmap(vault, p2): ["auto"]}  # the broken one is gone
    guest_writes(image, 4, 3, SIZE)
    third = _backup(vault, image)
    assert _source(third) == ("qemu-bitmap", None)  # tracked again from there
    assert _restored(vault, third["recovery_point"], tmp_path) == raw_bytes(image, "qcow2",
                                                                            tmp_path)


@pytest.mark.slow
def test_a_killed_backup_leaves_its_bitmap_and_the_next_misses_nothing(tmp_path: Path) -> None:
    vault, image, _ = _setup(tmp_path)
    p1 = _backup(vault, image)["recovery_point"]
    guest_writes(image, 5, 4, SIZE)
    r = run_in_session("backup", vault, f"os={image}", "--vm", "web",
                       env=crash_env(1, tmp_path))
    assert r.returncode == -signal.SIGKILL
    left = image_bitmaps(image)
    assert cbt_bitmap(vault, p1) in left and len(left) == 2  # the killed run's bitmap stayed
    assert nbd_servers_of(image) == []  # (it died with the run)
    left_dirs = list(Path(tempfile.gettempdir()).glob("cbt-q-*"))
    assert left_dirs  # its socket folder (removed by the next run)
    guest_writes(image, 6, 4, SIZE)
    second = _backup(vault, image)
    assert _source(second) == ("qemu-bitmap", None)
    assert _restored(vault, second["recovery_point"], tmp_path) == raw_bytes(image, "qcow2",
                                                                             tmp_path)
    assert image_bitmaps(image) == {cbt_bitmap(vault, second['recovery_point']): ["auto"]}
    assert not any(d.exists() for d in left_dirs)


@pytest.mark.slow
def test_an_image_in_use_fails_in_one_line(tmp_path: Path) -> None:
    vault, image, _ = _setup(tmp_path)
    p1 = _backup(vault, image)["recovery_point"]
    with held_open(image):
        r = cbt("backup", vault, f"os={image}", "--vm", "web")
    assert r.returncode != 0
    line = one_error_line(r)
    assert f"{image}: in use by a running QEMU" in line and "lock" in line
    assert "json:" not in line and "/dev/fd/" not in line  # (cbt's names for QEMU)
    assert image_bitmaps(image) == {cbt_bitmap(vault, p1): ["auto"]}  # untouched
    listed = cbt_json("list", vault)
    assert [p["recovery_point"] for p in listed["points"]] == [p1]


def test_missing_qemu_tools_say_which_and_the_package(tmp_path: Path) -> None:
    vault, image, _ = _setup(tmp_path)
    empty = tmp_path / "bin"
    empty.mkdir()
    r = cbt("backup", vault, f"os={image}", "--vm", "web", env={"PATH": str(empty)})
    assert r.returncode != 0
    assert one_error_line(r) == ("cbt: error: qemu-img not found: reading a qcow2 image needs "
                                 "QEMU's tools (Debian package qemu-utils)")


def _job_point(cfg: Path, env: dict[str, str] | None) -> dict[str, Any]:
    r, lines = backup_config(cfg, env=env, timeout=300)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert len(lines) == 1 and lines[0]["type"] == "point", lines
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("encrypted", [False, True])
def test_a_config_job_reads_a_qcow2_through_its_bitmap(tmp_path: Path, encrypted: bool) -> None:
    vault, image, env = _setup(tmp_path, encrypted)
    cfg = job_config(tmp_path / "cbt.toml", {"web": {"disks": {"os": str(image)}}},
                     vault=str(vault))
    first = _job_point(cfg, env)
    assert first["disks"][0]["snapshot"] == "qemu-nbd"
    assert _source(first) == ("hash", None)
    assert first["consistency_reason"] == "no hooks; offline qcow2 image"
    assert not list(tmp_path.rglob(".cbt-snapshots/**/*.img"))  # never cloned
    guest_writes(image, 2, 5, SIZE)
    second = _job_point(cfg, env)
    assert _source(second) == ("qemu-bitmap", None)
    assert _restored(vault, second["recovery_point"], tmp_path, env) == raw_bytes(
        image, "qcow2", tmp_path)
    assert image_bitmaps(image) == {cbt_bitmap(vault, second['recovery_point']): ["auto"]}
    assert nbd_servers_of(image) == []


def test_a_raw_disk_is_read_as_today(tmp_path: Path) -> None:
    vault = tmp_path / "vault"
    init_cli_vault(vault, False, tmp_path)
    disk = tmp_path / "d.img"
    disk.write_bytes(os.urandom(65536))
    line = cbt_json("backup", vault, f"d={disk}", "--vm", "web")
    assert line["consistency_reason"] == "live read"
    assert line["disks"][0]["size"] == 65536


@pytest.mark.slow
def test_a_relative_name_is_never_a_qemu_protocol(tmp_path: Path) -> None:
    vault = tmp_path / "vault"
    init_cli_vault(vault, False, tmp_path)
    image = create(tmp_path / "nbd:os.qcow2", SIZE)  # relative, QEMU would read "nbd:"
    guest_writes(image, 1, 4, SIZE)
    r = cbt("backup", vault, "os=nbd:os.qcow2", "--vm", "web", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    point = json.loads(r.stdout.splitlines()[-1])["recovery_point"]
    assert _restored(vault, point, tmp_path) == raw_bytes(image, "qcow2", tmp_path)
    out = tmp_path / "nbd:r.qcow2"
    r = cbt("restore", vault, point, "--disk", "os", "--to", "nbd:r.qcow2", "--format",
            "qcow2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert raw_bytes(out, "qcow2", tmp_path) == raw_bytes(image, "qcow2", tmp_path)


@pytest.mark.slow
def test_the_post_hook_runs_after_the_image_is_read(tmp_path: Path) -> None:
    vault, image, _ = _setup(tmp_path)
    before = raw_bytes(image, "qcow2", tmp_path)
    # the post hook "starts the VM", which writes: it must find the image free, and the
    # point must be the image as it was before
    post = ["qemu-io", "-f", "qcow2", "-c", "write -P 85 0 4096", str(image)]
    cfg = job_config(tmp_path / "cbt.toml", {"web": {
        "disks": {"os": str(image)}, "hooks": {"pre": ["true"], "post": post}}},
        vault=str(vault))
    line = _job_point(cfg, None)
    assert line["warnings"] == []  # the post hook succeeded
    assert (line["consistency"], line["consistency_reason"]) == (
        "application", "pre hook succeeded; disks read while quiesced")
    assert _restored(vault, line["recovery_point"], tmp_path) == before
    assert raw_bytes(image, "qcow2", tmp_path)[:4096] == b"\x55" * 4096
    # the hook's write was recorded by the new bitmap: the next job reads it
    second = _job_point(cfg, None)
    assert _source(second) == ("qemu-bitmap", None)
    assert _restored(vault, second["recovery_point"], tmp_path) == raw_bytes(image, "qcow2",
                                                                             tmp_path)


def test_a_raw_device_starting_like_a_qcow2_is_read_raw(tmp_path: Path) -> None:
    """A guest wrote a qcow2 header (naming a backing file of the host) at the start of
    its raw disk, a block device: cbt reads the device raw, as it is, and writes nothing
    into it (no bitmap in the guest's data, no backing file followed)."""
    vault = tmp_path / "vault"
    init_cli_vault(vault, False, tmp_path)
    secret = tmp_path / "host-secret"
    secret.write_bytes(b"host only\n")
    inner = tmp_path / "inner.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(inner),
        str(SIZE))
    backing = tmp_path / "dev.img"
    data = inner.read_bytes().ljust(4 * MIB, b"\0")
    backing.write_bytes(data)
    with loop_device(backing) as dev:
        line = cbt_json("backup", vault, f"os={dev}", "--vm", "web")
        assert line["disks"][0]["size"] == 4 * MIB
        assert _restored(vault, line["recovery_point"], tmp_path) == data
    assert backing.read_bytes() == data


@pytest.mark.slow
def test_two_vaults_backing_up_one_image_keep_their_own_bitmaps(tmp_path: Path) -> None:
    """The same image into a local and a second vault under one VM name: each vault's
    bitmaps are named by its own scope, so neither run removes or merges the other's."""
    vault, image, _ = _setup(tmp_path)
    other = tmp_path / "other"
    init_cli_vault(other, False, tmp_path)
    a1 = _backup(vault, image)["recovery_point"]
    b1 = _backup(other, image)["recovery_point"]
    assert set(image_bitmaps(image)) == {cbt_bitmap(vault, a1), cbt_bitmap(other, b1)}
    guest_writes(image, 5, 6, SIZE)
    for v in (vault, other):
        line = _backup(v, image)
        assert _source(line) == ("qemu-bitmap", None)
        assert _restored(v, line["recovery_point"], tmp_path) == raw_bytes(image, "qcow2",
                                                                           tmp_path)
    assert len(image_bitmaps(image)) == 2
