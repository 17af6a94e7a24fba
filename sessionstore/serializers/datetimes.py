"""Exact text form of datetimes (shared by the JSON and msgpack serializers).

``isoformat()`` loses a UTC offset with a sub-second part, so such a
datetime is written as ``<naive isoformat>@<offset in microseconds>``.
Every other datetime is its plain ``isoformat()``.
"""

from __future__ import annotations

import datetime as dt

__all__ = ["datetime_to_text", "datetime_from_text"]


def datetime_to_text(value: dt.datetime) -> str:
    offset = value.utcoffset()
    if offset is not None and offset.microseconds:
        micros = (offset.days * 86_400 + offset.seconds) * 1_000_000 + offset.microseconds
        return f"{value.replace(tzinfo=None).isoformat()}@{micros}"
    return value.isoformat()


def datetime_from_text(text: str) -> dt.datetime:
    naive, at, micros = text.partition("@")
    if not at:
        return dt.datetime.fromisoformat(text)
    zone = dt.timezone(dt.timedelta(microseconds=int(micros)))
    return dt.datetime.fromisoformat(naive).replace(tzinfo=zone)
