"""Pyramid with sessionstore: wrap Pyramid's WSGI app, read the session from ``request.environ``.

(Pyramid's own ``request.session`` is a different, cookie-based machinery: use
``get_session(request.environ)`` instead.)

    pip install pyramid sessionstore
    SESSIONSTORE_SECRET_KEY=change-me python examples/pyramid_app.py   # http://127.0.0.1:8000/
"""

import os

from pyramid.config import Configurator

from sessionstore import SessionMiddleware, Settings, get_session


def cart(request):
    session = get_session(request.environ)
    session.setdefault("cart", {"items": []})["items"].append("book")  # saved: no "modified" needed
    return {"items": len(session["cart"]["items"]), "user": session.get("user")}


def login(request):
    session = get_session(request.environ)
    session["user"] = request.matchdict["user"]
    session.rotate()
    return {"user": session["user"]}


with Configurator() as config:
    config.add_route("cart", "/")
    config.add_route("login", "/login/{user}")
    config.add_view(cart, route_name="cart", renderer="json")
    config.add_view(login, route_name="login", renderer="json")
    pyramid_app = config.make_wsgi_app()

application = SessionMiddleware(pyramid_app, Settings.from_mapping(os.environ, prefix="SESSIONSTORE_"))

if __name__ == "__main__":
    from wsgiref.simple_server import make_server

    make_server("127.0.0.1", 8000, application).serve_forever()
