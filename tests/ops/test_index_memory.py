"""Memory that does not grow with the vault: the commands on a small disk cost about the
same against a vault of 1.5 million stored blocks as against an empty one (issue 18).

1. Two vaults: an empty one, and one whose index holds :data:`ENTRIES` synthetic
   entries (random ids, sorted, in fake packs no point names) written as paged
   segments through the product's own streaming writer
   (:func:`cbt.repo.segments.write_paged`), as the vault's backups would have left them.
2. In each, as real ``cbt`` processes: a backup of the same small random disk, a
   restore of its point (checked byte for byte against the disk), a verify, a
   verify --data and a gc (which stream: the same bound holds for them here).
3. Each process's peak RSS is what ``wait4`` reports (the ``ru_maxrss`` GNU time's
   ``%M`` prints: the largest of the process and every child it waited for, so a
   backup's forked worker counts too), the process started by a small launcher (see
   :data:`LAUNCHER` for why).
4. Against the big vault a command may use at most :data:`PER_MILLION` per million
   stored blocks plus :data:`SLACK` more than against the empty one.  The issue's
   target is 10 MB a million; the index now holds about 2 bytes an entry in memory
   (each open segment's head: its Bloom filter, fences, page checks), so the figure
   measured is a few MB a million (bench/scale.py).  The bound is the target itself,
   plus 30 MB of slack for what is noise here and not the vault's size (allocator
   arenas, page-cache-dependent read buffers, another import): the index as it was
   (about 200 bytes an entry, 300 MB here) fails it tenfold.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
from helpers.cli import cbt_argv, clean_env
from helpers.system import need

from cbt.format.pack import pack_name
from cbt.repo.segments import write_paged
from cbt.repo.vault import Vault

ENTRIES = 1_500_000
PER_MILLION = 10_000_000  # bytes a million stored blocks may add: the target
SLACK = 30_000_000  # bytes of noise that is not the vault's size (see the module doc)
DISK = 8 << 20
BLOCK = 64 << 10
CHUNK = 1 << 16  # entries handed to the writer at once


def fill_index(vault: Vault, n: int, seed: int) -> None:
    """``n`` synthetic entries in two paged segments of ``vault`` (different tiers' worth
    of ids would not change what is measured: every segment's head is in memory)."""
    rng = np.random.default_rng(seed)
    for part, count in enumerate((n // 2, n - n // 2)):
        ids = np.unique(np.frombuffer(rng.bytes(count * 32), dtype="S32"))
        k = len(ids)
        digests = ids.view(np.uint8).reshape(k, 32)
        packs = np.frombuffer(rng.bytes(-(-k // 2000) * 16), dtype=np.uint8).reshape(-1, 16)
        which = np.arange(k) // 2000
        chunks = ({"digests": digests[a:a + CHUNK], "pack_uuid": packs[which[a:a + CHUNK]],
                   "offset": np.full(min(CHUNK, k - a), 16, dtype=np.uint64),
                   "stored": np.full(min(CHUNK, k - a), 2000, dtype=np.uint32),
                   "raw": np.full(min(CHUNK, k - a), 4096, dtype=np.uint32)}
                  for a in range(0, k, CHUNK))
        write_paged(vault, vault.segment_name(f"synthetic-{part}"), chunks, k)
        # (an empty file for one of its packs: a segment none of whose packs the vault
        # holds is ignored as another vault's; the synthetic packs are never read)
        vault.storage.put(pack_name(uuid.UUID(bytes=packs[0].tobytes()).hex), b"")


# Runs argv and prints its peak RSS (KiB) and exit code.  The child's ru_maxrss also
# counts what the process it was forked from held until it called exec (Linux keeps
# the old memory's peak across exec), so the cbt process must be forked from this small
# launcher, not from the test process holding a vault's worth of arrays: as GNU time is.
LAUNCHER = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
_pid, status, usage = os.wait4(proc.pid, 0)
proc.returncode = os.waitstatus_to_exitcode(status)
print(usage.ru_maxrss, proc.returncode)
"""


def peak_rss(*args: object) -> int:
    """Run ``cbt *args`` to the end (it must succeed): its peak RSS in bytes (wait4's
    ru_maxrss: the largest of the process and of every child it waited for)."""
    r = subprocess.run([sys.executable, "-c", LAUNCHER, *cbt_argv(*args)], env=clean_env(),
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, check=True)
    kib, code = map(int, r.stdout.split())
    assert code == 0, r.stderr
    return kib * 1024  # (KiB on Linux)


def run_commands(vault: Path, disk: Path, restored: Path) -> dict[str, int]:
    """Backup, restore (checked), verify (with and without data), gc of ``disk`` in
    ``vault``: each one's peak RSS."""
    got = {"backup": peak_rss("backup", vault, "--vm", "m", f"d={disk}", "--block-size",
                              BLOCK, "-q")}
    got["restore"] = peak_rss("restore", vault, "m.latest", "--disk", "d", "--to", restored,
                              "-q")
    assert restored.read_bytes() == disk.read_bytes()
    got["verify"] = peak_rss("verify", vault, "-q")
    got["verify --data"] = peak_rss("verify", "--data", vault, "-q")
    got["gc"] = peak_rss("gc", vault, "-q")
    return got


def test_a_vault_of_millions_of_blocks_costs_the_commands_little_memory(
        tmp_path: Path) -> None:
    need(hasattr(os, "wait4") and Path("/proc/self/status").exists(),
         "needs Linux's wait4 (the peak RSS of each cbt process)")
    disk = tmp_path / "disk.img"
    disk.write_bytes(np.random.default_rng(1).bytes(DISK))
    Vault.init(tmp_path / "empty", "none")
    big = Vault.init(tmp_path / "big", "none")
    fill_index(big, ENTRIES, seed=18)
    assert len(big.load_index()) == ENTRIES  # (random 32-byte ids: no two the same)

    empty = run_commands(tmp_path / "empty", disk, tmp_path / "r-empty.img")
    full = run_commands(tmp_path / "big", disk, tmp_path / "r-big.img")

    bound = ENTRIES / 1e6 * PER_MILLION + SLACK
    for command, base in empty.items():
        assert full[command] - base <= bound, (
            f"{command}: {full[command] / 1e6:.0f} MB against {ENTRIES:,} stored blocks, "
            f"{base / 1e6:.0f} MB against none (bound {bound / 1e6:.0f} MB more)")
    # the big vault's index still holds the synthetic entries and the disk's blocks, but
    # those of the two packs the vault held (empty files, no point uses them: gc trashed
    # them and their entries); the disk's blocks all there, and the restore above checked
    index = Vault.open(tmp_path / "big").load_index()
    assert ENTRIES - 2 * 2000 + DISK // BLOCK <= len(index) <= ENTRIES + DISK // BLOCK
