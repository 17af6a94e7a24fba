"""Exceptions raised by sessionstore."""

from __future__ import annotations

__all__ = [
    "SessionStoreError",
    "ConfigError",
    "StoreError",
    "StoreUnavailable",
    "SerializationError",
    "CorruptPayload",
    "SessionTooLarge",
    "ConflictError",
    "LockTimeout",
    "FAILURE_RESPONSES",
    "failure_response",
    "failure_headers",
]


class SessionStoreError(Exception):
    """Base class of every sessionstore error."""


class ConfigError(SessionStoreError, ValueError):
    """A setting has an invalid value. The message names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class StoreError(SessionStoreError):
    """The store failed."""


class StoreUnavailable(StoreError):
    """The store could not be reached (connection refused, timeout, no node up)."""


class SerializationError(SessionStoreError, TypeError):
    """A session attribute cannot be serialized.

    The error carries only the attribute's name (the top-level session key),
    the type of the offending object and a fixed description: never a nested
    key, a value or a message derived from them. Those are session content,
    and the error's text reaches logs, debug records and error responses.
    """

    def __init__(self, attribute: str, offending: type, description: str) -> None:
        """``description`` is fixed text (e.g. ``"is not JSON-serializable"``), never built from data."""
        self.attribute = attribute
        self.type_name = _type_name(offending)
        self.description = description
        super().__init__(f"session attribute {attribute!r}: {self.type_name} {description}")

    @property
    def path(self) -> str:
        """The attribute's name (formerly a path into its value, which could quote content)."""
        return self.attribute


def _type_name(kind: type) -> str:
    """``module.QualifiedName`` of a type: what errors may say about a value."""
    module = getattr(kind, "__module__", None)
    qualname = getattr(kind, "__qualname__", None)
    if not isinstance(qualname, str):
        qualname = "<type>"
    return f"{module}.{qualname}" if isinstance(module, str) else qualname


class CorruptPayload(SessionStoreError):
    """Stored data could not be decoded (truncated, foreign, hostile, bad signature).

    The message says what failed and names the decoding error's type, never
    its text: that quotes the stored bytes, which are session content.

    ``part`` names what was being read (one of :data:`sessionstore.decoding.PARTS`:
    ``"payload header"``, ``"attribute index"``, ``"attribute"``, ``"tombstone"``, ...);
    ``attribute`` the session attribute, when one was being decoded.
    """

    def __init__(self, message: str, *, part: str = "payload header", attribute: str | None = None) -> None:
        super().__init__(message)
        self.part = part
        self.attribute = attribute


class SessionTooLarge(SessionStoreError):
    """The serialized session exceeds ``max_size``."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"serialized session is {size} bytes, over max_size={limit}")
        self.size = size
        self.limit = limit


class ConflictError(SessionStoreError):
    """Another request saved the same attribute meanwhile (``on_conflict="error"``).

    ``attributes`` names the attributes both requests changed.
    """

    def __init__(self, attributes: list[str]) -> None:
        super().__init__(
            "concurrent update of session attribute(s): " + ", ".join(attributes)
        )
        self.attributes = attributes


class LockTimeout(SessionStoreError):
    """The session lock was not acquired within ``lock_timeout``."""


#: How a request that failed on its session is answered, by error:
#: ``(error class, HTTP status, debug cause code, plain-text body)``, first match wins.
#: The middleware and the Flask and Django integrations all answer from this table.
FAILURE_RESPONSES: tuple[tuple[type[SessionStoreError], int, str, bytes], ...] = (
    (LockTimeout, 503, "lock-timeout", b"Session busy, please retry.\n"),
    (StoreUnavailable, 503, "store-unavailable", b"Session store unavailable.\n"),
    (ConflictError, 409, "concurrent-update", b"The session was changed by another request.\n"),
    (SerializationError, 500, "serialization-error", b"Session could not be saved.\n"),
    (SessionTooLarge, 500, "too-large", b"Session too large to save.\n"),
)


def failure_headers(status: int) -> list[tuple[str, str]]:
    """Headers of a replaced response: plain text, not cached, ``Retry-After`` on a 503."""
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")]
    if status == 503:
        headers.append(("Retry-After", "1"))
    return headers


def failure_response(exc: BaseException) -> tuple[int, str, bytes] | None:
    """``(status, cause, body)`` for a session error, or None if ``exc`` is not one."""
    for kind, status, cause, body in FAILURE_RESPONSES:
        if isinstance(exc, kind):
            return status, cause, body
    return None
