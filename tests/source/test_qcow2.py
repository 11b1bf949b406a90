"""cbt.source.qcow2: offline qcow2 images through ``qemu-nbd``, tracked by persistent
bitmaps added with ``qemu-img bitmap``.  Real ``qemu-img``, ``qemu-io`` and ``qemu-nbd``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from helpers import MIB
from helpers.qemu import (
    create,
    held_open,
    image_bitmaps,
    nbd_servers_of,
    need_qemu,
    raw_bytes,
    run,
    write,
)
from helpers.system import fill, need, tmpfs

from cbt.source.changes import ChangeHint
from cbt.source.qcow2 import OfflineSet, Qcow2Error, inspect, is_qcow2, open_offline

SIZE = 8 * MIB
BS = 16384


@pytest.fixture(autouse=True)
def _qemu() -> None:
    need_qemu("qemu-img", "qemu-io", "qemu-nbd")


def test_is_qcow2_reads_the_magic_of_a_file_named_qcow2(tmp_path: Path) -> None:
    q = create(tmp_path / "disk.QCOW2", SIZE)
    unnamed = create(tmp_path / "disk.img", SIZE)
    raw = tmp_path / "disk.qcow2"
    raw.write_bytes(b"QFI" + b"\0" * 100)
    short = tmp_path / "short.qcow2"
    short.write_bytes(b"QF")
    assert is_qcow2(str(q))
    assert not is_qcow2(str(unnamed))
    assert not is_qcow2(str(raw)) and not is_qcow2(str(short))
    assert not is_qcow2(str(tmp_path)) and not is_qcow2(str(tmp_path / "none"))


def test_inspect_checks_what_the_header_says(tmp_path: Path) -> None:
    q = create(tmp_path / "a.qcow2", SIZE)
    run("qemu-img", "bitmap", "--add", "-f", "qcow2", str(q), "cbt-x")
    run("qemu-img", "bitmap", "--add", "--disable", "-g", "131072", "-f", "qcow2", str(q), "y")
    info = inspect(str(q))
    assert info.size == SIZE
    assert [(b.name, b.enabled, b.in_use, b.granularity) for b in info.bitmaps] == [
        ("cbt-x", True, False, 65536), ("y", False, False, 131072)]
    ext = tmp_path / "ext.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'ext.data'}",
        str(ext), str(SIZE))
    with pytest.raises(Qcow2Error, match="external data file is not supported"):
        inspect(str(ext))
    bad = tmp_path / "bad.qcow2"
    head = bytearray(q.read_bytes()[:65536])
    head[24:32] = (2**63 + 5).to_bytes(8, "big")  # the virtual size
    bad.write_bytes(bytes(head))
    with pytest.raises(Qcow2Error) as exc:
        inspect(str(bad))
    assert str(exc.value).startswith(f"{bad}: qemu-img info failed: ")
    assert "\n" not in str(exc.value)


def test_leftover_bitmaps_are_merged_into_the_previous_one(tmp_path: Path) -> None:
    q = create(tmp_path / "a.qcow2", SIZE)
    for name in ("cbt-web.p1", "cbt-web.20261130T000000Z-2", "cbt-web.mine", "cbt-db.1"):
        run("qemu-img", "bitmap", "--add", "-f", "qcow2", str(q), name)
    # a write only the killed run's bitmap saw (the previous one disabled meanwhile)
    run("qemu-img", "bitmap", "--disable", "-f", "qcow2", str(q), "cbt-web.p1")
    write(str(q), "qcow2", [(3 * MIB, 4096, 7)])
    run("qemu-img", "bitmap", "--enable", "-f", "qcow2", str(q), "cbt-web.p1")
    run("qemu-img", "bitmap", "--add", "-f", "qcow2", str(q), "other")  # not cbt's: kept
    with open_offline({"os": str(q)}, "web.p2", "web.p1") as off:
        hint = off.hint("os", BS)
        assert hint == ChangeHint("qemu-bitmap", ((3 * MIB // BS, 3 * MIB // BS + 4),))
        # (another VM's bitmap on the same image is left alone)
        assert set(image_bitmaps(q)) == {"cbt-web.p1", "cbt-web.p2", "cbt-db.1", "other",
                                         "cbt-web.mine"}  # (not named as cbt names them)
        assert nbd_servers_of(q) != []
        off.commit()
    assert set(image_bitmaps(q)) == {"cbt-web.p2", "cbt-db.1", "other", "cbt-web.mine"}
    assert nbd_servers_of(q) == []


def test_a_failed_run_merges_its_bitmap_back(tmp_path: Path) -> None:
    q = create(tmp_path / "a.qcow2", SIZE)
    run("qemu-img", "bitmap", "--add", "-f", "qcow2", str(q), "cbt-web.20261130T000001Z")
    with pytest.raises(RuntimeError), open_offline(
            {"os": str(q)}, "web.20261130T000002Z", "web.20261130T000001Z") as off:
        assert off.disks["os"].previous == "cbt-web.20261130T000001Z"
        raise RuntimeError("the backup failed")
    assert image_bitmaps(q) == {"cbt-web.20261130T000001Z": ["auto"]}
    assert nbd_servers_of(q) == []
    # first backup: no previous bitmap, a hash scan that says so; raw disks pass through
    with open_offline({"os": str(q)}, "web.20261130T000003Z", None) as off:
        assert off.hint("os", BS) == ChangeHint.hash("first backup: no previous bitmap")
        assert off.changes()("raw", None, BS, SIZE) == ChangeHint.hash()
        # (p1 was no longer the previous)
        assert image_bitmaps(q) == {"cbt-web.20261130T000003Z": ["auto"]}
    assert image_bitmaps(q) == {}


@pytest.mark.slow
def test_sigterm_stops_qemu_nbd_and_merges_back(tmp_path: Path) -> None:
    q = create(tmp_path / "a.qcow2", SIZE)
    write(str(q), "qcow2", [(MIB, 65536, 3)])
    run("qemu-img", "bitmap", "--add", "-f", "qcow2", str(q), "cbt-web.p1")
    script = textwrap.dedent(f"""
        import os, signal, sys
        from cbt.source.nbd import NbdSource
        from cbt.source.qcow2 import open_offline
        with open_offline({{"os": {str(q)!r}}}, "web.p2", "web.p1") as off:
            with NbdSource(off.disks["os"].socket, "disk") as src:
                assert src.size == {SIZE}
                sys.stdout.write(src.client.read({MIB}, 4).hex() + "\\n")
                sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGTERM)
            signal.pause()
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.stdout == "03030303\n"
    assert r.returncode != 0 and "stopped by SIGTERM" in r.stderr
    assert nbd_servers_of(q) == []
    assert image_bitmaps(q) == {"cbt-web.p1": ["auto"]}
    assert raw_bytes(q, "qcow2", tmp_path)[MIB:MIB + 4] == b"\3" * 4


def test_a_short_range_costs_a_short_buffer(tmp_path: Path) -> None:
    """A tracked disk reads many short ranges over NBD: each must not cost a zeroed 64 MiB
    window (it made a 1% incremental of a 1 GiB image take 8 s instead of 0.1 s)."""
    import tracemalloc

    from cbt.source.nbd import NbdSource

    q = create(tmp_path / "a.qcow2", SIZE)
    write(str(q), "qcow2", [(BS, BS, 9)])
    with open_offline({"os": str(q)}, "web.p1", None) as off, \
            NbdSource(off.disks["os"].socket, "disk") as src:
        tracemalloc.start()
        try:
            got = [bytes(w) for _, w in src.windows(BS, 1, 2)]
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert got == [b"\x09" * BS]
    assert peak < 4 * BS


def _guest_view(off: OfflineSet, label: str, n: int) -> bytes:
    from cbt.source.nbd import NbdSource

    with NbdSource(off.disks[label].socket, "disk") as src:
        return src.client.read(0, n)


def test_a_backing_file_the_image_owner_cannot_read_is_refused(tmp_path: Path) -> None:
    """A header is its owner's word: an image of uid 1000 naming root's 0600 file as its
    raw backing file must not make cbt (root) read that file into the backup."""
    need(os.geteuid() == 0, "needs root (files of another owner)")
    secret = tmp_path / "shadow"
    secret.write_bytes(b"root-only secret\n")
    secret.chmod(0o600)
    q = tmp_path / "evil.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(q),
        str(SIZE))
    os.chown(q, 1000, 1000)
    with pytest.raises(Qcow2Error, match=r"evil\.qcow2: its backing file .*shadow is not "
                                         r"readable by the image's owner \(uid 1000\)"):
        open_offline({"os": str(q)}, "web.p1", None).__enter__()
    assert image_bitmaps(q) == {} and nbd_servers_of(q) == []
    secret.chmod(0o644)  # readable by all: part of the guest's view
    with open_offline({"os": str(q)}, "web.p1", None) as off:
        assert _guest_view(off, "os", 17) == b"root-only secret\n"
    os.chown(q, 0, 0)  # root's own image: root's word
    secret.chmod(0o600)
    with open_offline({"os": str(q)}, "web.p2", None) as off:
        assert _guest_view(off, "os", 4) == b"root"


@pytest.mark.parametrize(("backing", "fmt", "error"), [
    ("nbd:unix:/nonexistent.sock", "raw", "is not a file name (a QEMU protocol)"),
    ('json:{"driver": "file", "filename": "/etc/hostname"}', "raw", "a QEMU protocol"),
    ("/dev/zero", "raw", "/dev/zero is not a regular file"),
    ("fifo", "raw", "fifo is not a regular file"),
    ("base.vmdk", "vmdk", "has format 'vmdk' (cbt reads only qcow2 or raw ones)"),
    ("loop.qcow2", "qcow2", "its backing chain loops at"),
])
def test_a_backing_name_that_is_no_plain_file_is_refused(tmp_path: Path, backing: str,
                                                         fmt: str, error: str) -> None:
    os.mkfifo(tmp_path / "fifo")  # (a reader opening it would hang)
    q = tmp_path / "evil.qcow2"
    target = "loop.qcow2" if fmt == "qcow2" else "evil.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", fmt,
        str(tmp_path / target), str(SIZE))
    if fmt == "qcow2":  # evil -> loop -> evil
        run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "evil.qcow2", "-F",
            "qcow2", str(tmp_path / "loop.qcow2"), str(SIZE))
        run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "loop.qcow2", "-F",
            "qcow2", str(q), str(SIZE))
    with pytest.raises(Qcow2Error) as exc:
        open_offline({"os": str(q)}, "web.p1", None).__enter__()
    assert str(exc.value).startswith(f"{q}: ") and error in str(exc.value)
    assert image_bitmaps(q) == {} and nbd_servers_of(q) == []


def test_qemu_reads_the_image_cbt_inspected(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """An image replaced by another (its name renamed over) after cbt inspected it: the
    bitmaps and qemu-nbd still work on the file inspected, never on the newcomer."""
    from cbt.source import qcow2

    q = create(tmp_path / "a.qcow2", SIZE)
    write(str(q), "qcow2", [(0, 4096, 1)])
    other = create(tmp_path / "other.qcow2", 2 * SIZE)
    write(str(other), "qcow2", [(0, 4096, 2)])
    kept = tmp_path / "kept.qcow2"
    os.link(q, kept)
    recover = qcow2._recover

    def swap(*args: Any) -> list[str]:
        out = recover(*args)
        os.replace(other, q)  # between the inspection and the bitmap and qemu-nbd
        return out

    monkeypatch.setattr(qcow2, "_recover", swap)
    with open_offline({"os": str(q)}, "web.p1", None) as off:
        assert off.disks["os"].size == SIZE
        assert _guest_view(off, "os", 4) == b"\1" * 4
        assert image_bitmaps(kept) == {"cbt-web.p1": ["auto"]} and image_bitmaps(q) == {}
        off.commit()
    assert image_bitmaps(kept) == {"cbt-web.p1": ["auto"]} and image_bitmaps(q) == {}


def test_one_image_under_two_labels_is_refused(tmp_path: Path) -> None:
    q = create(tmp_path / "a.qcow2", SIZE)
    link = tmp_path / "b.qcow2"
    link.symlink_to(q)
    with pytest.raises(Qcow2Error, match=r"disks os and again are the same qcow2 image"):
        open_offline({"os": str(q), "again": str(link)}, "web.p1", None).__enter__()
    assert image_bitmaps(q) == {} and nbd_servers_of(q) == []
    with open_offline({"os": str(link)}, "web.p1", None) as off:  # a symlink: its target
        assert _guest_view(off, "os", 4) == b"\0" * 4
        off.commit()
    assert image_bitmaps(q) == {"cbt-web.p1": ["auto"]}


def _settled(image: Path) -> dict[str, list[str]]:
    return image_bitmaps(image)


def test_no_room_for_a_bitmap_hashes_and_leaves_the_image_alone(tmp_path: Path) -> None:
    """On a full file system ``qemu-img bitmap --add`` exits 0 yet leaves every bitmap of
    the image marked inconsistent ("Lost persistent bitmaps"): cbt must not try; the disk
    is read through qemu-nbd and hashed, saying why, its bitmaps untouched."""
    with tmpfs(tmp_path / "m", 8) as mnt:
        q = create(mnt / "a.qcow2", SIZE)
        write(str(q), "qcow2", [(MIB, 4096, 4)])
        run("qemu-img", "bitmap", "--add", "-f", "qcow2", str(q), "cbt-web.p1")
        run("qemu-img", "bitmap", "--add", "-f", "qcow2", str(q), "theirs")
        fill(mnt / "ballast", 0)
        with open_offline({"os": str(q)}, "web.p2", "web.p1") as off:
            hint = off.hint("os", BS)
            assert hint.source == "hash" and hint.reason is not None
            assert "bytes free on its file system" in hint.reason and str(q) in hint.reason
            assert _guest_view(off, "os", MIB + 4)[MIB:] == b"\4" * 4
            off.commit()
        assert _settled(q) == {"cbt-web.p1": ["auto"], "theirs": ["auto"]}
        assert nbd_servers_of(q) == []
        # and a bitmap operation that says it lost the bitmaps is an error, not a success
        from cbt.source import qcow2

        _info, pinned = qcow2.pin(str(q))
        try:
            with pytest.raises(Qcow2Error, match=r"a\.qcow2: qemu-img bitmap failed: Lost "
                                                 r"persistent bitmaps"):
                qcow2._bitmap(pinned, "cbt-web.x", "--add")
        finally:
            pinned.close()


def test_a_read_only_image_is_hashed_saying_why(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "m", 32) as mnt:
        q = create(mnt / "a.qcow2", SIZE)
        write(str(q), "qcow2", [(0, 4096, 8)])
        run("qemu-img", "bitmap", "--add", "-f", "qcow2", str(q), "cbt-web.p1")
        run("mount", "-o", "remount,ro", str(mnt))
        with open_offline({"os": str(q)}, "web.p2", "web.p1") as off:
            assert off.hint("os", BS) == ChangeHint.hash(
                f"no bitmap can be added to {q}: Read-only file system (hash scan)")
            assert _guest_view(off, "os", 4) == b"\x08" * 4
            off.commit()
        assert _settled(q) == {"cbt-web.p1": ["auto"]} and nbd_servers_of(q) == []


def test_qemu_nbd_dies_if_cbt_died_before_it_could_ask() -> None:
    """``PR_SET_PDEATHSIG`` is set in the child after the fork: if cbt died in between no
    signal would ever come, so the child checks its parent is still cbt's process."""
    from functools import partial

    from cbt.source import qcow2

    gone = subprocess.Popen(["sleep", "30"], preexec_fn=partial(qcow2._die_with_parent, 1))
    assert gone.wait(timeout=10) == 1
    ours = subprocess.Popen(["sleep", "0"],
                            preexec_fn=partial(qcow2._die_with_parent, os.getpid()))
    assert ours.wait(timeout=10) == 0


@pytest.mark.parametrize("granularity", [512, 1 << 20])
def test_any_bitmap_granularity_marks_every_changed_block(tmp_path: Path,
                                                         granularity: int) -> None:
    q = create(tmp_path / "a.qcow2", SIZE)
    run("qemu-img", "bitmap", "--add", "-g", str(granularity), "-f", "qcow2", str(q),
        "cbt-web.p1")
    write(str(q), "qcow2", [(BS + 512, 512, 1), (5 * MIB - 512, 1024, 2)])
    with open_offline({"os": str(q)}, "web.p2", "web.p1") as off:
        hint = off.hint("os", BS)
    per = granularity // BS
    assert hint == ChangeHint("qemu-bitmap", ((1, 2), (5 * MIB // BS - 1, 5 * MIB // BS + 1))
                              if granularity == 512 else ((0, per), (4 * per, 6 * per)))


@pytest.mark.slow
def test_a_huge_disk_gets_a_coarser_bitmap(tmp_path: Path) -> None:
    """A 1 PiB image: at 64 KiB QEMU refuses the bitmap ("Too much space will be occupied
    ... '#block12'", which is no lock error either); cbt picks a granularity that keeps
    the bitmap at 64 MiB at most."""
    q = create(tmp_path / "huge.qcow2", 1 << 50)
    with open_offline({"os": str(q)}, "web.p1", None) as off:
        assert off.disks["os"].size == 1 << 50
        off.commit()
    assert inspect(str(q)).bitmaps[0].granularity == 2 << 20
    assert nbd_servers_of(q) == []


def test_an_image_with_many_bitmaps_needs_room_for_them_once(tmp_path: Path) -> None:
    """20 bitmaps on a file system with 6 MiB free: room enough to store them again (each
    a table cluster and a data cluster), so the disk is tracked, not hashed."""
    with tmpfs(tmp_path / "m", 32) as mnt:
        q = create(mnt / "a.qcow2", SIZE)
        for i in range(20):
            run("qemu-img", "bitmap", "--add", "-f", "qcow2", str(q), f"other{i}")
        run("qemu-img", "bitmap", "--add", "-f", "qcow2", str(q), "cbt-web.p1")
        write(str(q), "qcow2", [(0, 4096, 1)])
        fill(mnt / "ballast", 6 * MIB)
        with open_offline({"os": str(q)}, "web.p2", "web.p1") as off:
            assert off.hint("os", BS) == ChangeHint("qemu-bitmap", ((0, 65536 // BS),))
            off.commit()
        left = image_bitmaps(q)
        assert len(left) == 21 and left["cbt-web.p2"] == ["auto"]
        assert all(flags == ["auto"] for flags in left.values())


def test_a_backing_image_with_an_external_data_file_is_refused(tmp_path: Path) -> None:
    """The data file a backing image's header names is any host file QEMU would read as
    guest data: refused down the chain as at the top."""
    base = tmp_path / "base.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o",
        f"data_file={tmp_path / 'base.data'}", str(base), str(SIZE))
    q = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", str(base), "-F", "qcow2",
        str(q), str(SIZE))
    with pytest.raises(Qcow2Error, match=r"base\.qcow2: a qcow2 image with an external data "
                                         r"file is not supported"):
        open_offline({"os": str(q)}, "web.p1", None).__enter__()
    assert image_bitmaps(q) == {} and nbd_servers_of(q) == []


def test_a_vm_started_before_qemu_nbd_fails_in_one_line(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The VM starts after the bitmap was added, before qemu-nbd opens the image: one line
    naming the image (not cbt's json:/dev/fd name for it); the bitmaps settle later."""
    from cbt.source import qcow2

    q = create(tmp_path / "a.qcow2", SIZE)
    start = qcow2._start
    with contextlib.ExitStack() as vm:
        def late(d: Any, workdir: str) -> None:
            vm.enter_context(held_open(q))
            start(d, workdir)

        monkeypatch.setattr(qcow2, "_start", late)
        with pytest.raises(Qcow2Error) as exc:
            open_offline({"os": str(q)}, "web.20261130T000001Z", None).__enter__()
    line = str(exc.value)
    assert line.startswith(f"{q}: in use by a running QEMU (") and "lock" in line
    assert "json:" not in line and "/dev/fd/" not in line and "\n" not in line
    assert nbd_servers_of(q) == []
    monkeypatch.setattr(qcow2, "_start", start)
    with open_offline({"os": str(q)}, "web.20261130T000002Z", None) as off:  # (settles)
        off.commit()
    assert image_bitmaps(q) == {"cbt-web.20261130T000002Z": ["auto"]}
