"""`cbt stats` (issue 16): sizes, ratios and unique bytes, against truth computed here.

The truth comes from the images each point was made from (copies kept by the
test): the BLAKE3 of every non-zero 64 KiB block (a plain vault names blocks by
it), and each block's stored length from the packs' own trailers (read by
``helpers.packs``, not through cbt's index).  From those: per point the set of
blocks it holds; unique = the blocks no other visible point holds; new = the
blocks no earlier point of its VM holds; per VM likewise.  Then forgetting a
point with unique bytes and running gc lowers the referenced bytes by exactly
that much.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers.cli import cbt, cbt_json, one_error_line
from helpers.images import copy_disk, random_bytes, read, write_at, write_disk
from helpers.packs import _BLOB, pack_files, trailer_entries
from helpers.truth import block_digests, data_bytes

from cbt.api import Vault
from cbt.ops.prune import forget
from cbt.ops.stats import stats
from cbt.source.disks import DiskSpec

BS = 64 << 10
TOP = {"logical_bytes", "data_bytes", "stored_bytes", "referenced_bytes", "dedup_ratio",
       "compression_ratio", "compression", "vms", "points", "warnings"}
VM_KEYS = {"vm", "points", "logical_bytes", "data_bytes", "unique_bytes"}
POINT_KEYS = {"recovery_point", "vm", "created", "logical_bytes", "data_bytes",
              "stored_bytes", "new_bytes", "unique_bytes"}


def _block(seed: int, compressible: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    if compressible:  # a few distinct bytes repeated: zstd shrinks it
        return bytes(rng.integers(0, 4, BS, dtype=np.uint8))
    return rng.integers(0, 256, BS, dtype=np.uint8).tobytes()


@pytest.fixture
def history(tmp_path: Path) -> tuple[Path, dict[str, Path], list[str]]:
    return _build(tmp_path, Vault.init(tmp_path / "vault"))


def _build(tmp_path: Path, vault: Vault) -> tuple[Path, dict[str, Path], list[str]]:
    """web: 4 points (blocks changed each day; a zero block; a short last block); db: a
    copy of web's last disk plus one block of its own; solo: its own data."""
    web = tmp_path / "web.img"
    data = b"".join(_block(i, compressible=i % 2 == 0) for i in range(8))
    write_disk(web, np.frombuffer(data + bytes(BS) + _block(99)[:5000], dtype=np.uint8))
    truth: dict[str, Path] = {}
    order = []

    def backup(vm: str, disk: Path, day: int) -> None:
        pid = vault.backup(vm, [DiskSpec("os", str(disk))], block_size=BS, workers=1,
                           created=f"2026-05-{day:02d}T10:00:00Z").id
        truth[pid] = copy_disk(disk, tmp_path / "truth" / f"{pid}.img")
        order.append(pid)

    backup("web", web, 1)
    for day in (2, 3, 4):
        write_at(web, day * BS, _block(100 + day))
        backup("web", web, day)
    db = copy_disk(web, tmp_path / "db.img")
    write_at(db, 0, _block(200))
    backup("db", db, 5)
    solo = write_disk(tmp_path / "solo.img",
                      np.frombuffer(_block(300) + _block(301, True), dtype=np.uint8))
    backup("solo", solo, 6)
    return Path(vault.root), truth, order


def _stored_sizes(vault: Path) -> dict[bytes, tuple[int, int]]:
    """Digest -> (blob bytes in its pack, raw bytes), from the packs' trailers."""
    out = {}
    for pack in pack_files(vault):
        for digest, _off, stored, raw in trailer_entries(pack):
            out[digest] = (_BLOB.size + stored, raw)
    return out


def _truth(vault: Path, truth: dict[str, Path], visible: list[str]) -> dict[str, object]:
    sizes = _stored_sizes(vault)
    blocks = {p: set(block_digests(read(truth[p]), BS)) for p in visible}
    vm_of = {p: p.split(".")[0] for p in visible}
    points = {}
    for p in visible:
        others = set().union(*(blocks[q] for q in visible if q != p))
        earlier = set().union(*(blocks[q] for q in visible[:visible.index(p)]
                                if vm_of[q] == vm_of[p]))
        points[p] = {"logical_bytes": truth[p].stat().st_size,
                     "data_bytes": data_bytes(read(truth[p]), BS),
                     "stored_bytes": sum(sizes[b][0] for b in blocks[p]),
                     "new_bytes": sum(sizes[b][0] for b in blocks[p] - earlier),
                     "unique_bytes": sum(sizes[b][0] for b in blocks[p] - others)}
    vms = {}
    for vm in sorted(set(vm_of.values())):
        mine = set().union(*(blocks[p] for p in visible if vm_of[p] == vm))
        theirs = set().union(*(blocks[p] for p in visible if vm_of[p] != vm))
        vms[vm] = {"points": sum(vm_of[p] == vm for p in visible),
                   "unique_bytes": sum(sizes[b][0] for b in mine - theirs)}
    referenced = set().union(*blocks.values())
    raw = sum(sizes[b][1] for b in referenced)
    return {"points": points, "vms": vms,
            "stored_bytes": sum(s for s, _ in sizes.values()),
            "referenced_bytes": sum(sizes[b][0] for b in referenced),
            "data_bytes": sum(v["data_bytes"] for v in points.values()),
            "raw": raw}


def _check(got: dict[str, object], want: dict[str, object]) -> None:
    assert set(got) == TOP, got
    rows = {p["recovery_point"]: p for p in got["points"]}
    for p in got["points"]:
        assert set(p) == POINT_KEYS, p
    assert list(rows) == list(want["points"])
    for pid, w in want["points"].items():
        assert {k: rows[pid][k] for k in w} == w, pid
    vms = {v["vm"]: v for v in got["vms"]}
    for v in got["vms"]:
        assert set(v) == VM_KEYS, v
    for vm, w in want["vms"].items():
        assert {k: vms[vm][k] for k in w} == w, vm
    for k in ("stored_bytes", "referenced_bytes", "data_bytes"):
        assert got[k] == want[k], k
    assert got["dedup_ratio"] == pytest.approx(want["data_bytes"] / want["raw"])
    assert got["compression_ratio"] == pytest.approx(
        want["raw"] / want["referenced_bytes"])
    assert got["compression_ratio"] > 1.0, "half the blocks compress"
    assert got["dedup_ratio"] > 1.0


def test_stats_against_truth(history: tuple[Path, dict[str, Path], list[str]]) -> None:
    vault, truth, order = history
    want = _truth(vault, truth, order)
    got = cbt_json("stats", vault)
    _check(got, want)
    assert got["warnings"] == []
    assert got["logical_bytes"] == sum(truth[p].stat().st_size for p in order)
    # the first web point alone holds the original block 2 (3 and 4 live on in the
    # points of days 2 and 3); db is a copy of web's last point but for block 0
    uniques = [want["points"][p]["unique_bytes"] for p in order]
    assert uniques[0] > 0 and uniques[1:4] == [0, 0, 0] and uniques[4] > 0 and uniques[5] > 0


def test_forgetting_frees_its_unique_bytes(
        history: tuple[Path, dict[str, Path], list[str]]) -> None:
    """Forget the first web point (a base the others need: hidden), gc: the referenced
    bytes drop by its unique bytes; the new figures match the truth of what is left."""
    vault, truth, order = history
    before = stats(Vault.open(vault))
    unique = next(p.unique_bytes for p in before.points if p.recovery_point == order[0])
    forget(Vault.open(vault), [order[0]])
    r = cbt("gc", vault, "--grace", "0")
    assert r.returncode == 0, r.stderr
    after = cbt_json("stats", vault)
    assert after["referenced_bytes"] == before.referenced_bytes - unique
    _check(after, _truth(vault, truth, order[1:]))


def test_filters_human_output_and_map(history: tuple[Path, dict[str, Path], list[str]],
                                      tmp_path: Path) -> None:
    vault, _t, order = history
    whole = cbt_json("stats", vault)
    some = cbt_json("stats", vault, "--vm", "web", order[1][:-3], "web.latest")
    assert [p["recovery_point"] for p in some["points"]] == [order[1], order[3]]
    assert [v["vm"] for v in some["vms"]] == ["web"]
    assert {k: some[k] for k in TOP - {"vms", "points"}} == {
        k: whole[k] for k in TOP - {"vms", "points"}}, "totals are the whole vault's"
    r = cbt("stats", vault)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[2].split() == ["vm", "points", "logical", "data", "unique"]
    assert any(line.split()[:1] == [order[0]] for line in lines)
    r = cbt("stats", vault, "--map")
    assert r.returncode == 0, r.stderr
    bars = [line for line in r.stdout.splitlines() if "stored" in line and "new" in line
            and line.startswith("  ")]
    assert len(bars) == len(order)
    # web's first point: all new (full blocks only); its later ones mostly stored before
    first = next(b for b in bars if "2026-05-01" in b)
    assert "\u2592" not in first and "\u2588" in first
    assert "\u2592" in next(b for b in bars if "2026-05-02" in b)
    svg = tmp_path / "map.svg"
    r = cbt("stats", vault, "--map", svg)
    assert r.returncode == 0, r.stderr
    assert svg.read_text().lstrip().startswith(("<?xml", "<svg"))
    png = tmp_path / "map.png"
    assert cbt("stats", vault, "--map", png, "-q").stdout == ""
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_map_file_without_matplotlib_says_how(
        history: tuple[Path, dict[str, Path], list[str]], tmp_path: Path) -> None:
    """A matplotlib that cannot be imported (a stub package that raises ImportError, first
    on PYTHONPATH): one line naming the extra; no file."""
    vault, _t, _order = history
    stub = tmp_path / "stub" / "matplotlib"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    r = cbt("stats", vault, "--map", tmp_path / "m.png",
            env={"PYTHONPATH": str(tmp_path / "stub")})
    line = one_error_line(r)
    assert "pip install 'cbt[plot]'" in line, line
    assert not (tmp_path / "m.png").exists()
    # the terminal map and plain stats never load it
    assert cbt("stats", vault, "--map", env={"PYTHONPATH": str(tmp_path / "stub")}
               ).returncode == 0


def test_bad_input(history: tuple[Path, dict[str, Path], list[str]], tmp_path: Path) -> None:
    vault, _t, order = history
    assert "nosuch" in one_error_line(cbt("stats", vault, "nosuch"))
    assert "FILE.svg" in one_error_line(cbt("stats", vault, "--map", tmp_path / "m.txt"))
    assert "URL" in one_error_line(cbt("stats", vault, "--map", "s3://b/m.svg"))
    # a damaged point record: a warning, the rest counted
    rec = vault / "points" / f"{order[4]}.json"
    rec.write_text(rec.read_text()[:-20])
    got = cbt_json("stats", vault)
    assert any(str(rec) in w for w in got["warnings"]), got["warnings"]
    assert any("may be too high" in w for w in got["warnings"]), got["warnings"]
    assert order[4] not in {p["recovery_point"] for p in got["points"]}
    assert json.dumps(got)  # still one JSON object


def test_encrypted_vault_and_no_lock(history: tuple[Path, dict[str, Path], list[str]],
                                     tmp_path: Path) -> None:
    """The same history in an encrypted vault: the same logical and data bytes, ratios
    of dedup, points with unique bytes; more stored (each sealed blob carries its nonce
    and tag).  Stats runs while another command has the vault alone (it takes no lock)."""
    from helpers.vaults import PASSWORD, encrypted_env, fast_kdf

    from cbt.repo.lock import exclusive_lock
    from cbt.repo.stores import storage_at

    plain = cbt_json("stats", history[0])
    enc_root = tmp_path / "enc"
    enc_root.mkdir()
    vault = Vault.init(enc_root / "vault", encryption="aes-256-gcm",
                       passphrase=PASSWORD.encode(), kdf=fast_kdf())
    root, _truth, order = _build(enc_root, vault)
    env = encrypted_env(tmp_path)
    with exclusive_lock(storage_at(str(root))):  # (a prune, a key change: alone)
        enc = cbt_json("stats", root, env=env)
    for k in ("logical_bytes", "data_bytes", "dedup_ratio"):
        assert enc[k] == plain[k], k
    assert [p["recovery_point"] for p in enc["points"]] == order
    assert [p["unique_bytes"] > 0 for p in enc["points"]] == [
        p["unique_bytes"] > 0 for p in plain["points"]]
    assert enc["stored_bytes"] > plain["stored_bytes"]


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_empty_vault(tmp_path: Path, codec: str) -> None:
    Vault.init(tmp_path / "v", compression=codec)
    got = cbt_json("stats", tmp_path / "v")
    assert got == {"logical_bytes": 0, "data_bytes": 0, "stored_bytes": 0,
                   "referenced_bytes": 0, "dedup_ratio": None, "compression_ratio": None,
                   "compression": codec, "vms": [], "points": [], "warnings": []}
    for extra in ([], ["--map"]):
        r = cbt("stats", tmp_path / "v", *extra)
        assert r.returncode == 0 and r.stdout.splitlines()[-1] == "no recovery points", r


def test_a_backup_committing_meanwhile_is_no_warning(
        history: tuple[Path, dict[str, Path], list[str]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Stats takes no lock: a backup that commits while it runs (here: right after stats
    has loaded the index) is either counted whole or not at all, never 'blocks not in
    the index'."""
    vault, _truth, order = history
    disk = write_disk(tmp_path / "late.img",
                      np.frombuffer(_block(400) + _block(401), dtype=np.uint8))
    real = Vault.load_index
    late: list[str] = []

    def load_then_backup(self: Vault, *args: object, **kw: object) -> object:
        index = real(self, *args, **kw)  # type: ignore[arg-type]
        if not late:
            late.append("")  # (the backup loads the index too)
            late[0] = Vault.open(vault).backup("late", [DiskSpec("os", str(disk))],
                                               block_size=BS, workers=1).id
        return index

    monkeypatch.setattr(Vault, "load_index", load_then_backup)
    got = stats(Vault.open(vault))
    assert late and got.warnings == [], got.warnings
    assert [p.recovery_point for p in got.points] == order
    monkeypatch.setattr(Vault, "load_index", real)
    again = stats(Vault.open(vault))
    assert [p.recovery_point for p in again.points] == [*order, late[0]]
    assert again.warnings == []


def test_a_chart_that_cannot_be_written_whole_leaves_nothing(
        history: tuple[Path, dict[str, Path], list[str]], tmp_path: Path) -> None:
    """Files may grow to 4 KiB only (RLIMIT_FSIZE: the write fails with EFBIG part way):
    one error line, no half-written chart, and a chart already there is untouched."""
    import resource
    import subprocess

    from helpers.cli import cbt_argv, clean_env

    vault, _t, _order = history

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    mpl = {"MPLCONFIGDIR": str(tmp_path / "mpl")}
    old = tmp_path / "old.png"
    assert cbt("stats", vault, "--map", old, env=mpl).returncode == 0  # (font cache too)
    before = old.read_bytes()
    assert len(before) > 4096
    for path in (tmp_path / "new.png", old):
        r = subprocess.run(cbt_argv("stats", vault, "--map", path), capture_output=True,
                           text=True, env=clean_env(mpl), preexec_fn=small_files)
        line = one_error_line(r)
        assert line == f"cbt: error: File too large: {path}", line
    assert not (tmp_path / "new.png").exists()
    assert old.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if "png" in p.name) == ["old.png"]


def test_map_before_the_vault_says_how(
        history: tuple[Path, dict[str, Path], list[str]]) -> None:
    """'cbt stats --map VAULT' takes VAULT for the chart's file: the error line says how to
    ask for the terminal map; '--map -' before the vault draws it."""
    vault, _t, _order = history
    line = one_error_line(cbt("stats", "--map", vault))
    assert "'--map -'" in line, line
    r = cbt("stats", "--map", "-", vault)
    assert r.returncode == 0 and r.stdout.startswith("db  ("), r.stdout


def test_new_bytes_memory_does_not_grow_with_vms() -> None:
    """Step 4 on 200 VMs of two points each over an index of 4M entries: the new bytes
    match a set computation, and the peak memory is not one mask per VM (that was 200 x
    4 MB)."""
    import tracemalloc

    from cbt.ops.stats import PointStats, _new_bytes

    n = 4 << 20
    rng = np.random.default_rng(5)
    blob = rng.integers(1, 1000, n).astype(np.int64)
    rows, held = [], []
    groups: dict[str, list[int]] = {}
    for k in range(400):
        rows.append(PointStats(f"vm{k // 2}.p{k}", f"vm{k // 2}", "", 0, 0))
        held.append(np.unique(rng.integers(0, n, 50)))
        groups.setdefault(f"vm{k // 2}", []).append(k)
    tracemalloc.start()
    try:
        _new_bytes(rows, held, blob, groups)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * n, peak
    for k in range(0, 400, 2):
        first, second = set(held[k].tolist()), set(held[k + 1].tolist())
        assert rows[k].new_bytes == sum(int(blob[b]) for b in first)
        assert rows[k + 1].new_bytes == sum(int(blob[b]) for b in second - first)


def test_vm_latest_names_a_point_listed_when_a_backup_commits_meanwhile(
        history: tuple[Path, dict[str, Path], list[str]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """'web.latest' is the newest web point stats counts, even when another web backup
    commits while it runs (it used to be resolved last: that new point, listed nowhere,
    so nothing was listed)."""
    vault, truth, order = history
    disk = copy_disk(truth[order[3]], tmp_path / "web-now.img")
    write_at(disk, 0, _block(500))
    real = Vault.load_index
    done: list[bool] = []

    def load_then_backup(self: Vault, *args: object, **kw: object) -> object:
        index = real(self, *args, **kw)  # type: ignore[arg-type]
        if not done:
            done.append(True)  # (the backup loads the index too)
            Vault.open(vault).backup("web", [DiskSpec("os", str(disk))], block_size=BS,
                                     workers=1)
        return index

    monkeypatch.setattr(Vault, "load_index", load_then_backup)
    got = stats(Vault.open(vault), refs=["web.latest"])
    assert done and [p.recovery_point for p in got.points] == [order[3]]


@pytest.mark.parametrize(("columns", "longest"), [("1", 10), ("80", None), ("10000", 40)])
def test_terminal_map_fits_the_width(history: tuple[Path, dict[str, Path], list[str]],
                                     columns: str, longest: int | None) -> None:
    """$COLUMNS sets the bars' scale: 80 columns, every line fits; 1, the shortest bars
    (10 cells for the largest point; the lines wrap); 10000, at most 40 cells."""
    vault, _t, order = history
    r = cbt("stats", vault, "--map", env={"COLUMNS": columns})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    bars = [ln for ln in lines if ln.startswith("  ")]
    assert len(bars) == len(order)
    cells = [sum(ln.count(c) for c in "\u2588\u2592") for ln in bars]
    if longest is None:
        assert max(len(ln) for ln in lines) <= 80, lines
        assert 10 <= max(cells) <= 40
    else:
        assert max(cells) == longest, lines


@pytest.mark.parametrize(("days", "want"), [
    ([0.0], 1 / 3),
    ([], 1 / 3),
    ([h / 24 for h in range(6)], 0.7 / 24),  # hourly
    # daily, and a manual point 5 min after one: gaps 1, 5 min, 1 - 5 min, 1
    ([0.0, 1.0, 1.0 + 5 / 1440, 2.0, 3.0], 0.7 * (2 - 5 / 1440) / 2),
    ([2.0, 0.0, 1.0, 1.0], 0.7),  # unsorted, two at one time
])
def test_bar_width_follows_the_points_spacing(days: list[float], want: float) -> None:
    from cbt.cli.stats_cmd import bar_width

    assert bar_width(days) == pytest.approx(want)


def test_chart_of_hourly_points_has_bars_that_do_not_overlap(tmp_path: Path) -> None:
    """stats --map FILE for points an hour apart (an 'every 1h' schedule): one bar a point,
    each centred on its point's time, none covering the next (they were a third of a
    day wide: seven points under each), heights the points' new bytes; the byte axis
    in binary units."""
    import datetime as dt
    import itertools

    from matplotlib.dates import date2num

    from cbt.cli.stats_cmd import chart

    disk = write_disk(tmp_path / "os.img", random_bytes(256 << 10, 1))
    vault = Vault.init(tmp_path / "vault")
    hours = [0, 1, 2, 3, 5]
    for h in hours:
        write_at(disk, (h % 4) * (64 << 10), random_bytes(64 << 10, 10 + h).tobytes())
        vault.backup("web", [DiskSpec("os", str(disk))], workers=1,
                     created=f"2026-03-01T{h:02d}:00:00Z")
    s = stats(Vault.open(tmp_path / "vault"))
    fig = chart(s)
    ax = fig.axes[0]
    bars = sorted(ax.patches, key=lambda r: r.get_x())
    assert len(bars) == len(hours)
    at = [float(date2num(dt.datetime(2026, 3, 1, h, tzinfo=dt.UTC))) for h in hours]
    for bar, t in zip(bars, at, strict=True):
        assert bar.get_x() + bar.get_width() / 2 == pytest.approx(t)
        assert bar.get_width() == pytest.approx(0.7 / 24)
    for left, right in itertools.pairwise(bars):
        assert left.get_x() + left.get_width() < right.get_x()
    assert [b.get_height() for b in bars] == [p.new_bytes for p in s.points]
    fig.draw_without_rendering()  # (tick labels are made when drawn)
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert labels and all(x.endswith("iB") or x == "0 B" for x in labels), labels
