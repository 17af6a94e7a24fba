"""Signed cookie values: ``<random><signature>[.<node>]``.

The whole id (route included) is signed with itsdangerous (HMAC-SHA256, key
derivation per key). The random part and the signature are both exactly 43
URL-safe characters, so they are simply concatenated: the value holds at
most one dot, before the route, and balancers that take the route after the
first dot (Apache mod_proxy_balancer, mod_jk) or after the last one (nginx
maps, HAProxy) read the same route. Keys rotate: the first key signs, every key
verifies. A value that fails verification is never looked up.

Only the exact text :meth:`CookieSigner.sign` writes verifies: the signature
is compared, as text, with the canonical encoding of each key's MAC (URL-safe
alphabet, no padding, zero spare bits in the last character). Lenient base64
decoding would accept other spellings of one signature (``+``/``/`` for
``-``/``_``, flipped spare bits, padding), so several cookie strings would
open one session. The random part needs no such check: it is signed as text,
so any other spelling of it is another id, and its signature fails.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from enum import Enum

from itsdangerous import Signer
from itsdangerous.encoding import base64_encode

from . import ids

__all__ = ["CookieSigner", "Verdict", "split_cookie"]

#: Longest cookie value considered at all: a signed id is ~100 characters.
MAX_COOKIE_LENGTH = 256
_SIG_LENGTH = 43  # HMAC-SHA256 in URL-safe base64


class Verdict(Enum):
    """Why a cookie value was not accepted (its debug cause code).

    ``MALFORMED``: the value holds no well-formed id followed by a signature.
    ``BAD_SIGNATURE``: it does, but the signature is not exactly the one a
    configured key writes for that id (another key, tampering, or a
    non-canonical spelling of the right signature).
    """

    MALFORMED = "malformed-id"
    BAD_SIGNATURE = "bad-signature"


def split_cookie(value: str) -> tuple[str, str] | None:
    """``(session id, signature)`` of a well-formed cookie value (not verified), else None."""
    body, dot, route = value.partition(".")
    if len(body) != ids.RANDOM_LENGTH + _SIG_LENGTH:
        return None
    random_part, signature = body[: ids.RANDOM_LENGTH], body[ids.RANDOM_LENGTH:]
    session_id = f"{random_part}.{route}" if dot else random_part
    return (session_id, signature) if ids.is_valid(session_id) else None


def _split_signed(value: str) -> tuple[str, str] | None:
    """``(session id, signature text)`` when ``value`` is a well-formed id with some signature
    text after its random part, else None. Unlike :func:`split_cookie`, the signature text
    may have any length: whether it is the signature is for verification to say."""
    body, dot, route = value.partition(".")
    random_part, signature = body[: ids.RANDOM_LENGTH], body[ids.RANDOM_LENGTH:]
    session_id = f"{random_part}.{route}" if dot else random_part
    return (session_id, signature) if signature and ids.is_valid(session_id) else None


class CookieSigner:
    """Signs ids into cookie values and verifies them back."""

    def __init__(self, secret_keys: list[str]) -> None:
        if not secret_keys:  # the start-up checks warn about this
            secret_keys = [secrets.token_urlsafe(32)]
        # itsdangerous derives a key per secret on every call; derive them once, build
        # each key's HMAC-SHA256 state once and copy it per message (the signatures
        # are itsdangerous' own, byte for byte).
        signer = Signer(secret_keys, salt="sessionstore.cookie", digest_method=hashlib.sha256)
        self._macs = [hmac.new(signer.derive_key(key), digestmod=hashlib.sha256) for key in secret_keys]

    @staticmethod
    def _signature(keyed: "hmac.HMAC", message: bytes) -> str:
        """The canonical signature text of ``message`` under one key (43 URL-safe characters)."""
        mac = keyed.copy()
        mac.update(message)
        return base64_encode(mac.digest()).decode("ascii")

    def sign(self, session_id: str) -> str:
        """The cookie value for ``session_id``, signed with the first key."""
        random_part, route = ids.split_route(session_id)
        value = random_part + self._signature(self._macs[0], session_id.encode("ascii"))
        return value if route is None else f"{value}.{route}"

    def unsign(self, value: str) -> str | Verdict:
        """The session id, or the :class:`Verdict` saying why not.

        Verifies only the exact value :meth:`sign` writes (under any key): the
        signature text must equal the canonical one, compared in constant time.
        """
        if not value or len(value) > MAX_COOKIE_LENGTH or not value.isascii():
            return Verdict.MALFORMED
        parsed = _split_signed(value)
        if parsed is None:
            return Verdict.MALFORMED
        session_id, signature = parsed
        message = session_id.encode("ascii")
        for keyed in self._macs:
            if hmac.compare_digest(self._signature(keyed, message), signature):
                return session_id
        return Verdict.BAD_SIGNATURE
