"""The vault: a content-addressed store of blocks, recovery points and manifests.

Layout of a vault (names in its :class:`~cbt.repo.storage.Storage`; a directory
for :class:`~cbt.repo.storage.LocalStorage`)::

    config                 JSON: magic, format_version, encryption, id_key, compression
                           (zstd, or lz4 at format 4; none: zstd), id, created
    locks/                 the holders of the vault, of each VM's runs (cbt.repo.lock)
    gc.lock                gc's lock (and each commit's)
    points/<id>.json       recovery point records; the rename of one is its commit
    manifests/<id>/<label>.arrow   full manifest or delta of each disk of a point
    index/<run>.cbtidx     index segments (digest -> pack, offset, length), paged
                           (cbt.format.paged_index); <run>.arrow: legacy ones, still read
    packs/<xx>/<id>.pack   pack files of compressed blocks

Format 1 stores blocks unencrypted (``encryption = "none"``) and names them by
their plain BLAKE3 digest (``id_key = "none"``).  Format 3 is format 1 or 2 (its
``encryption`` says which) whose index may hold paged segments: what cbt creates now,
and what a format 1 or 2 vault becomes when cbt first writes a segment into it.

Format 2 is encrypted (:mod:`cbt.repo.keys` for the key model):

1. ``config`` names the AEAD and ``id_key = "blake3-keyed"``; its ``check`` is
   a sealed copy of its other fields, so a config altered to name another
   cipher (or none) fails once the vault is unlocked.  A config that says
   ``none`` beside a ``keys/`` folder is refused (a downgrade).
2. ``keys/<slot>.json`` hold the master key wrapped by each passphrase.
3. Blocks are named by their keyed BLAKE3 and their blobs sealed in the packs.
4. Every other file is sealed whole (:mod:`cbt.format.sealed`) under an opaque
   name: ``points/<tag>.sealed``, ``manifests/<tag>/<tag>.sealed``,
   ``index/<tag>.sealed``, ``jobs/<tag>.sealed``, ``snapshots/<tag>.sealed``,
   where a tag is the keyed BLAKE3 of what the plain name would say.  The
   associated data of each is its kind and name, so none can be moved.

Every name below comes from the vault's own layout (the ``*_name`` methods),
never from a file's content.

Damage stays local: a point record that cannot be read (a flipped byte, cut
JSON, a checksum or authentication that fails) is a :class:`DamagedRecord`
(:meth:`Vault.scan_records`).  It makes its own point unavailable, and every
point whose deltas resolve through it (:meth:`Vault.unavailable`); listing,
``latest`` and the rest of the vault go on without them, naming them in
warnings.  Its manifest folder is known from its record's name alone
(:meth:`Vault.manifest_dir_of`), so it is never taken for a killed run's
leftovers, and its name is never given to a new point.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import uuid
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, Self

from cbt.core.crypto import ALGORITHMS, AuthenticationError, KdfParams
from cbt.core.errors import CbtError, CbtIOError, CbtValueError, untrusted_json
from cbt.format import records
from cbt.format.codecs import COMPRESSION
from cbt.format.records import (
    VAULT_MAGIC,
    VAULT_VERSION,
    CorruptPointError,
    DiskRecord,
    NoSuchPointError,
    PointRecord,
    base_seq,
    id_order,
    is_point_id,
    new_point_id,
)
from cbt.repo.keys import (
    KEYS_DIR,
    BadKeySlotError,
    KeySlot,
    Passphrase,
    VaultKeys,
    WrongPassphraseError,
    is_slot_id,
    new_master_key,
    resolve_passphrase,
    slot_name,
)
from cbt.repo.storage import Storage, StorageSpec
from cbt.repo.stores import open_storage, storage_at

if TYPE_CHECKING:
    from cbt.core.crypto import Cipher
    from cbt.format.manifest import Delta, Manifest
    from cbt.repo.index import Index

# The manifest and index modules (numpy, pyarrow) load when first needed: opening
# a vault and reading its points must stay cheap (``cbt backup`` starts its early
# scan from them before anything heavy is imported).

CONFIG = "config"
ENCRYPTED_VERSION = 2  # config format_version of an encrypted vault (Arrow index segments)
# config format_version of a vault that may hold paged index segments, encrypted or not (its
# ``encryption`` says which).  cbt before paged segments reads up to 2 and refuses 3: it
# would take a vault whose index it cannot see for one with no index, and its gc would
# rewrite packs that the paged segments still name.  A vault of format 1 or 2 is raised to
# 3 just before its first paged segment is written (:meth:`Vault.allow_paged_segments`).
PAGED_VERSION = 3
# config format_version of a vault whose backups write lz4 blobs (its ``compression`` is
# "lz4", chosen at ``cbt init``): cbt before lz4 reads up to 3 and refuses 4, as it would
# take every lz4 blob for a damaged one (and ``verify --repair`` would drop them).
LZ4_VERSION = 4
COMPRESSIONS = tuple(COMPRESSION)  # a config's ``compression``: zstd (the default) or lz4
ID_KEY = "blake3-keyed"
SEALED = ".sealed"
PAGED = ".cbtidx"  # a paged index segment (sealed page by page in an encrypted vault)
DEFAULT_ENCRYPTION = ALGORITHMS[0]
MAX_KEY_SLOTS = 32  # unlocking tries each: a vault has a few


class NotAVaultError(CbtError, FileNotFoundError):
    """The path is not a cbt vault."""


class VaultVersionError(CbtError, ValueError):
    """The vault was made by a newer cbt."""


class DamagedRecord(NamedTuple):
    """A point record that cannot be read: its point (and every point whose manifests
    resolve through it) is unavailable; the rest of the vault is not."""

    name: str  # its name in the storage
    where: str  # where it is, for messages
    point: str | None  # the point id its file name says (unencrypted vault), else None
    error: str

    @property
    def message(self) -> str:
        """What is wrong, naming the file."""
        return self.error if self.where in self.error else f"{self.where}: {self.error}"

    def warning(self) -> str:
        what = f"point {self.point}" if self.point else "its point"
        return f"damaged point record, {what} is unavailable: {self.message}"


class VaultSpec(NamedTuple):
    """What a worker needs to reopen a vault without its passphrase (picklable and
    hashable: a worker process keys its cache of the run's index by it)."""

    storage: StorageSpec
    config: str  # the config as JSON
    keys: VaultKeys | None


class Vault:
    """A vault opened for reading and, under its locks (cbt.repo.lock), writing.

    ``keys`` is None for an unencrypted (format 1) vault, else its unlocked keys.
    """

    def __init__(self, storage: Storage, config: dict[str, Any],
                 keys: VaultKeys | None = None) -> None:
        self.storage = storage
        self.config = config
        self.keys = keys
        self._manifest_cache: dict[tuple[str, str], Manifest] = {}

    @property
    def encrypted(self) -> bool:
        return self.keys is not None

    @property
    def compression(self) -> str:
        """Its config's ``compression`` (:data:`COMPRESSIONS`; a vault made before the
        choice has none: zstd)."""
        return str(_compression(self.config))

    @property
    def codec(self) -> int:
        """The codec its backups compress new blocks with (:data:`COMPRESSION`)."""
        return COMPRESSION[self.compression]

    def spec(self) -> VaultSpec:
        return VaultSpec(self.storage.spec(), json.dumps(self.config, sort_keys=True), self.keys)

    @classmethod
    def from_spec(cls, spec: VaultSpec) -> Self:
        """The vault of a :meth:`spec` (a worker's reopening; no passphrase, no KDF)."""
        return cls(open_storage(spec.storage), json.loads(spec.config), spec.keys)

    @property
    def root(self) -> str:
        return self.storage.root

    # -- creation and opening ---------------------------------------------------

    @classmethod
    def init(cls, path: str | os.PathLike[str], encryption: str = "none",
             passphrase: Passphrase | None = None, kdf: KdfParams | None = None,
             compression: str = "zstd") -> Self:
        """Create a vault in a new or empty directory, or at a new or empty
        ``s3://BUCKET/PREFIX`` (its bucket made when missing), see :meth:`create`."""
        _check_compression(compression)
        if encryption != "none":
            _check_algorithm(encryption)
            passphrase = resolve_passphrase(passphrase, f"the new vault {os.fspath(path)}")
        return cls.create(storage_at(path, create=True), encryption, passphrase, kdf,
                          compression)

    @classmethod
    def create(cls, storage: Storage, encryption: str = "none",
               passphrase: Passphrase | None = None, kdf: KdfParams | None = None,
               compression: str = "zstd") -> Self:
        """Create a vault on an empty storage (any kind: local, memory).

        ``encryption`` is ``"none"`` or an AEAD of :data:`cbt.core.crypto.ALGORITHMS`
        (then ``passphrase`` opens its first key slot, stretched with ``kdf``);
        ``compression`` (:data:`COMPRESSIONS`) the codec its backups write.  Format 3
        (:data:`PAGED_VERSION`), or 4 (:data:`LZ4_VERSION`) for lz4.
        """
        _check_compression(compression)
        if encryption != "none":
            _check_algorithm(encryption)
            secret = resolve_passphrase(passphrase, f"the new vault {storage.root}")
        if storage.list(""):
            raise CbtIOError(errno.ENOTEMPTY, f"storage not empty: {storage.root} (a new vault "
                             "needs an empty one)")
        from cbt.core.timefmt import utc_now

        config: dict[str, Any] = {
            "magic": VAULT_MAGIC,
            "format_version": LZ4_VERSION if compression == "lz4" else PAGED_VERSION,
            "encryption": "none", "id_key": "none", "compression": compression,
            "id": uuid.uuid4().hex, "created": utc_now()}
        keys = None
        if encryption != "none":
            config.update(encryption=encryption, id_key=ID_KEY)
            keys = VaultKeys(encryption, new_master_key())
            config["check"] = _config_check(config, keys)
            storage.make_prefix(KEYS_DIR)
            slot = KeySlot.make(keys.master, secret, config["id"], kdf or KdfParams(),
                                config["created"])
            storage.put(slot_name(slot.id), slot.to_json())
        for sub in ("points", "manifests", "index", "packs"):
            storage.make_prefix(sub)
        storage.put(CONFIG, _config_bytes(config))
        return cls(storage, config, keys)

    @classmethod
    def open(cls, path: str | os.PathLike[str], passphrase: Passphrase | None = None) -> Self:
        """Open the vault in a local directory or at ``s3://BUCKET/PREFIX``."""
        return cls.open_on(storage_at(path), passphrase)

    @classmethod
    def open_on(cls, storage: Storage, passphrase: Passphrase | None = None) -> Self:
        """Open the vault on ``storage`` (any kind: local, memory).

        An encrypted vault is unlocked with ``passphrase`` (a finder is called only
        then; None: ``CBT_PASSWORD_FILE`` or ``CBT_PASSWORD``); an unencrypted one
        ignores it.
        """
        config = cls._read_config(storage)
        if config.get("encryption") == "none":
            return cls(storage, config)
        secret = resolve_passphrase(passphrase, f"vault {storage.root}")
        return cls(storage, config, unlock(storage, config, secret))

    @classmethod
    def is_encrypted(cls, storage: Storage) -> bool:
        """Whether the vault on ``storage`` is encrypted (reads its config only)."""
        return cls._read_config(storage).get("encryption") != "none"

    @staticmethod
    def _read_config(storage: Storage) -> dict[str, Any]:
        where = storage.root
        try:
            raw = storage.get(CONFIG)
        except CbtIOError as exc:
            if exc.errno != errno.ENOENT:
                raise
            gone = storage.missing()
            why = f": {gone}" if gone else " (run cbt init)"
            raise NotAVaultError(errno.ENOENT, f"not a cbt vault: {where}{why}") from None
        damaged = f"not a cbt vault: {where}: its config {storage.where(CONFIG)} is damaged"
        try:
            config: dict[str, Any] = untrusted_json(raw)
            magic, version = config["magic"], config["format_version"]
            if type(version) is not int:  # ("4", 4.5, true: no cbt writes them)
                raise TypeError(f"format_version {version!r} is not an integer")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            why = "empty" if not raw else f"not a cbt config ({type(exc).__name__}: {exc})"
            raise NotAVaultError(errno.ENOENT, f"{damaged}: {why}") from None
        if magic != VAULT_MAGIC:
            raise NotAVaultError(errno.ENOENT, f"{damaged}: its magic is not cbt's")
        if version > LZ4_VERSION:
            raise VaultVersionError(f"vault {where} has format version {version}; this cbt reads "
                                    f"up to {LZ4_VERSION} (upgrade cbt)")
        plain = (version in (VAULT_VERSION, PAGED_VERSION, LZ4_VERSION)
                 and config.get("encryption") == "none" and config.get("id_key") == "none")
        sealed = (version in (ENCRYPTED_VERSION, PAGED_VERSION, LZ4_VERSION)
                  and config.get("encryption") in ALGORITHMS and config.get("id_key") == ID_KEY)
        compression = _compression(config)
        if compression not in COMPRESSIONS or (compression == "lz4") != (version == LZ4_VERSION):
            raise VaultVersionError(f"vault {where}: config names compression {compression!r} "
                                    f"at format version {version} (altered config?)")
        if not (plain or sealed):
            raise VaultVersionError(f"vault {where}: config names an unknown encryption "
                                    f"{config.get('encryption')!r} or block ids "
                                    f"{config.get('id_key')!r}")
        if plain and (storage.list(KEYS_DIR) or _holds_sealed(storage)):
            raise VaultVersionError(f"vault {where}: config says unencrypted but the vault holds "
                                    "keys or sealed files (altered config?); refusing to write "
                                    "plaintext into it")
        if not isinstance(config.get("id"), str):
            raise NotAVaultError(errno.ENOENT, f"not a cbt vault: {where} (config has no id)")
        return config

    def allow_paged_segments(self) -> None:
        """Raise a format 1 or 2 vault to format 3 (:data:`PAGED_VERSION`) before a paged
        segment is written into it, so that a cbt that cannot read them refuses the vault
        instead of misreading it.  The config is replaced whole, in one put (an encrypted
        vault's ``check`` sealed anew: it covers the version); a no-op once done."""
        if int(self.config["format_version"]) >= PAGED_VERSION:
            return
        config = {k: v for k, v in self.config.items() if k != "check"}
        config["format_version"] = PAGED_VERSION
        if self.keys is not None:
            config["check"] = _config_check(config, self.keys)
        self.storage.put(CONFIG, _config_bytes(config))
        self.config = config

    # -- names: every name in the vault comes from here -----------------------------

    def _tag(self, kind: str, text: str) -> str:
        assert self.keys is not None
        return self.keys.name(kind, text)

    def point_name(self, point_id: str) -> str:
        if self.keys is None:
            return records.point_name(point_id)
        return f"points/{self._tag('point', point_id)}{SEALED}"

    def manifest_dir(self, point_id: str) -> str:
        """The folder of a point's manifests."""
        return f"manifests/{point_id if self.keys is None else self._tag('point', point_id)}"

    def manifest_name(self, point_id: str, label: str) -> str:
        if self.keys is None:
            return records.manifest_name(point_id, label)
        leaf = self._tag("manifest", point_id + "/" + label)
        return f"{self.manifest_dir(point_id)}/{leaf}{SEALED}"

    def legacy_segment_name(self, run: str) -> str:
        """A legacy (Arrow) index segment's name for ``run``: what cbt wrote before paged
        segments, still read (and merged into a paged one by the next compaction)."""
        if self.keys is None:
            return f"index/{run}.arrow"
        return f"index/{self._tag('index', run)}{SEALED}"

    def job_name(self, job_id: str) -> str:
        if self.keys is None:
            return f"jobs/{job_id}.json"
        return f"jobs/{self._tag('job', job_id)}{SEALED}"

    def kept_name(self, point_id: str) -> str:
        if self.keys is None:
            return f"snapshots/{point_id}.json"
        return f"snapshots/{self._tag('snapshots', point_id)}{SEALED}"

    @property
    def record_suffix(self) -> str:
        """The suffix of point, job and kept-snapshot records."""
        return ".json" if self.keys is None else SEALED

    def segment_name(self, run: str) -> str:
        """An index segment's name for ``run`` (a point id, ``merged-<uuid>``...): a paged
        segment (:mod:`cbt.format.paged_index`)."""
        if self.keys is None:
            return f"index/{run}{PAGED}"
        return f"index/{self._tag('index', run)}{PAGED}"

    @staticmethod
    def is_paged_segment(name: str) -> bool:
        return name.endswith(PAGED)

    def segment_names(self) -> list[str]:
        """Every index segment: the legacy Arrow ones and the paged ones."""
        suffix = ".arrow" if self.keys is None else SEALED
        return [s for s in self.storage.list("index")
                if (s.endswith(suffix) or s.endswith(PAGED)) and not _base(s).startswith(".")]

    # -- sealed files: plain in an unencrypted vault ---------------------------------

    def seal(self, kind: str, name: str, data: bytes | bytearray | memoryview
             ) -> bytes | bytearray | memoryview:
        return data if self.keys is None else self.keys.seal(kind, name, data)

    def unseal(self, kind: str, name: str, data: bytes) -> bytes:
        if self.keys is None:
            return data
        return self.keys.unseal(kind, name, data, self.storage.where(name))

    def put_sealed(self, kind: str, name: str, data: bytes | bytearray | memoryview) -> None:
        self.storage.put(name, self.seal(kind, name, data))

    def get_sealed(self, kind: str, name: str) -> bytes:
        return self.unseal(kind, name, self.storage.get(name))

    @property
    def cipher(self) -> Cipher | None:
        """The cipher of sealed files and segment pages (None: an unencrypted vault)."""
        return self.keys.cipher if self.keys is not None else None

    @property
    def id_key(self) -> bytes | None:
        """The key of keyed BLAKE3 block ids (None: plain BLAKE3)."""
        return None if self.keys is None else self.keys.id_key

    # -- key slots ---------------------------------------------------------------------

    def key_slots(self) -> list[KeySlot]:
        return read_slots(self.storage)

    def add_key(self, passphrase: bytes, kdf: KdfParams | None = None) -> KeySlot:
        """A new key slot opened by ``passphrase`` (call with the vault alone)."""
        from cbt.core.timefmt import utc_now

        keys = self._require_keys()
        if len(self.key_slots()) >= MAX_KEY_SLOTS:
            raise CbtValueError(f"vault {self.root} has {MAX_KEY_SLOTS} key slots already, "
                                "the most it may have (remove one first)")
        slot = KeySlot.make(keys.master, passphrase, self.config["id"], kdf or KdfParams(),
                            utc_now())
        self.storage.put(slot_name(slot.id), slot.to_json())
        return slot

    def remove_key(self, slot_id: str) -> None:
        """Remove a key slot; the last one cannot be (call with the vault alone)."""
        self._require_keys()
        slots, damaged = scan_slots(self.storage)
        ids = [k.id for k in slots]
        if damaged and is_slot_id(slot_id) and self.storage.exists(slot_name(slot_id)):
            ids.append(slot_id)  # (a damaged one, by its file name)
        if slot_id not in ids:
            raise CbtValueError(f"vault {self.root} has no key {slot_id!r}")
        if len(ids) == 1:
            raise CbtValueError("cannot remove the last key of a vault: it would lose every "
                                "point (add another first)")
        self.storage.delete(slot_name(slot_id))
        self.storage.sync(KEYS_DIR)

    def _require_keys(self) -> VaultKeys:
        if self.keys is None:
            raise CbtValueError(f"vault {self.root} is not encrypted: it has no keys")
        return self.keys

    # -- points -------------------------------------------------------------------

    def point_names(self) -> list[str]:
        """The names of every point record (committed: temporary names are skipped)."""
        return [n for n in self.storage.list("points") if n.count("/") == 1
                and n.endswith(self.record_suffix) and not _base(n).startswith(".")]

    def point_ids(self) -> list[str]:
        """The ids of every point record (by file name in an unencrypted vault: a name that
        is no point id is still listed, and :meth:`load_point` says what is wrong with it;
        in an encrypted vault the ids of the records that can be read)."""
        if self.keys is None:
            return [n[len("points/"):-5] for n in self.point_names()]
        return [r.id for r in self.scan_records()[0]]

    def load_point(self, point_id: str) -> PointRecord:
        """The record of ``point_id``, checked (:meth:`_read_point`)."""
        if self.keys is None and not is_point_id(point_id):
            raise CorruptPointError(f"corrupt point record "
                                    f"{self.storage.where(self.point_name(point_id))}: the "
                                    "file name is not <point id>.json")
        return self._read_point(self.point_name(point_id))

    def _read_point(self, name: str) -> PointRecord:
        """The record in ``name``, checked: it keeps the rules of :meth:`PointRecord.problem`,
        it is the point ``name`` is the name of, and each disk names the manifest
        :meth:`manifest_name` gives; else :class:`CorruptPointError` naming the file."""
        where = self.storage.where(name)
        record = PointRecord.from_json(self.get_sealed("point", name), where)
        if self.point_name(record.id) != name:
            raise CorruptPointError(f"corrupt point record {where}: it holds point "
                                    f"{record.id}, which is not its name")
        for d in record.disks:
            if d.manifest != self.manifest_name(record.id, d.label):
                raise CorruptPointError(f"corrupt point record {where}: disk {d.label} names "
                                        f"manifest {d.manifest!r}, not "
                                        f"{self.manifest_name(record.id, d.label)!r}")
        return record

    def scan_records(self) -> tuple[list[PointRecord], list[DamagedRecord]]:
        """Every point record that can be read, and every one that cannot (damaged, failing
        authentication, unreadable): damage stays with its own point.  A record removed
        while this runs (a prune) is neither."""
        good: list[PointRecord] = []
        damaged: list[DamagedRecord] = []
        for name in self.point_names():
            pid = name[len("points/"):-5] if self.keys is None else None
            try:
                if pid is not None and not is_point_id(pid):
                    raise CorruptPointError(f"corrupt point record {self.storage.where(name)}: "
                                            "the file name is not <point id>.json")
                good.append(self._read_point(name))
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    continue
                damaged.append(DamagedRecord(name, self.storage.where(name), pid, str(exc)))
            except CbtError as exc:
                damaged.append(DamagedRecord(name, self.storage.where(name), pid, str(exc)))
        for name, why in self._odd_records():
            pid = name[len("points/"):-5] if self.keys is None else None
            damaged.append(DamagedRecord(name, self.storage.where(name),
                                         pid if pid is not None and is_point_id(pid) else None,
                                         why))
        return good, damaged

    def _odd_records(self) -> list[tuple[str, str]]:
        """Point records that are there but are no regular file (a link, a folder in the
        place of one), found by their manifest folders: (name, what is wrong).  Listing
        names regular files only; without this, such a point vanished unnamed, and its
        manifests looked like a killed run's leftovers."""
        names = set(self.point_names())
        out = []
        for leaf in sorted({n.split("/")[1] for n in self.storage.list("manifests")
                            if n.count("/") >= 2}):
            name = f"points/{leaf}{self.record_suffix}"
            if name in names:
                continue
            try:
                self.storage.stat(name)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                    out.append((name, str(exc)))
                continue
            if not self.storage.exists(name):
                out.append((name, f"not a regular file: {self.storage.where(name)}"))
        return out

    def damaged_records(self) -> list[DamagedRecord]:
        """The point records that cannot be read (:meth:`scan_records`)."""
        return self.scan_records()[1]

    def records(self, vm: str | None = None, warnings: list[str] | None = None
                ) -> list[PointRecord]:
        """Every point record that can be read, hidden ones (pruned bases of kept deltas)
        included; a damaged one is skipped and named in ``warnings`` (those of ``vm`` only,
        where the file name tells)."""
        good, damaged = self.scan_records()
        if warnings is not None:
            warnings += [d.warning() for d in damaged
                         if vm is None or d.point is None or d.point.startswith(vm + ".")]
        records = good if vm is None else [r for r in good if r.vm == vm]
        return sorted(records, key=_point_order)

    def unavailable(self, records: list[PointRecord],
                    only: set[str] | None = None) -> dict[str, str]:
        """Point id -> why it cannot be resolved, for each of ``records`` whose manifests are
        based (through any number of deltas) on a point whose record is damaged or gone
        (with ``only``: one whose record has one of these names)."""
        by_id = {r.id: r for r in records}
        out: dict[str, str] = {}
        for r in records:
            for d in r.disks:
                base, seen = d.base, {r.id}
                while base is not None and base not in seen:
                    seen.add(base)
                    held = by_id.get(base)
                    below = held.disk(d.label) if held is not None else None
                    if below is None:
                        if only is not None and self.point_name(base) not in only:
                            break
                        out[r.id] = (f"point {r.id} is unavailable: its disk {d.label} is "
                                     f"based on point {base}, whose record is damaged or gone "
                                     f"({self.storage.where(self.point_name(base))})")
                        break
                    base = below.base
                if r.id in out:
                    break
        return out

    def points(self, vm: str | None = None, warnings: list[str] | None = None
               ) -> list[PointRecord]:
        """Committed points that can be restored, oldest first (by creation time, then id):
        a point whose record is damaged, or that is based on one, is left out (and named in
        ``warnings``)."""
        records = self.records(vm, warnings)
        lost = self.unavailable(records)
        if warnings is not None:
            warnings += [why for r in records if not r.hidden and (why := lost.get(r.id))]
        return [r for r in records if not r.hidden and r.id not in lost]

    def latest(self, vm: str, warnings: list[str] | None = None) -> PointRecord | None:
        """The VM's latest point that can be restored (see :meth:`points`)."""
        pts = self.points(vm, warnings)
        return pts[-1] if pts else None

    def point(self, ref: str) -> PointRecord:
        """A point by id, unique id prefix, or ``<vm>.latest``; a point whose record is
        damaged is an error naming the file."""
        return self.points_named([ref])[0]

    def points_named(self, refs: list[str]) -> list[PointRecord]:
        """:meth:`point` of each of ``refs``, from one reading of the records (not one
        per name: on S3 each is a request per point)."""
        good, damaged = self.scan_records()
        return [self._named(ref, good, damaged) for ref in refs]

    def _named(self, ref: str, good: list[PointRecord],
               damaged: list[DamagedRecord]) -> PointRecord:
        if ref.endswith(".latest"):
            vm = ref[: -len(".latest")]
            mine = sorted((r for r in good if r.vm == vm), key=_point_order)
            lost = self.unavailable(mine)
            pts = [r for r in mine if not r.hidden and r.id not in lost]
            if not pts:
                raise NoSuchPointError(f"no recovery point of VM {vm!r} in {self.root}")
            return pts[-1]
        by_id = {p.id: p for p in good if not p.hidden}
        if ref in by_id:
            return by_id[ref]
        for d in damaged:
            if d.point == ref or (is_point_id(ref) and d.name == self.point_name(ref)):
                raise CorruptPointError(f"point {ref} is unavailable: {d.message}")
        matches = [i for i in by_id if i.startswith(ref)]
        if len(matches) == 1:
            return by_id[matches[0]]
        if not matches:
            raise NoSuchPointError(f"no recovery point {ref!r} in {self.root}")
        raise NoSuchPointError(f"{ref!r} matches {len(matches)} points in {self.root}; "
                               "give more of the id")

    def unused_point_id(self, vm: str, created: str) -> str:
        """A new point id for ``vm`` at ``created``, taken by no record (a damaged one
        included: in an encrypted vault its id is known only by its name), nor named as a
        base by one (a base set aside or gone: reused, its id would resolve the deltas
        based on it through other manifests)."""
        names = set(self.point_names())
        good, _damaged = self.scan_records()
        existing = {r.id for r in good} | {d.base for r in good for d in r.disks
                                           if d.base is not None}
        if self.keys is None:
            existing |= set(self.point_ids())
        while True:
            pid = new_point_id(vm, created, existing)
            if self.point_name(pid) not in names:
                return pid
            existing.add(pid)

    # -- manifests -----------------------------------------------------------------

    def read_manifest_file(self, name: str) -> Manifest | Delta:
        from cbt.format.manifest import read_manifest_bytes

        return read_manifest_bytes(self.get_sealed("manifest", name), self.storage.where(name))

    def _read_committed_manifest(self, name: str, disk: DiskRecord) -> Manifest | Delta:
        """The manifest file ``name`` of ``disk``, checked against the checksum its point
        recorded (in an unencrypted vault: a whole manifest of another point copied over
        it reads fine, and would restore that point's data; sealed ones name their file)."""
        if self.keys is not None or not disk.manifest_checksum:
            return self.read_manifest_file(name)
        import blake3

        from cbt.format.manifest import read_manifest_bytes

        raw = self.storage.get(name)
        if blake3.blake3(raw).hexdigest() != disk.manifest_checksum:
            raise CorruptPointError(f"corrupt manifest {self.storage.where(name)}: it differs "
                                    "from the one its point recorded (checksum)")
        return read_manifest_bytes(raw, self.storage.where(name))

    def forget_manifests(self) -> None:
        """Drop the manifests :meth:`resolve` keeps (every one it resolved, bases too): a
        long-lived reader (``cbt mount``) keeps its own, bounded."""
        self._manifest_cache.clear()

    def resolve(self, point: PointRecord, label: str, opened: list[str] | None = None) -> Manifest:
        """The full manifest of one disk of a point (full file plus its deltas)."""
        key = (point.id, label)
        if key in self._manifest_cache:
            return self._manifest_cache[key]
        disk = point.disk(label)
        if disk is None:
            raise NoSuchPointError(f"point {point.id} has no disk {label!r}")
        name = self.manifest_name(point.id, label)
        if opened is not None:
            opened.append(name)
        from cbt.format.manifest import Delta

        m = self._read_committed_manifest(name, disk)
        if (m.disk_size, m.block_size) != (disk.size, disk.block_size):
            raise CorruptPointError(f"corrupt manifest {self.storage.where(name)}: "
                                    f"{m.disk_size} bytes in blocks of {m.block_size}, where "
                                    f"point {point.id} says {disk.size} in {disk.block_size}")
        if isinstance(m, Delta):
            if disk.base is None:
                raise NoSuchPointError(f"point {point.id} disk {label}: delta without a base")
            try:
                base_point = self.load_point(disk.base)
            except (CbtError, OSError) as exc:
                raise CorruptPointError(f"point {point.id} disk {label} is unavailable: it is "
                                        f"based on point {disk.base}: {exc}") from None
            base_disk = base_point.disk(label)
            if base_disk is not None and base_disk.seq >= disk.seq:
                # a chain goes down to seq 0: this one would loop
                raise CorruptPointError(f"point {point.id} disk {label}: its base "
                                        f"{base_point.id} is not earlier in the chain")
            base = self.resolve(base_point, label, opened)
            try:
                full = m.apply(base)
            except MemoryError:
                raise CorruptPointError(f"manifest {self.storage.where(name)}: its "
                                        f"{disk.blocks} blocks do not fit in memory") from None
        else:
            full = m
        full.source = disk.path
        full.created = point.created
        self._manifest_cache[key] = full
        return full

    def chain_base(self, vm: str, label: str, seq: int,
                   prev: PointRecord | None = None) -> PointRecord | None:
        """The point holding ``label`` at ``base_seq(seq)`` in the VM's history: on the
        chain of ``prev`` (the point the new one follows) when given, so a damaged record
        or a point based on one is never picked."""
        want = base_seq(seq)
        if prev is not None:
            point: PointRecord | None = prev
            while point is not None:
                d = point.disk(label)
                if d is None or d.seq < want:
                    return None
                if d.seq == want:
                    return point
                point = self.load_point(d.base) if d.base is not None else None
            return None
        for p in reversed(self.records(vm)):
            d = p.disk(label)
            if d is not None and d.seq == want:
                return p
        return None

    # -- index -----------------------------------------------------------------------

    def load_index(self, warnings: list[str] | None = None, headers: bool = False,
                   exclude: Mapping[str, str] | None = None) -> Index:
        """The index (:func:`cbt.repo.index.load`: a damaged segment's packs are indexed from
        their trailers, and with ``headers`` from their blob headers when that is lost)."""
        from cbt.repo.index import load, open_paged

        return load(self.storage, warnings, self.segment_names,
                    lambda name: self.get_sealed("index", name), headers,
                    lambda name: open_paged(self.storage, name, self.cipher), exclude)

    def manifest_dir_of(self, record_name: str) -> str:
        """The folder of the manifests of the point whose record is ``record_name`` (known
        from the name alone, so a damaged record keeps its manifests)."""
        leaf = _base(record_name)[: -len(self.record_suffix)]
        return f"manifests/{leaf}"

    def leftovers(self, before: float | None = None) -> list[str]:
        """Names of temporary files and manifest folders no committed point owns (a damaged
        record still owns its folder: its name says which); with ``before`` (epoch
        seconds), only those last written before then (what no running backup can own:
        :func:`cbt.repo.lock.objects_before`)."""
        committed = {self.manifest_dir_of(n).split("/")[1]
                     for n in [*self.point_names(), *(n for n, _ in self._odd_records())]}
        out = [n for n in self.storage.list("") if _base(n).startswith(".") and ".tmp-" in n]
        for name in self.storage.list("manifests"):
            parts = name.split("/")
            if len(parts) >= 3 and parts[1] not in committed and name not in out:
                out.append(name)
        if before is None:
            return out
        return [n for n in out if self._written_before(n, before)]

    def _written_before(self, name: str, before: float) -> bool:
        try:
            return self.storage.stat(name).mtime < before
        except OSError:
            return False  # gone meanwhile (or unreadable: not ours to remove)

    def vm_lock_name(self, vm: str) -> str:
        """The leaf of the lock of one VM's runs (opaque in an encrypted vault)."""
        return vm if self.keys is None else self._tag("lock", vm)

    def clean_leftovers(self, names: Iterable[str]) -> None:
        """Remove what a killed run left (only what no running backup can own:
        :meth:`leftovers` with ``before``)."""
        for n in names:
            self.storage.delete(n)


def _check_algorithm(encryption: str) -> None:
    if encryption not in ALGORITHMS:
        raise CbtValueError(f"unknown encryption {encryption!r}: use none or "
                            f"{' or '.join(ALGORITHMS)}")


def _config_bytes(config: dict[str, Any]) -> bytes:
    """The config as the vault stores it."""
    return (json.dumps(config, indent=1) + "\n").encode()


def _compression(config: dict[str, Any]) -> Any:
    return config.get("compression", "zstd")  # (checked when the config was read)


def _check_compression(compression: str) -> None:
    if compression not in COMPRESSIONS:
        raise CbtValueError(f"unknown compression {compression!r} (one of "
                            f"{', '.join(COMPRESSIONS)})")


def _config_aad(config: dict[str, Any]) -> bytes:
    """What the config's ``check`` authenticates: every other field, canonical JSON."""
    body = {k: v for k, v in config.items() if k != "check"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _config_check(config: dict[str, Any], keys: VaultKeys) -> str:
    return base64.b64encode(keys.cipher.seal(b"cbt-config", _config_aad(config))).decode()


def read_slots(storage: Storage) -> list[KeySlot]:
    """Every key slot of the vault on ``storage``; a malformed one is an error naming it."""
    slots, damaged = scan_slots(storage)
    if damaged:
        raise damaged[0]
    return slots


def scan_slots(storage: Storage) -> tuple[list[KeySlot], list[BadKeySlotError]]:
    """The key slots that can be read, and the errors of those that cannot (damage to one
    slot locks out its own passphrase only)."""
    names = [n for n in storage.list(KEYS_DIR) if n.endswith(".json")
             and not _base(n).startswith(".")]
    if len(names) > MAX_KEY_SLOTS:
        raise BadKeySlotError(f"vault {storage.where(KEYS_DIR)} holds {len(names)} key slots, "
                              f"more than {MAX_KEY_SLOTS} (each costs a key derivation to try)")
    slots: list[KeySlot] = []
    damaged: list[BadKeySlotError] = []
    for n in names:
        try:
            slots.append(KeySlot.from_json(storage.get(n), storage.where(n)))
        except BadKeySlotError as exc:
            damaged.append(exc)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # (removed meanwhile: not a slot any more)
                damaged.append(BadKeySlotError(f"bad key slot {storage.where(n)}: {exc}"))
    return slots, damaged


def unlock(storage: Storage, config: dict[str, Any], passphrase: bytes) -> VaultKeys:
    """The keys of the encrypted vault on ``storage``, opened by ``passphrase`` (from any
    slot that can be read: a damaged one is skipped, and named if none opens)."""
    slots, damaged = scan_slots(storage)
    if not slots and damaged:
        raise damaged[0]
    if not slots:
        raise BadKeySlotError(f"vault {storage.root} is encrypted but has no key slots in "
                              f"{KEYS_DIR}/ (the vault cannot be opened)")
    # cheapest first: a slot someone added at the highest cost allowed is tried last
    for slot in sorted(slots, key=lambda s: (s.params.work, s.params.memory)):
        master = slot.unwrap(passphrase, config["id"])
        if master is None:
            continue
        keys = VaultKeys(config["encryption"], master, slot.id)
        try:
            ok = keys.cipher.open(base64.b64decode(str(config.get("check", "")), validate=True),
                                  _config_aad(config)) == b"cbt-config"
        except (AuthenticationError, ValueError):
            ok = False
        if not ok:
            raise VaultVersionError(f"vault {storage.where(CONFIG)}: config fails "
                                    "authentication (altered?)")
        return keys
    if damaged:
        raise WrongPassphraseError(f"wrong passphrase, or its key slot is damaged: {damaged[0]}")
    raise WrongPassphraseError("wrong passphrase")


def _holds_sealed(storage: Storage) -> bool:
    """Whether any point record or index segment is a sealed file (an encrypted vault's)."""
    return any(n.endswith(SEALED) for sub in ("points", "index") for n in storage.list(sub))


def _base(name: str) -> str:
    """The last part of a storage name."""
    return name.rsplit("/", 1)[-1]


def _point_order(r: PointRecord) -> tuple[str, tuple[str, int]]:
    """Creation time, then the id with its ``-N`` suffix compared as a number."""
    return (r.created, id_order(r.id))
