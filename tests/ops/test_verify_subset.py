"""``verify --read-data-subset`` (issue 16): ``n/m`` parts cover every pack once, ``N%``
reads about N% of the packs' bytes and moves on each window (by default each day; cbt
verify's runs: tests/cli/test_verify_rotation.py); packs outside the part are checked
by their trailers only.  Bytes are counted at the vault's storage.

A damaged block (a byte of its stored data flipped, its pack's trailer intact) is found
only by reading its data: exactly one of the m parts, and one of 100/N daily runs, finds
it.
"""

from __future__ import annotations

import json
import math
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
from hypothesis import given, settings
from hypothesis import strategies as st

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
def test_percent_reads_every_pack_once_a_cycle_and_moves_on_each_day(counted: Counted,
                                                                    percent: float) -> None:
    days = round(100 / percent)
    read: Counter[str] = Counter()
    finds = 0
    for day in range(20000, 20000 + days):
        r = counted.verify(subset=DataSubset.parse(f"{percent}%"), day=day)
        got = sum(counted.whole.values())
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
                                  "%", "1/2/3", "nan%", "inf%", "1_0/20", "1e-320%",
                                  "\u0661/\u0662", "1/1000001", "50", "-0%", "0.0%"])
def test_bad_subsets_are_refused(text: str) -> None:
    with pytest.raises(CbtValueError, match="not a data subset"):
        DataSubset.parse(text)


@pytest.mark.parametrize(("text", "want"), [("1/2", (1, 2, 0.0)), (" 3 / 4 ", (3, 4, 0.0)),
                                          ("1000000/1000000", (10**6, 10**6, 0.0)),
                                          ("12.5%", (0, 0, 12.5)), (".5 %", (0, 0, 0.5)),
                                          ("100%", (0, 0, 100.0))])
def test_good_subsets(text: str, want: tuple[int, int, float]) -> None:
    s = DataSubset.parse(text)
    assert (s.part, s.parts, s.percent) == want


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



def test_help_says_the_window_is_of_pack_ids() -> None:
    """verify --help (and so the man page) says what choose() does: a window of the pack
    ids, not of the packs' bytes (what an earlier version did, and --help still said)."""
    text = " ".join(cbt("verify", "--help").stdout.split())
    assert "a window of N% of the pack ids that moves on by N% each run" in text, text
    assert "packs' bytes" not in text

# -- coverage, for any packs (hypothesis) ------------------------------------------------------

_IDS = st.uuids().map(lambda u: u.hex)
_SIZES = st.dictionaries(_IDS, st.integers(1, 10**9), min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(sizes=_SIZES, m=st.integers(1, 50))
def test_property_n_of_m_reads_every_pack_exactly_once(sizes: dict[str, int], m: int) -> None:
    read: Counter[str] = Counter()
    for n in range(1, m + 1):
        read.update(DataSubset.parse(f"{n}/{m}").choose(sizes, 0))
    assert read == Counter(dict.fromkeys(sizes, 1))


@settings(max_examples=300, deadline=None)
@given(sizes=_SIZES, k=st.sampled_from([1, 2, 4, 5, 8, 10, 20, 50, 100]),
       day=st.integers(0, 400_000), small=st.booleans())
def test_property_percent_reads_every_pack_once_in_100_over_n_days(
        sizes: dict[str, int], k: int, day: int, small: bool) -> None:
    """N = 100/k: the k daily windows tile the ring, each pack's middle in exactly one of
    them (found by hypothesis with floats: packs read twice, or never, at the edges)."""
    if small:  # (small packs: many middles on the windows' edges)
        sizes = {p: 1 + n % 7 for p, n in sizes.items()}
    subset = DataSubset.parse(f"{100 / k}%")
    read: Counter[str] = Counter()
    for d in range(day, day + k):
        read.update(subset.choose(sizes, d))
    assert read == Counter(dict.fromkeys(sizes, 1))


@settings(max_examples=200, deadline=None)
@given(sizes=_SIZES, percent=st.sampled_from(["0.7", "3.3", "7", "30", "33.3", "45", "0.1"]),
       day=st.integers(0, 400_000))
def test_property_any_percent_covers_every_pack_in_its_cycle(
        sizes: dict[str, int], percent: str, day: int) -> None:
    subset = DataSubset.parse(f"{percent}%")
    read: set[str] = set()
    for d in range(day, day + math.ceil(100 / float(percent))):
        read |= subset.choose(sizes, d)
    assert read == set(sizes)


def test_percent_reads_about_that_share_of_many_packs() -> None:
    """About N% of the bytes a day: 20,000 packs of random ids and sizes, each day's share
    within 5 standard deviations of N% (a binomial draw of packs)."""
    import random

    rng = random.Random(16)
    sizes = {f"{rng.getrandbits(256):064x}": rng.randint(1, 8 << 20) for _ in range(20000)}
    total = sum(sizes.values())
    for percent, day in ((10.0, 20000), (2.5, 20417), (33.3, 20999)):
        got = sum(sizes[p] for p in DataSubset.parse(f"{percent}%").choose(sizes, day))
        share = percent / 100
        sd = math.sqrt(len(sizes) * share * (1 - share)) * total / len(sizes) * 1.3
        assert abs(got - share * total) < 5 * sd, (percent, got / total)


@settings(max_examples=200, deadline=None)
@given(old=_SIZES, new=st.lists(_SIZES, min_size=1, max_size=20),
       k=st.sampled_from([2, 4, 5, 10, 20]), day=st.integers(0, 400_000))
def test_property_a_growing_vault_still_reads_every_old_pack_in_a_cycle(
        old: dict[str, int], new: list[dict[str, int]], k: int, day: int) -> None:
    """New packs each day (found with places by bytes: old packs pushed past the window
    were never read in their cycle)."""
    subset = DataSubset.parse(f"{100 / k}%")
    sizes = dict(old)
    read: set[str] = set()
    for d in range(day, day + k):
        sizes.update(new[(d - day) % len(new)])
        read |= subset.choose(sizes, d)
    assert set(old) <= read
