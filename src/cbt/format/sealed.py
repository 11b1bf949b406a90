"""Sealed files: how an encrypted vault stores a record, manifest or index segment.

Layout::

    b"CBTSEAL1"   8 B magic
    nonce        12 B, fresh for every write
    ciphertext   the plain file (JSON record, Arrow manifest or segment)
    tag          16 B

The associated data is the magic, the file's kind and its name in the vault,
so a sealed file moved to another name or kind fails authentication before
anything parses it.  Blobs in packs are sealed per blob instead (see
:mod:`cbt.format.pack`).
"""

from __future__ import annotations

from cbt.core.crypto import AuthenticationError, Cipher
from cbt.core.errors import CbtError

# Do not modify: identifies every sealed file ever written (vault format 2).
SEALED_MAGIC = b"CBTSEAL1"
KINDS = ("point", "manifest", "index", "job", "snapshots", "lock")


class SealedFileError(CbtError, ValueError):
    """A sealed file fails authentication or is not a sealed file."""


def _aad(kind: str, name: str) -> bytes:
    if kind not in KINDS:
        raise ValueError(f"unknown sealed kind {kind!r}")
    return SEALED_MAGIC + kind.encode() + b"\0" + name.encode()


def seal(cipher: Cipher, kind: str, name: str, data: bytes | bytearray | memoryview) -> bytes:
    return SEALED_MAGIC + cipher.seal(data, _aad(kind, name))


def unseal(cipher: Cipher, kind: str, name: str, data: bytes | memoryview, where: str) -> bytes:
    """The plain content of a sealed file; :class:`SealedFileError` naming ``where`` if it
    was altered, truncated, moved, or sealed under another vault's key."""
    view = memoryview(data)
    if bytes(view[:len(SEALED_MAGIC)]) != SEALED_MAGIC:
        raise SealedFileError(f"{where}: not a sealed file of an encrypted vault")
    try:
        return cipher.open(view[len(SEALED_MAGIC):], _aad(kind, name))
    except AuthenticationError:
        raise SealedFileError(f"{where}: fails authentication (altered, damaged, or not of "
                              "this vault)") from None
