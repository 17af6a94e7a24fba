"""CAS single sign-out (examples/cas_single_sign_out) on every store, in both modes.

Two nodes n1 and n2 share one real store: middleware instances in this
process, and, for Redis and memcached in sticky mode, separate node
processes talking HTTP. A user logs in on n1 with a service ticket; the
CAS server's ``logoutRequest`` arrives at n2, the node that does not hold
the sticky primary. Afterwards the session is gone on n1 within 1 s, its
next request gets a fresh session with cause ``invalidated``, and a request
that was in flight on n1 when the logout arrived does not bring it back.
The costs of the index and of the invalidation feed are counted by the
servers.
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlencode

import pytest
from sqlalchemy import event, make_url
from werkzeug.test import Client

from sessionstore import get_session
from sessionstore.stores.memory import MemoryStore
from tests.servers.memcached_fixtures import memcached_command_count
from tests.servers.process import ServerProcess, free_port
from tests.servers.redis_fixtures import redis_client, redis_command_count

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "cas_single_sign_out"))
from app import build, cas_app, session_index_of  # noqa: E402

SECRET = "sso-secret"
APP = Path(__file__).resolve().parents[2] / "examples" / "cas_single_sign_out" / "app.py"
STORES = ["memory", "redis", "redis-cluster", "memcached", "sqlite", "postgresql", "mariadb"]
#: How soon the node holding the session must have dropped it.
DEADLINE = 1.0


def logout_request(ticket: str) -> str:
    """A CAS 3.0 single-logout message, as the CAS server POSTs it."""
    return (
        '<samlp:LogoutRequest xmlns:samlp="urn:oasis:names:tc:SAML:2.0:protocol" '
        'xmlns:saml="urn:oasis:names:tc:SAML:2.0:assertion" ID="LR-' + uuid.uuid4().hex + '" '
        'Version="2.0" IssueInstant="2024-05-01T10:00:00Z">'
        '<saml:NameID>@NOT_USED@</saml:NameID>'
        f"<samlp:SessionIndex>{ticket}</samlp:SessionIndex></samlp:LogoutRequest>"
    )


def new_ticket() -> str:
    return f"ST-{uuid.uuid4().hex}-cas.example.org"


def with_options(url: str, **options: Any) -> str:
    return make_url(url).update_query_dict({k: str(v) for k, v in options.items()}).render_as_string(
        hide_password=False)


@pytest.fixture(params=STORES)
def store(request, tmp_path, sql_table) -> Any:
    """A store URL (or, for ``memory``, one store object both nodes share)."""
    kind = request.param
    if kind == "memory":
        return MemoryStore()
    if kind == "redis":
        return request.getfixturevalue("redis_server").url
    if kind == "redis-cluster":
        return request.getfixturevalue("redis_cluster").url
    if kind == "memcached":
        return request.getfixturevalue("memcached_cluster").url()
    table = f"{sql_table}_sso"
    if kind == "sqlite":
        return with_options(f"sqlite:///{tmp_path}/sso.db", cleanup_interval=0)
    base = request.getfixturevalue("postgres_url" if kind == "postgresql" else "mariadb_url")
    return with_options(base, table=table, cleanup_interval=0)


# -- nodes in this process -------------------------------------------------------------------


class Gate:
    """Holds ``/test/in-flight`` between reading the session and writing it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()


def with_in_flight(gate: Gate) -> Callable:
    """The example app plus ``/test/in-flight``: reads the session, waits for the gate, writes."""

    def app(environ: dict, start_response: Callable):
        if environ["PATH_INFO"] == "/test/in-flight":
            session = get_session(environ)
            notes = list(session.get("notes", []))
            gate.entered.set()
            gate.release.wait(10)
            session["notes"] = notes + ["written by the request in flight"]
            start_response("200 OK", [("Content-Type", "application/json")])
            return [json.dumps({"notes": session["notes"]}).encode()]
        return cas_app(environ, start_response)

    return app


@dataclass
class Nodes:
    n1: Any
    n2: Any
    gate: Gate
    events: dict[str, list[tuple[str, str, str | None]]]


@pytest.fixture
def make_nodes() -> Iterator[Callable[..., Nodes]]:
    built: list[Any] = []

    def make(store: Any, mode: str, **fields: Any) -> Nodes:
        gate = Gate()
        events: dict[str, list] = {}
        nodes = []
        for node_id in ("n1", "n2"):
            node = build(with_in_flight(gate), store=store, mode=mode, secret_key=SECRET, debug=True,
                         node_id=node_id if mode == "sticky" else None, **fields)
            events[node_id] = seen = []
            for name in ("created", "destroyed", "id_changed"):
                node.manager.on(name, lambda e, seen=seen: seen.append((e.name, e.session_id, e.reason)))
            built.append(node)
            nodes.append(node)
        return Nodes(nodes[0], nodes[1], gate, events)

    yield make
    for node in built:
        node.manager.close()


def debug(response) -> dict[str, str]:
    header = response.headers.get("X-Session-Debug", "")
    return dict(p.strip().split("=", 1) for p in header.split(";") if "=" in p)


def browser(node: Any, cookie: str | None) -> Client:
    client = Client(node)
    if cookie:
        client.set_cookie("session", cookie)
    return client


def poll_until_gone(get: Callable[[], tuple[dict, dict]]) -> tuple[float, dict, dict]:
    """Request the session until it is no longer logged in; ``(seconds, body, debug)``."""
    started = time.monotonic()
    while True:
        body, info = get()
        elapsed = time.monotonic() - started
        if body.get("user") is None or elapsed > DEADLINE + 1:
            return elapsed, body, info
        time.sleep(0.02)


@pytest.mark.parametrize("mode", ["non-sticky", "sticky"])
def test_single_sign_out_from_the_other_node(store, mode, make_nodes):
    nodes = make_nodes(store, mode)
    n1, n2, gate = nodes.n1, nodes.n2, nodes.gate
    alice = Client(n1)
    alice.get("/note?text=before+login")  # an anonymous session, stored: login rotates it
    anonymous = n1.manager.signer.unsign(alice.get_cookie("session").value)
    ticket = new_ticket()
    login = alice.get(f"/login?ticket={ticket}&user=alice").json
    sid, cookie = login["id"], alice.get_cookie("session").value
    assert sid != anonymous and (mode == "non-sticky" or sid.endswith(".n1"))
    assert n2.manager.find_by_index("cas", ticket) == [sid]  # the new id, never the old one
    assert n2.manager.find_by_index("user", "alice") == [sid]
    if mode == "sticky":
        assert debug(alice.get("/"))["source"] == "local"  # n1 holds the primary copy

    replies: list[Any] = []
    in_flight = threading.Thread(target=lambda: replies.append(browser(n1, cookie).get("/test/in-flight")))
    in_flight.start()
    assert gate.entered.wait(10), "the in-flight request never started"

    answer = browser(n2, None).post("/cas/logout", data={"logoutRequest": logout_request(ticket)})
    assert answer.status_code == 200 and answer.json == {"destroyed": 1}

    def on_n1() -> tuple[dict, dict]:
        response = browser(n1, cookie).get("/")
        return response.json, debug(response)

    elapsed, body, info = poll_until_gone(on_n1)
    assert body["user"] is None and elapsed <= DEADLINE, f"still logged in on n1 after {elapsed:.2f}s"
    assert info["source"] == "new" and info["causes"] == "invalidated"

    gate.release.set()  # the request that was in flight on n1 now writes
    in_flight.join(10)
    assert replies and replies[0].status_code == 200
    assert debug(replies[0])["saved"] == "0"
    n1.manager.store.wrapped.backup.flush() if mode == "sticky" else None

    for node in (n1, n2):  # nothing came back, on either node or in the store
        response = browser(node, cookie).get("/")
        assert response.json["user"] is None and response.json["notes"] == []
        assert "invalidated" in debug(response)["causes"]
        assert node.manager.load(sid) is None
    assert n2.manager.find_by_index("cas", ticket) == []
    assert n1.manager.find_by_index("user", "alice") == []
    assert [e for e in nodes.events["n2"] if e[0] == "destroyed"] == [("destroyed", sid, "invalidated")]
    assert [e for e in nodes.events["n1"] if e[0] == "destroyed"] == []


@pytest.mark.parametrize("mode", ["non-sticky", "sticky"])
def test_log_out_everywhere_reaches_every_node(store, mode, make_nodes):
    nodes = make_nodes(store, mode)
    phones = [Client(nodes.n1), Client(nodes.n2)]
    for phone in phones:
        phone.get(f"/login?ticket={new_ticket()}&user=bob")
    carol = Client(nodes.n1)
    carol.get(f"/login?ticket={new_ticket()}&user=carol")
    bob_ids = [nodes.n1.manager.signer.unsign(p.get_cookie("session").value) for p in phones]
    answer = phones[1].post("/logout-everywhere")  # from n2; one of bob's sessions is on n1
    assert answer.json["destroyed"] == 2
    destroyed = [e for node in ("n1", "n2") for e in nodes.events[node] if e[0] == "destroyed"]
    assert sorted(destroyed) == sorted(("destroyed", sid, "invalidated") for sid in bob_ids)  # once each
    for phone in phones:
        started = time.monotonic()
        while phone.get("/").json["user"] is not None and time.monotonic() - started < DEADLINE + 1:
            time.sleep(0.02)
        assert time.monotonic() - started <= DEADLINE
    assert carol.get("/").json["user"] == "carol"


@pytest.mark.parametrize("kind", ["redis", "memcached", "sqlite"])
def test_failover_tells_the_old_node_to_drop_its_copy(kind, request, tmp_path, make_nodes):
    """A request with n1's cookie lands on n2 (failover): n2 takes the session over under a new id
    and the feed makes n1 drop its copy, so n1 never serves the old id again."""
    url = {"redis": lambda: request.getfixturevalue("redis_server").url,
           "memcached": lambda: request.getfixturevalue("memcached_cluster").url(),
           "sqlite": lambda: with_options(f"sqlite:///{tmp_path}/fo.db", cleanup_interval=0)}[kind]()
    nodes = make_nodes(url, "sticky")
    ticket = new_ticket()
    alice = Client(nodes.n1)
    old = alice.get(f"/login?ticket={ticket}&user=alice").json["id"]
    old_cookie = alice.get_cookie("session").value
    moved = browser(nodes.n2, old_cookie).get("/note?text=on+n2")
    assert "route-changed" in debug(moved)["causes"] and moved.json["user"] == "alice"
    new = nodes.n2.manager.find_by_index("cas", ticket)
    assert len(new) == 1 and new[0].endswith(".n2") and new[0] != old
    local = nodes.n1.manager.store.wrapped.local
    started = time.monotonic()
    while nodes.n1.manager.key(old) in local.keys() and time.monotonic() - started < DEADLINE + 1:
        time.sleep(0.01)
    assert time.monotonic() - started <= DEADLINE, "n1 still holds the old id"
    stale = browser(nodes.n1, old_cookie).get("/")
    assert stale.json["user"] is None and "unknown-id" in debug(stale)["causes"]


def test_logout_request_is_parsed_for_its_session_index_only():
    ticket = new_ticket()
    assert session_index_of(logout_request(ticket)) == ticket
    unqualified = f"<LogoutRequest><SessionIndex> {ticket} </SessionIndex></LogoutRequest>"
    assert session_index_of(unqualified) == ticket
    entity = ('<!DOCTYPE r [<!ENTITY t "ST-1">]><samlp:LogoutRequest xmlns:samlp="urn:oasis:names:tc:SAML:2.0:'
              'protocol"><samlp:SessionIndex>&t;</samlp:SessionIndex></samlp:LogoutRequest>')
    two = f"<r><SessionIndex>{ticket}</SessionIndex><SessionIndex>{ticket}</SessionIndex></r>"
    for bad in ["", "not xml", "<r/>", entity, two, "<r><SessionIndex>no ticket</SessionIndex></r>",
                "<r><SessionIndex>ST-" + "x" * 300 + "</SessionIndex></r>", "<r>" + "x" * 20000 + "</r>"]:
        assert session_index_of(bad) is None, bad


def test_a_bad_logout_request_is_refused_and_destroys_nothing(make_nodes):
    nodes = make_nodes(MemoryStore(), "sticky")
    alice = Client(nodes.n1)
    ticket = new_ticket()
    alice.get(f"/login?ticket={ticket}&user=alice")
    for form in ({}, {"logoutRequest": "<r/>"}, {"logoutRequest": logout_request("ST-other")}):
        answer = Client(nodes.n2).post("/cas/logout", data=form)
        assert answer.status_code in (200, 400) and answer.json.get("destroyed", 0) == 0
    assert alice.get("/").json["user"] == "alice"


# -- costs, counted by the servers --------------------------------------------------------------


def test_costs_on_redis(redis_server, make_nodes):
    """Non-sticky: the login save costs one command more (the index script); reads cost 1.
    Sticky: reads on the owner cost 0 with the feed subscribed, and the feed sends nothing."""
    port = redis_server.port
    count = lambda: redis_command_count(port)  # noqa: E731
    nodes = make_nodes(redis_server.url, "non-sticky")
    Client(nodes.n1).get(f"/login?ticket={new_ticket()}&user=warm-up")  # scripts loaded once (NOSCRIPT)
    client = Client(nodes.n1)
    before = count()
    client.get(f"/login?ticket={new_ticket()}&user=alice")
    login = count() - before  # index script, session save, tombstone
    before = count()
    client.get("/")
    read = count() - before
    before = count()
    client.get("/note?text=x")
    write = count() - before
    assert (login, read, write) == (3, 1, 2)

    sticky = make_nodes(redis_server.url, "sticky")
    client = Client(sticky.n1)
    client.get(f"/login?ticket={new_ticket()}&user=alice")
    before = count()
    for _ in range(20):
        client.get("/")
    time.sleep(1.0)  # idle subscribers
    assert count() - before == 0


@pytest.mark.parametrize("kind", ["memcached", "sqlite"])
def test_polling_costs_a_few_commands_per_second_per_node(kind, memcached_cluster, tmp_path, make_nodes):
    """Idle sticky nodes poll the feed: one command per poll (every 0.25 s), nothing per request.

    On memcached a process also reads the ring's record of suspect nodes, two ``get`` once a
    second (``suspect_poll``) while it uses the store: the feed's polls keep it doing that.
    """
    if kind == "memcached":
        url = memcached_cluster.url()
        ports = [s.port for s in memcached_cluster.servers]
        nodes = make_nodes(url, "sticky")
        count = lambda: sum(memcached_command_count(p) for p in ports)  # noqa: E731
    else:
        nodes = make_nodes(with_options(f"sqlite:///{tmp_path}/poll.db", cleanup_interval=0), "sticky")
        statements = [0]
        for node in (nodes.n1, nodes.n2):
            engine = node.manager._sticky.shared.engine
            event.listen(engine, "before_cursor_execute", lambda *a: statements.__setitem__(0, statements[0] + 1))
        count = lambda: statements[0]  # noqa: E731
    client = Client(nodes.n1)
    client.get(f"/login?ticket={new_ticket()}&user=alice")
    time.sleep(0.3)
    before, started = count(), time.monotonic()
    for _ in range(20):
        assert debug(client.get("/"))["source"] == "local"
    time.sleep(2.0)
    per_node_per_second = (count() - before) / (time.monotonic() - started) / 2
    print(f"\n{kind}: {per_node_per_second:.2f} feed commands per second per idle node")
    suspects_poll = 2.0 if kind == "memcached" else 0.0
    assert 2.0 + suspects_poll <= per_node_per_second <= 5.0 + suspects_poll


# -- nodes as separate processes ------------------------------------------------------------------


def start_example_node(node_id: str, store_url: str, workdir: Path) -> ServerProcess:
    port = free_port()
    argv = [sys.executable, str(APP), "--port", str(port), "--node-id", node_id, "--mode", "sticky",
            "--store", store_url, "--secret", SECRET]
    return ServerProcess(argv, port, workdir).start(timeout=30)


def http_request(port: int, method: str, path: str, cookie: str | None = None,
                 form: dict[str, str] | None = None) -> tuple[int, dict, dict[str, str], str | None]:
    """``(status, JSON body, X-Session-Debug, session cookie set or None)``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"Cookie": f"session={cookie}"} if cookie else {}
        body = None
        if form is not None:
            body = urlencode(form)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        data = json.loads(response.read())
    finally:
        conn.close()
    info = dict(p.strip().split("=", 1) for p in response.headers.get("X-Session-Debug", "").split(";") if "=" in p)
    set_cookie = None
    for header in response.headers.get_all("Set-Cookie") or []:
        if header.startswith("session="):
            set_cookie = header.split(";", 1)[0].split("=", 1)[1]
    return response.status, data, info, set_cookie


@pytest.mark.parametrize("kind", ["redis", "memcached"])
def test_separate_node_processes(kind, request, tmp_path, make_nodes):
    url = request.getfixturevalue("redis_server").url if kind == "redis" else \
        request.getfixturevalue("memcached_cluster").url()
    n1, n2 = start_example_node("n1", url, tmp_path), start_example_node("n2", url, tmp_path)
    try:
        ticket = new_ticket()
        status, body, _, cookie = http_request(n1.port, "GET", f"/login?ticket={ticket}&user=alice")
        assert status == 200 and cookie and body["id"].endswith(".n1")
        assert http_request(n1.port, "GET", "/", cookie)[2]["source"] == "local"

        in_flight: list[Any] = []  # reads the session, then writes it 1.5 s later
        thread = threading.Thread(target=lambda: in_flight.append(
            http_request(n1.port, "GET", "/note?text=late&delay=1.5", cookie)))
        thread.start()
        time.sleep(0.3)
        form = {"logoutRequest": logout_request(ticket)}
        status, body, _, _ = http_request(n2.port, "POST", "/cas/logout", form=form)
        assert (status, body) == (200, {"destroyed": 1})

        def on_n1() -> tuple[dict, dict]:
            _, body, info, _ = http_request(n1.port, "GET", "/", cookie)
            return body, info

        elapsed, body, info = poll_until_gone(on_n1)
        assert body["user"] is None and elapsed <= DEADLINE, f"still logged in on n1 after {elapsed:.2f}s"
        assert info["causes"] == "invalidated"
        thread.join(30)
        assert in_flight and in_flight[0][0] == 200 and in_flight[0][2]["saved"] == "0"
        time.sleep(0.3)
        for port in (n1.port, n2.port):
            _, body, info, _ = http_request(port, "GET", "/", cookie)
            assert body["user"] is None and body["notes"] == [] and "invalidated" in info["causes"]
        observer = make_nodes(url, "non-sticky").n1.manager
        assert observer.find_by_index("cas", ticket) == []
        assert observer.load(observer.signer.unsign(cookie)) is None
    finally:
        n1.stop()
        n2.stop()


def test_a_broken_subscription_is_restored_and_reported(redis_server, make_nodes):
    """The pub/sub connection is killed: the node resubscribes, reports a possible loss (its
    sessions get checked once), and later invalidations reach it again."""
    nodes = make_nodes(redis_server.url, "sticky")
    alice = Client(nodes.n1)
    ticket = new_ticket()
    alice.get(f"/login?ticket={ticket}&user=alice")
    feed = nodes.n1.manager.feed
    with redis_client(redis_server.port) as client:
        assert client.client_kill_filter(_type="pubsub") >= 2  # both nodes' subscriptions
    started = time.monotonic()
    while feed.losses == 0 and time.monotonic() - started < 5:
        time.sleep(0.02)
    assert feed.losses >= 1
    assert debug(alice.get("/"))["source"] == "local"  # checked against the store once: still there
    time.sleep(0.2)
    assert nodes.n2.manager.invalidate_by_index("cas", ticket) == 1
    started = time.monotonic()
    while alice.get("/").json["user"] is not None and time.monotonic() - started < DEADLINE + 1:
        time.sleep(0.02)
    assert time.monotonic() - started <= DEADLINE
