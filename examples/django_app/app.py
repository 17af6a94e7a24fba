"""sessionstore with Django, in one file: ``request.session`` kept in Redis (or memory).

    SESSIONSTORE_STORE=redis://127.0.0.1:6379/0 python examples/django_app/app.py runserver
    # then open http://127.0.0.1:8000/

Without SESSIONSTORE_STORE the sessions live in this process's memory.
``python examples/django_app/app.py clearsessions`` works too (a no-op for Redis).
"""

import os
import sys

from django.conf import settings

settings.configure(
    DEBUG=True,
    SECRET_KEY=os.environ.get("SECRET_KEY", "dev-only-change-me"),
    ALLOWED_HOSTS=["127.0.0.1", "localhost"],
    ROOT_URLCONF=__name__,
    INSTALLED_APPS=["django.contrib.sessions"],  # for the clearsessions command
    MIDDLEWARE=["sessionstore.django.SessionMiddleware"],  # or Django's own SessionMiddleware
    SESSION_ENGINE="sessionstore.django",
    SESSIONSTORE={"store": os.environ.get("SESSIONSTORE_STORE", "memory://")},
)

from django.http import HttpResponse  # noqa: E402
from django.shortcuts import redirect  # noqa: E402
from django.urls import path  # noqa: E402
from django.utils.html import escape  # noqa: E402


def index(request):
    session = request.session
    session["visits"] = session.get("visits", 0) + 1
    user = session.get("user")
    who = (f"Hello {escape(user)}. <a href='/logout'>Log out</a>" if user
           else "Not logged in. <a href='/login/alice'>Log in as alice</a>")
    cart = escape(session.get("cart", {}).get("items", []))
    return HttpResponse(f"<p>{who}</p><p>Visits: {session['visits']}. Cart: {cart} "
                        "<a href='/add/apple'>add an apple</a></p>")


def add(request, item):
    request.session.setdefault("cart", {"items": []})["items"].append(item)  # saved as it is
    return redirect("/")


def login(request, user):
    request.session.cycle_key()  # what django.contrib.auth.login() does: a new key, same data
    request.session["user"] = user
    return redirect("/")


def logout(request):
    request.session.flush()  # the stored session is destroyed and the cookie deleted
    return redirect("/")


urlpatterns = [path("", index), path("add/<str:item>", add), path("login/<str:user>", login),
               path("logout", logout)]

if __name__ == "__main__":
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
