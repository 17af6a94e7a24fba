"""The ``inspect``, ``doctor``, ``stats`` and ``migrate`` commands, against real servers.

Sessions are made through :class:`SessionMiddleware` and werkzeug's test
client, then looked at with ``cli.main([...])`` as a user would.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Iterator

import pytest
from werkzeug.serving import make_server
from werkzeug.test import Client

from sessionstore import SessionMiddleware
from sessionstore.cli import main
from sessionstore.debug import log_id
from sessionstore.diagnose import inspect_session, parse_prometheus, read_cookie_value, render_inspection, stats_app
from sessionstore.metrics import prometheus_text
from tests.helpers import ServerClient, json_app
from tests.servers.process import free_port
from tests.servers.redis_fixtures import redis_client

SECRET = "cli-test-secret"


@pytest.fixture(autouse=True)
def no_sessionstore_env(monkeypatch):
    """The commands read SESSIONSTORE_* variables: start every test without any."""
    import os

    for name in list(os.environ):
        if name.upper().startswith("SESSIONSTORE_"):
            monkeypatch.delenv(name)


@pytest.fixture
def prefix() -> str:
    """A key prefix of the test's own: the servers are shared by the whole test session."""
    return f"cli-{uuid.uuid4().hex[:10]}:"


@pytest.fixture(params=["redis", "memcached"])
def store_url(request) -> str:
    if request.param == "redis":
        return request.getfixturevalue("redis_server").url
    return request.getfixturevalue("memcached_cluster").url()


def login(session, environ):
    session["user"] = "alice"
    session["cart"] = {"items": [1, 2, 3]}
    session.index("cas", "ST-1-abc")
    return session.id


def logout(session, environ):
    session.invalidate()
    return "bye"


def whoami(session, environ):
    return session.get("user")


@contextmanager
def app(url: str, prefix: str, **settings) -> Iterator[tuple[SessionMiddleware, ServerClient]]:
    handlers = {"/login": login, "/logout": logout, "/whoami": whoami}
    settings.setdefault("secret_key", SECRET)
    mw = SessionMiddleware(json_app(handlers), store=url, key_prefix=prefix, **settings)
    try:
        yield mw, ServerClient(mw)
    finally:
        mw.manager.close()


def logged_in(client: ServerClient) -> tuple[str, str]:
    """Log in; ``(session id, signed cookie value)``."""
    session_id = client.get("/login").json
    return session_id, client.get_cookie("session").value


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def ttl_seconds(out: str) -> list[float]:
    return [float(x) for x in re.findall(r"^ttl +([\d.]+) s left", out, re.M)]


# -- inspect --------------------------------------------------------------------------------


def test_inspect_cookie_shows_attributes_ttl_and_tombstone(capsys, store_url, prefix):
    with app(store_url, prefix) as (_, client):
        session_id, cookie = logged_in(client)
    code, out = run(capsys, "inspect", cookie, "--store", store_url, "--key-prefix", prefix, "--secret-key", SECRET)
    assert code == 0, out
    assert session_id in out and "signature valid" in out
    assert re.search(rf"^debug sid +{log_id(session_id)}$", out, re.M), out
    assert f"{prefix}{{{session_id}}}" in out
    assert "FOUND: the app would load this session" in out
    assert re.search(r"^  user +\d+ B  'alice'$", out, re.M), out
    assert re.search(r"^  cart +\d+ B  \{'items': \[1, 2, 3\]\}$", out, re.M), out
    assert "cas: ST-1-abc" in out and "serializer   json" in out and "max_inactive 1800 s" in out
    ttls = ttl_seconds(out)
    assert ttls and all(1790 < t <= 1800 for t in ttls), out
    assert re.search(r"^tombstone +alive, written .*guaranteed alive until", out, re.M), out


def test_inspect_memcached_shows_both_copies(capsys, memcached_cluster, prefix):
    url = memcached_cluster.url()
    with app(url, prefix) as (_, client):
        session_id, _ = logged_in(client)
    code, out = run(capsys, "inspect", session_id, "--store", url, "--key-prefix", prefix)
    assert code == 0, out
    assert "(raw session id)" in out
    copies = re.findall(r"^ttl .*\((primary|backup) copy on 127\.0\.0\.1:\d+\)$", out, re.M)
    assert copies == ["primary", "backup"], out


def test_inspect_invalidated_session_exits_1(capsys, store_url, prefix):
    with app(store_url, prefix) as (_, client):
        session_id, _ = logged_in(client)
        client.get("/logout")
    code, out = run(capsys, "inspect", session_id, "--store", store_url, "--key-prefix", prefix)
    assert code == 1, out
    assert "MISSING: invalidated" in out
    assert re.search(r"^tombstone +invalidated, written ", out, re.M), out
    assert "user" not in out


def test_inspect_does_not_slide_the_expiry(capsys, redis_server, prefix):
    with app(redis_server.url, prefix, max_inactive=100) as (_, client), redis_client(redis_server.port) as r:
        session_id, _ = logged_in(client)
        key = f"{prefix}{{{session_id}}}"
        time.sleep(0.3)
        before = r.pttl(key)
        time.sleep(0.3)
        code, out = run(capsys, "inspect", session_id, "--store", redis_server.url, "--key-prefix", prefix)
        after = r.pttl(key)
        assert code == 0, out
        assert after <= before - 250, (before, after)
        assert ttl_seconds(out)[0] * 1000 <= before
        client.get("/whoami")  # a request does slide it: the measurement can tell the difference
        assert r.pttl(key) >= after + 400


def test_inspect_says_evicted_when_the_store_lost_a_live_session(capsys, redis_server, prefix):
    with app(redis_server.url, prefix) as (_, client), redis_client(redis_server.port) as r:
        session_id, _ = logged_in(client)
        r.delete(f"{prefix}{{{session_id}}}")  # what maxmemory eviction does
    code, out = run(capsys, "inspect", session_id, "--store", redis_server.url, "--key-prefix", prefix)
    assert code == 1
    assert "MISSING: evicted" in out and "sessionstore doctor" in out


def test_inspect_says_expired(capsys, redis_server, prefix):
    with app(redis_server.url, prefix, max_inactive=1) as (_, client):
        session_id, _ = logged_in(client)
    time.sleep(1.3)
    code, out = run(capsys, "inspect", session_id, "--store", redis_server.url, "--key-prefix", prefix)
    assert code == 1
    assert "MISSING: expired" in out and "max_inactive" in out


def test_inspect_unknown_id(capsys, redis_server, prefix):
    unknown = "A" * 43
    code, out = run(capsys, "inspect", unknown, "--store", redis_server.url, "--key-prefix", prefix)
    assert code == 1
    assert "MISSING: unknown-id" in out and re.search(r"^tombstone +none", out, re.M)


def test_inspect_takes_ids_that_start_with_a_dash(capsys, redis_server, prefix):
    dashed = "-h" + "A" * 41  # URL-safe base64 may start with "-"; "-h" is also the help option
    code, out = run(capsys, "inspect", dashed, "--store", redis_server.url, "--key-prefix", prefix)
    assert code == 1 and "MISSING: unknown-id" in out and f"{{{dashed}}}" in out
    code, out = run(capsys, "inspect", "--store", redis_server.url, f"{dashed}{'s' * 43}", "--secret-key", SECRET)
    assert code == 1 and "BAD SIGNATURE" in out


def test_inspect_bad_signature_is_said_clearly(capsys, redis_server, prefix):
    with app(redis_server.url, prefix) as (_, client):
        _, cookie = logged_in(client)
    code, out = run(capsys, "inspect", cookie, "--store", redis_server.url, "--key-prefix", prefix,
                    "--secret-key", "a-retired-key")
    assert code == 1
    assert "BAD SIGNATURE" in out and "bad-signature" in out
    assert "the store holds a record for this id" in out  # so the key, not the session, is the problem
    code, out = run(capsys, "inspect", cookie, "--store", redis_server.url, "--key-prefix", prefix,
                    "--secret-key", "a-new-key", "--secret-key", SECRET)  # rotation: any key verifies
    assert code == 0 and "signature valid" in out
    code, out = run(capsys, "inspect", cookie, "--store", redis_server.url, "--key-prefix", prefix)
    assert code == 0 and "signature not checked" in out


def test_inspect_usage_and_connection_errors_exit_2(capsys, redis_server):
    assert main(["inspect", "not-an-id", "--store", redis_server.url]) == 2
    assert "neither a session id" in capsys.readouterr().err
    assert main(["inspect", "A" * 43]) == 2
    assert "--store" in capsys.readouterr().err
    assert main(["inspect", "A" * 43, "--store", "memory://"]) == 2
    assert main(["inspect", "A" * 43, "--store", f"redis://127.0.0.1:{free_port()}/0"]) == 2
    assert "cannot read the store" in capsys.readouterr().err


def test_inspect_corrupt_payload_is_left_in_place(capsys, redis_server, prefix):
    session_id = "B" * 43
    key = f"{prefix}{{{session_id}}}"
    with redis_client(redis_server.port) as r:
        r.set(key, b"0123456789abcdef" + b"not a payload", px=60_000)
        code, out = run(capsys, "inspect", session_id, "--store", redis_server.url, "--key-prefix", prefix)
        assert code == 1
        assert "FOUND but not usable: corrupt-payload" in out and "bad magic" in out
        assert r.exists(key)


def test_inspect_json(capsys, redis_server, prefix):
    with app(redis_server.url, prefix) as (_, client):
        session_id, cookie = logged_in(client)
    code, out = run(capsys, "inspect", cookie, "--store", redis_server.url, "--key-prefix", prefix,
                    "--secret-key", SECRET, "--json")
    assert code == 0
    data = json.loads(out)
    assert data["session_id"] == session_id and data["usable"] and data["app_cause"] is None
    assert data["signature"] == "valid" and data["form"] == "cookie"
    assert sorted(a["name"] for a in data["attributes"]) == ["cart", "user"]
    assert data["index"] == {"cas": ["ST-1-abc"]}
    assert 1790 < data["copies"][0]["ttl"] <= 1800
    assert data["tombstone"]["state"] == "alive"


def test_inspect_sticky_cookie_with_route(capsys, redis_server, prefix):
    with app(redis_server.url, prefix, mode="sticky", node_id="n1") as (_, client):
        session_id, cookie = logged_in(client)
    assert session_id.endswith(".n1") and cookie.endswith(".n1")
    code, out = run(capsys, "inspect", cookie, "--store", redis_server.url, "--key-prefix", prefix,
                    "--secret-key", SECRET)
    assert code == 0, out
    assert f"{prefix}{{{session_id}}}" in out and "'alice'" in out


def test_inspect_encrypted_session(capsys, redis_server, prefix):
    with app(redis_server.url, prefix, encryption_key="enc-key") as (_, client):
        session_id, _ = logged_in(client)
    code, out = run(capsys, "inspect", session_id, "--store", redis_server.url, "--key-prefix", prefix)
    assert code == 0
    assert "encrypted at rest" in out and "--encryption-key" in out and "alice" not in out
    code, out = run(capsys, "inspect", session_id, "--store", redis_server.url, "--key-prefix", prefix,
                    "--encryption-key", "enc-key")
    assert code == 0 and "'alice'" in out
    code, out = run(capsys, "inspect", session_id, "--store", redis_server.url, "--key-prefix", prefix,
                    "--encryption-key", "wrong")
    assert code == 1 and "corrupt-payload" in out


def test_inspect_session_on_a_running_apps_store(prefix):
    """From Python, inspect works on any manager's store, memory:// included (no TTL there)."""
    with app("memory://", prefix) as (mw, client):
        session_id, _ = logged_in(client)
        found = inspect_session(mw.manager.store, session_id, key_prefix=prefix)
    assert found.usable and sorted(a.name for a in found.attributes) == ["cart", "user"]
    assert found.ttl_note == "n/a (in-process memory store)"
    assert any(line.startswith("ttl          n/a") for line in render_inspection(found))


def test_read_cookie_value_forms():
    raw = "C" * 43
    assert read_cookie_value(raw, []).form == "id"
    assert read_cookie_value(f"{raw}.node_1", []).session_id == f"{raw}.node_1"
    cookie = read_cookie_value(f'session="{raw}{"s" * 43}.n2"', ["k"])
    assert (cookie.session_id, cookie.form, cookie.signature) == (f"{raw}.n2", "cookie", "bad")


# -- doctor ---------------------------------------------------------------------------------


def lines(out: str, level: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(level + " ")]


def test_doctor_redis_ok_and_warns_without_persistence(capsys, redis_server):
    code, out = run(capsys, "doctor", "--store", redis_server.url)
    assert code == 0, out
    assert not lines(out, "FAIL")
    ok = "\n".join(lines(out, "OK"))
    for name in ("connectivity", "server: Redis 7", "memory:", "clock:"):
        assert name in ok, out
    assert re.search(r"connectivity: save [\d.]+ ms, load [\d.]+ ms, delete [\d.]+ ms", ok)
    persistence = [line for line in lines(out, "WARN") if "persistence" in line]
    assert persistence and "restart loses every session" in persistence[0], out


def test_doctor_memcached_ok(capsys, memcached_fault_cluster):
    cluster = memcached_fault_cluster  # a fresh one: no evictions left by other tests
    code, out = run(capsys, "doctor", "--store", cluster.url())
    assert code == 0, out
    assert not lines(out, "FAIL") and not lines(out, "WARN"), out
    nodes = [line for line in lines(out, "OK") if line.startswith("OK    node ")]
    assert len(nodes) == len(cluster.servers)
    assert all("memcached 1.6" in line and "evictions" in line for line in nodes)
    assert "connectivity" in out and "clock" in out and "3 ring nodes" in out


@pytest.mark.parametrize("scheme", ["redis", "memcached"])
def test_doctor_unreachable_store_fails(capsys, scheme):
    url = f"redis://127.0.0.1:{free_port()}/0" if scheme == "redis" else f"memcached://127.0.0.1:{free_port()}"
    code, out = run(capsys, "doctor", "--store", url)
    assert code == 1
    assert lines(out, "FAIL")[0].startswith("FAIL  connectivity:"), out
    assert out.rstrip().endswith("1 FAIL")


def test_doctor_memcached_node_down_fails_that_node(capsys, memcached_cluster):
    live = memcached_cluster.ring[0].port
    dead = free_port()
    code, out = run(capsys, "doctor", "--store", f"memcached://127.0.0.1:{live},127.0.0.1:{dead}")
    assert code == 1
    assert any(f"node 127.0.0.1:{dead}: unreachable" in line for line in lines(out, "FAIL")), out
    assert any(f"node 127.0.0.1:{live}" in line for line in lines(out, "OK"))


def test_doctor_checks_settings_from_options_and_environment(capsys, monkeypatch, redis_server):
    monkeypatch.setenv("SESSIONSTORE_COOKIE_DOMAIN", "intranet")
    code, out = run(capsys, "doctor", "--store", redis_server.url,
                    "--setting", "cookie_name=__Host-sid", "--setting", f"secret_key={SECRET}")
    assert code == 0, out
    warnings = "\n".join(lines(out, "WARN"))
    assert "config: a __Host- cookie needs cookie_secure=True" in warnings
    assert "config: cookie_domain='intranet'" in warnings
    assert "no secret_key" not in warnings
    code, out = run(capsys, "doctor", "--store", redis_server.url, "--setting", "max_inactive=soon")
    assert code == 1 and "FAIL  config: max_inactive" in out
    assert main(["doctor", "--store", redis_server.url, "--setting", "no_such_field=1"]) == 2
    assert main(["doctor", "--store", "nonsense"]) == 2


def test_doctor_takes_the_store_from_the_environment(capsys, monkeypatch, redis_server):
    monkeypatch.setenv("SESSIONSTORE_STORE", redis_server.url)
    code, out = run(capsys, "doctor")
    assert code == 0 and redis_server.url in out.splitlines()[0]


# -- stats ----------------------------------------------------------------------------------


@contextmanager
def serving(wsgi_app) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, wsgi_app)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(5)
        server.server_close()


def test_stats_prints_a_table_from_json_and_prometheus(capsys, redis_server, prefix):
    with app(redis_server.url, prefix, debug=True) as (mw, client):
        logged_in(client)
        for _ in range(3):
            client.get("/whoami")
        ServerClient(mw).get("/whoami")  # no cookie: a new, empty session
        expected = mw.manager.stats()
        with serving(stats_app(mw.manager)) as base:
            code, table = run(capsys, "stats", "--url", base + "/_sessionstore/stats")
            assert code == 0, table
            code, prom = run(capsys, "stats", "--url", base + "/_sessionstore/stats?format=prometheus")
            assert code == 0, prom
            code, raw = run(capsys, "stats", "--url", base + "/", "--json")
    assert table == prom  # the same numbers whichever format the endpoint serves
    assert re.search(rf"^requests +{expected['requests']}$", table, re.M), table
    assert expected["requests"] == 5
    assert re.search(r"^causes +no-cookie 2$", table, re.M), table
    assert re.search(r"^load_and_touch +\d+ +[\d.]+ +[\d.]+$", table, re.M), table
    assert json.loads(raw)["requests"] == 5


def test_stats_app_negotiates_the_format(redis_server, prefix):
    with app(redis_server.url, prefix) as (mw, client):
        client.get("/login")
        endpoint = Client(stats_app(mw))  # the middleware itself is accepted too
        as_json = endpoint.get("/")
        assert as_json.mimetype == "application/json" and as_json.json["requests"] == 1
        scraped = endpoint.get("/", headers={"Accept": "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"})
        assert scraped.mimetype == "text/plain" and "sessionstore_requests_total 1" in scraped.get_data(as_text=True)
        assert endpoint.get("/?format=prometheus").mimetype == "text/plain"
        assert endpoint.get("/?format=json", headers={"Accept": "text/plain"}).mimetype == "application/json"
        assert endpoint.post("/").status_code == 405
        assert endpoint.head("/").data == b""


def test_parse_prometheus_round_trips_a_snapshot(redis_server, prefix):
    with app(redis_server.url, prefix) as (mw, client):
        logged_in(client)
        client.get("/whoami")
        stats = mw.manager.stats()
    parsed = parse_prometheus(prometheus_text(stats))
    assert parsed == stats


def test_stats_errors(capsys):
    assert main(["stats", "--url", f"http://127.0.0.1:{free_port()}/stats", "--timeout", "2"]) == 1
    assert "cannot read" in capsys.readouterr().err
    assert main(["stats", "--url", "ftp://example.invalid/"]) == 2
    with serving(json_app({"/": lambda s, e: {"hello": "world"}})) as base:
        assert main(["stats", "--url", base + "/"]) == 1
    assert "not sessionstore stats" in capsys.readouterr().err


# -- migrate --------------------------------------------------------------------------------


def test_migrate_only_touches_sql_stores(capsys, redis_server, tmp_path):
    code, out = run(capsys, "migrate", "--store", redis_server.url)
    assert code == 0 and "only SQL stores need migrating" in out
    path = tmp_path / "sessions.db"
    code, out = run(capsys, "migrate", "--store", f"sqlite:///{path}")
    assert code == 0 and "schema is up to date" in out
    with sqlite3.connect(path) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert any("session" in name for name in tables), tables
    assert main(["migrate"]) == 2


def test_demo_is_still_registered():
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
