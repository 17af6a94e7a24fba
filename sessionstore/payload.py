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
the cost of a read does not grow with the rest of the session. The full
index is parsed only when the application iterates the session or saves it.
"""

from __future__ import annotations

import json
import struct
from json.encoder import encode_basestring_ascii
from dataclasses import dataclass, field
from typing import Iterable

from .errors import CorruptPayload

__all__ = ["Meta", "Payload", "Lineage", "NO_LINEAGE", "encode", "decode"]

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
_json_decode = json.JSONDecoder().decode  # skips json.loads' per-call argument handling

#: ``(generation, lineage)`` of an attribute.
Lineage = tuple[int, int]
NO_LINEAGE: Lineage = (0, 0)


def _index_key(name: str) -> bytes:
    return b"\n" + encode_basestring_ascii(name).encode("ascii") + _SEP


class Payload:
    """A decoded payload: the meta, and lazy access to each attribute's blob."""

    __slots__ = ("meta", "data", "_index", "_blobs_at", "_found", "_entries")

    def __init__(self, meta: Meta, data: bytes, index: bytes, blobs_at: int) -> None:
        self.meta = meta
        self.data = data
        self._index = index
        self._blobs_at = blobs_at
        self._found: dict[str, tuple[int, int, Lineage] | None] = {}
        self._entries: list[tuple[str, int, int, Lineage]] | None = None

    def _locate(self, name: str) -> tuple[int, int, Lineage] | None:
        """``(start, end, (generation, lineage))`` of attribute ``name``, or None if absent."""
        try:
            return self._found[name]
        except KeyError:
            pass
        index = self._index
        key = _index_key(name)
        pos = index.find(key)
        found = None
        if pos >= 0:
            start = pos + len(key)
            end = index.find(b"\n", start)
            try:
                offset, length, generation, lineage = index[start: None if end < 0 else end].split(_SEP)
                begin = self._blobs_at + int(offset)
                found = (begin, begin + int(length), (int(generation), int(lineage)))
            except ValueError:
                raise CorruptPayload(f"bad index entry for attribute {name!r}") from None
            if found[1] > len(self.data):
                raise CorruptPayload(f"attribute {name!r} runs past the end of the payload")
        self._found[name] = found
        return found

    def span(self, name: str) -> tuple[int, int] | None:
        """``(start, end)`` of attribute ``name`` in ``data``, or None if absent."""
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
        if self._entries is None:
            if not self._index:
                self._entries = []
                return self._entries
            as_json = b"[[" + self._index[1:].replace(b"\n", b"],[").replace(_SEP, b",") + b"]]"
            try:
                rows = json.loads(as_json)
                at, size = self._blobs_at, len(self.data)
                entries = [(str(n), at + int(o), at + int(o) + int(ln), (int(g), int(li)))
                           for n, o, ln, g, li in rows]
            except (ValueError, TypeError) as exc:
                raise CorruptPayload(f"bad attribute index ({type(exc).__name__})") from None
            if any(end > size for _, _, end, _ in entries):
                raise CorruptPayload("an attribute runs past the end of the payload")
            self._entries = entries
        return self._entries

    def names(self) -> list[str]:
        """Every attribute name, in stored order."""
        return [entry[0] for entry in self.entries()]

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

    Raises :class:`CorruptPayload` unless the data has the right magic and
    its sections add up to its size exactly.
    """
    if data[:3] != _MAGIC or len(data) < 11:
        raise CorruptPayload("not a sessionstore payload (bad magic)")
    try:
        (meta_len,) = _LEN.unpack_from(data, 3)
        meta_end = 7 + meta_len
        (index_len,) = _LEN.unpack_from(data, meta_end)
        index_start = meta_end + 4
        blobs_at = index_start + index_len
        head = _json_decode(data[7:meta_end].decode("ascii"))
        meta = Meta(float(head["c"]), float(head["l"]), int(head["i"]), str(head["s"]), head.get("x") or {},
                    float(head.get("t", 0.0)))
        total = int(head["b"])
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CorruptPayload(f"bad payload header ({type(exc).__name__})") from None
    if blobs_at + total != len(data) or not isinstance(meta.index, dict):
        raise CorruptPayload(f"payload length mismatch ({blobs_at + total} != {len(data)})")
    index = data[index_start:blobs_at]
    if index and index[:1] != b"\n":
        raise CorruptPayload("bad attribute index")
    return Payload(meta, data, index, blobs_at)
