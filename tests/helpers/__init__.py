"""Helpers shared by the tests, one module a subject; each helper is defined once.

- ``truth``: the oracles: block arithmetic, digests, changed blocks and diffs computed
  with numpy and the ``blake3`` package only (nothing of cbt), so a bug in cbt cannot
  hide by being repeated on both sides of an assertion.
- ``packs``: an independent reader of the pack layout (struct + pyarrow's zstd codec).
- ``images``: disk images to back up (sparse, random, file-system-like), their copies,
  and byte-for-byte comparisons.
- ``shapes``: the exact ``--json`` key sets of every command (the CLI contract).
- ``cli``: running ``cbt`` as a real process, and killing and waiting for it.
- ``vaults``: looking into a vault (files, packs, points) and the commands over it.
- ``jobs``: config files, the hook script, and the job commands (backup --config, jobs,
  run-due).
- ``system``: what the machine offers (root, loop devices, mounts, reflink, strace).
- ``strace``: what a traced ``cbt`` process wrote, as the kernel saw it.
- ``tracking``: disks written in known patterns (writes, 1-byte writes, punched holes,
  a truncated tail) and the blocks that really changed between two files.

Sizes used everywhere are here.
"""

from __future__ import annotations

KIB = 1 << 10
MIB = 1 << 20
PAGE = 4096
