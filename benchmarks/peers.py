"""sessionstore against Flask-Session 0.8 and Beaker 1.14, on the same servers and the same app.

Every contender serves the same Flask app and workload (``benchmarks/apps.py``)
against the same throwaway redis-server and 3-node memcached ring, started on
free loopback ports for the run (``benchmarks/servers.py``):

- sessionstore non-sticky; sessionstore sticky (``node_id=n1``, ``backup=sync``);
- Flask-Session 0.8 with its defaults, and with ``SESSION_REFRESH_EACH_REQUEST=False``
  (its cheapest setting);
- Beaker 1.14 (``SessionMiddleware``, ``ext:redis`` / ``ext:memcached``).

Requests: read-only (one small attribute of a ~2 KB session), modifying
(increments a counter), in-place mutation (appends to a nested list without
telling the session layer) and untouched (never uses the session).

Tables
 1. Store commands per request, counted by the servers (Redis: client commands
    from the slowlog, a script call once; memcached: the nodes' command stats,
    summed), per contender x request x store; the final counter and list are read
    back to show which contenders lose in-place mutations; background commands
    (sticky's invalidation-feed polling on memcached) are measured while idle and
    reported apart. Target: sessionstore fewer than every peer on every row.
 2. Microseconds per request in-process (the WSGI app called directly), median of
    rounds, on Redis; ratios sessionstore / peer.
 3. Requests/s of gunicorn (``--workers`` processes) serving each contender on Redis,
    driven by ``wrk`` on loopback with read-only requests carrying session cookies
    (a Lua script cycles through sessions created before the run). Target:
    sessionstore / Flask-Session (its defaults) >= 1.5; the other ratios are
    printed, not judged. Two baselines run in the same rounds: bare Flask, and
    Flask + one ``GETEX`` per request (the floor of any layer that reads its
    store on every request, as non-sticky mode does).
 4. Scaling and memory: read-only request on a 2 KB vs a 200 KB session (target
    <= 1.5 in-process on the memory store); sticky local cache bytes per session
    vs the serialized size (store accounting, tracemalloc, RSS); Redis ``MEMORY
    USAGE`` per session vs payload.

Prints every table, the ratios, and MET / MISSED per target. Exits 0 unless the
harness itself fails: it is a report.

Usage: python benchmarks/peers.py [--quick] [--duration 15] [--only commands,timing,throughput,scaling]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import urllib.error
import urllib.request
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from werkzeug.test import EnvironBuilder  # noqa: E402

from apps import CONTENDERS, LABELS, PEERS, SESSIONSTORE, cookie_name, create_app, filler  # noqa: E402
from servers import BenchServers  # noqa: E402
from tests.servers.process import free_port, require_binary, wait_for_port  # noqa: E402
from tests.servers.redis_fixtures import redis_client  # noqa: E402

KINDS = ("read", "write", "mutate", "untouched")
KIND_LABELS = {"read": "read-only", "write": "modifying", "mutate": "in-place mutation", "untouched": "untouched"}
SHORT = {
    "sessionstore": "ss non-sticky",
    "sessionstore-sticky": "ss sticky",
    "flask-session": "Flask-Session",
    "flask-session-norefresh": "FS no-refresh",
    "beaker": "Beaker",
    "bare": "bare Flask",
    "one-getex": "one GETEX",
    "sessionstore-wsgi": "ss WSGI",
}
THROUGHPUT_TARGET = 1.5
#: Table 3's baselines: no session layer at all, and one store read per request and nothing else.
BASELINES = ("bare", "one-getex")
SCALING_TARGET = 1.5


# -- calling a WSGI app in-process ---------------------------------------------------------


class Caller:
    """Calls a WSGI app with a prebuilt environ per path (same cost for every contender)."""

    def __init__(self) -> None:
        self._base: dict[str, dict] = {}
        self.status = ""
        self.headers: list = []

    def environ(self, path: str, cookie: str | None) -> dict:
        base = self._base.get(path)
        if base is None:
            base = self._base[path] = EnvironBuilder(path=path, base_url="http://localhost/").get_environ()
            base["REMOTE_ADDR"] = "127.0.0.1"
        env = base.copy()
        if cookie:
            env["HTTP_COOKIE"] = cookie
        return env

    def _start_response(self, status: str, headers: list, exc_info: Any = None) -> Callable:
        self.status, self.headers = status, headers
        return _write

    def __call__(self, app: Any, path: str, cookie: str | None) -> bytes:
        body = app(self.environ(path, cookie), self._start_response)
        try:
            data = b"".join(body)
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()
        return data

    def checked(self, app: Any, path: str, cookie: str | None) -> bytes:
        data = self(app, path, cookie)
        if not self.status.startswith("200"):
            raise RuntimeError(f"{path}: {self.status}: {data[:300]!r}")
        return data

    def set_cookie(self, name: str) -> str | None:
        """``name=value`` of the ``Set-Cookie`` for ``name`` in the last response."""
        for key, value in self.headers:
            value = value.strip()  # Beaker's header value starts with a space
            if key.lower() == "set-cookie" and value.startswith(name + "="):
                return value.split(";", 1)[0]
        return None


def _write(data: bytes) -> None:
    return None


def new_session(call: Caller, app: Any, contender: str, kb: float = 2) -> str:
    """Create a session through ``/new``; its ``Cookie`` header value."""
    call.checked(app, f"/new?kb={kb:g}", None)
    cookie = call.set_cookie(cookie_name(contender))
    if not cookie:
        raise RuntimeError(f"{contender}: /new set no session cookie ({call.headers})")
    return cookie


def read_values(call: Caller, app: Any, cookie: str) -> dict:
    return json.loads(call.checked(app, "/value", cookie))


@contextmanager
def slowlog_off(servers: BenchServers) -> Iterator[None]:
    """Stop Redis logging every command (it costs the server time per command) while timing."""
    assert servers.redis is not None
    servers.redis_sent()  # consume what the log holds, so counting resumes cleanly afterwards
    with redis_client(servers.redis.port) as client:
        client.config_set("slowlog-log-slower-than", -1)
    try:
        yield
    finally:
        with redis_client(servers.redis.port) as client:
            client.config_set("slowlog-log-slower-than", 0)
            client.slowlog_reset()
        servers.redis_sent()


def _build(contender: str, store: str, servers: BenchServers, **extra: Any) -> Any:
    url = {"redis": servers.redis_url, "memcached": servers.memcached_url, "memory": "memory://"}[store]
    if store != "memory":
        return create_app(contender, store, url, **extra)
    log = logging.getLogger("sessionstore")
    level = log.level
    log.setLevel(logging.ERROR)  # the start-up warning that memory:// is per process is expected here
    try:
        return create_app(contender, store, url, **extra)
    finally:
        log.setLevel(level)


def _close(app: Any) -> None:
    manager = getattr(app, "bench_manager", None)
    if manager is not None:
        manager.close()


# -- table 1: store commands per request ------------------------------------------------------------


@dataclass
class Count:
    per_request: float
    mix: str


@dataclass
class CommandResult:
    counts: dict[tuple[str, str, str], Count] = field(default_factory=dict)  # (store, contender, kind)
    integrity: dict[tuple[str, str], dict] = field(default_factory=dict)  # (store, contender) -> values
    background: dict[tuple[str, str], Count] = field(default_factory=dict)  # commands per second while idle
    n: int = 0
    idle: float = 0.0


def _mix_redis(names: list[str], n: int) -> str:
    counts = Counter(names)
    return " ".join(f"{name}" + (f"x{c / n:g}" if c != n else "") for name, c in sorted(counts.items())) or "-"


def _mix_memcached(delta: Counter, n: int) -> str:
    return " ".join(f"{name}={v / n:g}" for name, v in sorted(delta.items()) if v) or "-"


def _count_idle(servers: BenchServers, store: str, seconds: float) -> Count:
    """Commands the servers receive per second while no request runs (background threads)."""
    if store == "redis":
        servers.redis_mark()
    else:
        before = servers.memcached_stats()
    time.sleep(seconds)
    if store == "redis":
        names = servers.redis_sent()
        return Count(len(names) / seconds, _mix_redis(names, seconds))
    delta = servers.memcached_stats() - before
    return Count(sum(delta.values()) / seconds, _mix_memcached(delta, seconds))


def _stop_background(app: Any) -> None:
    """Stop sessionstore's background store traffic (the sticky invalidation-feed listener), if any.

    Its polling (memcached: a ``get`` every 0.25 s per node) does not belong to any request; it is
    measured on its own (:func:`_count_idle`) and would otherwise land at random in a counted interval.
    """
    manager = getattr(app, "bench_manager", None)
    feed = getattr(manager, "feed", None)
    close = getattr(feed, "close", None)
    if close is not None:
        close()


def measure_commands(servers: BenchServers, n: int, warmup: int, idle: float) -> CommandResult:
    result = CommandResult(n=n, idle=idle)
    call = Caller()
    for store in ("redis", "memcached"):
        for contender in CONTENDERS:
            app = _build(contender, store, servers)
            try:
                cookie = new_session(call, app, contender)
                done = Counter()
                for _ in range(warmup):  # loads scripts, opens connections
                    for kind in KINDS:
                        call.checked(app, "/" + kind, cookie)
                        done[kind] += 1
                result.background[store, contender] = _count_idle(servers, store, idle)
                _stop_background(app)
                for kind in KINDS:
                    if store == "redis":
                        servers.redis_mark()
                    else:
                        before = servers.memcached_stats()
                    for _ in range(n):
                        call.checked(app, "/" + kind, cookie)
                    done[kind] += n
                    if store == "redis":
                        names = servers.redis_sent()
                        result.counts[store, contender, kind] = Count(len(names) / n, _mix_redis(names, n))
                    else:
                        delta = servers.memcached_stats() - before
                        result.counts[store, contender, kind] = Count(sum(delta.values()) / n, _mix_memcached(delta, n))
                values = read_values(call, app, cookie)
                result.integrity[store, contender] = {
                    "counter": values["counter"], "counter_expected": done["write"],
                    "last_item": values["last_item"], "last_item_expected": done["mutate"],
                }
            finally:
                _close(app)
    return result


def _verdict(ss: float, peer: float) -> str:
    """'fewer' | 'tie-at-0' | 'equal' | 'more' (sessionstore vs a peer, commands per request)."""
    eps = 1e-9
    if ss < peer - eps:
        return "fewer"
    if abs(ss - peer) <= eps:
        return "tie-at-0" if ss <= eps else "equal"
    return "more"


def _lost(res: CommandResult) -> set[tuple[str, str, str]]:
    """(store, contender, kind) whose changes did not survive (read back short of expected)."""
    lost = set()
    for (store, contender), v in res.integrity.items():
        if (v["counter"] or 0) != v["counter_expected"]:
            lost.add((store, contender, "write"))
        if (v["last_item"] or 0) != v["last_item_expected"]:
            lost.add((store, contender, "mutate"))
    return lost


def print_commands(res: CommandResult, misses: list[str], mets: list[str]) -> None:
    lost = _lost(res)
    print(f"\n=== Table 1: store commands per request, counted by the servers ({res.n} requests per cell) ===")
    print("Redis: client commands from the slowlog (a script call once, connection set-up not counted);")
    print("memcached: sum over the 3 ring nodes of the command stats (get, set, touch/gat, delete, ...).")
    width = 14
    header = f"{'store':10} {'request':18} " + " ".join(f"{SHORT[c]:>{width}}" for c in CONTENDERS)
    print(header)
    print("-" * len(header))
    for store in ("redis", "memcached"):
        for kind in KINDS:
            cells = " ".join(f"{res.counts[store, c, kind].per_request:>{width - 1}.3f}"
                             + ("*" if (store, c, kind) in lost else " ") for c in CONTENDERS)
            print(f"{store:10} {KIND_LABELS[kind]:18} {cells}")
    print("* = the change did not survive: it was lost (see the integrity table below).")
    print("Real clock: sticky's backup expiry refresh (once per max_inactive/4 of a session's use) does not fall in a")
    print("run this short; roundtrips.py measures it amortised with a fake clock. Flask-Session and Beaker refresh")
    print("the expiry by rewriting the whole session on every request that loads it (Flask-Session: every request")
    print("with a cookie, SESSION_REFRESH_EACH_REQUEST=True; Beaker: save_accessed_time=True).")
    print("\nCommand mix per request (name x per-request count when not 1):")
    for store in ("redis", "memcached"):
        for contender in CONTENDERS:
            mixes = "; ".join(f"{KIND_LABELS[k]}: {res.counts[store, contender, k].mix}" for k in KINDS)
            print(f"  {store:9} {SHORT[contender]:14} {mixes}")

    print(f"\nBackground store commands while idle (no request running; {res.idle:g} s per contender and store),")
    print("commands per second per node. They belong to no request: sessionstore's sticky invalidation-feed")
    print("listener (memcached: polled; Redis: pub/sub, no command while idle) is stopped after this measurement")
    print("so that its polls do not land at random in the per-request counts above.")
    for store in ("redis", "memcached"):
        cells = "  ".join(f"{SHORT[c]} {res.background[store, c].per_request:.1f}/s"
                          + (f" ({res.background[store, c].mix})" if res.background[store, c].per_request else "")
                          for c in CONTENDERS)
        print(f"  {store:9} {cells}")

    print("\nData integrity after the run (values read back through each contender):")
    print(f"  {'store':9} {'contender':14} {'counter (modifying)':>22} {'in-place mutations':>22}  verdict")
    for (store, contender), v in res.integrity.items():
        counter = f"{v['counter']}/{v['counter_expected']}"
        # /mutate appends last+1 and keeps the last MAX_ITEMS: the last item counts kept appends
        kept = f"{v['last_item']}/{v['last_item_expected']}"
        lost_writes = v["counter_expected"] - (v["counter"] or 0)
        lost_mut = v["last_item_expected"] - (v["last_item"] or 0)
        verdict = []
        verdict.append("counter ok" if lost_writes == 0 else f"LOST {lost_writes} increments")
        verdict.append("in-place kept" if lost_mut == 0 else f"in-place LOST ({lost_mut} of {v['last_item_expected']})")
        print(f"  {store:9} {SHORT[contender]:14} {counter:>22} {kept:>22}  {', '.join(verdict)}")

    print("\nRatios sessionstore / peer (commands per request; 0/0 = both send nothing; * = the peer lost the")
    print("change, so its count is shown but not judged; a tie at 0 counts as met: nothing is below 0):")
    peers_header = " ".join(f"{SHORT[p]:>14}" for p in PEERS)
    print(f"  {'store':9} {'request':18} {'sessionstore':14} {peers_header}   target: fewer than every peer")
    for store in ("redis", "memcached"):
        for kind in KINDS:
            for ss in SESSIONSTORE:
                mine = res.counts[store, ss, kind].per_request
                cells, bad, skipped = [], [], []
                for peer in PEERS:
                    theirs = res.counts[store, peer, kind].per_request
                    mark = "*" if (store, peer, kind) in lost else " "
                    ratio = "0/0" if mine == theirs == 0 else (f"{mine / theirs:.2f}" if theirs else "inf")
                    cells.append(f"{ratio:>13}{mark}")
                    if (store, peer, kind) in lost:  # fewer commands for losing the write: not comparable
                        skipped.append(LABELS[peer])
                        continue
                    verdict = _verdict(mine, theirs)
                    if verdict in ("equal", "more"):
                        bad.append(f"{verdict} than {LABELS[peer]} ({mine:.3f} vs {theirs:.3f})"
                                   if verdict == "more" else f"equal to {LABELS[peer]} ({mine:.3f})")
                if (store, ss, kind) in lost:
                    bad.append("sessionstore itself lost the change")
                status = "met" if not bad else "MISSED"
                print(f"  {store:9} {KIND_LABELS[kind]:18} {SHORT[ss]:14} {' '.join(cells)}   {status}")
                line = f"table 1 [{store}, {KIND_LABELS[kind]}] {LABELS[ss]}"
                if skipped:
                    line += f" (not judged against {', '.join(skipped)}: lost the change)"
                if bad:
                    misses.append(f"{line}: not fewer commands: " + "; ".join(bad))
                else:
                    ties = [SHORT[p] for p in PEERS if _verdict(mine, res.counts[store, p, kind].per_request) == "tie-at-0"]
                    mets.append(line + (f" (0 commands; ties at the floor with {', '.join(ties)})" if ties else ""))
    print("  Non-sticky mode reads the store on every request that touches the session: its floor is one")
    print("  command per read (the load, which also slides the expiry) and two per write (load, conditional")
    print("  write), plus the backup copy on memcached. Only a local copy (sticky mode) goes below a peer that")
    print("  sends the same one or two.")


# -- table 2: microseconds per request, in-process --------------------------------------------------------


def _time_batch(call: Caller, app: Any, path: str, cookie: str | None, n: int) -> tuple[float, float]:
    """(wall, CPU of this process) microseconds per request over ``n`` requests."""
    cpu = time.process_time()
    start = time.perf_counter()
    for _ in range(n):
        call(app, path, cookie)
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    if not call.status.startswith("200"):
        raise RuntimeError(f"{path}: {call.status}")
    return elapsed / n * 1e6, cpu / n * 1e6


Timing = dict[tuple[str, str], tuple[float, float]]  # (contender, kind) -> median (wall us, CPU us)


def measure_timing(servers: BenchServers, rounds: int, n: int,
                   contenders: tuple[str, ...] = CONTENDERS + ("bare",)) -> Timing:
    call = Caller()
    apps, cookies = {}, {}
    try:
        for contender in contenders:
            apps[contender] = _build(contender, "redis", servers)
            cookies[contender] = new_session(call, apps[contender], contender) if contender != "bare" else None
        samples: dict[tuple[str, str], list[tuple[float, float]]] = {(c, k): [] for c in contenders for k in KINDS}
        with slowlog_off(servers):
            for contender in contenders:  # warm up
                for kind in KINDS:
                    _time_batch(call, apps[contender], "/" + kind, cookies[contender], max(20, n // 10))
            for r in range(rounds):
                order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
                for contender in order:
                    for kind in KINDS:
                        samples[contender, kind].append(
                            _time_batch(call, apps[contender], "/" + kind, cookies[contender], n))
    finally:
        for app in apps.values():
            _close(app)
    return {key: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
            for key, v in samples.items()}


def print_timing(times: Timing, rounds: int, n: int) -> None:
    print(f"\n=== Table 2: microseconds per request, in-process, Redis (median of {rounds} rounds x {n} requests) ===")
    print("The WSGI app is called directly (no HTTP server); rounds interleave the contenders; Redis slowlog off.")
    contenders = [c for c in CONTENDERS + ("bare",) if (c, "read") in times]
    peers = [p for p in PEERS if (p, "read") in times]
    width = 14
    for index, title in ((0, "Wall-clock us per request (includes waiting for Redis):"),
                         (1, "CPU us per request of this process (time.process_time; excludes Redis and waiting,"
                             " less sensitive to other load):")):
        print(f"\n{title}")
        header = f"  {'request':18} " + " ".join(f"{SHORT[c]:>{width}}" for c in contenders)
        print(header)
        for kind in KINDS:
            print(f"  {KIND_LABELS[kind]:18} " + " ".join(f"{times[c, kind][index]:>{width}.1f}" for c in contenders))
        print("  ratios sessionstore / peer (< 1 = sessionstore faster):")
        print(f"  {'request':18} {'sessionstore':14} " + " ".join(f"{SHORT[p]:>14}" for p in peers))
        for kind in KINDS:
            for ss in SESSIONSTORE:
                if (ss, kind) not in times:
                    continue
                cells = " ".join(f"{times[ss, kind][index] / times[p, kind][index]:>14.2f}" for p in peers)
                print(f"  {KIND_LABELS[kind]:18} {SHORT[ss]:14} {cells}")
    if ("bare", "read") in times:
        print("\nWall-clock us per request added by the session layer (over the bare Flask app):")
        for kind in KINDS:
            added = " ".join(f"{SHORT[c]}={times[c, kind][0] - times['bare', kind][0]:.1f}"
                             for c in contenders if c != "bare")
            print(f"  {KIND_LABELS[kind]:18} {added}")


# -- table 3: throughput of gunicorn + wrk -----------------------------------------------------------------

WRK_SCRIPT = r"""
-- Cycles through the session cookies in the file named by the first script argument.
local cookies = {}
local i = 0

function init(args)
  for line in io.lines(args[1]) do
    if #line > 0 then cookies[#cookies + 1] = line end
  end
  if #cookies == 0 then error("no cookies in " .. args[1]) end
  i = math.random(#cookies) - 1
end

function request()
  i = i % #cookies + 1
  return wrk.format("GET", wrk.path, {["Cookie"] = cookies[i]})
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d, "p50_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


class Gunicorn:
    """``gunicorn 'apps:app_from_env()'`` on a free port; stopped by pid (master, then each worker)."""

    def __init__(self, contender: str, servers: BenchServers, workers: int, worker_class: str, workdir: Path,
                 env: dict[str, str] | None = None, extra_args: tuple[str, ...] = ()) -> None:
        """``env``: more environment (``BENCH_SETTINGS``, ``BENCH_MAX_INACTIVE``); ``extra_args``: gunicorn options."""
        self.contender = contender
        self.port = free_port()
        # the caller's PYTHONPATH stays (peers installed with pip --target outside the virtualenv)
        path = [str(ROOT), str(HERE)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        self.env = {"BENCH_CONTENDER": contender, "BENCH_STORE": "redis", "BENCH_URL": servers.redis_url,
                    **(env or {})}
        env = dict(os.environ, **self.env, PYTHONPATH=os.pathsep.join(path))
        gunicorn = Path(sys.executable).with_name("gunicorn")
        argv = [str(gunicorn) if gunicorn.exists() else require_binary("gunicorn"),
                "--workers", str(workers), "--worker-class", worker_class,
                "--bind", f"127.0.0.1:{self.port}", "--chdir", str(HERE),
                "--log-level", "warning", "--backlog", "2048", *extra_args, "apps:app_from_env()"]
        #: the command line (for printing what made a table)
        self.argv = argv
        self.log = open(workdir / f"gunicorn-{contender}.log", "wb")
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=HERE)
        self.workers: set[int] = set()
        try:
            wait_for_port(self.port, timeout=30)
            self._wait_workers(workers)
        except BaseException as exc:
            self.stop()
            log = Path(self.log.name).read_text(errors="replace")[-3000:]
            raise RuntimeError(f"gunicorn for {contender} failed to start: {exc}\n{log}") from exc

    def _children(self) -> set[int]:
        try:
            text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return set()
        return {int(p) for p in text.split()}

    def _wait_workers(self, count: int) -> None:
        deadline = time.monotonic() + 30
        while True:
            self.workers |= self._children()
            if len(self._children()) >= count:
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn for {self.contender} did not start {count} workers")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        """User + system CPU seconds used so far by the master and its current workers."""
        self.workers |= self._children()
        return sum(_cpu_seconds(pid) for pid in {self.proc.pid, *self.workers})

    def stop(self) -> list[int]:
        """SIGTERM the master, SIGKILL what lingers (by pid); the pids still alive (should be none)."""
        self.workers |= self._children()
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in self.workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in self.workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
        self.log.close()
        return [pid for pid in [self.proc.pid, *self.workers] if _alive(pid)]


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # fields 14 and 15 of stat(5)


def _redis_cpu(client: Any) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _http(url: str, cookie: str | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, headers={"Cookie": cookie} if cookie else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read()


def _http_cookie(headers_list: Any, name: str) -> str | None:
    for value in headers_list or []:
        value = value.strip()
        if value.startswith(name + "="):
            return value.split(";", 1)[0]
    return None


def _http_new_session(base: str, contender: str) -> str:
    req = urllib.request.Request(base + "/new?kb=2")
    with urllib.request.urlopen(req, timeout=10) as resp:
        body = resp.read()
        cookie = _http_cookie(resp.headers.get_all("Set-Cookie"), cookie_name(contender))
    if resp.status != 200 or not cookie:
        raise RuntimeError(f"{contender}: /new over HTTP: {resp.status} {body[:200]!r}, cookie {cookie!r}")
    return cookie


def _check_reads(base: str, cookies: list[str], contender: str) -> str:
    """'' if every session reads back as created over HTTP, else what went wrong."""
    for cookie in cookies:
        status, _, body = _http(base + "/read", cookie)
        if status != 200 or body != b"alice":
            return f"/read gave {status} {body[:80]!r} for a session created before the run"
    return ""


def wrk_argv(url: str, script: Path, cookies_file: Path, threads: int, connections: int, seconds: float) -> list[str]:
    """The ``wrk`` command line of one run."""
    return [require_binary("wrk"), "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(seconds))}s",
            "--timeout", "5s", "-s", str(script), url, "--", str(cookies_file)]


def _run_wrk(url: str, script: Path, cookies_file: Path, threads: int, connections: int, seconds: float) -> dict:
    argv = wrk_argv(url, script, cookies_file, threads, connections, seconds)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON "):])
    raise RuntimeError(f"wrk gave no summary (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")


@dataclass
class Throughput:
    rps: float  # median over the repeats
    rps_runs: list[float]
    requests: int  # summed over the repeats
    errors: int
    p50_ms: float  # of the median run
    p99_ms: float
    redis_per_request: float
    worker_cpu_us: float  # gunicorn CPU (master + workers) per request, over all runs
    redis_cpu_us: float  # redis-server CPU per request, over all runs
    check: str


def measure_throughput(servers: BenchServers, contenders: tuple[str, ...], seconds: float, warmup: float,
                       repeat: int, workers: int, worker_class: str, threads: int, connections: int,
                       sessions: int, env: dict[str, str] | None = None,
                       commands: list[str] | None = None) -> dict[str, Throughput]:
    """Every contender's gunicorn up at once; ``repeat`` rounds of one wrk run each, order rotated.

    ``env``: more environment for every gunicorn (see :class:`Gunicorn`); ``commands``, if given,
    receives the gunicorn and wrk command lines used.
    """
    workdir = Path(tempfile.mkdtemp(prefix="sessionstore-peers-"))
    script = workdir / "cookies.lua"
    script.write_text(WRK_SCRIPT)
    assert servers.redis is not None
    running: dict[str, Gunicorn] = {}
    files: dict[str, Path] = {}
    problems: dict[str, str] = {}
    runs: dict[str, list[tuple[dict, int]]] = {c: [] for c in contenders}
    cpu: dict[str, list[float]] = {c: [0.0, 0.0] for c in contenders}  # worker, redis seconds
    try:
        for contender in contenders:
            running[contender] = server = Gunicorn(contender, servers, workers, worker_class, workdir, env=env)
            if commands is not None:
                commands.append(" ".join(f"{k}={shlex.quote(v)}" for k, v in server.env.items() if k != "BENCH_URL")
                                + " " + shlex.join(server.argv))
            if contender == "bare":
                cookies = ["x=1"]
            else:
                cookies = [_http_new_session(server.url, contender) for _ in range(sessions)]
            files[contender] = workdir / f"cookies-{contender}.txt"
            files[contender].write_text("\n".join(cookies) + "\n")
            problems[contender] = "" if contender == "bare" else _check_reads(server.url, cookies, contender)
        if commands is not None:
            commands.append(shlex.join(wrk_argv("http://127.0.0.1:PORT/read", script, workdir / "cookies-CONTENDER.txt",
                                              threads, connections, seconds)))
        with slowlog_off(servers), redis_client(servers.redis.port) as client:
            for contender in contenders:  # warm up (connections, scripts, each worker's first request)
                _run_wrk(running[contender].url + "/read", script, files[contender], threads, connections, warmup)
            for r in range(repeat):
                order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
                for contender in order:
                    before = client.info("stats")["total_commands_processed"]
                    worker_before, redis_before = running[contender].cpu_seconds(), _redis_cpu(client)
                    summary = _run_wrk(running[contender].url + "/read", script, files[contender],
                                       threads, connections, seconds)
                    cpu[contender][0] += running[contender].cpu_seconds() - worker_before
                    cpu[contender][1] += _redis_cpu(client) - redis_before
                    executed = client.info("stats")["total_commands_processed"] - before - 2
                    runs[contender].append((summary, executed))
        for contender in contenders:
            if not problems[contender] and contender != "bare":
                cookies = files[contender].read_text().split()
                problems[contender] = _check_reads(running[contender].url, cookies[:3], contender)
    finally:
        lingering = {c: server.stop() for c, server in running.items()}
        shutil.rmtree(workdir, ignore_errors=True)
    alive = {c: pids for c, pids in lingering.items() if pids}
    if alive:
        raise RuntimeError(f"gunicorn pids still alive after stop: {alive}")
    results: dict[str, Throughput] = {}
    for contender, done in runs.items():
        rates = [s["requests"] / (s["duration_us"] / 1e6) for s, _ in done]
        median_run = sorted(zip(rates, range(len(done))))[len(done) // 2][1]
        summary = done[median_run][0]
        requests = sum(s["requests"] for s, _ in done)
        errors = sum(s[k] for s, _ in done for k in ("connect", "read", "write", "status", "timeout"))
        results[contender] = Throughput(
            rps=statistics.median(rates), rps_runs=rates, requests=requests, errors=errors,
            p50_ms=summary["p50_us"] / 1000, p99_ms=summary["p99_us"] / 1000,
            redis_per_request=sum(e for _, e in done) / requests if requests else 0.0,
            worker_cpu_us=cpu[contender][0] / requests * 1e6 if requests else 0.0,
            redis_cpu_us=cpu[contender][1] / requests * 1e6 if requests else 0.0,
            check=problems[contender] or "ok")
    return results


def print_throughput(res: dict[str, Throughput], seconds: float, repeat: int, workers: int, worker_class: str,
                     threads: int, connections: int, sessions: int,
                     misses: list[str], mets: list[str]) -> None:
    print(f"\n=== Table 3: throughput, gunicorn {workers} x {worker_class} workers per contender, Redis; wrk "
          f"-t{threads} -c{connections}, {repeat} x {seconds:g} s per contender (rounds interleaved), "
          f"read-only requests cycling over {sessions} sessions ===")
    print(f"  {'contender':32} {'req/s median':>12} {'runs req/s':>20} {'errors':>6} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'Redis cmd/req':>13} {'gunicorn CPU us/req':>19} {'Redis CPU us/req':>16}  read-back")
    for contender, t in res.items():
        runs = " ".join(f"{r:.0f}" for r in t.rps_runs)
        print(f"  {LABELS[contender]:32} {t.rps:>12.0f} {runs:>20} {t.errors:>6} {t.p50_ms:>7.2f} "
              f"{t.p99_ms:>7.2f} {t.redis_per_request:>13.2f} {t.worker_cpu_us:>19.0f} {t.redis_cpu_us:>16.1f}  {t.check}")
    print("  Redis cmd/req: INFO total_commands_processed over the runs / requests (it also counts what a script")
    print("  runs, unlike table 1). CPU us/req: user+system CPU of the gunicorn master and workers (/proc) and of")
    print("  redis-server (INFO cpu) over the runs / requests: less sensitive to other load than requests/s.")
    print("  read-back: sessions created before the runs read back over HTTP after them.")
    if "sessionstore-sticky" in res and workers > 1:
        print(f"  Sticky: the {workers} workers share node_id n1 and its node copy (one LMDB environment on tmpfs):")
        print("  a session created through one worker is read by every worker without a store command.")
    print(f"\nRatios sessionstore / peer (median requests/s; target vs Flask-Session >= {THROUGHPUT_TARGET:g}):")
    for ss in SESSIONSTORE:
        if ss not in res:
            continue
        parts = []
        for peer in PEERS + BASELINES:
            if peer in res:
                parts.append(f"/{SHORT[peer]} {res[ss].rps / res[peer].rps:.2f}")
        print(f"  {LABELS[ss]:32} " + "  ".join(parts))
        cpu_parts = [f"/{SHORT[p]} {res[p].worker_cpu_us / res[ss].worker_cpu_us:.2f}"
                     for p in PEERS + BASELINES if p in res and res[ss].worker_cpu_us]
        print(f"  {'  (CPU-based: peer CPU / ours)':32} " + "  ".join(cpu_parts))
        if "flask-session" in res:  # the target is against Flask-Session as it ships (its defaults)
            ratio = res[ss].rps / res["flask-session"].rps
            line = (f"table 3 {LABELS[ss]} / {LABELS['flask-session']} requests/s = {ratio:.2f} "
                    f"(target >= {THROUGHPUT_TARGET:g})")
            (mets if ratio >= THROUGHPUT_TARGET else misses).append(line)
        if res[ss].errors or res[ss].check != "ok":
            misses.append(f"table 3 {LABELS[ss]}: {res[ss].errors} errors, read-back: {res[ss].check}")
    if "one-getex" in res and "flask-session" in res:
        floor = res["one-getex"].rps / res["flask-session"].rps
        print(f"  Floor: {LABELS['one-getex']} / Flask-Session = {floor:.2f} (CPU-based "
              f"{res['flask-session'].worker_cpu_us / res['one-getex'].worker_cpu_us:.2f}). A session layer that reads")
        print("  its store on every request (non-sticky mode) cannot beat one GETEX with no session logic at all.")
        if "sessionstore" in res:
            print(f"  sessionstore non-sticky / {LABELS['one-getex']} = {res['sessionstore'].rps / res['one-getex'].rps:.2f}")


# -- table 4: scaling and memory -----------------------------------------------------------------------


Scaling = dict[tuple[str, str], dict[int, tuple[float, float]]]  # (contender, store) -> kb -> (wall, CPU) us


def measure_scaling_time(servers: BenchServers, rounds: int, n: int) -> Scaling:
    """(wall, CPU) us per read-only request on a 2 KB and a 200 KB session, per (contender, store)."""
    setups = [("sessionstore", "memory"), ("sessionstore-sticky", "memory"), ("sessionstore-wsgi", "memory"),
              ("sessionstore", "redis"), ("sessionstore-sticky", "redis"), ("sessionstore-wsgi", "redis"),
              ("flask-session", "redis"), ("beaker", "redis")]
    call = Caller()
    out: Scaling = {}
    with slowlog_off(servers):
        for contender, store in setups:
            app = _build(contender, store, servers)
            try:
                cookies = {kb: new_session(call, app, contender, kb) for kb in (2, 200)}
                for kb, cookie in cookies.items():
                    _time_batch(call, app, "/read", cookie, max(10, n // 10))  # warm up
                samples: dict[int, list[tuple[float, float]]] = {2: [], 200: []}
                for _ in range(rounds):
                    for kb, cookie in cookies.items():
                        samples[kb].append(_time_batch(call, app, "/read", cookie, n))
                out[contender, store] = {kb: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
                                         for kb, v in samples.items()}
            finally:
                _close(app)
    return out


def _rss() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


@dataclass
class CacheMemory:
    kb: int
    sessions: int
    serialized: float  # bytes of one stored payload (Redis STRLEN of a backup key)
    accounted: float  # local.nbytes / len(local)
    traced: float  # tracemalloc delta / sessions
    rss: float  # RSS delta / sessions


def measure_sticky_memory(servers: BenchServers, counts: dict[int, int]) -> list[CacheMemory]:
    call = Caller()
    out = []
    assert servers.redis is not None
    for kb, count in counts.items():
        app = _build("sessionstore-sticky", "redis", servers)
        try:
            local = app.bench_manager.store.wrapped.local
            new_session(call, app, "sessionstore-sticky", kb)  # warm: connections, scripts, imports
            held_before, bytes_before = len(local), local.nbytes
            gc.collect()
            rss_before = _rss()
            tracemalloc.start()
            traced_before = tracemalloc.get_traced_memory()[0]
            last_cookie = ""
            for _ in range(count):
                last_cookie = new_session(call, app, "sessionstore-sticky", kb)
            gc.collect()
            traced = tracemalloc.get_traced_memory()[0] - traced_before
            tracemalloc.stop()
            rss = _rss() - rss_before
            held = len(local) - held_before
            if held != count:
                raise RuntimeError(f"sticky local cache holds {held} new sessions, expected {count}")
            session_id = app.bench_manager.signer.unsign(last_cookie.split("=", 1)[1])
            if not isinstance(session_id, str):
                session_id = None
            serialized = _backup_size(servers, app.bench_manager, session_id)
            out.append(CacheMemory(kb, count, serialized, (local.nbytes - bytes_before) / held,
                                   traced / count, rss / count))
        finally:
            _close(app)
    return out


def _backup_size(servers: BenchServers, manager: Any, session_id: str | None) -> float:
    """STRLEN of the session's backup key in Redis (NaN if it cannot be found)."""
    assert servers.redis is not None
    if not session_id:
        return float("nan")
    with redis_client(servers.redis.port) as client:
        size = client.strlen(manager.key(session_id))
    return float(size) if size else float("nan")


@dataclass
class RedisMemory:
    contender: str
    kb: int
    keys_per_session: float
    payload: float  # STRLEN of string keys, per session
    usage: float  # MEMORY USAGE of every key, per session
    logical: int  # JSON size of the session's data


def measure_redis_memory(servers: BenchServers, per_size: int) -> list[RedisMemory]:
    call = Caller()
    out = []
    assert servers.redis is not None
    with redis_client(servers.redis.port) as client:
        for contender in ("sessionstore", "sessionstore-sticky", "flask-session", "beaker"):
            for kb in (2, 200):
                app = _build(contender, "redis", servers)
                try:
                    before = set(client.scan_iter(count=1000))
                    for _ in range(per_size):
                        new_session(call, app, contender, kb)
                    new_keys = set(client.scan_iter(count=1000)) - before
                    usage = payload = 0
                    for key in new_keys:
                        usage += client.memory_usage(key, samples=0) or 0
                        if client.type(key) == b"string":
                            payload += client.strlen(key)
                    logical = len(json.dumps({"user": "alice", "counter": 0, "cart": {"items": []}, **filler(kb)}))
                    out.append(RedisMemory(contender, kb, len(new_keys) / per_size, payload / per_size,
                                           usage / per_size, logical))
                finally:
                    _close(app)
    return out


def print_scaling(times: Scaling, cache: list[CacheMemory],
                  redis_mem: list[RedisMemory], rounds: int, n: int, misses: list[str], mets: list[str]) -> None:
    print("\n=== Table 4: scaling and memory ===")
    if times:
        print(f"Read-only request touching one small attribute, 2 KB vs 200 KB session, in-process "
              f"(us per request, median of {rounds} x {n}):")
        print(f"  {'contender':32} {'store':9} {'2 KB':>9} {'200 KB':>9} {'200KB/2KB':>10}  {'CPU us 2 KB':>11} "
              f"{'200 KB':>8} {'ratio':>6}  target (on wall-clock)")
        for (contender, store), t in times.items():
            ratio = t[200][0] / t[2][0]
            cpu_ratio = t[200][1] / t[2][1] if t[2][1] else float("nan")
            judged = contender.startswith("sessionstore") and store == "memory"
            target = f"<= {SCALING_TARGET:g}" if judged else "(report)"
            status = ("met" if ratio <= SCALING_TARGET else "MISSED") if judged else ""
            print(f"  {LABELS[contender]:32} {store:9} {t[2][0]:>9.1f} {t[200][0]:>9.1f} {ratio:>10.2f}  "
                  f"{t[2][1]:>11.1f} {t[200][1]:>8.1f} {cpu_ratio:>6.2f}  {target} {status}")
            if judged:
                line = f"table 4 scaling {LABELS[contender]} on {store}: 200KB/2KB = {ratio:.2f} (target <= {SCALING_TARGET:g})"
                (mets if ratio <= SCALING_TARGET else misses).append(line)
        print("  On Redis a non-sticky read still moves the whole stored value over the network and through")
        print("  the client (GETEX returns it); the sticky rows read the node's local copy. The WSGI middleware rows")
        print("  run the same views without Flask (sessionstore.SessionMiddleware), to separate the Flask")
        print("  integration's own cost.")
    if cache:
        print("\nSticky local cache: memory per session held vs its serialized size (bytes per session):")
        print(f"  {'session':8} {'sessions':>8} {'serialized':>11} {'cache nbytes':>13} {'tracemalloc':>12} "
              f"{'RSS delta':>10} {'traced/serialized':>18}")
        for c in cache:
            ratio = c.traced / c.serialized if c.serialized == c.serialized and c.serialized else float("nan")
            print(f"  {c.kb:>5} KB {c.sessions:>8} {c.serialized:>11.0f} {c.accounted:>13.0f} {c.traced:>12.0f} "
                  f"{c.rss:>10.0f} {ratio:>18.2f}")
        print("  serialized = STRLEN of the Redis backup copy; cache nbytes = local.nbytes / sessions (what the")
        print("  cache's byte bound counts); tracemalloc = Python heap growth per session created (cache entry,")
        print("  backup bookkeeping, anything else kept); RSS delta is coarse (allocator arenas, pages).")
    if redis_mem:
        print("\nRedis memory per session (MEMORY USAGE of every key the session created, SAMPLES 0):")
        print(f"  {'contender':32} {'session':8} {'keys/session':>12} {'payload B':>10} {'MEMORY USAGE B':>15} "
              f"{'usage/payload':>14} {'JSON of data B':>15}")
        for m in redis_mem:
            ratio = m.usage / m.payload if m.payload else float("nan")
            print(f"  {LABELS[m.contender]:32} {m.kb:>5} KB {m.keys_per_session:>12.2f} {m.payload:>10.0f} "
                  f"{m.usage:>15.0f} {ratio:>14.2f} {m.logical:>15}")
        print("  payload = STRLEN of the string keys (all keys a session creates, e.g. sessionstore's tombstone);")
        print("  JSON of data = the same attributes as compact-ish json.dumps, for reference.")


# -- main ---------------------------------------------------------------------------------------------------


TABLES = ("commands", "timing", "throughput", "scaling")


class _Options:
    """Options with a full and a ``--quick`` default; a value given on the command line wins over both."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser
        self.defaults: dict[str, tuple[Any, Any]] = {}

    def __call__(self, flag: str, kind: type, full: Any, quick: Any, help_text: str) -> None:
        dest = flag.lstrip("-").replace("-", "_")
        self.defaults[dest] = (full, quick)
        self.parser.add_argument(flag, type=kind, default=None, help=f"{help_text} (default {full}, quick {quick})")

    def resolve(self, args: argparse.Namespace) -> None:
        for dest, (full, quick) in self.defaults.items():
            if getattr(args, dest) is None:
                setattr(args, dest, quick if args.quick else full)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smaller counts and 3 s throughput runs (values given explicitly still win)")
    parser.add_argument("--only", default=",".join(TABLES), help=f"comma-separated subset of {','.join(TABLES)}")
    parser.add_argument("--contenders", default=",".join(CONTENDERS + BASELINES),
                        help="table 3: comma-separated contenders to run (default: all, and both baselines)")
    option = _Options(parser)
    option("--requests", int, 200, 30, "table 1: counted requests per cell")
    option("--warmup", int, 2, 2, "table 1: uncounted requests of each kind first")
    option("--idle", float, 2.0, 1.0, "table 1: seconds of idle counting (background commands) per cell")
    option("--rounds", int, 5, 3, "tables 2 and 4: timing rounds (median)")
    option("--timing-requests", int, 1000, 150, "tables 2 and 4: requests per round")
    option("--duration", float, 10.0, 3.0, "table 3: seconds of each wrk run")
    option("--repeat", int, 3, 1, "table 3: wrk runs per contender, interleaved (median)")
    option("--wrk-warmup", float, 2.0, 1.0, "table 3: seconds of wrk warm-up per contender")
    option("--workers", int, 2, 2, "table 3: gunicorn worker processes per contender")
    option("--worker-class", str, "sync", "sync", "table 3: gunicorn worker class")
    option("--wrk-threads", int, 1, 1, "table 3: wrk threads")
    option("--connections", int, 8, 8, "table 3: wrk connections")
    option("--sessions", int, 32, 32, "table 3: sessions the wrk script cycles through")
    option("--cache-sessions", int, 1000, 200, "table 4: 2 KB sessions for the sticky cache memory (200 KB: /20)")
    option("--redis-sessions", int, 20, 5, "table 4: sessions per size for the Redis memory")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    option.resolve(args)
    only = {t.strip() for t in args.only.split(",") if t.strip()}
    unknown = only - set(TABLES)
    if unknown:
        parser.error(f"unknown table(s) {sorted(unknown)}; choose from {TABLES}")

    started = time.monotonic()
    load = os.getloadavg()
    print(f"peers.py: {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start"
          + (" (quick)" if args.quick else ""))
    print("Contenders: " + "; ".join(f"{SHORT[c]} = {LABELS[c]}" for c in CONTENDERS))
    misses: list[str] = []
    mets: list[str] = []
    report: dict[str, Any] = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    with BenchServers() as servers:
        if "commands" in only:
            res = measure_commands(servers, args.requests, args.warmup, args.idle)
            print_commands(res, misses, mets)
            report["commands"] = {f"{s}/{c}/{k}": v.per_request for (s, c, k), v in res.counts.items()}
            report["integrity"] = {f"{s}/{c}": v for (s, c), v in res.integrity.items()}
            report["background_per_s"] = {f"{s}/{c}": v.per_request for (s, c), v in res.background.items()}
            sys.stdout.flush()
        if "timing" in only:
            times = measure_timing(servers, args.rounds, args.timing_requests)
            print_timing(times, args.rounds, args.timing_requests)
            report["timing_us"] = {f"{c}/{k}": {"wall": v[0], "cpu": v[1]} for (c, k), v in times.items()}
            sys.stdout.flush()
        if "throughput" in only:
            contenders = tuple(c for c in CONTENDERS + BASELINES if c in args.contenders.split(","))
            tp = measure_throughput(servers, contenders, args.duration, args.wrk_warmup, args.repeat, args.workers,
                                    args.worker_class, args.wrk_threads, args.connections, args.sessions)
            print_throughput(tp, args.duration, args.repeat, args.workers, args.worker_class, args.wrk_threads,
                             args.connections, args.sessions, misses, mets)
            report["throughput"] = {c: vars(t) for c, t in tp.items()}
            sys.stdout.flush()
        if "scaling" in only:
            stimes = measure_scaling_time(servers, args.rounds, max(50, args.timing_requests // 2))
            cache = measure_sticky_memory(servers, {2: args.cache_sessions, 200: max(5, args.cache_sessions // 20)})
            rmem = measure_redis_memory(servers, args.redis_sessions)
            print_scaling(stimes, cache, rmem, args.rounds, max(50, args.timing_requests // 2), misses, mets)
            report["scaling_us"] = {f"{c}/{s}": t for (c, s), t in stimes.items()}
            report["sticky_cache"] = [vars(c) for c in cache]
            report["redis_memory"] = [vars(m) for m in rmem]

    print_targets(time.monotonic() - started, mets, misses, report, args.json)
    return 0


def print_targets(elapsed: float, mets: list[str], misses: list[str], report: dict, json_path: Any) -> None:
    """The closing MET / MISSED lines (also node_copy.py's), and the JSON report if asked for."""
    load = os.getloadavg()
    print(f"\n=== Targets ({elapsed:.0f} s; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end) ===")
    for line in mets:
        print(f"MET     {line}")
    for line in misses:
        print(f"MISSED  {line}")
    if not misses:
        print("all targets met")
    report["met"], report["missed"] = mets, misses
    if json_path:
        json_path.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
