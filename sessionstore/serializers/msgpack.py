"""msgpack with extension types for the same values as the JSON serializer.

Compact and fast; needs the ``msgpack`` package (``sessionstore[msgpack]``).
Dicts keep their insertion order (an unchanged value re-encodes to the same
bytes, which is what dirty detection needs); sets are ordered by encoding.
Integers beyond 64 bits are carried as an extension type.
"""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from decimal import Decimal
from typing import Any

from ..decoding import MAX_DEPTH, value_too_deep
from ..errors import ConfigError, CorruptPayload, SerializationError
from .datetimes import datetime_from_text, datetime_to_text
from .unsupported import find_unsupported

try:
    import msgpack
except ImportError:  # pragma: no cover - depends on the environment
    msgpack = None

__all__ = ["MsgpackSerializer"]

_TUPLE, _SET, _FROZENSET, _DATETIME, _DATE, _UUID, _DECIMAL, _BIGINT = range(1, 9)
_NATIVE = {str, int, float, bool, type(None), bytes, list, dict}
_EXT = {tuple, set, frozenset, dt.datetime, dt.date, uuid.UUID, Decimal}
#: The description of each kind of :class:`~.unsupported.Offender` (fixed text, no content).
_PROBLEMS = {
    "value": "is not msgpack-serializable",
    "dict key": "as a dict key is not msgpack-serializable",
    "cycle": "contains a reference cycle",
}


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_default, use_bin_type=True, strict_types=True)


def _default(obj: Any) -> Any:
    kind = type(obj)
    if kind is int:  # beyond 64 bits
        return msgpack.ExtType(_BIGINT, str(obj).encode())
    if kind is tuple:
        return msgpack.ExtType(_TUPLE, _pack(list(obj)))
    if kind is set or kind is frozenset:
        items = sorted((_pack(v) for v in obj))
        return msgpack.ExtType(_SET if kind is set else _FROZENSET, b"".join(items))
    if kind is dt.datetime:
        return msgpack.ExtType(_DATETIME, datetime_to_text(obj).encode())
    if kind is dt.date:
        return msgpack.ExtType(_DATE, obj.isoformat().encode())
    if kind is uuid.UUID:
        return msgpack.ExtType(_UUID, obj.bytes)
    if kind is Decimal:
        return msgpack.ExtType(_DECIMAL, str(obj).encode())
    raise TypeError(kind)


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False, use_list=True)


def _unpack_stream(data: bytes) -> list:
    unpacker = msgpack.Unpacker(ext_hook=_ext_hook, raw=False, strict_map_key=False)
    unpacker.feed(data)
    return list(unpacker)


#: Bytes that open a container or an extension value in msgpack (fixmap, fixarray, map and
#: array 16/32, fixext and ext 8/16/32): a value with no more of them than MAX_DEPTH cannot
#: nest deeper, whatever they mean where they occur.
_OPENERS = bytes(range(0x80, 0xA0)) + b"\xc7\xc8\xc9\xd4\xd5\xd6\xd7\xd8\xdc\xdd\xde\xdf"
_ext_depth = threading.local()


def _ext_hook(code: int, data: bytes) -> Any:
    """An extension value; nested ones (a tuple of tuples) recurse through here, so the
    nesting is counted and cut at MAX_DEPTH before Python's recursion limit is near."""
    depth = getattr(_ext_depth, "n", 0)
    if depth >= MAX_DEPTH:
        raise ValueError(f"extension values nested deeper than {MAX_DEPTH} levels")
    _ext_depth.n = depth + 1
    try:
        return _convert_ext(code, data)
    finally:
        _ext_depth.n = depth


def _convert_ext(code: int, data: bytes) -> Any:
    if code == _TUPLE:
        return tuple(_unpack(data))
    if code == _SET:
        return set(_unpack_stream(data))
    if code == _FROZENSET:
        return frozenset(_unpack_stream(data))
    if code == _DATETIME:
        return datetime_from_text(data.decode())
    if code == _DATE:
        return dt.date.fromisoformat(data.decode())
    if code == _UUID:
        return uuid.UUID(bytes=data)
    if code == _DECIMAL:
        return Decimal(data.decode())
    if code == _BIGINT:
        return int(data.decode())
    return msgpack.ExtType(code, data)


class MsgpackSerializer:
    name = "msgpack"

    def __init__(self) -> None:
        if msgpack is None:
            raise ConfigError("serializer", "msgpack is not installed: pip install 'sessionstore[msgpack]'")

    def dumps(self, value: Any, attribute: str) -> bytes:
        try:
            return _pack(value)
        except (TypeError, ValueError, OverflowError):
            found = find_unsupported(value, lambda o: type(o) in _NATIVE or type(o) in _EXT)
            if found is None:
                raise SerializationError(attribute, type(value), _PROBLEMS["value"]) from None
            raise SerializationError(attribute, type(found.obj), _PROBLEMS[found.role]) from None

    def loads(self, data: bytes) -> Any:
        try:
            value = _unpack(data)
        except Exception as exc:  # msgpack raises a variety of errors on garbage
            raise CorruptPayload(f"undecodable msgpack attribute ({type(exc).__name__})", part="attribute") from None
        if len(data) - len(data.translate(None, _OPENERS)) > MAX_DEPTH and value_too_deep(value):
            raise CorruptPayload(f"undecodable msgpack attribute: nested deeper than {MAX_DEPTH} levels",
                                 part="attribute")
        return value
