"""The decode boundary: validating readers of everything that comes out of a store.

Whatever a store hands back may be hostile or damaged: a foreign value
under our key, a truncated write, bytes planted by someone with access to
an exposed memcached. Every reader of stored data (the store's own framing,
the payload header and attribute index, each attribute, tombstones, locks,
index records and entries, feed messages) is built from the functions here,
and its only failure is :class:`~sessionstore.errors.CorruptPayload` naming
the *part* that did not decode. Nothing else escapes: no ``KeyError`` from a
missing field, no ``AttributeError`` from a field of the wrong type, no
``RecursionError`` from deep nesting (rejected beyond :data:`MAX_DEPTH`
before the JSON parser recurses).

What happens then is decided in one place per caller: a request's session
(:meth:`~sessionstore.manager.SessionManager._corrupt`: cause
``corrupt-payload``, the record left in place, a new session); background
readers (the invalidation feed, ``find_by_index``) skip the unreadable item
and log a warning.
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate
from typing import Any, Callable, Mapping

from .errors import CorruptPayload

__all__ = [
    "MAX_DEPTH",
    "PARTS",
    "json_document",
    "too_deep",
    "value_too_deep",
    "field",
    "finite",
    "epoch",
    "integer",
    "text",
    "string_lists",
    "lock_token",
]

#: Deepest nesting of arrays and objects accepted in stored JSON. Values are
#: written by the application and this library, never nested this deep in
#: practice; the limit keeps every later recursion (re-encoding for the dirty
#: check, merging, the application's own code) far from Python's.
MAX_DEPTH = 64

#: What a :class:`~sessionstore.errors.CorruptPayload` may name as its ``part``.
PARTS = (
    "record",          # a store's framing of a value: Redis version header, SQL column types
    "payload header",  # magic, section lengths, metadata
    "attribute index",
    "attribute",
    "tombstone",
    "lock",
    "index record",    # a store's record of index entries (memcached JSON, Redis sets)
    "index entry",     # one session key found under an index key
    "feed message",
)

_ESCAPE = re.compile(r"\\.", re.S)
_STRING = re.compile(r'"[^"]*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
_scan = json.JSONDecoder().scan_once
#: Times in stored metadata lie in [0, this]: year 5138, far beyond any real clock,
#: small enough that every TTL computed from them fits every store.
LATEST_EPOCH = 1e11
#: Integers in stored metadata (timeouts in seconds) stay within 32 bits.
_INT_RANGE = (-(2**31), 2**31 - 1)
#: A lock holder's token (``LockingStore``): printable ASCII without spaces, 1-255 characters.
_TOKEN = re.compile(r"[\x21-\x7e]{1,255}")


def too_deep(document: str, limit: int = MAX_DEPTH) -> bool:
    """Whether the JSON text ``document`` nests arrays and objects deeper than ``limit``.

    Linear time and C-speed: a document with at most ``limit`` brackets
    cannot be deeper (:func:`json_document` counts them itself before calling
    this); otherwise escapes and then strings are cut
    out (exact for valid JSON, where a backslash only occurs in a string) and
    the running depth of the brackets left is taken.
    """
    structure = _NOT_BRACKET.sub("", _STRING.sub("", _ESCAPE.sub("", document)))
    return max(accumulate(map(_DEPTH_STEP.__getitem__, structure)), default=0) > limit


_CONTAINERS = (list, dict, tuple, set, frozenset)


def value_too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether the decoded ``value`` nests containers deeper than ``limit`` (an iterative
    walk, for formats that cannot be measured before decoding)."""
    stack = [(value, 1)]
    while stack:
        obj, depth = stack.pop()
        if depth > limit:
            return True
        children = [*obj.keys(), *obj.values()] if type(obj) is dict else obj
        stack.extend((child, depth + 1) for child in children if type(child) in _CONTAINERS)
    return False


def json_document(data: bytes | str, part: str, *, scan: Callable[[str, int], tuple[Any, int]] = _scan) -> Any:
    """The one JSON value that fills ``data`` (UTF-8 when bytes), nested at most :data:`MAX_DEPTH` deep.

    ``scan`` is a JSON scanner's ``scan_once`` (of a ``JSONDecoder`` with hooks,
    say); the value must span the whole text, as every writer here writes it
    (no surrounding whitespace). Whatever the UTF-8 decoding, the scanner or
    its hooks raise becomes :class:`CorruptPayload` of ``part``, naming the error's type
    only (its text would quote the stored bytes, which are session content).
    """
    try:
        document = data if type(data) is str else data.decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptPayload(f"bad {part}: not UTF-8", part=part) from None
    if document.count("[") + document.count("{") > MAX_DEPTH and too_deep(document):
        raise CorruptPayload(f"bad {part}: nested deeper than {MAX_DEPTH} levels", part=part)
    try:
        value, end = scan(document, 0)  # StopIteration: no value at all
    except (ValueError, TypeError, ArithmeticError, RecursionError, StopIteration) as exc:
        raise CorruptPayload(f"bad {part} ({type(exc).__name__})", part=part) from None
    if end != len(document):
        raise CorruptPayload(f"bad {part}: data after the value", part=part)
    return value


def field(document: Mapping[str, Any], name: str, part: str, check: Callable[[Any, str, str], Any],
          default: Any = ...) -> Any:
    """``check(document[name], name, part)``; a missing field is ``default`` (or corrupt without one)."""
    if name not in document:
        if default is ...:
            raise CorruptPayload(f"bad {part}: field {name!r} missing", part=part)
        return default
    return check(document[name], name, part)


def _wrong(value: Any, name: str, part: str, expected: str) -> CorruptPayload:
    """The error for a field of the wrong kind: its name and type, never its value (content)."""
    return CorruptPayload(f"bad {part}: field {name!r} is a {type(value).__name__}, expected {expected}",
                          part=part)


def finite(value: Any, name: str, part: str) -> float:
    """A finite JSON number as a float."""
    if type(value) not in (int, float) or not math.isfinite(value):
        raise _wrong(value, name, part, "a finite number")
    return float(value)


def epoch(value: Any, name: str, part: str) -> float:
    """A time in epoch seconds: a finite number between 0 and year 5138."""
    seconds = finite(value, name, part)
    if not 0.0 <= seconds <= LATEST_EPOCH:
        raise _wrong(value, name, part, "a time in epoch seconds")
    return seconds


def integer(value: Any, name: str, part: str) -> int:
    """A 32-bit JSON integer (not a bool, not a float)."""
    if type(value) is not int or not _INT_RANGE[0] <= value <= _INT_RANGE[1]:
        raise _wrong(value, name, part, "a 32-bit integer")
    return value


def text(value: Any, name: str, part: str) -> str:
    """A non-empty string."""
    if type(value) is not str or not value:
        raise _wrong(value, name, part, "a non-empty string")
    return value


def string_lists(value: Any, name: str, part: str) -> dict[str, list[str]]:
    """An object whose values are lists of strings (``{"cas": ["ST-1", "ST-2"]}``)."""
    if type(value) is not dict:
        raise _wrong(value, name, part, "an object of string lists")
    for key, values in value.items():
        if type(values) is not list or not all(type(v) is str for v in values):
            raise _wrong(values, f"{name}.{key}", part, "a list of strings")
    return value


def lock_token(raw: bytes | str) -> str:
    """The owner token a session lock holds (printable ASCII without spaces, 1-255 characters:
    see :class:`~sessionstore.stores.base.LockingStore`; the manager's are ``secrets.token_urlsafe``)."""
    token = raw if isinstance(raw, str) else raw.decode("ascii", "replace")
    if not _TOKEN.fullmatch(token):
        raise CorruptPayload("bad lock: its holder is not a lock token", part="lock")
    return token
