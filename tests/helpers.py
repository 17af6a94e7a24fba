"""Test helpers: a controllable clock, a store that counts its calls, a tiny app."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, Callable

from werkzeug.test import Client

from sessionstore import SessionMiddleware, get_session
from sessionstore.stores.base import ANY
from sessionstore.stores.memory import MemoryStore


class ServerClient(Client):
    """werkzeug's test client, closing each response body as a WSGI server does."""

    def open(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("buffered", True)
        return super().open(*args, **kwargs)


class FakeClock:
    """``() -> epoch seconds`` that only moves when told to."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class CountingMemoryStore(MemoryStore):
    """The real memory store, counting calls per method (instrumentation, not a fake)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls: Counter[str] = Counter()

    def _count(self, name: str) -> None:
        self.calls[name] += 1

    def load(self, key):
        self._count("load")
        return super().load(key)

    def load_and_touch(self, key, ttl):
        self._count("load_and_touch")
        return super().load_and_touch(key, ttl)

    def save(self, key, data, ttl, expect=ANY):
        self._count("save")
        return super().save(key, data, ttl, expect)

    def touch(self, key, ttl):
        self._count("touch")
        return super().touch(key, ttl)

    def delete(self, key, expect=ANY):
        self._count("delete")
        return super().delete(key, expect)

    @property
    def writes(self) -> int:
        return self.calls["save"]

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def install_store(mw: SessionMiddleware, store: MemoryStore) -> MemoryStore:
    """Put ``store`` behind ``mw`` (the middleware built its own from the URL)."""
    mw.manager.store = store
    return store


Handler = Callable[[Any, dict], Any]


def json_app(handlers: dict[str, Handler]):
    """A WSGI app dispatching on PATH_INFO; each handler gets (session, environ)
    and returns a JSON-able result sent as the body."""

    def app(environ, start_response):
        handler = handlers.get(environ["PATH_INFO"])
        if handler is None:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found"]
        try:
            session = get_session(environ)
        except LookupError:  # ignored path
            session = None
        result = handler(session, environ)
        body = json.dumps(result, default=str).encode()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body]

    return app
