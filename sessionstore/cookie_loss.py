"""Detecting clients that never send their session cookie back.

The classic non-sticky redirect loop: every request of a client creates a
new session because the browser refused the cookie it was given. The
detector counts, per client (remote address + User-Agent), the new session
cookies issued to requests that carried none; the third within
:data:`WINDOW` seconds without the client ever sending one back is reported
as ``cookie-not-returned`` with the likely reason, read from the request
and the cookie settings. Memory is bounded (:data:`MAX_CLIENTS`, oldest
forgotten first). Counting is per process: behind a round-robin balancer
each node sees its share of the loop.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from typing import Callable

from .settings import Settings

__all__ = ["CookieLossDetector", "likely_reason", "THRESHOLD", "WINDOW", "MAX_CLIENTS"]

THRESHOLD = 3
WINDOW = 60.0
MAX_CLIENTS = 10_000


def client_key(environ: dict) -> str:
    raw = f"{environ.get('REMOTE_ADDR', '')}\0{environ.get('HTTP_USER_AGENT', '')}"
    return hashlib.blake2b(raw.encode("utf-8", "replace"), digest_size=12).hexdigest()


class CookieLossDetector:
    """Counts new cookies per client; reports the ones that never come back."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._issued: OrderedDict[str, tuple[int, float]] = OrderedDict()  # client -> (count, first)
        self._lock = threading.Lock()

    def cookie_returned(self, environ: dict) -> None:
        """The client sent a session cookie: it stores cookies fine."""
        if self._issued:
            with self._lock:
                self._issued.pop(client_key(environ), None)

    def cookie_issued(self, environ: dict) -> str | None:
        """A new cookie went to a client that sent none; the likely reason if it keeps happening."""
        key = client_key(environ)
        now = self._clock()
        with self._lock:
            count, first = self._issued.pop(key, (0, now))
            if now - first > WINDOW:
                count, first = 0, now
            count += 1
            self._issued[key] = (count, first)
            while len(self._issued) > MAX_CLIENTS:
                self._issued.popitem(last=False)
        return likely_reason(self.settings, environ) if count >= THRESHOLD else None


def likely_reason(s: Settings, environ: dict) -> str:
    """Why a browser would not send the session cookie back, judged from one request."""
    https = environ.get("wsgi.url_scheme") == "https"
    host = (environ.get("HTTP_HOST") or environ.get("SERVER_NAME") or "").split(":")[0].lower()
    path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    forwarded = environ.get("HTTP_X_FORWARDED_PROTO", "").lower()
    if s.cookie_secure is True and not https:
        why = "Secure cookie sent over http: the browser stores it but never sends it back on http"
        if forwarded == "https":
            why += " (X-Forwarded-Proto says https: wrap the app in werkzeug's ProxyFix)"
        return why
    if s.cookie_samesite == "None" and not (s.cookie_secure is True or https):
        return "SameSite=None without Secure: browsers reject the cookie"
    if s.cookie_domain:
        domain = s.cookie_domain.lstrip(".").lower()
        if host != domain and not host.endswith("." + domain):
            return f"Domain={s.cookie_domain} does not match the host {host!r}: the browser rejects the cookie"
    if not (path == s.cookie_path or path.startswith(s.cookie_path.rstrip("/") + "/")):
        return f"Path={s.cookie_path} does not cover {path!r}: the cookie is not sent for this path"
    if s.cookie_samesite == "Strict" and environ.get("HTTP_REFERER"):
        return "SameSite=Strict: the cookie is not sent on requests that come from another site"
    return "no cookie setting explains it: the client may refuse cookies, or a proxy strips them"
