"""A reader that misses a pack in ``packs/`` and then in the trash, because a rescue
moved it back meanwhile (a backup's commit: copied to ``packs/``, then deleted from
the trash, or an atomic rename on a directory), looks in ``packs/`` again.

The interleaving is made certain: the reader's miss in ``packs/`` is answered only
once the rescue's move has landed.  Restore (mapped reads) and copy (ranged reads),
on a directory and on S3.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import MIB
from helpers.images import assert_same_bytes, write_random_disk
from helpers.s3 import S3Server, fresh_bucket

import cbt as cbt_api
from cbt.format.pack import pack_id_of
from cbt.repo.s3 import S3Storage
from cbt.repo.storage import LocalStorage
from cbt.repo.trash import move_to_trash, trash_name


@pytest.fixture(params=["dir", "s3"])
def kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "s3":
        server: S3Server = request.getfixturevalue("s3")
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)
    return str(request.param)


def _trashed_point(kind: str, tmp_path: Path) -> tuple[cbt_api.Vault, str, Path]:
    """A committed point whose packs a gc moved to the trash (a backup will rescue them)."""
    where = f"s3://{fresh_bucket()}/race" if kind == "s3" else str(tmp_path / "v")
    v = cbt_api.Vault.init(where)
    disk = write_random_disk(tmp_path / "os.img", 2 * MIB, seed=21)
    point = v.backup("web", [f"os={disk}"])
    for name in [n for n in v.storage.list("packs") if n.endswith(".pack")]:
        move_to_trash(v.storage, pack_id_of(name))
    return v, point.id, disk


def _rescue_on_miss(monkeypatch: pytest.MonkeyPatch, kind: str, method: str) -> None:
    """``method`` of the storage class: a miss in packs/ is answered after the pack was
    moved back from the trash (the rescue landing between the reader's two looks)."""
    cls: Any = S3Storage if kind == "s3" else LocalStorage
    real: Callable[..., Any] = getattr(cls, method)

    def read(self: Any, name: str, *args: Any) -> Any:
        try:
            return real(self, name, *args)
        except OSError as exc:
            if exc.errno == errno.ENOENT and name.startswith("packs/"):
                trashed = trash_name(pack_id_of(name))
                if self.exists(trashed):
                    self.rename(trashed, name)
            raise
    monkeypatch.setattr(cls, method, read)


def test_restore_finds_a_pack_rescued_between_its_looks(
        kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    v, point, disk = _trashed_point(kind, tmp_path)
    _rescue_on_miss(monkeypatch, kind, "map")
    v.restore(point, tmp_path / "out")
    assert_same_bytes(tmp_path / "out" / "os.img", disk)


def test_copy_finds_a_pack_rescued_between_its_looks(
        kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    v, point, disk = _trashed_point(kind, tmp_path)
    dst = cbt_api.Vault.init(tmp_path / "dst")
    _rescue_on_miss(monkeypatch, kind, "read_range")
    v.copy(dst, points=[point])
    monkeypatch.undo()
    dst.restore(point, tmp_path / "out")
    assert_same_bytes(tmp_path / "out" / "os.img", disk)
