"""SQLStore against real SQLite, PostgreSQL and MariaDB databases.

Every database runs the shared store contract plus the SQL specifics (locks,
cleaner, schema, statement counts). The stores get a fake clock, so expiry is
driven by ``elapse`` without sleeping: the SQL store keeps ``expires_at`` in a
column computed from its clock and checks it on every statement.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
import traceback
import uuid
from typing import Any, Callable, Iterator

import pytest
from sqlalchemy import Connection, Select, func, inspect, make_url, select

from sessionstore.errors import ConfigError, StoreUnavailable
from sessionstore.stores.base import Record, close_counter, open_counter
from sessionstore.stores.sql import CLEANER_LEASE, SQLStore, migrate

from .contract import FeedContract, IndexContract, LockingContract

SPAWN = multiprocessing.get_context("spawn")


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def with_options(url: str, **options: Any) -> str:
    """``url`` with query options set (replacing any given already)."""
    updated = make_url(url).update_query_dict({name: str(value) for name, value in options.items()})
    return updated.render_as_string(hide_password=False)


def count_rows(store: SQLStore, key: str | None = None, *, locks: bool = False) -> int:
    """Rows physically in the sessions (or lock) table, expired or not."""
    table = store.lock_table if locks else store.table
    stmt = select(func.count()).select_from(table)
    if key is not None:
        stmt = stmt.where(table.c[table.primary_key.columns.keys()[0]] == key)
    with store.engine.connect() as conn:
        return conn.execute(stmt).scalar_one()


def insert_rows(store: SQLStore, keys: list[str], expires_at: float | None) -> None:
    """Bulk-insert sessions directly (faster than one save per row)."""
    store.create_schema()
    rows = [
        dict(id=k, version=1, payload=b"x", expires_at=expires_at, created_at=0.0, updated_at=0.0)
        for k in keys
    ]
    with store.engine.connect() as conn:
        conn.execute(store.table.insert(), rows)


def ops(call: Callable[[], Any]) -> int:
    """Statements ``call`` sent, as counted by the store."""
    counter, token = open_counter()
    try:
        call()
    finally:
        close_counter(token)
    return counter.n


class GatedStore(SQLStore):
    """A store whose cleaning pass waits for ``gate`` once it holds the cleaner lock."""

    gate: threading.Event
    inside: threading.Event

    def _purge_expired(self, conn: Connection) -> int:
        self.inside.set()
        self.gate.wait(60)
        return super()._purge_expired(conn)


class RecordingStore(SQLStore):
    """A store that records when each of its cleaning passes ran (inside the lock)."""

    passes: list[tuple[str, float, float]]

    def _purge_expired(self, conn: Connection) -> int:
        start = time.time()
        try:
            time.sleep(0.05)  # widen the window an overlap would show in
            return super()._purge_expired(conn)
        finally:
            self.passes.append((self.node_name, start, time.time()))


# -- the contract and SQL specifics, per database ------------------------------


class SQLStoreTests(LockingContract, IndexContract, FeedContract):
    """Subclasses provide ``base_url``: the database, without store options."""

    @pytest.fixture
    def base_url(self) -> str:
        raise NotImplementedError

    @pytest.fixture
    def url(self, base_url: str, sql_table: str) -> str:
        """The run's shared table; keys are unique per test."""
        return with_options(base_url, table=sql_table, cleanup_interval=0)

    @pytest.fixture
    def fresh_url(self, base_url: str, sql_table: str) -> str:
        """A table of this test's own (for tests that count rows)."""
        return with_options(base_url, table=f"{sql_table}_{uuid.uuid4().hex[:8]}", cleanup_interval=0)

    @pytest.fixture
    def clock(self) -> FakeClock:
        return FakeClock()

    @pytest.fixture
    def make_store(self, clock: FakeClock) -> Iterator[Callable[..., SQLStore]]:
        stores: list[SQLStore] = []

        def make(url: str, cls: type[SQLStore] = SQLStore, **kwargs: Any) -> SQLStore:
            kwargs.setdefault("clock", clock)
            stores.append(cls.from_url(url, **kwargs))
            return stores[-1]

        yield make
        for store in stores:
            store.close()

    @pytest.fixture
    def store(self, url: str, make_store: Callable[..., SQLStore]) -> SQLStore:
        return make_store(url)

    @pytest.fixture
    def elapse(self, clock: FakeClock) -> Callable[[float], None]:
        def advance(seconds: float) -> None:
            clock.now += seconds

        return advance

    # -- rows, expiry, versions ------------------------------------------------

    def test_expired_row_is_absent_before_it_is_cleaned(self, store, key, elapse):
        old = store.save(key, b"old", 1).version
        elapse(2)
        assert count_rows(store, key) == 1
        assert store.load(key) is None
        assert store.load_and_touch(key, 60) is None
        assert store.touch(key, 60) is False
        assert store.delete(key) is False
        stale = store.save(key, b"stale", 60, expect=old)
        assert not stale.ok and stale.current is None
        created = store.save(key, b"new", 60, expect=None)
        assert created.ok and created.version != old
        assert store.load(key) == Record(b"new", created.version)

    def test_unconditional_save_over_expired_row_starts_a_new_life(self, store, key, clock, elapse):
        store.save(key, b"a", 1)
        elapse(5)
        assert store.save(key, b"b", 60).ok
        with store.engine.connect() as conn:
            created = conn.execute(select(store.table.c.created_at).where(store.table.c.id == key)).scalar_one()
        assert created == clock.now

    def test_keys_are_case_sensitive(self, store):
        base = uuid.uuid4().hex
        store.save(f"s:{base}:k", b"lower", 60)
        store.save(f"s:{base}:K", b"upper", 60)
        assert store.load(f"s:{base}:k").data == b"lower"
        assert store.load(f"s:{base}:K").data == b"upper"

    def test_foreign_version_never_matches(self, store, key):
        store.save(key, b"a", 60)
        assert not store.save(key, b"b", 60, expect="not-a-version").ok
        assert not store.save(key, b"b", 60, expect=2**70).ok
        assert store.delete(key, expect=None) is False
        assert store.load(key).data == b"a"

    def test_recreated_key_gets_a_new_version(self, store, key):
        first = store.save(key, b"a", 60, expect=None).version
        store.delete(key)
        assert store.save(key, b"b", 60, expect=None).version != first
        assert not store.save(key, b"stale", 60, expect=first).ok

    def test_statements_per_operation(self, store, key):
        atomic_touch = 4 if store.engine.dialect.name in ("mysql", "mariadb") else 1
        assert ops(lambda: store.load(key)) == 1
        assert ops(lambda: store.save(key, b"a", 60, expect=None)) == 1
        version = store.load(key).version
        assert ops(lambda: store.save(key, b"b", 60, expect=version)) == 1
        assert ops(lambda: store.save(key, b"c", 60, expect=version)) == 2  # + the current record
        assert ops(lambda: store.save(key, b"d", 60)) == 1
        assert ops(lambda: store.load_and_touch(key, 60)) == atomic_touch
        assert ops(lambda: store.touch(key, 60)) == 1
        assert ops(lambda: store.lock(key, "t", 5)) == 1
        assert ops(lambda: store.lock(key, "u", 5)) == 2  # INSERT, then UPDATE if expired
        assert ops(lambda: store.unlock(key, "t")) == 1
        assert ops(lambda: store.lock(key, "t", 5, load_ttl=60)) == 1 + atomic_touch
        assert ops(lambda: store.save_and_unlock(key, b"e", 60, None, "t")) == 4  # INSERT, UPDATE, SELECT, DELETE
        assert ops(lambda: store.delete(key)) == 1

    # -- locks ---------------------------------------------------------------

    def test_expired_lock_is_free(self, store, key, elapse):
        assert store.lock(key, "alice", 5)[0]
        elapse(4)
        assert store.renew(key, "alice", 5)  # now until +5 from here
        elapse(4)
        assert not store.lock(key, "bob", 5)[0]
        elapse(2)
        assert store.lock(key, "bob", 5)[0]
        assert store.renew(key, "alice", 5) is False
        assert store.unlock(key, "alice") is False
        assert store.unlock(key, "bob") is True

    def test_lock_loads_and_touches(self, store, key, elapse):
        version = store.save(key, b"data", 2).version
        elapse(1.5)
        acquired, record = store.lock(key, "alice", 30, load_ttl=10)
        assert acquired and record.data == b"data" and record.version == version
        assert store.lock(key, "bob", 30, load_ttl=10) == (False, None)
        elapse(5)
        assert store.load(key) is not None
        assert store.unlock(key, "alice")
        assert store.lock(f"{key}:absent", "alice", 30, load_ttl=10) == (True, None)

    def test_save_and_unlock(self, store, key):
        version = store.save(key, b"a", 60).version
        assert store.lock(key, "alice", 30)[0]
        result = store.save_and_unlock(key, b"b", 60, version, "alice")
        assert result.ok and store.load(key).data == b"b"
        assert store.lock(key, "bob", 30)[0]
        failed = store.save_and_unlock(key, b"c", 60, version, "alice")  # stale, and not the owner
        assert not failed.ok and failed.current.data == b"b"
        assert not store.lock(key, "carol", 30)[0]  # bob's lock survived

    # -- cleaner -----------------------------------------------------------------

    def test_cleanup_deletes_expired_rows_in_batches(self, fresh_url, make_store, clock):
        store = make_store(with_options(fresh_url, cleanup_batch=100))
        insert_rows(store, [f"dead-{i}" for i in range(1234)], clock.now - 1)
        insert_rows(store, [f"live-{i}" for i in range(10)], clock.now + 60)
        insert_rows(store, ["forever"], None)
        store.lock("abandoned", "ghost", 1)
        clock.now += 2
        assert store.cleanup() == 1234
        assert count_rows(store) == 11
        assert count_rows(store, locks=True) == 0  # the abandoned lock went too
        assert store.cleanup() == 0

    def test_cleanup_returns_minus_one_while_another_node_cleans(self, fresh_url, make_store, clock):
        busy = make_store(fresh_url, cls=GatedStore, node_name="node-a")
        busy.gate, busy.inside = threading.Event(), threading.Event()
        other = make_store(fresh_url, node_name="node-b")
        insert_rows(other, ["dead"], clock.now - 1)
        results: list[int] = []
        worker = threading.Thread(target=lambda: results.append(busy.cleanup()))
        worker.start()
        try:
            assert busy.inside.wait(10)
            assert other.cleanup() == -1
        finally:
            busy.gate.set()
            worker.join()
        assert results == [1]
        assert other.cleanup() == 0  # released

    def test_cleaner_lock_of_a_hung_node_expires(self, fresh_url, make_store, clock):
        hung = make_store(fresh_url, cls=GatedStore, node_name="node-a")
        hung.gate, hung.inside = threading.Event(), threading.Event()
        other = make_store(fresh_url, node_name="node-b")
        worker = threading.Thread(target=hung.cleanup)
        worker.start()
        try:
            assert hung.inside.wait(10)
            assert other.cleanup() == -1
            insert_rows(other, ["dead"], clock.now)
            clock.now += CLEANER_LEASE + 1
            assert other.cleanup() == 1
        finally:
            hung.gate.set()
            worker.join()

    def test_background_cleaner(self, fresh_url, make_store, elapse):
        store = make_store(with_options(fresh_url, cleanup_interval=0.05))
        store.save("short", b"x", 1)
        store.save("long", b"x", 600)
        elapse(2)
        deadline = time.monotonic() + 30
        while count_rows(store) > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert count_rows(store) == 1 and store.load("long") is not None
        cleaner = store._cleaner
        store.close()
        assert cleaner is not None and not cleaner.is_alive()

    def test_cleaner_processes_never_overlap(self, fresh_url, make_store):
        setup = make_store(fresh_url, clock=time.time)
        now = time.time()
        insert_rows(setup, [f"dead-{i}" for i in range(250)], now - 100)
        insert_rows(setup, [f"live-{i}" for i in range(20)], now + 3600)
        url = with_options(fresh_url, cleanup_batch=40)
        rounds, barrier, out = 15, SPAWN.Barrier(2), SPAWN.Queue()
        procs = [
            SPAWN.Process(target=cleaner_process, args=(url, f"node-{n}", rounds, barrier, out))
            for n in "ab"
        ]
        for p in procs:
            p.start()
        reports = [out.get(timeout=300) for _ in procs]
        assert all(isinstance(r, tuple) for r in reports), "\n".join(map(str, reports))
        for p in procs:
            p.join(10)
            assert p.exitcode == 0
        passes = sorted((p for _, _, node_passes in reports for p in node_passes), key=lambda p: p[1])
        for (node1, _, end1), (node2, start2, _) in zip(passes, passes[1:]):
            assert start2 >= end1, f"{node2} started cleaning before {node1} finished"
        results = [r for _, node_results, _ in reports for r in node_results]
        assert sum(r for r in results if r > 0) == 250
        assert -1 in results  # the nodes did contend for the lock
        assert count_rows(setup) == 20

    # -- schema ------------------------------------------------------------------

    def test_migrate_creates_the_schema_and_is_idempotent(self, fresh_url, make_store):
        migrate(fresh_url)
        migrate(fresh_url)
        store = make_store(fresh_url)
        names = set(inspect(store.engine).get_table_names())
        assert {store.table.name, store.lock_table.name} <= names
        indexes = inspect(store.engine).get_indexes(store.table.name)
        assert any(ix["column_names"] == ["expires_at"] for ix in indexes)
        assert store.save("k", b"x", 60).ok

    def test_concurrent_first_use_creates_the_schema(self, fresh_url, make_store):
        stores = [make_store(fresh_url) for _ in range(6)]
        barrier = threading.Barrier(len(stores))
        errors: list[BaseException] = []

        def first_use(i: int) -> None:
            barrier.wait()
            try:
                stores[i].save(f"k{i}", b"x", 60)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=first_use, args=(i,)) for i in range(len(stores))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert count_rows(stores[0]) == len(stores)


def cleaner_process(url: str, node: str, rounds: int, barrier: Any, out: Any) -> None:
    """Call ``cleanup()`` ``rounds`` times in step with the other process;
    report ``(node, results, passes)``, or the traceback of a failure."""
    try:
        store = RecordingStore.from_url(url, node_name=node)
        store.passes = []
        results = []
        barrier.wait(120)  # both started (a slow machine may take long to spawn)
        for _ in range(rounds):
            barrier.wait(60)
            results.append(store.cleanup())
        store.close()
        out.put((node, results, store.passes))
    except BaseException:
        barrier.abort()
        out.put(traceback.format_exc())
        raise


class DroppingStore(SQLStore):
    """A store whose connection the server drops, once armed, just before the
    next statement that reads a record (a SELECT or an UPDATE ... RETURNING)."""

    armed = False

    def _run(self, conn: Connection, stmt: Any) -> Any:
        reads = isinstance(stmt, Select) or " RETURNING " in str(stmt.compile(dialect=self.engine.dialect))
        if self.armed and reads:
            self.armed = False
            drop_connection(self.engine, conn)
        return super()._run(conn, stmt)


def drop_connection(engine: Any, conn: Connection) -> None:
    """Have the server end ``conn``'s session, from another connection."""
    if engine.dialect.name == "postgresql":
        own, kill = "SELECT pg_backend_pid()", "SELECT pg_terminate_backend({})"
    else:
        own, kill = "SELECT CONNECTION_ID()", "KILL {}"
    backend = conn.exec_driver_sql(own).scalar()
    with engine.connect() as killer:
        killer.exec_driver_sql(kill.format(int(backend)))


class ServerTests:
    """For databases behind a server: a dropped connection."""

    @pytest.mark.parametrize("op", ["load", "load_and_touch", "lock"])
    def test_dropped_connection_is_unavailable_then_recovers(self, url, make_store, key, op):
        store = make_store(url, cls=DroppingStore)
        store.save(key, b"x", 60)
        store.armed = True
        call = {
            "load": lambda: store.load(key),
            "load_and_touch": lambda: store.load_and_touch(key, 60),
            "lock": lambda: store.lock(key, "t", 30, load_ttl=60),
        }[op]
        with pytest.raises(StoreUnavailable):
            call()
        assert store.load(key).data == b"x"
        assert store.lock(key, "other", 30)[0]  # no lock was left behind


class TestSQLite(SQLStoreTests):
    @pytest.fixture
    def base_url(self, tmp_path) -> str:
        return f"sqlite:///{tmp_path}/sessions.db"


class TestPostgreSQL(ServerTests, SQLStoreTests):
    @pytest.fixture
    def base_url(self, postgres_url: str) -> str:
        return postgres_url


class TestMariaDB(ServerTests, SQLStoreTests):
    @pytest.fixture
    def base_url(self, mariadb_url: str) -> str:
        return mariadb_url


# -- SQLite shared by processes ------------------------------------------------


def increment_process(url: str, key: str, times: int, barrier: Any) -> None:
    """Create ``key`` if nobody has, then increment it ``times`` times with retries."""
    store = SQLStore.from_url(url)
    barrier.wait(120)
    store.save(key, b"0", None, expect=None)
    for _ in range(times):
        while True:
            record = store.load(key)
            if store.save(key, str(int(record.data) + 1).encode(), None, expect=record.version).ok:
                break
    store.close()


def test_sqlite_writers_in_several_processes_are_exact(tmp_path):
    url = f"sqlite:///{tmp_path}/shared.db?cleanup_interval=0"
    barrier = SPAWN.Barrier(4)
    procs = [SPAWN.Process(target=increment_process, args=(url, "counter", 50, barrier)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 4
    store = SQLStore.from_url(url)
    try:
        assert store.load("counter").data == b"200"
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        store.close()


# -- configuration and connectivity --------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://root@127.0.0.1:1/test",
        "mysql://root@127.0.0.1:1/test",
        "sqlite:////nonexistent-dir/sub/sessions.db",
    ],
)
def test_unreachable_database_is_store_unavailable(url):
    store = SQLStore.from_url(url)
    started = time.monotonic()
    try:
        with pytest.raises(StoreUnavailable):
            store.load("k")
        with pytest.raises(StoreUnavailable):
            store.save("k", b"x", 60)
        with pytest.raises(StoreUnavailable):
            store.cleanup()
        with pytest.raises(StoreUnavailable):
            migrate(url)
    finally:
        store.close()
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(
    "url",
    [
        "not a url",
        "redis://127.0.0.1:6379/0",
        "sqlite://",
        "sqlite:///:memory:",
        "postgresql://root@127.0.0.1/test?pool_size=many",
        "postgresql://root@127.0.0.1/test?pool_size=0",
        "postgresql://root@127.0.0.1/test?table=drop;table",
        "postgresql://root@127.0.0.1/test?cleanup_interval=-1",
        "postgresql://root@127.0.0.1/test?cleanup_batch=0",
    ],
)
def test_bad_url_is_a_config_error(url):
    with pytest.raises(ConfigError) as info:
        SQLStore.from_url(url)
    assert info.value.field == "store"


def test_url_options_and_driver_mapping():
    store = SQLStore.from_url(
        "postgresql://root@127.0.0.1:5432/test?table=custom&pool_size=3&cleanup_interval=0&cleanup_batch=7"
    )
    try:
        assert store.engine.url.drivername == "postgresql+psycopg"
        assert dict(store.engine.url.query) == {}
        assert store.table.name == "custom" and store.lock_table.name == "custom_locks"
        assert store.engine.pool.size() == 3
    finally:
        store.close()
    store = SQLStore.from_url("mysql://root@127.0.0.1/test")
    assert store.engine.url.drivername == "mysql+pymysql"
    store.close()
