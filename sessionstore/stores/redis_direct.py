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
thread. Any failure other than an error reply discards the connections and
answers :data:`MISS` (for :data:`PAUSE` seconds); the caller then repeats
the command through the client, which reconnects and retries as configured:
a failing call makes one more attempt than the client alone would. Only commands that are
safe to repeat are sent here: reads, and the store's scripts, which are
written so that a repeated call finds its own first effect (redis-py's own
retries already rely on that). It opens at most as many connections as the
client's pool may (``max_connections``); past that, commands go through the
client.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from typing import Any

from redis import Redis
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError
from redis.retry import Retry

__all__ = ["DirectCommands", "MISS"]

#: The answer of :meth:`DirectCommands.call` when the caller must use the client.
MISS = object()
#: Seconds during which commands go through the client after a direct one failed.
PAUSE = 1.0

_instances: "weakref.WeakSet[DirectCommands]" = weakref.WeakSet()


class DirectCommands:
    """Idle connections of ``client``'s pool settings, for single commands safe to repeat."""

    def __init__(self, client: Redis) -> None:
        pool = client.connection_pool
        # One connection attempt: the client's own retries follow if it fails.
        kwargs = {**pool.connection_kwargs, "retry": Retry(NoBackoff(), 0)}
        self._new = lambda: pool.connection_class(**kwargs)
        self._idle: list[Any] = []
        self._resume_at = 0.0  # after a failure, commands go through the client until then
        self._limit = pool.max_connections  # as many as the client's pool may open, at most
        self._open = 0
        self._count_lock = threading.Lock()
        _instances.add(self)

    def call(self, *args: Any) -> Any:
        """Send one command and return its reply, or :data:`MISS` after a failure.

        An error reply (``WRONGTYPE`` …) is raised as redis-py raises it.
        """
        if self._resume_at and not self._resumed():
            return MISS
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
            self._pause()
            return MISS
        self._idle.append(conn)
        return reply

    def _pause(self) -> None:
        """After a failure: drop the idle connections (likely dead too) and step aside for a while.

        During an outage every command then goes through the client alone, so a
        failing call pays the client's attempts and timeouts, plus at most one
        direct attempt per :data:`PAUSE` seconds.
        """
        self._resume_at = time.monotonic() + PAUSE
        self.close()

    def _resumed(self) -> bool:
        if time.monotonic() < self._resume_at:
            return False
        self._resume_at = 0.0
        return True

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
            self._pause()
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
    for direct in list(_instances):
        direct._forget()


os.register_at_fork(after_in_child=_after_fork)
