"""Falcon with sessionstore: wrap Falcon's WSGI App, read the session from ``req.env``.

    pip install falcon sessionstore
    SESSIONSTORE_SECRET_KEY=change-me python examples/falcon_app.py   # http://127.0.0.1:8000/
"""

import os

import falcon

from sessionstore import SessionMiddleware, Settings, get_session


class Cart:
    def on_get(self, req, resp):
        session = get_session(req.env)
        session.setdefault("cart", {"items": []})["items"].append("book")  # saved: no "modified" needed
        resp.media = {"items": len(session["cart"]["items"]), "user": session.get("user")}


class Login:
    def on_get(self, req, resp, user):
        session = get_session(req.env)
        session["user"] = user
        session.rotate()
        resp.media = {"user": user}


api = falcon.App()
api.add_route("/", Cart())
api.add_route("/login/{user}", Login())
application = SessionMiddleware(api, Settings.from_mapping(os.environ, prefix="SESSIONSTORE_"))

if __name__ == "__main__":
    from wsgiref.simple_server import make_server

    make_server("127.0.0.1", 8000, application).serve_forever()
