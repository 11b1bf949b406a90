"""gc on S3 against the server's clock, not this host's (``Storage.clock_offset``).

An S3 server stamps objects with its own clock, in whole seconds (truncated).
gc's cutoff (the running backup's start, taken from this host's clock) and its
trash grace period are compared with those stamps: a running backup's first
pack, written in the same second as its start, or while the server's clock is
behind this host's, must never look older than the backup; a pack trashed a
moment ago must stay in the trash for the grace period, whatever the skew.
(The host's clock is moved here, as the server's cannot be.)
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import blake3
import pytest
from helpers.s3 import S3Server, fresh_bucket

import cbt as cbt_api
from cbt.format.pack import PackWriter, pack_name
from cbt.ops.gc import gc
from cbt.repo.lock import exclusive_lock
from cbt.repo.storage import LocalStorage
from cbt.repo.trash import trash_name

HOURS = 3600.0


def _vault() -> cbt_api.Vault:
    return cbt_api.Vault.init(f"s3://{fresh_bucket()}/clock")


def _write_pack(v: cbt_api.Vault) -> str:
    """A pack as a backup writes it before its commit (no segment covers it yet)."""
    w = PackWriter()
    data = os.urandom(4096)
    w.add(blake3.blake3(data).digest(), data)
    v.storage.put(pack_name(w.pack_id), w.finish())
    return w.pack_id


def _host_ahead(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + seconds)


def test_the_server_clock_is_measured(s3_env: S3Server, monkeypatch: pytest.MonkeyPatch,
                                      tmp_path: Path) -> None:
    v = _vault()
    assert -2.5 < v.storage.clock_offset() <= 0.0  # (same clock; whole seconds)
    _host_ahead(monkeypatch, 2 * HOURS)
    assert -2 * HOURS - 2.5 < v.storage.clock_offset() <= -2 * HOURS
    assert not [n for n in v.storage.list("") if "clock" in n]  # (the probe is gone)
    assert LocalStorage(tmp_path).clock_offset() == 0.0  # (this host's clock)


def test_a_backups_first_pack_in_its_first_second_is_kept(s3_env: S3Server) -> None:
    """The server's mtime of a pack written 0.1-0.5 s after the backup took its lock is
    the whole second before: gc beside it must not take it for an older pack."""
    v = _vault()
    while not 0.1 < time.time() % 1 < 0.4:
        time.sleep(0.02)
    with exclusive_lock(v.storage):
        pid = _write_pack(v)
        assert v.storage.stat(pack_name(pid)).mtime < time.time() - 0.05  # (the premise)
        gc(v)
        assert v.storage.exists(pack_name(pid)), "gc trashed the running backup's pack"


def test_a_server_behind_this_host_keeps_a_running_backups_packs(
        s3_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """This host two hours ahead of the server: the running backup's packs are
    neither trashed nor (two hours being past the grace period) deleted."""
    v = _vault()
    _host_ahead(monkeypatch, 2 * HOURS)
    with exclusive_lock(v.storage):
        pid = _write_pack(v)
        result = gc(v)
        assert v.storage.exists(pack_name(pid)), f"gc took the running backup's pack: {result}"
        assert not v.storage.exists(trash_name(pid))


def test_a_pack_trashed_now_stays_for_the_grace_period_whatever_the_skew(
        s3_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dead pack trashed by gc (its trash time the server's now) stays in the trash
    when this host is two hours ahead (a reader that loaded the index before may
    still need it), and goes once the grace period is over in the server's time."""
    v = _vault()
    pid = _write_pack(v)  # a killed run's: dead
    time.sleep(2.2)  # (older than gc's cutoff, whole seconds and all)
    _host_ahead(monkeypatch, 2 * HOURS)
    result = gc(v)
    assert result.packs_removed == 1 and result.trash_emptied == 0, result
    assert v.storage.exists(trash_name(pid)) and not v.storage.exists(pack_name(pid))
    time.sleep(2.2)
    assert gc(v, grace=1.0).trash_emptied == 1
    assert not v.storage.exists(trash_name(pid))


def test_a_dry_run_writes_nothing(s3_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """gc --dry-run measures no clock (a probe is a write).  (Its gc lock is one still:
    the lock's object, part of the locks' own design.)"""
    from cbt.repo.s3 import S3Storage

    v = _vault()
    _write_pack(v)
    real = S3Storage.put

    def refused(self: S3Storage, name: str, data: Any) -> None:
        if name != "gc.lock":
            raise AssertionError(f"a dry run wrote {name}")
        real(self, name, data)
    monkeypatch.setattr(S3Storage, "put", refused)
    assert gc(v, dry_run=True).dry_run
