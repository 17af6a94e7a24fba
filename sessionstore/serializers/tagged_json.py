"""Tagged JSON: JSON that round-trips more Python types exactly.

Types JSON lacks are written as one-key objects whose key starts with a
space, which no ordinary attribute name does: ``{" b": "<base64>"}`` for
bytes, ``" t"`` tuple, ``" s"`` set, ``" f"`` frozenset, ``" d"`` datetime,
``" D"`` date, ``" u"`` UUID, ``" n"`` Decimal, and ``" m"`` (a list of
pairs) for a dict whose keys are not all strings or that could be mistaken
for a tag. An aware datetime keeps its UTC offset (a ``zoneinfo`` zone comes
back as the fixed offset it had at that instant). Keys are sorted and sets ordered by their encoding, so equal
values always give equal bytes.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
from decimal import Decimal
from typing import Any

from ..errors import CorruptPayload, SerializationError
from .datetimes import datetime_from_text, datetime_to_text
from .unsupported import find_unsupported

__all__ = ["TaggedJSONSerializer"]

_PLAIN = (str, int, float, bool, type(None))
_SUPPORTED = _PLAIN + (bytes, tuple, list, dict, set, frozenset, dt.date, uuid.UUID, Decimal)
_encoder = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, check_circular=True)


def _is_supported(obj: Any) -> bool:
    return isinstance(obj, _SUPPORTED)


def _tag(obj: Any) -> Any:
    """Plain JSON structure for ``obj`` (recursing into containers)."""
    kind = type(obj)
    if kind in (str, int, float, bool) or obj is None:
        return obj
    if kind is list:
        return [_tag(v) for v in obj]
    if kind is dict:
        if all(type(k) is str for k in obj) and not (len(obj) == 1 and next(iter(obj)).startswith(" ")):
            return {k: _tag(v) for k, v in obj.items()}
        pairs = [[_tag(k), _tag(v)] for k, v in obj.items()]
        pairs.sort(key=_encoder.encode)
        return {" m": pairs}
    if kind is tuple:
        return {" t": [_tag(v) for v in obj]}
    if kind is set or kind is frozenset:
        items = sorted((_tag(v) for v in obj), key=_encoder.encode)
        return {" s" if kind is set else " f": items}
    if kind is bytes:
        return {" b": base64.b64encode(obj).decode("ascii")}
    if kind is dt.datetime:
        return {" d": datetime_to_text(obj)}
    if kind is dt.date:
        return {" D": obj.isoformat()}
    if kind is uuid.UUID:
        return {" u": obj.hex}
    if kind is Decimal:
        return {" n": str(obj)}
    raise TypeError(kind)


_UNTAG = {
    " t": tuple,
    " s": set,
    " f": frozenset,
    " b": lambda v: base64.b64decode(v.encode("ascii"), validate=True),
    " d": datetime_from_text,
    " D": dt.date.fromisoformat,
    " u": uuid.UUID,
    " n": Decimal,
    " m": lambda pairs: {k: v for k, v in pairs},
}


def _untag(obj: dict) -> Any:
    if len(obj) == 1:
        (key, value), = obj.items()
        convert = _UNTAG.get(key)
        if convert is not None:
            return convert(value)
    return obj


_decoder = json.JSONDecoder(object_hook=_untag).decode


class TaggedJSONSerializer:
    """The default serializer. Exact types only: subclasses of the supported
    types (a ``str`` enum, an ``OrderedDict``) are refused rather than silently
    turned into their base type."""

    name = "json"

    def dumps(self, value: Any, attribute: str) -> bytes:
        kind = type(value)
        if kind is str or kind is int or kind is bool or value is None:
            return _encoder.encode(value).encode("utf-8")
        try:
            return _encoder.encode(_tag(value)).encode("utf-8")
        except (TypeError, ValueError, RecursionError):
            raise self._error(value, attribute) from None

    def loads(self, data: bytes) -> Any:
        try:
            return _decoder(data.decode("utf-8"))
        except (ValueError, TypeError, KeyError) as exc:
            raise CorruptPayload(f"undecodable JSON attribute ({type(exc).__name__})") from None

    @staticmethod
    def _error(value: Any, attribute: str) -> SerializationError:
        found = find_unsupported(value, lambda o: type(o) in _EXACT)
        if found is None:
            return SerializationError(attribute, type(value), "cannot be serialized as JSON")
        return SerializationError(attribute, type(found.obj), _PROBLEMS[found.role])


_SUPPORTED_NAMES = ("str, int, float, bool, None, bytes, list, tuple, dict, set, frozenset, "
                    "datetime, date, UUID, Decimal")
#: The description of each kind of :class:`~.unsupported.Offender` (fixed text, no content).
_PROBLEMS = {
    "value": f"is not JSON-serializable (supported: {_SUPPORTED_NAMES}; or use serializer='pickle')",
    "dict key": f"as a dict key is not JSON-serializable (supported: {_SUPPORTED_NAMES})",
    "cycle": "contains a reference cycle",
}
_EXACT = {str, int, float, bool, type(None), bytes, tuple, list, dict, set, frozenset, dt.datetime, dt.date, uuid.UUID, Decimal}
