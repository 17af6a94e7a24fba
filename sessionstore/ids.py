"""Session ids: generation, strict validation and the sticky route suffix.

An id is 32 random bytes from :mod:`secrets` (256 bits) in URL-safe base64
without padding (43 characters of ``A-Za-z0-9_-``, never a ``.``), followed in
sticky mode by ``.<node_id>``, the route a load balancer reads after the last
dot (Tomcat's ``jvmRoute``).
"""

from __future__ import annotations

import re
import secrets

__all__ = ["RANDOM_LENGTH", "new_id", "is_valid", "split_route", "with_route"]

#: Length of the random part: 32 bytes of entropy in URL-safe base64.
RANDOM_LENGTH = 43

_ID = re.compile(r"[A-Za-z0-9_-]{43}(?:\.[A-Za-z0-9_]{1,64})?\Z")


def new_id(node_id: str | None = None) -> str:
    """A fresh id, with this node's route when ``node_id`` is given."""
    random_part = secrets.token_urlsafe(32)
    return random_part if node_id is None else f"{random_part}.{node_id}"


def is_valid(session_id: object) -> bool:
    """True for a well-formed id; checked before any store call."""
    return isinstance(session_id, str) and _ID.match(session_id) is not None


def split_route(session_id: str) -> tuple[str, str | None]:
    """``("<random>", "<node>")`` or ``("<random>", None)``."""
    random_part, _, route = session_id.partition(".")
    return random_part, route or None


def with_route(session_id: str, node_id: str | None) -> str:
    """The same random part under another route (or none)."""
    random_part = split_route(session_id)[0]
    return random_part if node_id is None else f"{random_part}.{node_id}"
