"""An encrypted vault's keys: the master key, its wrapped copies, and passphrases.

1. ``cbt init`` draws a random 32-byte master key.  Every secret of the vault
   is derived from it (:func:`cbt.core.crypto.derive`): the data key (the AEAD
   of blobs and sealed files), the block-id key (keyed BLAKE3 ids) and the
   name key (opaque file names).
2. The master key is stored only wrapped: ``keys/<slot>.json`` holds it sealed
   (AES-256-GCM) under a key stretched from one passphrase with scrypt, with
   the salt and scrypt parameters beside it.  Each passphrase that opens the
   vault has its own slot; ``cbt key add | remove | passwd`` edit them.
3. Unlocking tries the passphrase on every slot (one scrypt per slot; a vault
   has few).  None opens: :class:`WrongPassphraseError`.
4. A passphrase comes, first found first, from the caller (``--password-file``),
   ``CBT_PASSWORD_FILE``, ``CBT_PASSWORD``, or a prompt the command line offers
   on a terminal.  A file's passphrase is its first line without its ending.

Losing every passphrase loses the vault: the master key exists nowhere else.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from cbt.core.crypto import (
    KEY_SIZE,
    AuthenticationError,
    Cipher,
    KdfParams,
    derive,
    stretch,
    tag,
)
from cbt.core.errors import CbtError, CbtValueError, untrusted_json
from cbt.format.sealed import seal, unseal

KEYS_DIR = "keys"
KEY_MAGIC = "cbt-key"
WRAP_ALGORITHM = "aes-256-gcm"
ENV_FILE = "CBT_PASSWORD_FILE"
ENV_PASSWORD = "CBT_PASSWORD"

# A passphrase, or something that finds one when (and only when) a vault needs it.
Passphrase = str | bytes | Callable[[], bytes]


class PassphraseRequiredError(CbtError, PermissionError):
    """An encrypted vault was opened with no passphrase from anywhere."""


class WrongPassphraseError(CbtError, PermissionError):
    """No key slot of the vault opens with the passphrase given."""


class BadKeySlotError(CbtError, ValueError):
    """A key slot file is not one (malformed, or its values out of bounds)."""


# -- passphrases ---------------------------------------------------------------------------

HOW_TO_GIVE = (f"give it with --password-file FILE, {ENV_FILE}=FILE or {ENV_PASSWORD}, "
               "or run on a terminal to be asked")


def read_password_file(path: str | os.PathLike[str]) -> bytes:
    """The passphrase in a file: its first line without the line ending."""
    try:
        with open(path, "rb") as f:
            line = f.readline(1 << 16)
    except OSError as exc:
        raise CbtValueError(f"cannot read password file {os.fspath(path)}: "
                            f"{exc.strerror or exc}") from None
    line = line.rstrip(b"\n").rstrip(b"\r")
    if not line:
        raise CbtValueError(f"password file {os.fspath(path)}: its first line is empty")
    return line


def passphrase_from_env(env: Mapping[str, str] | None = None) -> bytes | None:
    """``CBT_PASSWORD_FILE``'s first line, else ``CBT_PASSWORD``, else None."""
    env = os.environ if env is None else env
    if env.get(ENV_FILE):
        return read_password_file(env[ENV_FILE])
    if env.get(ENV_PASSWORD):
        return env[ENV_PASSWORD].encode()
    return None


def resolve_passphrase(given: Passphrase | None, what: str) -> bytes:
    """The passphrase ``given`` (called if it is a finder), else from the environment."""
    found: bytes | None
    if callable(given):
        found = given()
    elif isinstance(given, str):
        found = given.encode()
    else:
        found = given if given is not None else passphrase_from_env()
    if not found:
        raise PassphraseRequiredError(f"{what} is encrypted and no passphrase was given: "
                                      f"{HOW_TO_GIVE}")
    return found


# -- the unlocked keys --------------------------------------------------------------------


@dataclass(frozen=True)
class VaultKeys:
    """The secrets of an unlocked vault, all derived from its master key (picklable)."""

    algorithm: str
    master: bytes = field(repr=False)
    slot: str = ""  # the key slot that opened it

    @cached_property
    def cipher(self) -> Cipher:
        return Cipher(self.algorithm, derive(self.master, "data key"))

    @cached_property
    def id_key(self) -> bytes:
        return derive(self.master, "block id key")

    @cached_property
    def name_key(self) -> bytes:
        return derive(self.master, "name key")

    def name(self, kind: str, text: str) -> str:
        """The opaque name of ``text`` (a point id, a label...) in the vault."""
        return tag(self.name_key, kind, text)

    def seal(self, kind: str, name: str, data: bytes | bytearray | memoryview) -> bytes:
        return seal(self.cipher, kind, name, data)

    def unseal(self, kind: str, name: str, data: bytes | memoryview, where: str) -> bytes:
        return unseal(self.cipher, kind, name, data, where)


# -- key slots ------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: object, what: str) -> bytes:
    if not isinstance(text, str) or len(text) > 256:
        raise ValueError(f"{what} is not base64")
    return base64.b64decode(text, validate=True)


def _slot_aad(vault_id: str, slot_id: str) -> bytes:
    return f"{KEY_MAGIC}\0{vault_id}\0{slot_id}".encode()


def new_slot_id() -> str:
    return secrets.token_hex(8)


def is_slot_id(text: str) -> bool:
    return len(text) == 16 and all(c in "0123456789abcdef" for c in text)


def slot_name(slot_id: str) -> str:
    return f"{KEYS_DIR}/{slot_id}.json"


@dataclass(frozen=True)
class KeySlot:
    """One wrapped copy of the master key, opened by one passphrase."""

    id: str
    created: str
    params: KdfParams
    salt: bytes
    wrapped: bytes

    def to_json(self) -> bytes:
        body = {"magic": KEY_MAGIC, "id": self.id, "created": self.created, "kdf": "scrypt",
                "log_n": self.params.log_n, "r": self.params.r, "p": self.params.p,
                "salt": _b64(self.salt), "wrap": WRAP_ALGORITHM, "wrapped": _b64(self.wrapped)}
        return (json.dumps(body, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> KeySlot:
        try:
            body: Any = untrusted_json(data)
            if not isinstance(body, dict) or body.get("magic") != KEY_MAGIC:
                raise ValueError("not a cbt key slot")
            if body.get("kdf") != "scrypt" or body.get("wrap") != WRAP_ALGORITHM:
                raise ValueError("unknown key derivation or wrapping")
            ints = [body.get(k) for k in ("log_n", "r", "p")]
            if not all(type(v) is int for v in ints):
                raise ValueError("scrypt parameters are not integers")
            params = KdfParams(int(ints[0] or 0), int(ints[1] or 0), int(ints[2] or 0))
            params.check()
            slot = cls(id=str(body["id"]), created=str(body.get("created", "")),
                       params=params, salt=_unb64(body.get("salt"), "salt"),
                       wrapped=_unb64(body.get("wrapped"), "wrapped key"))
        except (ValueError, KeyError, CbtError) as exc:
            raise BadKeySlotError(f"bad key slot {where}: {exc}") from None
        if not is_slot_id(slot.id) or len(slot.salt) < 16:
            raise BadKeySlotError(f"bad key slot {where}: malformed id or salt")
        return slot

    @classmethod
    def make(cls, master: bytes, passphrase: bytes, vault_id: str, params: KdfParams,
             created: str) -> KeySlot:
        slot_id, salt = new_slot_id(), os.urandom(16)
        kek = Cipher(WRAP_ALGORITHM, stretch(passphrase, salt, params))
        return cls(slot_id, created, params, salt, kek.seal(master, _slot_aad(vault_id, slot_id)))

    def unwrap(self, passphrase: bytes, vault_id: str) -> bytes | None:
        """The master key, or None when ``passphrase`` does not open this slot."""
        kek = Cipher(WRAP_ALGORITHM, stretch(passphrase, self.salt, self.params))
        try:
            master = kek.open(self.wrapped, _slot_aad(vault_id, self.id))
        except AuthenticationError:
            return None
        return master if len(master) == KEY_SIZE else None


def new_master_key() -> bytes:
    return secrets.token_bytes(KEY_SIZE)
