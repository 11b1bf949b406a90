"""Read errors and shrinking disks: one clean error naming the disk, the byte and the error.

Read errors are real: a file on a btrfs whose data checksum no longer matches
(``helpers.badblocks``).  A disk that shrinks is truncated for real, between
windows (the mapping is refused) or under a mapped window (SIGBUS in a worker).
"""

from __future__ import annotations

import errno
import faulthandler
import os
import signal
from pathlib import Path

import pytest
from helpers import MIB
from helpers.badblocks import bad_btrfs, random_file

from cbt.core.errors import CbtError, SourceReadError
from cbt.core.parallel import Report, WorkerError, fork_map
from cbt.source.image import explain_death, map_windows, open_image, open_source
from cbt.source.scan import scan_blocks


def test_fixture_gives_eio(tmp_path: Path) -> None:
    with bad_btrfs(tmp_path) as fs:
        img = fs.mnt / "disk.img"
        random_file(img, 4 * MIB)
        page = fs.corrupt(img, 3 * MIB + 5)
        assert page == 3 * MIB
        fd = os.open(img, os.O_RDONLY)
        try:
            assert len(os.pread(fd, 4096, 0)) == 4096
            with pytest.raises(OSError) as info:
                os.pread(fd, 4096, page)
            assert info.value.errno == errno.EIO
        finally:
            os.close(fd)


@pytest.mark.parametrize("workers", [1, 2])
def test_scan_names_the_unreadable_byte(tmp_path: Path, workers: int) -> None:
    """A scan of a disk with an unreadable page fails with the disk, the page and EIO
    (it used to be 'worker process N died without a result')."""
    with bad_btrfs(tmp_path) as fs:
        img = fs.mnt / "disk.img"
        random_file(img, 6 * MIB)
        page = fs.corrupt(img, 5 * MIB + 12345)
        with pytest.raises(SourceReadError) as info:
            scan_blocks(img, 64 << 10, workers=workers)
    err = info.value
    assert err.errno == errno.EIO and err.path == str(img) and err.offset == page
    assert str(err.strerror) == f"read error on {img} at byte {page}: Input/output error"


def test_map_windows_of_a_disk_that_shrank_between_windows(tmp_path: Path) -> None:
    """The mapping of a window past the new end used to be 'ValueError: mmap length is
    greater than file size' (a traceback); it is the disk that shrank."""
    img = tmp_path / "disk.img"
    random_file(img, 8 * MIB)
    with open_image(img) as src:
        windows = map_windows(src.fd, src.size, 4096, 0, src.size // 4096, src.path,
                              window=2 * MIB)
        first, w = next(windows)
        assert first == 0 and len(w) == 2 * MIB
        del w
        os.truncate(img, 3 * MIB)
        with pytest.raises(SourceReadError) as info:
            for _ in windows:
                pass
    assert isinstance(info.value, CbtError)
    assert str(info.value.strerror) == (f"{img} shrank while it was read: it ends at byte "
                                        f"{3 * MIB}, it had {8 * MIB} bytes")
    assert info.value.offset == 3 * MIB


def test_populated_window_of_a_shrunk_disk(tmp_path: Path) -> None:
    """A window mapped while the disk was whole, faulted in after it shrank: an error,
    not a SIGBUS (the mapping is checked before it is handed out)."""
    img = tmp_path / "disk.img"
    random_file(img, 4 * MIB)
    with open_image(img) as src:
        size = src.size
        os.truncate(img, MIB)  # after the size was taken: the window is mapped in full
        with pytest.raises(SourceReadError) as info:
            for _ in map_windows(src.fd, size, 4096, 0, size // 4096, src.path):
                pass
    assert "shrank while it was read: it ends at byte 1048576" in str(info.value.strerror)


def _touch_after_truncate(task: tuple[str, int], report: Report) -> int:
    """In a worker: map the disk without faulting it in, truncate it, touch it: SIGBUS."""
    path, size = task
    faulthandler.disable()  # (pytest's, inherited: no traceback dump of the expected death)
    with open_image(path) as src:
        for _, w in map_windows(src.fd, size, 4096, 0, size // 4096, src.path,
                                read_ahead=False):
            os.truncate(path, 0)
            return w[size - 1]  # (dies here)
    return -1


def test_worker_killed_by_sigbus_is_explained(tmp_path: Path) -> None:
    """A worker that dies of SIGBUS on a mapped window says so, with the window it was
    reading; the disk it read is named as having shrunk."""
    img = tmp_path / "disk.img"
    random_file(img, 2 * MIB)
    with pytest.raises(WorkerError) as info:
        fork_map(_touch_after_truncate, [(str(img), 2 * MIB)], isolate=True)
    exc = info.value
    assert exc.task == 0 and exc.signum == signal.SIGBUS
    assert exc.span == (0, 2 * MIB)
    assert str(exc).endswith("died without a result (killed by SIGBUS)")
    err = explain_death(exc, (str(img), 2 * MIB))
    assert str(err.strerror) == (f"{img} shrank while it was read: it ends at byte 0, "
                                 f"it had {2 * MIB} bytes")


def test_worker_death_on_unreadable_page_is_explained(tmp_path: Path) -> None:
    """explain_death reads the noted window again: the unreadable page and its error."""
    with bad_btrfs(tmp_path) as fs:
        img = fs.mnt / "disk.img"
        random_file(img, 4 * MIB)
        page = fs.corrupt(img, 2 * MIB + 7)
        exc = WorkerError("worker process 1 died without a result (killed by SIGBUS)", 0,
                          signal.SIGBUS, (MIB, 4 * MIB))
        err = explain_death(exc, (str(img), 4 * MIB))
    assert err.errno == errno.EIO and err.offset == page
    assert str(err.strerror) == f"read error on {img} at byte {page}: Input/output error"


def test_unexplained_death_still_names_the_disk(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    random_file(img, MIB)
    exc = WorkerError("worker process 9 died without a result (killed by SIGKILL)", 0,
                      signal.SIGKILL, (0, MIB))
    err = explain_death(exc, (str(img), MIB))
    assert str(err.strerror) == (f"reading {img} near byte 0 failed: worker process 9 "
                                 "died without a result (killed by SIGKILL)")


def _touch_all(task: tuple[str, int], report: Report) -> int:
    """In a worker: map the disk without faulting it in (as a backup does for the few
    blocks it stores after an early scan), then touch every page."""
    path, size = task
    faulthandler.disable()  # (pytest's, inherited: no traceback dump of the expected death)
    total = 0
    with open_image(path) as src:
        for _, w in map_windows(src.fd, size, 4096, 0, size // 4096, src.path,
                                read_ahead=False):
            total += sum(w[i] for i in range(0, len(w), 4096))
    return total


def test_worker_killed_by_an_unreadable_page_is_explained(tmp_path: Path) -> None:
    """A worker that touches an unreadable page of an unpopulated window dies of SIGBUS;
    the explanation is the page and EIO, found by reading the noted window again."""
    with bad_btrfs(tmp_path) as fs:
        img = fs.mnt / "disk.img"
        random_file(img, 4 * MIB)
        page = fs.corrupt(img, 3 * MIB + 99)
        with pytest.raises(WorkerError) as info:
            fork_map(_touch_all, [(str(img), 4 * MIB)], isolate=True)
        exc = info.value
        assert exc.signum == signal.SIGBUS and exc.span == (0, 4 * MIB)
        err = explain_death(exc, (str(img), 4 * MIB))
    assert err.errno == errno.EIO and err.offset == page
    assert str(err.strerror) == f"read error on {img} at byte {page}: Input/output error"


def test_worker_refuses_a_disk_replaced_since_it_was_planned(tmp_path: Path) -> None:
    """A worker reopens the disk by its path: another file renamed over it, a link turned
    to another disk, or a directory or FIFO there now is refused (the point would mix
    two disks); the same file, grown or rewritten, is read."""
    img, other = tmp_path / "disk.img", tmp_path / "other.img"
    img.write_bytes(b"a" * 8192)
    other.write_bytes(b"b" * 8192)
    link = tmp_path / "link.img"
    link.symlink_to(img)
    specs = [open_image(p).spec() for p in (img, link)]
    with open(img, "ab") as f:  # the same file, grown: fine
        f.write(b"c" * 4096)
    for spec in specs:
        open_source(spec).close()
    os.rename(other, img)
    for spec in specs:
        with pytest.raises(SourceReadError, match=r"was replaced while it was read"):
            open_source(spec)
    img.unlink()
    os.mkfifo(img)
    with pytest.raises(SourceReadError, match=r"not a regular file .*replaced or removed"):
        open_source(specs[0])
    img.unlink()
    img.mkdir()
    with pytest.raises(SourceReadError, match=r"is a directory.*replaced or removed"):
        open_source(specs[0])


@pytest.mark.parametrize("how", ["shrank", "replaced"])
def test_in_place_target_that_changes_while_it_is_restored(tmp_path: Path, how: str) -> None:
    """``restore --in-place`` compares the target, then rewrites only the blocks that
    differ: a target truncated (or renamed over) after the comparison would keep zeros
    (or another file's blocks) where the blocks compared equal, and the restore said
    it succeeded.  Now it is an error naming the target."""
    import cbt as cbt_api
    from cbt.core.errors import CbtIOError

    disk, target = tmp_path / "disk.img", tmp_path / "target.img"
    data = random_file(disk, 16 * MIB)
    v = cbt_api.Vault.init(tmp_path / "vault")
    point = v.backup("vm", [disk], workers=1).id
    target.write_bytes(data)
    with open(target, "r+b") as f:  # one block in the middle differs
        f.seek(8 * MIB)
        f.write(b"x" * 4096)
    other = tmp_path / "other.img"
    other.write_bytes(data[:12 * MIB])
    done = []

    def meddle(_done: int, _total: int) -> None:
        if not done:
            done.append(1)
            if how == "shrank":
                os.truncate(target, 12 * MIB)
            else:
                os.rename(other, target)

    with pytest.raises(CbtIOError, match=f"{target} {how} while it was restored in place"):
        v.restore(point, target, disk="disk", in_place=True, progress=meddle, workers=1)
    assert done
