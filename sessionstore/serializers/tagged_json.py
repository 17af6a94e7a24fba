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
from decimal import Decimal, InvalidOperation
from typing import Any, Callable

from .. import decoding
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


def _of(kind: type, convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A tag's converter that first checks the tagged value's JSON type (a hostile
    ``{" u": 123}`` must not reach ``uuid.UUID``)."""

    def checked(value: Any) -> Any:
        if type(value) is not kind:
            raise TypeError(f"tagged value is {type(value).__name__}, expected {kind.__name__}")
        return convert(value)

    return checked


def _pairs(pairs: list) -> dict:
    if not all(type(pair) is list and len(pair) == 2 for pair in pairs):
        raise ValueError("a mapping tag holds something other than [key, value] pairs")
    return {k: v for k, v in pairs}


def _decimal(text: str) -> Decimal:
    try:
        return Decimal(text)
    except InvalidOperation:
        raise ValueError("not a decimal") from None


_UNTAG = {
    " t": _of(list, tuple),
    " s": _of(list, set),
    " f": _of(list, frozenset),
    " b": _of(str, lambda v: base64.b64decode(v.encode("ascii"), validate=True)),
    " d": _of(str, datetime_from_text),
    " D": _of(str, dt.date.fromisoformat),
    " u": _of(str, uuid.UUID),
    " n": _of(str, _decimal),
    " m": _of(list, _pairs),
}


def _untag(obj: dict) -> Any:
    if len(obj) == 1:
        (key, value), = obj.items()
        convert = _UNTAG.get(key)
        if convert is not None:
            return convert(value)
    return obj


_scan = json.JSONDecoder(object_hook=_untag).scan_once


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
        """The value of a blob written by :meth:`dumps`. Only :class:`CorruptPayload` is raised:
        for bytes that are not UTF-8 or not one JSON value, nesting deeper than
        :data:`~sessionstore.decoding.MAX_DEPTH`, a tag holding the wrong type, and a string
        with a lone surrogate (it could not be written back: the dirty check would fail)."""
        value = decoding.json_document(data, "attribute", scan=_scan)
        if b"\\" in data and (b"\\ud" in data or b"\\uD" in data):  # surrogate escapes: dumps writes none
            try:
                self.dumps(value, "")
            except (SerializationError, ValueError):  # UnicodeEncodeError on the str fast path
                raise CorruptPayload("bad attribute: a string holds a lone surrogate", part="attribute") from None
        return value

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
