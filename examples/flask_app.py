"""sessionstore with Flask: ``flask.session`` kept in Redis (or memory), changed in place, login, logout.

    SESSIONSTORE_STORE=redis://127.0.0.1:6379/0 SECRET_KEY=change-me python examples/flask_app.py
    # then open http://127.0.0.1:5000/

Any ``SESSIONSTORE_<FIELD>`` environment variable is passed on (see docs); without
a store the sessions go to the default ``local://`` store, shared by every
process of this host.
"""

import os

from flask import Flask, redirect, render_template_string, session

from sessionstore.flask import SessionStore

app = Flask(__name__)
app.config.update(SECRET_KEY=os.environ.get("SECRET_KEY", "dev-only-change-me"))
app.config.update({k: v for k, v in os.environ.items() if k.startswith("SESSIONSTORE_")})
SessionStore(app)

PAGE = """
<p>{% if user %}Hello {{ user }}. <a href="/logout">Log out</a>
{% else %}Not logged in. <a href="/login/alice">Log in as alice</a>{% endif %}</p>
<p>Visits: {{ visits }}. Cart: {{ cart }} <a href="/add/apple">add an apple</a></p>
"""


@app.get("/")
def index():
    session["visits"] = session.get("visits", 0) + 1
    return render_template_string(PAGE, user=session.get("user"), visits=session["visits"],
                                  cart=session.get("cart", {}).get("items", []))


@app.get("/add/<item>")
def add(item):
    session.setdefault("cart", {"items": []})["items"].append(item)  # saved: no session.modified needed
    return redirect("/")


@app.get("/login/<user>")
def login(user):
    session.rotate()  # a new id at login: an id seen before login is useless
    session["user"] = user
    session.permanent = True  # cookie kept PERMANENT_SESSION_LIFETIME (31 days by default)
    return redirect("/")


@app.get("/logout")
def logout():
    session.clear()  # the stored session is destroyed and the cookie deleted
    return redirect("/")


if __name__ == "__main__":
    app.run(debug=True)
