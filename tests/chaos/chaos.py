"""The chaos run: virtual users increment counters while nodes and stores are SIGKILLed.

::

    python -m tests.chaos.chaos [--mode sticky|non-sticky|both] [--store redis|memcached|both]
                                [--seconds N] [--users N] [--memcached-restart SECONDS] [--keep]

Per mode × store, everything real and on loopback:

* three app nodes (:mod:`tests.chaos.node`, each ``gunicorn -w 2``: two worker
  processes sharing the node's copy of each session) behind :class:`~sessionstore.balancer.Balancer` (round robin,
  failover on refused connections, sticky routes by the cookie's ``.<node>``);
* Redis with ``--appendonly yes --appendfsync always`` in the run's temporary
  directory (a Redis without persistence loses every session when it restarts;
  with an fsync per write, a restart keeps everything it acknowledged), or a
  ring of three memcached processes;
* ``--users`` virtual users (threads), each with its own cookie, each
  incrementing its own counter one request at a time.

The scripted faults (times are fractions of ``--seconds``; see :func:`timeline`)::

    0.15  kill -9 app node n1          (master and workers; restarted 3 s later,
                                        its node copy survived)
    0.40  redis:     kill -9 redis-server, restarted 1.5 s later from its AOF
          memcached: kill -9 one ring node, left dead
                     (``--memcached-restart S``: restarted empty S seconds later)
    0.27  kill -9 one gunicorn worker of n3 (its master starts another)
    0.70  kill -9 app node n2          (likewise)

Accounting, per user: a ``200`` answer to ``/inc`` is *acknowledged* (it
carries the new value); any other answer, or a broken connection, is *in
doubt* (the increment may or may not have landed) and the user goes on; a
``503 no-backend`` from the balancer (every node refused the connection:
nothing was sent) is *undelivered*, certainly not applied. At the end each
user's counter is read through the balancer and must satisfy::

    acknowledged <= stored <= acknowledged + in doubt

``updates lost`` sums ``acknowledged - stored`` where it is positive;
``sessions lost`` counts sessions that came back new (counter restarted).
In sticky mode the store's copy is checked too: a fresh node outside the
balancer reads every session from the store (a failover), which must hold the
same value as the owner node (``backup="sync"``).

Every process started is stopped by pid when the run ends, also on failure,
and dies with the driver (``PR_SET_PDEATHSIG``) if the driver is killed.
"""

from __future__ import annotations

import argparse
import atexit
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from typing import Callable

from sessionstore.balancer import Balancer
from tests.servers.process import ServerProcess, die_with_parent, free_port, require_binary, wait_for_port

__all__ = ["Scenario", "Report", "run_scenario", "timeline", "main"]

ROOT = Path(__file__).resolve().parents[2]
COOKIE = "session"
HOST = "127.0.0.1"
NODE_IDS = ("n1", "n2", "n3")
#: Worker processes per app node (they share the node's copy of each session).
WORKERS = 2
#: Not behind the balancer: reads the sticky sessions' store copies at the end.
CHECK_NODE = "n9"
#: How long a killed app node stays down before it is restarted.
NODE_DOWNTIME = 3.0
#: How long Redis stays down between its SIGKILL and its restart.
REDIS_DOWNTIME = 1.5


# -- processes ---------------------------------------------------------------------

_live: dict[int, "ChaosProcess"] = {}  # id() -> process, for the atexit safety net
_live_guard = threading.Lock()


@dataclass(eq=False)
class ChaosProcess(ServerProcess):
    """A :class:`ServerProcess` that runs in ``cwd``, logs to ``workdir`` and dies with the driver.

    Start and restart it from the main thread only: ``PR_SET_PDEATHSIG`` fires
    when the *thread* that forked the child ends.
    """

    name: str = ""
    cwd: Path | None = None
    starts: int = 0
    env: dict[str, str] | None = None
    #: signals go to the whole process group (a gunicorn master and its workers)
    group: bool = False

    def spawn(self) -> "ChaosProcess":
        """Start the process without waiting for its port (see :meth:`ready`)."""
        assert self.workdir is not None
        with open(self.workdir / f"{self.name or 'server'}-{self.port}.log", "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, cwd=self.cwd or self.workdir, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=die_with_parent,
                env=None if self.env is None else {**os.environ, **self.env},
            )
        self.starts += 1
        with _live_guard:
            _live[id(self)] = self
        return self

    def ready(self, timeout: float = 20.0) -> "ChaosProcess":
        """Wait until the port accepts connections (stop the process and raise if it never does)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.workdir}")
            try:
                wait_for_port(self.port, timeout=0.2)
                return self
            except RuntimeError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{self.name} does not listen on {self.port} after {timeout}s")

    def start(self, timeout: float = 20.0) -> "ChaosProcess":
        return self.spawn().ready(timeout)

    def stop(self) -> None:
        super().stop()
        with _live_guard:
            _live.pop(id(self), None)

    def _signal(self, sig: int) -> None:
        if not self.group or self.proc is None or self.proc.poll() is not None:
            return super()._signal(sig)
        os.killpg(self.proc.pid, sig)  # workers die with their master, as when a host goes down
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def workers(self) -> list[int]:
        """Pids of the processes this one forked (gunicorn workers)."""
        if self.proc is None:
            return []
        found = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(pid) for pid in found.split()]


def _stop_all(processes: list[ChaosProcess]) -> None:
    """Stop ``processes`` in parallel (SIGTERM, then SIGKILL after 5 s), each by its pid."""
    threads = [threading.Thread(target=p.stop) for p in processes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


@atexit.register
def _stop_leftovers() -> None:
    with _live_guard:
        leftovers = list(_live.values())
    _stop_all(leftovers)


def _redis_process(workdir: Path) -> ChaosProcess:
    """redis-server with an fsync'ed append-only file in ``workdir/redis``: a restart keeps acknowledged writes."""
    port = free_port()
    data = workdir / "redis"
    data.mkdir(exist_ok=True)
    argv = [require_binary("redis-server"), "--port", str(port), "--bind", HOST, "--daemonize", "no",
            "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--dir", str(data)]
    return ChaosProcess(argv, port, workdir, name="redis")


def _memcached_process(workdir: Path, index: int) -> ChaosProcess:
    port = free_port()
    argv = [require_binary("memcached"), "-l", HOST, "-p", str(port), "-U", "0", "-m", "32", "-t", "2"]
    if os.geteuid() == 0:
        # memcached refuses to run as root without -u; "-u nobody" would change its uid, and a
        # credential change clears PR_SET_PDEATHSIG: it would outlive a SIGKILLed driver.
        argv += ["-u", "root"]
    return ChaosProcess(argv, port, workdir, name=f"memcached{index}")


def _node_process(workdir: Path, node_id: str, mode: str, store_url: str, secret: str, backup: str,
                  workers: int = WORKERS) -> ChaosProcess:
    """An app node: ``gunicorn -w workers`` sharing one node copy (in ``workdir``: one host per run)."""
    port = free_port()
    env = {"CHAOS_NODE_ID": node_id, "CHAOS_MODE": mode, "CHAOS_STORE": store_url, "CHAOS_SECRET": secret,
           "CHAOS_BACKUP": backup, "CHAOS_NODE_DIR": str(workdir / f"node-copy-{node_id}")}
    argv = [sys.executable, "-m", "gunicorn", "-w", str(workers), "-b", f"{HOST}:{port}", "--graceful-timeout", "2",
            "--log-level", "warning", "tests.chaos.node:from_environment()"]
    return ChaosProcess(argv, port, workdir, name=f"node-{node_id}", cwd=ROOT, env=env, group=True)


def _wait_redis_ready(port: int, timeout: float = 10.0) -> None:
    """Until Redis answers PING with PONG (not LOADING while it replays its AOF)."""
    import redis

    deadline = time.monotonic() + timeout
    client = redis.Redis(host=HOST, port=port, socket_timeout=1)
    try:
        while True:
            try:
                if client.ping():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis on {port} not ready after {timeout}s")
            time.sleep(0.02)
    finally:
        client.close()


# -- HTTP ------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: dict

    @property
    def causes(self) -> list[str]:
        header = self.headers.get("X-Session-Debug", "")
        for part in header.split(";"):
            name, _, value = part.strip().partition("=")
            if name == "causes":
                return [c for c in value.split(",") if c]
        return []

    def set_cookie(self) -> str | None:
        """The session cookie this answer set (``""``: deleted it), or None."""
        for header in self.headers.get_all("Set-Cookie") or []:
            try:
                morsel = SimpleCookie(header).get(COOKIE)
            except CookieError:
                continue
            if morsel is not None:
                return "" if morsel["max-age"] == "0" else morsel.value
        return None


def http_get(port: int, path: str, cookie: str | None, timeout: float = 30.0, agent: str = "chaos") -> Answer:
    """GET ``path`` on 127.0.0.1:``port`` with the session ``cookie``; raises OSError/HTTPException.

    ``agent`` is the User-Agent: one per virtual user, as browsers differ (the
    debug cookie-loss detector tells clients apart by address + User-Agent).
    """
    headers = {"User-Agent": agent}
    if cookie:
        headers["Cookie"] = f"{COOKIE}={cookie}"
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    body: dict = {}
    if response.headers.get("Content-Type", "").startswith("application/json"):
        try:
            body = json.loads(raw)
        except ValueError:
            body = {}
    return Answer(response.status, response.headers, body)


# -- users -----------------------------------------------------------------------------


@dataclass
class User:
    """One virtual user: its cookie and what the servers told it."""

    index: int
    cookie: str | None = None
    requests: int = 0
    acked: int = 0
    in_doubt: int = 0
    undelivered: int = 0
    last_value: int = 0
    resets: int = 0  #: a 200 came back with a new session after earlier acknowledgements
    deficit: int = 0  #: largest acknowledged - returned value seen during the run
    errors: Counter = field(default_factory=Counter)
    causes: Counter = field(default_factory=Counter)
    anomalies: list[str] = field(default_factory=list)
    final: int | None = None
    final_new: bool = False
    final_error: str | None = None
    store_copy: int | None = None  #: sticky: the value a fresh node read from the store

    @property
    def agent(self) -> str:
        return f"chaos-user-{self.index}"

    def record(self, answer: Answer, elapsed: float) -> None:
        """Account one answer to ``/inc``."""
        self.causes.update(answer.causes)
        if answer.status == 200 and "value" in answer.body:
            cookie = answer.set_cookie()
            if cookie is not None:
                self.cookie = cookie or None
            self.acked += 1
            value = int(answer.body["value"])
            self.last_value = value
            where = f"t={elapsed:.2f}s node={answer.body.get('node')} causes={','.join(answer.causes) or '-'}"
            if answer.body.get("new") and self.acked > 1:
                self.resets += 1
                self.anomalies.append(f"session lost: new session (value {value}) after {self.acked - 1} acks; {where}")
            elif self.acked - value > self.deficit:
                self.anomalies.append(
                    f"update lost: value {value} < {self.acked} acknowledged ({self.in_doubt} in doubt); {where}")
            elif value > self.acked + self.in_doubt:
                self.anomalies.append(
                    f"over-count: value {value} > {self.acked} acknowledged + {self.in_doubt} in doubt; {where}")
            self.deficit = max(self.deficit, self.acked - value)
            return
        balancer_error = answer.headers.get("X-Balancer-Error")
        if answer.status == 503 and balancer_error == "no-backend":
            self.undelivered += 1
            self.errors["503 no-upstream (undelivered)"] += 1
            return
        self.in_doubt += 1
        reason = balancer_error or ",".join(c for c in answer.causes if c not in ("no-cookie",)) or "-"
        self.errors[f"{answer.status} {reason}"] += 1

    def failed(self, exc: BaseException) -> None:
        """The balancer itself could not be talked to: in doubt."""
        self.in_doubt += 1
        self.errors[f"client {type(exc).__name__}"] += 1


def _user_loop(user: User, port: int, stop: threading.Event, started: float, think: float,
               max_requests: int) -> None:
    while not stop.is_set() and user.requests < max_requests:
        user.requests += 1
        try:
            answer = http_get(port, "/inc", user.cookie, agent=user.agent)
        except (OSError, http.client.HTTPException) as exc:
            user.failed(exc)
            stop.wait(0.05)
            continue
        user.record(answer, time.monotonic() - started)
        if answer.status != 200:
            stop.wait(0.02)  # retry soon, not in a tight loop
        elif think:
            stop.wait(think)


# -- the run ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    mode: str  #: "sticky" | "non-sticky"
    store: str  #: "redis" | "memcached"
    seconds: float = 30.0
    users: int = 20
    backup: str = "sync"
    think: float = 0.01  #: seconds each user waits between acknowledged requests
    max_requests: int = 20_000  #: per user: a bound on the load whatever the duration
    memcached_restart: float | None = None  #: restart the killed memcached node (empty) after this long

    def __post_init__(self) -> None:
        if self.mode not in ("sticky", "non-sticky") or self.store not in ("redis", "memcached"):
            raise ValueError(f"unknown mode or store: {self.mode!r}, {self.store!r}")
        if self.seconds < 20:
            raise ValueError("a chaos run needs at least 20 seconds: the faults need room (see timeline())")
        if self.users < 1:
            raise ValueError("a chaos run needs at least one user")

    @property
    def title(self) -> str:
        mode = f"sticky (backup={self.backup})" if self.mode == "sticky" else "non-sticky"
        return f"{mode} × {self.store}"


@dataclass
class Event:
    at: float  #: seconds after the load started (planned)
    what: str
    action: Callable[[], str]  #: does it; returns a note (pid, port)
    done_at: float | None = None
    note: str = ""


def timeline(seconds: float) -> list[float]:
    """Planned times (seconds after the start) of: node kill, store fault, second node kill."""
    return [0.15 * seconds, 0.40 * seconds, 0.70 * seconds]


@dataclass
class Report:
    scenario: Scenario
    users: list[User]
    events: list[Event]
    seconds: float
    balancer: Counter
    log_lines: Counter
    workdir: Path
    redis_persistence: str | None = None

    @property
    def requests(self) -> int:
        return sum(u.requests for u in self.users)

    @property
    def acked(self) -> int:
        return sum(u.acked for u in self.users)

    @property
    def in_doubt(self) -> int:
        return sum(u.in_doubt for u in self.users)

    @property
    def undelivered(self) -> int:
        return sum(u.undelivered for u in self.users)

    @property
    def errors(self) -> Counter:
        total: Counter = Counter()
        for user in self.users:
            total.update(user.errors)
        return total

    @property
    def causes(self) -> Counter:
        total: Counter = Counter()
        for user in self.users:
            total.update(user.causes)
        return total

    @property
    def unread(self) -> list[User]:
        """Users whose counter could not be read at the end."""
        return [u for u in self.users if u.final is None]

    @property
    def sessions_lost(self) -> int:
        """Sessions that came back new: during the run, or at the final read."""
        return sum(u.resets + (1 if u.final_new and u.acked > 0 else 0) for u in self.users)

    @property
    def updates_lost(self) -> int:
        """Acknowledged increments the final counters do not hold."""
        return sum(max(0, u.acked - u.final) for u in self.users if u.final is not None)

    @property
    def over_counted(self) -> int:
        """Increments beyond acknowledged + in doubt (applied twice, or from nowhere)."""
        return sum(max(0, u.final - u.acked - u.in_doubt) for u in self.users if u.final is not None)

    @property
    def max_excess(self) -> int:
        """Largest stored - acknowledged (in-doubt requests that did land)."""
        return max((u.final - u.acked for u in self.users if u.final is not None), default=0)

    @property
    def stale_store_copies(self) -> list[User]:
        """Sticky: users whose store copy is behind (or ahead of) the owner node's copy."""
        return [u for u in self.users if u.store_copy is not None and u.store_copy != u.final]

    @property
    def ok(self) -> bool:
        return (not self.unread and self.sessions_lost == 0 and self.updates_lost == 0
                and self.over_counted == 0 and not self.stale_store_copies)

    def format(self) -> str:
        s = self.scenario
        lines = [f"== {s.title}: {s.users} users, {self.seconds:.1f} s of load"]
        if self.redis_persistence:
            lines.append(f"   redis: {self.redis_persistence}")
        for event in self.events:
            when = "not reached" if event.done_at is None else f"t={event.done_at:5.2f}s"
            lines.append(f"   {when}  {event.what}" + (f" ({event.note})" if event.note else ""))
        lines.append(f"   requests {self.requests}, acknowledged {self.acked}, in doubt {self.in_doubt}, "
                     f"undelivered {self.undelivered} ({self.requests / max(self.seconds, 0.001):.0f} req/s)")
        errors = ", ".join(f"{kind}: {n}" for kind, n in self.errors.most_common()) or "none"
        lines.append(f"   errors seen: {errors}")
        causes = ", ".join(f"{c}: {n}" for c, n in self.causes.most_common() if c != "no-cookie") or "none"
        lines.append(f"   debug causes: {causes}")
        balancer = ", ".join(f"{k}: {n}" for k, n in sorted(self.balancer.items())) or "none"
        lines.append(f"   balancer: {balancer}")
        if self.log_lines:
            lines.append("   node logs: " + ", ".join(f"{k}: {n}" for k, n in self.log_lines.most_common()))
        with_excess = sum(1 for u in self.users if u.final is not None and u.final > u.acked)
        lines.append(f"   sessions lost {self.sessions_lost}, updates lost {self.updates_lost}, "
                     f"over-counted {self.over_counted}, max in-doubt excess {self.max_excess} "
                     f"({with_excess} users with excess), unread {len(self.unread)}")
        if s.mode == "sticky":
            checked = sum(1 for u in self.users if u.store_copy is not None)
            lines.append(f"   store copies (read by fresh node {CHECK_NODE}): {checked} read, "
                         f"{len(self.stale_store_copies)} differ from the owner node's copy")
        for user in self.users:
            problems = list(user.anomalies)
            if user.final is None:
                problems.append(f"final read failed: {user.final_error}")
            elif user.final < user.acked or user.final > user.acked + user.in_doubt or user.final_new:
                problems.append(f"final {user.final} (new={user.final_new}) vs acknowledged {user.acked}, "
                                f"in doubt {user.in_doubt}")
            if user.store_copy is not None and user.store_copy != user.final:
                problems.append(f"store copy {user.store_copy} != owner copy {user.final}")
            for problem in problems[:5]:
                lines.append(f"   ! user {user.index}: {problem}")
        lines.append(f"   => {'OK' if self.ok else 'FAILED'}   (logs: {self.workdir})")
        return "\n".join(lines)


_LOG_PATTERNS = {
    "memcached node marked dead": re.compile(r"memcached \S+ unreachable"),
    "backup write queued": re.compile(r"backup write failed, queued"),
    "backup rewritten": re.compile(r"session backup was gone"),
    "store-unavailable": re.compile(r"store-unavailable"),
    "traceback": re.compile(r"^Traceback", re.M),
}


def _scan_logs(workdir: Path) -> Counter:
    found: Counter = Counter()
    for path in workdir.glob("node-*.log"):
        text = path.read_text(errors="replace")
        for name, pattern in _LOG_PATTERNS.items():
            found[name] += len(pattern.findall(text))
    return +found


def run_scenario(scenario: Scenario, workdir: Path, log: Callable[[str], None] = print) -> Report:
    """Run one mode × store chaos run in ``workdir`` (logs, Redis AOF); every process stopped at the end."""
    workdir.mkdir(parents=True, exist_ok=True)
    processes: list[ChaosProcess] = []
    balancer: Balancer | None = None
    secret = secrets.token_urlsafe(24)
    try:
        # -- stores
        redis_proc: ChaosProcess | None = None
        memcached: list[ChaosProcess] = []
        if scenario.store == "redis":
            redis_proc = _redis_process(workdir)
            processes.append(redis_proc)
            redis_proc.start()
            _wait_redis_ready(redis_proc.port)
            store_url = f"redis://{HOST}:{redis_proc.port}/0"
        else:
            memcached = [_memcached_process(workdir, i) for i in range(3)]
            processes.extend(memcached)
            for server in memcached:
                server.spawn()
            for server in memcached:
                server.ready()
            store_url = "memcached://" + ",".join(f"{HOST}:{m.port}" for m in memcached)

        # -- nodes and balancer
        nodes = {nid: _node_process(workdir, nid, scenario.mode, store_url, secret, scenario.backup)
                 for nid in NODE_IDS}
        processes.extend(nodes.values())
        for node in nodes.values():
            node.spawn()
        for node in nodes.values():
            node.ready()
        balancer = Balancer([(nid, "127.0.0.1", n.port) for nid, n in nodes.items()], mode=scenario.mode).start()
        _warm_up(balancer.port)

        # -- the faults
        first, store_fault, second = timeline(scenario.seconds)
        events = _node_fault(nodes["n1"], first) + _node_fault(nodes["n2"], second)
        events.append(Event((first + store_fault) / 2, "kill -9 one gunicorn worker of n3", _worker_killer(nodes["n3"])))
        if redis_proc is not None:
            events.append(Event(store_fault, "kill -9 redis-server", _killer(redis_proc)))
            events.append(Event(store_fault + REDIS_DOWNTIME, "restart redis-server (AOF, same port)",
                                lambda: _restart_redis(redis_proc)))
        else:
            victim = memcached[1]
            restart = scenario.memcached_restart
            events.append(Event(store_fault, f"kill -9 memcached {HOST}:{victim.port}"
                                + (" (left dead)" if restart is None else ""), _killer(victim)))
            if restart is not None:
                events.append(Event(store_fault + restart, f"restart memcached {HOST}:{victim.port} (empty)",
                                    lambda: _restart(victim)))
        events.sort(key=lambda e: e.at)

        # -- the load
        users = [User(i) for i in range(scenario.users)]
        stop = threading.Event()
        started = time.monotonic()
        threads = [threading.Thread(target=_user_loop, name=f"user-{u.index}", daemon=True,
                                    args=(u, balancer.port, stop, started, scenario.think, scenario.max_requests))
                   for u in users]
        for thread in threads:
            thread.start()
        try:
            for event in events:  # in the main thread: restarted children die with it (PDEATHSIG)
                _sleep_until(started + event.at)
                event.done_at = time.monotonic() - started
                event.note = event.action()
                log(f"[{scenario.title}] t={event.done_at:5.2f}s {event.what} {event.note}".rstrip())
            deadline = started + scenario.seconds
            while time.monotonic() < deadline and any(t.is_alive() for t in threads):
                time.sleep(0.05)
        finally:
            stop.set()
            for thread in threads:
                thread.join(60)
        elapsed = time.monotonic() - started
        if any(t.is_alive() for t in threads):
            raise RuntimeError("a virtual user is still waiting for an answer 60 s after the end")

        # -- the verdict: every node up (restarted ones included), read every counter
        for node in nodes.values():
            if not node.alive:
                node.start()
        _final_reads(users, balancer.port)
        if scenario.mode == "sticky":
            checker = _node_process(workdir, CHECK_NODE, scenario.mode, store_url, secret, scenario.backup)
            processes.append(checker)
            checker.start()
            _store_copies(users, checker.port)
        persistence = ("--appendonly yes --appendfsync always (a restart keeps every acknowledged write)"
                       if redis_proc is not None else None)
        report = Report(scenario, users, events, elapsed, sum(balancer.stats.values(), Counter()), Counter(), workdir, persistence)
    finally:
        if balancer is not None:
            balancer.stop()
        _stop_all(processes)
    report.log_lines = _scan_logs(workdir)
    return report


def _node_fault(node: ChaosProcess, at: float) -> list[Event]:
    nid = node.name.removeprefix("node-")
    return [Event(at, f"kill -9 app node {nid}", _killer(node)),
            Event(at + NODE_DOWNTIME, f"restart app node {nid} (its node copy survived)", lambda: _restart(node))]


def _killer(process: ChaosProcess) -> Callable[[], str]:
    def kill() -> str:
        pid = process.pid
        process.kill()
        return f"pid {pid}"
    return kill


def _worker_killer(node: ChaosProcess) -> Callable[[], str]:
    def kill() -> str:
        workers = node.workers()
        if not workers:
            raise RuntimeError(f"{node.name} has no worker to kill")
        os.kill(workers[0], signal.SIGKILL)  # its master starts another one
        return f"pid {workers[0]}"
    return kill


def _restart(process: ChaosProcess) -> str:
    process.start()
    return f"pid {process.pid}, port {process.port}"


def _restart_redis(process: ChaosProcess) -> str:
    note = _restart(process)
    _wait_redis_ready(process.port)
    return note


def _sleep_until(when: float) -> None:
    while (remaining := when - time.monotonic()) > 0:
        time.sleep(min(remaining, 0.05))


def _warm_up(port: int) -> None:
    """Wait until the balancer answers through a node (``/health`` touches no session)."""
    deadline = time.monotonic() + 20
    while True:
        try:
            if http_get(port, "/health", None, timeout=5).status == 200:
                return
        except (OSError, http.client.HTTPException):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the balancer does not reach any node")
        time.sleep(0.05)


def _read(port: int, cookie: str | None, agent: str) -> Answer:
    """``/read`` with a few retries (the nodes may still be warming up)."""
    last: object = None
    for attempt in range(10):
        try:
            answer = http_get(port, "/read", cookie, agent=agent)
            if answer.status == 200 and "value" in answer.body:
                return answer
            last = f"{answer.status} {answer.headers.get('X-Balancer-Error') or ','.join(answer.causes)}"
        except (OSError, http.client.HTTPException) as exc:
            last = exc
        time.sleep(0.2 * (attempt + 1))
    raise RuntimeError(f"/read kept failing: {last}")


def _final_reads(users: list[User], port: int) -> None:
    for user in users:
        try:
            answer = _read(port, user.cookie, user.agent)
        except RuntimeError as exc:
            user.final_error = str(exc)
            continue
        user.final = int(answer.body["value"])
        user.final_new = bool(answer.body.get("new"))
        cookie = answer.set_cookie()
        if cookie is not None:
            user.cookie = cookie or None


def _store_copies(users: list[User], port: int) -> None:
    """Sticky: read every session through a node that holds none of them (so: from the store)."""
    for user in users:
        if user.cookie is None:
            continue
        try:
            user.store_copy = int(_read(port, user.cookie, user.agent).body["value"])
        except RuntimeError as exc:
            user.anomalies.append(f"store copy unreadable: {exc}")


# -- command line ------------------------------------------------------------------------


def scenarios(mode: str, store: str, seconds: float, users: int, **options: object) -> list[Scenario]:
    modes = ["non-sticky", "sticky"] if mode == "both" else [mode]
    stores = ["redis", "memcached"] if store == "both" else [store]
    return [Scenario(m, s, seconds, users, **options) for m in modes for s in stores]  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("sticky", "non-sticky", "both"), default="both")
    parser.add_argument("--store", choices=("redis", "memcached", "both"), default="both")
    parser.add_argument("--seconds", type=float, default=30.0, help="load duration of each run (>= 20)")
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--backup", choices=("sync", "async"), default="sync", help="sticky mode's backup")
    parser.add_argument("--think-ms", type=float, default=10.0, help="pause of a user between requests")
    parser.add_argument("--max-requests", type=int, default=20_000, help="per user")
    parser.add_argument("--memcached-restart", type=float, default=None, metavar="SECONDS",
                        help="restart the killed memcached node (empty) after SECONDS (default: leave it dead)")
    parser.add_argument("--keep", action="store_true", help="keep the logs directory even when every run passes")
    args = parser.parse_args(argv)
    if args.seconds < 20:
        parser.error("--seconds must be at least 20 (the faults need room: see timeline())")
    if args.users < 1:
        parser.error("--users must be at least 1")

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds: every process is stopped by the finally blocks

    signal.signal(signal.SIGTERM, terminate)
    root = Path(tempfile.mkdtemp(prefix="sessionstore-chaos-"))
    ok = True
    for scenario in scenarios(args.mode, args.store, args.seconds, args.users, backup=args.backup,
                              think=args.think_ms / 1000, max_requests=args.max_requests,
                              memcached_restart=args.memcached_restart):
        workdir = root / f"{scenario.mode}-{scenario.store}"
        report = run_scenario(scenario, workdir)
        print(report.format(), flush=True)
        ok &= report.ok
    if ok and not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
