"""Serializers turn one session attribute's value into bytes and back.

Every serializer offers ``dumps(value, attribute) -> bytes`` (raising
:class:`~sessionstore.errors.SerializationError` that names the attribute
and the type of the offending object, never a nested key or a value: those
are session content) and ``loads(data) -> value`` (raising
:class:`~sessionstore.errors.CorruptPayload`). Output is deterministic, so the
bytes of an unchanged value compare equal: that is what dirty detection
relies on.
"""

from __future__ import annotations

from typing import Any, Protocol

from ..errors import ConfigError

__all__ = ["Serializer", "get_serializer"]


class Serializer(Protocol):
    name: str

    def dumps(self, value: Any, attribute: str) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


def get_serializer(name: str, secret_keys: list[str]) -> Serializer:
    """The serializer called ``name`` (``json``, ``msgpack`` or ``pickle``)."""
    if name == "json":
        from .tagged_json import TaggedJSONSerializer

        return TaggedJSONSerializer()
    if name == "msgpack":
        from .msgpack import MsgpackSerializer

        return MsgpackSerializer()
    if name == "pickle":
        from .signed_pickle import SignedPickleSerializer

        return SignedPickleSerializer(secret_keys)
    raise ConfigError("serializer", f"expected 'json', 'msgpack' or 'pickle', got {name!r}")
