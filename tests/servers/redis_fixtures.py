"""Real Redis servers for the tests: standalone, TLS, Sentinel and Cluster.

Each topology is started once per test session on free loopback ports, in a
pytest temporary directory, without persistence, and stopped by pid at the
end. A missing binary fails the tests (never skips them).

Command counting
----------------
``INFO commandstats`` also counts the commands a Lua script runs (an EVALSHA
whose script does GET and SET shows as evalsha=1, get=1, set=1), so it cannot
tell what a client sent. The servers therefore log every command in the
slowlog (``slowlog-log-slower-than 0``), where commands run by a script carry
the client address ``?:0``; :func:`redis_commands` and
:func:`redis_command_count` read the other entries, minus connection set-up
and server housekeeping.
"""

from __future__ import annotations

import subprocess
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from redis import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .process import ServerProcess, free_port, require_binary

__all__ = [
    "RedisServer",
    "RedisSentinelSet",
    "RedisClusterSet",
    "redis_client",
    "redis_commands",
    "redis_command_count",
    "start_redis",
    "wait_until",
]

HOST = "127.0.0.1"
SERVICE = "mymaster"

_BASE_ARGS = [
    "--bind", HOST,
    "--save", "",
    "--appendonly", "no",
    "--daemonize", "no",
    "--repl-diskless-sync-delay", "0",
    "--slowlog-log-slower-than", "0",
    "--slowlog-max-len", "100000",
]

#: Connection set-up, server housekeeping (replication, Sentinel, cluster
#: topology discovery) and this module's own queries.
_HOUSEKEEPING = frozenset({
    "info", "hello", "client", "ping", "config", "command", "select", "auth",
    "slowlog", "replconf", "psync", "sync", "subscribe", "sentinel",
    "cluster", "readonly", "readwrite", "role",
})
#: Slowlog client address of commands run by a Lua script.
_SCRIPT_CLIENT = "?:0"


# -- helpers -------------------------------------------------------------------


def redis_client(port: int, **kwargs: Any) -> Redis:
    """A plain client for inspecting the server on ``port`` (no retries)."""
    kwargs.setdefault("socket_timeout", 5)
    return Redis(host=HOST, port=port, retry=Retry(NoBackoff(), 0), **kwargs)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` (an exception counts as false) until true, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def start_redis(workdir: Path, *extra: str, port: int | None = None) -> ServerProcess:
    """Start ``redis-server`` on ``port`` (a free one by default); ``extra`` arguments win."""
    port = port or free_port()
    argv = [require_binary("redis-server"), "--port", str(port), *_BASE_ARGS, *extra]
    return ServerProcess(argv, port, workdir).start()


def key_exists(server, key: str) -> bool:
    """Whether ``server`` (anything with a ``port``) holds ``key``."""
    with redis_client(server.port) as client:
        return bool(client.exists(key))


def key_ttl(server, key: str) -> int:
    """``TTL`` of ``key`` on ``server`` in seconds (-1 none, -2 missing)."""
    with redis_client(server.port) as client:
        return client.ttl(key)


# -- command counting ----------------------------------------------------------

_count_lock = threading.Lock()
#: (port, server run id) -> id of the newest slowlog entry already read.
_last_entry: dict[tuple[int, str], int] = {}
#: port -> client commands counted so far by :func:`redis_commands`.
_totals: dict[int, int] = {}


def _slowlog_after(client: Redis, last_id: int) -> list[dict]:
    """Slowlog entries newer than ``last_id``, newest first."""
    n = 256
    while True:
        entries = client.slowlog_get(n)
        if len(entries) < n or entries[-1]["id"] <= last_id:
            return [e for e in entries if e["id"] > last_id]
        n *= 4


def _client_command(entry: dict) -> str | None:
    """Lower-case name of a command a client sent, or ``None`` (script-run, housekeeping)."""
    address = entry.get("client_address", b"")
    if isinstance(address, bytes):
        address = address.decode()
    command = entry["command"]
    name = command.split(b" ", 1)[0].decode().lower()
    if name == "publish" and b"__sentinel__:hello" in command:  # sentinels gossiping
        return None
    return None if address == _SCRIPT_CLIENT or name in _HOUSEKEEPING else name


def redis_commands(port: int) -> list[str]:
    """Names of the commands clients sent to the server on ``port`` since the last call.

    Oldest first, lower case (``evalsha``, ``getex``, ``script``). Commands a
    script runs, connection set-up (``CLIENT SETINFO``, ``HELLO``, ``SELECT``,
    ``PING``) and housekeeping (replication, Sentinel, cluster discovery) are
    left out. A restarted server starts a fresh log.
    """
    with _count_lock, redis_client(port) as client:
        run_id = client.info("server")["run_id"]
        entries = _slowlog_after(client, _last_entry.get((port, run_id), -1))
        if entries:
            _last_entry[port, run_id] = entries[0]["id"]
        names = [n for n in map(_client_command, reversed(entries)) if n is not None]
        _totals[port] = _totals.get(port, 0) + len(names)
    return names


def redis_command_count(port: int) -> int:
    """Commands clients have sent to the server on ``port`` so far (see :func:`redis_commands`).

    Only differences between two calls are meaningful.
    """
    redis_commands(port)
    return _totals[port]


# -- topologies ------------------------------------------------------------------


@dataclass
class RedisServer:
    """One standalone server. ``stop()``/``start()`` for fault tests (data is lost)."""

    process: ServerProcess
    scheme: str = "redis"
    query: str = ""

    @property
    def port(self) -> int:
        return self.process.port

    @property
    def url(self) -> str:
        return f"{self.scheme}://{HOST}:{self.port}/0" + (f"?{self.query}" if self.query else "")

    def stop(self) -> None:
        self.process.stop()

    def start(self) -> None:
        self.process.start()


@dataclass
class RedisSentinelSet:
    """Data nodes (one master, replicas) watched by sentinels, quorum 2."""

    workdir: Path
    nodes: dict[int, ServerProcess] = field(default_factory=dict)
    sentinels: list[ServerProcess] = field(default_factory=list)
    service: str = SERVICE

    @property
    def url(self) -> str:
        hosts = ",".join(f"{HOST}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}/0"

    def master_port(self) -> int:
        """Port of the master according to the first sentinel that answers."""
        for sentinel in self.sentinels:
            try:
                with redis_client(sentinel.port, socket_timeout=1) as client:
                    return int(client.sentinel_get_master_addr_by_name(self.service)[1])
            except Exception:
                continue
        raise RuntimeError("no sentinel answers")

    def healthy(self) -> bool:
        """Every sentinel sees the master up, every replica up and linked, and its peers."""
        replicas = len(self.nodes) - 1
        for sentinel in self.sentinels:
            with redis_client(sentinel.port, socket_timeout=1) as client:
                master = client.sentinel_master(self.service)
                views = client.sentinel_slaves(self.service)
            if not master["is_master"] or master["is_sdown"] or master["is_odown"]:
                return False
            if master["num-other-sentinels"] != len(self.sentinels) - 1:
                return False
            up = [v for v in views if not v["is_sdown"] and v["master-link-status"] == "ok"]
            if len(up) != replicas:
                return False
        return True

    def wait_healthy(self, timeout: float = 20) -> None:
        wait_until(self.healthy, timeout, "a healthy sentinel set")

    def wait_failover(self, old_port: int, timeout: float = 20) -> int:
        """Wait until every sentinel names a new master that acts as one; its port."""

        def promoted() -> bool:
            ports = set()
            for sentinel in self.sentinels:
                with redis_client(sentinel.port, socket_timeout=1) as client:
                    ports.add(int(client.sentinel_get_master_addr_by_name(self.service)[1]))
            if len(ports) != 1 or old_port in ports:
                return False
            with redis_client(ports.pop()) as client:
                return client.role()[0] == b"master"

        wait_until(promoted, timeout, "the sentinels to fail over")
        return self.master_port()

    def start_replica(self, master_port: int, port: int | None = None) -> ServerProcess:
        """Start a data node on ``port`` replicating ``master_port``, and wait for the link."""
        node = start_redis(self.workdir, "--replicaof", HOST, str(master_port), port=port)
        self.nodes[node.port] = node

        def linked() -> bool:
            with redis_client(node.port) as client:
                return client.info("replication")["master_link_status"] == "up"

        wait_until(linked, 10, f"replica {node.port} to sync")
        return node

    def restore(self, old_port: int, timeout: float = 30) -> None:
        """Bring the killed node ``old_port`` back (a replica of the new master, or the master
        again if no failover happened), and wait for a healthy set."""
        dead = self.nodes.pop(old_port)
        master = self.master_port()
        if master == old_port:
            dead.start()
            self.nodes[old_port] = dead
        else:
            self.start_replica(master, port=old_port)
        self.wait_healthy(timeout)

    def stop(self) -> None:
        for process in [*self.sentinels, *self.nodes.values()]:
            process.stop()


def _sentinel_config(path: Path, port: int, master_port: int) -> Path:
    path.write_text(
        f"port {port}\n"
        f"bind {HOST}\n"
        "daemonize no\n"
        f"dir {path.parent}\n"
        f"sentinel monitor {SERVICE} {HOST} {master_port} 2\n"
        f"sentinel down-after-milliseconds {SERVICE} 1000\n"
        f"sentinel failover-timeout {SERVICE} 5000\n"
        f"sentinel parallel-syncs {SERVICE} 1\n"
    )
    return path


def _start_sentinel(workdir: Path, master_port: int) -> ServerProcess:
    port = free_port()
    config = _sentinel_config(workdir / f"sentinel-{port}.conf", port, master_port)
    return ServerProcess([require_binary("redis-sentinel"), str(config)], port, workdir).start()


@dataclass
class RedisClusterSet:
    """Cluster masters (no replicas) covering all 16384 slots."""

    nodes: list[ServerProcess] = field(default_factory=list)

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{HOST}:{p}" for p in self.ports)

    def healthy(self) -> bool:
        for port in self.ports:
            with redis_client(port, decode_responses=True) as client:
                text = client.execute_command("CLUSTER", "INFO")
            info = dict(line.split(":", 1) for line in text.split() if ":" in line)
            if info["cluster_state"] != "ok" or int(info["cluster_known_nodes"]) != len(self.nodes):
                return False
        return True

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _create_cluster(ports: list[int]) -> None:
    argv = [require_binary("redis-cli"), "--cluster", "create"]
    argv += [f"{HOST}:{p}" for p in ports] + ["--cluster-replicas", "0", "--cluster-yes"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"redis-cli --cluster create failed:\n{done.stdout}\n{done.stderr}")


def _self_signed_cert(workdir: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made with ``openssl``."""
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    subprocess.run(
        [
            require_binary("openssl"), "req", "-x509", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
            "-keyout", str(key), "-out", str(cert),
            "-subj", f"/CN={HOST}", "-addext", f"subjectAltName=IP:{HOST}",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


# -- fixtures --------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    """A standalone server. A test that stops it must start it again."""
    server = RedisServer(start_redis(tmp_path_factory.mktemp("redis")))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_tls_server(tmp_path_factory) -> Iterator[RedisServer]:
    """A standalone server speaking only TLS, with a self-signed certificate for 127.0.0.1.

    Its ``url`` trusts that certificate (``ssl_ca_certs``).
    """
    workdir = tmp_path_factory.mktemp("redis-tls")
    cert, key = _self_signed_cert(workdir)
    port = free_port()
    process = start_redis(
        workdir,
        "--port", "0", "--tls-port", str(port),
        "--tls-cert-file", str(cert), "--tls-key-file", str(key),
        "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
        port=port,
    )
    server = RedisServer(process, scheme="rediss", query=f"ssl_ca_certs={cert}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory) -> Iterator[RedisSentinelSet]:
    """A master, one replica and three sentinels (quorum 2, down after 1 s)."""
    workdir = tmp_path_factory.mktemp("redis-sentinel")
    topology = RedisSentinelSet(workdir)
    with ExitStack() as cleanup:
        cleanup.callback(topology.stop)
        master = start_redis(workdir)
        topology.nodes[master.port] = master
        topology.start_replica(master.port)
        topology.sentinels = [_start_sentinel(workdir, master.port) for _ in range(3)]
        topology.wait_healthy()
        yield topology


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory) -> Iterator[RedisClusterSet]:
    """Three cluster masters (node timeout 1 s)."""
    workdir = tmp_path_factory.mktemp("redis-cluster")
    topology = RedisClusterSet()
    with ExitStack() as cleanup:
        cleanup.callback(topology.stop)
        for _ in range(3):
            port = free_port()
            topology.nodes.append(start_redis(
                workdir,
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-port", str(free_port()),  # the default, port + 10000, may not exist
                "--cluster-node-timeout", "1000",
                port=port,
            ))
        _create_cluster(topology.ports)
        wait_until(topology.healthy, 15, "the cluster to be ok")
        yield topology
