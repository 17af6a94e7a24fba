"""Sticky mode acceptance on real servers, with nodes as real processes.

``tests/test_sticky.py`` checks the sticky logic in one process on a shared
memory store. Here the shared store is a real Redis or the real 3-node
memcached ring (started by ``tests/servers``), store commands are counted by
the servers themselves, and nodes are separate processes
(``sticky_node.py``) that are SIGKILLed: what survives is what really
reached the store.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import pytest

from sessionstore import SessionMiddleware
from sessionstore.ids import split_route
from sessionstore.stores.redis import RedisStore
from sessionstore.sticky import BACKUP_SLACK
from tests.helpers import FakeClock, ServerClient
from tests.servers.memcached_fixtures import memcached_command_count, memcached_peek
from tests.servers.process import ServerProcess
from tests.servers.redis_fixtures import (
    RedisServer,
    redis_client,
    redis_command_count,
    redis_commands,
    start_redis,
    wait_until,
)

from .sticky_node import COOKIE, Browser, Reply, build_app, recovered, start_node, write_until_killed

SECRET = "sticky-real-secret"
STORES = ["redis", "memcached"]


# -- the shared store, as the tests look at it -------------------------------------------------


@dataclass
class SharedStore:
    """A real shared store: its URL, and looks at its servers that bypass the product."""

    kind: str
    url: str
    #: commands the servers have executed so far (only differences mean something)
    count: Callable[[], int]
    #: whether any server holds ``key`` (a peek is a command: not between two ``count()``)
    holds: Callable[[str], bool]


def _redis_store(server: RedisServer) -> SharedStore:
    def holds(key: str) -> bool:
        with redis_client(server.port) as client:
            return bool(client.exists(key))

    return SharedStore("redis", server.url, lambda: redis_command_count(server.port), holds)


def _memcached_store(cluster) -> SharedStore:
    ports = [server.port for server in cluster.servers]  # the ring and the failover node
    return SharedStore(
        "memcached",
        cluster.url(),
        lambda: sum(memcached_command_count(port) for port in ports),
        lambda key: any(memcached_peek(port, key) is not None for port in ports),
    )


@pytest.fixture
def shared_store(request) -> SharedStore:
    """The session-wide Redis (``redis``) or memcached ring (``memcached``), by parameter."""
    if request.param == "redis":
        return _redis_store(request.getfixturevalue("redis_server"))
    request.getfixturevalue("steady_polls")  # counted request by request: the suspect nodes are polled once
    return _memcached_store(request.getfixturevalue("memcached_cluster"))


@pytest.fixture
def own_redis(tmp_path) -> Iterator[RedisServer]:
    """A Redis server of this test's own: it may be killed and started again on its port."""
    server = RedisServer(start_redis(tmp_path))
    try:
        yield server
    finally:
        server.stop()


# -- nodes -------------------------------------------------------------------------------------


@pytest.fixture
def middlewares() -> Iterator[Callable[..., SessionMiddleware]]:
    """In-process nodes running ``sticky_node``'s app; closed (async backups flushed) at the end."""
    built: list[SessionMiddleware] = []

    def build(node_id: str, store: str, backup: str = "sync", **fields) -> SessionMiddleware:
        built.append(build_app(node_id, store, backup, SECRET, **fields))
        return built[-1]

    yield build
    for mw in built:
        mw.manager.close()


@pytest.fixture
def nodes(tmp_path) -> Iterator[Callable[..., ServerProcess]]:
    """Start ``sticky_node.py`` processes (logs in ``tmp_path``); every one is killed at the end."""
    started: list[ServerProcess] = []

    def start(node_id: str, store: str, **options) -> ServerProcess:
        started.append(start_node(node_id, store, secret=SECRET, workdir=tmp_path, **options))
        return started[-1]

    yield start
    for node in started:
        node.kill()


def cookie_of(client: ServerClient) -> str:
    return client.get_cookie(COOKIE).value


def moved(client: ServerClient, target: SessionMiddleware) -> ServerClient:
    """The same browser (same cookie), now routed to another in-process node."""
    other = ServerClient(target)
    other.set_cookie(COOKIE, cookie_of(client))
    return other


def requests_only(mw: SessionMiddleware) -> SessionMiddleware:
    """``mw`` with its invalidation feed stopped, so that the servers count its requests only.

    On memcached the feed polls on its own clock, one ``get`` every
    ``POLL_INTERVAL`` s whatever the traffic (that cost is counted in
    ``test_single_sign_out.py``): a count taken after the node's first poll is
    due (0.25 s after its start, soon reached on a loaded machine) catches it.
    """
    if mw.manager.feed is not None:
        mw.manager.feed.close()
    return mw


def debug_of(response) -> dict[str, str]:
    """``X-Session-Debug`` of a werkzeug response as a dict."""
    header = response.headers["X-Session-Debug"]
    return dict(part.strip().split("=", 1) for part in header.split(";"))


# -- 1. route change ---------------------------------------------------------------------------


@pytest.mark.parametrize("shared_store", STORES, indirect=True)
def test_route_change_moves_the_session_reissues_the_id_and_drops_the_old_key(shared_store, middlewares):
    n1, n2 = middlewares("n1", shared_store.url), middlewares("n2", shared_store.url)
    on_n1 = ServerClient(n1)
    for expected in range(1, 6):
        assert on_n1.get("/inc").json["value"] == expected
    old_id = on_n1.get("/read").json["id"]
    old_key = n1.manager.key(old_id)
    assert shared_store.holds(old_key)

    on_n2 = moved(on_n1, n2)
    response = on_n2.get("/read")
    assert response.json["data"] == {"n": 5}
    debug = debug_of(response)
    assert "route-changed" in debug["causes"].split(",") and debug["source"] == "failover"
    new_id, new_cookie = response.json["id"], cookie_of(on_n2)
    assert new_cookie.endswith(".n2") and new_id.endswith(".n2")
    assert n2.manager.signer.unsign(new_cookie) == new_id
    assert split_route(new_id)[0] != split_route(old_id)[0]
    assert not shared_store.holds(old_key), "the old id's backup is still in the store"
    assert shared_store.holds(n2.manager.key(new_id))
    assert on_n2.get("/inc").json["value"] == 6
    assert "source=local" in on_n2.get("/read").headers["X-Session-Debug"]


# -- 2. a killed node --------------------------------------------------------------------------


@pytest.mark.parametrize("shared_store", STORES, indirect=True)
def test_sync_backup_keeps_every_acknowledged_write_of_a_killed_node(shared_store, nodes):
    n1 = nodes("n1", shared_store.url, backup="sync")
    n2 = nodes("n2", shared_store.url, backup="sync")
    run = write_until_killed(n1, browsers=4, seconds=1.5)  # SIGKILL while the browsers write
    assert not n1.alive and run.errors == []
    assert min(run.acked) > 5, f"too few writes before the kill to prove anything: {run.acked}"
    for acked, value in zip(run.acked, recovered(run, n2.port)):
        # the request in flight at the kill may have been saved without being acknowledged
        assert acked <= value <= acked + 1, f"acknowledged {acked}, n2 serves {value}"
    for browser in run.browsers:  # moved now: n2 reissued the id under its route and owns the session
        reply = browser.get("/read")
        assert reply.debug["source"] == "local" and reply.body["id"].endswith(".n2")


@pytest.mark.parametrize("shared_store", ["redis"], indirect=True)
def test_async_backup_loss_of_a_killed_node_is_measured(shared_store, nodes):
    n1 = nodes("n1", shared_store.url, backup="async")
    n2 = nodes("n2", shared_store.url, backup="sync")
    rate = 1000.0  # total over 8 sessions; near what one node process serves on 2 cores
    run = write_until_killed(n1, browsers=8, seconds=2.0, rate=rate)
    assert run.errors == []
    values = recovered(run, n2.port)
    lost = sum(max(0, acked - value) for acked, value in zip(run.acked, values))
    acknowledged = sum(run.acked)
    print(f"\nasync backup, SIGKILL at target {rate:.0f} writes/s (achieved {run.requests / run.seconds:.0f}/s): "
          f"acknowledged {acknowledged}, lost {lost} ({100 * lost / acknowledged:.2f}%), "
          f"per session lost {[a - v for a, v in zip(run.acked, values)]}")
    for acked, value in zip(run.acked, values):
        assert 0 <= value <= acked + 1, "a backup holds a write that was never made"


# -- 3. store commands per request -----------------------------------------------------------


@pytest.mark.parametrize("shared_store", STORES, indirect=True)
def test_owner_node_reads_cost_no_command_and_writes_cost_one(shared_store, middlewares):
    """Server-counted (Redis slowlog; memcached stats summed over the ring and the failover node)."""
    mw = requests_only(middlewares("n1", shared_store.url))
    ServerClient(mw).get("/inc")  # warm up: connections, Redis scripts loaded
    client = ServerClient(mw)

    before = shared_store.count()
    client.get("/inc")
    first_save = shared_store.count() - before
    before = shared_store.count()
    for _ in range(100):
        assert client.get("/read").json["data"] == {"n": 1}
        client.get("/health")  # never touches the session
    reads = shared_store.count() - before
    before = shared_store.count()
    for expected in range(2, 22):
        assert client.get("/inc").json["value"] == expected
    writes = shared_store.count() - before

    print(f"\n{shared_store.kind}: first save {first_save}, 200 read-only/untouched requests {reads}, "
          f"20 writes {writes} commands")
    # 0 per read-only request; the first save writes the backup and the tombstone <key>:t; then 1 per write
    assert (reads, first_save, writes) == (0, 2, 20)


@pytest.mark.parametrize("shared_store", STORES, indirect=True)
def test_backup_refresh_of_read_only_sessions_amortises_below_002(shared_store, middlewares):
    clock = FakeClock()
    mw = requests_only(middlewares("n1", shared_store.url, max_inactive=1000, clock=clock))
    ServerClient(mw).get("/inc")  # warm up
    client = ServerClient(mw)
    client.get("/inc")
    before = shared_store.count()
    for _ in range(1000):  # one read a second for 1000 s
        clock.advance(1)
        assert client.get("/read").json["data"] == {"n": 1}
    refresh = shared_store.count() - before
    print(f"\n{shared_store.kind}: 1000 read-only requests over 1000 s cost {refresh} commands "
          f"({refresh / 1000:.3f} per request)")
    assert 1 <= refresh, "the backup was never refreshed: it would lapse before the primary copy"
    assert refresh / 1000 <= 0.02


@pytest.mark.parametrize("shared_store", STORES, indirect=True)
def test_writes_cost_the_backup_plus_a_tombstone_each_quarter_idle_timeout(shared_store, middlewares):
    clock = FakeClock()
    mw = requests_only(middlewares("n1", shared_store.url, max_inactive=1000, clock=clock))
    ServerClient(mw).get("/inc")  # warm up
    client = ServerClient(mw)
    before = shared_store.count()
    client.get("/inc")  # created at t=0: backup + tombstone
    for _ in range(20):  # one write every 50 s up to t=1000
        clock.advance(50)
        client.get("/inc")
    commands = shared_store.count() - before
    # the tombstone <key>:t is rewritten by a save a quarter of max_inactive (250 s) after the last one
    backups, tombstones = 21, 1 + 4  # t=0; t=250, 500, 750, 1000
    print(f"\n{shared_store.kind}: 21 writes over 1000 s cost {commands} commands")
    assert commands == backups + tombstones


def test_backup_refresh_is_one_pexpire_per_quarter_idle_timeout(redis_server, middlewares):
    clock = FakeClock()
    mw = middlewares("n1", redis_server.url, max_inactive=1000, clock=clock)
    client = ServerClient(mw)
    client.get("/inc")
    redis_commands(redis_server.port)  # read the log up to here
    for _ in range(1000):
        clock.advance(1)
        client.get("/read")
    sent = redis_commands(redis_server.port)
    assert set(sent) == {"pexpire"} and 1 <= len(sent) <= 1000 / (1000 * BACKUP_SLACK) + 1, sent


# -- 4. the store goes away under load ---------------------------------------------------------


@dataclass
class Load:
    """Browser threads on one in-process node, each incrementing and reading its own session."""

    mw: SessionMiddleware
    failures: list[str] = field(default_factory=list)
    clients: list[ServerClient] = field(default_factory=list)
    served: list[int] = field(default_factory=list)
    slowest: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def add_browser(self) -> None:
        """Start one more browser thread (its session is created by its first request)."""
        self.clients.append(ServerClient(self.mw))
        self.served.append(0)
        thread = threading.Thread(target=self._browse, args=(len(self.clients) - 1,))
        self._threads.append(thread)
        thread.start()

    def _browse(self, i: int) -> None:
        """Alternate ``/inc`` and ``/read`` until stopped; the first failure ends the browser."""
        expected = 0
        while not self._stop.is_set():
            for path in ("/inc", "/read"):
                try:
                    failure = self._request(i, path, expected + (path == "/inc"))
                except Exception as exc:  # noqa: BLE001 - an error escaping the middleware is a failure too
                    failure = f"{type(exc).__name__}: {exc}"
                if failure is not None:
                    self.failures.append(f"browser {i} {path}: {failure}")
                    return
                expected += path == "/inc"
                self.served[i] += 1

    def _request(self, i: int, path: str, expected: int) -> str | None:
        """One request of browser ``i``; what went wrong, or None."""
        started = time.monotonic()
        response = self.clients[i].get(path)
        self.slowest = max(self.slowest, time.monotonic() - started)
        if response.status_code != 200:
            return f"{response.status} {response.get_data()[:200]!r}"
        value = response.json["value"] if path == "/inc" else response.json["data"]["n"]
        return None if value == expected else f"counter {value}, expected {expected}"

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in self._threads), "a browser thread hangs"

    def keys(self) -> list[str]:
        """Store keys of the browsers' sessions."""
        return [self.mw.manager.key(self.mw.manager.signer.unsign(cookie_of(c))) for c in self.clients]


def _backups_match(mw: SessionMiddleware, reader: RedisStore, keys: list[str]) -> bool:
    """Whether Redis holds, for every key, exactly the node's local (primary) copy."""
    for key in keys:
        primary, backup = mw.manager.store.local.load(key), reader.load(key)
        if primary is None or backup is None or primary.data != backup.data:
            return False
    return True


@pytest.mark.parametrize("backup", ["sync", "async"])
def test_store_outage_under_load_fails_no_request_and_backups_catch_up(backup, own_redis, middlewares):
    mw = middlewares("n1", own_redis.url, backup=backup)
    load = Load(mw)
    for _ in range(4):
        load.add_browser()
    wait_until(lambda: min(load.served) >= 10, 30, "every browser to have a session")

    own_redis.process.kill()
    served_before = sum(load.served)
    load.add_browser()  # a session created while the store is down
    time.sleep(2.0)
    served_during = sum(load.served) - served_before
    own_redis.process.start()  # same port, empty: what is there now was written after the restart
    back = time.monotonic()
    time.sleep(0.2)
    load.stop()
    assert load.failures == []
    assert served_during > 50, f"only {served_during} requests served while Redis was down"

    reader = RedisStore.from_url(own_redis.url)
    try:  # the writer retries with a backoff capped at 5 s
        wait_until(lambda: _backups_match(mw, reader, load.keys()), 30, "the backups to equal the primary copies")
        caught_up = time.monotonic() - back
    finally:
        reader.close()
    print(f"\nbackup={backup}: {served_during} requests served during a 2 s outage, slowest request "
          f"{load.slowest * 1000:.0f} ms; every backup equal to its primary {caught_up:.2f} s after Redis returned")


# -- 5. a restarted node -----------------------------------------------------------------------


@pytest.mark.parametrize("host", ["restarted", "rebooted"])
def test_restarted_node_serves_its_sessions_under_the_same_id(own_redis, nodes, tmp_path, host):
    """The node process SIGKILLed and started again: on the same host its node copy survived
    (served from there, no store command); after a reboot (a new node copy) from the store."""
    n1 = nodes("n1", own_redis.url, node_dir=tmp_path / "before")
    browser = Browser(n1.port)
    for expected in range(1, 4):
        assert browser.get("/inc").body["value"] == expected
    cookie, session_id = browser.cookie, browser.get("/read").body["id"]
    n1.kill()
    restarted = nodes("n1", own_redis.url, port=n1.port,
                      node_dir=tmp_path / ("before" if host == "restarted" else "after-reboot"))

    reply = browser.get("/read")
    assert reply.status == 200 and reply.body == {"id": session_id, "data": {"n": 3}}
    assert reply.debug["source"] == ("local" if host == "restarted" else "store") and reply.causes == []
    assert reply.set_cookie is None and browser.cookie == cookie
    assert browser.get("/inc").body == {"attr": "n", "value": 4, "id": session_id}
    assert browser.get("/read").debug["source"] == "local"
    assert restarted.alive


# -- 6. concurrent requests of one session in one node process --------------------------------


def _parallel(port: int, cookie: str, paths: list[list[str]]) -> list[list[Reply]]:
    """Browsers sharing ``cookie``, browser ``i`` requesting ``paths[i]`` in order, all at once.

    Returns each browser's replies.
    """
    replies: list[list[Reply]] = [[] for _ in paths]
    start = threading.Barrier(len(paths))

    def browse(i: int) -> None:
        browser = Browser(port, cookie)
        start.wait(30)
        replies[i].extend(browser.get(path) for path in paths[i])

    threads = [threading.Thread(target=browse, args=(i,)) for i in range(len(paths))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return replies


def _check_same_session(replies: list[list[Reply]], session_id: str, merged: bool = True) -> None:
    """Every reply: 200, the same session (no new cookie); ``merged=False``: no save had to merge."""
    for reply in (r for browser in replies for r in browser):
        assert reply.status == 200, reply.body
        assert reply.body["id"] == session_id and reply.set_cookie is None
        if not merged:
            assert "concurrent-update" not in reply.causes, "a save had to merge although the lock was held"


def test_parallel_increments_in_one_node_process_lose_no_update(own_redis, nodes, middlewares):
    """8 threads x 25 requests of one session on a threaded node process: each request has its own
    copy (as on another worker of the node), so own attributes merge, and one attribute takes the
    session lock (``locking="all"``), as in non-sticky mode."""
    n1 = nodes("n1", own_redis.url)
    first = Browser(n1.port)
    session_id = first.get("/inc?attr=seed").body["id"]
    threads, rounds = 8, 25

    different = _parallel(n1.port, first.cookie, [[f"/inc?attr=a{i}"] * rounds for i in range(threads)])
    _check_same_session(different, session_id)
    for i, replies in enumerate(different):
        assert [r.body["value"] for r in replies] == list(range(1, rounds + 1))

    n1.kill()
    n1 = nodes("n1", own_redis.url, locking="all")  # the node restarted with locking, its node copy kept
    first = first.moved_to(n1.port)
    same = _parallel(n1.port, first.cookie, [["/inc?attr=n"] * rounds for _ in range(threads)])
    _check_same_session(same, session_id, merged=False)
    values = sorted(r.body["value"] for replies in same for r in replies)
    assert values == list(range(1, threads * rounds + 1))

    expected = {"seed": 1, "n": threads * rounds, **{f"a{i}": rounds for i in range(threads)}}
    reader = middlewares("n1", own_redis.url)  # a fresh node: nothing local, so it reads the backup
    stored = reader.manager.load(session_id)
    assert stored is not None and dict(stored.items()) == expected
    assert first.get("/read").body["data"] == expected


class _SlowLoads:
    """A real store (every call reaches the server) whose ``load_and_touch`` returns ``delay`` s late
    in the thread named ``thread``: a slow first load, as after a node restart (instrumentation only)."""

    def __init__(self, store, thread: str, delay: float) -> None:
        self._store, self._thread, self._delay = store, thread, delay

    def __getattr__(self, name: str):
        return getattr(self._store, name)

    def load_and_touch(self, key: str, ttl: int | None):
        record = self._store.load_and_touch(key, ttl)
        if threading.current_thread().name == self._thread:
            time.sleep(self._delay)
        return record


def test_parallel_first_loads_after_a_node_restart_lose_no_update(own_redis, middlewares):
    """Two requests of a session both miss the node's memory; the first to start loading finishes
    its load last. Both increments must survive, or at least the loss be reported."""
    before = middlewares("n1", own_redis.url)
    client = ServerClient(before)
    client.get("/inc")
    cookie = cookie_of(client)
    before.manager.close()
    node = middlewares("n1", own_redis.url)  # the node restarted: its memory is empty
    sticky = getattr(node.manager.store, "wrapped", node.manager.store)  # under the metrics wrapper
    sticky.remote = _SlowLoads(sticky.remote, "slow-load", 1.0)
    values: dict[str, object] = {}

    def request(name: str) -> None:
        response = moved(client, node).get("/inc")
        values[name] = (response.status_code, response.json.get("value"), response.headers["X-Session-Debug"])

    slow = threading.Thread(target=request, args=("slow",), name="slow-load")
    slow.start()  # misses the memory, its load from Redis returns 1 s late
    time.sleep(0.2)
    request("fast")  # misses the memory too, loads, increments, saves and ends meanwhile
    slow.join(30)
    assert sorted(v[:2] for v in values.values()) == [(200, 2), (200, 3)], values
    stored = middlewares("n1", own_redis.url).manager.load(node.manager.signer.unsign(cookie))  # the backup
    assert stored is not None and stored["n"] == 3


def test_parallel_requests_failing_over_together_stay_one_session(own_redis, nodes):
    """After n1 dies, 4 parallel requests with n1's cookie reach n2: one takeover, one new id."""
    n1, n2 = nodes("n1", own_redis.url), nodes("n2", own_redis.url, locking="all")
    browser = Browser(n1.port)
    for _ in range(3):
        browser.get("/inc")
    n1.kill()
    # a page's parallel requests all arrive at n2 with n1's cookie (one attribute: the session lock)
    replies = [r for rs in _parallel(n2.port, browser.cookie, [["/inc"]] * 4) for r in rs]
    seen = sorted((r.status, r.body.get("value"), r.debug.get("source")) for r in replies)
    assert len({r.body.get("id") for r in replies}) == 1, f"the session forked on failover: {seen}"
    assert [value for _, value, _ in seen] == [4, 5, 6, 7], seen
