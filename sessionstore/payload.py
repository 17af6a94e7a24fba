"""The stored form of a session: metadata, an attribute index, and one blob per attribute.

Layout::

    b"SS2" | meta length (4 bytes) | meta (JSON) | index length (4 bytes) | index | blobs

``meta`` is small JSON (creation time, timeout, serializer, external ids,
total blob size). ``index`` has one line per attribute,
``\\n<name as a JSON string>\\x1f<offset>\\x1f<length>\\x1f<generation>\\x1f<lineage>``,
offsets relative to the start of the blobs (JSON-escaped names never hold a
raw control character, so the separators are unambiguous).

An attribute's *generation* counts the saves that changed it: comparing
generations tells which attributes a concurrent request changed. Its
*lineage* counts the writes whose effect the current value still carries
(a write that replaces a concurrent one starts from its own, older base):
the difference of lineages is how many updates a last-writer-wins overwrite
loses. Each blob is one attribute, encoded by the serializer
named in the meta.

A request that reads one attribute finds its line with one ``bytes.find``
(a C-speed scan) and slices that one blob: no per-attribute Python work, so
the cost of a read does not grow with the rest of the session. The whole
index is parsed at most once per load, into a table with O(1) lookup by name
(:class:`AttributeTable`): when the application iterates the session or
saves it, or after a few single lookups (so reading every attribute by name
costs linear time, not quadratic).

Everything is validated on the way (see :mod:`sessionstore.decoding`):
:func:`decode` checks the sections, the metadata field by field and the
index's first byte; a single lookup checks its own line and span; the table
checks every line, that names are unique and in their canonical encoding,
and that the blobs are laid end to end exactly over the blob section. The
only failure is :class:`~sessionstore.errors.CorruptPayload`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from itertools import accumulate, repeat
from json.encoder import encode_basestring_ascii
from operator import add
from typing import Iterable

from . import decoding
from .decoding import epoch, integer, string_lists, text
from .errors import CorruptPayload

__all__ = ["Meta", "Payload", "AttributeTable", "Lineage", "NO_LINEAGE", "encode", "decode"]

_MAGIC = b"SS2"
_LEN = struct.Struct(">I")


@dataclass(slots=True)
class Meta:
    """Session metadata stored with the attributes."""

    created: float
    last_accessed: float
    max_inactive: int
    serializer: str
    #: External ids recorded with ``session.index(name, value)``.
    index: dict[str, list[str]] = field(default_factory=dict)
    #: When this session's tombstone was last refreshed (0: never).
    tombstoned: float = 0.0


_SEP = b"\x1f"
_HEADER = "payload header"
_LATEST, _INT_LIMIT = decoding.LATEST_EPOCH, 2**31
_INDEX = "attribute index"
#: Single lookups (each a scan of the index) before the whole index is parsed into a table.
_SCANS_BEFORE_TABLE = 8

#: ``(generation, lineage)`` of an attribute.
Lineage = tuple[int, int]
NO_LINEAGE: Lineage = (0, 0)


def _index_key(name: str) -> bytes:
    return b"\n" + encode_basestring_ascii(name).encode("ascii") + _SEP


def _corrupt_index(reason: str) -> CorruptPayload:
    return CorruptPayload(f"bad {_INDEX}: {reason}", part=_INDEX)


class AttributeTable:
    """Every attribute of one payload, parsed once: O(1) lookup by name, stored order kept.

    Built by :meth:`parse`, which validates the whole index. Positions are
    kept relative to the blob section; generations and lineages are converted
    only when asked for (a save, a merge), not for reads.
    """

    __slots__ = ("names", "_rows", "_at", "_starts", "_ends", "_generations", "_lineages")

    def __init__(self, names: list[str], at: int, starts: list[int], ends: list[int],
                 generations: list[bytes], lineages: list[bytes]) -> None:
        self.names = names
        self._rows = dict(zip(names, range(len(names))))
        if len(self._rows) != len(names):
            raise _corrupt_index("an attribute name occurs twice")
        self._at = at
        self._starts = starts
        self._ends = ends
        self._generations: list[bytes] | list[int] = generations
        self._lineages: list[bytes] | list[int] = lineages

    @classmethod
    def parse(cls, index: bytes, blobs_at: int, blobs_size: int) -> "AttributeTable":
        """The table of ``index`` (lines ``\\n<JSON name>\\x1f<offset>\\x1f<length>\\x1f<gen>\\x1f<lineage>``)
        over a blob section of ``blobs_size`` bytes at ``blobs_at``.

        A constant number of C-speed passes over the whole index: split into
        fields, one JSON parse of all names, checks over whole columns.
        """
        if not index:
            return cls([], blobs_at, [], [], [], [])
        fields = index.replace(b"\n", _SEP).split(_SEP)
        if len(fields) % 5 != 1 or fields[0]:
            raise _corrupt_index("lines do not have five fields each")
        names = _names(fields[1::5])
        del fields[1::5], fields[0]  # the names and the empty head: four numbers per line are left
        if not _digits(fields):
            raise _corrupt_index("an offset, length, generation or lineage is not a number")
        try:
            offsets, lengths = list(map(int, fields[0::4])), list(map(int, fields[1::4]))
        except ValueError:  # more digits than int() accepts
            raise _corrupt_index("a number is out of range") from None
        generations, lineages = fields[2::4], fields[3::4]
        ends = list(accumulate(lengths))
        if offsets[0] != 0 or offsets[1:] != ends[:-1] or ends[-1] != blobs_size:
            raise _corrupt_index("the attributes are not laid end to end over the blob section")
        return cls(names, blobs_at, offsets, ends, generations, lineages)

    def __len__(self) -> int:
        return len(self.names)

    def span(self, name: str) -> tuple[int, int] | None:
        """``(start, end)`` of ``name`` in the payload's data, or None if absent."""
        row = self._rows.get(name)
        return None if row is None else (self._at + self._starts[row], self._at + self._ends[row])

    def locate(self, name: str) -> tuple[int, int, Lineage] | None:
        """``(start, end, (generation, lineage))`` of ``name``, or None if absent."""
        row = self._rows.get(name)
        if row is None:
            return None
        return self._at + self._starts[row], self._at + self._ends[row], self._lineage(row)

    def _lineage(self, row: int) -> Lineage:
        if type(self._generations[0]) is bytes:
            self._generations = list(map(int, self._generations))
            self._lineages = list(map(int, self._lineages))
        return self._generations[row], self._lineages[row]  # type: ignore[return-value]

    def spans(self) -> Iterable[tuple[str, int, int]]:
        """``(name, start, end)`` of every attribute, in stored order."""
        at = repeat(self._at)
        return zip(self.names, map(add, self._starts, at), map(add, self._ends, at))

    def entries(self) -> list[tuple[str, int, int, Lineage]]:
        """``(name, start, end, (generation, lineage))`` of every attribute, in stored order."""
        if not self.names:
            return []
        self._lineage(0)
        at = repeat(self._at)
        return list(zip(self.names, map(add, self._starts, at), map(add, self._ends, at),
                        zip(self._generations, self._lineages)))


def _names(raw: list[bytes]) -> list[str]:
    """The attribute names of an index, each required in the encoding :func:`encode` writes
    (so a single lookup, which searches for that encoding, and the table always agree)."""
    joined = b",".join(raw)
    names = decoding.json_document(b"[" + joined + b"]", _INDEX)
    if type(names) is not list or len(names) != len(raw) or set(map(type, names)) != {str}:
        raise _corrupt_index("an attribute name is not a JSON string")
    if ",".join(map(encode_basestring_ascii, names)).encode("ascii") != joined:
        raise _corrupt_index("an attribute name is not in its canonical encoding")
    return names


def _digits(column: list[bytes]) -> bool:
    """Whether every field of ``column`` is a decimal number (digits only: no sign, space
    or underscore, which ``int()`` would accept)."""
    return b"".join(column).isdigit() and b"" not in column


class Payload:
    """A decoded payload: the meta, and lazy access to each attribute's blob."""

    __slots__ = ("meta", "data", "_index", "_blobs_at", "_found", "_table")

    def __init__(self, meta: Meta, data: bytes, index: bytes, blobs_at: int) -> None:
        self.meta = meta
        self.data = data
        self._index = index
        self._blobs_at = blobs_at
        self._found: dict[str, tuple[int, int, Lineage] | None] = {}
        self._table: AttributeTable | None = None

    def table(self) -> AttributeTable:
        """The whole index, parsed and validated once (:class:`CorruptPayload` if damaged)."""
        if self._table is None:
            self._table = AttributeTable.parse(self._index, self._blobs_at, len(self.data) - self._blobs_at)
        return self._table

    def _locate(self, name: str) -> tuple[int, int, Lineage] | None:
        """``(start, end, (generation, lineage))`` of attribute ``name``, or None if absent."""
        if self._table is not None:
            return self._table.locate(name)
        try:
            return self._found[name]
        except KeyError:
            pass
        if len(self._found) >= _SCANS_BEFORE_TABLE:
            return self.table().locate(name)
        found = self._scan(name)
        self._found[name] = found
        return found

    def _scan(self, name: str) -> tuple[int, int, Lineage] | None:
        """One attribute's line, found with one ``bytes.find`` and validated on its own."""
        index = self._index
        key = _index_key(name)
        pos = index.find(key)
        if pos < 0:
            return None
        start = pos + len(key)
        end = index.find(b"\n", start)
        fields = index[start: None if end < 0 else end].split(_SEP)
        try:
            if len(fields) != 4 or not _digits(fields):
                raise ValueError
            offset, length, generation, lineage = map(int, fields)
        except ValueError:
            raise CorruptPayload(f"bad {_INDEX}: line of attribute {name!r}", part=_INDEX, attribute=name) from None
        begin = self._blobs_at + offset
        if begin + length > len(self.data):
            raise CorruptPayload(f"bad {_INDEX}: attribute {name!r} runs past the end of the payload",
                                 part=_INDEX, attribute=name)
        return begin, begin + length, (generation, lineage)

    def span(self, name: str) -> tuple[int, int] | None:
        """``(start, end)`` of attribute ``name`` in ``data``, or None if absent."""
        if self._table is not None:
            return self._table.span(name)
        found = self._locate(name)
        return None if found is None else (found[0], found[1])

    def lineage(self, name: str) -> Lineage:
        """``(generation, lineage)`` of attribute ``name`` (``(0, 0)`` when absent)."""
        found = self._locate(name)
        return NO_LINEAGE if found is None else found[2]

    @property
    def has_entries(self) -> bool:
        """Whether the payload holds any attribute (no parsing)."""
        return bool(self._index)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.span(name) is not None

    def blob(self, name: str) -> bytes:
        span = self.span(name)
        if span is None:
            raise KeyError(name)
        return self.data[span[0]:span[1]]

    def entries(self) -> list[tuple[str, int, int, Lineage]]:
        """``(name, start, end, (generation, lineage))`` of every attribute, in stored order."""
        return self.table().entries()

    def names(self) -> list[str]:
        """Every attribute name, in stored order."""
        return list(self.table().names)

    def blobs(self) -> dict[str, tuple[bytes, Lineage]]:
        """Every attribute's ``(blob, (generation, lineage))`` by name."""
        data = self.data
        return {name: (data[start:end], lin) for name, start, end, lin in self.entries()}


def encode(meta: Meta, blobs: Iterable[tuple[str, bytes, Lineage]]) -> bytes:
    """Serialize ``meta`` and ``(name, blob, (generation, lineage))`` triples into one payload."""
    lines: list[bytes] = []
    parts: list[bytes] = []
    offset = 0
    for name, blob, (generation, lineage) in blobs:
        lines.append(b"%s%d\x1f%d\x1f%d\x1f%d" % (_index_key(name), offset, len(blob), generation, lineage))
        parts.append(blob)
        offset += len(blob)
    head = {"c": meta.created, "l": meta.last_accessed, "i": meta.max_inactive, "s": meta.serializer, "b": offset}
    if meta.index:
        head["x"] = meta.index
    if meta.tombstoned:
        head["t"] = meta.tombstoned
    meta_bytes = json.dumps(head, separators=(",", ":")).encode("ascii")
    index = b"".join(lines)
    return b"".join([_MAGIC, _LEN.pack(len(meta_bytes)), meta_bytes, _LEN.pack(len(index)), index, *parts])


def decode(data: bytes) -> Payload:
    """Parse a payload's meta; attributes are located only when asked for.

    Raises :class:`CorruptPayload` unless the data has the right magic, its
    sections add up to its size exactly and every metadata field has its type.
    """
    if data[:3] != _MAGIC or len(data) < 11:
        raise CorruptPayload(f"bad {_HEADER}: not a sessionstore payload (bad magic)", part=_HEADER)
    (meta_len,) = _LEN.unpack_from(data, 3)
    meta_end = 7 + meta_len
    if meta_end + 4 > len(data):
        raise CorruptPayload(f"bad {_HEADER}: metadata runs past the end of the payload", part=_HEADER)
    (index_len,) = _LEN.unpack_from(data, meta_end)
    blobs_at = meta_end + 4 + index_len
    head = decoding.json_document(data[7:meta_end], _HEADER)
    if type(head) is not dict:
        raise CorruptPayload(f"bad {_HEADER}: metadata is not a JSON object", part=_HEADER)
    meta = _meta(head)
    total = head.get("b")
    if type(total) is not int or total < 0:
        raise CorruptPayload(f"bad {_HEADER}: field 'b' is not a byte count", part=_HEADER)
    if blobs_at + total != len(data):
        raise CorruptPayload(f"bad {_HEADER}: length mismatch ({blobs_at + total} != {len(data)})", part=_HEADER)
    index = data[meta_end + 4:blobs_at]
    if index and index[:1] != b"\n":
        raise _corrupt_index("does not start with a line")
    return Payload(meta, data, index, blobs_at)


def _meta(head: dict) -> Meta:
    """The :class:`Meta` of a decoded metadata object, every field checked (at C speed when they
    are all as :func:`encode` writes them; field by field, to name the culprit, otherwise)."""
    get = head.get
    c, l, i, s, x, t = get("c"), get("l"), get("i"), get("s"), get("x"), get("t")
    if (type(c) is float and type(l) is float and 0.0 <= c <= _LATEST and 0.0 <= l <= _LATEST
            and type(i) is int and -_INT_LIMIT <= i < _INT_LIMIT and type(s) is str and s
            and (t is None or (type(t) is float and 0.0 <= t <= _LATEST))):
        return Meta(c, l, i, s, {} if x is None else string_lists(x, "x", _HEADER), 0.0 if t is None else t)
    return _checked_meta(head)


def _checked_meta(head: dict) -> Meta:
    field, part = decoding.field, _HEADER
    return Meta(
        created=field(head, "c", part, epoch),
        last_accessed=field(head, "l", part, epoch),
        max_inactive=field(head, "i", part, integer),
        serializer=field(head, "s", part, text),
        index=field(head, "x", part, string_lists, default=None) or {},
        tombstoned=field(head, "t", part, epoch, default=0.0),
    )
