"""Session lifecycle listeners (Tomcat's HttpSessionListener / IdListener)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Literal

__all__ = ["SessionEvent", "Listeners", "EVENTS"]

_log = logging.getLogger("sessionstore")

EventName = Literal["created", "destroyed", "id_changed"]
EVENTS: tuple[str, ...] = ("created", "destroyed", "id_changed")


@dataclass(frozen=True, slots=True)
class SessionEvent:
    """What a listener receives.

    ``session_id`` is the session's id (the new one for ``id_changed``);
    ``old_id`` is set for ``id_changed``; ``reason`` says why a session was
    destroyed (``invalidated``, ``expired``).
    """

    name: str
    session_id: str
    old_id: str | None = None
    reason: str | None = None


class Listeners:
    """Callbacks by event name. A failing callback is logged, never propagated."""

    def __init__(self) -> None:
        self._callbacks: dict[str, list[Callable[[SessionEvent], None]]] = {n: [] for n in EVENTS}

    def add(self, name: str, callback: Callable[[SessionEvent], None]) -> None:
        if name not in self._callbacks:
            raise ValueError(f"unknown session event {name!r}; expected one of {', '.join(EVENTS)}")
        self._callbacks[name].append(callback)

    def emit(self, event: SessionEvent) -> None:
        for callback in self._callbacks[event.name]:
            try:
                callback(event)
            except Exception:
                _log.exception("sessionstore: %s listener %r failed", event.name, callback)
