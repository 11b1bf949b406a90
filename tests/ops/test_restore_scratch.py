"""A restore worker decodes each job into one of two scratch buffers and hands the job's
runs to its writer thread at the job's end; before it reuses a buffer it waits until the
runs that point into it are written.  Under a slow writer (the worker runs ahead), many
small jobs, lz4 / zstd / encrypted vaults, repeated blocks (``_repeats``), two disks,
incompressible (raw) blocks, the careful path after a failed fast path, and ``cbt mount``'s
reader threads: every byte restored or read is the disk's.  Truth: the disk bytes as
written here.  A control proves the set-up sensitive: without the wait it restores wrong
bytes."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.vaults import PASSWORD, fast_kdf

import cbt as cbt_api
import cbt.ops.backup as backup_mod
import cbt.ops.restore as restore_mod

BS = 4096


def _disk(path: Path, nblocks: int, seed: int, raw_share: float) -> bytes:
    rng = np.random.default_rng(seed)
    blocks = []
    for i in range(nblocks):
        r = rng.random()
        if r < 0.08:
            blocks.append(bytes(BS))  # zeros (a hole)
        elif r < 0.2 and blocks:
            blocks.append(blocks[int(rng.integers(len(blocks)))])  # a repeat (dedup: _repeats)
        elif r < 0.2 + raw_share:
            blocks.append(rng.bytes(BS))  # incompressible: stored raw
        else:
            blocks.append((f"disk {seed} block {i} ".encode() * 400)[:BS])  # unique, lz4-able
    data = b"".join(blocks) + (f"tail {seed} ".encode() * 500)[:1234]  # short last block
    path.write_bytes(data)
    return data


def _slow(monkeypatch: pytest.MonkeyPatch, delay: float = 0.003) -> list[int]:
    real = restore_mod._check_and_write
    calls: list[int] = []

    def slow(*a: Any, **kw: Any) -> None:  # the worker runs ahead of the writer
        time.sleep(delay)
        calls.append(1)
        return real(*a, **kw)
    monkeypatch.setattr(restore_mod, "_check_and_write", slow)
    return calls


def _make(tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch, raw_share: float
          ) -> tuple[cbt_api.Vault, str, dict[str, bytes]]:
    monkeypatch.setattr(backup_mod, "TARGET_PACK_SIZE", 24 * 1024)  # many small jobs
    disks = {n: tmp_path / f"{n}.img" for n in ("a", "b")}
    truth = {n: _disk(p, 300, seed, raw_share)
             for (n, p), seed in zip(disks.items(), (1, 2), strict=True)}
    if kind == "encrypted":
        v = cbt_api.Vault.init(tmp_path / "v", encryption="aes-256-gcm", passphrase=PASSWORD,
                               kdf=fast_kdf(), compression="lz4")
    else:
        v = cbt_api.Vault.init(tmp_path / "v", compression=kind)
    point = v.backup("vm", [f"{n}={p}" for n, p in disks.items()], block_size=BS, workers=1).id
    return v, point, truth


def _check(v: cbt_api.Vault, point: str, truth: dict[str, bytes], tmp_path: Path,
           workers: int) -> None:
    out = tmp_path / f"out{workers}"
    v.restore(point, out, workers=workers)
    for n, want in truth.items():
        (got,) = [p for p in out.iterdir() if p.name.startswith(n)]
        g = got.read_bytes()
        assert len(g) == len(want)
        if g != want:
            bad = [i for i in range(0, len(g), BS) if g[i:i + BS] != want[i:i + BS]]
            raise AssertionError(f"disk {n}: blocks differ: {[b // BS for b in bad][:20]}")


@pytest.mark.parametrize("kind,raw_share", [("lz4", 0.1), ("lz4", 0.5), ("zstd", 0.8),
                                            ("encrypted", 0.2)])
@pytest.mark.parametrize("workers", [1, 2])
def test_slow_writer_bit_for_bit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str,
                                 raw_share: float, workers: int) -> None:
    v, point, truth = _make(tmp_path, kind, monkeypatch, raw_share)
    calls = _slow(monkeypatch)
    if workers == 1:
        monkeypatch.setattr(restore_mod, "ISOLATE", False)  # in this process: counted
    # count jobs that took the one-call fast path
    real_dp, fast_jobs = restore_mod._decode_plain, []  # type: ignore[var-annotated]
    monkeypatch.setattr(restore_mod, "_decode_plain",
                        lambda *a: fast_jobs.append(1) or real_dp(*a))
    _check(v, point, truth, tmp_path, workers)
    if workers == 1:
        assert len(calls) > 20, len(calls)
    if kind != "encrypted" and workers == 1:
        assert len(fast_jobs) > 10, len(fast_jobs)


def test_careful_path_after_failed_fast_path(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """decode_check decodes every job into scratch but claims every third job failed (as
    a block ours refuses and the lz4 package decodes would): the job then takes the
    careful path after the fast path wrote into the scratch buffer. Slow writer."""
    v, point, truth = _make(tmp_path, "lz4", monkeypatch, 0.1)
    real, seen = restore_mod.fast.decode_check, []  # type: ignore[var-annotated]

    def flaky(*a: Any, **kw: Any) -> tuple[int, int]:
        got = real(*a, **kw)
        seen.append(1)
        return (0, 2) if len(seen) % 3 == 0 else got
    monkeypatch.setattr(restore_mod.fast, "decode_check", flaky)
    _slow(monkeypatch)
    monkeypatch.setattr(restore_mod, "ISOLATE", False)
    _check(v, point, truth, tmp_path, 1)
    assert len(seen) > 10


@pytest.mark.parametrize("kind", ["lz4", "encrypted"])
def test_control_no_wait_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   kind: str) -> None:
    """Sensitivity control: with _Writer.wait made a no-op (the worker reuses a scratch
    buffer at once), this same set-up must restore wrong bytes; else the tests above
    prove nothing: wrong blocks, or a digest error."""
    v, point, truth = _make(tmp_path, kind, monkeypatch, 0.1)
    _slow(monkeypatch, 0.02)
    monkeypatch.setattr(restore_mod, "ISOLATE", False)
    monkeypatch.setattr(restore_mod._Writer, "wait", lambda self, ticket: None)
    with pytest.raises((AssertionError, restore_mod.DamagedPointError)):
        _check(v, point, truth, tmp_path, 1)


@pytest.mark.parametrize("kind", ["lz4", "zstd", "encrypted"])
def test_mount_reader_threads_bit_for_bit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          kind: str) -> None:
    """cbt mount's reader (read_verified into a thread-local scratch): 6 threads reading
    random ranges at once, read-ahead on, a small cache (evictions): every read exact."""
    from cbt.ops.mount import BlockCache, DiskReader, Shared

    _, point, truth = _make(tmp_path, kind, monkeypatch, 0.3)
    opened = (cbt_api.Vault.open(tmp_path / "v") if kind != "encrypted"
              else cbt_api.Vault.open(tmp_path / "v", passphrase=PASSWORD))
    shared = Shared(opened, opened.load_index(headers=True), BlockCache(64 * 1024),
                    read_ahead=64 * 1024)
    errors: list[tuple[str, int, int]] = []
    try:
        readers = {n: DiskReader(shared, opened.point(point), n) for n in truth}

        def work(seed: int) -> None:
            rng = np.random.default_rng(seed)
            for _ in range(150):
                n = "ab"[int(rng.integers(2))]
                size = len(truth[n])
                a, ln = int(rng.integers(size)), int(rng.integers(1, 64 * 1024))
                got = readers[n].read(a, ln)
                if bytes(got) != truth[n][a:a + ln]:
                    errors.append((n, a, ln))
        ts = [threading.Thread(target=work, args=(s,)) for s in range(6)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    finally:
        shared.close()
    assert not errors, errors[:5]
