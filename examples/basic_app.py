"""The smallest useful sessionstore app: a visit counter, log in, log out.

    python examples/basic_app.py            # then open http://127.0.0.1:8000/

Settings come from the environment, e.g.::

    SESSIONSTORE_SECRET_KEY=change-me SESSIONSTORE_STORE=redis://127.0.0.1:6379/0 python examples/basic_app.py

Without them the sessions go to the default ``local://`` store (on /dev/shm,
shared by every process of this host) and are signed with a random key drawn
by each process (a warning says so): fine for trying it out with one process,
not for production.
"""

import html
import os
from urllib.parse import parse_qs

from sessionstore import SessionMiddleware, Settings, get_session


def app(environ, start_response):
    session = get_session(environ)
    path = environ["PATH_INFO"]

    if path == "/login":
        session["user"] = parse_qs(environ["QUERY_STRING"]).get("user", ["alice"])[0]
        session.rotate()  # new session id at login, so an id seen before login is useless
        return redirect(start_response, "/")
    if path == "/logout":
        session.invalidate()  # the session is deleted, and so is the browser's cookie
        return redirect(start_response, "/")
    if path != "/":
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"Not found\n"]

    session["visits"] = session.get("visits", 0) + 1
    user = session.get("user")
    greeting = f"Hello {html.escape(user)}. <a href='/logout'>Log out</a>" if user else \
        "Not logged in. <a href='/login?user=alice'>Log in as alice</a>"
    body = f"<p>{greeting}</p><p>Visits this session: {session['visits']}</p>"
    start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
    return [body.encode()]


def redirect(start_response, location):
    start_response("303 See Other", [("Location", location)])
    return [b""]


application = SessionMiddleware(app, Settings.from_mapping(os.environ, prefix="SESSIONSTORE_"))

if __name__ == "__main__":
    from werkzeug.serving import run_simple

    run_simple("127.0.0.1", 8000, application)
