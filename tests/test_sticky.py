"""Sticky mode with nodes in one process sharing a store object (real servers: tests/integration)."""

from __future__ import annotations

import threading

import pytest

from sessionstore import SessionMiddleware, get_session
from sessionstore.backup import _Op
from sessionstore.sticky import BACKUP_SLACK
from sessionstore.stores.base import ANY, is_companion

from .helpers import CountingMemoryStore, FakeClock, json_app
from .helpers import ServerClient as Client

SECRET = "sticky-secret"


def counter(session, environ):
    session["n"] = session.get("n", 0) + 1
    return {"n": session["n"], "id": session.id}


def read(session, environ):
    return {"n": session.get("n"), "id": session.id}


HANDLERS = {
    "/inc": counter,
    "/read": read,
    "/rotate": lambda s, e: (s.rotate(), s.id)[1],
    "/logout": lambda s, e: s.invalidate(),
}


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def shared(clock):
    return CountingMemoryStore(clock=clock)


@pytest.fixture
def node(clock, shared, tmp_path):
    """``build(node_id, host=...)``: a node; nodes with one id and one host share their node copy."""

    def build(node_id: str, host: str = "host", **fields):
        fields.setdefault("node_dir", str(tmp_path / host / node_id))
        fields.setdefault("secret_key", SECRET)
        fields.setdefault("debug", True)
        fields.setdefault("store", shared)
        return SessionMiddleware(json_app(HANDLERS), mode="sticky", node_id=node_id, clock=clock, **fields)

    return build


def cookie(client: Client) -> str:
    return client.get_cookie("session").value


def move(client: Client, target: SessionMiddleware) -> Client:
    """The same browser, now routed to another node."""
    moved = Client(target)
    moved.set_cookie("session", cookie(client))
    return moved


def test_id_carries_the_route(node):
    client = Client(node("n1"))
    body = client.get("/inc").json
    assert body["id"].endswith(".n1") and cookie(client).endswith(".n1")


def test_failover_moves_session_and_reissues_id(node, shared):
    n1, n2 = node("n1"), node("n2")
    c1 = Client(n1)
    for _ in range(3):
        c1.get("/inc")
    old_id = c1.get("/read").json["id"]
    assert n1.manager.key(old_id) in shared._entries
    c2 = move(c1, n2)
    response = c2.get("/read")
    assert response.json["n"] == 3
    assert "route-changed" in response.headers["X-Session-Debug"]
    new_id = response.json["id"]
    assert new_id.endswith(".n2") and new_id.split(".")[0] != old_id.split(".")[0]
    assert cookie(c2).endswith(".n2")
    assert n1.manager.key(old_id) not in shared._entries
    assert n2.manager.key(new_id) in shared._entries
    assert c2.get("/inc").json["n"] == 4


def test_read_only_on_owner_costs_no_store_call_and_write_costs_one(node, shared):
    n1 = node("n1")
    client = Client(n1)
    client.get("/inc")
    before = shared.total
    for _ in range(50):
        client.get("/read")
    assert shared.total == before
    client.get("/inc")
    assert shared.total == before + 1


def test_restarted_worker_serves_from_the_node_copy(node):
    client = Client(node("n1"))
    client.get("/inc")
    restarted = move(client, node("n1"))  # a new worker process of the same node
    response = restarted.get("/read")
    assert response.json["n"] == 1
    assert "source=local" in response.headers["X-Session-Debug"]


def test_rebooted_node_loads_from_the_store(node):
    client = Client(node("n1"))
    client.get("/inc")
    restarted = move(client, node("n1", host="rebooted"))  # its node copy is gone
    response = restarted.get("/read")
    assert response.json["n"] == 1
    assert "source=store" in response.headers["X-Session-Debug"]
    assert "Set-Cookie" not in response.headers  # same id, same route
    assert "source=local" in restarted.get("/read").headers["X-Session-Debug"]


def test_backup_expiry_is_refreshed_rarely(node, shared, clock):
    n1 = node("n1", max_inactive=1000)
    client = Client(n1)
    client.get("/inc")
    key = n1.manager.key(client.get("/read").json["id"])
    touches = shared.calls["touch"]
    for _ in range(1000):  # one request per second for 1000 s
        clock.advance(1)
        assert client.get("/read").json["n"] == 1
        assert shared.ttl(key) is not None and shared.ttl(key) >= n1.manager.store.local.ttl(key)
    refreshes = shared.calls["touch"] - touches
    assert 1 <= refreshes <= 1000 / (1000 * BACKUP_SLACK) + 1
    assert refreshes / 1000 <= 0.02


def test_invalidate_and_rotate_remove_the_backup(node, shared):
    n1 = node("n1")
    client = Client(n1)
    first = client.get("/inc").json["id"]
    rotated = client.get("/rotate").json
    assert n1.manager.key(first) not in shared._entries and n1.manager.key(rotated) in shared._entries
    client.get("/logout")
    assert n1.manager.key(rotated) not in shared._entries
    assert n1.manager.key(rotated) not in n1.manager.store.local.keys()


def test_listeners_fire_once_per_lifetime_on_the_owner(node):
    n1, n2 = node("n1"), node("n2")
    events: list[tuple[str, str]] = []
    for mw, name in ((n1, "n1"), (n2, "n2")):
        for event in ("created", "destroyed", "id_changed"):
            mw.manager.on(event, lambda e, name=name: events.append((name, e.name)))
    c1 = Client(n1)
    c1.get("/inc")
    c1.get("/inc")
    c2 = move(c1, n2)
    c2.get("/inc")
    c2.get("/logout")
    assert events == [("n1", "created"), ("n2", "id_changed"), ("n2", "destroyed")]


class HeldStore(CountingMemoryStore):
    """The counting memory store; a session save waits inside for ``go`` (to hold the backup writer)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.holding, self.go = threading.Event(), threading.Event()
        self.saved: list[str] = []  # keys saved, in order

    def save(self, key, data, ttl, expect=ANY):
        self.saved.append(key)
        if key.startswith("sessionstore:{") and not is_companion(key):  # a session, not the node lease
            self.holding.set()
            self.go.wait(10)
        return super().save(key, data, ttl, expect)


def test_async_backup_coalesces_and_close_flushes(node, clock):
    """The 19 writes queued while the writer is busy with the first land as one; close() lands it.

    The writer is held inside its first write: left alone it drains the queue
    as fast as it is scheduled, and on a loaded machine every write lands on
    its own, so how many coalesce would be up to the scheduler.
    """
    shared = HeldStore(clock=clock)
    n1 = node("n1", backup="async", store=shared)
    client = Client(n1)
    client.get("/inc")
    assert shared.holding.wait(5)  # the writer is inside the backup write of request 1
    for _ in range(19):
        client.get("/inc")
    shared.go.set()
    n1.manager.close()
    key = n1.manager.key(n1.manager.signer.unsign(cookie(client)))
    assert shared.load(key) is not None
    # request 1's write and its tombstone, then requests 2-20 as one write
    assert [k for k in shared.saved if k.startswith("sessionstore:{")] == [key, key + ":t", key]
    other = move(client, node("n2", store=shared))
    assert other.get("/read").json["n"] == 20


@pytest.mark.parametrize("locking, attribute", [("none", "own"), ("all", "same")])
def test_concurrent_requests_merge_or_lock_and_lose_nothing(shared, tmp_path, locking, attribute):
    """Each request has its own copy (as on another worker): own attributes merge, one attribute needs the lock."""

    def app(environ, start_response):
        session = get_session(environ)
        name = environ["PATH_INFO"].strip("/") if attribute == "own" else "hits"
        session.setdefault(name, []).append(environ["PATH_INFO"])
        start_response("200 OK", [])
        return [b"ok"]

    mw = SessionMiddleware(app, mode="sticky", node_id="n1", secret_key=SECRET, store=shared, locking=locking,
                           node_dir=str(tmp_path / "n1"))
    first = Client(mw)
    first.get("/start")
    value = cookie(first)

    def worker(i: int) -> None:
        client = Client(mw)
        client.set_cookie("session", value)
        for j in range(10):
            client.get(f"/t{i}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    session = mw.manager.load(mw.manager.signer.unsign(value))
    if attribute == "own":
        assert all(session[f"t{i}"] == [f"/t{i}"] * 10 for i in range(4))
    else:
        assert sorted(session["hits"]) == sorted(["/start"] + [f"/t{i}" for i in range(4) for _ in range(10)])


def test_unknown_route_with_nothing_in_store_is_a_new_session(node):
    n1 = node("n1")
    from sessionstore.ids import new_id

    client = Client(n1)
    client.set_cookie("session", n1.manager.signer.sign(new_id("n9")))
    response = client.get("/read")
    assert response.json["n"] is None and "unknown-id" in response.headers["X-Session-Debug"]


def test_a_node_that_was_down_checks_its_surviving_copies(node, clock):
    """The node copy outlives the node's processes; what the feed said meanwhile did not reach it."""
    n1, n2 = node("n1"), node("n2")
    c1 = Client(n1)
    c1.get("/inc")
    n1.manager.close()  # every worker of n1 stops: nobody listens to the feed
    clock.advance(10)
    moved_away = move(c1, n2)
    assert moved_away.get("/inc").json["n"] == 2  # failover: n2 owns it now, told n1 (nobody heard)
    restarted = node("n1")  # n1 starts again on the same host: its node copy still holds the old id
    replay = move(c1, restarted).get("/read")
    assert replay.json["n"] is None, "the restarted node served a session that moved away meanwhile"


def test_a_recycled_worker_does_not_suspect_its_node_copy(node, shared):
    n1 = node("n1")
    client = Client(n1)
    client.get("/inc")
    recycled = node("n1")  # another worker of n1 is still listening
    before = shared.total
    response = move(client, recycled).get("/read")
    assert response.json["n"] == 1 and "source=local" in response.headers["X-Session-Debug"]
    assert shared.total == before


class HeldInBackground(CountingMemoryStore):
    """The counting memory store; session saves from the backup writer's thread wait for ``go``."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.holding, self.go = threading.Event(), threading.Event()

    def save(self, key, data, ttl, expect=ANY):
        if threading.current_thread().name == "sessionstore-backup" and key.startswith("sessionstore:{"):
            self.holding.set()
            self.go.wait(10)
        return super().save(key, data, ttl, expect)


def test_sync_backups_land_in_the_request_while_older_work_waits_in_the_queue(node, clock):
    """After an outage the queue holds retries; acknowledged sync writes must not wait behind them
    (under steady load the queue never empties, and sync would silently become async)."""
    shared = HeldInBackground(clock=clock)
    n1 = node("n1", store=shared)
    client = Client(n1)
    client.get("/inc")
    key = n1.manager.key(n1.manager.signer.unsign(cookie(client)))
    writer = n1.manager._sticky.backup
    writer._enqueue("sessionstore:{other}", _Op("save", b"x", 60))  # the writer gets busy with this one
    assert shared.holding.wait(5)  # ... and is stuck in its save, as on a slow or returning store
    reader = SessionMiddleware(json_app(HANDLERS), store=shared, secret_key=SECRET, clock=clock).manager
    session_id = n1.manager.signer.unsign(cookie(client))
    for expected in range(2, 6):
        assert client.get("/inc").json["n"] == expected
        assert reader.load(session_id)["n"] == expected, "an acknowledged sync write is not in the backup"
    shared.go.set()
    n1.manager.close()


def test_an_older_backup_write_never_overwrites_a_newer_one(node, clock):
    """Two workers of n1: the first one's queued backup of n=1 is applied after the second one wrote n=2."""
    shared = HeldInBackground(clock=clock)
    first, second = node("n1", backup="async", store=shared), node("n1", store=shared)  # one node, two workers
    writer = first.manager._sticky.backup
    writer._enqueue("sessionstore:{other}", _Op("save", b"x", 60))  # the first worker's writer is busy ...
    assert shared.holding.wait(5)  # ... stuck in that save
    client = Client(first)
    client.get("/inc")  # n=1: its backup waits in the first worker's queue
    session_id = first.manager.signer.unsign(cookie(client))
    key = first.manager.key(session_id)
    assert move(client, second).get("/inc").json["n"] == 2  # the second worker writes n=2 (sync: landed)
    reader = SessionMiddleware(json_app(HANDLERS), store=shared, secret_key=SECRET, clock=clock).manager
    assert reader.load(session_id)["n"] == 2
    written_before = shared.calls["save"]
    shared.go.set()  # the first worker's queue goes on, with its write of n=1
    first.manager.close()
    assert reader.load(session_id)["n"] == 2, "an older backup overwrote a newer one"
    assert key not in writer._pending and shared.calls["save"] - written_before <= 2  # skipped, not rewritten


def test_an_id_taken_over_leads_to_the_new_one_only_for_a_moment(node, clock):
    """Parallel requests of one page share the takeover; a replay of the old cookie later gets nothing."""
    n1, n2 = node("n1"), node("n2")
    c1 = Client(n1)
    c1.get("/inc")
    old = cookie(c1)
    moved = move(c1, n2)
    new_id = moved.get("/inc").json["id"]
    soon = Client(n2)
    soon.set_cookie("session", old)
    assert soon.get("/read").json == {"n": 2, "id": new_id}  # a parallel request of the same page
    clock.advance(60)
    late = Client(n2)
    late.set_cookie("session", old)
    assert late.get("/read").json["n"] is None  # the old id is over
