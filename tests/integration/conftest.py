"""Shared fixtures of the integration tests: real stores with server-side command counts,
and the debug records the middleware logs."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Callable, Iterator

import pytest

from tests.servers.memcached_fixtures import memcached_command_count
from tests.servers.redis_fixtures import redis_command_count

SECRET = "integration-secret"


@dataclass
class RealStore:
    """A store URL and how to count, on the servers, the commands clients sent it."""

    kind: str  # "redis" | "redis-cluster" | "memcached"
    url: str
    ports: list[int]
    count_one: Callable[[int], int]

    def commands(self) -> int:
        """Commands executed so far, summed over every server (only differences mean anything)."""
        return sum(self.count_one(port) for port in self.ports)


def _real_store(request: pytest.FixtureRequest, kind: str) -> RealStore:
    if kind == "redis":
        server = request.getfixturevalue("redis_server")
        return RealStore(kind, server.url, [server.port], redis_command_count)
    if kind == "redis-cluster":
        cluster = request.getfixturevalue("redis_cluster")
        return RealStore(kind, cluster.url, cluster.ports, redis_command_count)
    ring = request.getfixturevalue("memcached_cluster")
    request.getfixturevalue("steady_polls")  # counted request by request: the suspect nodes are polled once
    return RealStore(kind, ring.url(), [s.port for s in ring.servers], memcached_command_count)


@pytest.fixture(params=["redis", "redis-cluster", "memcached"])
def any_store(request: pytest.FixtureRequest) -> RealStore:
    """Each of: standalone Redis, Redis Cluster, the 3-node memcached ring (+ failover node)."""
    return _real_store(request, request.param)


@pytest.fixture(params=["redis", "memcached"])
def locking_store(request: pytest.FixtureRequest) -> RealStore:
    """Standalone Redis and the memcached ring."""
    return _real_store(request, request.param)


class DebugLog(logging.Handler):
    """Collects the JSON records logged on ``sessionstore.debug`` (thread-safe)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(json.loads(record.getMessage()))

    def naming(self, cause: str) -> list[dict]:
        """The records whose causes include ``cause``."""
        return [r for r in self.records if cause in r["causes"]]


@pytest.fixture
def debug_log() -> Iterator[DebugLog]:
    """Every debug record logged during the test, parsed."""
    logger = logging.getLogger("sessionstore.debug")
    handler, level = DebugLog(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
