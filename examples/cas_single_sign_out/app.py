"""CAS single sign-out with sessionstore: log in with a service ticket, log out from any node.

A CAS server logs a user in and redirects the browser to this service with a
service ticket: ``/login?ticket=ST-...``. The service validates the ticket
(a real client asks the CAS server's ``/p3/serviceValidate``; this example
accepts any ``ST-`` ticket and takes the user name from ``&user=``), stores
the user in the session, records the ticket with ``session.index("cas",
ticket)`` and gives the session a new id (``session.rotate()``).

When the user logs out at the CAS server, the server POSTs a SAML
``logoutRequest`` to the service, from the server, without the user's
cookie, and to whichever node the balancer picks::

    logoutRequest=<samlp:LogoutRequest ...><samlp:SessionIndex>ST-...</samlp:SessionIndex></samlp:LogoutRequest>

The node that gets it calls ``manager.invalidate_by_index("cas", ticket)``:
the session is destroyed in the shared store, and in sticky mode the node
that holds it in its node copy drops it too, within a second (the
invalidation feed). ``/logout-everywhere`` does the same by user name.

Run two nodes (see README.md)::

    python examples/cas_single_sign_out/app.py --port 8001 --node-id n1 --mode sticky --store redis://127.0.0.1:6379/0
    python examples/cas_single_sign_out/app.py --port 8002 --node-id n2 --mode sticky --store redis://127.0.0.1:6379/0

Endpoints (JSON answers):

``GET /login?ticket=ST-...&user=<name>``  log in (the service URL CAS redirects to)
``POST /login`` or ``POST /cas/logout``   a CAS ``logoutRequest`` (form field)
``GET /``                                 who is logged in, on which node
``GET /note?text=...[&delay=<s>]``        add a note to the session; ``delay`` (at most
                                          10 s) holds the request between reading the
                                          session and writing it, to try out a logout
                                          arriving while a request is in flight
``POST /logout-everywhere``               destroy every session of the current user
``GET /logout``                           log out of this session only
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import sys
import threading
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any, Callable, Iterable

if __package__ in (None, ""):  # run as a script from a checkout: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from werkzeug.wrappers import Request  # noqa: E402

from sessionstore import SessionMiddleware, get_session  # noqa: E402

__all__ = ["cas_app", "build", "session_index_of", "main", "MAX_LOGOUT_REQUEST"]

#: The largest ``logoutRequest`` accepted (a real one is well under 1 kB).
MAX_LOGOUT_REQUEST = 16 * 1024
#: What a ticket may look like (CAS 3.0: ``ST-`` then 1-256 printable characters; PT- for proxies).
_TICKET = re.compile(r"(?:ST|PT)-[!-~]{1,256}")
_MAX_DELAY = 10.0


def session_index_of(logout_request: str) -> str | None:
    """The ticket in a CAS SAML ``logoutRequest``, or None if there is no well-formed one.

    Nothing else of the document is used or trusted: it only has to parse,
    hold no DTD (no entity tricks), and contain one ``SessionIndex`` element
    (any namespace) whose text looks like a ticket.
    """
    if len(logout_request) > MAX_LOGOUT_REQUEST or "<!" in logout_request:
        return None  # "<!DOCTYPE", "<!ENTITY": never needed by a logoutRequest
    try:
        root = ElementTree.fromstring(logout_request)
    except ElementTree.ParseError:
        return None
    found = [el for el in root.iter() if isinstance(el.tag, str) and el.tag.rpartition("}")[2] == "SessionIndex"]
    if len(found) != 1:
        return None
    ticket = (found[0].text or "").strip()
    return ticket if _TICKET.fullmatch(ticket) else None


def cas_app(environ: dict, start_response: Callable) -> Iterable[bytes]:
    """The service (to be wrapped in a :class:`~sessionstore.SessionMiddleware`)."""
    request = Request(environ)
    path, method = request.path, request.method
    node = environ.get("cas_example.node", "")
    manager = environ["cas_example.manager"]
    if method == "POST" and path in ("/login", "/cas/logout"):
        return _logout_request(request, manager, start_response)
    session = get_session(environ)
    if path == "/login":
        ticket = request.args.get("ticket", "")
        if not _TICKET.fullmatch(ticket):
            return _json(start_response, {"error": "no valid service ticket"}, "400 Bad Request")
        user = request.args.get("user") or f"user-of-{ticket[:16]}"
        session["user"] = user
        session.index("cas", ticket)  # single sign-out finds the session by its ticket
        session.index("user", user)  # "log out everywhere" finds all of the user's sessions
        session.rotate()  # a new id at login
        return _json(start_response, {"user": user, "node": node, "id": session.id})
    if path == "/note":
        notes = list(session.get("notes", []))  # the session is read here...
        delay = min(max(float(request.args.get("delay", "0") or 0), 0.0), _MAX_DELAY)
        if delay:
            time.sleep(delay)
        notes.append(request.args.get("text", ""))
        session["notes"] = notes  # ...and written when the response starts
        return _json(start_response, {"user": session.get("user"), "notes": notes, "node": node})
    if path == "/logout-everywhere" and method == "POST":
        user = session.get("user")
        if user is None:
            return _json(start_response, {"error": "not logged in"}, "403 Forbidden")
        destroyed = manager.invalidate_by_index("user", user)
        session.invalidate()
        return _json(start_response, {"destroyed": destroyed, "node": node})
    if path == "/logout":
        session.invalidate()
        return _json(start_response, {"node": node})
    if path == "/":
        return _json(start_response, {"user": session.get("user"), "notes": session.get("notes", []), "node": node})
    return _json(start_response, {"error": "not found"}, "404 Not Found")


def _logout_request(request: Request, manager: Any, start_response: Callable) -> Iterable[bytes]:
    """A CAS back-channel logout: destroy the sessions that logged in with this ticket."""
    if (request.content_length or 0) > MAX_LOGOUT_REQUEST * 4:
        return _json(start_response, {"error": "logoutRequest too large"}, "413 Content Too Large")
    ticket = session_index_of(request.form.get("logoutRequest", ""))
    if ticket is None:
        return _json(start_response, {"error": "no SessionIndex in logoutRequest"}, "400 Bad Request")
    destroyed = manager.invalidate_by_index("cas", ticket)
    logging.getLogger("cas_example").info("single sign-out: %d session(s) destroyed", destroyed)
    return _json(start_response, {"destroyed": destroyed})


def _json(start_response: Callable, body: dict[str, Any], status: str = "200 OK") -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data))),
                            ("Cache-Control", "no-store")])
    return [data]


def build(app: Callable = cas_app, **settings: Any) -> SessionMiddleware:
    """``app`` wrapped in a middleware made from ``settings`` (and ``clock``, ``store`` as for
    :class:`~sessionstore.SessionMiddleware`); the app finds the manager and node in the environ."""
    middleware = SessionMiddleware(app, **settings)
    node = settings.get("node_id") or ""

    def with_manager(environ: dict, start_response: Callable) -> Iterable[bytes]:
        environ["cas_example.manager"] = middleware.manager
        environ["cas_example.node"] = node
        return middleware(environ, start_response)

    with_manager.manager = middleware.manager  # type: ignore[attr-defined]
    with_manager.middleware = middleware  # type: ignore[attr-defined]
    return with_manager  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="CAS single sign-out example node")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--node-id", default="n1")
    parser.add_argument("--mode", choices=("sticky", "non-sticky"), default="sticky")
    parser.add_argument("--store", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--secret", default="change-me: the same on every node")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from werkzeug.serving import make_server

    app = build(store=args.store, mode=args.mode, node_id=args.node_id if args.mode == "sticky" else None,
                secret_key=args.secret, debug=True)
    server = make_server("127.0.0.1", args.port, app, threaded=True)
    signal.signal(signal.SIGTERM, lambda signum, frame: threading.Thread(target=server.shutdown, daemon=True).start())
    print(f"node {args.node_id} ({args.mode}) on http://127.0.0.1:{args.port}/ store {args.store}", flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        app.manager.close()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main())
