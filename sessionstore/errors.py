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
    """A session attribute cannot be serialized. ``path`` names it, e.g. ``cart.items[2]``."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"session attribute {path!r}: {message}")
        self.path = path


class CorruptPayload(SessionStoreError):
    """Stored data could not be decoded (truncated, foreign, bad signature)."""


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
