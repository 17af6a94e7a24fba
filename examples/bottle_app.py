"""Bottle with sessionstore: wrap Bottle's WSGI app, read the session from the environ.

    pip install bottle sessionstore
    SESSIONSTORE_SECRET_KEY=change-me python examples/bottle_app.py   # http://127.0.0.1:8000/
"""

import os

import bottle

from sessionstore import SessionMiddleware, Settings, get_session

web = bottle.Bottle()


@web.get("/")
def index():
    session = get_session(bottle.request.environ)
    session.setdefault("cart", {"items": []})["items"].append("book")  # saved: no "modified" needed
    return {"items": len(session["cart"]["items"]), "user": session.get("user")}


@web.get("/login/<user>")
def login(user):
    session = get_session(bottle.request.environ)
    session["user"] = user
    session.rotate()
    return {"user": user}


application = SessionMiddleware(web, Settings.from_mapping(os.environ, prefix="SESSIONSTORE_"))

if __name__ == "__main__":
    bottle.run(application, host="127.0.0.1", port=8000)
