"""Store commands per request, counted by the servers themselves.

Drives the real middleware in-process (the WSGI app is called directly, every
response closed) against a throwaway redis-server and a 3-node memcached ring
started for the run (``benchmarks/servers.py``), and prints, per kind of
request, the store commands one request costs:

- Redis: commands the client sent, read from the server's slowlog (threshold
  0); commands a Lua script runs are not client commands, so an ``EVALSHA``
  counts once; connection set-up and housekeeping are left out (the test
  fixtures' counting, ``tests/servers/redis_fixtures.py``).
- memcached: the sum over the three nodes of the ``stats`` counters that count
  each data command once (``tests/servers/memcached_fixtures.py``).

Each request is counted on its own (the servers are read before and after
it), so the table can show the average and the distribution. Next to each
server count, in brackets, is ``store_ops`` from the request's debug record
(sessionstore's own count); a request where the two differ is flagged.
Round trips are counted on the client's sockets: a send followed by a receive
on one connection is one round trip, so a pipelined batch counts once.

Time is an injected fake clock (``SessionMiddleware(..., clock=...)``) that
advances ``--think-time`` seconds before every request, so periodic work
(the tombstone refresh on saves, the sticky backup's expiry refresh on reads)
happens as often per request as it would for a session used at that pace.

Exits 1 if a target of the contract's cost model is missed, naming it.

Usage: python benchmarks/roundtrips.py [--quick] [--requests 300]
       [--amortised-requests 3000] [--think-time 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import socket
import statistics
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from servers import BenchServers  # noqa: E402

from sessionstore import SessionMiddleware, get_session  # noqa: E402
from sessionstore.stores.memcached import _Suspects  # noqa: E402

MAX_INACTIVE = 1800
IGNORE = r"^/static/"

# -- the application ---------------------------------------------------------------


def app(environ: dict, start_response: Callable) -> list[bytes]:
    path = environ["PATH_INFO"]
    if path == "/new":  # a first request that stores something
        session = get_session(environ)
        session["user"] = "alice"
        session["cart"] = {"items": []}
        session["counter"] = 0
    elif path in ("/read", "/empty"):  # /empty: a client without a session only looks
        get_session(environ).get("user")
    elif path == "/write":
        session = get_session(environ)
        session["counter"] = session.get("counter", 0) + 1
    elif path == "/mutate":
        get_session(environ)["cart"]["items"].append(len(environ.get("HTTP_USER_AGENT", "")))
    # /untouched and /static/...: the session is never looked at
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]


# -- instruments -------------------------------------------------------------------


class FakeClock:
    """Epoch seconds that move only when told to."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class DebugRecords(logging.Handler):
    """Collects the JSON records of the ``sessionstore.debug`` logger."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(json.loads(record.getMessage()))


class RoundTrips:
    """Counts round trips on the client's sockets, on this thread, while :attr:`on`.

    A round trip is a receive that follows a send on the same socket: a
    request split over several sends, or a reply over several receives,
    counts once, and so does a pipelined batch.
    """

    _SEND = ("send", "sendall")
    _RECV = ("recv", "recv_into")

    def __init__(self) -> None:
        self._local = threading.local()
        self._saved: dict[str, Any] = {}

    def install(self) -> None:
        local = self._local
        for name in self._SEND + self._RECV:
            self._saved[name] = socket.socket.__dict__.get(name)
            original = getattr(socket.socket, name)
            sending = name in self._SEND

            def wrapper(sock, *args, _original=original, _sending=sending, **kwargs):
                if getattr(local, "on", False):
                    state = local.state
                    if _sending:
                        state[id(sock)] = "sent"
                    elif state.get(id(sock)) == "sent":
                        state[id(sock)] = "received"
                        local.trips += 1
                return _original(sock, *args, **kwargs)

            setattr(socket.socket, name, wrapper)

    def uninstall(self) -> None:
        for name, saved in self._saved.items():
            if saved is None:
                delattr(socket.socket, name)
            else:
                setattr(socket.socket, name, saved)
        self._saved.clear()

    def start(self) -> None:
        self._local.on, self._local.state, self._local.trips = True, {}, 0

    def stop(self) -> int:
        self._local.on = False
        return self._local.trips


# -- driving requests ------------------------------------------------------------------


@dataclass
class Client:
    agent: str
    cookie: str | None = None


def call(app_: Callable, path: str, client: Client) -> str:
    """One request through ``app_``; keeps the session cookie the response sets."""
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path,
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_USER_AGENT": client.agent,
        "wsgi.url_scheme": "http",
    }
    if client.cookie:
        environ["HTTP_COOKIE"] = f"session={client.cookie}"
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list, exc_info: Any = None) -> Callable:
        seen["status"], seen["headers"] = status, headers
        return lambda data: None

    body = app_(environ, start_response)
    try:
        for _chunk in body:
            pass
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
    for name, value in seen["headers"]:
        if name == "Set-Cookie" and value.startswith("session="):
            client.cookie = value.split(";", 1)[0].split("=", 1)[1] or None
    if not seen["status"].startswith("200"):
        raise RuntimeError(f"{path}: {seen['status']}")
    return seen["status"]


@dataclass
class Sample:
    commands: int
    store_ops: int
    trips: int
    tombstones: int
    detail: tuple  # Redis: command names; memcached: non-zero stat deltas


@dataclass
class Scenario:
    """What one row needs: its middlewares (named nodes), clock, and bookkeeping."""

    apps: dict[str, SessionMiddleware]
    clock: FakeClock
    tombstone_writes: int = 0
    clients: int = 0

    def client(self) -> Client:
        self.clients += 1
        return Client(agent=f"bench-client-{self.clients}")

    def close(self) -> None:
        for mw in self.apps.values():
            mw.manager.close()


@dataclass
class Row:
    name: str
    settings: dict[str, Any]
    nodes: tuple[str, ...]
    #: ``prepare(scenario) -> sample(i) -> (node, path, client)``; uncounted requests may run in both.
    prepare: Callable[[Scenario], Callable[[int], tuple[str, str, Client]]]
    #: per backend: (target, rule) or None (reported, no contract target).
    #: rules: "each" every request <= target; "each-but-tombstone" every request
    #: that wrote no tombstone <= target; "mean" the average <= target;
    #: "trips-each-but-tombstone" like each-but-tombstone, on round trips.
    redis_target: tuple[float, str] | None
    memcached_target: tuple[float, str] | None
    note: str = ""
    amortised: bool = False  # uses --amortised-requests


def _with_session(path: str, node: str = "main") -> Callable:
    def prepare(sc: Scenario) -> Callable[[int], tuple[str, str, Client]]:
        client = sc.client()
        call(sc.apps[node], "/new", client)
        return lambda i: (node, path, client)

    return prepare


def _fresh_client(path: str) -> Callable:
    def prepare(sc: Scenario) -> Callable[[int], tuple[str, str, Client]]:
        return lambda i: ("main", path, sc.client())

    return prepare


def _failover(sc: Scenario) -> Callable[[int], tuple[str, str, Client]]:
    def sample(i: int) -> tuple[str, str, Client]:
        client = sc.client()
        call(sc.apps["n1"], "/new", client)  # created on n1 (uncounted) ...
        return "n2", "/read", client  # ... its next request lands on n2

    return sample


NON_STICKY: dict[str, Any] = {}
LOCKING = {"locking": "all"}
STICKY = {"mode": "sticky", "node_id": "n1", "backup": "sync"}

ROWS = [
    Row("new session (first write)", NON_STICKY, ("main",), _fresh_client("/new"), None, None, note="tombstone"),
    Row("read-only", NON_STICKY, ("main",), _with_session("/read"), (1, "each"), (1, "each")),
    Row("modifying", NON_STICKY, ("main",), _with_session("/write"),
        (2, "each-but-tombstone"), (3, "each-but-tombstone")),
    Row("in-place mutation", NON_STICKY, ("main",), _with_session("/mutate"),
        (2, "each-but-tombstone"), (3, "each-but-tombstone")),
    Row("session untouched", NON_STICKY, ("main",), _with_session("/untouched"), (0, "each"), (0, "each")),
    Row("ignored path", NON_STICKY, ("main",), _with_session("/static/app.css"), (0, "each"), (0, "each")),
    Row("empty new session", NON_STICKY, ("main",), _fresh_client("/empty"), (0, "each"), (0, "each")),
    Row("locking=all: read-only", LOCKING, ("main",), _with_session("/read"), None, None),
    Row("locking=all: modifying", LOCKING, ("main",), _with_session("/write"),
        (2, "trips-each-but-tombstone"), None, note="trips"),
    Row("sticky: read-only on owner", STICKY, ("n1",), _with_session("/read", "n1"),
        (0.02, "mean"), (0.02, "mean"), amortised=True, note="backup-refresh"),
    Row("sticky: modifying", STICKY, ("n1",), _with_session("/write", "n1"),
        (1, "each-but-tombstone"), (1, "each-but-tombstone")),
    Row("sticky: failover load at n2", STICKY, ("n1", "n2"), _failover, None, None, note="failover"),
]


# -- measuring --------------------------------------------------------------------------


class Bench:
    def __init__(self, servers: BenchServers, think_time: float) -> None:
        self.servers = servers
        self.think_time = think_time
        self.records = DebugRecords()
        debug = logging.getLogger("sessionstore.debug")
        debug.addHandler(self.records)
        debug.setLevel(logging.INFO)
        debug.propagate = False
        self.trips = RoundTrips()
        # per process, not per request (note 5): a memcached store polls the ring's record of
        # suspect nodes at its first operation (the start-up probe) only, never in a counted request
        _Suspects.due = lambda suspects: suspects._polled == -math.inf

    def scenario(self, row: Row, backend: str) -> Scenario:
        url = self.servers.redis_url if backend == "redis" else self.servers.memcached_url
        clock = FakeClock()
        sc = Scenario({}, clock)
        for node in row.nodes:
            fields = dict(row.settings)
            if node != "main":
                fields["node_id"] = node
            mw = SessionMiddleware(
                app, store=url, secret_key="bench", debug=True, ignore_pattern=IGNORE,
                max_inactive=MAX_INACTIVE, clock=clock, **fields,
            )
            if mw.manager.feed is not None:  # its background polls are not any request's commands
                mw.manager.feed.close()
            tombstones = mw.manager.tombstones
            for method in ("alive", "destroyed"):
                original = getattr(tombstones, method)

                def counted(*args, _original=original, **kwargs):
                    sc.tombstone_writes += 1
                    return _original(*args, **kwargs)

                setattr(tombstones, method, counted)
            sc.apps[node] = mw
        return sc

    def _before(self, backend: str) -> Any:
        return self.servers.redis_mark() if backend == "redis" else self.servers.memcached_stats()

    def _after(self, backend: str) -> Any:
        return self.servers.redis_sent() if backend == "redis" else self.servers.memcached_stats()

    def run(self, row: Row, backend: str, n: int, warmup: int) -> list[Sample]:
        sc = self.scenario(row, backend)
        try:
            sample = row.prepare(sc)
            samples = []
            for i in range(warmup + n):
                sc.clock.advance(self.think_time)
                node, path, client = sample(i)
                before = self._before(backend)
                tombstones_before = sc.tombstone_writes
                records_before = len(self.records.records)
                self.trips.start()
                try:
                    call(sc.apps[node], path, client)
                finally:
                    trips = self.trips.stop()
                after = self._after(backend)
                if backend == "redis":
                    detail: tuple = tuple(after)
                else:
                    detail = tuple(sorted((k, v) for k, v in (after - before).items() if v))
                commands = len(after) if backend == "redis" else sum(v for _, v in detail)
                new_records = self.records.records[records_before:]
                if len(new_records) != 1:
                    raise RuntimeError(f"{row.name}: expected one debug record, got {len(new_records)}")
                if i >= warmup:
                    samples.append(Sample(commands, new_records[0]["store_ops"], trips,
                                          sc.tombstone_writes - tombstones_before, detail))
            return samples
        finally:
            sc.close()


# -- judging and printing -----------------------------------------------------------------


@dataclass
class Result:
    samples: list[Sample]
    target: tuple[float, str] | None
    met: bool | None = None
    why: str = ""
    mismatches: int = field(default=0)

    def __post_init__(self) -> None:
        s = self.samples
        self.mismatches = sum(1 for x in s if x.commands != x.store_ops)
        if self.target is None:
            return
        limit, rule = self.target
        if rule == "mean":
            value = self.mean("commands")
            self.met = value <= limit
            self.why = f"mean {value:.4f} > {limit}"
            return
        metric = "trips" if rule.startswith("trips") else "commands"
        pool = [x for x in s if not (rule.endswith("but-tombstone") and x.tombstones)]
        worst = max((getattr(x, metric) for x in pool), default=0)
        self.met = worst <= limit
        what = "round trips" if metric == "trips" else "commands"
        scope = " without a tombstone write" if rule.endswith("but-tombstone") else ""
        self.why = f"a request{scope} took {worst} {what} > {limit}"

    def mean(self, metric: str, pool: list[Sample] | None = None) -> float:
        pool = self.samples if pool is None else pool
        return statistics.fmean(getattr(x, metric) for x in pool) if pool else 0.0

    def distribution(self, metric: str = "commands") -> str:
        counts = Counter(getattr(x, metric) for x in self.samples)
        return " ".join(f"{value}x{count}" for value, count in sorted(counts.items()))

    def typical(self) -> str:
        """The most common command mix of a request."""
        detail, _ = Counter(x.detail for x in self.samples).most_common(1)[0]
        if not detail:
            return "-"
        if detail and isinstance(detail[0], str):
            return " ".join(detail)
        return " ".join(f"{name}={value}" for name, value in detail)

    def cell(self) -> str:
        flag = " !" if self.mismatches else ""
        return f"{self.mean('commands'):.3f} [{self.mean('store_ops'):.3f}]{flag}"


def _target_text(target: tuple[float, str] | None, backend: str) -> str:
    if target is None:
        return "-"
    limit, rule = target
    number = f"{limit:g}"
    if rule == "mean":
        return f"<={number} avg"
    if rule.startswith("trips"):
        return f"<={number} RTT"
    if backend == "memcached" and limit == 3:
        return f"<={number}"
    return number


def _met_text(result: Result) -> str:
    return "-" if result.met is None else ("yes" if result.met else "NO")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300, help="counted requests per row and store")
    parser.add_argument("--amortised-requests", type=int, default=3000,
                        help="counted requests for the sticky read-only row (amortised backup refresh)")
    parser.add_argument("--think-time", type=float, default=3.0,
                        help="seconds the fake clock advances before each request (default 3)")
    parser.add_argument("--warmup", type=int, default=2, help="uncounted requests before each row")
    parser.add_argument("--quick", action="store_true", help="small counts (smoke test): 40 / 700")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.amortised_requests = 40, 700

    started = time.monotonic()
    results: dict[str, dict[str, Result]] = {}
    with BenchServers() as servers:
        bench = Bench(servers, args.think_time)
        bench.trips.install()
        try:
            for row in ROWS:
                n = args.amortised_requests if row.amortised else args.requests
                results[row.name] = {
                    "redis": Result(bench.run(row, "redis", n, args.warmup), row.redis_target),
                    "memcached": Result(bench.run(row, "memcached", n, args.warmup), row.memcached_target),
                }
        finally:
            bench.trips.uninstall()
    elapsed = time.monotonic() - started

    print_report(results, args, elapsed)
    missed = [(name, backend, r.why) for name, per in results.items() for backend, r in per.items()
              if r.met is False]
    if missed:
        print("\nTARGETS MISSED:")
        for name, backend, why in missed:
            print(f"  {name} ({backend}): {why}")
        return 1
    print("\nall contract targets met")
    return 0


def print_report(results: dict[str, dict[str, Result]], args: argparse.Namespace, elapsed: float) -> None:
    rows = {row.name: row for row in ROWS}
    group = {"locking=all": "non-sticky, locking=all", "sticky": "sticky (node n1, backup=sync)"}
    print("Store commands per request, counted by the servers (Redis 7 slowlog: client commands, a script call "
          "once;\nmemcached 1.6: sum over the 3 nodes of the command stats). [n] = store_ops of the debug record "
          "(sessionstore's\nown count), ! = some request where the two differ. "
          f"Fake clock: +{args.think_time:g} s before each request; max_inactive {MAX_INACTIVE} s.\n")
    header = f"{'row':38} {'Redis cmds/req [ops]':>21} {'memcached cmds/req [ops]':>25}  {'target R / mc':>23}  {'met? R / mc':>11}"
    print(header)
    print("-" * len(header))
    current = None
    for name, per in results.items():
        row = rows[name]
        title = next((v for k, v in group.items() if name.startswith(k)), "non-sticky")
        if title != current:
            print(f"{title}:")
            current = title
        label = name.split(": ", 1)[1] if ": " in name and name.split(": ")[0] in group else name
        label += {"tombstone": " (1)", "trips": " (2)", "backup-refresh": " (3)", "failover": " (4)"}.get(row.note, "")
        redis, mc = per["redis"], per["memcached"]
        target = f"{_target_text(row.redis_target, 'redis')} / {_target_text(row.memcached_target, 'memcached')}"
        met = f"{_met_text(redis)} / {_met_text(mc)}"
        print(f"  {label:36} {redis.cell():>21} {mc.cell():>25}  {target:>23}  {met:>11}")

    print("\nPer row: distribution of commands per request (value x requests), round trips per request, "
          "requests that wrote a\ntombstone, and the most common command mix.")
    for name, per in results.items():
        print(f"  {name}  (n={len(per['redis'].samples)})")
        for backend, r in per.items():
            tomb = sum(1 for x in r.samples if x.tombstones)
            base = [x for x in r.samples if not x.tombstones]
            line = (f"    {backend:9} cmds {r.distribution():14} RTT {r.mean('trips'):.3f}  "
                    f"tombstone-writing requests {tomb}")
            if tomb and base:
                line += f" (others avg {r.mean('commands', base):.3f})"
            print(line)
            print(f"    {'':9} mix: {r.typical()}")
            if r.mismatches:
                print(f"    {'':9} !! store_ops differs from the server's count in {r.mismatches} requests")

    refresh = 0.25 * MAX_INACTIVE
    print(f"""
Notes
 (1) The first save of a session also writes its tombstone (<key>:t, tombstones.py), so creating a session
     costs one save more than the data itself: Redis 1 (EVALSHA) + 1 (tombstone EVALSHA); memcached writes
     both the session and the tombstone as primary + backup copy (ms x2 each). The contract sets no target
     for creation; its targets are for requests on existing sessions. Saves refresh the tombstone again
     when the last write is older than max_inactive/4 = {refresh:g} s; with +{args.think_time:g} s per request that
     is one save in {refresh / args.think_time:.0f}. The modifying rows' averages include these refreshes;
     "met?" judges every request that wrote no tombstone (listed above as "others").
 (2) With locking=all a modifying request is lock+load (one script) and save+unlock (one script) on Redis:
     2 commands, 2 round trips. memcached cannot run scripts or pipeline across nodes: add lock, gats,
     ms primary, ms backup, gets lock, md lock, each its own round trip. Read-only requests with
     locking=all release the lock with one more command (no contract target).
 (3) The backup is refreshed (touched) only when it would lapse before the local copy, i.e. once per
     max_inactive/4 = {refresh:g} s of a session's use; per request that is
     (commands per touch) x think time / {refresh:g} s. At +{args.think_time:g} s per request: 1 touch per
     {refresh / args.think_time:.0f} requests. The average stays <= 0.02 while a session's requests come on average at
     most {0.02 * refresh:.0f} s apart with a 1-command touch (Redis), {0.02 * refresh / 2:.1f} s with a 2-command touch (memcached
     touches the primary and the backup copy); a session used less often than once per {refresh:g} s pays the
     touch on every request.
 (4) A request carrying n1's route at n2: load the backup (1), store it under a new id with n2's route
     (1 save), delete the old key, and leave a "replaced" tombstone for the old id. Whether the new id
     also gets an "alive" tombstone shows in the mix above (it depends on the tombstone stamp that
     travels with the data). No contract target.
 (5) Besides its requests, a process using the memcached store reads the ring's record of suspect nodes
     (nodes some client saw fail: 2 gets) once per suspect_poll seconds (1 s by default) while it is in use.
     That is per process, not per request, and left out here (each store polls once, at start-up).
 Redis scripts were loaded by the warm-up requests; on a fresh server (or after a failover) the first
 call of each script also costs a NOSCRIPT reply and a SCRIPT LOAD (sessionstore counts it once).
 Counted requests: {args.requests} per row and store ({args.amortised_requests} for the sticky read-only row),
 after {args.warmup} warm-up requests; run time {elapsed:.1f} s.""")


if __name__ == "__main__":
    sys.exit(main())
