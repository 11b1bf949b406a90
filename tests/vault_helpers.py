"""Helpers for the vault tests: ground truth computed without cbt, and CLI runners.

The truth the vault tests compare against is plain numpy, the ``blake3``
package and an independent reader of the pack layout documented in
``cbt.vault.pack`` (struct + pyarrow's zstd codec), so a bug in cbt cannot
hide by being repeated on both sides of an assertion.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import numpy.typing as npt

KIB = 1024
MIB = 1024 * KIB
PAGE = 4096

# The console script beside this interpreter (no pyenv shim in between), else PATH.
_CBT = (str(Path(sys.executable).with_name("cbt"))
        if Path(sys.executable).with_name("cbt").exists() else shutil.which("cbt"))

# The exact --json shapes of issue 3.
POINT_LINE_KEYS = {"type", "recovery_point", "vm", "created", "consistency",
                   "consistency_reason", "disks", "seconds", "warnings"}
POINT_DISK_KEYS = {"label", "path", "size", "block_size", "blocks", "changed_blocks",
                   "bytes_read", "bytes_new", "bytes_stored", "seconds"}
PROGRESS_KEYS = {"type", "vm", "disk", "bytes_done", "bytes_total"}
LIST_KEYS = {"points", "warnings"}
LIST_POINT_KEYS = {"recovery_point", "vm", "created", "consistency", "parent", "disks",
                   "bytes_new", "bytes_stored"}
LIST_DISK_KEYS = {"label", "size", "block_size"}
RESTORE_KEYS = {"recovery_point", "disks", "seconds", "warnings"}
RESTORE_DISK_KEYS = {"label", "to", "size", "bytes_written", "blocks_verified"}
VERIFY_KEYS = {"points", "blocks_checked", "data", "problems", "unreferenced_bytes",
               "warnings"}
PROBLEM_KEYS = {"point", "disk", "block", "pack", "problem"}


# -- running cbt ------------------------------------------------------------------


def cbt_argv(*args: object) -> list[str]:
    """The argv of a real ``cbt`` process (the console script, else ``python -m``)."""
    head = [_CBT] if _CBT else [sys.executable, "-m", "cbt.cli.main"]
    return [*head, *map(str, args)]


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment without any CBT_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CBT_")}
    env.update(extra or {})
    return env


def cbt(*args: object, env: Mapping[str, str] | None = None, timeout: float = 120,
        cwd: str | os.PathLike[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``cbt ARGS...`` as a separate process, capturing text output."""
    return subprocess.run(cbt_argv(*args), capture_output=True, text=True,
                          env=clean_env(env), timeout=timeout, cwd=cwd, check=False)


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def cbt_json(*args: object, **kwargs: Any) -> dict[str, Any]:
    """Run a ``--json`` command that must succeed; its last JSON line."""
    r = cbt(*args, "--json", **kwargs)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    lines = json_lines(r.stdout)
    assert lines, r.stdout
    return lines[-1]


def backup_cli(vault: Path, vm: str, *disks: object, **kwargs: Any) -> dict[str, Any]:
    """``cbt backup --json`` that must succeed; the point line."""
    line = cbt_json("backup", vault, *disks, "--vm", vm, **kwargs)
    assert line["type"] == "point", line
    return line


def one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    """The single ``cbt: error: ...`` line of a failed command (exit 2)."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("cbt: error: ") or ": error: " in lines[0], lines[0]
    return lines[0]


# -- disks and their truth ------------------------------------------------------------


def nblocks(size: int, bs: int) -> int:
    return -(-size // bs)


def read(path: str | os.PathLike[str]) -> npt.NDArray[np.uint8]:
    return np.fromfile(path, dtype=np.uint8)


def keep_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """A sparse copy of the disk as it is now (holes stay holes)."""
    from cbt.source.synth import copy_sparse

    copy_sparse(src, dst)
    assert os.path.getsize(dst) == os.path.getsize(src)
    return Path(dst)


def truth_changed(old: npt.NDArray[np.uint8], new: npt.NDArray[np.uint8], bs: int) -> int:
    """Changed blocks under ``cbt diff``'s rules, by comparing the bytes with numpy.

    Blocks cover ``[i*bs, (i+1)*bs)`` of the longer input; when the sizes differ
    the block holding the shorter end and every block after it are changed.
    """
    big, short = max(len(old), len(new)), min(len(old), len(new))
    n = nblocks(big, bs)
    if len(old) == len(new):
        pad = np.zeros(n * bs - big, dtype=np.uint8)
        a, b = np.concatenate([old, pad]), np.concatenate([new, pad])
        return int((a.reshape(n, bs) != b.reshape(n, bs)).any(axis=1).sum())
    k = short // bs
    same_prefix = (old[:k * bs].reshape(k, bs) != new[:k * bs].reshape(k, bs)).any(axis=1)
    return int(same_prefix.sum()) + (n - k)


def block_digests(data: npt.NDArray[np.uint8], bs: int) -> dict[bytes, int]:
    """Digest -> raw length of every distinct non-zero block (what a vault must hold)."""
    out: dict[bytes, int] = {}
    mv = memoryview(data)
    n = nblocks(len(data), bs)
    if n == 0:
        return out
    pad = np.zeros(n * bs - len(data), dtype=np.uint8)
    nonzero = np.concatenate([data, pad]).reshape(n, bs).any(axis=1)
    for i in np.flatnonzero(nonzero).tolist():
        block = mv[i * bs:(i + 1) * bs]
        out[blake3.blake3(block).digest()] = len(block)
    return out


def data_block_mask(path: str | os.PathLike[str], bs: int) -> npt.NDArray[np.bool_]:
    """Blocks of a file that hold any allocated byte (SEEK_DATA / SEEK_HOLE)."""
    size = os.path.getsize(path)
    n = nblocks(size, bs)
    mask = np.zeros(n, dtype=bool)
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break  # ENXIO: only a hole remains
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            mask[start // bs:nblocks(end, bs)] = True
            pos = end
    finally:
        os.close(fd)
    return mask


def assert_same_disk(restored: str | os.PathLike[str], expected: str | os.PathLike[str],
                     bs: int) -> None:
    """Bit-identical, exactly the disk's size, and every all-zero block a hole."""
    r, e = read(restored), read(expected)
    assert len(r) == len(e), f"{restored}: size {len(r)}, expected {len(e)}"
    if not np.array_equal(r, e):
        first = int(np.flatnonzero(r != e)[0])
        raise AssertionError(f"{restored} differs from {expected}: first at byte {first} "
                             f"(block {first // bs} of {bs})")
    n = nblocks(len(e), bs)
    if n == 0:
        return
    pad = np.zeros(n * bs - len(e), dtype=np.uint8)
    zero_blocks = ~np.concatenate([e, pad]).reshape(n, bs).any(axis=1)
    allocated = data_block_mask(restored, bs)
    bad = np.flatnonzero(zero_blocks & allocated)
    assert len(bad) == 0, (f"{restored}: {len(bad)} zero blocks are allocated, not holes "
                           f"(first block {int(bad[0])})")


def file_tree(root: Path) -> dict[str, int]:
    """Relative path -> size of every file under ``root``."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath, f)
            out[str(p.relative_to(root))] = p.stat().st_size
    return out


def temp_files(root: Path) -> list[str]:
    """Leftover temporary files (``.NAME.tmp-PID``) under ``root``."""
    return [k for k in file_tree(root) if ".tmp-" in os.path.basename(k)]


# -- an independent reader of pack files ------------------------------------------------

# Layout documented in cbt.vault.pack (little-endian):
#   header 16 B: b"CBTPACK\0", u32 version, u32 reserved
#   blob: b"CBTB", digest[32], u8 codec, u8 encryption, u16 reserved, u32 raw, u32 stored,
#         then the stored bytes
#   trailer: one 48 B entry per blob: digest[32], u64 offset, u32 stored, u32 raw
#   footer 48 B: u64 count, blake3(trailer)[32], b"CBTPEND1"
_BLOB = struct.Struct("<4s32sBBHII")
_ENTRY = struct.Struct("<32sQII")
_FOOTER = struct.Struct("<Q32s8s")


@dataclass(frozen=True)
class Blob:
    digest: bytes
    offset: int  # of the blob header
    codec: int
    encryption: int
    raw: int
    stored: int


def pack_files(vault: Path) -> list[Path]:
    return sorted((vault / "packs").rglob("*.pack"))


def trailer_entries(pack: Path) -> list[tuple[bytes, int, int, int]]:
    """(digest, offset, stored, raw) from a complete pack's trailer (checked)."""
    data = pack.read_bytes()
    count, checksum, end = _FOOTER.unpack_from(data, len(data) - _FOOTER.size)
    assert end == b"CBTPEND1", pack
    start = len(data) - _FOOTER.size - count * _ENTRY.size
    trailer = data[start:len(data) - _FOOTER.size]
    assert blake3.blake3(trailer).digest() == checksum, pack
    return [_ENTRY.unpack_from(trailer, i * _ENTRY.size) for i in range(count)]


def walk_pack(pack: Path) -> list[Blob]:
    """Every blob of a pack, walked from its header, each checked against its digest."""
    import pyarrow as pa

    data = pack.read_bytes()
    assert data[:8] == b"CBTPACK\0", pack
    entries = trailer_entries(pack)
    blobs = []
    for digest, offset, stored, raw in entries:
        magic, d, codec, enc, _res, raw_h, stored_h = _BLOB.unpack_from(data, offset)
        assert magic == b"CBTB" and d == digest and raw_h == raw and stored_h == stored
        payload = data[offset + _BLOB.size:offset + _BLOB.size + stored]
        assert enc == 0, "format 1 is unencrypted"
        if codec == 0:
            content = payload
        else:
            assert codec == 1, f"unknown codec {codec}"
            content = pa.Codec("zstd").decompress(payload, decompressed_size=raw, asbytes=True)
        assert len(content) == raw and blake3.blake3(content).digest() == digest
        blobs.append(Blob(digest, offset, codec, enc, raw, stored))
    return blobs


def distinct_raw(entries: Iterable[tuple[bytes, int]]) -> int:
    """Sum of raw lengths, each digest counted once."""
    seen: dict[bytes, int] = {}
    for d, raw in entries:
        seen.setdefault(d, raw)
    return sum(seen.values())


def fs_image(path: str | os.PathLike[str], size: int, seed: int) -> Path:
    """``cbt.synth.make_fs_image`` with a mix worth testing: data, zeros and holes.

    Its extents are up to 4 MiB long, so a small image can come out all hole or
    all data; the first seed from ``seed`` on (deterministic) with 30-90% data
    and a hole is used.
    """
    from cbt.source.synth import make_fs_image

    for s in range(seed, seed + 1000 * 200, 1000):
        make_fs_image(path, size, seed=s)
        data = read(path)
        n = nblocks(len(data), PAGE)
        pages = np.concatenate([data, np.zeros(n * PAGE - len(data), np.uint8)])
        share = np.count_nonzero(pages.reshape(n, PAGE).any(axis=1)) / n
        allocated = os.stat(path).st_blocks * 512
        if 0.3 <= share <= 0.9 and allocated < 0.97 * size:
            return Path(path)
    raise AssertionError(f"no seed gives a mixed image of {size} bytes")
