"""Real memcached servers for tests (a pytest plugin, loaded from tests/conftest.py).

``memcached_cluster`` (session scope) starts a 3-node ring plus one
failover-only node on free loopback ports, once per test session. Tests that
kill or restart nodes take ``memcached_fault_cluster``, a fresh cluster of
their own. A missing ``memcached`` binary fails the tests; it never skips them.
"""

from __future__ import annotations

import atexit
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from pymemcache.client.base import Client

from sessionstore.stores.memcached import _Suspects

from .process import ServerProcess, free_port, require_binary

__all__ = [
    "MemcachedCluster",
    "start_memcached",
    "start_cluster",
    "memcached_command_count",
    "memcached_peek",
    "poll_once",
    "settled",
    "steady_polls",
    "memcached_cluster",
    "memcached_fault_cluster",
]

#: ``stats`` counters that together count every data command once. ``cmd_set``
#: covers set/add/replace/cas/append/prepend and meta ``ms`` (``cas_hits``,
#: ``cas_misses``, ``cas_badval`` are parts of it); ``cmd_get`` covers get/gets
#: and meta ``mg``; ``gat``/``gats`` count only in ``cmd_touch``, with
#: ``touch``; ``delete`` and meta ``md`` count in ``delete_hits/misses``.
#: ``stats`` itself counts nowhere. (Checked against memcached 1.6.18.)
COMMAND_STATS = (
    "cmd_get",
    "cmd_set",
    "cmd_touch",
    "cmd_flush",
    "delete_hits",
    "delete_misses",
    "incr_hits",
    "incr_misses",
    "decr_hits",
    "decr_misses",
)


def poll_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every MemcachedStore read the ring's record of suspect nodes at its first operation
    only, for the rest of the test.

    A store polls that record (2 ``get``) once per ``suspect_poll`` seconds at the start of an
    operation: whether a poll lands inside a counted operation depends on timing. Tests that
    count commands one by one use this (and :func:`settled`); the poll itself is counted by
    ``test_a_healed_node_is_compared_by_a_client_that_never_saw_it_fail``. The fence (derived
    from ``suspect_poll``) is left as it is.
    """
    monkeypatch.setattr(_Suspects, "due", lambda self: self._polled == -math.inf)


def settled(store):
    """``store`` (a MemcachedStore) after its first poll of suspect nodes, so that its next
    commands are its operations' own (with :func:`poll_once`: for the whole test)."""
    store._poll_suspects()
    return store


def _argv(port: int) -> list[str]:
    argv = [require_binary("memcached"), "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-m", "32", "-t", "2"]
    if os.geteuid() == 0:
        argv += ["-u", "root"]  # required as root; keeping the uid keeps PR_SET_PDEATHSIG
    return argv


def start_memcached(workdir: Path | None = None, port: int | None = None) -> ServerProcess:
    """Start one memcached on ``port`` (a free one if None, retried if the port is lost to a race)."""
    for _ in range(3):
        chosen = port or free_port()
        server = ServerProcess(_argv(chosen), chosen, workdir)
        try:
            server.start()
        except RuntimeError:
            if port is not None:
                raise
            continue
        if server.alive:
            return server
    raise RuntimeError(f"memcached did not start; see the server logs in {workdir}")


@dataclass
class MemcachedCluster:
    """A ring of memcached processes plus failover-only ones."""

    ring: list[ServerProcess]
    failover: list[ServerProcess]

    @property
    def servers(self) -> list[ServerProcess]:
        return self.ring + self.failover

    def url(self, **options: object) -> str:
        """``memcached://`` URL of this cluster, with extra query ``options``."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.ring)
        query = [f"failover={','.join(f'127.0.0.1:{s.port}' for s in self.failover)}"] if self.failover else []
        query += [f"{name}={value}" for name, value in options.items()]
        return f"memcached://{hosts}" + ("?" + "&".join(query) if query else "")

    def stop(self) -> None:
        """Stop every server (in parallel: memcached takes up to 1 s to act on SIGTERM)."""
        stoppers = [threading.Thread(target=server.stop) for server in self.servers]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join()


def start_cluster(workdir: Path | None = None, ring: int = 3, failover: int = 1) -> MemcachedCluster:
    """Start ``ring`` + ``failover`` memcached processes; all stopped again if one fails."""
    cluster = MemcachedCluster([], [])
    atexit.register(cluster.stop)  # a crashed test run still leaves no server behind
    try:
        cluster.ring.extend(start_memcached(workdir) for _ in range(ring))
        cluster.failover.extend(start_memcached(workdir) for _ in range(failover))
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _stats(port: int) -> dict[bytes, object]:
    client = Client(("127.0.0.1", port), connect_timeout=2, timeout=2)
    try:
        return client.stats()
    finally:
        client.close()


def memcached_command_count(port: int) -> int:
    """Data commands the server on ``port`` has executed so far (see ``COMMAND_STATS``)."""
    stats = _stats(port)
    return sum(int(stats[name.encode()]) for name in COMMAND_STATS)


def memcached_items(port: int) -> int:
    """Items the server on ``port`` holds now (``curr_items``)."""
    return int(_stats(port)[b"curr_items"])


class _FlagsSerde:
    def serialize(self, key: bytes, value: bytes) -> tuple[bytes, int]:
        return value, 0

    def deserialize(self, key: bytes, value: bytes, flags: int) -> tuple[bytes, int]:
        return value, flags


def memcached_peek(port: int, key: str) -> tuple[bytes, int] | None:
    """``(value, client flags)`` of ``key`` on the server on ``port``, read with a plain client."""
    client = Client(("127.0.0.1", port), serde=_FlagsSerde(), connect_timeout=2, timeout=2)
    try:
        return client.get(key)
    finally:
        client.close()


@pytest.fixture(scope="session")
def memcached_cluster(tmp_path_factory) -> MemcachedCluster:
    """3-node ring + 1 failover node, shared by the whole test session."""
    cluster = start_cluster(tmp_path_factory.mktemp("memcached"))
    yield cluster
    cluster.stop()


@pytest.fixture
def memcached_fault_cluster(tmp_path) -> MemcachedCluster:
    """A cluster of the test's own, for tests that kill or restart nodes."""
    cluster = start_cluster(tmp_path)
    yield cluster
    cluster.stop()


@pytest.fixture
def steady_polls(monkeypatch) -> None:
    """MemcachedStores poll the ring's suspect nodes at their first operation only (see :func:`poll_once`)."""
    poll_once(monkeypatch)
