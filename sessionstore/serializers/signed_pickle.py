"""Pickle, signed: only with a secret key, and verified before unpickling.

Unpickling runs code, so a payload an attacker could write (an exposed
memcached, a shared Redis) must never reach :func:`pickle.loads` unverified.
Each attribute is stored as ``HMAC-SHA256(key, pickle) + pickle``; the
signature is checked against every configured key (rotation) with a
constant-time comparison before anything is unpickled.
"""

from __future__ import annotations

import hashlib
import hmac
import pickle
from typing import Any

from ..errors import ConfigError, CorruptPayload, SerializationError
from .unsupported import find_unsupported

__all__ = ["SignedPickleSerializer"]

_SIG = 32
#: The description of each kind of :class:`~.unsupported.Offender` (fixed text, no content).
_PROBLEMS = {"value": "cannot be pickled", "dict key": "as a dict key cannot be pickled"}


def _picklable(obj: Any) -> bool:
    if isinstance(obj, (dict, list, tuple, set, frozenset)):
        return True
    try:
        pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        return True
    except Exception:
        return False


class SignedPickleSerializer:
    name = "pickle"

    def __init__(self, secret_keys: list[str]) -> None:
        if not secret_keys:
            raise ConfigError("serializer", "pickle needs a secret_key")
        self._keys = [
            hashlib.sha256(b"sessionstore.pickle\0" + k.encode("utf-8")).digest() for k in secret_keys
        ]

    def dumps(self, value: Any, attribute: str) -> bytes:
        try:
            data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # its message may quote the value: only its offender's type is told
            found = find_unsupported(value, _picklable, cycles_ok=True)
            offending = type(value) if found is None else type(found.obj)
            role = "value" if found is None else found.role
            raise SerializationError(attribute, offending, _PROBLEMS[role]) from None
        return hmac.digest(self._keys[0], data, "sha256") + data

    def loads(self, data: bytes) -> Any:
        signature, body = data[:_SIG], data[_SIG:]
        if len(signature) != _SIG or not any(
            hmac.compare_digest(hmac.digest(k, body, "sha256"), signature) for k in self._keys
        ):
            raise CorruptPayload("pickled attribute failed signature verification; not unpickled", part="attribute")
        try:
            return pickle.loads(body)
        except Exception as exc:
            raise CorruptPayload(f"unpicklable attribute ({type(exc).__name__})", part="attribute") from None
