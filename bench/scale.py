#!/usr/bin/env python3
"""Peak memory and time of cbt's commands as the vault grows (issue 18's baseline).

Usage::

    python bench/scale.py [--scales 0,1M,4M,16M] [--disk-size 64M] [--block-size 64K]
                          [--dir /var/tmp/cbt-bench/scale] [--encrypted] [--runs 1]
                          [--segment-entries 1M] [--keep] [--json] [--cbt PATH]
    python bench/scale.py --legacy ...   (the Arrow segments of before: the baseline)
    python bench/scale.py --profile [--scales 4M] ...   (where a backup's memory goes)

Every command works on the same small disk; only the number of blocks the vault
already stores changes, so any growth of a figure with the scale is the cost of
the vault's size, not of the work asked for.

1. Vaults: one per scale (and encryption) in ``--dir``, made once and reused
   while its recipe holds (``recipe.json``, written last: a vault without it,
   or with another recipe (another segment format version too), is made
   again).  Its stored blocks are synthetic index entries
   (:func:`write_paged_entries`) written as *paged* index segments by cbt's own
   streaming writer (:func:`cbt.repo.segments.write_paged` under
   ``Vault.segment_name``, with the vault's cipher: sealed page by page in an
   encrypted vault), so that 16M entries are never in memory at once:

   a. The segment sizes are those size-tiered compaction leaves behind
      (:func:`paged_layout`): the entry count in base ``TIER`` of ``BASE``
      entries, at most ``WIDTH - 1`` segments a tier, so no backup of the run
      merges them (a vault of that size would have been compacted so long ago).
   b. Segment ``i`` of ``m`` entries: numpy's generator seeded ``[seed, i]``
      draws ``m`` uint64 and sorts them: the ids' first 8 bytes (big-endian;
      one more than the one before where two collide, so strictly ascending);
      then ``ceil(m / PACK_ENTRIES) * 16`` bytes: the packs' uuids, entry ``j``
      in pack ``j // PACK_ENTRIES``.  The other 24 id bytes are words 1..3 of
      :func:`mix` (splitmix64's finalizer) of ``prefix + w``, the stored
      length ``RAW // 3 + mix(prefix + 4) % (RAW - RAW // 3 + 1)``, the raw
      length ``RAW``, the offset the pack header plus the blobs (and their
      headers) before it in its pack.  Entries go to the writer
      :data:`WRITE_CHUNK` at a time.

   ``--legacy`` writes the older Arrow segments instead (:func:`write_entries`:
   random ids, ``--segment-entries`` a segment, fewer than the old merge
   threshold), the baseline before paged segments: today's backup merges those
   into a paged segment on its first run.  The packs either kind names do not
   exist: no point references them, so backup, restore, list, show, diff and
   verify never open them (verify counts them as unreferenced bytes; gc skips a
   pack it cannot find).
2. Each run works on a clone of the vault: a new directory of hard links to
   its files (cbt never writes into an existing file: it writes a new name and
   renames), so the backups, gc and lock files of a run never change the
   cached vault, whose files are also read-only.
3. In the clone: a full backup of the disk (``--disk-size`` of seeded random
   bytes), 1% of its blocks rewritten, an incremental backup, a restore of
   that point (checked equal to the disk), ``list``, ``show``, ``diff`` of the
   two points, ``verify`` (metadata), then ``verify --data`` and ``gc``
   (flagged: they may stream, with their own bound).
4. Each command is its own process run under GNU time (``/usr/bin/time -f
   %M``: the peak RSS of the largest process, cbt or a forked worker it
   waited for, as ``wait4`` reports it); meanwhile its process tree is
   sampled every 20 ms (``VmHWM`` of each descendant in ``/proc``), which
   also catches a worker nobody waited for.  The larger of the two counts.
   Wall time around the whole process.  With ``--runs`` N, the median.
5. Report: a markdown table (scale, command, peak RSS, time, and the RSS
   above the empty vault's per million stored blocks), or ``--json``.

``--profile`` instead opens each scale's vault in a fresh process and steps
through what a command does with its index (open it: each segment's head;
look up new ids; stream every entry, as verify and gc do), printing after each
step the RSS, the peak within it (``/proc/self/clear_refs`` resets the peak),
what Arrow's memory pool holds and what tracemalloc traces (Python and numpy),
then the bytes the open segments' heads hold.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import harness
import numpy as np
import numpy.typing as npt

from cbt.format.index_segment import INDEX_VERSION, segment_bytes
from cbt.format.pack import BLOB, HEADER
from cbt.format.paged_index import PAGED_VERSION
from cbt.repo import compact
from cbt.repo.index import MERGE_AT
from cbt.repo.segments import write_paged
from cbt.repo.vault import PAGED, Vault

PACK_ENTRIES = 2000  # entries per synthetic pack (a pack of ~8 MiB of 4 KiB blocks)
RAW = 4096  # each synthetic block's size before compression
MAX_SEGMENTS = MERGE_AT - 3  # the run's two backups add two segments: no merge
SEGMENT_ENTRIES = 1_000_000  # per legacy segment: 16M entries are never in memory at once
WRITE_CHUNK = 64 * PACK_ENTRIES  # entries handed to a paged writer at once (whole packs)
PASSPHRASE = "scale-bench"
SEED = 18
VM = "scale"
GNU_TIME = "/usr/bin/time"
SAMPLE = 0.02  # seconds between two samples of a command's process tree
STREAMING = ("verify_data", "gc")
COMMANDS = {  # key -> what the table says
    "backup_full": "backup (full)", "backup_incr": "backup (incremental, 1%)",
    "restore": "restore", "list": "list", "show": "show", "diff": "diff of the two points",
    "verify": "verify (metadata)", "verify_data": "verify --data", "gc": "gc"}


# --------------------------------------------------------------------------- the vaults

def synthetic_chunk(seed: int, chunk: int, count: int) -> dict[str, Any]:
    """``count`` synthetic index entries, the same for the same (seed, chunk): random
    ids, in packs of :data:`PACK_ENTRIES` (random pack uuids) one blob after another."""
    rng = np.random.default_rng([seed, chunk])
    digests = np.frombuffer(rng.bytes(count * 32), dtype=np.uint8).reshape(count, 32)
    npacks = -(-count // PACK_ENTRIES)
    uuids = np.frombuffer(rng.bytes(npacks * 16), dtype=np.uint8).reshape(npacks, 16)
    which = np.arange(count) // PACK_ENTRIES
    stored = rng.integers(RAW // 3, RAW + 1, count, dtype=np.uint32)  # zstd's spread
    # offset of a blob = the pack header + the blobs before it in its pack
    ends = np.cumsum(stored.astype(np.uint64) + BLOB.size)
    starts = np.concatenate(([0], ends[:-1])).astype(np.uint64)
    first = starts[which * PACK_ENTRIES] if count else starts
    return {"digests": digests, "pack_uuid": uuids[which],
            "offset": starts - first + HEADER.size, "stored": stored,
            "raw": np.full(count, RAW, dtype=np.uint32)}


def segment_size(n: int, per_segment: int) -> int:
    """Entries per segment: ``per_segment``, or more when that would make more segments
    than :data:`MAX_SEGMENTS`."""
    return max(per_segment, -(-n // MAX_SEGMENTS), 1)


def legacy_name(vault: Vault, run: str) -> str:
    """The name a legacy (Arrow) segment of ``run`` had: ``Vault.segment_name`` names
    paged ones now."""
    name = vault.segment_name(run)
    return name[:-len(PAGED)] + (".sealed" if vault.encrypted else ".arrow")


def write_entries(vault: Vault, n: int, seed: int = SEED,
                  per_segment: int = SEGMENT_ENTRIES) -> list[str]:
    """Store ``n`` synthetic entries in ``vault``'s index, as segments of
    :func:`segment_size` entries (chunk ``i`` is ``synthetic_chunk(seed, i, ...)``);
    the segments' names.  The one step that knows the segment format."""
    size = segment_size(n, per_segment)
    names = []
    for i, start in enumerate(range(0, n, size)):
        name = legacy_name(vault, f"synthetic-{i:04d}")
        vault.put_sealed("index", name, segment_bytes(synthetic_chunk(seed, i, min(size,
                                                                             n - start))))
        names.append(name)
    return names


def mix(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """splitmix64's finalizer: 64 well-mixed bits of each ``x`` (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def paged_layout(n: int) -> list[int]:
    """Segment sizes for ``n`` entries as size-tiered compaction leaves them: ``n`` in
    base ``compact.TIER``, a segment per unit of a digit of tier 1 and up (so at most
    ``WIDTH - 1`` a tier), what is left below tier 1 added to the largest (which so stays
    alone in its tier, or moves one up, alone too); largest first.  Tier 0 is left
    empty: the run's two backups add a segment each there, and merge nothing."""
    if n <= 0:
        return []
    unit = compact.BASE * compact.TIER  # the entries of the smallest tier-1 segment
    units, sizes, size = n // unit, [], unit
    while units:
        sizes += [size] * (units % compact.TIER)
        units //= compact.TIER
        size *= compact.TIER
    sizes = sorted(sizes, reverse=True) or [0]
    sizes[0] += n % unit
    return sizes


def paged_chunks(seed: int, segment: int, count: int) -> Iterator[dict[str, Any]]:
    """The synthetic entries of paged segment ``segment`` (``count`` of them, step 1b of
    the module doc), ascending by id, :data:`WRITE_CHUNK` at a time."""
    rng = np.random.default_rng([seed, segment])
    prefix = np.sort(rng.integers(0, 2**64, count, dtype=np.uint64, endpoint=False))
    for j in np.nonzero(prefix[1:] <= prefix[:-1])[0].tolist():  # (almost never any)
        prefix[j + 1] = prefix[j] + np.uint64(1)
    uuids = np.frombuffer(rng.bytes(-(-count // PACK_ENTRIES) * 16),
                          dtype=np.uint8).reshape(-1, 16)
    for at in range(0, count, WRITE_CHUNK):  # (a multiple of PACK_ENTRIES: whole packs)
        p = prefix[at:at + WRITE_CHUNK]
        k = len(p)
        words = [p] + [mix(p + np.uint64(w)) for w in (1, 2, 3)]
        digests = np.stack(words, axis=1).astype(">u8").view(np.uint8).reshape(k, 32)
        stored = (RAW // 3 + mix(p + np.uint64(4)) % np.uint64(RAW - RAW // 3 + 1)
                  ).astype(np.uint32)
        which = (at + np.arange(k)) // PACK_ENTRIES
        ends = np.cumsum(stored.astype(np.uint64) + BLOB.size)
        starts = np.concatenate(([0], ends[:-1])).astype(np.uint64)
        first = starts[np.arange(k) // PACK_ENTRIES * PACK_ENTRIES]  # its pack's first
        yield {"digests": digests, "pack_uuid": uuids[which],
               "offset": starts - first + np.uint64(HEADER.size), "stored": stored,
               "raw": np.full(k, RAW, dtype=np.uint32)}


def write_paged_entries(vault: Vault, n: int, seed: int = SEED) -> list[str]:
    """Store ``n`` synthetic entries in ``vault``'s index as paged segments laid out by
    :func:`paged_layout`, each streamed through cbt's own writer; their names."""
    names = []
    for i, count in enumerate(paged_layout(n)):
        name = vault.segment_name(f"synthetic-{i:04d}")
        write_paged(vault, name, paged_chunks(seed, i, count), count)
        hold_a_pack(vault, name)
        names.append(name)
    return names


def hold_a_pack(vault: Vault, segment: str) -> None:
    """An empty file under the name of the segment's first pack: the index ignores a
    segment none of whose packs the vault holds (one copied from another vault), and the
    synthetic packs are never written (no point references them)."""
    from cbt.format.pack import pack_name
    from cbt.repo.index import open_paged

    vault.storage.put(pack_name(open_paged(vault.storage, segment, vault.cipher).pack_ids[0]),
                      b"")


def recipe(n: int, encrypted: bool, per_segment: int, legacy: bool = False) -> dict[str, Any]:
    if legacy:
        return {"entries": n, "seed": SEED, "encrypted": encrypted,
                "pack_entries": PACK_ENTRIES, "segment_entries": segment_size(n, per_segment),
                "index_version": INDEX_VERSION}
    return {"entries": n, "seed": SEED, "encrypted": encrypted, "pack_entries": PACK_ENTRIES,
            "format": "paged", "paged_version": PAGED_VERSION, "layout": paged_layout(n),
            "holds_a_pack": True,
            "recipe": 1}


def build_vault(where: Path, n: int, encrypted: bool = False,
                per_segment: int = SEGMENT_ENTRIES, kdf: Any = None,
                legacy: bool = False) -> Path:
    """The vault ``where/vault`` holding ``n`` synthetic stored blocks (in paged segments,
    or legacy ones), made unless ``where/recipe.json`` says it is made already with this
    recipe."""
    want = recipe(n, encrypted, per_segment, legacy)
    stamp = where / "recipe.json"
    with contextlib.suppress(OSError, ValueError):
        if json.loads(stamp.read_text()) == want:
            return where / "vault"
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    vault = Vault.init(where / "vault", "aes-256-gcm" if encrypted else "none",
                       PASSPHRASE if encrypted else None, kdf)
    names = (write_entries(vault, n, SEED, per_segment) if legacy
             else write_paged_entries(vault, n, SEED))
    for name in names:
        os.chmod(where / "vault" / name, 0o444)  # (a clone's hard link must stay as is)
    stamp.write_text(json.dumps(want))
    return where / "vault"


def vault_dir(n: int, args: argparse.Namespace) -> str:
    """The directory (in ``--dir``) of the vault of ``n`` stored blocks for ``args``."""
    return (f"{label(n)}{'-enc' if args.encrypted else ''}"
            f"{'-legacy' if args.legacy else ''}")


def clone(src: Path, dst: Path) -> None:
    """``dst``: the tree of ``src``, its files hard links."""
    for dirpath, _dirs, names in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in names:
            os.link(Path(dirpath) / name, dst / rel / name)


def parse_count(text: str) -> int:
    """``16M`` -> 16_000_000 (a million blocks, not MiB), ``50k``, ``0``."""
    t = text.strip().lower()
    mult = {"k": 1000, "m": 1_000_000}.get(t[-1:], 1)
    return int(float(t[:-1] if mult > 1 else t) * mult)


def label(n: int) -> str:
    if n and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n and n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


# --------------------------------------------------------------------------- measuring

def _descendants(root: int) -> list[int]:
    """Every process below ``root`` (from each process's parent in ``/proc``)."""
    parent: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                parent.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        kids = parent.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _hwm(pid: int) -> int:
    """The peak RSS of ``pid`` so far, bytes (0 when gone)."""
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class Sampler(threading.Thread):
    """The largest peak RSS among the descendants of ``pid`` while it runs."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.processes = pid, 0, set[int]()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(SAMPLE):
            for p in _descendants(self.pid):
                self.processes.add(p)
                self.peak = max(self.peak, _hwm(p))


def measure(argv: list[str], env: dict[str, str], scratch: Path,
            ok: tuple[int, ...] = (0,)) -> dict[str, Any]:
    """Run ``argv`` under GNU time: wall seconds, peak RSS (GNU time's and sampled), the
    processes seen, and its stdout."""
    out = scratch / "time.out"
    started = time.perf_counter()
    proc = subprocess.Popen([GNU_TIME, "-f", "%M", "-o", str(out), *argv], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    sampler = Sampler(proc.pid)
    sampler.start()
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - started
    sampler.done.set()
    sampler.join()
    if proc.returncode not in ok:
        tail = stderr.decode(errors="replace").strip()[-2000:]
        raise harness.BenchError(f"{shlex.join(argv)} exited {proc.returncode}: {tail}")
    gnu = int(out.read_text().split()[-1]) * 1024
    out.unlink()
    return {"seconds": seconds, "peak_rss": max(gnu, sampler.peak), "gnu_time_rss": gnu,
            "sampled_rss": sampler.peak, "processes": len(sampler.processes),
            "stdout": stdout.decode(errors="replace")}


def change_blocks(path: Path, block: int, share: float, seed: int) -> int:
    """Rewrite ``share`` of the blocks of ``path`` (at least one) with random bytes."""
    size = path.stat().st_size
    nblocks = -(-size // block)
    rng = np.random.default_rng(seed)
    picked = rng.choice(nblocks, max(1, round(nblocks * share)), replace=False)
    with open(path, "r+b") as f:
        for b in sorted(picked.tolist()):
            f.seek(b * block)
            f.write(rng.bytes(min(block, size - b * block)))
    return len(picked)


def one_run(cbt: str, cached: Path, disk0: Path, work: Path, block: int,
            env: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Step 2 and 3 of the module doc in ``work`` (made here, removed by the caller)."""
    vault, disk, restored = work / "vault", work / "disk.img", work / "restored.img"
    clone(cached, vault)
    shutil.copyfile(disk0, disk)
    v = str(vault)
    got: dict[str, dict[str, Any]] = {}
    backup = [cbt, "backup", v, "--vm", VM, f"d={disk}", "--block-size", str(block), "-q"]
    got["backup_full"] = measure(backup, env, work)
    change_blocks(disk, block, 0.01, SEED)
    got["backup_incr"] = measure(backup, env, work)
    got["restore"] = measure([cbt, "restore", v, f"{VM}.latest", "--disk", "d", "--to",
                              str(restored), "-q"], env, work)
    if not same_file(disk, restored):
        raise harness.BenchError(f"the restored disk differs from {disk}")
    got["list"] = measure([cbt, "list", v, "--json"], env, work)
    points = [p["recovery_point"] for p in json.loads(got["list"]["stdout"])["points"]]
    if len(points) != 2:
        raise harness.BenchError(f"expected the run's 2 points in the vault, found {points}")
    got["show"] = measure([cbt, "show", v, points[1]], env, work)
    got["diff"] = measure([cbt, "diff", f"{v}::{points[0]}", f"{v}::{points[1]}", "-q"], env,
                          work, ok=(1,))
    got["verify"] = measure([cbt, "verify", v, "-q"], env, work)
    got["verify_data"] = measure([cbt, "verify", "--data", v, "-q"], env, work)
    got["gc"] = measure([cbt, "gc", v, "-q"], env, work)
    return got


def same_file(a: Path, b: Path, chunk: int = 8 << 20) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True


# --------------------------------------------------------------------------- report

def summarize(runs: dict[int, list[dict[str, dict[str, Any]]]]) -> list[dict[str, Any]]:
    """One row per scale and command: medians of the runs, and the RSS above the empty
    vault's per million stored blocks (None without a scale 0)."""
    rows = []
    for n, got in runs.items():
        for key in COMMANDS:
            rss = statistics.median(g[key]["peak_rss"] for g in got)
            rows.append({"scale": n, "command": key, "streams": key in STREAMING,
                         "peak_rss": int(rss),
                         "seconds": round(statistics.median(g[key]["seconds"] for g in got), 3),
                         "gnu_time_rss": [g[key]["gnu_time_rss"] for g in got],
                         "sampled_rss": [g[key]["sampled_rss"] for g in got],
                         "processes": max(g[key]["processes"] for g in got)})
    base = {r["command"]: r["peak_rss"] for r in rows if r["scale"] == 0}
    for r in rows:
        r["delta_rss_per_million"] = (
            round((r["peak_rss"] - base[r["command"]]) / (r["scale"] / 1e6))
            if r["scale"] and r["command"] in base else None)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| scale (stored blocks) | command | peak RSS | time "
             "| RSS above empty, per M blocks |",
             "|---|---|---|---|---|"]
    for r in rows:
        what = COMMANDS[r["command"]] + (" (streams)" if r["streams"] else "")
        delta = ("–" if r["delta_rss_per_million"] is None
                 else f"{r['delta_rss_per_million'] / 1e6:.1f} MB")
        lines.append(f"| {label(r['scale'])} | {what} | {r['peak_rss'] / 1e6:,.0f} MB | "
                     f"{r['seconds']:.2f} s | {delta} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- profile

def _rss() -> tuple[int, int]:
    """This process's RSS now and its peak since the last reset, bytes."""
    now = peak = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                now = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return now, peak


def _reset_peak() -> None:
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the RSS now (Linux >= 4.0)


def profile_load(path: Path) -> list[dict[str, Any]]:
    """Step by step what a command does with ``path``'s index, in this process: after
    each step the RSS, its peak within the step, what Arrow's memory pool holds and what
    numpy holds (tracemalloc: numpy reports its buffers there); then what the open
    index holds (each paged segment's head: filter, fences, checks, pack table)."""
    import gc
    import tracemalloc

    import pyarrow as pa

    steps = []

    def step(what: str) -> None:
        gc.collect()
        now, peak = _rss()
        steps.append({"step": what, "rss": now, "peak": peak,
                      "arrow": pa.total_allocated_bytes(),
                      "traced": tracemalloc.get_traced_memory()[0],
                      "traced_peak": tracemalloc.get_traced_memory()[1]})
        _reset_peak()
        tracemalloc.reset_peak()

    tracemalloc.start()
    _reset_peak()
    vault = Vault.open(path, PASSPHRASE)
    step("open the vault (imports, config, keys)")
    index = vault.load_index()
    step(f"load the index ({len(index.parts)} parts, {len(index):,} entries)")
    rng = np.random.default_rng(SEED)
    absent = np.frombuffer(rng.bytes(1024 * 32), dtype=np.uint8).reshape(1024, 32)
    index.lookup(absent)
    step("look up 1,024 new ids")
    total = sum(len(got.stored) for _base, got in index.chunks())
    step(f"stream every entry (Index.chunks: {total:,})")
    held = sum(getattr(part, "head_bytes", 0) for part in index.parts)
    steps.append({"step": "what the open segments' heads hold", "rss": held,
                  "arrays": {"heads": held, "per entry": held / max(1, len(index))}})
    return steps


def profile(args: argparse.Namespace, scales: list[int], cbt: str) -> int:
    """``--profile``: :func:`profile_load` of each scale's vault, each in a new process."""
    out = []
    for n in scales:
        where = Path(args.dir).absolute() / vault_dir(n, args)
        vault = build_vault(where, n, args.encrypted, parse_count(args.segment_entries),
                            legacy=args.legacy)
        code = ("import json, sys, scale; from pathlib import Path; "
                "print(json.dumps(scale.profile_load(Path(sys.argv[1]))))")
        proc = subprocess.run([sys.executable, "-c", code, str(vault)], check=True,
                              capture_output=True, text=True, cwd=Path(__file__).parent,
                              env=harness.tool_env(CBT_PASSWORD=PASSPHRASE))
        out.append({"scale": n, "steps": json.loads(proc.stdout)})
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    for p in out:
        print(f"\nloading the index of a vault of {label(p['scale'])} stored blocks (MB):")
        print("| step | RSS after | peak within | Arrow pool | traced (Python, numpy) "
              "| traced peak |")
        print("|---|---|---|---|---|---|")
        for s in p["steps"]:
            if "arrays" in s:
                print(f"| {s['step']} ({s['arrays']['per entry']:.2f} bytes an entry) "
                      f"| {s['rss'] / 1e6:,.1f} | | | | |")
                continue
            print(f"| {s['step']} | " + " | ".join(f"{s[k] / 1e6:,.0f}" for k in (
                "rss", "peak", "arrow", "traced", "traced_peak")) + " |")
    return 0


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scales", default="0,1M,4M",
                   help="stored blocks of each vault, comma-separated (default 0,1M,4M)")
    p.add_argument("--disk-size", default="64M", help="the small disk (default 64M)")
    p.add_argument("--block-size", default="64K", help="its block size (default 64K)")
    p.add_argument("--dir", default="/var/tmp/cbt-bench/scale",
                   help="where the vaults are kept, by scale, and the runs work")
    p.add_argument("--encrypted", action="store_true", help="encrypted vaults (aes-256-gcm)")
    p.add_argument("--runs", type=int, default=1, help="runs per scale (the median)")
    p.add_argument("--legacy", action="store_true",
                   help="vaults of the older Arrow index segments (the baseline), not paged")
    p.add_argument("--segment-entries", default="1M",
                   help="with --legacy: synthetic entries per index segment (default 1M; "
                        f"more when that would make over {MAX_SEGMENTS} segments)")
    p.add_argument("--keep", action="store_true",
                   help="keep the last run's vault clone and disk in --dir/runs")
    p.add_argument("--profile", action="store_true",
                   help="where the memory of loading the index goes, step by step")
    harness.add_output_options(p)
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    try:
        scales = sorted({parse_count(s) for s in args.scales.split(",") if s.strip()})
    except ValueError:
        p.error(f"--scales: not counts: {args.scales}")
    size, block = harness.size_arg(p, args.disk_size), harness.size_arg(p, args.block_size)
    per_segment = parse_count(args.segment_entries)
    try:
        cbt = harness.find_cbt(args.cbt)
        if not os.access(GNU_TIME, os.X_OK):
            harness.ensure_tool("time", "time")
        if args.profile:
            return profile(args, scales, cbt)
        top = Path(args.dir).absolute()
        top.mkdir(parents=True, exist_ok=True)
        env = harness.tool_env(CBT_PASSWORD=PASSPHRASE)
        disk0 = top / f"disk-{size}-{SEED}.img"
        if not disk0.exists() or disk0.stat().st_size != size:
            harness.write_random(disk0, size, SEED)
        host = harness.machine({"gnu_time": harness.version_of([GNU_TIME, "--version"])})
        runs: dict[int, list[dict[str, dict[str, Any]]]] = {}
        built: dict[int, float] = {}
        for n in scales:
            started = time.perf_counter()
            harness.log(f"vault of {label(n)} stored blocks ...")
            where = top / vault_dir(n, args)
            cached = build_vault(where, n, args.encrypted, per_segment, legacy=args.legacy)
            built[n] = round(time.perf_counter() - started, 1)
            runs[n] = []
            for r in range(args.runs):
                work = top / "runs"
                shutil.rmtree(work, ignore_errors=True)
                work.mkdir()
                try:
                    runs[n].append(one_run(cbt, cached, disk0, work, block, env))
                finally:
                    if not (args.keep and n == scales[-1] and r == args.runs - 1):
                        shutil.rmtree(work, ignore_errors=True)
                harness.log("  " + ", ".join(f"{k} {v['peak_rss'] / 1e6:.0f} MB "
                                             f"{v['seconds']:.1f} s"
                                             for k, v in runs[n][-1].items()))
        host["loadavg_after"] = list(os.getloadavg())
    except (harness.BenchError, OSError) as exc:
        harness.log(f"{harness.prog()}: {exc}")
        return 2
    rows = summarize(runs)
    result = {"disk_size": size, "block_size": block, "encrypted": args.encrypted,
              "runs": args.runs, "legacy": args.legacy,
              "segments": {n: ([segment_size(n, per_segment)] * -(-n // segment_size(
                  n, per_segment)) if args.legacy else paged_layout(n)) for n in scales},
              "vault_ready_seconds": built, "machine": host, "rows": rows}

    def report() -> str:
        return (f"{harness.machine_line(host)}\n"
                f"a {size >> 20} MiB disk ({block >> 10} KiB blocks) against vaults of "
                f"{', '.join(label(n) for n in scales)} stored blocks "
                f"({'encrypted' if args.encrypted else 'unencrypted'}, "
                f"{'legacy Arrow' if args.legacy else 'paged'} index segments); median of "
                f"{args.runs} run(s); peak RSS of the largest process (GNU time %M, or the "
                f"sampled process tree when larger)\n\n{markdown(rows)}\n\n"
                f"vaults made or found in (s): "
                f"{', '.join(f'{label(n)} {t}' for n, t in built.items())}")

    harness.emit(args.json, lambda: result, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
