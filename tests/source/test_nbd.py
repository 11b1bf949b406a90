"""The NBD client and NbdSource against real QEMU servers (qemu-nbd, qemu-storage-daemon).

Truth comes from QEMU's own tools: ``qemu-img convert`` for the bytes,
``qemu-img map`` for the allocation, and the writes the test made (rounded out
to the bitmap's granularity) for the dirty ranges.
"""

from __future__ import annotations

import pickle
import random
import signal
import time
from pathlib import Path

import pytest
from helpers import KIB, MIB
from helpers.qemu import (
    allocated,
    create,
    need_qemu,
    qemu_nbd,
    raw_bytes,
    run,
    socket_path,
    storage_daemon,
    uri,
    write,
)

from cbt.core.errors import SourceReadError
from cbt.source.image import open_source
from cbt.source.nbd import BASE_ALLOCATION, NbdClient, NbdError, NbdSource

# an odd size: the last 64 KiB block is short (qcow2 sizes are whole sectors)
SIZE = 20 * MIB + 7 * 512
WRITES = [(0, 4096, 0x11), (1 * MIB + 512, 3 * KIB, 0x22), (5 * MIB, 2 * MIB, 0x33),
          (12 * MIB - 4096, 8192, 0x44), (SIZE - 1536, 1536, 0x55)]


def _image(tmp_path: Path, fmt: str = "qcow2") -> Path:
    need_qemu("qemu-img", "qemu-io", "qemu-nbd")
    img = create(tmp_path / f"disk.{fmt}", SIZE, fmt)
    write(str(img), fmt, WRITES)
    rnd = random.Random(7)  # and some incompressible bytes
    (tmp_path / "rand").write_bytes(rnd.randbytes(MIB))
    run("qemu-io", "-f", fmt, "-c", f"write -s {tmp_path / 'rand'} {15 * MIB} {MIB}", str(img))
    (tmp_path / "rand").unlink()
    # zeroed and discarded again inside written data: holes between data extents
    run("qemu-io", "-f", fmt, "-c", f"write -z {5 * MIB + 256 * KIB} {128 * KIB}",
        "-c", f"discard {6 * MIB} {256 * KIB}", str(img))
    return img


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_reads_equal_the_image_byte_for_byte(tmp_path: Path, fmt: str) -> None:
    img = _image(tmp_path, fmt)
    truth = raw_bytes(img, fmt, tmp_path)
    assert len(truth) == SIZE
    with socket_path(tmp_path) as sock, qemu_nbd(img, sock, fmt), \
            NbdClient(sock, "disk") as c:
        assert c.size == SIZE
        assert c.read(0, SIZE) == truth
        rnd = random.Random(1)
        for _ in range(200):
            off = rnd.randrange(SIZE)
            n = rnd.randrange(1, min(3 * MIB, SIZE - off) + 1)
            assert c.read(off, n) == truth[off:off + n], (off, n)
        for in_flight, request in [(1, 4096), (3, 100_000), (16, 512 * KIB)]:
            buf = bytearray(SIZE - 1000)
            c.read_into(1000, buf, in_flight=in_flight, request=request)
            assert buf == truth[1000:]
        assert c.read(SIZE - 1, 1) == truth[-1:]


def test_windows_extents_and_spec(tmp_path: Path) -> None:
    img = _image(tmp_path)
    truth = raw_bytes(img, "qcow2", tmp_path)
    bs = 64 * KIB
    blocks = -(-SIZE // bs)
    with socket_path(tmp_path) as sock, qemu_nbd(img, sock), NbdSource(sock, "disk") as src:
        assert src.size == SIZE
        assert src.extents() == allocated(img, "qcow2")
        got = bytearray()
        for first, w in src.windows(bs, 0, blocks):
            assert first * bs == len(got)
            got += w
        assert got == truth
        # a range in the middle, ending at the short last block
        lo = 100
        got = bytearray()
        for _first, w in src.windows(bs, lo, blocks):
            got += w
        assert got == truth[lo * bs:]
        spec = pickle.loads(pickle.dumps(src.spec()))
        assert (spec.kind, spec.path, spec.export, spec.size) == ("nbd", sock, "disk", SIZE)
        with open_source(spec._replace(size=SIZE - 4096)) as again:
            assert isinstance(again, NbdSource)
            assert again.size == SIZE - 4096
            assert b"".join(bytes(w) for _f, w in again.windows(bs, 0, blocks)) == \
                truth[:SIZE - 4096]
        with pytest.raises(SourceReadError, match="shrank"):
            open_source(spec._replace(size=SIZE + 512))


def test_a_sparse_disk_reads_holes_as_zeros(tmp_path: Path) -> None:
    need_qemu("qemu-img", "qemu-nbd")
    img = create(tmp_path / "empty.qcow2", 8 * MIB)
    with socket_path(tmp_path) as sock, qemu_nbd(img, sock), NbdSource(sock, "disk") as src:
        assert src.extents() == []
        assert src.client.block_status(BASE_ALLOCATION) == [(0, 8 * MIB, 3)]
        assert src.client.read(0, 8 * MIB) == bytes(8 * MIB)


def test_no_such_export_or_bitmap(tmp_path: Path) -> None:
    img = _image(tmp_path)
    with socket_path(tmp_path) as sock, qemu_nbd(img, sock):
        with pytest.raises(NbdError, match=r"nbd\+unix:///nope\?socket=.*no such export"):
            NbdSource(sock, "nope")
        with NbdSource(sock, "disk") as src, \
                pytest.raises(NbdError, match="no dirty bitmap named 'bm'"):
            src.dirty_ranges("bm")
    with pytest.raises(NbdError, match="cannot connect"):
        NbdSource(str(tmp_path / "gone.sock"), "disk")


def _rounded(writes: list[tuple[int, int]], gran: int, size: int) -> list[tuple[int, int]]:
    """The byte ranges a bitmap of granularity ``gran`` marks for these writes, merged."""
    marked = sorted({c for off, n, in writes for c in range(off // gran, -(-(off + n) // gran))})
    out: list[tuple[int, int]] = []
    for c in marked:
        a, b = c * gran, min((c + 1) * gran, size)
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


@pytest.mark.parametrize("gran", [64 * KIB, 256 * KIB])
def test_dirty_ranges_of_a_persistent_bitmap_written_live(tmp_path: Path, gran: int) -> None:
    need_qemu()
    img = _image(tmp_path)  # written before the bitmap: not dirty
    run("qemu-img", "bitmap", "--add", "-g", str(gran), str(img), "bm")
    run("qemu-img", "bitmap", "--add", "-g", str(gran), str(img), "other")
    live = [(3 * MIB + 100, 10, 0x61), (7 * MIB, 300 * KIB, 0x62), (16 * MIB - 1, 2, 0x63),
            (SIZE - 512, 512, 0x64)]
    with socket_path(tmp_path) as sock, storage_daemon(img, sock, bitmaps=("bm",)), \
            NbdSource(sock, "disk") as src:
        assert src.dirty_ranges("bm") == []
        write(uri(sock), "raw", live)  # through the export, while it is served
        expect = _rounded([(o, n) for o, n, _p in live], gran, SIZE)
        assert src.dirty_ranges("bm") == expect
        with pytest.raises(NbdError, match="no dirty bitmap named 'other'"):
            src.dirty_ranges("other")  # not exported
        truth_after = raw_bytes(img, "qcow2", tmp_path)
        assert src.client.read(0, SIZE) == truth_after


def test_a_server_killed_mid_read_is_a_clean_error(tmp_path: Path) -> None:
    img = _image(tmp_path)
    bs = 64 * KIB
    with socket_path(tmp_path) as sock, qemu_nbd(img, sock) as proc, \
            NbdSource(sock, "disk", timeout=10, window=MIB) as src:
        windows = src.windows(bs, 0, -(-SIZE // bs))
        next(windows)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        t = time.monotonic()
        with pytest.raises(NbdError, match=r"nbd\+unix:///disk.*(closed|failed)"):
            for _ in windows:
                pass
        assert time.monotonic() - t < 5


def test_an_export_past_4_gib(tmp_path: Path) -> None:
    """Block status lengths are 32 bits: a large disk is asked about in pieces."""
    need_qemu("qemu-img", "qemu-io", "qemu-nbd")
    size = 6 * 1024 * MIB + 4096
    img = create(tmp_path / "big.qcow2", size)
    at = [(4096, 4096), (4 * 1024 * MIB - 4096, 8192), (5 * 1024 * MIB + 3 * MIB, MIB),
          (size - 4096, 4096)]
    write(str(img), "qcow2", [(o, n, 0x70 + i) for i, (o, n) in enumerate(at)])
    with socket_path(tmp_path) as sock, qemu_nbd(img, sock), NbdSource(sock, "disk") as src:
        assert src.size == size
        assert src.extents() == allocated(img, "qcow2")
        assert len(src.extents()) == 4
        for i, (o, n) in enumerate(at):
            assert src.client.read(o - 512, n + 512) == bytes(512) + bytes([0x70 + i]) * n
        with pytest.raises(NbdError, match="outside the export"):
            src.client.block_status(BASE_ALLOCATION, 0, size + 1)
        with pytest.raises(NbdError, match="past the end"):
            src.client.read(size - 10, 11)
        assert src.client.read(size - 10, 10) == bytes([0x73]) * 10  # still usable


def test_dirty_ranges_on_the_one_connection_qemu_nbd_allows(tmp_path: Path) -> None:
    """``qemu-nbd --bitmap`` of an offline qcow2, one client at a time: the bitmap is
    negotiated with the source's own connection, no second one is needed."""
    need_qemu("qemu-img", "qemu-io", "qemu-nbd")
    img = _image(tmp_path)
    run("qemu-img", "bitmap", "--add", "-g", str(64 * KIB), str(img), "bm")
    writes = [(2 * MIB + 5, 70 * KIB, 0x71), (SIZE - 100, 100, 0x72)]
    write(str(img), "qcow2", writes)  # (qemu-io keeps the persistent bitmap up to date)
    with socket_path(tmp_path) as sock, qemu_nbd(img, sock, bitmap="bm", shared=1), \
            NbdSource(sock, "disk", timeout=3, bitmaps=("bm",)) as src:
        assert src.dirty_ranges("bm") == _rounded([(o, n) for o, n, _p in writes], 64 * KIB,
                                                  SIZE)
        assert src.extents() == allocated(img, "qcow2")
