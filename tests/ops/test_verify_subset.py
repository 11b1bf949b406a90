"""``verify --read-data-subset`` (issue 16): ``n/m`` parts cover every pack once, ``N%``
reads about N% of the packs' bytes and moves on each day; packs outside the part are
checked by their trailers only.  Bytes are counted at the vault's storage.

A damaged block (a byte of its stored data flipped, its pack's trailer intact) is found
only by reading its data: exactly one of the m parts, and one of 100/N daily runs, finds
it.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import KIB, MIB
from helpers.cli import cbt, one_error_line
from helpers.images import write_random_disk
from helpers.packs import pack_files, trailer_entries

import cbt.ops.backup as backup_mod
from cbt.api import Vault
from cbt.core.errors import CbtValueError
from cbt.ops.verify import DataSubset, VerifyResult, verify

BS = 64 * KIB
BLOB_HEADER = struct.calcsize("<4s32sBBHII")  # documented blob header


class Counted:
    """A vault whose storage counts the bytes read from each pack (whole or by range)."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(backup_mod, "TARGET_PACK_SIZE", 256 * KIB)
        self.dir = root / "vault"
        disk = write_random_disk(root / "d.img", 8 * MIB, seed=7)
        Vault.init(self.dir).backup("vm", [f"d={disk}"], block_size=BS, workers=1)
        self.packs = {f.stem: f.stat().st_size for f in pack_files(self.dir)}
        assert len(self.packs) >= 30, len(self.packs)
        self.whole: Counter[str] = Counter()  # pack id -> bytes read by get
        self.ranges: Counter[str] = Counter()  # pack id -> bytes read by range
        # the damaged block: a byte of the stored data of a pack's middle blob
        self.damaged = sorted(self.packs)[len(self.packs) // 2]
        f = next(p for p in pack_files(self.dir) if p.stem == self.damaged)
        _digest, offset, stored, _raw = trailer_entries(f)[1]
        data = bytearray(f.read_bytes())
        data[offset + BLOB_HEADER + stored // 2] ^= 0xFF
        f.write_bytes(bytes(data))

    def verify(self, **kw: Any) -> VerifyResult:
        self.whole.clear()
        self.ranges.clear()
        vault = Vault.open(self.dir)
        storage = vault.storage

        def counting(method: Callable[..., bytes], into: Counter[str]) -> Callable[..., bytes]:
            def read(name: str, *args: Any) -> bytes:
                out = method(name, *args)
                if name.startswith("packs/"):
                    into[Path(name).stem] += len(out)
                return out
            return read

        storage.get = counting(storage.get, self.whole)  # type: ignore[method-assign]
        storage.read_range = counting(storage.read_range,  # type: ignore[method-assign]
                                      self.ranges)
        return verify(vault, **kw)

    def found(self, result: VerifyResult) -> bool:
        return any(p.pack == self.damaged for p in result.problems)


@pytest.fixture
def counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Counted:
    return Counted(tmp_path, monkeypatch)


def test_without_data_only_trailers_are_read_and_the_damage_is_not_seen(
        counted: Counted) -> None:
    r = counted.verify()
    assert r.problems == [] and r.packs_data_checked == 0
    assert not counted.whole, counted.whole  # no pack read whole
    assert set(counted.ranges) == set(counted.packs)
    assert sum(counted.ranges.values()) < 0.05 * sum(counted.packs.values())
    everything = counted.verify(data=True)
    assert counted.found(everything) and len(everything.problems) == 1, everything.problems
    assert dict(counted.whole) == counted.packs  # every pack read once, whole


@pytest.mark.parametrize("m", [1, 3, 5])
def test_n_of_m_parts_cover_every_pack_once_and_find_the_damage_once(counted: Counted,
                                                                     m: int) -> None:
    read: Counter[str] = Counter()
    finds = 0
    for n in range(1, m + 1):
        r = counted.verify(subset=DataSubset.parse(f"{n}/{m}"))
        assert r.data_subset == f"{n}/{m}" and r.data
        read.update(counted.whole.keys())
        assert all(counted.whole[p] == counted.packs[p] for p in counted.whole)
        assert r.packs_data_checked == len(counted.whole)
        assert r.bytes_data_checked == sum(counted.whole.values())
        finds += counted.found(r)
        assert all(p.pack == counted.damaged for p in r.problems), r.problems
    assert finds == 1
    assert set(read) == set(counted.packs) and set(read.values()) == {1}, read


@pytest.mark.parametrize("percent", [25.0, 12.5])
def test_percent_reads_about_that_share_and_moves_on_each_day(counted: Counted,
                                                             percent: float) -> None:
    total = sum(counted.packs.values())
    biggest = max(counted.packs.values())
    days = round(100 / percent)
    read: Counter[str] = Counter()
    finds = 0
    for day in range(20000, 20000 + days):
        r = counted.verify(subset=DataSubset.parse(f"{percent}%"), day=day)
        got = sum(counted.whole.values())
        assert abs(got - percent / 100 * total) <= biggest, (got, total)
        assert r.bytes_data_checked == got
        read.update(counted.whole.keys())
        finds += counted.found(r)
    assert finds == 1
    assert set(read) == set(counted.packs) and set(read.values()) == {1}, read
    # the next day's part is the first day's again
    counted.verify(subset=DataSubset.parse(f"{percent}%"), day=20000)
    first = set(counted.whole)
    counted.verify(subset=DataSubset.parse(f"{percent}%"), day=20000 + days)
    assert set(counted.whole) == first


def test_progress_counts_the_pack_bytes(counted: Counted) -> None:
    seen: list[tuple[int, int]] = []
    counted.verify(subset=DataSubset.parse("1/2"), progress=lambda d, t: seen.append((d, t)))
    total = sum(counted.packs.values())
    assert seen[-1] == (total, total) and all(t == total for _d, t in seen)
    assert [d for d, _t in seen] == sorted(d for d, _t in seen)
    assert len(seen) == len(counted.packs) + 1


@pytest.mark.parametrize("text", ["0%", "100.5%", "-5%", "0/3", "4/3", "1/0", "a/b", "x",
                                  "%", "1/2/3", "nan%"])
def test_bad_subsets_are_refused(text: str) -> None:
    with pytest.raises(CbtValueError, match="not a data subset"):
        DataSubset.parse(text)


def test_cli_subset_and_its_errors(counted: Counted) -> None:
    r = cbt("verify", counted.dir, "--read-data-subset", "100%", "--json")
    assert r.returncode == 2, r  # (a problem)
    out = json.loads(r.stdout)
    assert out["data_subset"].startswith("100%") and out["packs_data_checked"] == len(
        counted.packs)
    assert out["problems"] and out["problems"][0]["pack"] == counted.damaged
    line = one_error_line(cbt("verify", counted.dir, "--read-data-subset", "5/4"))
    assert "not a data subset: '5/4'" in line, line
    plain = cbt("verify", counted.dir, "--read-data-subset", "1/1")
    assert plain.returncode == 2 and "data of part 1/1" in plain.stdout, plain
    for other in ("--data", "--repair"):
        line = one_error_line(cbt("verify", counted.dir, "--read-data-subset", "1/2", other))
        assert f"goes with neither {other}" in line, line
