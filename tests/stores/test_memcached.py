"""MemcachedStore against real memcached processes (no mocks)."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import statistics
import threading
import time
import uuid

import pytest
from pymemcache.client.base import Client

from sessionstore.errors import ConfigError, StoreUnavailable
from sessionstore.stores.base import ANY, close_counter, companion_key, open_counter
from sessionstore.stores.memcached import MemcachedStore, Version
from tests.servers.memcached_fixtures import (
    MemcachedCluster,
    memcached_command_count,
    memcached_items,
    memcached_peek,
    settled,
)
from tests.servers.process import free_port

from .contract import FeedContract, IndexContract, LockingContract

PRIMARY, BACKUP = 1, 2
DAY = 24 * 3600


def new_key() -> str:
    """A key shaped like the manager's: ``sessionstore:{<43 urlsafe chars>}``."""
    return "sessionstore:{" + (uuid.uuid4().hex + uuid.uuid4().hex)[:43] + "}"


def holders(cluster: MemcachedCluster, key: str) -> dict[int, int]:
    """``{port: client flags}`` of every server in ``cluster`` that holds ``key``."""
    found = {}
    for server in cluster.servers:
        if server.alive and (item := memcached_peek(server.port, key)) is not None:
            found[server.port] = item[1]
    return found


def primary_port(cluster: MemcachedCluster, key: str) -> int:
    (port,) = [p for p, flags in holders(cluster, key).items() if flags == PRIMARY]
    return port


def saved_with_primary_on(store: MemcachedStore, cluster: MemcachedCluster, port: int) -> str:
    """A new key saved (data ``v1``) whose primary copy landed on the server on ``port``."""
    while True:
        key = new_key()
        store.save(key, b"v1", 600)
        if primary_port(cluster, key) == port:
            return key


def crash_restart(server) -> None:
    """SIGKILL ``server`` and start it again on its port: up, and empty."""
    server.kill()
    server.start()


def commands(cluster: MemcachedCluster) -> int:
    return sum(memcached_command_count(s.port) for s in cluster.servers if s.alive)


def remaining_ttl(port: int, key: str) -> int:
    """Seconds ``key`` has left on the server (-1: never expires), via meta ``mg``."""
    client = Client(("127.0.0.1", port))
    try:
        line = client.raw_command(f"mg {key} t")
    finally:
        client.close()
    return int(line.split(b" t")[1])


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def cluster(memcached_cluster) -> MemcachedCluster:
    return memcached_cluster


@pytest.fixture
def store(cluster, steady_polls):
    store = settled(MemcachedStore.from_url(cluster.url()))
    yield store
    store.close()


@pytest.fixture
def elapse():
    return time.sleep


class TestMemcachedContract(LockingContract, IndexContract, FeedContract):
    lock_resolution = 1.0  # memcached expiries are whole seconds

    def test_foreign_version_is_a_conflict(self, store, key):
        store.save(key, b"x", 60)
        result = store.save(key, b"y", 60, expect="not-a-version")
        assert not result.ok and result.current.data == b"x"
        assert store.delete(key, expect="not-a-version") is False


# -- configuration and keys ----------------------------------------------------


def test_from_url_reads_nodes_and_options():
    store = MemcachedStore.from_url(
        "memcached://10.0.0.1:11211,cache-b,[::1]:11300?failover=10.0.0.9:11211"
        "&timeout=0.25&connect_timeout=0.1&retry_after=2&pool_size=4&suspect_poll=0.5"
    )
    assert [n.name for n in store._nodes] == ["10.0.0.1:11211", "cache-b:11211", "[::1]:11300", "10.0.0.9:11211"]
    assert store._retry_after == 2.0
    assert (store._suspects.poll, store._suspects.fence) == (0.5, 2 * 0.5 + 0.1 + 0.25)


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379",
        "memcached://",
        "memcached://h:notaport",
        "memcached://h:70000",
        "memcached://h:1,,h2:2",
        "memcached://user@h:1",
        "memcached://h:1/db",
        "memcached://h:1,h:1",
        "memcached://h:1?failover=h:1",
        "memcached://h:1?timeout=0",
        "memcached://h:1?timeout=abc",
        "memcached://h:1?retry_after=-1",
        "memcached://h:1?pool_size=0",
        "memcached://h:1?pool_size=1.5",
        "memcached://h:1?suspect_poll=0",
        "memcached://h:1?bogus=1",
        "memcached://h:1?timeout=1&timeout=2",
    ],
)
def test_bad_url_is_a_config_error(url):
    with pytest.raises(ConfigError) as info:
        MemcachedStore.from_url(url)
    assert info.value.field == "store"


@pytest.mark.parametrize(
    "bad",
    ["has space", "new\nline", "tab\there", "nul\x00", "del\x7f", "bell\x07", "", "é", "k" * 251, b"bytes", None],
)
def test_invalid_keys_are_rejected_before_the_protocol(store, bad):
    before = open_counter()
    try:
        for call in (
            lambda: store.load(bad),
            lambda: store.load_and_touch(bad, 60),
            lambda: store.save(bad, b"x", 60),
            lambda: store.touch(bad, 60),
            lambda: store.delete(bad),
            lambda: store.lock(bad, "token", 5),
        ):
            with pytest.raises(ValueError, match="memcached key"):
                call()
        assert before[0].n == 0  # nothing reached a server
    finally:
        close_counter(before[1])


def test_longest_key_is_accepted_and_lock_key_checked(store):
    key = "k" * 250
    assert store.save(key, b"x", 60).ok and store.load(key).data == b"x"
    with pytest.raises(ValueError, match="memcached key"):  # its lock key is 255 bytes
        store.lock(key, "token", 5)
    store.delete(key)


# -- placement -------------------------------------------------------------------


def test_each_session_has_a_primary_and_a_backup_on_distinct_ring_nodes(store, cluster):
    keys = [new_key() for _ in range(60)]
    for key in keys:
        assert store.save(key, b"data-" + key.encode(), 60).ok
    primaries = set()
    ring_ports = {s.port for s in cluster.ring}
    for key in keys:
        found = holders(cluster, key)
        assert sorted(found.values()) == [PRIMARY, BACKUP], found
        assert set(found) <= ring_ports  # never the failover node
        primaries.add(primary_port(cluster, key))
    assert primaries == ring_ports  # consistent hashing spreads keys over the ring


def test_placement_is_deterministic_across_processes_and_server_order(store, cluster):
    reversed_url = "memcached://" + ",".join(f"127.0.0.1:{s.port}" for s in reversed(cluster.ring))
    other = MemcachedStore.from_url(reversed_url)
    try:
        for _ in range(30):
            key = new_key()
            version = store.save(key, b"x", 60).version
            record = other.load(key)
            assert record.version == version and not record.relocated
    finally:
        other.close()


def test_ttl_over_30_days_is_sent_as_absolute_time(store, cluster):
    key = new_key()
    assert store.save(key, b"long", 40 * DAY).ok
    assert store.load(key).data == b"long"  # a relative 3456000 s would mean 1970: expired
    port = primary_port(cluster, key)
    assert abs(remaining_ttl(port, key) - 40 * DAY) <= 5
    assert store.load_and_touch(key, 35 * DAY).data == b"long"
    assert abs(remaining_ttl(port, key) - 35 * DAY) <= 5
    assert store.touch(key, 31 * DAY)
    assert abs(remaining_ttl(port, key) - 31 * DAY) <= 5


def test_ttl_edges(store, cluster):
    key = new_key()
    store.save(key, b"x", 30 * DAY)  # still relative
    assert abs(remaining_ttl(primary_port(cluster, key), key) - 30 * DAY) <= 5
    store.save(key, b"x", None)
    assert remaining_ttl(primary_port(cluster, key), key) == -1
    store.save(key, b"x", 0)  # no time left: gone at once
    assert store.load(key) is None


# -- cost ----------------------------------------------------------------------


def test_server_counted_costs(store, cluster):
    key = new_key()

    def cost(call):
        counter, token = open_counter()
        before = commands(cluster)
        try:
            result = call()
        finally:
            close_counter(token)
        spent = commands(cluster) - before
        assert counter.n == spent, "count_ops must match what the servers executed"
        return spent, result

    assert cost(lambda: store.save(key, b"new", 60, expect=None))[0] == 2  # add + backup
    spent, record = cost(lambda: store.load_and_touch(key, 60))
    assert spent == 1  # gats
    spent, result = cost(lambda: store.save(key, b"changed", 60, expect=record.version))
    assert spent == 2 and result.ok  # cas on the primary + backup set
    assert cost(lambda: store.load(key))[0] == 1  # gets
    assert cost(lambda: store.touch(key, 60))[0] == 2  # both copies
    assert cost(lambda: store.load(new_key()))[0] == 2  # a miss asks the backup node too
    spent, stale = cost(lambda: store.save(key, b"stale", 60, expect=record.version))
    assert not stale.ok and spent == 2  # failed cas + gets of the current record


def test_tcp_nodelay_keeps_a_request_well_under_10ms(store):
    key = new_key()
    store.save(key, b"s" * 2000, 1800)
    durations = []
    for i in range(60):
        started = time.perf_counter()
        record = store.load_and_touch(key, 1800)
        assert store.save(key, b"%d" % i + b"s" * 2000, 1800, expect=record.version).ok
        store.load(key)
        durations.append(time.perf_counter() - started)
    sockets = [c.sock for node in store._nodes for c in node._idle if c.sock is not None]
    assert sockets and all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in sockets)
    assert statistics.median(durations) < 0.010, durations
    assert sum(durations) / len(durations) < 0.010, durations


# -- thread safety and pools -----------------------------------------------------


def test_small_pool_serves_many_threads(cluster):
    store = MemcachedStore.from_url(cluster.url(pool_size=2))
    key = new_key()
    store.save(key, b"0", 60)
    errors = []

    def worker():
        try:
            for _ in range(20):
                while True:
                    rec = store.load(key)
                    if store.save(key, str(int(rec.data) + 1).encode(), 60, expect=rec.version).ok:
                        break
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and store.load(key).data == b"160"
    store.close()


def test_no_reachable_node_is_store_unavailable():
    store = MemcachedStore.from_url(f"memcached://127.0.0.1:{free_port()},127.0.0.1:{free_port()}")
    for call in (
        lambda: store.load(new_key()),
        lambda: store.save(new_key(), b"x", 60),
        lambda: store.touch(new_key(), 60),
        lambda: store.delete(new_key()),
        lambda: store.lock(new_key(), "t", 5),
    ):
        with pytest.raises(StoreUnavailable):
            call()


# -- failure and failover ------------------------------------------------------------


def test_killing_a_node_mid_run_relocates_its_sessions(memcached_fault_cluster):
    cluster = memcached_fault_cluster
    store = MemcachedStore.from_url(cluster.url())
    keys = [new_key() for _ in range(300)]
    for key in keys:
        assert store.save(key, b"v1", 600, expect=None).ok
    primary = {key: primary_port(cluster, key) for key in keys}
    victim = cluster.ring[1]
    orphaned = {key for key in keys if primary[key] == victim.port}
    assert 50 < len(orphaned) < 200

    for i, key in enumerate(keys):
        if i == 150:
            victim.kill()
        record = store.load_and_touch(key, 600)
        assert record is not None and record.data == b"v1"
        assert record.relocated == (i >= 150 and key in orphaned)
        assert store.save(key, b"v2", 600, expect=record.version).ok

    relocated = []
    for i, key in enumerate(keys):
        record = store.load(key)
        assert record.data == b"v2"
        # saved before the kill on the victim: only the backup copy is left
        assert record.relocated == (i < 150 and key in orphaned)
        if record.relocated:
            relocated.append(key)
            assert store.save(key, b"v3", 600, expect=record.version).ok
    assert relocated
    for i, key in enumerate(keys):
        assert not store.load(key).relocated
        if i >= 150 or key in relocated:  # saved since the kill: two live copies again
            assert sorted(holders(cluster, key).values()) == [PRIMARY, BACKUP]
    store.close()


def test_primary_restarted_empty_is_refilled_from_the_backup(memcached_fault_cluster, steady_polls):
    cluster = memcached_fault_cluster
    store = settled(MemcachedStore.from_url(cluster.url()))
    keys = [new_key() for _ in range(60)]
    for key in keys:
        store.save(key, b"v1", 600)
    restarted = cluster.ring[0]
    moved = [key for key in keys if primary_port(cluster, key) == restarted.port]
    crash_restart(restarted)  # empty now; the store's pooled connections to it are stale
    for n, key in enumerate(moved):
        before = commands(cluster)
        record = store.load_and_touch(key, 600)
        assert record.data == b"v1" and record.relocated
        assert store.save(key, b"v2", 600, expect=record.version).ok
        if n:  # (the first one also re-opened the stale connection)
            assert commands(cluster) - before == 4  # miss + backup gats, backup cas + primary add
        # the restarted node was not skipped: it holds the primary copy again
        assert holders(cluster, key)[restarted.port] == PRIMARY
        again = store.load(key)
        assert again.data == b"v2" and not again.relocated
    store.close()


def test_relocated_save_races_and_stale_versions(memcached_fault_cluster):
    cluster = memcached_fault_cluster
    store = MemcachedStore.from_url(cluster.url())
    key = saved_with_primary_on(store, cluster, cluster.ring[0].port)
    crash_restart(cluster.ring[0])
    record = store.load(key)
    assert record.relocated
    wins = []
    barrier = threading.Barrier(6)

    def writer(i):
        barrier.wait()
        if store.save(key, b"w%d" % i, 600, expect=record.version).ok:
            wins.append(i)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert store.load(key).data == b"w%d" % wins[0]
    assert sorted(holders(cluster, key).values()) == [PRIMARY, BACKUP]
    # a relocated version of a record deleted meanwhile cannot resurrect it
    crash_restart(cluster.ring[0])
    record = store.load(key)
    assert record.relocated
    assert store.delete(key)
    result = store.save(key, b"zombie", 600, expect=record.version)
    assert not result.ok and result.current is None and store.load(key) is None
    store.close()


def test_dead_node_is_retried_after_retry_after(memcached_fault_cluster, steady_polls):
    cluster = memcached_fault_cluster
    clock = FakeClock()
    store = settled(MemcachedStore.from_url(cluster.url(retry_after=5), clock=clock))
    node = cluster.ring[2]
    key = saved_with_primary_on(store, cluster, node.port)
    node.kill()
    assert store.load(key).relocated
    node.start()  # back, empty, but still marked dead
    before = memcached_command_count(node.port)
    assert store.load(key).relocated
    assert memcached_command_count(node.port) == before  # skipped
    clock.now += 5
    record = store.load(key)
    assert record.relocated and memcached_command_count(node.port) == before + 1  # tried again: a miss
    assert store.save(key, b"v2", 600, expect=record.version).ok
    assert holders(cluster, key)[node.port] == PRIMARY
    store.close()


def test_failover_node_is_unused_while_a_primary_is_up(store, cluster):
    failover = cluster.failover[0].port
    before = memcached_command_count(failover)
    for _ in range(50):
        key = new_key()
        v = store.save(key, b"x", 60, expect=None).version
        store.load_and_touch(key, 60)
        store.save(key, b"y", 60, expect=v)
        store.delete(key)
    assert memcached_command_count(failover) == before
    assert memcached_items(failover) == 0


def test_failover_node_takes_over_when_every_primary_is_down(memcached_fault_cluster):
    cluster = memcached_fault_cluster
    store = MemcachedStore.from_url(cluster.url())
    failover = cluster.failover[0].port
    for server in cluster.ring:
        server.kill()
    key = new_key()
    assert store.save(key, b"on failover", 600, expect=None).ok
    record = store.load_and_touch(key, 600)
    assert record.data == b"on failover" and not record.relocated
    assert store.save(key, b"still", 600, expect=record.version).ok
    assert memcached_peek(failover, key) == (b"still", PRIMARY)
    assert store.lock(key, "me", 5) == (True, None)
    assert store.unlock(key, "me")
    cluster.failover[0].kill()
    with pytest.raises(StoreUnavailable):
        store.load(key)
    store.close()


# -- locks -----------------------------------------------------------------------


def test_only_the_owner_renews_or_unlocks(store, cluster):
    key = new_key()
    store.save(key, b"session", 60)
    assert store.lock(key, "owner", 5) == (True, None)
    lock_key = companion_key(key, "lock")
    assert holders(cluster, lock_key) == {primary_port(cluster, key): 0}  # on the session's primary only
    assert store.lock(key, "other", 5) == (False, None)
    assert not store.unlock(key, "other")
    assert not store.renew(key, "other", 5)
    assert store.renew(key, "owner", 0.2)  # ceil(0.2) + 1 s: never shorter than asked, never 0
    assert 0 <= remaining_ttl(primary_port(cluster, key), lock_key) <= 2  # ceil + 1 s: never shorter
    assert store.unlock(key, "owner")
    assert not store.unlock(key, "owner")
    assert not store.renew(key, "owner", 5)
    acquired, record = store.lock(key, "next", 5, load_ttl=60)
    assert acquired and record.data == b"session"
    assert store.lock(key, "late", 5, load_ttl=60) == (False, None)
    result = store.save_and_unlock(key, b"saved", 60, record.version, "next")
    assert result.ok and store.load(key).data == b"saved"
    assert store.lock(key, "after", 5)[0]
    store.unlock(key, "after")


def test_unconditional_save_and_delete_cover_both_copies(store, cluster):
    key = new_key()
    store.save(key, b"a", 60, expect=ANY)
    assert len(holders(cluster, key)) == 2
    assert store.delete(key)
    assert holders(cluster, key) == {}
    v = store.save(key, b"b", 60).version
    assert isinstance(v, Version)
    assert store.delete(key, expect=v)
    assert holders(cluster, key) == {}


def test_index_server_counted_costs(store, cluster):
    from sessionstore.index import index_key

    key, ix = new_key(), index_key("sessionstore:", "cas", f"ST-{uuid.uuid4().hex}")
    store.save(key, b"session", 60)

    def cost(call):
        counter, token = open_counter()
        before = commands(cluster)
        try:
            call()
        finally:
            close_counter(token)
        spent = commands(cluster) - before
        assert counter.n == spent, "count_ops must match what the servers executed"
        return spent

    assert cost(lambda: store.index_add(key, [ix], 60)) == 4  # two new records: add + backup copy each
    assert cost(lambda: store.index_add(key, [ix], 60)) == 8  # a refresh: failed add, gets, cas, copy each
    assert cost(lambda: store.index_find(ix)) == 2  # gets of the record, mg of the session
    assert store.index_drop(key) == 1
    assert holders(cluster, ix) == {} and holders(cluster, companion_key(key, "ix")) == {}


def test_feed_polls_cost_one_get(store, cluster):
    channel = f"sessionstore:{uuid.uuid4().hex}:inv"
    cursor = store.feed_position(channel)
    before = commands(cluster)
    for _ in range(10):
        batch = store.feed_read(channel, cursor)
        assert batch.messages == [] and not batch.lost
        cursor = batch.cursor
    assert commands(cluster) - before == 10
    before = commands(cluster)
    store.feed_publish(channel, b"m")
    assert commands(cluster) - before == 2  # incr, then the record (one copy)
    assert store.feed_read(channel, cursor).messages == [b"m"]


def test_feed_reports_a_lost_sequence(store, cluster):
    channel = f"sessionstore:{uuid.uuid4().hex}:inv"
    cursor = store.feed_position(channel)
    store.feed_publish(channel, b"one")
    cursor = store.feed_read(channel, cursor).cursor
    for server in cluster.servers:  # the sequence's node restarted empty (here: the key is gone)
        Client(("127.0.0.1", server.port)).delete(f"{channel}:seq", noreply=False)  # gone before we go on
    time.sleep(0.002)  # a sequence made again is told apart by its creation millisecond
    store.feed_publish(channel, b"after the reset")
    batch = store.feed_read(channel, cursor)
    assert batch.lost and batch.messages == [b"after the reset"]


def test_a_node_restarted_while_in_use_rejoins_only_after_rejoin_after(memcached_fault_cluster):
    """Every app process reads the same server uptime, so they all put a restarted node
    back into their rings at the same moment (no two processes disagree for long)."""
    cluster = memcached_fault_cluster
    store = MemcachedStore.from_url(cluster.url(rejoin_after=6, retry_after=0.5))
    key = saved_with_primary_on(store, cluster, cluster.ring[0].port)
    time.sleep(3.5)  # this process has known the server longer than a fresh server's uptime (~2 s)
    crash_restart(cluster.ring[0])
    record = store.load(key)
    assert record.data == b"v1" and record.relocated
    assert store.save(key, b"v2", 600, expect=record.version).ok
    assert cluster.ring[0].port not in holders(cluster, key)  # skipped while it is too young
    deadline = time.monotonic() + 12
    while cluster.ring[0].port not in holders(cluster, key) and time.monotonic() < deadline:
        time.sleep(0.5)
        current = store.load(key)
        store.save(key, b"v3", 600, expect=current.version)
    assert holders(cluster, key)[cluster.ring[0].port] == PRIMARY  # back in the ring
    store.close()


# -- partitions: suspect nodes ---------------------------------------------------------


@contextlib.contextmanager
def unreachable(server):
    """``server`` frozen (SIGSTOP): requests to it time out, and it keeps its data, as in a
    partition. It answers again (SIGCONT) when the block ends."""
    os.kill(server.pid, signal.SIGSTOP)
    try:
        wait_stopped(server.pid)
        yield
    finally:
        os.kill(server.pid, signal.SIGCONT)
        time.sleep(0.2)  # it runs the commands that timed out meanwhile (they count)


def wait_stopped(pid: int, timeout: float = 5.0) -> None:
    """Until every thread of ``pid`` is stopped (a thread busy on another core stops a moment later)."""
    deadline = time.monotonic() + timeout
    while True:
        states = []
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/stat") as stat:
                states.append(stat.read().rpartition(")")[2].split()[0])
        if all(state in ("T", "t") for state in states):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"process {pid} did not stop: thread states {states}")
        time.sleep(0.01)


def poll_due(store: MemcachedStore) -> MemcachedStore:
    """Make ``store`` read the ring's record of suspect nodes at its next operation."""
    store._suspects._polled = -math.inf
    return store


def counted(cluster: MemcachedCluster, call):
    """``(commands the servers executed, result)`` of ``call()``, checked against count_ops."""
    counter, token = open_counter()
    before = commands(cluster)
    try:
        result = call()
    finally:
        close_counter(token)
    spent = commands(cluster) - before
    assert counter.n == spent, "count_ops must match what the servers executed"
    return spent, result


def partitioned_write(cluster: MemcachedCluster, clock: FakeClock) -> tuple[MemcachedStore, MemcachedStore, str]:
    """A writer that saw ring node 0 fail and wrote its session ``v2`` around it, and a reader
    that never saw it fail and read ``v1`` before; node 0 still holds ``v1``."""
    writer = MemcachedStore.from_url(cluster.url(), clock=clock)
    reader = settled(MemcachedStore.from_url(cluster.url(), clock=clock))
    key = saved_with_primary_on(writer, cluster, cluster.ring[0].port)
    assert reader.load(key).data == b"v1"
    with unreachable(cluster.ring[0]):
        record = writer.load(key)  # times out: node 0 is marked dead, and suspect on the other nodes
        assert record.relocated and record.data == b"v1"
        started = time.monotonic()
        assert writer.save(key, b"v2", 600, expect=record.version).ok
        waited = time.monotonic() - started
    assert waited >= writer._suspects.fence - 1.0  # the fence: the first write around it waited
    assert memcached_peek(cluster.ring[0].port, key) == (b"v1", PRIMARY)  # kept its older copy
    return writer, reader, key


def test_a_healed_node_is_compared_by_a_client_that_never_saw_it_fail(memcached_fault_cluster, steady_polls):
    """The reader learns of the suspicion from the ring (one poll: 2 gets), then reads the node's
    keys through the next node's copy: 2 commands, 3 with the repair; saves cost 2."""
    cluster, clock = memcached_fault_cluster, FakeClock()
    writer, reader, key = partitioned_write(cluster, clock)
    elsewhere = saved_with_primary_on(reader, cluster, cluster.ring[1].port)  # (the writer skips node 0)
    stale = reader.load(key)  # not polled again yet (steady_polls): the old copy, as before this change
    assert stale.data == b"v1" and reader.suspects() == []

    assert counted(cluster, lambda: poll_due(reader).load(elsewhere))[0] == 2 + 1  # the poll + gets
    assert reader.suspects() == [f"127.0.0.1:{cluster.ring[0].port}"] == writer.suspects()
    spent, refused = counted(cluster, lambda: reader.save(key, b"stale", 600, expect=stale.version))
    assert not refused.ok and refused.current.data == b"v2"  # read before it knew: reread, compared
    assert spent == 3  # gets + mg (the next node's copy wins) + the repair
    assert memcached_peek(cluster.ring[0].port, key) == (b"v2", PRIMARY)  # repaired
    spent, record = counted(cluster, lambda: reader.load_and_touch(key, 600))
    assert spent == 2 and record.data == b"v2" and not record.relocated
    spent, result = counted(cluster, lambda: reader.save(key, b"v3", 600, expect=record.version))
    assert spent == 2 and result.ok  # the next node's copy (checked), then node 0's
    assert counted(cluster, lambda: reader.single_copy().save(key, b"v4", 600, expect=result.version))[0] == 2
    assert counted(cluster, lambda: reader.touch(key, 600))[0] == 2
    assert counted(cluster, lambda: reader.load(elsewhere))[0] == 1  # its primary is not suspect

    clock.now += 3600  # past every window: node 0 is trusted again
    assert reader.suspects() == []
    spent, record = counted(cluster, lambda: reader.load(key))
    assert spent == 1 and record.data == b"v4"
    writer.close()
    reader.close()


def test_writers_that_disagree_on_a_healed_node_lose_no_update(memcached_fault_cluster, steady_polls):
    """The writer still skips node 0 (its retry is not due), the reader uses it again: both
    increment the same session in parallel, and each acknowledged increment is kept."""
    cluster, clock = memcached_fault_cluster, FakeClock()
    writer, reader, key = partitioned_write(cluster, clock)
    for store in (writer, reader):
        store.save(key, b"0", 600)
    poll_due(reader)
    acked = []

    def increment(store: MemcachedStore) -> None:
        for _ in range(60):
            while True:
                record = store.load_and_touch(key, 600)
                if store.save(key, b"%d" % (int(record.data) + 1), 600, expect=record.version).ok:
                    acked.append(store)
                    break

    threads = [threading.Thread(target=increment, args=(store,)) for store in (writer, reader)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert writer.suspects() == reader.suspects() == [f"127.0.0.1:{cluster.ring[0].port}"]
    assert len(acked) == 120 and reader.load(key).data == b"120" and writer.load(key).data == b"120"
    writer.close()
    reader.close()


def test_a_version_read_around_a_node_is_checked_where_it_was_read_when_the_node_is_back(
        memcached_fault_cluster, steady_polls):
    """A writer read the next node's copy while it skipped node 0; when node 0 answers again
    (suspect, holding an older copy) the save is checked on the copy read, and node 0 follows:
    not an ``add`` there, whose failure would take the newer copy back and leave the older one."""
    cluster, clock = memcached_fault_cluster, FakeClock()
    writer, reader, key = partitioned_write(cluster, clock)
    record = writer.load(key)  # still around node 0
    assert record.data == b"v2" and record.version.node != f"127.0.0.1:{cluster.ring[0].port}"
    clock.now += 5  # the writer's retry is due: node 0 is back in its ring, suspect
    spent, result = counted(cluster, lambda: writer.save(key, b"v3", 600, expect=record.version))
    assert result.ok and spent == 2
    assert memcached_peek(cluster.ring[0].port, key) == (b"v3", PRIMARY)
    assert writer.load(key).data == b"v3" == poll_due(reader).load(key).data
    writer.close()
    reader.close()


def test_a_session_deleted_around_a_frozen_node_stays_deleted_when_it_answers_again(
        memcached_fault_cluster, steady_polls):
    """The deletion leaves a gone copy on the next node, which wins over the copy left behind."""
    cluster, clock = memcached_fault_cluster, FakeClock()
    writer = MemcachedStore.from_url(cluster.url(), clock=clock)
    reader = settled(MemcachedStore.from_url(cluster.url(), clock=clock))
    node = cluster.ring[0]
    key, other = (saved_with_primary_on(writer, cluster, node.port) for _ in range(2))
    with unreachable(node):
        record = writer.load(key)  # times out: node 0 is marked dead, and suspect on the other nodes
        assert writer.delete(key)  # around node 0 (after the fence)
        assert writer.delete(other, expect=writer.load(other).version)
    assert memcached_peek(node.port, key) == (b"v1", PRIMARY)  # the copies left behind
    assert memcached_peek(node.port, other) == (b"v1", PRIMARY)
    poll_due(reader)
    assert not reader._exists(key)
    assert reader.load(key) is None and reader.load_and_touch(other, 600) is None
    assert memcached_peek(node.port, key) is None and memcached_peek(node.port, other) is None
    assert writer.load(key) is None  # the writer still skips node 0: the gone copy reads as nothing
    assert not reader.save(key, b"stale", 600, expect=record.version).ok  # no resurrection
    assert reader.save(key, b"again", 600, expect=None).ok  # a create takes the gone copy's place
    assert reader.load(key).data == b"again" == writer.load(key).data
    writer.close()
    reader.close()
