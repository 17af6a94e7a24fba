"""WSGI middleware: cookie in, lazy session in the environ, save, cookie out.

The session is committed when the application calls ``start_response`` —
before any header goes out — so the ``Set-Cookie`` header can still be
added and a streamed body cannot lose the save. Changes made while the body
streams are committed again when the response closes (the cookie can no
longer change then).
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import Any, Callable, Iterable

from werkzeug.http import dump_cookie

from .cookie_loss import CookieLossDetector
from .debug import RequestRecord
from .errors import (
    LockTimeout,
    SerializationError,
    SessionStoreError,
    StoreUnavailable,
    failure_headers,
    failure_response,
)
from .manager import CommitOutcome, SessionManager
from .session import Session
from .settings import Settings
from .startup import log_startup_warnings, startup_warnings
from .stores.base import Store, close_counter, enter_counter, open_counter

__all__ = ["SessionMiddleware", "get_session"]

_log = logging.getLogger("sessionstore")

WSGIApp = Callable[[dict, Callable], Iterable[bytes]]

_DEFAULT_KEY = "sessionstore.session"
#: When ``environ_key`` is not the default, ``environ[ENVIRON_KEY_POINTER]`` names it.
ENVIRON_KEY_POINTER = "sessionstore.environ_key"
#: ``environ[RECORD_KEY]`` is the request's :class:`~sessionstore.debug.RequestRecord`.
RECORD_KEY = "sessionstore.record"

def get_session(environ: dict, key: str | None = None) -> Session:
    """The request's session (``environ[environ_key]``, whatever ``environ_key`` is set to).

    Raises ``LookupError`` on a path that matches ``ignore_pattern`` or outside
    a :class:`SessionMiddleware`.
    """
    try:
        return environ[key or environ.get(ENVIRON_KEY_POINTER, _DEFAULT_KEY)]
    except KeyError:
        raise LookupError(
            "no session in this request: the path matches ignore_pattern, or the app is not "
            "wrapped in SessionMiddleware (or environ_key differs)"
        ) from None


class SessionMiddleware:
    """Give a WSGI application a server-side session.

    ``SessionMiddleware(app, settings)`` or ``SessionMiddleware(app, **fields)``;
    ``clock`` (``() -> epoch seconds``) replaces the time source, for tests;
    ``store`` is a store URL like any other field, or a ready
    :class:`~sessionstore.stores.base.Store` object to use as it is.
    ``app.manager`` is the :class:`~sessionstore.manager.SessionManager`.
    """

    def __init__(
        self,
        app: WSGIApp,
        settings: Settings | None = None,
        *,
        clock: Callable[[], float] | None = None,
        store: "Store | str | None" = None,
        **fields: Any,
    ) -> None:
        if isinstance(store, str):  # the settings field, given as a keyword
            fields["store"], store = store, None
        if settings is None:
            settings = Settings(**fields)
        elif fields:
            settings = settings.replace(**fields)
        self.app = app
        self.settings = settings
        self.manager = SessionManager(settings, clock=clock, store=store)
        self._ignore = re.compile(settings.ignore_pattern).search if settings.ignore_pattern else None
        self._cookie_name = settings.cookie_name
        self._cookie_loss = CookieLossDetector(settings) if settings.debug else None
        self.startup_warnings = startup_warnings(settings, self.manager.store, self.manager.key("startup-check"))
        log_startup_warnings(self.startup_warnings)

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        if self._ignore is not None and self._ignore(environ.get("PATH_INFO", "")):
            return self._ignored(environ, start_response)
        record = RequestRecord()
        counter, token = open_counter()
        try:
            cookie = read_cookie(environ.get("HTTP_COOKIE"), self._cookie_name)
            session = self.manager.open(cookie, record, environ.get("PATH_INFO", ""))
            environ[self.settings.environ_key] = session
            if self.settings.environ_key != _DEFAULT_KEY:
                environ[ENVIRON_KEY_POINTER] = self.settings.environ_key
            environ[RECORD_KEY] = record
            response = _Response(self, environ, session, record, counter, start_response)
            try:
                body = self.app(environ, response.start_response)
            except (LockTimeout, StoreUnavailable) as exc:
                return response.fail(exc)  # releases the session
            except BaseException:
                self.manager.release(session)
                raise
            return response.wrap(body)
        finally:
            close_counter(token)

    def _ignored(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        if not self.settings.debug:
            return self.app(environ, start_response)
        record = RequestRecord()
        record.add("ignored")

        def start(status: str, headers: list, exc_info: Any = None) -> Callable:
            return start_response(status, [*headers, ("X-Session-Debug", record.header())], exc_info)

        try:
            return self.app(environ, start)
        finally:
            self.manager.metrics.observe(record, False)
            record.emit(self.settings.node_id, self.settings.mode)

    # -- cookies -----------------------------------------------------------------

    def cookie_header(self, outcome: CommitOutcome, environ: dict) -> tuple[str, str] | None:
        """The ``Set-Cookie`` header for a commit outcome, if any."""
        s = self.settings
        if outcome.cookie is None:
            return None
        secure = s.cookie_secure if s.cookie_secure != "auto" else environ.get("wsgi.url_scheme") == "https"
        if outcome.cookie == "set":
            value, max_age = self.manager.signer.sign(outcome.session_id), None  # type: ignore[arg-type]
        else:
            value, max_age = "", 0
        return ("Set-Cookie", dump_cookie(
            s.cookie_name, value, max_age=max_age, path=s.cookie_path, domain=s.cookie_domain,
            secure=bool(secure), httponly=s.cookie_httponly, samesite=s.cookie_samesite,
        ))


def read_cookie(header: str | None, name: str) -> str | None:
    """The value of cookie ``name`` in a ``Cookie`` header (first one wins), or None."""
    if not header or name not in header:
        return None
    for part in header.split(";"):
        key, sep, value = part.partition("=")
        if sep and key.strip() == name:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            return value
    return None


class _Response:
    """One request's response: commits at ``start_response``, closes the record."""

    __slots__ = ("mw", "environ", "session", "record", "counter", "_start", "_failure", "_committed", "_streamed")

    def __init__(self, mw: SessionMiddleware, environ: dict, session: Session,
                 record: RequestRecord, counter: Any, start_response: Callable) -> None:
        self.mw = mw
        self.environ = environ
        self.session = session
        self.record = record
        self.counter = counter
        self._start = start_response
        self._failure: bytes | None = None
        self._committed = False
        self._streamed = False

    def start_response(self, status: str, headers: list, exc_info: Any = None) -> Callable:
        headers = list(headers)
        try:
            outcome = self.mw.manager.commit(self.session)
        except SessionStoreError as exc:
            status, headers, self._failure = self._failure_response(exc)
            return self._start(status, headers, exc_info)
        finally:
            self._committed = True
        cookie = self.mw.cookie_header(outcome, self.environ)
        if self.mw._cookie_loss is not None:
            self._watch_cookie(outcome)
        if cookie is not None:
            headers.append(cookie)
            headers.append(("Vary", "Cookie"))
        if self.mw.settings.debug:
            headers.append(("X-Session-Debug", self.record.header()))
        return self._start(status, headers, exc_info)

    def _watch_cookie(self, outcome: CommitOutcome) -> None:
        """debug: notice clients that keep getting new cookies and never send them back."""
        detector = self.mw._cookie_loss
        if self.session._cookie is not None or "no-cookie" not in self.record.causes:
            detector.cookie_returned(self.environ)  # type: ignore[union-attr]
        elif outcome.cookie == "set":
            reason = detector.cookie_issued(self.environ)  # type: ignore[union-attr]
            if reason is not None:
                self.record.add("cookie-not-returned", likely=reason)

    def _failure_response(self, exc: BaseException) -> tuple[str, list, bytes]:
        answer = failure_response(exc)
        if answer is None:
            raise exc
        code, cause, body = answer
        status = f"{code} {HTTPStatus(code).phrase}"
        self.record.add(cause, error=str(exc))
        if isinstance(exc, SerializationError):
            self.record.details["attribute"] = exc.attribute
        log = _log.warning if cause in ("lock-timeout", "store-unavailable", "concurrent-update") else _log.error
        log("sessionstore: %s: %s (nothing of this request's session was saved)", cause, exc)
        headers = [*failure_headers(code), ("Content-Length", str(len(body)))]
        if self.mw.settings.debug:
            headers.append(("X-Session-Debug", self.record.header()))
        return status, headers, body

    def fail(self, exc: BaseException) -> Iterable[bytes]:
        """The app let a store error escape: answer with the matching error response."""
        status, headers, body = self._failure_response(exc)
        # exc_info only when replacing headers the app already started (PEP 3333)
        exc_info = (type(exc), exc, exc.__traceback__) if self._committed else None
        self._start(status, headers, exc_info)
        self._finish()
        return [body]

    def wrap(self, body: Iterable[bytes]) -> Iterable[bytes]:
        if self._failure is not None:
            _close(body)
            self._finish()
            return [self._failure]
        self._streamed = not isinstance(body, (list, tuple))
        return _ClosingBody(body, self)

    def _finish(self) -> None:
        """Response done: commit changes made while a body streamed, emit the debug record."""
        if self._streamed and self._committed and self._failure is None and self.session.loaded:
            try:
                late = self.mw.manager.commit(self.session)
                if late.cookie == "set":
                    _log.warning("sessionstore: session created while the body streamed; "
                                 "its cookie could not be sent (touch the session before start_response)")
            except SessionStoreError as exc:
                _log.error("sessionstore: saving changes made while streaming failed: %s", exc)
        self.mw.manager.release(self.session)
        self.record.store_ops = self.counter.n
        self.mw.manager.metrics.observe(self.record, self.session.loaded)
        if self.mw.settings.debug:
            self.record.emit(self.mw.settings.node_id, self.mw.settings.mode)


def _close(body: Iterable[bytes]) -> None:
    close = getattr(body, "close", None)
    if close is not None:
        close()


class _ClosingBody:
    """The application's body, plus our bookkeeping when the server closes it.

    Store calls made while the body is iterated (a generator app touching the
    session) are counted for the request like those made before.
    """

    __slots__ = ("_body", "_response", "_iter", "_done")

    def __init__(self, body: Iterable[bytes], response: _Response) -> None:
        self._body = body
        self._response = response
        self._iter: Any = None
        self._done = False

    def __iter__(self):
        if self._iter is None:
            self._iter = iter(self._body)
        return self

    def __next__(self) -> bytes:
        if self._done:
            raise StopIteration
        token = enter_counter(self._response.counter)
        try:
            chunk = next(self._iter)
        finally:
            close_counter(token)
        failure = self._response._failure
        if failure is not None:  # the commit failed in a start_response called lazily
            self._done = True
            return failure
        return chunk

    def close(self) -> None:
        token = enter_counter(self._response.counter)
        try:
            _close(self._body)
        finally:
            try:
                self._response._finish()
            finally:
                close_counter(token)
