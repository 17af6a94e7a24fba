"""Encryption of stored sessions at rest (``encryption_key`` setting).

memcached traffic is usually unencrypted and Redis is often shared: with an
encryption key, every payload is sealed with AES-256-GCM before it reaches
the store, so the store only ever sees ciphertext, and a payload altered or
written by anyone without the key is refused (``corrupt-payload``) before
anything in it is decoded. Keys rotate like ``secret_key``: the first key
encrypts, every key decrypts.

Layout: ``b"SSE1" | 12-byte random nonce | ciphertext | 16-byte tag``. The
store key is the associated data: a sealed record opens only under the key
it was written to, so records cannot be swapped between sessions (copying an
admin's record onto a guest's key gives a refused payload, not an admin
session). The whole payload is sealed, so a request that reads one attribute decrypts the
whole session (the per-attribute laziness of plain payloads is traded for
confidentiality). Needs the ``cryptography`` package (``sessionstore[encryption]``).
"""

from __future__ import annotations

import hashlib
import os

from .errors import ConfigError, CorruptPayload

__all__ = ["Sealer"]

_MAGIC = b"SSE1"
_NONCE = 12
_AAD = b"sessionstore payload v1"


class Sealer:
    """Seals and opens payloads with AES-256-GCM."""

    def __init__(self, keys: list[str]) -> None:
        try:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        except ImportError:
            raise ConfigError(
                "encryption_key", "needs the cryptography package: pip install 'sessionstore[encryption]'"
            ) from None
        self._ciphers = [AESGCM(_derive(key)) for key in keys]

    def seal(self, payload: bytes, key: str) -> bytes:
        """Encrypt ``payload`` for the store key ``key``."""
        nonce = os.urandom(_NONCE)
        return _MAGIC + nonce + self._ciphers[0].encrypt(nonce, payload, _aad(key))

    def open(self, data: bytes, key: str) -> bytes:
        """Decrypt a record read from ``key``; :class:`CorruptPayload` if it was not sealed for it."""
        if data[:4] != _MAGIC:
            raise CorruptPayload("payload is not encrypted but encryption_key is set; refusing it")
        nonce, sealed, aad = data[4:4 + _NONCE], data[4 + _NONCE:], _aad(key)
        for cipher in self._ciphers:
            try:
                return cipher.decrypt(nonce, sealed, aad)
            except Exception:  # InvalidTag: wrong key or altered data; try the next key
                continue
        raise CorruptPayload("payload failed authenticated decryption (altered, moved from another "
                             "session, or sealed with an unknown key)")


def _aad(store_key: str) -> bytes:
    return _AAD + b"\0" + store_key.encode("utf-8")


def _derive(key: str) -> bytes:
    """A 256-bit AES key from a configured key string."""
    return hashlib.sha256(b"sessionstore.encryption\0" + key.encode("utf-8")).digest()
