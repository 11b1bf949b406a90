"""Cryptographic primitives of an encrypted vault: pure compute, no I/O, no policy.

1. :class:`Cipher` is one AEAD (AES-256-GCM or ChaCha20-Poly1305, from the
   ``cryptography`` package) under one 32-byte key.  ``seal`` returns
   ``nonce || ciphertext || tag`` with a fresh random 96-bit nonce each call;
   ``open`` checks the tag against the same associated data, or raises
   :class:`AuthenticationError`.
2. :func:`derive` makes independent 32-byte subkeys of a master key with
   BLAKE3's key derivation mode, one per purpose (its context string).
3. :func:`stretch` turns a passphrase into a key-encryption key with scrypt
   (memory-hard; its parameters are recorded beside what it wraps).
4. :func:`tag` names a thing without revealing it: keyed BLAKE3 of its kind
   and text, hex.

``cryptography`` loads on first use, so commands that never open an encrypted
vault (``cbt scan``, ``cbt --help``) do not pay for it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import blake3

from cbt.core.errors import CbtError, CbtValueError

NONCE_SIZE = 12
TAG_SIZE = 16
OVERHEAD = NONCE_SIZE + TAG_SIZE
KEY_SIZE = 32
# The AEADs a vault can name in its config; the first is the default (measured
# faster here: AES-NI and VAES make GCM 2-3x faster than ChaCha20-Poly1305).
ALGORITHMS = ("aes-256-gcm", "chacha20-poly1305")


class AuthenticationError(CbtError, ValueError):
    """Sealed data failed authentication: altered, truncated, or under another key."""


def _aead(algorithm: str, key: bytes) -> Any:
    from cryptography.hazmat.primitives.ciphers import aead

    if algorithm == "aes-256-gcm":
        return aead.AESGCM(key)
    if algorithm == "chacha20-poly1305":
        return aead.ChaCha20Poly1305(key)
    raise CbtValueError(f"unknown encryption {algorithm!r}: use one of {', '.join(ALGORITHMS)}")


class Cipher:
    """One AEAD under one key (picklable: it keeps the algorithm name and the key)."""

    def __init__(self, algorithm: str, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise CbtValueError(f"an encryption key is {KEY_SIZE} bytes, not {len(key)}")
        self.algorithm = algorithm
        self._key = key
        self._aead = _aead(algorithm, key)
        from cryptography.exceptions import InvalidTag

        self._invalid_tag = InvalidTag  # (imported once: open runs for every block restored)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Cipher, (self.algorithm, self._key))

    def seal(self, data: bytes | bytearray | memoryview, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, data, aad)  # type: ignore[no-any-return]

    def open(self, sealed: bytes | bytearray | memoryview, aad: bytes) -> bytes:
        view = memoryview(sealed)
        if len(view) < OVERHEAD:
            raise AuthenticationError("sealed data truncated")
        try:
            return self._aead.decrypt(  # type: ignore[no-any-return]
                bytes(view[:NONCE_SIZE]), view[NONCE_SIZE:], aad)
        except self._invalid_tag:
            raise AuthenticationError("authentication failed") from None


    def open_each_into(self, sealed: Sequence[memoryview], aads: Sequence[memoryview],
                       outs: Sequence[memoryview]) -> int:
        """Open each ``sealed[i]`` into ``outs[i]`` (its plaintext's exact length); the
        index of the first that fails (authentication or length), or -1 when all opened.

        Restore's loop over every raw block of a pack: nothing but the AEAD call per
        block (the nonce and the associated data are views, never copies)."""
        into = getattr(self._aead, "decrypt_into", None)  # cryptography >= 45
        invalid = self._invalid_tag
        for i, (s, a, o) in enumerate(zip(sealed, aads, outs, strict=True)):
            if len(s) != len(o) + OVERHEAD:
                return i
            try:
                if into is not None:
                    into(s[:NONCE_SIZE], s[NONCE_SIZE:], a, o)
                else:
                    o[:] = self._aead.decrypt(s[:NONCE_SIZE], s[NONCE_SIZE:], a)
            except invalid:
                return i
        return -1


def derive(master: bytes, purpose: str) -> bytes:
    """A 32-byte subkey of ``master`` for one ``purpose`` (BLAKE3 derive_key mode)."""
    return blake3.blake3(master, derive_key_context=f"cbt vault 2026 {purpose}").digest()


def tag(key: bytes, kind: str, text: str, length: int = 16) -> str:
    """An opaque name for ``text`` of ``kind``: keyed BLAKE3, ``2 * length`` hex digits."""
    return blake3.blake3(f"{kind}\0{text}".encode(), key=key).hexdigest(length)


class KdfParams(NamedTuple):
    """scrypt's cost: N = 2**log_n, block size r, parallelism p (memory 128 * r * N bytes)."""

    log_n: int = 17
    r: int = 8
    p: int = 1

    def check(self) -> None:
        """Refuse costs out of bounds (a key slot is vault input: an attacker's slot must
        not make every opening allocate gigabytes or run for minutes)."""
        if not (10 <= self.log_n <= 20 and 1 <= self.r <= 32 and 1 <= self.p <= 16):
            raise CbtValueError(f"scrypt parameters out of range: log_n {self.log_n} (10-20), "
                                f"r {self.r} (1-32), p {self.p} (1-16)")
        if self.memory > MAX_KDF_MEMORY or self.work > MAX_KDF_WORK:
            raise CbtValueError(f"scrypt cost too high: log_n {self.log_n}, r {self.r}, "
                                f"p {self.p} (at most {MAX_KDF_MEMORY >> 20} MiB and "
                                f"{MAX_KDF_WORK // KdfParams().work} times the default work)")

    @property
    def memory(self) -> int:
        """Bytes scrypt allocates: 128 * r * (N + p + 2)."""
        return 128 * self.r * ((1 << self.log_n) + self.p + 2)

    @property
    def work(self) -> int:
        """scrypt's work, N * r * p (the time it takes grows with it)."""
        return (1 << self.log_n) * self.r * self.p

    @property
    def maxmem(self) -> int:
        """The memory limit given to scrypt (below 2 GiB, OpenSSL's bound)."""
        return self.memory + (1 << 20)


# The highest scrypt costs a key slot may ask for: 1 GiB (N = 2**20 at r = 8, what
# ``cbt init --kdf-log-n 20`` makes) and 16 times the default's work.
MAX_KDF_MEMORY = (1 << 30) + (1 << 16)
MAX_KDF_WORK = 16 * (1 << 17) * 8


def stretch(passphrase: bytes, salt: bytes, params: KdfParams) -> bytes:
    """The 32-byte key-encryption key of ``passphrase`` (scrypt with ``params``)."""
    params.check()
    return hashlib.scrypt(passphrase, salt=salt, n=1 << params.log_n, r=params.r, p=params.p,
                          maxmem=params.maxmem, dklen=KEY_SIZE)
