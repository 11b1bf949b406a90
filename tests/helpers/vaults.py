"""Looking into a vault (its files, points and packs) and the vault commands the tests run.

The commands run the real ``cbt`` (``helpers.cli``) and check the shape of what
they print; the file listings and digests are taken here, without cbt.
``History3`` is a small three-point history built once and cloned per test.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pytest

from helpers import KIB, MIB
from helpers.cli import cbt, cbt_json
from helpers.images import fs_image, keep_copy, read, write_at
from helpers.packs import pack_files, trailer_entries
from helpers.shapes import GC_KEYS, PRUNE_KEYS, PRUNE_POINT_KEYS
from helpers.truth import file_digest, nblocks, nonzero_blocks

# -- files -------------------------------------------------------------------------------


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


LOCK_FILES = {"lock", "gc.lock"}


def vault_state(vault: Path) -> dict[str, str]:
    """Relative path -> content digest of every file under the vault (lock files aside:
    they say who held the lock last, not what the vault holds)."""
    out = {}
    for dirpath, _dirs, files in os.walk(vault):
        for f in files:
            p = Path(dirpath, f)
            rel = str(p.relative_to(vault))
            if rel in LOCK_FILES or rel.startswith("locks/"):  # (locks/: each holder's)
                continue
            out[rel] = file_digest(p)
    return out


def dir_bytes(d: Path) -> int:
    """Bytes in the files under ``d`` (0 when it does not exist)."""
    total = 0
    for dirpath, _dirs, files in os.walk(d):
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.path.getsize(os.path.join(dirpath, f))
    return total


def files_equal_to(root: Path, truth: Path) -> list[Path]:
    """Files under ``root`` whose bytes equal ``truth``'s (found by content, not by name)."""
    want = file_digest(truth)
    size = truth.stat().st_size
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath, f)
            if p.is_file() and p.stat().st_size == size and file_digest(p) == want:
                out.append(p)
    return sorted(out)


# -- the vault commands ------------------------------------------------------------------


def listed(vault: Path) -> list[dict[str, Any]]:
    """``cbt list --json`` points, oldest first."""
    return list(cbt_json("list", vault)["points"])


def listed_ids(vault: Path, vm: str | None = None) -> list[str]:
    return [p["recovery_point"] for p in listed(vault) if vm is None or p["vm"] == vm]


def point_record(vault: Path, point: str) -> dict[str, Any]:
    """The committed record ``points/<id>.json`` (the issue names its ``slot``)."""
    return dict(json.loads((vault / "points" / f"{point}.json").read_text()))


def restore(vault: Path, point: str, to: Path, *extra: object) -> dict[str, Any]:
    """``cbt restore VAULT POINT --to TO [EXTRA] --json`` that must succeed."""
    return cbt_json("restore", vault, point, "--to", to, *extra)


def restore_point(vault: Path, point: str, to: Path) -> Path:
    """``restore``, returning the folder restored to."""
    restore(vault, point, to)
    return to


def verify_data_clean(vault: Path) -> dict[str, Any]:
    out = cbt_json("verify", vault, "--data")
    assert out["problems"] == [], out["problems"][:5]
    return out


def gc(vault: Path, *args: object) -> dict[str, Any]:
    """``cbt gc VAULT ARGS --json``, its shape checked."""
    out = cbt_json("gc", vault, *args)
    assert set(out) >= GC_KEYS, out
    for k in ("packs_removed", "packs_rewritten", "bytes_freed"):
        assert isinstance(out[k], int) and out[k] >= 0, out
    return out


def prune(cfg: Path, now: str, dry_run: bool = False) -> dict[str, Any]:
    """``cbt prune --config CFG --now T [--dry-run] --json``, its shape checked."""
    args: list[object] = ["prune", "--config", cfg, "--now", now]
    if dry_run:
        args.append("--dry-run")
    out = cbt_json(*args)
    assert set(out) == PRUNE_KEYS, out
    assert out["dry_run"] is dry_run
    assert isinstance(out["snapshots_expired"], int) and isinstance(out["warnings"], list)
    for p in out["points"]:
        assert set(p) == PRUNE_POINT_KEYS, p
        assert isinstance(p["keep"], bool) and isinstance(p["reasons"], list), p
        assert p["reasons"], f"every point says why it is kept or removed: {p}"
    return out


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


# -- a vault as an attacker writes it (issue 11) ---------------------------------------------


def forge_record(vault: Path, point: str, change: Any, name: str | None = None) -> Path:
    """Rewrite ``points/<point>.json`` of an unencrypted vault with ``change(body)`` applied
    and its checksum recomputed, as anyone can (an unkeyed BLAKE3 of the canonical JSON);
    written as ``points/<name>.json`` when ``name`` is given."""
    path = vault / "points" / f"{point}.json"
    body = json.loads(path.read_text())
    del body["checksum"]
    change(body)
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    body["checksum"] = blake3.blake3(canonical.encode()).hexdigest()
    out = vault / "points" / f"{name or point}.json"
    out.write_text(json.dumps(body, sort_keys=True, indent=1) + "\n")
    return out


def two_point_vault(root: Path) -> tuple[Path, list[str]]:
    """``root/vault``: two points of VM ``web`` (disks os and db, 64 KiB blocks), the
    second's db a delta on the first's; returns the vault and the point ids."""
    import cbt as cbt_api

    fs_image(root / "os.img", MIB, 1)
    vault = cbt_api.Vault.init(root / "vault")
    ids = []
    for day, seed in ((1, 3), (2, 4)):
        fs_image(root / "db.img", 512 * KIB, seed)
        p = vault.backup("web", [f"os={root / 'os.img'}", f"db={root / 'db.img'}"],
                         block_size=64 * KIB, workers=1, created=f"2026-01-0{day}T02:00:00Z")
        ids.append(p.id)
    return root / "vault", ids


# -- encrypted vaults ------------------------------------------------------------------------

PASSWORD = "test passphrase 11"


def fast_kdf() -> Any:
    """scrypt parameters cheap enough for tests (the default costs ~0.4 s and 128 MiB)."""
    from cbt.core.crypto import KdfParams

    return KdfParams(log_n=10)


def encrypted_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose CBT_PASSWORD_FILE opens vaults made with :data:`PASSWORD`."""
    pw = tmp_path / "password"
    pw.write_text(PASSWORD + "\n")
    pw.chmod(0o600)
    return {**os.environ, "CBT_PASSWORD_FILE": str(pw)}


def init_cli_vault(vault: Path, encrypted: bool, tmp_path: Path) -> dict[str, str] | None:
    """``cbt init`` a plain or an encrypted vault (cheap scrypt); the environment that
    opens it (None for a plain one)."""
    env = encrypted_env(tmp_path) if encrypted else None
    r = cbt("init", vault, *(["--kdf-log-n", "10"] if encrypted else ["--encryption", "none"]),
            env=env)
    assert r.returncode == 0, r.stderr
    return env


# -- a vault to attack ------------------------------------------------------------------------


def make_two_points(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A vault with two points of VM ``web`` (disks os and db), to build once per module:
    ``two_points = pytest.fixture(scope="module")(make_two_points)``."""
    return two_point_vault(tmp_path_factory.mktemp("two-points"))


def clone_two_points(two_points: tuple[Path, list[str]], tmp_path: Path
                     ) -> tuple[Path, list[str]]:
    """A test's own copy of ``two_points``, to craft files in: ``vault =
    pytest.fixture(clone_two_points)``."""
    src, ids = two_points
    shutil.copytree(src, tmp_path / "vault", symlinks=True)
    return tmp_path / "vault", ids


def set_disk(key: str, value: object, disk: int = 0) -> Callable[[dict[str, Any]], None]:
    """A :func:`forge_record` change: one key of one disk of a point record."""
    def change(body: dict[str, Any]) -> None:
        body["disks"][disk][key] = value
    return change


class FinishedScan:
    """An early scan that finished before the backup takes it (so a test can change the disk
    after it, or look at how the backup uses it): plain BLAKE3 digests, as an unencrypted
    vault names blocks.  Stands for :class:`cbt.source.scan.PendingScan`."""

    key = None

    def __init__(self, scans: list[Any]) -> None:
        self.scans = scans

    def disks(self) -> list[tuple[str, int, int]]:
        return [(s.source, s.block_size, s.disk_size) for s in self.scans]

    def wait(self, **_: Any) -> list[Any]:
        return self.scans

    def cancel(self) -> None:
        pass
