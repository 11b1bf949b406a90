"""gc settles: a pack whose blocks are all live is never rewritten.

A pack of a few very compressible blocks is mostly its own header and trailer,
so its live bytes are under half its size; rewriting it gives the same pack
again.  gc did that on every run, forever (a new pack, a new index segment, the
old pack trashed, "bytes freed" that were not), on a directory and on S3.
"""

from __future__ import annotations

import time
from pathlib import Path

import cbt as cbt_api
from cbt.ops.gc import gc


def test_a_pack_all_live_is_left_alone(location: str, tmp_path: Path) -> None:
    disk = tmp_path / "os.img"
    disk.write_bytes(b"\x11" * 16384)  # one block, compressed to a few bytes
    v = cbt_api.Vault.init(location)
    point = v.backup("web", [f"os={disk}"])
    packs = sorted(n for n in v.storage.list("packs") if n.endswith(".pack"))
    time.sleep(2.2)  # (older than gc's cutoff, S3's whole-second mtimes and all)
    for _ in range(2):
        result = gc(v, grace=0)
        assert result.packs_rewritten == 0 and result.bytes_freed == 0, result
    assert sorted(n for n in v.storage.list("packs") if n.endswith(".pack")) == packs
    assert v.storage.list("trash") == []
    v.restore(point.id, tmp_path / "out")
    assert (tmp_path / "out" / "os.img").read_bytes() == disk.read_bytes()
