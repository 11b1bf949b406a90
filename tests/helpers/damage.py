"""A small real history to damage one file of (issue 12: damage stays local).

``build_history`` makes a vault (plain or encrypted) by real backups: VM ``web``
(disks os and data) on four days, whose manifests form the skip chain seq 0..3
(day 1 and day 2 are deltas on day 0, day 3 a delta on day 2), and VM ``db`` (one
disk) once.  Every point keeps copies of its disks as they were: the truth a
restore is compared with, byte for byte.  ``History.clone`` gives each test its
own copy to break; the damage is done here with plain file calls.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers import KIB, MIB
from helpers.images import fs_image, keep_copy, scribble
from helpers.vaults import PASSWORD, encrypted_env, fast_kdf

BS = 64 * KIB
WEB_DAYS = 4


@dataclass
class History:
    vault: Path
    encrypted: bool
    web: list[str]  # the points of VM web, oldest first
    db: str  # the point of VM db
    copies: dict[str, dict[str, Path]]  # point -> label -> its disk as it was
    disks: Path  # the live disks (web's os and data, db's db)

    def clone(self, root: Path) -> History:
        """A copy of the vault (and of the live disks) for one test to damage."""
        shutil.copytree(self.vault, root / "vault", symlinks=True)
        shutil.copytree(self.disks, root / "disks")
        return History(root / "vault", self.encrypted, self.web, self.db, self.copies,
                       root / "disks")

    def env(self, tmp_path: Path) -> dict[str, str] | None:
        """The environment of a ``cbt`` process that opens this vault."""
        return encrypted_env(tmp_path) if self.encrypted else None

    def opened(self) -> Any:
        import cbt as cbt_api

        return cbt_api.Vault.open(self.vault, passphrase=PASSWORD)

    def record(self, point: str) -> Path:
        """The file of a point's record (an opaque name in an encrypted vault)."""
        return self.vault / self.opened().point_name(point)

    def manifest(self, point: str, label: str) -> Path:
        return self.vault / self.opened().manifest_name(point, label)


def build_history(root: Path, encrypted: bool) -> History:
    import cbt as cbt_api

    disks = root / "disks"
    disks.mkdir()
    fs_image(disks / "os.img", MIB, 121)
    fs_image(disks / "data.img", 512 * KIB, 122)
    fs_image(disks / "db.img", 512 * KIB, 123)
    if encrypted:
        vault = cbt_api.Vault.init(root / "vault", encryption="aes-256-gcm",
                                   passphrase=PASSWORD, kdf=fast_kdf())
    else:
        vault = cbt_api.Vault.init(root / "vault")
    web, copies = [], {}
    for day in range(WEB_DAYS):
        if day:
            scribble(disks / "os.img", 130 + day, pages=6)
            scribble(disks / "data.img", 140 + day, pages=3)
        p = vault.backup("web", [disks / "os.img", disks / "data.img"], block_size=BS,
                         workers=1, created=f"2026-01-0{day + 1}T02:00:00Z")
        web.append(p.id)
        copies[p.id] = {lb: keep_copy(disks / f"{lb}.img", root / f"{lb}.{day}.img")
                        for lb in ("os", "data")}
    p = vault.backup("db", [disks / "db.img"], block_size=BS, workers=1,
                     created="2026-01-01T03:00:00Z")
    copies[p.id] = {"db": keep_copy(disks / "db.img", root / "db.0.img")}
    history = History(root / "vault", encrypted, web, p.id, copies, disks)
    opened = history.opened()
    seqs = [opened.load_point(pid).disk("os").seq for pid in web]
    bases = [opened.load_point(pid).disk("os").base for pid in web]
    assert seqs == [0, 1, 2, 3] and bases == [None, web[0], web[0], web[2]], (seqs, bases)
    return history


# -- damage ----------------------------------------------------------------------------------


def flip_byte(path: Path, where: float = 0.5) -> None:
    """One byte of the file inverted (``where``: how far into it)."""
    raw = bytearray(path.read_bytes())
    raw[int(len(raw) * where)] ^= 0xFF
    path.write_bytes(bytes(raw))


def bad_json(path: Path) -> None:
    """A record cut in the middle: not JSON any more."""
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def bad_checksum(path: Path) -> None:
    """A field of a plain record changed without its checksum."""
    body = json.loads(path.read_text())
    body["bytes_new"] += 1
    path.write_text(json.dumps(body, sort_keys=True, indent=1) + "\n")


def damage_record(h: History, point: str, how: str) -> Path:
    """Damage ``point``'s record ``how`` (``flip``, ``json``, ``checksum``; in an encrypted
    vault any of them fails authentication); returns the file."""
    path = h.record(point)
    {"flip": flip_byte, "json": bad_json, "checksum": bad_checksum}[how](path)
    return path


# plain: each way; encrypted: a flipped byte (a bad AEAD tag) and a cut file
RECORD_DAMAGE = [(False, "flip"), (False, "json"), (False, "checksum"), (True, "flip"),
                 (True, "json")]
RECORD_DAMAGE_IDS = [f"{'sealed' if e else 'plain'}-{how}" for e, how in RECORD_DAMAGE]


_BUILT: dict[bool, History] = {}


def pristine(factory: Any, encrypted: bool) -> History:
    """The history of this session (built once per kind: plain, encrypted); never damaged:
    tests damage a :meth:`History.clone`."""
    if encrypted not in _BUILT:
        _BUILT[encrypted] = build_history(factory.mktemp("damage-history"), encrypted)
    return _BUILT[encrypted]
