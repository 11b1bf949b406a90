"""A backup's merge of the index segments (after its commit) and a gc beside it.

The merge opens the segments of a crowded tier, writes one segment of them, and
retires the segments it read.  A gc running in between trashed a dead pack and rewrote the
index without it: the merged segment named that pack again, from the trash; a
later backup deduplicated against it (no gc had run during that one: nothing to
rescue), and the next gc emptied the trash under it: its point lost blocks.  The
merge now runs under the gc lock.  The interleaving is made certain (gc starts
in another thread while the merge has opened a segment), on a directory and on S3.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import MIB
from helpers.images import assert_same_bytes, write_random_disk

import cbt as cbt_api
from cbt.core.errors import CbtError
from cbt.ops import backup as backup_mod
from cbt.ops.gc import gc
from cbt.repo import compact as compact_mod
from cbt.repo import segments as segments_mod


def _gc_during_merges(monkeypatch: pytest.MonkeyPatch, v: cbt_api.Vault) -> list[str]:
    """Every backup merges (two segments make a crowded tier); a gc is started (and
    waited for) in another thread once the merge has opened a segment.  Returns what each
    such gc did (or why it did not run)."""
    did: list[str] = []
    merging = threading.Event()
    real_merge = backup_mod._maybe_merge_segments
    real_open = segments_mod.open_paged

    def merge(vault: Any) -> list[str]:
        merging.set()
        try:
            return real_merge(vault)
        finally:
            merging.clear()

    def open_paged(*args: Any, **kwargs: Any) -> Any:
        segment = real_open(*args, **kwargs)
        if merging.is_set() and threading.current_thread() is threading.main_thread():
            def run() -> None:
                try:
                    did.append(f"gc ran: {gc(v, grace=3600, wait=0)}")
                except CbtError as exc:
                    did.append(f"gc waited: {exc}")
            t = threading.Thread(target=run)
            t.start()
            t.join()
        return segment
    monkeypatch.setattr(compact_mod, "WIDTH", 2)
    monkeypatch.setattr(backup_mod, "_maybe_merge_segments", merge)
    monkeypatch.setattr(segments_mod, "open_paged", open_paged)
    return did


def test_a_gc_never_runs_inside_a_merge(location: str, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    v = cbt_api.Vault.init(location)
    old = write_random_disk(tmp_path / "old.img", MIB, seed=31)
    gone = v.backup("old", [f"os={old}"])
    v.storage.delete(v.point_name(gone.id))  # (forgotten, as prune does): its pack is dead
    time.sleep(2.2)  # (older than any cutoff, S3's whole seconds and all)
    disk = write_random_disk(tmp_path / "os.img", MIB, seed=32)
    with monkeypatch.context() as m:
        did = _gc_during_merges(m, v)
        v.backup("web", [f"os={disk}"])
    assert did and all(d.startswith("gc waited") for d in did), did
    again = v.backup("again", [f"os={old}"])  # (the dead blocks again: stored anew)
    time.sleep(2.2)
    gc(v, grace=0)
    time.sleep(2.2)
    gc(v, grace=0)  # (empties the trash)
    v.restore(again.id, tmp_path / "out")
    assert_same_bytes(tmp_path / "out" / "os.img", old)
    assert v.verify(data=True).problems == []


def test_gc_brings_back_a_pack_in_use_found_in_the_trash(location: str, tmp_path: Path) -> None:
    """What such a race leaves (the index naming a pack that is in the trash only, a
    committed point using it): gc moves it back rather than empty the trash under it."""
    from cbt.format.pack import pack_id_of
    from cbt.repo.trash import move_to_trash

    v = cbt_api.Vault.init(location)
    disk = write_random_disk(tmp_path / "os.img", MIB, seed=33)
    point = v.backup("web", [f"os={disk}"])
    for name in [n for n in v.storage.list("packs") if n.endswith(".pack")]:
        move_to_trash(v.storage, pack_id_of(name))  # (the index still names them)
    time.sleep(2.2)
    dry = gc(v, grace=0, dry_run=True)
    assert any("it would be moved back" in w for w in dry.warnings), dry
    for _ in range(2):
        result = gc(v, grace=0)
        time.sleep(2.2)
    assert result.trash_emptied == 0 and v.storage.list("trash") == [], result
    v.restore(point.id, tmp_path / "out")
    assert_same_bytes(tmp_path / "out" / "os.img", disk)
    assert v.verify(data=True).problems == []
