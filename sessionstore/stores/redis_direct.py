"""Direct connections for the store's hot commands.

redis-py's ``Redis.execute_command`` spends ~30 µs of CPU per call around
the round trip itself: the pool's lock, a non-blocking read that checks the
connection before each use, the retry and observability wrappers. On a
read-only request that is as much as the rest of sessionstore's work, so
the store sends its reads (``GET``, ``GETEX``) and its scripts (``EVALSHA``)
through :class:`DirectCommands` instead.

:class:`DirectCommands` keeps a LIFO of idle connections built from the
client's own pool settings (host, auth, TLS, timeouts, database, protocol;
Sentinel connections still discover the master), one per concurrently busy
thread. Any failure other than an error reply discards the connection and
answers :data:`MISS`; the caller then repeats the command through the
client, which reconnects and retries as configured. Only commands that are
safe to repeat are sent here: reads, and the store's scripts, which are
written so that a repeated call finds its own first effect (redis-py's own
retries already rely on that). It opens at most as many connections as the
client's pool may (``max_connections``); past that, commands go through the
client.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

from redis import Redis
from redis.exceptions import ResponseError

__all__ = ["DirectCommands", "MISS"]

#: The answer of :meth:`DirectCommands.call` when the caller must use the client.
MISS = object()

_instances: "weakref.WeakSet[DirectCommands]" = weakref.WeakSet()


class DirectCommands:
    """Idle connections of ``client``'s pool settings, for single commands safe to repeat."""

    def __init__(self, client: Redis) -> None:
        pool = client.connection_pool
        self._new = lambda: pool.connection_class(**pool.connection_kwargs)
        self._idle: list[Any] = []
        self._limit = pool.max_connections  # as many as the client's pool may open, at most
        self._open = 0
        self._count_lock = threading.Lock()
        _instances.add(self)

    def call(self, *args: Any) -> Any:
        """Send one command and return its reply, or :data:`MISS` after a failure.

        An error reply (``WRONGTYPE`` …) is raised as redis-py raises it.
        """
        try:
            conn = self._idle.pop()
        except IndexError:
            conn = self._opened()
            if conn is None:
                return MISS
        try:
            conn.send_command(*args)
            reply = conn.read_response()
        except ResponseError:
            self._idle.append(conn)
            raise
        except Exception:  # connection refused/reset, timeout, protocol: let the client handle it
            self._discard(conn)
            return MISS
        self._idle.append(conn)
        return reply

    def _opened(self) -> Any:
        """A new connected connection, or None (at the limit, or it failed to connect)."""
        with self._count_lock:
            if self._open >= self._limit:
                return None
            self._open += 1
        conn = self._new()
        try:
            conn.connect()  # a Sentinel connection asks where the master is here, not on send
        except Exception:
            self._discard(conn)
            return None
        return conn

    def _discard(self, conn: Any) -> None:
        conn.disconnect()
        with self._count_lock:
            self._open -= 1

    def close(self) -> None:
        """Disconnect every idle connection (new ones are made on the next call)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            self._discard(conn)

    def _forget(self) -> None:
        # In a forked child: the sockets belong to the parent. Drop them unclosed.
        self._idle = []
        self._open = 0
        self._count_lock = threading.Lock()


def _after_fork() -> None:
    for reads in list(_instances):
        reads._forget()


os.register_at_fork(after_in_child=_after_fork)
