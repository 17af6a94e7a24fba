"""Session locks (both modes): which requests lock, and keeping locks alive.

In non-sticky mode the lock lives in the store; in sticky mode in the node
copy, where every request of the session arrives.

:class:`LockPolicy` decides per request path (``locking`` setting):

``none``
    never lock (concurrent saves are merged per attribute);
``all``
    lock every request that loads a session;
``uri:<regex>``
    lock requests whose path matches;
``auto``
    lock, but learn which paths never modify the session and stop locking
    them after :data:`AUTO_READ_ONLY_AFTER` such requests in a row; a path
    that modifies the session again is locked again. The memory is bounded
    (:data:`AUTO_MAX_PATHS`, least recently seen dropped) and entries age
    out after :data:`AUTO_MAX_AGE` seconds.

:class:`LockRenewer` is one background thread per manager that extends every
held lock before it expires, so a long request keeps its lock; a request
that dies stops renewing and its lock expires after ``lock_expiry``.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from typing import Callable

__all__ = ["LockPolicy", "LockRenewer", "AUTO_READ_ONLY_AFTER", "AUTO_MAX_PATHS", "AUTO_MAX_AGE"]

_log = logging.getLogger("sessionstore")

AUTO_READ_ONLY_AFTER = 2
AUTO_MAX_PATHS = 2000
AUTO_MAX_AGE = 1800.0


class LockPolicy:
    """Whether a request on ``path`` takes the session lock."""

    def __init__(self, locking: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.mode = "uri" if locking.startswith("uri:") else locking
        self._uri = re.compile(locking[4:]).search if self.mode == "uri" else None
        self._clock = clock
        # auto: path -> (consecutive read-only requests, last seen)
        self._seen: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._lock = threading.Lock()

    def should_lock(self, path: str) -> bool:
        if self.mode == "none":
            return False
        if self.mode == "all":
            return True
        if self._uri is not None:
            return self._uri(path) is not None
        with self._lock:
            entry = self._seen.get(path)
        if entry is None or self._clock() - entry[1] > AUTO_MAX_AGE:
            return True
        return entry[0] < AUTO_READ_ONLY_AFTER

    def observe(self, path: str, modified: bool) -> None:
        """auto: learn from a finished request that loaded the session."""
        if self.mode != "auto":
            return
        now = self._clock()
        with self._lock:
            streak = self._seen.pop(path, (0, now))[0]
            self._seen[path] = (0 if modified else streak + 1, now)
            while len(self._seen) > AUTO_MAX_PATHS:
                self._seen.popitem(last=False)


class LockRenewer:
    """Renews held locks every ``expiry / 3`` seconds from one daemon thread."""

    def __init__(self, renew: Callable[[str, str, float], bool], expiry: float) -> None:
        self._renew = renew
        self._expiry = expiry
        self._held: dict[tuple[str, str], float] = {}  # (key, token) -> acquired at
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def hold(self, key: str, token: str) -> None:
        with self._cond:
            self._held[(key, token)] = time.monotonic()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="sessionstore-locks", daemon=True)
                self._thread.start()

    def drop(self, key: str, token: str) -> None:
        with self._cond:
            self._held.pop((key, token), None)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _run(self) -> None:
        interval = max(self._expiry / 3, 0.05)
        while True:
            with self._cond:
                self._cond.wait(interval)
                if self._closed:
                    return
                now = time.monotonic()
                due = [k for k, since in self._held.items() if now - since >= interval * 0.9]
            for key, token in due:
                try:
                    if not self._renew(key, token, self._expiry):
                        _log.warning("sessionstore: a held session lock was lost before its request ended")
                        self.drop(key, token)
                except Exception as exc:  # store down: the lock may expire; the version check still guards
                    _log.warning("sessionstore: renewing a session lock failed: %s", exc)
