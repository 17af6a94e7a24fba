"""Idle timeouts of the sessions that have their own, as this process last saw them.

A session whose ``max_inactive`` differs from the setting (Django's
``set_expiry``, a "remember me" login) must have its store expiry slid by its
own timeout on every read. That timeout is stored in the payload, which a
read only sees after the command that loaded it, and so slid it by the
default, had to fix: two commands per read. :class:`IdleTimeouts` remembers
each such session's timeout from its last load or save in this process, so
the next read slides it right in its one command. A remembered value that
went stale (another node changed the timeout) costs the same second command
once, and is corrected.
"""

from __future__ import annotations

__all__ = ["IdleTimeouts"]


class IdleTimeouts:
    """``max_inactive`` per session key, for the sessions whose timeout is not ``default``.

    At most ``limit`` keys are kept; past that the memo starts over (an entry
    only saves one command, losing them all costs one command per session).
    """

    def __init__(self, default: int, limit: int = 10_000) -> None:
        self.default = default
        self._limit = limit
        self._own: dict[str, int] = {}

    def get(self, key: str) -> int:
        """The session's idle timeout as last seen here, else the default."""
        return self._own.get(key, self.default)

    def seen(self, key: str, max_inactive: int) -> None:
        """Record the timeout a load or a save of ``key`` found."""
        if max_inactive == self.default:
            if self._own:
                self._own.pop(key, None)
            return
        if len(self._own) >= self._limit:
            self._own.clear()
        self._own[key] = max_inactive
