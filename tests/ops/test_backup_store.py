"""Which blocks a backup worker stores (``cbt.ops.backup._Store``), when a disk read live
changes between its hashing and its copy: the point records what was copied, and
every block it names is stored.

The truth is the ``blake3`` package on the bytes the test itself wrote.
"""

from __future__ import annotations

import blake3
import numpy as np
import pytest

from cbt.core.native import fast
from cbt.ops.backup import _Store
from cbt.repo.index import Index

BS = 4096


class _Sink:
    """Collects what the store hands on, in order."""

    def __init__(self) -> None:
        self.blocks: list[tuple[bytes, bytes]] = []

    def add_many(self, blocks: list[tuple[bytes, bytes]]) -> None:
        self.blocks.extend(blocks)


def _block(byte: int) -> bytes:
    return bytes([byte]) * (BS - 1) + b"\1"


@pytest.mark.parametrize("pick_blocks", [1, 2, 64])
def test_a_live_block_changed_under_the_read_is_stored_as_copied(
        monkeypatch: pytest.MonkeyPatch, pick_blocks: int) -> None:
    """Rows 0 and 2 held A when hashed; row 0 now holds C (changed under the read), row 2
    still A; row 1 held B, row 3 now holds zeros.  The store keeps what it copies:
    C for row 0, A for row 2 (it is no longer stored by row 0), B, and row 3 is a ZERO
    row; each block is stored once, under its own BLAKE3."""
    monkeypatch.setattr("cbt.ops.backup.PICK_BYTES", pick_blocks * BS)
    a, b, c, d = _block(1), _block(2), _block(3), _block(4)
    zero = bytes(BS)
    hashed = [a, b, a, d]  # what the digests were taken of
    now = c + b + a + zero  # what the window holds when the blocks are copied
    digests = np.array([np.frombuffer(blake3.blake3(x).digest(), np.uint8) for x in hashed])
    flags = np.full(4, fast.FLAG_DATA, dtype=np.uint8)
    sink = _Sink()
    store = _Store(Index.empty(), BS, rehash=True)
    store.missing(sink, digests, flags, [(0, memoryview(now))])

    stored = dict(sink.blocks)
    assert len(sink.blocks) == len(stored) == 3
    assert stored == {blake3.blake3(x).digest(): x for x in (a, b, c)}
    assert [digests[k].tobytes() for k in range(3)] == [blake3.blake3(x).digest()
                                                        for x in (c, b, a)]
    assert flags.tolist() == [fast.FLAG_DATA] * 3 + [fast.FLAG_ZERO]
    assert not digests[3].any()


def test_blocks_of_a_snapshot_are_stored_once_each() -> None:
    """Not read live: no second hash; a digest seen twice is stored once."""
    a, b = _block(5), _block(6)
    digests = np.array([np.frombuffer(blake3.blake3(x).digest(), np.uint8) for x in (a, b, a)])
    flags = np.full(3, fast.FLAG_DATA, dtype=np.uint8)
    sink = _Sink()
    _Store(Index.empty(), BS, rehash=False).missing(sink, digests, flags,
                                                   [(0, memoryview(a + b + a))])
    assert sink.blocks == [(blake3.blake3(a).digest(), a), (blake3.blake3(b).digest(), b)]
