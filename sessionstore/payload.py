"""The stored form of a session: a small header and one blob per attribute.

Layout::

    b"SS1" | header length (4 bytes, big-endian) | header (JSON) | blob | blob | ...

The header holds the session's metadata and the name and length of every
attribute blob (each produced by the serializer named in the header). A
request that reads one attribute decodes the header and that one blob, never
the rest, so its cost does not grow with the size of the other attributes;
a save reuses the untouched blobs byte for byte.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from .errors import CorruptPayload

__all__ = ["Meta", "Payload", "encode", "decode"]

_MAGIC = b"SS1"
_LEN = struct.Struct(">I")
_START = len(_MAGIC) + _LEN.size


@dataclass(slots=True)
class Meta:
    """Session metadata stored with the attributes."""

    created: float
    last_accessed: float
    max_inactive: int
    serializer: str
    #: External ids recorded with ``session.index(name, value)``.
    index: dict[str, list[str]] = field(default_factory=dict)


@dataclass(slots=True)
class Payload:
    """A decoded payload: metadata plus where each attribute's blob lies in ``data``."""

    meta: Meta
    data: bytes
    spans: dict[str, tuple[int, int]]

    def blob(self, name: str) -> bytes:
        start, end = self.spans[name]
        return self.data[start:end]


def encode(meta: Meta, blobs: Iterable[tuple[str, bytes]]) -> bytes:
    """Serialize ``meta`` and ``(name, blob)`` pairs into one payload."""
    names: list[list[object]] = []
    parts: list[bytes] = []
    for name, blob in blobs:
        names.append([name, len(blob)])
        parts.append(blob)
    header = {
        "c": meta.created,
        "l": meta.last_accessed,
        "i": meta.max_inactive,
        "s": meta.serializer,
        "a": names,
    }
    if meta.index:
        header["x"] = meta.index
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return b"".join([_MAGIC, _LEN.pack(len(head)), head, *parts])


def decode(data: bytes) -> Payload:
    """Parse a payload's header; blobs are sliced only when asked for.

    Raises :class:`CorruptPayload` unless the data is exactly one well-formed
    payload (right magic, lengths adding up to the total size).
    """
    if data[:3] != _MAGIC or len(data) < _START:
        raise CorruptPayload("not a sessionstore payload (bad magic)")
    (head_len,) = _LEN.unpack_from(data, 3)
    offset = _START + head_len
    try:
        header = json.loads(data[_START:offset])
        meta = Meta(
            created=float(header["c"]),
            last_accessed=float(header["l"]),
            max_inactive=int(header["i"]),
            serializer=str(header["s"]),
            index=dict(header.get("x") or {}),
        )
        spans: dict[str, tuple[int, int]] = {}
        for name, length in header["a"]:
            spans[str(name)] = (offset, offset + int(length))
            offset += int(length)
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptPayload(f"bad payload header: {exc}") from None
    if offset != len(data) or head_len > len(data):
        raise CorruptPayload(f"payload length mismatch ({offset} != {len(data)})")
    return Payload(meta, data, spans)


def blobs_of(payload: Payload) -> Mapping[str, bytes]:
    """Every attribute blob (used when merging concurrent saves)."""
    return {name: payload.blob(name) for name in payload.spans}
