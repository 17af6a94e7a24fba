"""Signed cookie values: ``<random>.<signature>[.<node>]``.

The whole id (route included) is signed with itsdangerous (HMAC-SHA256, key
derivation per key). The route stays last so a load balancer can route on
the text after the last dot. Keys rotate: the first key signs, every key
verifies. A value that fails verification is never looked up.
"""

from __future__ import annotations

import hashlib
import secrets
from enum import Enum

from itsdangerous import Signer
from itsdangerous.encoding import base64_decode, base64_encode
from itsdangerous.signer import HMACAlgorithm

from . import ids

__all__ = ["CookieSigner", "Verdict"]

#: Longest cookie value considered at all: a signed id is ~100 characters.
MAX_COOKIE_LENGTH = 256
_SIG_LENGTH = 43  # HMAC-SHA256 in URL-safe base64


class Verdict(Enum):
    """Why a cookie value was not accepted (its debug cause code)."""

    MALFORMED = "malformed-id"
    BAD_SIGNATURE = "bad-signature"


class CookieSigner:
    """Signs ids into cookie values and verifies them back."""

    def __init__(self, secret_keys: list[str]) -> None:
        if not secret_keys:  # the start-up checks warn about this
            secret_keys = [secrets.token_urlsafe(32)]
        # itsdangerous derives a key per secret on every call; derive them once
        # (same algorithm and keys, so signatures equal itsdangerous' own).
        signer = Signer(secret_keys, salt="sessionstore.cookie", digest_method=hashlib.sha256)
        self._keys = [signer.derive_key(key) for key in secret_keys]
        self._algorithm = HMACAlgorithm(hashlib.sha256)

    def sign(self, session_id: str) -> str:
        random_part, route = ids.split_route(session_id)
        raw = self._algorithm.get_signature(self._keys[0], session_id.encode("ascii"))
        signature = base64_encode(raw).decode("ascii")
        value = f"{random_part}.{signature}"
        return value if route is None else f"{value}.{route}"

    def unsign(self, value: str) -> str | Verdict:
        """The session id, or the :class:`Verdict` saying why not."""
        if not value or len(value) > MAX_COOKIE_LENGTH or not value.isascii():
            return Verdict.MALFORMED
        parts = value.split(".")
        if len(parts) == 2:
            random_part, signature, route = parts[0], parts[1], None
        elif len(parts) == 3:
            random_part, signature, route = parts
        else:
            return Verdict.MALFORMED
        session_id = random_part if route is None else f"{random_part}.{route}"
        if len(signature) != _SIG_LENGTH or not ids.is_valid(session_id):
            return Verdict.MALFORMED
        try:
            raw = base64_decode(signature)
        except Exception:
            return Verdict.MALFORMED
        message = session_id.encode("ascii")
        if not any(self._algorithm.verify_signature(k, message, raw) for k in self._keys):
            return Verdict.BAD_SIGNATURE
        return session_id
