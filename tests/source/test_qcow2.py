"""cbt.source.qcow2: offline qcow2 images through ``qemu-nbd``, tracked by persistent
bitmaps added with ``qemu-img bitmap``.  Real ``qemu-img``, ``qemu-io`` and ``qemu-nbd``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import MIB
from helpers.qemu import create, image_bitmaps, nbd_servers_of, need_qemu, raw_bytes, run, write

from cbt.source.changes import ChangeHint
from cbt.source.qcow2 import Qcow2Error, inspect, is_qcow2, open_offline

SIZE = 8 * MIB
BS = 16384


@pytest.fixture(autouse=True)
def _qemu() -> None:
    need_qemu("qemu-img", "qemu-io", "qemu-nbd")


def test_is_qcow2_reads_the_magic(tmp_path: Path) -> None:
    q = create(tmp_path / "disk.img", SIZE)
    raw = tmp_path / "disk.qcow2"
    raw.write_bytes(b"QFI" + b"\0" * 100)
    short = tmp_path / "short"
    short.write_bytes(b"QF")
    assert is_qcow2(str(q))
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
    for name in ("cbt-web.p1", "cbt-web.killed", "cbt-db.1"):
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
        assert set(image_bitmaps(q)) == {"cbt-web.p1", "cbt-web.p2", "cbt-db.1", "other"}
        assert nbd_servers_of(q) != []
        off.commit()
    assert set(image_bitmaps(q)) == {"cbt-web.p2", "cbt-db.1", "other"}
    assert nbd_servers_of(q) == []


def test_a_failed_run_merges_its_bitmap_back(tmp_path: Path) -> None:
    q = create(tmp_path / "a.qcow2", SIZE)
    run("qemu-img", "bitmap", "--add", "-f", "qcow2", str(q), "cbt-web.p1")
    with pytest.raises(RuntimeError), open_offline({"os": str(q)}, "web.p2", "web.p1") as off:
        assert off.disks["os"].previous == "cbt-web.p1"
        raise RuntimeError("the backup failed")
    assert image_bitmaps(q) == {"cbt-web.p1": ["auto"]}
    assert nbd_servers_of(q) == []
    # first backup: no previous bitmap, a hash scan that says so; raw disks pass through
    with open_offline({"os": str(q)}, "web.p3", None) as off:
        assert off.hint("os", BS) == ChangeHint.hash("first backup: no previous bitmap")
        assert off.changes()("raw", None, BS, SIZE) == ChangeHint.hash()
        assert image_bitmaps(q) == {"cbt-web.p3": ["auto"]}  # (p1 was no longer the previous)
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
