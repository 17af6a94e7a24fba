"""Flask integration: ``flask.session`` is a sessionstore session.

::

    from flask import Flask, session
    from sessionstore.flask import SessionStore

    app = Flask(__name__)
    app.config.update(SECRET_KEY="change-me", SESSIONSTORE_STORE="redis://127.0.0.1:6379/0")
    SessionStore(app)                  # or: sessions = SessionStore(); sessions.init_app(app)

Requires Flask 3.1 or later.

Configuration
-------------
Every field of :class:`~sessionstore.Settings` can be set as an
``app.config`` key ``SESSIONSTORE_<FIELD>`` (strings are parsed as
:meth:`~sessionstore.Settings.from_mapping` does). A field that is not set
takes Flask's own setting, so Flask's defaults win over sessionstore's
(``cookie_secure`` is ``False``, ``cookie_samesite`` ``None``, unless the
``SESSIONSTORE_`` key says otherwise):

===================  ================================================================================
``secret_key``       ``SECRET_KEY`` signs; ``SECRET_KEY_FALLBACKS`` still verify
``cookie_name``      ``SESSION_COOKIE_NAME``
``cookie_domain``    ``SESSION_COOKIE_DOMAIN``
``cookie_path``      ``SESSION_COOKIE_PATH``, else ``APPLICATION_ROOT``
``cookie_secure``    ``SESSION_COOKIE_SECURE`` (``SESSIONSTORE_COOKIE_SECURE=auto``: Secure on https)
``cookie_httponly``  ``SESSION_COOKIE_HTTPONLY``
``cookie_samesite``  ``SESSION_COOKIE_SAMESITE``
``max_inactive``     ``PERMANENT_SESSION_LIFETIME`` in seconds
===================  ================================================================================

``SESSION_COOKIE_PARTITIONED`` and ``SESSION_REFRESH_EACH_REQUEST`` are read
as Flask reads them.

Semantics
---------
``flask.session`` is a :class:`FlaskSession`, a ``SessionMixin`` over a
:class:`sessionstore.Session` (``session.store_session``; also
``sessionstore.get_session(request.environ)``).

* Lazy: a request that never touches ``session`` makes no store call and
  sets no cookie; an empty new session is not stored and sets no cookie.
* ``session.permanent`` is the ``_permanent`` attribute, as in Flask. A
  permanent session's cookie carries ``Expires`` and ``Max-Age`` from
  :meth:`~flask.sessions.SessionInterface.get_expiration_time` (now +
  ``PERMANENT_SESSION_LIFETIME``) and, with ``SESSION_REFRESH_EACH_REQUEST``,
  is sent again on every request that loaded the session; any other session
  gets a browser-session cookie. On the server every session idles out
  after ``max_inactive`` (by default ``PERMANENT_SESSION_LIFETIME``, the age
  after which Flask's own signed cookies stop verifying).
* ``session.modified`` reads True when the request changed the session:
  assignments, deletions, changes made in place (``session["cart"].append(1)``
  needs no ``session.modified = True``), a new id. Setting it True saves the
  session even if nothing changed; setting it False cannot un-change what did.
* ``session.new`` is :attr:`Session.is_new`; ``session.accessed`` is set by
  Flask on every access and adds ``Vary: Cookie``.
* ``session.clear()`` works as a logout: the stored session is destroyed
  (:meth:`Session.invalidate`) and the cookie deleted, as Flask deletes the
  cookie of an emptied session; data written afterwards starts a new session
  under a new id. A stored session emptied any other way (``pop``, ``del``)
  is destroyed the same way when the response is saved.
* sessionstore's extras: ``session.id``, ``session.rotate()`` (call it at
  login), ``session.invalidate()``, ``session.max_inactive``.
* A path matching ``ignore_pattern`` gets an :class:`IgnoredSession`: empty,
  read-only, never loaded or saved.

Saving and errors
-----------------
Flask calls :meth:`SessionStoreInterface.save_session` before the response is
sent; the session is committed there, and released (its lock freed) when the
request context tears down. A failed commit replaces the response
(:meth:`SessionStoreInterface.save_failed`; nothing of the session is saved):
503 with ``Retry-After`` when the store is unavailable or the session lock
times out, 409 with ``on_conflict="error"``, 500 for a value that cannot be
serialized or a session over ``max_size``. A store failure while the view
loads the session (:class:`~sessionstore.StoreUnavailable`,
:class:`~sessionstore.LockTimeout`) becomes the same 503 through error
handlers that :meth:`SessionStore.init_app` registers unless the app already
has its own for those exceptions.
"""

from __future__ import annotations

import logging
import re
from dataclasses import fields
from datetime import datetime, timezone
from typing import Any, Iterator, NoReturn

from flask import Flask, Request, Response, current_app, request
from flask.sessions import NullSession, SessionInterface, SessionMixin
from werkzeug.datastructures import Headers

from .debug import RequestRecord
from .errors import (
    ConfigError,
    LockTimeout,
    SerializationError,
    SessionStoreError,
    StoreUnavailable,
    failure_headers,
    failure_response,
)
from .manager import CommitOutcome, SessionManager
from .middleware import ENVIRON_KEY_POINTER, RECORD_KEY, read_cookie
from .session import Session
from .settings import Settings
from .startup import log_startup_warnings, startup_warnings
from .stores.base import close_counter, open_counter

__all__ = ["SessionStore", "SessionStoreInterface", "FlaskSession", "IgnoredSession", "settings_for"]

_log = logging.getLogger("sessionstore")

PREFIX = "SESSIONSTORE_"
#: ``request.environ[FLASK_SESSION_KEY]`` is the request's :class:`FlaskSession`.
FLASK_SESSION_KEY = "sessionstore.flask_session"
_DEFAULT_ENVIRON_KEY = "sessionstore.session"

#: sessionstore field -> the Flask setting it falls back to.
_COOKIE_FALLBACKS = (
    ("cookie_name", "SESSION_COOKIE_NAME"),
    ("cookie_domain", "SESSION_COOKIE_DOMAIN"),
    ("cookie_secure", "SESSION_COOKIE_SECURE"),
    ("cookie_httponly", "SESSION_COOKIE_HTTPONLY"),
    ("cookie_samesite", "SESSION_COOKIE_SAMESITE"),
)


# -- configuration -----------------------------------------------------------------


def settings_for(app: Flask) -> Settings:
    """``app``'s sessionstore settings: ``SESSIONSTORE_*`` keys, else Flask's own settings.

    Raises :class:`~sessionstore.ConfigError` naming the field on an invalid
    value or an unknown ``SESSIONSTORE_*`` key.
    """
    own = {key.upper(): value for key, value in app.config.items() if key.upper().startswith(PREFIX)}
    known = {f.name for f in fields(Settings)}
    for key in own:
        if key[len(PREFIX):].lower() not in known:
            raise ConfigError(key[len(PREFIX):].lower(), f"unknown setting (app.config[{key!r}])")
    mapping = {PREFIX + name.upper(): value for name, value in _flask_values(app).items()}
    mapping.update(own)
    return Settings.from_mapping(mapping, prefix=PREFIX)


def _flask_values(app: Flask) -> dict[str, Any]:
    """The sessionstore fields Flask's configuration implies."""
    config = app.config
    values = {name: config[key] for name, key in _COOKIE_FALLBACKS if key in config}
    if isinstance(values.get("cookie_samesite"), str):
        values["cookie_samesite"] = values["cookie_samesite"].title()  # Flask accepts "lax"
    values["cookie_path"] = config.get("SESSION_COOKIE_PATH") or config.get("APPLICATION_ROOT") or "/"
    values["max_inactive"] = int(app.permanent_session_lifetime.total_seconds())
    keys = [key for key in (app.secret_key, *(config.get("SECRET_KEY_FALLBACKS") or ())) if key]
    if keys:  # a list, so that a comma in SECRET_KEY is never read as a key separator
        values["secret_key"] = [key if isinstance(key, str) else key.decode("latin-1") for key in keys]
    return values


# -- the session Flask sees ---------------------------------------------------------


class FlaskSession(SessionMixin):
    """``flask.session``: a :class:`sessionstore.Session` behind Flask's ``SessionMixin``.

    See the module documentation for how ``permanent``, ``modified``, ``new``,
    ``accessed`` and ``clear()`` behave.
    """

    def __init__(self, store_session: Session, record: RequestRecord, manager: SessionManager) -> None:
        #: The underlying :class:`sessionstore.Session`.
        self.store_session = store_session
        #: This request's :class:`~sessionstore.debug.RequestRecord`.
        self.record = record
        self.accessed = False
        self._manager = manager
        self._force = False  # modified = True
        self._cleared = False
        self._released = False
        self._counter: tuple[Any, Any] | None = None  # (OpCounter, reset token) until teardown

    # -- mapping -------------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        return self.store_session[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.store_session.get(key, default)

    def __setitem__(self, key: str, value: Any) -> None:
        self.store_session[key] = value

    def __delitem__(self, key: str) -> None:
        del self.store_session[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.store_session)

    def __len__(self) -> int:
        return len(self.store_session)

    def __bool__(self) -> bool:
        return bool(self.store_session)

    def __contains__(self, key: object) -> bool:
        return key in self.store_session

    def __repr__(self) -> str:
        return f"<FlaskSession {self.store_session!r}>"

    def copy(self) -> dict[str, Any]:
        """A plain dict of every attribute."""
        return self.store_session.copy()

    def clear(self) -> None:
        """Destroy the stored session and start an empty one (the cookie is deleted)."""
        self.store_session.invalidate()
        self._cleared = True

    # -- Flask's SessionMixin ----------------------------------------------------

    @property
    def modified(self) -> bool:  # type: ignore[override]
        """Whether this request changed the session, in-place changes included."""
        return self._force or self._cleared or self.store_session.has_changes()

    @modified.setter
    def modified(self, value: bool) -> None:
        self._force = bool(value)

    @property
    def new(self) -> bool:  # type: ignore[override]
        """True until the session has been stored and sent back by the client."""
        return self.store_session.is_new

    # -- sessionstore's extras -------------------------------------------------------

    @property
    def id(self) -> str:
        """The session id (never put it in a log: see :func:`sessionstore.debug.log_id`)."""
        return self.store_session.id

    @property
    def max_inactive(self) -> int:
        """This session's idle timeout in seconds; ``<= 0`` never expires."""
        return self.store_session.max_inactive

    @max_inactive.setter
    def max_inactive(self, seconds: int) -> None:
        self.store_session.max_inactive = seconds

    def rotate(self) -> None:
        """New id, same data; the old id is deleted when the response is saved (use at login)."""
        self.store_session.rotate()

    def invalidate(self) -> None:
        """Destroy this session (logout); see :meth:`sessionstore.Session.invalidate`."""
        self.store_session.invalidate()


class IgnoredSession(NullSession):
    """The session of a path matching ``ignore_pattern``: empty and read-only."""

    def _fail(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise RuntimeError("no session on this path: it matches the sessionstore ignore_pattern")

    __setitem__ = __delitem__ = clear = pop = popitem = update = setdefault = _fail  # type: ignore[assignment]
    del _fail


# -- the session interface ---------------------------------------------------------------


class SessionStoreInterface(SessionInterface):
    """Flask ``SessionInterface`` opening and committing sessionstore sessions."""

    null_session_class = IgnoredSession

    def __init__(self, manager: SessionManager) -> None:
        self.manager = manager
        self.settings = manager.settings
        pattern = self.settings.ignore_pattern
        self._ignore = re.compile(pattern).search if pattern else None

    def open_session(self, app: Flask, request: Request) -> SessionMixin:
        """A lazy session for ``request``: nothing is loaded until the app touches it."""
        environ = request.environ
        path = environ.get("PATH_INFO", "")
        if self._ignore is not None and self._ignore(path):
            return self.make_null_session(app)
        record = RequestRecord()
        cookie = read_cookie(environ.get("HTTP_COOKIE"), self.settings.cookie_name) or None
        session = FlaskSession(self.manager.open(cookie, record, path), record, self.manager)
        session._counter = open_counter()
        environ[self.settings.environ_key] = session.store_session
        if self.settings.environ_key != _DEFAULT_ENVIRON_KEY:
            environ[ENVIRON_KEY_POINTER] = self.settings.environ_key
        environ[RECORD_KEY] = record
        environ[FLASK_SESSION_KEY] = session
        return session

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        """Commit the session and set, refresh or delete the cookie; on failure replace ``response``."""
        if not isinstance(session, FlaskSession):
            return
        if session.accessed:
            _vary_on_cookie(response)
        if session.store_session.loaded or session._force:  # modified = True loads it to save it
            try:
                outcome = self._commit(session)
            except SessionStoreError as exc:
                self.save_failed(app, session, response, exc)
            else:
                self._send_cookie(app, session, response, outcome)
        if self.settings.debug:
            response.headers["X-Session-Debug"] = session.record.header()

    def _commit(self, session: FlaskSession) -> CommitOutcome:
        inner = session.store_session
        if not inner.is_new and not inner and session.modified:  # cheap tests first
            inner.invalidate()  # emptied: destroy it and delete the cookie, as Flask does
        elif session._force and (inner or not inner.is_new):
            inner.mark_modified()
        return self.manager.commit(inner)

    # -- cookie ------------------------------------------------------------------------

    def _send_cookie(self, app: Flask, session: FlaskSession, response: Response, outcome: CommitOutcome) -> None:
        s = self.settings
        deleting = outcome.cookie == "delete"
        session_id = None if deleting else self._cookie_id(app, session, outcome)
        if session_id is None and not deleting:
            return  # the usual read-only request: no cookie to send
        options = dict(
            domain=s.cookie_domain, path=s.cookie_path, httponly=s.cookie_httponly, samesite=s.cookie_samesite,
            secure=bool(request.is_secure if s.cookie_secure == "auto" else s.cookie_secure),
            partitioned=bool(app.config.get("SESSION_COOKIE_PARTITIONED", False)),
        )
        if deleting:
            response.delete_cookie(s.cookie_name, **options)
        else:
            expires = self.get_expiration_time(app, session)
            max_age = None if expires is None else max(0, round((expires - datetime.now(timezone.utc)).total_seconds()))
            response.set_cookie(s.cookie_name, self.manager.signer.sign(session_id),
                                expires=expires, max_age=max_age, **options)
        _vary_on_cookie(response)

    def _cookie_id(self, app: Flask, session: FlaskSession, outcome: CommitOutcome) -> str | None:
        """The id to (re)send: a new one, or the stored one when Flask would refresh its cookie."""
        if outcome.cookie == "set":
            return outcome.session_id
        inner = session.store_session
        if inner.is_new:
            return None
        if session.record.saved or (session.permanent and app.config.get("SESSION_REFRESH_EACH_REQUEST", True)):
            return inner.id
        return None

    # -- failures and teardown -----------------------------------------------------------

    def save_failed(self, app: Flask, session: FlaskSession, response: Response, exc: SessionStoreError) -> None:
        """Replace ``response`` after a failed commit; override to shape the error response."""
        status, cause, body = _failure(exc)
        session.record.add(cause, error=str(exc))
        if isinstance(exc, SerializationError):
            session.record.details["attribute"] = exc.attribute
        log = _log.warning if status != 500 else _log.error
        log("sessionstore: %s: %s (nothing of this request's session was saved)", cause, exc)
        response.status_code = status
        response.headers = Headers(failure_headers(status))
        response.set_data(body)

    def load_failed(self, exc: SessionStoreError) -> Response:
        """Error handler: the store failed while the view loaded the session."""
        status, cause, body = _failure(exc)
        record = request.environ.get(RECORD_KEY)
        if isinstance(record, RequestRecord):
            record.add(cause, error=str(exc))
        _log.warning("sessionstore: %s: %s", cause, exc)
        return Response(body, status, headers=failure_headers(status))

    def teardown(self, exc: BaseException | None = None) -> None:
        """``teardown_request``: release the session (lock, shared state) and close its record."""
        session = request.environ.get(FLASK_SESSION_KEY)
        if not isinstance(session, FlaskSession):
            return
        if session._counter is not None:
            self._close_record(session)
        if session.store_session.loaded and not session._released:
            session._released = True
            self.manager.release(session.store_session)

    def _close_record(self, session: FlaskSession) -> None:
        counter, token = session._counter  # type: ignore[misc]
        session._counter = None
        try:
            close_counter(token)
        except (ValueError, RuntimeError):  # torn down in another context than it was opened in
            pass
        session.record.store_ops = counter.n
        self.manager.metrics.observe(session.record, session.store_session.loaded)
        if self.settings.debug:
            session.record.emit(self.settings.node_id, self.settings.mode)


def _vary_on_cookie(response: Response) -> None:
    """Add ``Cookie`` to ``Vary`` (as ``response.vary.add`` does, without parsing the header into a set)."""
    headers = response.headers
    vary = headers.get("Vary")
    if not vary:
        headers["Vary"] = "Cookie"
    elif "cookie" not in {part.strip().lower() for part in vary.split(",")}:
        headers["Vary"] = f"{vary}, Cookie"


def _failure(exc: SessionStoreError) -> tuple[int, str, bytes]:
    """(status, cause, body) for a sessionstore error; re-raises any other error."""
    answer = failure_response(exc)
    if answer is None:
        raise exc
    return answer


# -- the extension ------------------------------------------------------------------------


class SessionStore:
    """Flask extension: ``SessionStore(app)``, or ``SessionStore()`` then ``init_app(app)``.

    Each app gets its own :class:`~sessionstore.SessionManager`
    (``app.extensions["sessionstore"].manager``).
    """

    def __init__(self, app: Flask | None = None) -> None:
        self.app = app
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> SessionStoreInterface:
        """Install the session interface on ``app``; raises ConfigError on bad settings."""
        manager = SessionManager(settings_for(app))
        log_startup_warnings(startup_warnings(manager.settings, manager.store, manager.key("startup-check")))
        interface = SessionStoreInterface(manager)
        app.session_interface = interface
        app.extensions["sessionstore"] = interface
        app.teardown_request(interface.teardown)
        handlers = app.error_handler_spec[None][None]
        for kind in (StoreUnavailable, LockTimeout):
            if kind not in handlers:
                app.register_error_handler(kind, interface.load_failed)
        return interface

    def manager_for(self, app: Flask | None = None) -> SessionManager:
        """The manager of ``app`` (default: the app given to the constructor, else ``current_app``)."""
        app = app or self.app or current_app
        return app.extensions["sessionstore"].manager

    @property
    def manager(self) -> SessionManager:
        """:meth:`manager_for` the default app."""
        return self.manager_for()
