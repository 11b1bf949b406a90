"""The vault: a content-addressed store of blocks, recovery points and manifests.

Layout of a vault (names in its :class:`~cbt.repo.storage.Storage`; a directory
for :class:`~cbt.repo.storage.LocalStorage`)::

    config                 JSON: magic, format_version, encryption, id_key, id, created
    lock                   writer lock (flock) and who holds it
    points/<id>.json       recovery point records; the rename of one is its commit
    manifests/<id>/<label>.arrow   full manifest or delta of each disk of a point
    index/<run>.arrow      index segments (digest -> pack, offset, length)
    packs/<xx>/<id>.pack   pack files of compressed blocks

Format 1 stores blocks unencrypted (``encryption = "none"``) and names them by
their plain BLAKE3 digest (``id_key = "none"``); every blob header names its
codec and encryption so both can be added without a format break.
"""

from __future__ import annotations

import errno
import json
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from cbt.core.errors import CbtError, CbtIOError
from cbt.format.records import (
    VAULT_MAGIC,
    VAULT_VERSION,
    NoSuchPointError,
    PointRecord,
    base_seq,
    id_order,
    point_name,
)
from cbt.repo.storage import LocalStorage, Storage

if TYPE_CHECKING:
    from cbt.format.manifest import Delta, Manifest
    from cbt.repo.index import Index

# The manifest and index modules (numpy, pyarrow) load when first needed: opening
# a vault and reading its points must stay cheap (``cbt backup`` starts its early
# scan from them before anything heavy is imported).

CONFIG = "config"


class NotAVaultError(CbtError, FileNotFoundError):
    """The path is not a cbt vault."""


class VaultVersionError(CbtError, ValueError):
    """The vault was made by a newer cbt."""


class Vault:
    """A vault opened for reading and, under its writer lock, writing."""

    def __init__(self, storage: Storage, config: dict[str, Any]) -> None:
        self.storage = storage
        self.config = config
        self._manifest_cache: dict[tuple[str, str], Manifest] = {}

    @property
    def root(self) -> str:
        return self.storage.root

    # -- creation and opening ---------------------------------------------------

    @classmethod
    def init(cls, path: str | os.PathLike[str]) -> Self:
        """Create a vault in a new or empty directory."""
        return cls.create(LocalStorage.create(path))

    @classmethod
    def create(cls, storage: Storage) -> Self:
        """Create a vault on an empty storage (any kind: local, memory)."""
        if storage.list(""):
            raise CbtIOError(errno.ENOTEMPTY, f"storage not empty: {storage.root} (a new vault "
                             "needs an empty one)")
        for sub in ("points", "manifests", "index", "packs"):
            storage.make_prefix(sub)
        from cbt.core.timefmt import utc_now

        config = {"magic": VAULT_MAGIC, "format_version": VAULT_VERSION,
                  "encryption": "none", "id_key": "none", "id": uuid.uuid4().hex,
                  "created": utc_now()}
        storage.put(CONFIG, (json.dumps(config, indent=1) + "\n").encode())
        return cls(storage, config)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Self:
        return cls.open_on(LocalStorage(Path(path)))

    @classmethod
    def open_on(cls, storage: Storage) -> Self:
        """Open the vault on ``storage`` (any kind: local, memory)."""
        where = storage.root
        try:
            raw = storage.get(CONFIG)
        except CbtIOError as exc:
            if exc.errno != errno.ENOENT:
                raise
            raise NotAVaultError(errno.ENOENT, f"not a cbt vault: {where} (run cbt init)") from None
        try:
            config = json.loads(raw)
            magic, version = config["magic"], int(config["format_version"])
        except (ValueError, KeyError, TypeError):
            raise NotAVaultError(errno.ENOENT, f"not a cbt vault: {where} (run cbt init)") from None
        if magic != VAULT_MAGIC:
            raise NotAVaultError(errno.ENOENT, f"not a cbt vault: {where} (run cbt init)")
        if version > VAULT_VERSION:
            raise VaultVersionError(f"vault {where} has format version {version}; this cbt reads "
                                    f"up to {VAULT_VERSION} (upgrade cbt)")
        if config.get("encryption") != "none" or config.get("id_key") != "none":
            raise VaultVersionError(f"vault {where} uses encryption or keyed ids, which this cbt "
                                    "does not support")
        return cls(storage, config)

    # -- points -------------------------------------------------------------------

    def point_ids(self) -> list[str]:
        return [_base(n)[:-5] for n in self.storage.list("points")
                if n.endswith(".json") and not _base(n).startswith(".")]

    def load_point(self, point_id: str) -> PointRecord:
        name = point_name(point_id)
        return PointRecord.from_json(self.storage.get(name), self.storage.where(name))

    def records(self, vm: str | None = None) -> list[PointRecord]:
        """Every point record, hidden ones (pruned bases of kept deltas) included."""
        records = [self.load_point(i) for i in self.point_ids()]
        if vm is not None:
            records = [r for r in records if r.vm == vm]
        return sorted(records, key=_point_order)

    def points(self, vm: str | None = None) -> list[PointRecord]:
        """Committed points, oldest first (by creation time, then id)."""
        return [r for r in self.records(vm) if not r.hidden]

    def latest(self, vm: str) -> PointRecord | None:
        pts = self.points(vm)
        return pts[-1] if pts else None

    def point(self, ref: str) -> PointRecord:
        """A point by id, unique id prefix, or ``<vm>.latest``."""
        if ref.endswith(".latest"):
            latest = self.latest(ref[: -len(".latest")])
            if latest is None:
                raise NoSuchPointError(f"no recovery point of VM {ref[:-7]!r} in {self.root}")
            return latest
        ids = [p.id for p in self.points()]
        if ref in ids:
            return self.load_point(ref)
        matches = [i for i in ids if i.startswith(ref)]
        if len(matches) == 1:
            return self.load_point(matches[0])
        if not matches:
            raise NoSuchPointError(f"no recovery point {ref!r} in {self.root}")
        raise NoSuchPointError(f"{ref!r} matches {len(matches)} points in {self.root}; "
                               "give more of the id")

    # -- manifests -----------------------------------------------------------------

    def read_manifest_file(self, name: str) -> Manifest | Delta:
        from cbt.format.manifest import read_manifest_bytes

        return read_manifest_bytes(self.storage.get(name), self.storage.where(name))

    def resolve(self, point: PointRecord, label: str, opened: list[str] | None = None) -> Manifest:
        """The full manifest of one disk of a point (full file plus its deltas)."""
        key = (point.id, label)
        if key in self._manifest_cache:
            return self._manifest_cache[key]
        disk = point.disk(label)
        if disk is None:
            raise NoSuchPointError(f"point {point.id} has no disk {label!r}")
        if opened is not None:
            opened.append(disk.manifest)
        from cbt.format.manifest import Delta

        m = self.read_manifest_file(disk.manifest)
        if isinstance(m, Delta):
            if disk.base is None:
                raise NoSuchPointError(f"point {point.id} disk {label}: delta without a base")
            base = self.resolve(self.load_point(disk.base), label, opened)
            full = m.apply(base)
        else:
            full = m
        full.source = disk.path
        full.created = point.created
        self._manifest_cache[key] = full
        return full

    def chain_base(self, vm: str, label: str, seq: int) -> PointRecord | None:
        """The point holding ``label`` at ``base_seq(seq)`` in the VM's history."""
        want = base_seq(seq)
        for p in reversed(self.records(vm)):
            d = p.disk(label)
            if d is not None and d.seq == want:
                return p
        return None

    # -- index -----------------------------------------------------------------------

    def load_index(self, warnings: list[str] | None = None) -> Index:
        from cbt.repo.index import load

        return load(self.storage, warnings)

    def leftovers(self) -> list[str]:
        """Names of temporary files and manifest folders no committed point owns."""
        committed = set(self.point_ids())
        out = [n for n in self.storage.list("") if _base(n).startswith(".") and ".tmp-" in n]
        for name in self.storage.list("manifests"):
            parts = name.split("/")
            if len(parts) >= 3 and parts[1] not in committed and name not in out:
                out.append(name)
        return out

    def clean_leftovers(self, names: Iterable[str]) -> None:
        """Remove what a killed run left (call only under the writer lock)."""
        for n in names:
            self.storage.delete(n)


def _base(name: str) -> str:
    """The last part of a storage name."""
    return name.rsplit("/", 1)[-1]


def _point_order(r: PointRecord) -> tuple[str, tuple[str, int]]:
    """Creation time, then the id with its ``-N`` suffix compared as a number."""
    return (r.created, id_order(r.id))
