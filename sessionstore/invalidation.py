"""The cross-node invalidation feed (sticky mode).

In sticky mode each node holds the primary copy of its sessions in memory.
A session destroyed from another node (``manager.invalidate_by_index`` for
a single sign-out arriving anywhere, ``manager.invalidate``), or moved to
another node by a failover, must also leave the memory of the node that
holds it. Every sticky node therefore publishes such events on a feed in the
shared store and listens to it:

=============  ==========================================================
store          how messages travel
=============  ==========================================================
Redis          pub/sub (``PUBLISH``; one subscription connection per node,
               delivered at once, no command while idle)
memcached      an ``incr`` sequence plus one record per message; each node
               polls the sequence every :data:`POLL_INTERVAL` seconds
               (one ``get``), and reads records only when it moved
SQL            an invalidations table numbered by the database; each node
               polls it every :data:`POLL_INTERVAL` seconds (one SELECT)
memory         in-process: delivered in the publisher's thread to every
               node sharing the store object
=============  ==========================================================

Polling runs in one background thread per node and costs no request
anything: with the default interval, 4 commands per second per node on
memcached and SQL, whatever the traffic. A message reaches every node within
``POLL_INTERVAL`` plus one round trip (well under the 1 s target).

A message is JSON: ``{"o": <origin node>, "r": <reason>, "i": [<session
ids>]}``; nodes ignore their own. When a feed may have lost messages (a
Redis reconnection, a memcached sequence that vanished, a record or a
database number missing for too long, a message that does not decode: it
may have named sessions), the listener says so and sticky
mode checks every session it holds against the store once, on its next use
(:meth:`~sessionstore.sticky.StickyStore.suspect_all`).

The node's callbacks are held weakly: a manager that is garbage-collected
without ``close()`` stops its listener.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from typing import Any, Callable

from . import ids
from .decoding import field, json_document, text
from .errors import CorruptPayload, StoreError
from .stores.base import PollFeed, PushFeed

__all__ = ["InvalidationFeed", "POLL_INTERVAL", "feed_kind", "read_message"]

_log = logging.getLogger("sessionstore")

#: Seconds between two polls of a store without push (memcached, SQL).
POLL_INTERVAL = 0.25
_PART = "feed message"
#: Longest wait between attempts to reach a feed the store cannot serve now.
_MAX_RETRY = 5.0


def feed_kind(store: Any) -> str | None:
    """``"push"``, ``"poll"`` or ``None`` (the store has no feed)."""
    if isinstance(store, PushFeed):
        return "push"
    if isinstance(store, PollFeed):
        return "poll"
    return None


class InvalidationFeed:
    """Publishes this node's invalidations and hands other nodes' to ``on_invalidated``.

    ``on_invalidated(session_ids, reason)`` and ``on_lost()`` are held
    weakly when they are bound methods (the manager's).
    """

    def __init__(
        self,
        store: Any,
        channel: str,
        node_id: str,
        on_invalidated: Callable[[list[str], str], None],
        on_lost: Callable[[], None],
        *,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        kind = feed_kind(store)
        if kind is None:
            raise TypeError(f"{type(store).__name__} has no invalidation feed")
        self.kind = kind
        self.store = store
        self.channel = channel
        self.node_id = node_id
        self.poll_interval = poll_interval
        self._on_invalidated = _weak(on_invalidated)
        self._on_lost = _weak(on_lost)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._subscription: Any = None
        self._lock = threading.Lock()
        #: Messages received from other nodes, and losses reported (monitoring, tests).
        self.received = 0
        self.losses = 0

    # -- publishing -------------------------------------------------------------------

    def publish(self, session_ids: list[str], reason: str) -> None:
        """Tell the other nodes that ``session_ids`` are over (``invalidated`` or ``moved``).

        Raises :class:`~sessionstore.errors.StoreUnavailable` if the store cannot be reached.
        """
        if not session_ids:
            return
        message = json.dumps({"o": self.node_id, "r": reason, "i": list(session_ids)}, separators=(",", ":"))
        self.store.feed_publish(self.channel, message.encode())

    # -- listening ----------------------------------------------------------------------

    def start(self) -> None:
        """Start listening: at once if the store answers (so nothing published afterwards is
        missed), else in the background, retrying."""
        if self.kind == "push":
            try:
                self._subscribe()
            except StoreError as exc:
                _log.warning("sessionstore: invalidation feed not subscribed yet (%s); retrying", exc)
                self._spawn(self._subscribe_later)
            return
        try:
            cursor = self.store.feed_position(self.channel)
        except StoreError as exc:
            _log.warning("sessionstore: invalidation feed not reachable yet (%s); retrying", exc)
            cursor = None
        self._spawn(lambda: self._poll(cursor))

    def _spawn(self, target: Callable[[], None]) -> None:
        self._thread = threading.Thread(target=target, name="sessionstore-invalidations", daemon=True)
        self._thread.start()

    def _subscribe(self) -> None:
        subscription = self.store.feed_subscribe(self.channel, self._deliver, self._lost)
        with self._lock:
            if self._stop.is_set():
                subscription.close()
            else:
                self._subscription = subscription

    def _subscribe_later(self) -> None:
        delay = 0.1
        while not self._stop.wait(delay):
            try:
                self._subscribe()
            except StoreError:
                delay = min(delay * 2, _MAX_RETRY)
                continue
            self._lost()  # anything published before this moment was missed
            return

    def _poll(self, cursor: Any) -> None:
        delay = self.poll_interval
        while not self._stop.wait(delay):
            if self._on_invalidated() is None:  # the manager is gone
                return
            try:
                if cursor is None:
                    cursor = self.store.feed_position(self.channel)
                    self._lost()  # started late: what came before was missed
                    continue
                batch = self.store.feed_read(self.channel, cursor)
            except StoreError as exc:
                _log.debug("sessionstore: invalidation feed poll failed: %s", exc)
                delay = min(max(delay * 2, self.poll_interval), _MAX_RETRY)
                continue
            except Exception:  # a bug must not end the polling
                _log.exception("sessionstore: invalidation feed poll failed")
                delay = _MAX_RETRY
                continue
            delay = self.poll_interval
            cursor = batch.cursor
            if batch.lost:
                self._lost()
            for message in batch.messages:
                self._deliver(message)

    def _deliver(self, message: bytes) -> None:
        handler = self._on_invalidated()
        if handler is None:
            self.close()
            return
        try:
            origin, reason, session_ids = read_message(message)
        except CorruptPayload as exc:  # it may have named sessions to drop: check them all
            _log.warning("sessionstore: unreadable invalidation message ignored (%s); "
                         "re-checking local sessions", exc)
            self._lost()
            return
        if origin == self.node_id or not session_ids:
            return
        self.received += 1
        try:
            handler(session_ids, reason)
        except Exception:
            _log.exception("sessionstore: handling an invalidation failed")

    def _lost(self) -> None:
        self.losses += 1
        handler = self._on_lost()
        if handler is not None:
            try:
                handler()
            except Exception:
                _log.exception("sessionstore: handling a possible loss of invalidations failed")

    def close(self, wait: bool = True) -> None:
        """Stop listening (idempotent); ``wait=False``: do not wait for the listener thread."""
        self._stop.set()
        with self._lock:
            subscription, self._subscription = self._subscription, None
        if subscription is not None:
            if wait:
                subscription.close()
            else:
                threading.Thread(target=subscription.close, daemon=True).start()
        thread = self._thread
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)


def read_message(data: bytes) -> tuple[str, str, list[str]]:
    """``(origin node, reason, session ids)`` of a feed message (see the module docs).

    :raise CorruptPayload: (``feed message``) it is not one. Ids that are not well formed
        are left out (they name no session).
    """
    body = json_document(data, _PART)
    if type(body) is not dict or type(body.get("i")) is not list:
        raise CorruptPayload(f"bad {_PART}: not an object with a list of ids", part=_PART)
    origin, reason = field(body, "o", _PART, text), field(body, "r", _PART, text)
    return origin, reason, [i for i in body["i"] if type(i) is str and ids.is_valid(i)]


def _weak(callback: Callable[..., Any]) -> Callable[[], Callable[..., Any] | None]:
    """A getter of ``callback``: weak for a bound method, strong otherwise."""
    if hasattr(callback, "__self__") and hasattr(callback, "__func__"):
        return weakref.WeakMethod(callback)  # type: ignore[return-value]
    return lambda: callback
