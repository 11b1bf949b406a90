"""Restore from S3 runs on threads (obstore's do not survive a fork): when one of
them fails, or the caller is interrupted, the others stop at their next pack
instead of reading and writing the rest of theirs first; nothing is left at the
target."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
from helpers import MIB
from helpers.images import assert_same_bytes, write_random_disk
from helpers.s3 import S3Server, fresh_bucket

import cbt as cbt_api
from cbt.core.errors import CbtIOError
from cbt.ops import backup as backup_mod
from cbt.ops import restore as restore_mod

PACK = 256 << 10  # small packs: many jobs per worker


def _point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[cbt_api.Vault, str, Path]:
    v = cbt_api.Vault.init(f"s3://{fresh_bucket()}/stops")
    disk = write_random_disk(tmp_path / "os.img", 8 * MIB, seed=7)
    with monkeypatch.context() as m:
        m.setattr(backup_mod, "TARGET_PACK_SIZE", PACK)
        point = v.backup("web", [f"os={disk}"])
    assert len([n for n in v.storage.list("packs") if n.endswith(".pack")]) >= 24
    return v, point.id, disk


def _spy(monkeypatch: pytest.MonkeyPatch, fail: BaseException | None) -> list[str]:
    """Count the packs read; the first read raises ``fail`` (a pack that could not be
    read), or (None) this process is sent SIGINT then (Ctrl-C: KeyboardInterrupt in
    the main thread, waiting for the workers)."""
    calls: list[str] = []
    guard = threading.Lock()
    real = restore_mod._read_job

    def read_job(vault: Any, job: Any, *rest: Any) -> Any:
        with guard:
            calls.append(job.pack)
            first = len(calls) == 1
        if first and fail is not None:
            raise fail
        if first:
            os.kill(os.getpid(), signal.SIGINT)
        return real(vault, job, *rest)
    monkeypatch.setattr(restore_mod, "_read_job", read_job)
    return calls


@pytest.mark.parametrize("fail", [CbtIOError(5, "cannot read pack: injected"), None],
                         ids=["error", "sigint"])
def test_one_worker_failing_stops_the_others(s3_env: S3Server, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              fail: BaseException | None) -> None:
    v, point, disk = _point(tmp_path, monkeypatch)
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        calls = _spy(m, fail)
        with pytest.raises(KeyboardInterrupt if fail is None else type(fail)):
            v.restore(point, out, workers=4)
    # each of the 3 others may finish the pack it had begun, and no more; a Ctrl-C is acted
    # on by the main thread, woken at once but scheduled when the kernel runs it, during
    # which each may begin one more (of 32: without the stop, all are read)
    assert len(calls) <= 1 + 3 * (2 if fail is not None else 3), \
        f"{len(calls)} packs read after the failure"
    assert not out.exists() or list(out.iterdir()) == [], list(out.iterdir())
    v.restore(point, out, workers=4)  # (and then it works)
    assert_same_bytes(out / "os.img", disk)
