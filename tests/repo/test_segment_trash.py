"""Retired index segments: a reader that opened one finds it in the trash; gc's
empty_trash removes it after the grace period, never a segment still listed."""

from __future__ import annotations

import errno
import time
from pathlib import Path

import pytest

from cbt.core.errors import CbtIOError
from cbt.repo.storage import LocalStorage, MemoryStorage, Storage
from cbt.repo.trash import empty_trash, read_segment_range, rescue, retire_segment


@pytest.fixture(params=["local", "memory"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage.create(tmp_path / "v")
    return MemoryStorage()


def test_a_retired_segment_is_read_from_the_trash_then_emptied(storage: Storage) -> None:
    body = bytes(range(256)) * 4
    storage.put("index/a.cbtidx", body)
    storage.put("index/b.cbtidx", b"kept")
    assert read_segment_range(storage, "index/a.cbtidx", 10, 5) == body[10:15]
    retire_segment(storage, "index/a.cbtidx")
    assert not storage.exists("index/a.cbtidx")
    assert read_segment_range(storage, "index/a.cbtidx", 300, 7) == body[300:307]
    retire_segment(storage, "index/gone.cbtidx")  # (retired by another run: nothing to do)
    assert rescue(storage, {b"\0" * 32}) == {b"\0" * 32}  # (a segment is no pack)
    storage.put("trash/notes.txt", b"not gc's")
    storage.put("trash/index/sub/deeper", b"not a segment name")
    assert empty_trash(storage, time.time() - 3600) == 0  # (inside the grace period)
    sizes: list[int] = []
    assert empty_trash(storage, time.time() + 1, sizes) == 1 and sizes == [len(body)]
    with pytest.raises(CbtIOError, match="nor in its trash") as exc:
        read_segment_range(storage, "index/a.cbtidx", 0, 1)
    assert exc.value.errno == errno.ENOENT
    assert storage.get("index/b.cbtidx") == b"kept"
    assert storage.get("trash/notes.txt") == b"not gc's"
    assert storage.exists("trash/index/sub/deeper")
