"""Throwaway servers for the benchmarks: one redis-server and a 3-node memcached ring.

Started on free loopback ports in a temporary directory and stopped by pid
(:meth:`BenchServers.stop`, also at interpreter exit). The processes and the
command counting are the test suite's (``tests/servers``), so a benchmark
counts exactly what the tests count:

- Redis: the commands clients sent, read from the slowlog (the server logs
  every command, threshold 0); commands run inside a Lua script, connection
  set-up and housekeeping are left out, so an ``EVALSHA`` counts once.
- memcached: per node, the ``stats`` counters that count each data command
  once (``COMMAND_STATS``: ``cmd_get``, ``cmd_set`` — including meta ``ms`` —,
  ``cmd_touch`` — including ``gat``/``gats`` —, ``delete_hits``/``misses`` —
  including meta ``md`` —, …), summed over the nodes.
"""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pymemcache.client.base import Client  # noqa: E402

from tests.servers.memcached_fixtures import COMMAND_STATS, MemcachedCluster, start_cluster  # noqa: E402
from tests.servers.process import ServerProcess  # noqa: E402
from tests.servers.redis_fixtures import redis_client, redis_commands, start_redis  # noqa: E402

__all__ = ["BenchServers"]

HOST = "127.0.0.1"


class BenchServers:
    """A redis-server and a 3-node memcached ring (no failover node), for one benchmark run."""

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="sessionstore-bench-"))
        self.redis: ServerProcess | None = None
        self.memcached: MemcachedCluster | None = None
        self._stats_clients: list[Client] = []
        atexit.register(self.stop)

    def start(self) -> "BenchServers":
        try:
            self.redis = start_redis(self.workdir)
            self.memcached = start_cluster(self.workdir, ring=3, failover=0)
            self._stats_clients = [
                Client((HOST, s.port), connect_timeout=2, timeout=2) for s in self.memcached.ring
            ]
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every server this object started (by pid) and remove the work directory."""
        for client in self._stats_clients:
            client.close()
        self._stats_clients = []
        if self.memcached is not None:
            self.memcached.stop()
            self.memcached = None
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "BenchServers":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- where ------------------------------------------------------------------

    @property
    def redis_url(self) -> str:
        assert self.redis is not None
        return f"redis://{HOST}:{self.redis.port}/0"

    @property
    def memcached_url(self) -> str:
        assert self.memcached is not None
        return self.memcached.url()

    @property
    def pids(self) -> list[int]:
        procs = ([self.redis] if self.redis else []) + (self.memcached.servers if self.memcached else [])
        return [p.pid for p in procs if p.pid is not None]

    # -- counting -----------------------------------------------------------------

    def redis_sent(self) -> list[str]:
        """Names of the commands clients sent to Redis since the last call (oldest first)."""
        assert self.redis is not None
        return redis_commands(self.redis.port)

    def redis_mark(self) -> list[str]:
        """Start a counted interval: :meth:`redis_sent`, then empty the slowlog.

        Reading the slowlog costs time in proportion to what it holds, so it is
        kept short. Entry ids keep counting across ``SLOWLOG RESET``, which the
        counting relies on; a command logged between the read and the reset is
        lost, but it belongs to the interval that just ended, never to the one
        starting (call this right before the counted work).
        """
        sent = self.redis_sent()
        assert self.redis is not None
        with redis_client(self.redis.port) as client:
            client.slowlog_reset()
        return sent

    def memcached_stats(self) -> Counter:
        """``COMMAND_STATS`` summed over the ring's nodes, as they stand now."""
        total: Counter = Counter()
        for client in self._stats_clients:
            stats = client.stats()
            for name in COMMAND_STATS:
                total[name] += int(stats[name.encode()])
        return total
