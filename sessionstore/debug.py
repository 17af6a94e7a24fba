"""Per-request diagnostics: the debug record and its cause codes.

Each request gathers the causes that explain what happened to its session
(the codes of the public contract). With ``debug=True`` the record is logged
as one JSON line on the ``sessionstore.debug`` logger and summarised in the
``X-Session-Debug`` response header. The session id never appears: only the
first 12 hex digits of its SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CAUSES", "RequestRecord", "log_id", "debug_logger"]

debug_logger = logging.getLogger("sessionstore.debug")

CAUSES = (
    "no-cookie", "bad-signature", "malformed-id", "unknown-id", "expired", "evicted",
    "invalidated", "route-changed", "relocated", "store-unavailable", "mutated-in-place",
    "concurrent-update", "lock-timeout", "serialization-error", "too-large",
    "cookie-not-returned", "ignored", "corrupt-payload", "node-id-collision",
)


def log_id(session_id: str | None) -> str | None:
    """What logs may show of a session id: 12 hex digits of its SHA-256."""
    if session_id is None:
        return None
    return hashlib.sha256(session_id.encode("utf-8")).hexdigest()[:12]


@dataclass(slots=True)
class RequestRecord:
    """What one request did with its session."""

    started: float = field(default_factory=time.perf_counter)
    source: str = "none"
    causes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    saved: bool = False
    session_id: str | None = None
    store_ops: int = 0

    def add(self, cause: str, **details: Any) -> None:
        if cause not in self.causes:
            self.causes.append(cause)
        for key, value in details.items():
            self.details[key] = value

    def as_dict(self, node: str | None, mode: str) -> dict[str, Any]:
        record = {
            "node": node,
            "mode": mode,
            "sid": log_id(self.session_id),
            "source": self.source,
            "causes": self.causes,
            "saved": self.saved,
            "store_ops": self.store_ops,
            "ms": round((time.perf_counter() - self.started) * 1000, 3),
        }
        record.update(self.details)
        return record

    def header(self) -> str:
        return f"source={self.source}; causes={','.join(self.causes)}; saved={int(self.saved)}"

    def emit(self, node: str | None, mode: str) -> None:
        debug_logger.info(json.dumps(self.as_dict(node, mode), separators=(",", ":"), default=str))
