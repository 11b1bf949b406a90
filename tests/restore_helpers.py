"""Helpers for the restore, point-diff, damage/repair and ENOSPC tests.

Ground truth here is plain numpy, ``blake3`` and what the kernel reports
(``strace`` of the real ``cbt`` process, ``SEEK_DATA``): nothing is computed
with cbt's own scan, diff or restore code.  Loop devices and mounts are always
released in ``finally``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import blake3
import numpy as np
import numpy.typing as npt
from conftest import need, need_root_tools
from vault_helpers import cbt_argv, clean_env, nblocks, read, trailer_entries

# -- block arithmetic ---------------------------------------------------------------


def padded_blocks(data: npt.NDArray[np.uint8], bs: int) -> npt.NDArray[np.uint8]:
    """``data`` zero-padded to whole blocks, as an (n, bs) array."""
    n = nblocks(len(data), bs)
    pad = np.zeros(n * bs - len(data), dtype=np.uint8)
    return np.concatenate([data, pad]).reshape(n, bs)


def nonzero_blocks(data: npt.NDArray[np.uint8], bs: int) -> npt.NDArray[np.bool_]:
    """Blocks holding any non-zero byte (what a vault stores)."""
    if len(data) == 0:
        return np.zeros(0, dtype=bool)
    return padded_blocks(data, bs).any(axis=1)


def block_len(size: int, bs: int, i: int) -> int:
    """Bytes of block ``i`` of a disk of ``size`` bytes (the tail block may be short)."""
    return min(bs, size - i * bs)


def data_bytes(data: npt.NDArray[np.uint8], bs: int) -> int:
    """Raw bytes of the non-zero blocks."""
    return sum(block_len(len(data), bs, int(i)) for i in np.flatnonzero(nonzero_blocks(data, bs)))


def resized(old: npt.NDArray[np.uint8], size: int) -> npt.NDArray[np.uint8]:
    """``old`` cut or zero-extended to ``size`` bytes (a file after ftruncate)."""
    if len(old) >= size:
        return old[:size]
    return np.concatenate([old, np.zeros(size - len(old), dtype=np.uint8)])


def differing_blocks(old: npt.NDArray[np.uint8], new: npt.NDArray[np.uint8],
                     bs: int) -> npt.NDArray[np.bool_]:
    """Blocks of ``new`` whose bytes differ from ``old`` once ``old`` has ``new``'s size."""
    if len(new) == 0:
        return np.zeros(0, dtype=bool)
    return (padded_blocks(resized(old, len(new)), bs) != padded_blocks(new, bs)).any(axis=1)


def runs(mask: npt.NDArray[np.bool_]) -> list[tuple[int, int]]:
    """Set bits as (first, count) runs."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return [(int(s), int(e - s)) for s, e in zip(starts, ends, strict=True)]


def sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def read_device(dev: str, length: int | None = None) -> npt.NDArray[np.uint8]:
    with open(dev, "rb") as f:
        raw = f.read() if length is None else f.read(length)
    return np.frombuffer(raw, dtype=np.uint8)


def write_at(path: str | os.PathLike[str], offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


# -- loop devices and mounts ---------------------------------------------------------------


@contextlib.contextmanager
def loop_device(backing: Path) -> Iterator[str]:
    """Attach ``backing`` to a free loop device; always detached afterwards."""
    need_root_tools("losetup")
    r = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True,
                       text=True, check=False)
    need(r.returncode == 0, f"losetup cannot attach a loop device: {r.stderr.strip()}")
    dev = r.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@contextlib.contextmanager
def small_fs(kind: str, size_mib: int, where: Path) -> Iterator[Path]:
    """A small mounted file system: ``ext4`` on a loop device, or ``tmpfs``."""
    mnt = where / f"mnt-{kind}"
    mnt.mkdir()
    if kind == "tmpfs":
        need_root_tools("mount", "umount")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs",
                            str(mnt)], capture_output=True, text=True, check=False)
        need(r.returncode == 0, f"cannot mount a tmpfs: {r.stderr.strip()}")
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=False)
        return
    need_root_tools("mkfs.ext4", "mount", "umount", "losetup")
    backing = where / f"{kind}.fs"
    with open(backing, "wb") as f:
        f.truncate(size_mib << 20)
    with loop_device(backing) as dev:
        subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True, capture_output=True)
        r = subprocess.run(["mount", dev, str(mnt)], capture_output=True, text=True,
                           check=False)
        need(r.returncode == 0, f"cannot mount ext4 on {dev}: {r.stderr.strip()}")
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=False)


def free_bytes(path: Path) -> int:
    s = os.statvfs(path)
    return s.f_bavail * s.f_frsize


def fill(path: Path, leave: int) -> int:
    """A ballast file taking all but ``leave`` bytes of the file system; returns its size."""
    size = free_bytes(path.parent) - leave
    assert size > 0, (free_bytes(path.parent), leave)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.posix_fallocate(fd, 0, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    return size


# -- strace ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Write:
    """One successful syscall that changed bytes of the traced target."""

    call: str  # pwrite64, fallocate (punch), ioctl (BLKZEROOUT), write
    offset: int
    length: int


_CALL = re.compile(r"^(\d+)\s+(pwrite64|pwritev2?|fallocate|ioctl|write|ftruncate)\((.*)$")
_RESUMED = re.compile(r"^(\d+)\s+<\.\.\. (\w+) resumed>(.*)$")


def _result(tail: str) -> int | None:
    m = re.search(r"\)\s+=\s+(-?\d+)", tail)
    return int(m.group(1)) if m else None


def _first_int(text: str) -> int:
    m = re.match(r"\s*(\d+)", text)
    assert m, text
    return int(m.group(1))


def strace_cbt(log: Path, *args: object,
               calls: str = "pwrite64,pwritev,pwritev2,fallocate,ioctl,write,ftruncate",
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``cbt ARGS`` under ``strace -f -y`` (fds shown with their paths)."""
    need_root_tools("strace")
    argv = ["strace", "-f", "-y", "-s", "0", "-e", f"trace={calls}", "-o", str(log),
            *cbt_argv(*args)]
    return subprocess.run(argv, capture_output=True, text=True, env=clean_env(),
                          timeout=timeout, check=False)


def traced_writes(log: Path, target: str | os.PathLike[str]) -> list[Write]:
    """Every successful write-like syscall on a file descriptor open on ``target``."""
    want = os.path.realpath(target)
    pending: dict[str, tuple[str, str]] = {}
    done: list[tuple[str, str, int | None]] = []
    for line in log.read_text().splitlines():
        m = _CALL.match(line)
        if m:
            pid, call, rest = m.groups()
            if "<unfinished ...>" in rest:
                pending[pid] = (call, rest.replace("<unfinished ...>", ""))
            else:
                done.append((call, rest, _result(rest)))
            continue
        m = _RESUMED.match(line)
        if m and m.group(1) in pending:
            call, rest = pending.pop(m.group(1))
            done.append((call, rest, _result(m.group(3))))
    out = []
    for call, rest, result in done:
        fd = re.match(r"\d+<([^>]*)>,\s*(.*)$", rest)
        if not fd or os.path.realpath(fd.group(1)) != want:
            continue
        if result is None or result < 0:
            continue
        args = [a.strip() for a in fd.group(2).split(",")]
        if call == "pwrite64":
            out.append(Write(call, _first_int(args[2]), result))
        elif call in ("pwritev", "pwritev2"):
            # strace -s 0 prints the iovec array as "[...]": fd, iov, iovcnt, offset[, flags]
            iov_end = fd.group(2).index("]") + 1
            rest_args = [a.strip() for a in fd.group(2)[iov_end:].split(",") if a.strip()]
            out.append(Write(call, _first_int(rest_args[1]), result))
        elif call == "fallocate":
            assert "PUNCH_HOLE" in args[0], rest
            out.append(Write(call, _first_int(args[1]), _first_int(args[2])))
        elif call == "ioctl":
            if "BLKZEROOUT" in args[0]:
                nums = re.findall(r"\d+", fd.group(2).split("BLKZEROOUT", 1)[1])
                out.append(Write(call, int(nums[0]), int(nums[1])))
        elif call == "ftruncate":
            continue  # a size change, not a block write
        else:
            raise AssertionError(f"unexpected write to the target: {call}({rest}")
    return out


def touched_blocks(writes: list[Write], bs: int) -> set[int]:
    """Blocks any of ``writes`` touched."""
    out: set[int] = set()
    for w in writes:
        if w.length:
            out.update(range(w.offset // bs, (w.offset + w.length - 1) // bs + 1))
    return out


def copy_file(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


# -- a small vault history to damage ---------------------------------------------------------


@dataclass
class History3:
    """Three points of VM ``vm`` (disks os and db), each backup run on one worker.

    Day 0 stores both disks in full; day 1 changes some pages and a run of os
    and pages of db; day 2 changes a single block of os, so its run writes one
    pack holding one blob.  ``packs[day]`` are the pack ids that day's run wrote.
    """

    vault: Path
    points: list[str]
    copies: list[dict[str, Path]]
    packs: list[list[str]]
    bs: int

    def clone(self, dst: Path) -> History3:
        shutil.copytree(self.vault, dst)
        return History3(dst, self.points, self.copies, self.packs, self.bs)

    def pack_path(self, pack_id: str) -> Path:
        return self.vault / "packs" / pack_id[:2] / f"{pack_id}.pack"

    def owners(self, digest: bytes) -> dict[tuple[str, str], set[int]]:
        """(point, label) -> blocks of that disk whose content has ``digest``."""
        out = {}
        for key, digests in self.block_digests().items():
            blocks = {i for i, d in enumerate(digests) if d == digest}
            if blocks:
                out[key] = blocks
        return out

    def block_digests(self) -> dict[tuple[str, str], list[bytes]]:
        """(point, label) -> BLAKE3 of every block of that disk (computed once)."""
        key = (str(self.copies[0]["os"]), self.bs)
        if key not in _DIGESTS:
            table = {}
            for pid, copies in zip(self.points, self.copies, strict=True):
                for lb, copy in copies.items():
                    data = read(copy)
                    mv = memoryview(data)
                    table[(pid, lb)] = [blake3.blake3(mv[i * self.bs:(i + 1) * self.bs]).digest()
                                        for i in range(nblocks(len(data), self.bs))]
            _DIGESTS[key] = table
        return _DIGESTS[key]


_DIGESTS: dict[tuple[str, int], dict[tuple[str, str], list[bytes]]] = {}


def build_history3(root: Path, bs: int) -> History3:
    from vault_helpers import KIB, MIB, fs_image, keep_copy, pack_files

    import cbt as cbt_api
    from cbt.source.synth import make_db_file, mutate

    disks = root / "disks"
    disks.mkdir()
    fs_image(disks / "os.img", 3 * MIB, 61)
    make_db_file(disks / "db.img", 2 * MIB, seed=62)
    vault = cbt_api.Vault.init(root / "vault")
    points, copies, packs = [], [], []
    for day in range(3):
        if day == 1:
            mutate(disks / "os.img", seed=63, page_writes=10, runs=1, run_length=256 * KIB,
                   zero_runs=0, holes=0)
            mutate(disks / "db.img", seed=64, page_writes=20, runs=0, zero_runs=0, holes=0)
        if day == 2:
            data = read(disks / "os.img")
            block = int(np.flatnonzero(nonzero_blocks(data, bs))[0])
            write_at(disks / "os.img", block * bs + 99,
                     np.random.default_rng(65).integers(1, 256, 1000, np.uint8).tobytes())
        before = {p.stem for p in pack_files(root / "vault")}
        p = vault.backup("vm", [disks / "os.img", disks / "db.img"], block_size=bs, workers=1)
        points.append(p.id)
        packs.append(sorted({p.stem for p in pack_files(root / "vault")} - before))
        copies.append({lb: keep_copy(disks / f"{lb}.img", root / f"{lb}.{day}.img")
                       for lb in ("os", "db")})
    return History3(root / "vault", points, copies, packs, bs)


def day1_blob(vh: History3) -> tuple[Path, bytes, int, int]:
    """A blob of day 1's run that point 1's os disk uses and point 0 does not."""
    for pack in map(vh.pack_path, vh.packs[1]):
        for digest, offset, stored, _raw in trailer_entries(pack):
            owners = vh.owners(digest)
            if (vh.points[1], "os") in owners and (vh.points[0], "os") not in owners:
                return pack, digest, offset, stored
    raise AssertionError("no such blob")
