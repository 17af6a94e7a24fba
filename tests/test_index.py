"""The index for single sign-out, in one process on the memory store (real servers: tests/integration).

``session.index(name, value)``, ``manager.find_by_index`` and
``manager.invalidate_by_index``: kept in step with ``rotate()``,
``invalidate()``, failovers and expiry; the lifetime rule of the entries;
what it costs; and, in sticky mode, how an invalidation reaches the node
holding the session (the in-process feed) without a write coming back.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from typing import Any

import pytest

from sessionstore import ConfigError, SessionMiddleware, get_session
from sessionstore.index import INDEX_GRACE, entry_ttl, index_key
from sessionstore.stores.base import ANY
from sessionstore.stores.memory import MemoryStore

from .helpers import CountingMemoryStore, FakeClock
from .helpers import ServerClient as Client

SECRET = "index-secret"
TICKET = "ST-12345-a ticket with spaces and ünïcode"


class IndexCountingStore(CountingMemoryStore):
    """The memory store counting index calls too (instrumentation of the real store)."""

    def index_add(self, key, index_keys, ttl):
        self._count("index_add")
        self.added.append((key, list(index_keys), ttl))
        return super().index_add(key, index_keys, ttl)

    def index_find(self, index_key):
        self._count("index_find")
        return super().index_find(index_key)

    def index_drop(self, key):
        self._count("index_drop")
        return super().index_drop(key)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.added: list[tuple[str, list[str], int | None]] = []


def app(environ, start_response):
    session = get_session(environ)
    path = environ["PATH_INFO"]
    query = dict(p.split("=", 1) for p in environ.get("QUERY_STRING", "").split("&") if "=" in p)
    if path == "/login":
        session["user"] = query.get("user", "alice")
        session.index("cas", query.get("ticket", TICKET))
        session.index("user", session["user"])
        session.rotate()
    elif path == "/index":
        session.index(query["name"], query["value"])
    elif path == "/inc":
        session["n"] = session.get("n", 0) + 1
    elif path == "/logout":
        session.invalidate()
    elif path == "/blocked-write":
        GATE.entered.set()
        session.get("n")  # loaded before the logout arrives
        GATE.release.wait(10)
        session["n"] = session.get("n", 0) + 100
    body = json.dumps({"id": session.id, "user": session.get("user"), "n": session.get("n")}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]


class _Gate:
    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()


GATE = _Gate()


@pytest.fixture(autouse=True)
def gate():
    global GATE
    GATE = _Gate()
    yield GATE
    GATE.release.set()


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def store(clock):
    return IndexCountingStore(clock=clock)


@pytest.fixture
def node(clock, store):
    built: list[SessionMiddleware] = []

    def build(node_id: str | None = None, **fields) -> SessionMiddleware:
        fields.setdefault("secret_key", SECRET)
        fields.setdefault("debug", True)
        if node_id is not None:
            fields.update(mode="sticky", node_id=node_id)
        mw = SessionMiddleware(app, clock=clock, store=fields.pop("store", store), **fields)
        built.append(mw)
        return mw

    yield build
    for mw in built:
        mw.manager.close()


def events(mw: SessionMiddleware) -> list[tuple[str, str, str | None]]:
    seen: list[tuple[str, str, str | None]] = []
    for name in ("created", "destroyed", "id_changed"):
        mw.manager.on(name, lambda e: seen.append((e.name, e.session_id, e.reason)))
    return seen


def cookie(client: Client) -> str:
    return client.get_cookie("session").value


def moved(client: Client, target: SessionMiddleware) -> Client:
    other = Client(target)
    other.set_cookie("session", cookie(client))
    return other


def debug(response) -> dict[str, str]:
    return dict(p.strip().split("=", 1) for p in response.headers["X-Session-Debug"].split(";"))


# -- keys ---------------------------------------------------------------------------------


def test_index_key_is_a_fixed_size_hash_of_name_and_value():
    key = index_key("sessionstore:", "cas", TICKET)
    assert key.startswith("sessionstore:ix:{") and len(key) == len("sessionstore:ix:{}") + 64
    assert key.isascii() and " " not in key
    assert index_key("sessionstore:", "user", "cas") != index_key("sessionstore:", "cas", "user")
    assert index_key("a:", "cas", TICKET) != key  # the key prefix namespaces the index too


def test_index_name_and_value_must_be_non_empty_strings(node):
    mw = node()

    def bad(environ, start_response):
        with pytest.raises(TypeError):
            get_session(environ).index("cas", 42)
        with pytest.raises(TypeError):
            get_session(environ).index("", "x")
        start_response("204 No Content", [])
        return []

    Client(SessionMiddleware(bad, secret_key=SECRET, store=MemoryStore())).get("/")
    assert mw.manager.find_by_index("cas", "nothing") == []


# -- find, rotate, invalidate -----------------------------------------------------------------


def test_rotate_keeps_the_index_under_the_new_id_only(node, store):
    mw = node()
    client = Client(mw)
    anonymous = client.get("/inc").json["id"]  # a stored session before login
    logged_in = client.get("/login").json["id"]
    assert logged_in != anonymous
    assert mw.manager.find_by_index("cas", TICKET) == [logged_in]
    assert mw.manager.find_by_index("user", "alice") == [logged_in]
    assert store.index_drop(mw.manager.key(anonymous)) == 0  # nothing was left under the old id
    rotated = client.get("/login?ticket=ST-2").json["id"]  # logging in again rotates again
    assert sorted(mw.manager.find_by_index("cas", TICKET)) == [rotated]
    assert mw.manager.find_by_index("cas", "ST-2") == [rotated]


def test_invalidate_removes_the_entries(node, store):
    mw = node()
    client = Client(mw)
    sid = client.get("/login").json["id"]
    client.get("/logout")
    assert mw.manager.find_by_index("cas", TICKET) == []
    assert store.index_drop(mw.manager.key(sid)) == 0
    assert store._forward == {} and not store._reverse


def test_invalidate_by_index_destroys_like_invalidate(node):
    mw = node()
    seen = events(mw)
    alice, bob = Client(mw), Client(mw)
    sid = alice.get("/login").json["id"]
    bob.get("/login?ticket=ST-bob&user=bob")
    assert mw.manager.invalidate_by_index("cas", TICKET) == 1
    assert mw.manager.invalidate_by_index("cas", TICKET) == 0
    assert [e for e in seen if e[0] == "destroyed"] == [("destroyed", sid, "invalidated")]
    response = alice.get("/")
    assert response.json["user"] is None
    assert debug(response)["causes"] == "invalidated" and debug(response)["source"] == "new"
    assert mw.manager.find_by_index("user", "alice") == []  # every entry of the session went
    assert mw.manager.find_by_index("user", "bob") != []


def test_manager_invalidate_drops_the_entries_too(node):
    mw = node()
    sid = Client(mw).get("/login").json["id"]
    assert mw.manager.invalidate(sid)
    assert mw.manager.find_by_index("user", "alice") == []


def test_log_out_everywhere_by_user_name(node):
    mw = node()
    devices = [Client(mw) for _ in range(3)]
    for i, device in enumerate(devices):
        device.get(f"/login?ticket=ST-{i}&user=carol")
    other = Client(mw)
    other.get("/login?ticket=ST-x&user=dave")
    assert len(mw.manager.find_by_index("user", "carol")) == 3
    assert mw.manager.invalidate_by_index("user", "carol") == 3
    assert all(device.get("/").json["user"] is None for device in devices)
    assert other.get("/").json["user"] == "dave"


def test_concurrent_saves_each_recording_a_value_keep_both(node):
    mw = node()
    client = Client(mw)
    client.get("/inc")
    session_cookie = cookie(client)
    barrier = threading.Barrier(2)

    def add(value: str) -> None:
        c = Client(mw)
        c.set_cookie("session", session_cookie)
        barrier.wait()
        c.get(f"/index?name=device&value={value}")

    threads = [threading.Thread(target=add, args=(v,)) for v in ("phone", "laptop")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sid = client.get("/").json["id"]
    assert mw.manager.find_by_index("device", "phone") == [sid]
    assert mw.manager.find_by_index("device", "laptop") == [sid]


def test_a_store_without_an_index_says_so(node):
    class NoIndex:
        """A store with only the small contract."""

        def __init__(self) -> None:
            self.inner = MemoryStore()

        def load(self, key):
            return self.inner.load(key)

        def load_and_touch(self, key, ttl):
            return self.inner.load_and_touch(key, ttl)

        def save(self, key, data, ttl, expect=ANY):
            return self.inner.save(key, data, ttl, expect)

        def touch(self, key, ttl):
            return self.inner.touch(key, ttl)

        def delete(self, key, expect=ANY):
            return self.inner.delete(key, expect)

        def close(self):
            pass

    mw = node(store=NoIndex())
    Client(mw).get("/login")  # recording is skipped, the login works
    with pytest.raises(ConfigError):
        mw.manager.find_by_index("cas", TICKET)


# -- lifetimes ------------------------------------------------------------------------------------


def test_entries_live_the_session_ttl_plus_the_grace(node, store):
    mw = node(max_inactive=600)
    Client(mw).get("/login")
    (_, names, ttl), = store.added
    assert ttl == entry_ttl(600) == 600 + INDEX_GRACE and len(names) == 2


def test_an_expired_session_is_not_found_and_its_entries_age_out(node, store, clock):
    mw = node(max_inactive=600)
    client = Client(mw)
    client.get("/login")
    clock.advance(601)
    assert mw.manager.find_by_index("cas", TICKET) == []  # the session expired: filtered by existence
    response = client.get("/")
    assert "expired" in debug(response)["causes"]
    clock.advance(INDEX_GRACE)
    Client(mw).get("/login?ticket=ST-later&user=zed")  # a later write sweeps what aged out
    assert index_key(mw.manager.index.prefix, "cas", TICKET) not in store._forward


def test_read_only_requests_cost_no_index_call_and_saves_refresh_with_the_tombstone(node, store, clock):
    mw = node(max_inactive=1000)
    client = Client(mw)
    client.get("/login")
    assert store.calls["index_add"] == 1
    for _ in range(5):
        client.get("/")
        clock.advance(10)
    client.get("/inc")  # a save, tombstone not due yet: no index call
    assert store.calls["index_add"] == 1
    clock.advance(260)  # past a quarter of the idle timeout since the last refresh
    client.get("/")
    assert store.calls["index_add"] == 1  # a read never rewrites anything
    client.get("/inc")  # the save refreshes the tombstone, and with it every entry
    assert store.calls["index_add"] == 2
    (_, names, ttl) = store.added[-1]
    assert len(names) == 2 and ttl == 1000 + INDEX_GRACE


def test_only_the_save_recording_a_new_value_writes_the_index(node, store):
    mw = node()
    client = Client(mw)
    client.get("/inc")
    before = store.calls["index_add"]
    client.get("/index?name=device&value=phone")
    client.get("/index?name=device&value=phone")  # already recorded: nothing to save
    client.get("/inc")
    assert store.calls["index_add"] == before + 1
    assert store.added[-1][1] == [index_key("sessionstore:", "device", "phone")]


def test_max_age_caps_the_entries_like_the_session(node, store, clock):
    mw = node(max_age=100, max_inactive=1000)
    client = Client(mw)
    client.get("/login")
    assert store.added[-1][2] == 100 + INDEX_GRACE  # the session's store TTL is what is left of max_age
    clock.advance(101)
    assert "expired" in debug(client.get("/"))["causes"]
    assert mw.manager.find_by_index("cas", TICKET) == []


# -- sticky mode: the feed ------------------------------------------------------------------------


def test_sticky_logout_from_the_other_node_reaches_the_owner(node):
    n1, n2 = node("n1"), node("n2")
    seen1, seen2 = events(n1), events(n2)
    client = Client(n1)
    sid = client.get("/login").json["id"]
    assert sid.endswith(".n1") and "source=local" in client.get("/").headers["X-Session-Debug"]
    assert n2.manager.find_by_index("cas", TICKET) == [sid]
    assert n2.manager.invalidate_by_index("cas", TICKET) == 1
    assert n1.manager.key(sid) not in n1.manager._sticky.local.keys()  # delivered in this thread
    response = client.get("/")
    assert response.json["user"] is None and "invalidated" in debug(response)["causes"]
    assert [e for e in seen2 if e[0] == "destroyed"] == [("destroyed", sid, "invalidated")]
    assert [e for e in seen1 if e[0] == "destroyed"] == []


@pytest.mark.parametrize("backup", ["sync", "async"])
def test_sticky_request_in_flight_on_the_owner_does_not_resurrect(node, store, gate, backup):
    n1, n2 = node("n1", backup=backup), node("n2", backup=backup)
    client = Client(n1)
    sid = client.get("/login").json["id"]
    client.get("/inc")
    n1.manager._sticky.backup.flush()
    replies: list[Any] = []
    in_flight = threading.Thread(target=lambda: replies.append(moved(client, n1).get("/blocked-write")))
    in_flight.start()
    assert gate.entered.wait(5)
    assert n2.manager.invalidate_by_index("cas", TICKET) == 1
    gate.release.set()
    in_flight.join(10)
    assert replies[0].status_code == 200
    n1.manager._sticky.backup.flush()
    assert store.load(n1.manager.key(sid)) is None
    assert n2.manager.load(sid) is None and n1.manager.load(sid) is None
    response = client.get("/")
    assert response.json["n"] is None and "invalidated" in debug(response)["causes"]


class BlockingStore(IndexCountingStore):
    """The memory store whose ``save`` of chosen keys waits for ``go`` (to hold the backup writer)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hold: set[str] = set()
        self.holding = threading.Event()
        self.go = threading.Event()

    def save(self, key, data, ttl, expect=ANY):
        if key in self.hold:
            self.holding.set()
            self.go.wait(10)
        return super().save(key, data, ttl, expect)


@pytest.mark.parametrize("held", ["queued", "being-written"])
def test_sticky_pending_backups_of_a_destroyed_session_never_land(node, clock, held):
    """Async backup: the owner's write for the session is queued (or on its way) when the
    invalidation arrives; it must not recreate the session in the store."""
    shared = BlockingStore(clock=clock)
    n1, n2 = node("n1", backup="async", store=shared), node("n2", backup="async", store=shared)
    client, other = Client(n1), Client(n1)
    sid = client.get("/login").json["id"]
    other.get("/inc")
    writer = n1.manager._sticky.backup
    assert writer.flush()
    blocker = n1.manager.key(other.get("/").json["id"])
    shared.hold.add(blocker if held == "queued" else n1.manager.key(sid))
    other.get("/inc")  # the writer thread now waits inside the save of `other` (or ours, below)
    client.get("/inc")  # our backup write: queued behind it, or the one waiting
    assert shared.holding.wait(5)
    assert n2.manager.invalidate_by_index("cas", TICKET) == 1
    shared.go.set()
    assert writer.flush()
    assert shared.load(n1.manager.key(sid)) is None
    assert "invalidated" in debug(client.get("/"))["causes"]


def test_sticky_failover_tells_the_old_node_to_drop_its_copy(node):
    n1, n2 = node("n1"), node("n2")
    c1 = Client(n1)
    old = c1.get("/login").json["id"]
    c1.get("/inc")
    c2 = moved(c1, n2)
    response = c2.get("/inc")
    new = response.json["id"]
    assert "route-changed" in debug(response)["causes"] and response.json["n"] == 2
    assert n1.manager.key(old) not in n1.manager._sticky.local.keys()  # dropped through the feed
    assert n1.manager.find_by_index("cas", TICKET) == [new]  # the index moved with the session
    back = Client(n1)
    back.set_cookie("session", cookie(c1))  # the old cookie, back at the old node
    stale = back.get("/")
    assert stale.json["n"] is None and "unknown-id" in debug(stale)["causes"]


def test_sticky_lost_messages_make_the_owner_check_its_sessions(node, store):
    n1 = node("n1")
    client = Client(n1)
    sid = client.get("/login").json["id"]
    keep = Client(n1)
    keep.get("/inc")
    # destroyed behind n1's back (as if the message were lost), then the feed reports a loss
    key = n1.manager.key(sid)
    store.delete(key)
    n1.manager._final_tombstones.destroyed(key, "invalidated", 1800)
    n1.manager.feed._lost()
    response = client.get("/")
    assert response.json["user"] is None and "invalidated" in debug(response)["causes"]
    assert debug(keep.get("/"))["source"] == "local"  # a session still in the store stays
    assert debug(keep.get("/"))["source"] == "local"


def test_sticky_read_only_requests_on_the_owner_still_cost_nothing(node, store):
    n1 = node("n1")
    node("n2")  # another node listening on the same feed
    client = Client(n1)
    client.get("/login")
    before = store.total
    for _ in range(20):
        client.get("/")
    assert store.total == before


def test_debug_record_counts_the_index_commands_of_the_login_save(node, caplog):
    mw = node()
    with caplog.at_level(logging.INFO, logger="sessionstore.debug"):
        client = Client(mw)
        client.get("/login")
        client.get("/")
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "sessionstore.debug"]
    login, read = records[-2], records[-1]
    # memory store: index_add 1, save 1, tombstone 1; a read-only request 1
    assert (login["store_ops"], read["store_ops"]) == (3, 1)
    assert Counter(r["saved"] for r in records) == Counter({True: 1, False: 1})


def test_long_idle_timeouts_get_a_quarter_of_their_ttl_as_grace():
    week = 7 * 86_400
    assert entry_ttl(week) == week + week // 4  # a save refreshes the entries only T/4 after
    assert entry_ttl(1800) == 1800 + INDEX_GRACE and entry_ttl(None) is None


def test_changing_the_idle_timeout_rewrites_the_entries(node, store):
    def longer(environ, start_response):
        get_session(environ).max_inactive = 30 * 86_400
        start_response("204 No Content", [])
        return []

    mw = node()
    client = Client(mw)
    client.get("/login")
    assert store.calls["index_add"] == 1
    mw.app = longer
    client.get("/")
    assert store.calls["index_add"] == 2 and store.added[-1][2] == entry_ttl(30 * 86_400)
