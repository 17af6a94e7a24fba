"""Acceptance: one node is one gunicorn with several worker processes (contract, "Nodes and processes").

Every node here is a real ``gunicorn`` master with sync workers
(:mod:`tests.servers.gunicorn_node`) serving :mod:`tests.servers.gunicorn_app`,
configured through ``SESSIONSTORE_*`` environment variables only. The
client (:class:`~tests.integration.sticky_node.Browser`) opens a new
connection per request, so consecutive requests of one session land on
different workers; every response names its worker (``X-Worker-Pid``) and
each test first checks that its requests really reached several workers,
else it would prove nothing.

What the contract asks, and each test checks on real processes:

* the workers of a node share one primary copy: no update is lost and no
  stale copy is served because a request landed on another worker, also
  when workers are recycled (``--max-requests``), SIGKILLed, or forked from
  a preloaded master (``--preload``); the default store is shared by the
  workers too;
* parallel requests of one session merge per attribute, or serialize under
  ``locking="all"``;
* ``invalidate()`` / ``rotate()`` take effect at once on every worker of
  every node, ``backup`` sync or async;
* two hosts claiming one ``node_id`` are detected (a logged warning or
  error, and the debug cause ``node-id-collision``).

Nodes n1 (``-w 4``) and n2 (``-w 2``) are shared by the tests of one store
and backup mode (module-scoped, parametrized); tests that recycle, kill or
configure workers differently start nodes of their own, under node ids of
their own. One Redis (and one memcached ring) serves the whole module.
Nodes keep their local copy in the default ``node_dir`` (which includes the
node id), except the two "hosts" of the collision test, which get one each.
"""

from __future__ import annotations

import http.client
import random
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from sessionstore import Settings
from sessionstore.manager import SessionManager
from tests.servers.gunicorn_node import GunicornNode, pid_of, start_gunicorn, worker_pids
from tests.servers.memcached_fixtures import MemcachedCluster, start_cluster
from tests.servers.redis_fixtures import RedisServer, start_redis, wait_until

from .sticky_node import Browser, Reply

SECRET = "multiworker-secret"
#: store kind and backup mode of the shared n1/n2 pair
PAIRS = ["redis-sync", "redis-async", "memcached-sync", "memcached-async"]
REDIS_PAIRS = ["redis-sync", "redis-async"]


# -- stores (one of each per module) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def mw_redis(tmp_path_factory) -> Iterator[RedisServer]:
    """This module's own Redis: its node ids meet no other module's nodes there."""
    server = RedisServer(start_redis(tmp_path_factory.mktemp("mw-redis")))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mw_memcached(tmp_path_factory) -> Iterator[MemcachedCluster]:
    cluster = start_cluster(tmp_path_factory.mktemp("mw-memcached"))
    try:
        yield cluster
    finally:
        cluster.stop()


# -- nodes -------------------------------------------------------------------------------------------


@dataclass
class Pair:
    """n1 (``-w 4``) and n2 (``-w 2``), sticky, on one shared store."""

    kind: str
    backup: str
    url: str
    n1: GunicornNode
    n2: GunicornNode


@pytest.fixture(scope="module", params=PAIRS)
def pair(request, tmp_path_factory) -> Iterator[Pair]:
    kind, backup = request.param.split("-")
    if kind == "redis":
        url = request.getfixturevalue("mw_redis").url
    else:
        url = request.getfixturevalue("mw_memcached").url()
    workdir = tmp_path_factory.mktemp(f"pair-{request.param}")
    nodes: list[GunicornNode] = []
    try:
        for node_id, workers in (("n1", 4), ("n2", 2)):
            nodes.append(start_gunicorn(workdir, workers=workers, secret=SECRET, node_id=node_id, store=url,
                                        mode="sticky", backup=backup))
        yield Pair(kind, backup, url, *nodes)
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture
def gunicorn(tmp_path) -> Iterator:
    """Start nodes of the test's own (``start_gunicorn`` arguments); all stopped at the end."""
    started: list[GunicornNode] = []

    def start(**options) -> GunicornNode:
        options.setdefault("secret", SECRET)
        started.append(start_gunicorn(tmp_path / f"node-{len(started)}", **options))
        return started[-1]

    yield start
    for node in started:
        node.stop()


# -- helpers -------------------------------------------------------------------------------------------


def increments(browser: Browser, n: int, path: str = "/inc") -> list[Reply]:
    """``n`` sequential requests of ``path``; each must answer 200.

    A session-less client keeps the node's workers busy meanwhile: on an idle machine a lone
    sequential client can be served by the same worker every time, and would show nothing.
    """
    replies = []
    with background_requests(browser.port, "/pid") as noise:
        for i in range(n):
            reply = browser.get(path)
            assert reply.status == 200, f"request {i + 1} of {n}: {reply.status} {reply.body} {reply.debug}"
            replies.append(reply)
    assert noise.errors == []
    return replies


def assert_counts_up(replies: list[Reply], first: int = 1) -> None:
    """The k-th reply's ``value`` is ``first + k``: no update lost, no stale copy served."""
    values = [r.body.get("value") for r in replies]
    expected = list(range(first, first + len(replies)))
    wrong = [(i + first, v) for i, v in zip(range(len(values)), values) if v != i + first]
    assert values == expected, (
        f"{len(wrong)} of {len(values)} responses differ from their request number "
        f"(first ones as (expected, got): {wrong[:8]}); served by workers {sorted(worker_pids(replies))}"
    )


def assert_spread(replies: list[Reply], at_least: int = 2) -> set[int]:
    """The replies came from ``at_least`` distinct workers (else the test shows nothing)."""
    pids = worker_pids(replies)
    assert len(pids) >= at_least, f"only workers {sorted(pids)} served {len(replies)} requests: nothing shown"
    return pids


def parallel(port: int, cookie: str | None, paths: list[list[str]]) -> list[list[Reply]]:
    """One client thread per ``paths[i]`` (all sharing ``cookie``), started together; their replies."""
    replies: list[list[Reply]] = [[] for _ in paths]
    errors: list[str] = []
    start = threading.Barrier(len(paths))

    def run(i: int) -> None:
        try:
            browser = Browser(port, cookie)
            start.wait(30)
            for path in paths[i]:
                replies[i].append(browser.get(path))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"client {i}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(paths))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert not any(thread.is_alive() for thread in threads), "a client thread hangs"
    assert errors == []
    return replies


@dataclass
class Background:
    """A client requesting one path in a loop (keeps workers busy); what went wrong."""

    served: int = 0
    errors: list[str] = field(default_factory=list)


@contextmanager
def background_requests(port: int, path: str) -> Iterator[Background]:
    """Request ``path`` on ``port`` in a loop (new connection each, no cookie) while the block runs."""
    state, stop = Background(), threading.Event()

    pause = random.Random(0)

    def run() -> None:
        while not stop.is_set():
            time.sleep(pause.uniform(0, 0.01))  # no lockstep with the clients: they meet either worker
            try:
                reply = Browser(port).get(path)
            except (OSError, http.client.HTTPException) as exc:
                state.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            if reply.status == 200:
                state.served += 1
            else:
                state.errors.append(f"{reply.status} {reply.body}")

    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield state
    finally:
        stop.set()
        thread.join(60)


def stored_value(url: str, session_id: str, attr: str = "n"):
    """``attr`` of the store's copy (the sticky backup) of ``session_id``, read by a non-sticky manager."""
    manager = SessionManager(Settings(store=url, secret_key=SECRET))
    try:
        session = manager.load(session_id)
        return None if session is None else session.get(attr)
    finally:
        manager.close()


def replays(node: GunicornNode, cookie: str, n: int = 30) -> list[Reply]:
    """``n`` requests of ``/read`` with ``cookie``, each from a fresh browser on a new connection.

    Parallel clients (``node.workers`` of them) make the node's workers share the work: on an idle
    machine one sequential client can be served by a single worker every time.
    """
    clients = max(2, node.workers)
    replies: list[Reply] = []
    start = threading.Barrier(clients)

    def run(count: int) -> None:
        start.wait(30)
        for _ in range(count):  # a fresh browser each time: it sends the old cookie whatever came back
            replies.append(Browser(node.port, cookie).get("/read"))

    threads = [threading.Thread(target=run, args=(n // clients + (i < n % clients),)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(replies) == n, f"{n - len(replies)} replays got no answer"
    return replies


def seeing(replies: list[Reply]) -> list[str]:
    """The replays that saw the session (data) or failed, described."""
    return [f"worker {pid_of(r)}: {r.status} {r.body.get('data', r.body)} ({r.debug})"
            for r in replies if r.status != 200 or r.body.get("data")]


def warm_every_worker(node: GunicornNode, cookie: str) -> set[int]:
    """Have the session read on as many of ``node``'s workers as parallel clients reach."""
    rounds = parallel(node.port, cookie, [["/read"] * 10 for _ in range(node.workers)])
    replies = [r for client in rounds for r in client]
    assert all(r.status == 200 for r in replies), [(r.status, r.body) for r in replies if r.status != 200]
    return assert_spread(replies)


# -- 1. sequential requests over the workers of a node, then failover to another node -------------------


def test_sequential_increments_over_four_workers_lose_nothing_and_fail_over_to_n2(pair):
    browser = pair.n1.browser()
    replies = increments(browser, 200)
    assert_spread(replies)
    assert_counts_up(replies)
    session_id = replies[-1].body["id"]
    assert session_id.endswith(".n1")

    if pair.backup == "async":  # written after the response: wait for it (it must be the last write)
        wait_until(lambda: stored_value(pair.url, session_id) == 200, 20, "the async backup to hold n=200")
    moved = browser.moved_to(pair.n2.port)
    reply = moved.get("/inc")
    assert reply.status == 200 and reply.body["value"] == 201, (reply.status, reply.body, reply.debug)
    assert "route-changed" in reply.causes and reply.debug["source"] == "failover", reply.debug
    assert reply.body["id"].endswith(".n2") and moved.cookie is not None and moved.cookie.endswith(".n2")
    on_n2 = increments(moved, 10)  # n2's two workers share the session it took over
    assert_counts_up(on_n2, first=202)
    assert {r.body["id"] for r in on_n2} == {reply.body["id"]}


# -- 2. parallel requests of one session on one node --------------------------------------------------------


@pytest.mark.parametrize("pair", REDIS_PAIRS, indirect=True)
def test_parallel_clients_on_their_own_attributes_of_one_session_lose_nothing(pair):
    first = pair.n1.browser()
    session_id = first.get("/inc?attr=seed").body["id"]
    clients, rounds = 4, 40
    replies = parallel(pair.n1.port, first.cookie, [[f"/inc?attr=a{i}"] * rounds for i in range(clients)])
    flat = [r for client in replies for r in client]
    assert_spread(flat)
    for reply in flat:
        assert reply.status == 200 and reply.body["id"] == session_id and reply.set_cookie is None, \
            (reply.status, reply.body, reply.debug)
    for i, client in enumerate(replies):  # attribute a<i> has one writer: it counts 1..40
        assert [r.body["value"] for r in client] == list(range(1, rounds + 1)), \
            f"a{i}: {[r.body['value'] for r in client]}"
    final = first.get("/read")
    assert final.body["data"] == {"seed": 1, **{f"a{i}": rounds for i in range(clients)}}, final.body


def test_locking_all_serializes_one_attribute_over_the_workers(mw_redis, gunicorn):
    node = gunicorn(workers=4, node_id="n3", store=mw_redis.url, mode="sticky", backup="sync", locking="all",
                    settings={"lock_timeout": "30"})  # generous: 4 clients queue on a loaded machine
    first = node.browser()
    first.get("/inc?attr=seed")  # the session the clients share
    clients, rounds = 4, 40
    replies = parallel(node.port, first.cookie, [["/inc"] * rounds for _ in range(clients)])
    flat = [r for client in replies for r in client]
    assert_spread(flat)
    failed = [(r.status, r.body, r.debug) for r in flat if r.status != 200]
    assert failed == []
    # under the session lock every increment sees the one before: values 1..160, each once
    values = sorted(r.body["value"] for r in flat)
    assert values == list(range(1, clients * rounds + 1)), \
        f"{clients * rounds - len(set(values))} increments lost; values {values}"
    assert first.get("/read").body["data"] == {"seed": 1, "n": clients * rounds}


# -- 3. invalidate() and rotate() on every worker of every node ------------------------------------------


@pytest.mark.parametrize("pair", REDIS_PAIRS, indirect=True)
def test_logout_on_one_worker_ends_the_session_on_every_worker_and_node(pair):
    browser = pair.n1.browser()
    increments(browser, 5)
    old_cookie = browser.cookie
    assert old_cookie is not None
    warmed = warm_every_worker(pair.n1, old_cookie)

    logout = browser.get("/logout")
    assert logout.status == 200, (logout.status, logout.body)

    on_n1 = replays(pair.n1, old_cookie)
    on_n2 = replays(pair.n2, old_cookie)
    assert (seeing(on_n1), seeing(on_n2)) == ([], []), (
        f"replays of the logged-out cookie that saw the session: {len(seeing(on_n1))} of {len(on_n1)} on n1 "
        f"(logout served by worker {pid_of(logout)}, session read before on workers {sorted(warmed)}), "
        f"{len(seeing(on_n2))} of {len(on_n2)} on n2")
    assert_spread(on_n1)


@pytest.mark.parametrize("pair", REDIS_PAIRS, indirect=True)
def test_rotate_on_one_worker_retires_the_old_id_on_every_worker_and_node(pair):
    browser = pair.n1.browser()
    increments(browser, 5)
    old_cookie = browser.cookie
    assert old_cookie is not None
    warmed = warm_every_worker(pair.n1, old_cookie)

    rotated = browser.get("/rotate")
    assert rotated.status == 200, (rotated.status, rotated.body)
    new_cookie = browser.cookie
    assert rotated.body["id"] != rotated.body["old"] and rotated.body["id"].endswith(".n1")
    assert new_cookie not in (None, old_cookie) and new_cookie.endswith(".n1")

    old_on_n1 = replays(pair.n1, old_cookie)
    new_on_n1 = replays(pair.n1, new_cookie, 10)
    old_on_n2 = replays(pair.n2, old_cookie)
    assert (seeing(old_on_n1), seeing(old_on_n2)) == ([], []), (
        f"replays of the rotated-away cookie that saw the session: {len(seeing(old_on_n1))} of {len(old_on_n1)} "
        f"on n1 (rotate served by worker {pid_of(rotated)}, session read before on workers {sorted(warmed)}), "
        f"{len(seeing(old_on_n2))} of {len(old_on_n2)} on n2")
    assert_spread(old_on_n1)
    for reply in new_on_n1:
        assert reply.status == 200 and reply.body == {"id": rotated.body["id"], "data": {"n": 5}}, \
            (pid_of(reply), reply.status, reply.body, reply.debug)
        assert reply.set_cookie is None


# -- 4. workers recycled, killed, preloaded -------------------------------------------------------------------


def test_workers_recycled_by_max_requests_lose_nothing(mw_redis, gunicorn):
    node = gunicorn(workers=2, max_requests=25, node_id="n4", store=mw_redis.url, mode="sticky", backup="sync")
    # A lone sequential client tends to stay on the worker that just answered it until that one is
    # recycled; a second client (never touching a session) keeps both workers busy, so the session's
    # requests alternate between a worker and one that served it before, and recycling comes sooner.
    with background_requests(node.port, "/pid") as noise:
        replies = increments(node.browser(), 150)
    assert noise.errors == []
    switches = sum(pid_of(a) != pid_of(b) for a, b in zip(replies, replies[1:]))
    # 150 requests and the noise over 2 workers recycled every 25: many worker lives
    assert len(worker_pids(replies)) >= 4, f"workers were not recycled: {sorted(worker_pids(replies))}"
    assert_counts_up(replies)
    print(f"\n150 increments over {len(worker_pids(replies))} worker lives, {switches} worker switches, "
          f"{noise.served} /pid requests meanwhile")
    misled = [(i + 1, r.headers.get("X-Session-Debug")) for i, r in enumerate(replies)
              if "route-changed" in r.causes or r.debug.get("source") == "failover"]
    assert misled == [], f"a recycled worker took its own node's session for another node's: {misled[:5]}"


@dataclass
class Writer:
    """One client incrementing its own session's ``n`` in a loop; every attempt's outcome kept."""

    browser: Browser
    #: per attempt, in order: the acknowledged value (int) or why no answer came (str)
    outcomes: list[int | str] = field(default_factory=list)
    #: worker pid of each acknowledged attempt
    pids: list[int | None] = field(default_factory=list)

    @property
    def acked(self) -> int:
        return sum(isinstance(o, int) for o in self.outcomes)

    @property
    def failures(self) -> list[str]:
        return [o for o in self.outcomes if isinstance(o, str)]

    def attempt(self) -> None:
        try:
            reply = self.browser.get("/inc")
        except (OSError, http.client.HTTPException) as exc:  # the worker died with the request
            self.outcomes.append(f"{type(exc).__name__}: {exc}")
            return
        if reply.status == 200 and isinstance(reply.body.get("value"), int):
            self.outcomes.append(reply.body["value"])
            self.pids.append(pid_of(reply))
        else:
            self.outcomes.append(f"{reply.status} {reply.body} {reply.debug}")

    def loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.attempt()


def lost_updates(outcomes: list[int | str], final: int) -> list[str]:
    """What contradicts "no acknowledged update lost" in one writer's sequential history.

    Starting at 0, each acknowledged value must be the previous one plus 1 plus
    at most the number of unanswered attempts between them (an attempt whose
    response never came may or may not have been applied, never twice), and
    the final value the last acknowledged one plus at most the unanswered
    attempts after it.
    """
    problems, last, unanswered = [], 0, 0
    for i, outcome in enumerate(outcomes):
        if isinstance(outcome, str):
            unanswered += 1
            continue
        if not last + 1 <= outcome <= last + 1 + unanswered:
            problems.append(f"attempt {i + 1}: acknowledged {outcome} after {last} (+{unanswered} unanswered)")
        last, unanswered = outcome, 0
    if not last <= final <= last + unanswered:
        problems.append(f"final value {final} after last acknowledged {last} (+{unanswered} unanswered)")
    return problems


@pytest.mark.slow
@pytest.mark.parametrize("backup", ["sync", "async"])
def test_a_worker_sigkilled_under_load_loses_no_acknowledged_update(backup, mw_redis, gunicorn):
    node_id = f"n5{backup}"
    node = gunicorn(workers=4, node_id=node_id, store=mw_redis.url, mode="sticky", backup=backup)
    writers = [Writer(node.browser()) for _ in range(4)]
    for writer in writers:  # each creates its session before the load starts
        writer.attempt()
        assert writer.outcomes == [1], writer.outcomes
    stop = threading.Event()
    threads = [threading.Thread(target=w.loop, args=(stop,)) for w in writers]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: min(w.acked for w in writers) >= 15, 60, "15 acknowledged writes per client")
        victim = next(pid for w in writers for pid in reversed(w.pids) if pid is not None)
        before = node.worker_pids()
        node.kill_worker(victim)  # 4 clients on 4 workers: most likely in the middle of a request
        replacements = node.wait_workers(exclude={victim})
        after = [w.acked for w in writers]
        wait_until(lambda: all(w.acked >= a + 15 for w, a in zip(writers, after)), 60,
                   "15 more acknowledged writes per client after the restart")
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a client thread hangs"

    failures = [f for w in writers for f in w.failures]
    # one sync worker died: at most the one request it was serving went unanswered
    assert len(failures) <= 1, failures
    for i, writer in enumerate(writers):
        final = Browser(node.port, writer.browser.cookie).get("/read")
        assert final.status == 200, (final.status, final.body)
        problems = lost_updates(writer.outcomes, final.body["data"].get("n", 0))
        assert problems == [], (f"client {i} ({writer.acked} acknowledged, {len(writer.failures)} unanswered, "
                                f"worker {victim} killed): {problems[:6]}")
    served = {pid for w in writers for pid in w.pids if pid is not None}
    assert len(served) >= 2, f"only workers {sorted(served)} served: nothing shown"
    assert node.alive and node.browser().get("/health").status == 200
    new = replacements - before
    print(f"\nbackup={backup}: SIGKILLed worker {victim} of {sorted(before)}, replaced by {sorted(new)}; "
          f"{sum(w.acked for w in writers)} acknowledged, unanswered: {failures}; the replacement served "
          f"{sum(pid in new for w in writers for pid in w.pids)} acknowledged requests")


def test_preloaded_app_forked_into_four_workers_loses_nothing(mw_redis, gunicorn):
    node = gunicorn(workers=4, preload=True, node_id="n6", store=mw_redis.url, mode="sticky", backup="sync")
    replies = increments(node.browser(), 100)
    assert_spread(replies)
    assert_counts_up(replies)


# -- 5. the default store ---------------------------------------------------------------------------------------


def test_default_store_is_shared_by_the_workers_of_a_host(gunicorn):
    """No store, no mode, no node_id set: the product's defaults (non-sticky, embedded store)."""
    node = gunicorn(workers=4)
    assert "SESSIONSTORE_STORE" not in node.settings and "SESSIONSTORE_MODE" not in node.settings
    replies = increments(node.browser(), 100)
    assert_spread(replies)
    assert_counts_up(replies)


# -- 6. two hosts claiming one node_id ---------------------------------------------------------------------------

_COLLISION_WORDS = re.compile(r"collision|collid|duplicate|same node_id|also (?:used|claimed)|another host", re.I)
_LEVELS = re.compile(r"\b(?:WARNING|ERROR|CRITICAL)\b")


def collision_lines(node: GunicornNode, node_id: str) -> list[str]:
    """Warning/error lines of ``node``'s log (the test app's own excluded) naming a collision of ``node_id``."""
    return [line for line in node.log().splitlines()
            if node_id in line and _LEVELS.search(line) and _COLLISION_WORDS.search(line)
            and "tests.gunicorn_app" not in line]


@pytest.mark.slow
def test_two_hosts_claiming_one_node_id_are_detected(mw_redis, gunicorn, tmp_path):
    node_id = "dup7"
    lease = {"node_lease_interval": "2"}  # renewals every 2 s (default 30): a rival is seen within seconds
    first = gunicorn(workers=2, node_id=node_id, store=mw_redis.url, mode="sticky",
                     node_dir=tmp_path / "host_a", settings=lease)
    first.browser().get("/inc")  # the first host is in service
    later = gunicorn(workers=2, node_id=node_id, store=mw_redis.url, mode="sticky",
                     node_dir=tmp_path / "host_b", settings=lease)
    browser = later.browser()
    seen: dict[str, object] = {"log": [], "cause": None, "statuses": set()}

    def detected() -> bool:
        time.sleep(0.2)  # poll interval: a few requests a second are enough
        reply = browser.get("/inc")
        seen["statuses"].add(reply.status)  # type: ignore[union-attr]
        if "node-id-collision" in reply.causes:
            seen["cause"] = reply.headers.get("X-Session-Debug")
        seen["log"] = collision_lines(first, node_id) + collision_lines(later, node_id)
        return bool(seen["log"]) and seen["cause"] is not None

    try:
        wait_until(detected, 30, "the node_id collision to be logged and named in X-Session-Debug")
    except RuntimeError as exc:
        pytest.fail(f"{exc}: collision log lines {seen['log']}, debug cause seen: {seen['cause']}, "
                    f"statuses {seen['statuses']}\n{later.log_tail(15)}")
    assert later.alive and first.alive
