"""Django session engine: ``request.session`` is a sessionstore session.

::

    # settings.py
    SESSION_ENGINE = "sessionstore.django"
    SESSIONSTORE = {"store": "redis://127.0.0.1:6379/0"}      # any sessionstore setting
    MIDDLEWARE = ["sessionstore.django.SessionMiddleware", ...]  # or Django's own SessionMiddleware

Requires Django 4.2 or later.

Configuration
-------------
``SESSIONSTORE`` is a dict of :class:`~sessionstore.Settings` fields (names
case-insensitive, strings parsed as :meth:`~sessionstore.Settings.from_mapping`
does); an unknown name is ``ImproperlyConfigured``. ``secret_key`` defaults to
``SECRET_KEY`` (signing) then ``SECRET_KEY_FALLBACKS`` (verifying only) and
``max_inactive`` to ``SESSION_COOKIE_AGE``. The cookie is written by Django's
``SessionMiddleware`` from ``SESSION_COOKIE_*``, so the ``cookie_*`` fields
are copied from those and may not be set in ``SESSIONSTORE``. One
:class:`~sessionstore.SessionManager` serves the process (:func:`get_manager`),
built on first use and rebuilt when a test changes these settings.

Session key and cookie
----------------------
Django puts ``request.session.session_key`` in the cookie and hands the cookie
back to ``SessionStore(session_key)``. Here the session key *is* the signed
cookie value (``<id>.<signature>``, what :class:`~sessionstore.SessionMiddleware`
sends), never the bare id. Every method that takes a key (``exists``,
``delete``, the constructor) verifies the signature first: a forged or
malformed key is never looked up, never adopted, never reaches the store; a
genuine key the store does not hold gets a new id. Before the session is
loaded ``session_key`` is the cookie if its signature verifies (no store
call), else ``None``; once loaded it is the signed current id, or ``None``
while the session is empty and not stored.

Semantics
---------
* Lazy: a request that never touches ``request.session`` makes no store call.
* ``modified`` reads True when the request changed the session, in-place
  changes included (``request.session["cart"]["items"].append(1)`` needs no
  ``modified = True``); setting it True makes the next ``save()`` write even
  if nothing changed.
* ``save()`` commits (deep dirty check: unchanged data is not rewritten). An
  explicit ``save()`` of an empty, unstored session stores it, so it gets a
  key (Django's ``if not session.session_key: session.save()`` idiom). If
  another request destroyed the session meanwhile, ``save()`` raises
  ``UpdateError`` and Django answers ``SessionInterrupted`` (400), as its own
  backends do.
* ``cycle_key()`` is :meth:`Session.rotate`: new id, same data; the old id is
  deleted by the commit in ``save()`` (Django's ``login()`` calls it).
* ``flush()`` is :meth:`Session.invalidate` committed at once: the stored
  session is gone before ``flush()`` returns; data written afterwards starts
  a new session under a new id. ``delete(key)`` destroys a stored session.
* ``create()`` stores, at once, a new session under a fresh id holding this
  session's data (Django's contract); the old id is left as it is.
* ``exists(key)`` verifies ``key`` and asks the store.
* ``set_expiry(seconds)`` sets the session's ``max_inactive`` (idle timeout,
  like Django's "after that many seconds of inactivity");
  ``get_expiry_age()`` then returns it. ``set_expiry(0)`` keeps the default
  idle timeout and makes the cookie a browser-session cookie.
  ``set_expiry(datetime | timedelta)`` is an absolute expiry, which
  ``max_inactive`` cannot express: ``max_inactive`` is set to the time left,
  and a session loaded after that date is flushed. ``set_expiry(None)``
  restores the default.
* ``clear_expired()`` (``manage.py clearsessions``) runs the SQL store's
  cleaner; for Redis, memcached and memory it is a no-op: they expire
  sessions by themselves.
* Each request's sessions are released (locks freed, debug record logged)
  on Django's ``request_finished`` signal.

:class:`SessionMiddleware` (optional, in place of Django's) passes the
request path to the session, so ``locking="uri:…"`` and ``"auto"`` see it
(with Django's middleware they see ``""``), and answers a store failure with
503 and ``Retry-After`` (409 for ``on_conflict="error"``) instead of a 500.
"""

from __future__ import annotations

import atexit
import math
import threading
from contextvars import ContextVar
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.sessions.backends.base import CreateError, SessionBase, UpdateError
from django.contrib.sessions.middleware import SessionMiddleware as DjangoSessionMiddleware
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import request_finished, request_started, setting_changed
from django.http import HttpRequest, HttpResponse

from django.utils import timezone

from .debug import RequestRecord
from .errors import ConflictError, LockTimeout, StoreUnavailable, failure_headers, failure_response
from .manager import SessionManager
from .session import Session
from .settings import Settings
from .startup import log_startup_warnings, startup_warnings
from .stores.base import OpCounter, close_counter, open_counter

__all__ = ["SessionStore", "SessionMiddleware", "get_manager", "reset_manager", "settings_from_django"]

_EXPIRY = "_session_expiry"  # Django's own key for set_expiry() values
_COOKIE_FIELDS = ("cookie_name", "cookie_domain", "cookie_path", "cookie_secure", "cookie_httponly",
                  "cookie_samesite")
_WATCHED = {"SESSIONSTORE", "SECRET_KEY", "SECRET_KEY_FALLBACKS", "SESSION_COOKIE_AGE"}


# -- the process-wide manager --------------------------------------------------------

_manager: SessionManager | None = None
_manager_lock = threading.Lock()


def settings_from_django() -> Settings:
    """sessionstore settings from ``settings.SESSIONSTORE`` and Django's own settings."""
    conf = dict(getattr(settings, "SESSIONSTORE", None) or {})
    known = {f.name for f in fields(Settings)}
    for key in conf:
        name = str(key).lower()
        if name not in known:
            raise ImproperlyConfigured(f"SESSIONSTORE: unknown setting {key!r}")
        if name in _COOKIE_FIELDS:
            raise ImproperlyConfigured(f"SESSIONSTORE[{key!r}]: Django's SessionMiddleware writes the cookie; "
                                       f"set SESSION_{name.upper()} instead")
    conf = {str(key).lower(): value for key, value in conf.items()}
    return Settings.from_mapping({**_django_values(conf), **conf})


def _django_values(conf: dict[str, Any]) -> dict[str, Any]:
    """The sessionstore fields Django's settings imply (``conf``: what SESSIONSTORE sets)."""
    samesite = settings.SESSION_COOKIE_SAMESITE
    values: dict[str, Any] = {
        "cookie_name": settings.SESSION_COOKIE_NAME,
        "cookie_domain": settings.SESSION_COOKIE_DOMAIN,
        "cookie_path": settings.SESSION_COOKIE_PATH,
        "cookie_secure": bool(settings.SESSION_COOKIE_SECURE),
        "cookie_httponly": bool(settings.SESSION_COOKIE_HTTPONLY),
        "cookie_samesite": samesite.title() if isinstance(samesite, str) else None,
    }
    if "max_inactive" not in conf:
        values["max_inactive"] = int(settings.SESSION_COOKIE_AGE)
    if "secret_key" not in conf:  # a list: a comma in SECRET_KEY is not a key separator
        values["secret_key"] = [settings.SECRET_KEY, *getattr(settings, "SECRET_KEY_FALLBACKS", ())]
    return values


def get_manager() -> SessionManager:
    """The process's :class:`~sessionstore.SessionManager`, built from the settings on first use."""
    global _manager
    manager = _manager
    if manager is None:
        with _manager_lock:
            if _manager is None:
                _manager = SessionManager(settings_from_django())
                log_startup_warnings(startup_warnings(_manager.settings, _manager.store,
                                                      _manager.key("startup-check")))
            manager = _manager
    return manager


def reset_manager() -> None:
    """Close the manager; the next use builds one from the current settings."""
    global _manager
    with _manager_lock:
        manager, _manager = _manager, None
    if manager is not None:
        manager.close()


def _settings_changed(setting: str, **kwargs: Any) -> None:
    if setting in _WATCHED or setting.startswith("SESSION_COOKIE_"):
        reset_manager()


setting_changed.connect(_settings_changed, dispatch_uid="sessionstore.django.settings")
atexit.register(reset_manager)


# -- per-request bookkeeping ------------------------------------------------------------


@dataclass
class _Scope:
    """The sessions one request opened, and its store command counter."""

    counter: OpCounter
    token: Any
    sessions: list["SessionStore"] = field(default_factory=list)


_scope: ContextVar[_Scope | None] = ContextVar("sessionstore_django_scope", default=None)


def _request_started(sender: Any, **kwargs: Any) -> None:
    _scope.set(_Scope(*open_counter()))


def _request_finished(sender: Any, **kwargs: Any) -> None:
    scope = _scope.get()
    if scope is None:
        return
    _scope.set(None)
    try:
        for store in scope.sessions:
            store._finish(scope.counter.n)
    finally:
        try:
            close_counter(scope.token)
        except (ValueError, RuntimeError):  # finished in another context than it started in
            pass


request_started.connect(_request_started, dispatch_uid="sessionstore.django.started")
request_finished.connect(_request_finished, dispatch_uid="sessionstore.django.finished")


# -- the engine ------------------------------------------------------------------------------


class SessionStore(SessionBase):
    """Django's ``SessionBase`` over a :class:`sessionstore.Session` (see the module documentation).

    ``session_key`` is the signed cookie value; ``path`` is the request path
    for the lock policy (:class:`SessionMiddleware` passes it).
    """

    def __init__(self, session_key: str | None = None, *, path: str = "") -> None:
        self._manager = get_manager()
        self._path = path
        self._cookie = session_key or None
        self._record = RequestRecord()
        self._inner = self._manager.open(self._cookie, self._record, path)
        self._flag = False  # modified = True
        self._checked = False  # absolute expiry checked after loading
        super().__init__(None)
        scope = _scope.get()
        if scope is not None:
            scope.sessions.append(self)

    # -- key ----------------------------------------------------------------------

    @property
    def session_key(self) -> str | None:  # type: ignore[override]
        """The cookie value: the signed session id, or None (see the module documentation)."""
        if not self._inner.loaded:
            return self._cookie if self._unsign(self._cookie) is not None else None
        return None if self.is_empty() else self._manager.signer.sign(self._inner.id)

    def _set_session_key(self, value: str | None) -> None:
        if value is not None:
            raise AttributeError("the session key is the signed session id; use cycle_key() or create()")

    _session_key = property(lambda self: self.session_key, _set_session_key)

    def _unsign(self, value: str | None) -> str | None:
        """The session id in a cookie value whose signature verifies, else None (no store call)."""
        if not value:
            return None
        verdict = self._manager.signer.unsign(value)
        return verdict if isinstance(verdict, str) else None

    def is_empty(self) -> bool:
        """True when there is no session to keep: no valid key, or empty and not stored."""
        if not self._inner.loaded:
            return self.session_key is None
        return not self._inner.stored and len(self._inner) == 0

    # -- data -------------------------------------------------------------------------

    def _get_session(self, no_load: bool = False) -> Session:
        self.accessed = True
        if not self._checked:
            self._checked = True
            self._expire_if_due()
        return self._inner

    _session = property(_get_session)

    async def _aget_session(self, no_load: bool = False) -> Session:
        if not self._checked:
            await sync_to_async(self._get_session)()
        self.accessed = True
        return self._inner

    def _expire_if_due(self) -> None:
        """Flush a session loaded after its absolute ``set_expiry()`` date."""
        expiry = self._inner.get(_EXPIRY)
        if not isinstance(expiry, str):
            return
        try:
            due = datetime.fromisoformat(expiry) <= timezone.now()
        except (ValueError, TypeError):  # unparsable, or naive against aware
            return
        if due:
            self.flush()

    @property
    def modified(self) -> bool:  # type: ignore[override]
        """Whether this request changed the session, in-place changes included."""
        return self._flag or self._inner.has_changes()

    @modified.setter
    def modified(self, value: bool) -> None:
        self._flag = bool(value)

    def clear(self) -> None:
        """Remove every attribute; the (empty) session keeps its id."""
        self._get_session().clear()
        self.modified = True

    def load(self) -> dict[str, Any]:
        """Every attribute of the session, as a dict."""
        return self._get_session().copy()

    # -- persistence -------------------------------------------------------------------------

    def exists(self, session_key: str) -> bool:
        """Whether the store holds the session of ``session_key`` (a signed cookie value)."""
        session_id = self._unsign(session_key)
        return session_id is not None and self._manager.load(session_id) is not None

    def save(self, must_create: bool = False) -> None:
        """Commit the session (see the module documentation); ``must_create``: only if not stored yet."""
        inner = self._get_session()
        stored = inner.stored
        if must_create and stored:
            raise CreateError
        if self._flag or must_create or (not stored and len(inner) == 0):
            inner.mark_modified()
        destroyed_before = bool(self._record.details.get("destroyed_meanwhile"))
        self._manager.commit(inner)
        self._flag = False
        if not destroyed_before and self._record.details.get("destroyed_meanwhile"):
            raise UpdateError

    def create(self) -> None:
        """Store a new session under a fresh id now, holding this session's data if loaded."""
        old = self._inner
        data, max_inactive = (old.copy(), old.max_inactive) if old.loaded else ({}, None)
        self._release(old)
        self._record = RequestRecord()
        self._cookie = None
        self._inner = self._manager.open(None, self._record, self._path)
        self._inner.update(data)
        if max_inactive is not None:
            self._inner.max_inactive = max_inactive
        self._inner.mark_modified()
        self._manager.commit(self._inner)
        self._checked = True
        self.modified = True

    def cycle_key(self) -> None:
        """New id, same data; the old id is deleted when the session is saved."""
        self._get_session().rotate()

    async def acycle_key(self) -> None:
        await sync_to_async(self.cycle_key)()

    def flush(self) -> None:
        """Destroy the stored session now; continue with a new, empty one."""
        self._inner.invalidate()
        self._manager.commit(self._inner)
        self._checked = True
        self._flag = False
        self.accessed = True

    async def aflush(self) -> None:
        await sync_to_async(self.flush)()

    def delete(self, session_key: str | None = None) -> None:
        """Destroy the stored session of ``session_key`` (a signed cookie value; default: this one)."""
        if session_key is not None:
            session_id = self._unsign(session_key)
        elif self._inner.loaded:
            session_id = self._inner.id if self._inner.stored else None
        else:
            session_id = self._unsign(self._cookie)
        if session_id is not None:
            self._manager.invalidate(session_id)

    @classmethod
    def clear_expired(cls) -> None:
        """``manage.py clearsessions``: one pass of the SQL store's cleaner; else nothing to do.

        Redis, memcached and the memory store expire sessions by themselves.
        """
        store = get_manager().store
        cleanup = getattr(store, "cleanup", None) or getattr(getattr(store, "remote", None), "cleanup", None)
        if cleanup is not None:
            cleanup()

    # -- expiry ------------------------------------------------------------------------------

    def get_session_cookie_age(self) -> int:
        """This session's ``max_inactive``; ``SESSION_COOKIE_AGE`` if it never expires."""
        seconds = self._get_session().max_inactive
        return seconds if seconds > 0 else int(settings.SESSION_COOKIE_AGE)

    def set_expiry(self, value: int | float | datetime | timedelta | None) -> None:
        """Map Django's expiry onto ``max_inactive`` (see the module documentation)."""
        inner = self._get_session()
        if isinstance(value, timedelta):
            value = timezone.now() + value
        if isinstance(value, datetime):
            inner.max_inactive = max(1, math.ceil((value - timezone.now()).total_seconds()))
            inner[_EXPIRY] = value.isoformat()
            return
        if value is None or value == 0:
            inner.max_inactive = self._manager.settings.max_inactive
            if value == 0:
                inner[_EXPIRY] = 0
            else:
                inner.pop(_EXPIRY, None)
            return
        inner.max_inactive = max(1, int(value))
        inner.pop(_EXPIRY, None)

    async def aset_expiry(self, value: int | float | datetime | timedelta | None) -> None:
        await sync_to_async(self.set_expiry)(value)

    # -- end of request ---------------------------------------------------------------------------

    def _release(self, inner: Session) -> None:
        if inner.loaded:
            self._manager.release(inner)

    def _finish(self, store_ops: int) -> None:
        """``request_finished``: release the session, count it, log its debug record."""
        self._release(self._inner)
        self._record.store_ops = store_ops
        self._manager.metrics.observe(self._record, self._inner.loaded)
        if self._manager.settings.debug:
            self._record.emit(self._manager.settings.node_id, self._manager.settings.mode)


# -- optional middleware -----------------------------------------------------------------------

#: Errors the middleware answers itself (503 / 409) instead of Django's 500.
_HANDLED = (LockTimeout, StoreUnavailable, ConflictError)


class SessionMiddleware(DjangoSessionMiddleware):
    """Django's ``SessionMiddleware``, plus the request path for the lock policy and 503 on store failures."""

    def process_request(self, request: HttpRequest) -> None:
        if not issubclass(self.SessionStore, SessionStore):
            return super().process_request(request)
        key = request.COOKIES.get(settings.SESSION_COOKIE_NAME)
        request.session = self.SessionStore(key, path=request.path_info)  # type: ignore[attr-defined]

    def process_response(self, request: HttpRequest, response: HttpResponse) -> HttpResponse:
        try:
            return super().process_response(request, response)
        except _HANDLED as exc:
            return _failure_response(request, exc)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if isinstance(exception, _HANDLED):
            return _failure_response(request, exception)
        return None


def _failure_response(request: HttpRequest, exc: Exception) -> HttpResponse:
    status, cause, body = failure_response(exc)  # type: ignore[misc]
    session = getattr(request, "session", None)
    if isinstance(session, SessionStore):
        session._record.add(cause, error=str(exc))
    response = HttpResponse(body, status=status)
    for name, value in failure_headers(status):
        response[name] = value
    return response
