"""The AEADs, key derivation and tags of an encrypted vault, against the ``cryptography``
and ``blake3`` packages used directly."""

from __future__ import annotations

import os

import blake3
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from cbt.core.crypto import (
    ALGORITHMS,
    NONCE_SIZE,
    OVERHEAD,
    AuthenticationError,
    Cipher,
    derive,
    tag,
)

PLAIN = {"aes-256-gcm": AESGCM, "chacha20-poly1305": ChaCha20Poly1305}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_seal_is_the_aead_with_a_fresh_nonce(algorithm: str) -> None:
    key, data, aad = os.urandom(32), os.urandom(5000), b"blob id"
    c = Cipher(algorithm, key)
    sealed = c.seal(data, aad)
    assert len(sealed) == len(data) + OVERHEAD
    # the same bytes any AEAD user would get from nonce || ciphertext || tag
    assert PLAIN[algorithm](key).decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], aad) == data
    assert c.seal(data, aad)[:NONCE_SIZE] != sealed[:NONCE_SIZE]
    assert c.open(sealed, aad) == data
    out = memoryview(bytearray(len(data)))
    assert c.open_each_into([memoryview(sealed)], [memoryview(aad)], [out]) == -1
    assert out.tobytes() == data


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_any_change_fails_authentication(algorithm: str) -> None:
    c = Cipher(algorithm, os.urandom(32))
    sealed = bytearray(c.seal(b"x" * 100, b"aad"))
    for i in (0, NONCE_SIZE, len(sealed) - 1):  # nonce, ciphertext, tag
        bad = bytearray(sealed)
        bad[i] ^= 1
        with pytest.raises(AuthenticationError):
            c.open(bad, b"aad")
    with pytest.raises(AuthenticationError):
        c.open(sealed, b"other aad")
    with pytest.raises(AuthenticationError):
        Cipher(algorithm, os.urandom(32)).open(sealed, b"aad")
    with pytest.raises(AuthenticationError):
        c.open(sealed[:OVERHEAD - 1], b"aad")


def test_subkeys_and_tags() -> None:
    master = os.urandom(32)
    assert derive(master, "a") != derive(master, "b")
    assert derive(master, "a") == blake3.blake3(
        master, derive_key_context="cbt vault 2026 a").digest()
    k = derive(master, "name key")
    assert tag(k, "point", "web.1") == blake3.blake3(b"point\0web.1", key=k).hexdigest(16)
    assert tag(k, "point", "web.1") != tag(k, "manifest", "web.1")
    assert len(tag(k, "point", "web.1")) == 32


def test_open_each_into_names_the_first_failure() -> None:
    c = Cipher("aes-256-gcm", os.urandom(32))
    blocks = [os.urandom(100 + i) for i in range(4)]
    aads = [memoryview(b"aad%d" % i) for i in range(4)]
    sealed = [memoryview(c.seal(b, a)) for b, a in zip(blocks, aads, strict=True)]
    outs = [memoryview(bytearray(len(b))) for b in blocks]
    assert c.open_each_into(sealed, aads, outs) == -1
    assert [o.tobytes() for o in outs] == blocks
    assert c.open_each_into(sealed, aads[:2] + aads[3:] + aads[2:3], outs) == 2
    assert c.open_each_into(sealed, aads, [*outs[:1], memoryview(bytearray(5)), *outs[2:]]) == 1
