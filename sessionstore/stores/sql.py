"""SQL store: one row per session, through SQLAlchemy Core.

Supported URLs (bare schemes get the tested driver)::

    sqlite:///path/to/file.db              -> sqlite+pysqlite
    postgresql://user@host:port/db         -> postgresql+psycopg
    mysql://user:pw@host:port/db           -> mysql+pymysql (MariaDB is what we test)

Query options, removed before the URL reaches the driver: ``table`` (default
``sessionstore_sessions``), ``pool_size``, ``cleanup_interval`` (seconds,
default 60, ``0`` disables the background cleaner) and ``cleanup_batch``
(default 500).

Schema (created on first use, or ahead of time by :func:`migrate`)::

    <table>        id VARCHAR(255) PRIMARY KEY   -- the key (utf8mb4_bin on MySQL)
                   version BIGINT NOT NULL
                   expires_at DOUBLE NULL        -- epoch seconds, NULL = never; indexed
                   payload BLOB NOT NULL         -- BYTEA / BLOB / LONGBLOB
                   created_at DOUBLE NOT NULL    -- epoch seconds
                   updated_at DOUBLE NOT NULL    -- last data write
    <table>_locks  name VARCHAR(320) PRIMARY KEY -- companion_key(key, "lock") or the cleaner's
                   owner VARCHAR(255) NOT NULL
                   expires_at DOUBLE NOT NULL
    <table>_ix     ix VARCHAR(255)               -- index key <prefix>ix:{<sha256 hex>}
                   session VARCHAR(255)          -- session key; PRIMARY KEY (ix, session)
                   expires_at DOUBLE NULL        -- the entry ages out then; indexed, as is session
    <table>_inv    seq BIGINT AUTOINCREMENT PRIMARY KEY  -- the invalidation feed (sticky mode)
                   channel VARCHAR(255) NOT NULL
                   message BLOB NOT NULL
                   expires_at DOUBLE NOT NULL    -- kept one hour, then cleaned

The index table is both directions of the index: by ``ix`` it finds
sessions (joined with the sessions table, so only live sessions come back:
one SELECT), by ``session`` it drops a session's entries (one DELETE). Adding
entries is one multi-row upsert whose expiry only ever grows.

The feed is polled by sequence number: one ``SELECT ... WHERE seq > cursor``
per poll (plus any numbers still missing below the cursor: an insert that
took its number earlier but committed later is picked up on a later poll;
one still missing after 5 s counts as lost). SQLite uses AUTOINCREMENT, so
numbers never go back even when the cleaner has emptied the table.

Every time comes from the injected ``clock``; an expired row is treated as
absent by every statement (``expires_at IS NULL OR expires_at > now``) even
before the cleaner removes it.

Versions are BIGINTs: a row is born with a random 62-bit version (so a key
that is deleted and created again never reuses a version a stale writer may
still hold), a conditional save sets ``version = version + 1`` and an
unconditional save a fresh random one. Either way the new version is known
without reading it back.

Connections are pooled and in autocommit mode, so a one-statement operation
costs one round trip (no BEGIN/COMMIT). Statements per operation, as counted
by :func:`~sessionstore.stores.base.count_ops`:

=====================  ==========================  ===================================
operation              PostgreSQL, SQLite >= 3.35  MySQL/MariaDB (no UPDATE RETURNING)
=====================  ==========================  ===================================
load                   1 SELECT                    same
load_and_touch         1 UPDATE ... RETURNING      BEGIN, UPDATE, SELECT, COMMIT (4;
                                                   3 on a miss)
save, expect=ANY       1 upsert (ON CONFLICT)      1 upsert (ON DUPLICATE KEY)
save, expect=None      1 INSERT; taken: +1 UPDATE of an expired row; still taken: +1 SELECT
save, expect=version   1 UPDATE; failed: +1 SELECT (the ``current`` record)
touch, delete          1
lock                   1 INSERT; taken: +1 UPDATE of an expired lock; then load_and_touch
                       (if that fails, the lock is released again, best effort)
renew, unlock          1
save_and_unlock        save, then 1 DELETE of the lock (one pooled connection)
index_add              1 upsert of every entry (ON CONFLICT / ON DUPLICATE KEY)
index_find             1 SELECT joined with the sessions table
index_drop             1 DELETE
feed_publish           1 INSERT
feed_read (a poll)     1 SELECT
=====================  ==========================  ===================================

SQLite: one file shared by threads and processes, in WAL mode with a 30 s
busy timeout, so writers queue instead of failing.

A background daemon thread (started on first use, stopped by :meth:`close`)
calls :meth:`SQLStore.cleanup` every ``cleanup_interval`` seconds; the
cleaner lock row makes sure one node at a time cleans.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

from sqlalchemy import (
    BigInteger,
    Column,
    ColumnElement,
    Double,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    and_,
    case,
    create_engine,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Connection, CursorResult, Engine, Row
from sqlalchemy.engine.url import URL, make_url
from sqlalchemy.sql import ColumnCollection, Executable, Update

from ..errors import ConfigError, CorruptPayload, StoreUnavailable
from .base import ANY, NO_LOAD, FeedBatch, Record, SaveResult, companion_key, count_ops

__all__ = ["SQLStore", "migrate", "DEFAULT_TABLE"]

log = logging.getLogger(__name__)

DEFAULT_TABLE = "sessionstore_sessions"
#: Lock row of the background cleaner (session lock names end in ``:lock``).
CLEANER_LOCK = "sessionstore:cleaner"
#: Seconds the cleaner lock is held for; renewed after every batch.
CLEANER_LEASE = 60.0

_DRIVERS = {
    "sqlite": "sqlite+pysqlite",
    "postgresql": "postgresql+psycopg",
    "postgres": "postgresql+psycopg",
    "mysql": "mysql+pymysql",
    "mariadb": "mariadb+pymysql",
}
_BACKENDS = {"sqlite", "postgresql", "mysql", "mariadb"}
#: Leaves room for ``_locks`` and ``ix_..._expires_at`` within MySQL's 64 characters.
_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,47}")
_CONNECT_TIMEOUT = 5
_SQLITE_BUSY_TIMEOUT = 30.0
_VERSION_BITS = 62
_BIGINT = range(-(2**63), 2**63 - 1)  # a version + 1 must still fit
#: Failures meaning "the database cannot serve us now", not a bug.
_UNAVAILABLE = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)
#: How long the feed keeps a message, and waits for a number missing below its cursor.
_FEED_RETENTION = 3600.0
_FEED_GAP_WAIT = 5.0
_FEED_MAX_GAPS = 1000
_BEGIN = text("BEGIN")
_COMMIT = text("COMMIT")


# -- schema ------------------------------------------------------------------


def _key_type(length: int) -> Any:
    """VARCHAR for keys and tokens; on MySQL with a binary collation, so that
    they compare case-sensitively as everywhere else."""
    return String(length).with_variant(
        mysql.VARCHAR(length, charset="utf8mb4", collation="utf8mb4_bin"), "mysql", "mariadb"
    )


def define_tables(metadata: MetaData, table: str) -> tuple[Table, Table]:
    """The sessions table ``table`` and its lock table ``<table>_locks``."""
    sessions = Table(
        table,
        metadata,
        Column("id", _key_type(255), primary_key=True),
        Column("version", BigInteger, nullable=False),
        Column("expires_at", Double, nullable=True),
        Column(
            "payload",
            LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb"),
            nullable=False,
        ),
        Column("created_at", Double, nullable=False),
        Column("updated_at", Double, nullable=False),
        Index(f"ix_{table}_expires_at", "expires_at"),
    )
    locks = Table(
        f"{table}_locks",
        metadata,
        Column("name", _key_type(320), primary_key=True),
        Column("owner", _key_type(255), nullable=False),
        Column("expires_at", Double, nullable=False),
    )
    return sessions, locks


def define_index_tables(metadata: MetaData, table: str) -> tuple[Table, Table]:
    """The index table ``<table>_ix`` and the invalidation feed ``<table>_inv``."""
    index = Table(
        f"{table}_ix",
        metadata,
        Column("ix", _key_type(255), primary_key=True),
        Column("session", _key_type(255), primary_key=True),
        Column("expires_at", Double, nullable=True),
        Index(f"ix_{table}_ix_s", "session"),
        Index(f"ix_{table}_ix_e", "expires_at"),
    )
    feed = Table(
        f"{table}_inv",
        metadata,
        Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
        Column("channel", _key_type(255), nullable=False),
        Column("message", LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb"), nullable=False),
        Column("expires_at", Double, nullable=False),
        Index(f"ix_{table}_inv_e", "expires_at"),
        sqlite_autoincrement=True,  # never reuse a number, even after the cleaner emptied the table
    )
    return index, feed


@dataclass(frozen=True, slots=True)
class _FeedCursor:
    """The highest feed number read, and lower numbers not seen yet: ``(number, first missed at)``."""

    seq: int
    gaps: tuple[tuple[int, float], ...] = ()


# -- URL and engine ------------------------------------------------------------


def _option(url: URL, name: str, parse: Callable[[str], Any], default: Any) -> Any:
    raw = url.query.get(name)
    if raw is None:
        return default
    if not isinstance(raw, str):
        raise ConfigError("store", f"{name} is given more than once")
    try:
        return parse(raw)
    except ValueError:
        raise ConfigError("store", f"{name}={raw!r} is not valid") from None


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError(raw)
    return value


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if not value >= 0 or value == float("inf"):
        raise ValueError(raw)
    return value


def _table_name(raw: str) -> str:
    if not _TABLE_NAME.fullmatch(raw):
        raise ValueError(raw)
    return raw


def _parse_url(url: str) -> tuple[URL, dict[str, Any]]:
    """The driver URL (bare schemes mapped, our options removed) and our options."""
    try:
        parsed = make_url(url)
    except (sa_exc.ArgumentError, ValueError) as exc:
        raise ConfigError("store", f"not a database URL: {exc}") from None
    backend = parsed.get_backend_name()
    if backend not in _BACKENDS and parsed.drivername not in _DRIVERS:
        raise ConfigError("store", f"unsupported SQL database {parsed.drivername!r}")
    if backend == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise ConfigError("store", "sqlite needs a file: sqlite:///path/to/file.db")
    options = {
        "table": _option(parsed, "table", _table_name, DEFAULT_TABLE),
        "pool_size": _option(parsed, "pool_size", _positive_int, None),
        "cleanup_interval": _option(parsed, "cleanup_interval", _non_negative_float, 60.0),
        "cleanup_batch": _option(parsed, "cleanup_batch", _positive_int, 500),
    }
    parsed = parsed.difference_update_query(list(options))
    return parsed.set(drivername=_DRIVERS.get(parsed.drivername, parsed.drivername)), options


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """WAL lets readers run beside the one writer of a file shared by processes.

    WAL is a property of the file: only the first connection switches it,
    and the switch needs the file to itself for a moment. SQLite does not
    wait for that (no busy handler), so retry within the busy timeout.
    """
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA synchronous=NORMAL")
        deadline = time.monotonic() + _SQLITE_BUSY_TIMEOUT
        while cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            try:
                cursor.execute("PRAGMA journal_mode=WAL")
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
    finally:
        cursor.close()


def create_store_engine(url: URL, pool_size: int | None = None) -> Engine:
    """A pooled engine whose connections are in autocommit mode, and whose errors and logs
    never show statement parameters (session keys and payloads).

    Autocommit saves the BEGIN/COMMIT round trips of one-statement operations;
    the few multi-statement ones open their transaction explicitly.
    """
    # hide_parameters: the errors that propagate (and SQL echo) never show session keys or payloads
    kwargs: dict[str, Any] = {"isolation_level": "AUTOCOMMIT", "skip_autocommit_rollback": True,
                              "hide_parameters": True}
    if pool_size is not None:
        kwargs["pool_size"] = pool_size
    if url.get_backend_name() == "sqlite":
        kwargs["connect_args"] = {"timeout": _SQLITE_BUSY_TIMEOUT}
    else:
        kwargs["connect_args"] = {"connect_timeout": _CONNECT_TIMEOUT}
        kwargs["pool_recycle"] = 1800
    for name in list(kwargs["connect_args"]):
        if name in url.query:  # the URL's own driver argument wins
            del kwargs["connect_args"][name]
    engine = create_engine(url, **kwargs)
    if url.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


# -- helpers -------------------------------------------------------------------


def _new_version() -> int:
    return secrets.randbits(_VERSION_BITS)


def _is_version(value: Any) -> bool:
    """Could ``value`` be one of our versions (else it matches no row)?"""
    return type(value) is int and value in _BIGINT


def _record(row: Row[Any] | None) -> Record | None:
    """The record in a row. SQLite keeps any type in any column, so a row written by
    someone else may hold text or a number where the payload or the version belongs.

    :raise CorruptPayload: (``record``) the payload is not bytes or the version not an integer.
    """
    if row is None:
        return None
    payload, version = row.payload, row.version
    if not isinstance(payload, (bytes, bytearray, memoryview)) or type(version) is not int:
        raise CorruptPayload(f"bad record: SQL row holds a {type(payload).__name__} payload and a "
                             f"{type(version).__name__} version", part="record")
    return Record(bytes(payload), version)


def _message(value: Any) -> bytes:
    """A feed message column as bytes (text planted in SQLite is passed on as UTF-8, for the
    feed's own decoder to judge; any other type as nothing, which it rejects)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return value.encode("utf-8", "replace") if isinstance(value, str) else b""


def _upsert(
    dialect: str,
    table: Table,
    values: Mapping[str, Any],
    assignments: Callable[[ColumnCollection[str, Any]], Sequence[tuple[str, Any]]],
) -> Executable:
    """INSERT ``values``; if the key exists, UPDATE that row instead.

    ``assignments(new)`` gives the SET clause, in order (MySQL evaluates it
    left to right); ``new`` holds the values that were to be inserted
    (``EXCLUDED`` / ``VALUES()``) and plain columns are the existing row's.
    """
    if dialect in ("mysql", "mariadb"):
        stmt = mysql.insert(table).values(values)
        return stmt.on_duplicate_key_update(list(assignments(stmt.inserted)))
    stmt = (postgresql if dialect == "postgresql" else sqlite).insert(table).values(values)
    return stmt.on_conflict_do_update(index_elements=[table.c.id], set_=dict(assignments(stmt.excluded)))


class SQLStore:
    """Sessions in one SQL table; implements ``Store`` and ``LockingStore``.

    Thread-safe; the engine's pool is shared by all threads. The schema is
    created on first use and the cleaner thread started then.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        table: str = DEFAULT_TABLE,
        clock: Callable[[], float] = time.time,
        cleanup_interval: float = 60.0,
        cleanup_batch: int = 500,
        node_name: str | None = None,
    ) -> None:
        if not _TABLE_NAME.fullmatch(table):
            raise ConfigError("store", f"table={table!r} is not a plain SQL identifier")
        if cleanup_batch < 1 or cleanup_interval < 0:
            raise ConfigError("store", "cleanup_batch must be >= 1 and cleanup_interval >= 0")
        self._engine = engine
        self._clock = clock
        self._cleanup_interval = cleanup_interval
        self._cleanup_batch = cleanup_batch
        self.node_name = node_name or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.metadata = MetaData()
        self.table, self.lock_table = define_tables(self.metadata, table)
        self.index_table, self.feed_table = define_index_tables(self.metadata, table)
        self._ready = False
        self._init_lock = threading.Lock()
        self._closed = threading.Event()
        self._cleaner: threading.Thread | None = None

    @classmethod
    def from_url(cls, url: str, *, clock: Callable[[], float] = time.time, node_name: str | None = None) -> SQLStore:
        """A store for ``url`` (see the module docstring); ``ConfigError`` if it is bad."""
        engine_url, options = _parse_url(url)
        engine = create_store_engine(engine_url, options.pop("pool_size"))
        return cls(engine, clock=clock, node_name=node_name, **options)

    @property
    def engine(self) -> Engine:
        return self._engine

    # -- plumbing ----------------------------------------------------------

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        """The error to raise for ``exc``. It quotes the driver's own error only: SQLAlchemy's text
        adds the statement's parameters (session keys, so ids, and payloads), and the message
        reaches logs and debug records."""
        where = self._engine.url.render_as_string(hide_password=True)
        cause = exc.orig if isinstance(exc, sa_exc.DBAPIError) and exc.orig is not None else exc
        return StoreUnavailable(f"SQL store {where}: {type(cause).__name__}: {cause}")

    @contextmanager
    def _connect(self) -> Iterator[Connection]:
        """A pooled autocommit connection; connectivity failures become ``StoreUnavailable``."""
        self._ensure_ready()
        try:
            with self._engine.connect() as conn:
                yield conn
        except _UNAVAILABLE as exc:
            raise self._unavailable(exc) from exc
        except sa_exc.DBAPIError as exc:
            if exc.connection_invalidated:
                raise self._unavailable(exc) from exc
            raise

    @staticmethod
    def _run(conn: Connection, stmt: Executable) -> CursorResult[Any]:
        """Execute one statement, counting it for the request's op counter."""
        count_ops(1)
        return conn.execute(stmt)

    @contextmanager
    def _transaction(self, conn: Connection) -> Iterator[None]:
        """An explicit transaction on an autocommit connection (BEGIN ... COMMIT)."""
        self._run(conn, _BEGIN)
        try:
            yield
        except BaseException:
            if not conn.invalidated:  # a lost connection has no transaction left
                try:
                    conn.exec_driver_sql("ROLLBACK")
                except sa_exc.SQLAlchemyError:
                    conn.invalidate()  # never pool a connection stuck in a transaction
            raise
        self._run(conn, _COMMIT)

    def _ensure_ready(self) -> None:
        """Create the schema and start the cleaner, once."""
        if self._ready:
            return
        with self._init_lock:
            if self._ready:
                return
            self.create_schema()
            self._ready = True
            self._start_cleaner()

    def create_schema(self, attempts: int = 5) -> None:
        """Create both tables and the index if missing; safe against concurrent creators.

        A creator that loses the race gets a "table exists" error from its
        CREATE; it tries again and finds the tables.
        """
        try:
            with self._engine.connect() as conn:
                for attempt in range(1, attempts + 1):
                    try:
                        self.metadata.create_all(conn, checkfirst=True)
                        return
                    except sa_exc.DBAPIError as exc:
                        if exc.connection_invalidated or attempt == attempts:
                            raise
                        log.debug("schema creation raced (%s); checking again", exc)
        except _UNAVAILABLE as exc:
            raise self._unavailable(exc) from exc

    # -- statements ----------------------------------------------------------

    def _live(self, now: float) -> ColumnElement[bool]:
        expires = self.table.c.expires_at
        return or_(expires.is_(None), expires > now)

    @staticmethod
    def _expires(ttl: int | None, now: float) -> float | None:
        return None if ttl is None else now + ttl

    def _select(self, conn: Connection, key: str, now: float) -> Record | None:
        t = self.table
        stmt = select(t.c.payload, t.c.version).where(t.c.id == key, self._live(now))
        return _record(self._run(conn, stmt).first())

    def _touch(self, key: str, ttl: int | None, now: float) -> Update:
        """UPDATE the expiry of the live row ``key`` to ``ttl`` from ``now``."""
        t = self.table
        return update(t).where(t.c.id == key, self._live(now)).values(expires_at=self._expires(ttl, now))

    def _touch_and_read(self, conn: Connection, key: str, ttl: int | None, now: float) -> Record | None:
        """Slide the expiry of a live row and return it: UPDATE ... RETURNING where
        the dialect has it, else UPDATE then SELECT in one transaction."""
        t = self.table
        stmt = self._touch(key, ttl, now)
        if self._engine.dialect.update_returning:
            return _record(self._run(conn, stmt.returning(t.c.payload, t.c.version)).first())
        with self._transaction(conn):
            if self._run(conn, stmt).rowcount != 1:
                return None
            return _record(self._run(conn, select(t.c.payload, t.c.version).where(t.c.id == key)).first())

    def _conflict(self, conn: Connection, key: str, now: float) -> SaveResult:
        return SaveResult(False, current=self._select(conn, key, now))

    def _save(self, conn: Connection, key: str, data: bytes, ttl: int | None, expect: Any) -> SaveResult:
        now = self._clock()
        expires = self._expires(ttl, now)
        if expect is ANY:
            return self._overwrite(conn, key, data, expires, now)
        if expect is None:
            return self._create(conn, key, data, expires, now)
        return self._replace(conn, key, data, expires, now, expect)

    def _overwrite(self, conn: Connection, key: str, data: bytes, expires: float | None, now: float) -> SaveResult:
        """Unconditional save: one upsert. An expired row it replaces gets a new ``created_at``."""
        t = self.table
        version = _new_version()
        values = dict(id=key, version=version, payload=data, expires_at=expires, created_at=now, updated_at=now)
        reborn = case((and_(t.c.expires_at.is_not(None), t.c.expires_at <= now), now), else_=t.c.created_at)

        def assignments(new: ColumnCollection[str, Any]) -> list[tuple[str, Any]]:
            changed = ("version", "payload", "expires_at", "updated_at")
            return [("created_at", reborn), *((name, new[name]) for name in changed)]

        self._run(conn, _upsert(self._engine.dialect.name, t, values, assignments))
        return SaveResult(True, version=version)

    def _create(self, conn: Connection, key: str, data: bytes, expires: float | None, now: float) -> SaveResult:
        """Save only if absent: INSERT, or take over an expired row."""
        t = self.table
        version = _new_version()
        values = dict(version=version, payload=data, expires_at=expires, created_at=now, updated_at=now)
        try:
            self._run(conn, insert(t).values(id=key, **values))
            return SaveResult(True, version=version)
        except sa_exc.IntegrityError:
            pass
        stmt = update(t).where(t.c.id == key, t.c.expires_at <= now).values(**values)
        if self._run(conn, stmt).rowcount == 1:
            return SaveResult(True, version=version)
        return self._conflict(conn, key, now)

    def _replace(
        self, conn: Connection, key: str, data: bytes, expires: float | None, now: float, expect: Any
    ) -> SaveResult:
        """Save only over version ``expect`` of a live row."""
        if not _is_version(expect):
            return self._conflict(conn, key, now)
        t = self.table
        stmt = (
            update(t)
            .where(t.c.id == key, t.c.version == expect, self._live(now))
            .values(payload=data, version=t.c.version + 1, expires_at=expires, updated_at=now)
        )
        if self._run(conn, stmt).rowcount == 1:
            return SaveResult(True, version=expect + 1)
        return self._conflict(conn, key, now)

    # -- Store ---------------------------------------------------------------

    def load(self, key: str) -> Record | None:
        """The live record under ``key``; the expiry is unchanged."""
        with self._connect() as conn:
            return self._select(conn, key, self._clock())

    def load_and_touch(self, key: str, ttl: int | None) -> Record | None:
        """The live record under ``key``, its expiry slid to ``ttl`` from now."""
        with self._connect() as conn:
            return self._touch_and_read(conn, key, ttl, self._clock())

    def save(self, key: str, data: bytes, ttl: int | None, expect: Any = ANY) -> SaveResult:
        """Write ``data`` (conditionally on ``expect``, see the store contract)."""
        with self._connect() as conn:
            return self._save(conn, key, bytes(data), ttl, expect)

    def touch(self, key: str, ttl: int | None) -> bool:
        """Slide the expiry of a live row; ``False`` if there is none."""
        stmt = self._touch(key, ttl, self._clock())
        with self._connect() as conn:
            return self._run(conn, stmt).rowcount == 1

    def delete(self, key: str, expect: Any = ANY) -> bool:
        """Delete the live row (only at version ``expect`` if given); ``True`` if one went."""
        if expect is not ANY and not _is_version(expect):
            return False
        t = self.table
        stmt = delete(t).where(t.c.id == key, self._live(self._clock()))
        if expect is not ANY:
            stmt = stmt.where(t.c.version == expect)
        with self._connect() as conn:
            return self._run(conn, stmt).rowcount == 1

    def close(self) -> None:
        """Stop the cleaner (after its current batch) and close pooled connections."""
        self._closed.set()
        cleaner = self._cleaner
        if cleaner is not None and cleaner is not threading.current_thread():
            cleaner.join(timeout=30)
        self._engine.dispose()

    # -- locks -----------------------------------------------------------------

    def _acquire(self, conn: Connection, name: str, owner: str, until: float, now: float) -> bool:
        """Take lock ``name`` for ``owner`` if free: INSERT, or UPDATE an expired one.

        Either statement succeeds for one contender only (primary key; the
        UPDATE re-checks ``expires_at`` under the row lock).
        """
        locks = self.lock_table
        try:
            self._run(conn, insert(locks).values(name=name, owner=owner, expires_at=until))
            return True
        except sa_exc.IntegrityError:
            pass
        stmt = update(locks).where(locks.c.name == name, locks.c.expires_at <= now)
        return self._run(conn, stmt.values(owner=owner, expires_at=until)).rowcount == 1

    def _held(self, name: str, owner: str, now: float) -> ColumnElement[bool]:
        locks = self.lock_table
        return and_(locks.c.name == name, locks.c.owner == owner, locks.c.expires_at > now)

    def _renew(self, conn: Connection, name: str, owner: str, until: float, now: float) -> bool:
        stmt = update(self.lock_table).where(self._held(name, owner, now)).values(expires_at=until)
        return self._run(conn, stmt).rowcount == 1

    def _release(self, conn: Connection, name: str, owner: str, now: float) -> bool:
        """Delete the lock if ``owner`` still holds it (an expired one is left for others)."""
        return self._run(conn, delete(self.lock_table).where(self._held(name, owner, now))).rowcount == 1

    def lock(self, key: str, token: str, expiry: float, load_ttl: Any = NO_LOAD) -> tuple[bool, Record | None]:
        """Try once to take the lock of ``key``; see ``LockingStore.lock``."""
        now = self._clock()
        name = companion_key(key, "lock")
        with self._connect() as conn:
            if not self._acquire(conn, name, token, now + expiry, now):
                return False, None
            if load_ttl is NO_LOAD:
                return True, None
            try:
                return True, self._touch_and_read(conn, key, load_ttl, now)
            except BaseException:
                self._release_after_failure(name, token)
                raise

    def _release_after_failure(self, name: str, token: str) -> None:
        """Best effort, on a fresh connection: the caller gets an error, not the
        lock. If the database is gone too, the lock expires by itself."""
        try:
            with self._engine.connect() as conn:
                self._release(conn, name, token, self._clock())
        except sa_exc.SQLAlchemyError:
            log.debug("could not release lock %s after a failure", name, exc_info=True)

    def renew(self, key: str, token: str, expiry: float) -> bool:
        """Extend the lock for ``expiry`` seconds if ``token`` still holds it."""
        now = self._clock()
        with self._connect() as conn:
            return self._renew(conn, companion_key(key, "lock"), token, now + expiry, now)

    def unlock(self, key: str, token: str) -> bool:
        """Release the lock if ``token`` holds it (and it has not expired)."""
        with self._connect() as conn:
            return self._release(conn, companion_key(key, "lock"), token, self._clock())

    def save_and_unlock(self, key: str, data: bytes, ttl: int | None, expect: Any, token: str) -> SaveResult:
        """``save``, then release ``token``'s lock whatever the save's outcome."""
        with self._connect() as conn:
            result = self._save(conn, key, bytes(data), ttl, expect)
            self._release(conn, companion_key(key, "lock"), token, self._clock())
            return result

    # -- index (IndexStore) ------------------------------------------------------------

    def index_add(self, key: str, index_keys: Sequence[str], ttl: int | None) -> None:
        """One multi-row upsert: an entry that exists keeps the later of its two expiries."""
        names = list(dict.fromkeys(index_keys))
        if not names:
            return
        ix = self.index_table
        expires = self._expires(ttl, self._clock())
        rows = [dict(ix=name, session=key, expires_at=expires) for name in names]
        dialect = self._engine.dialect.name
        if dialect in ("mysql", "mariadb"):
            stmt = mysql.insert(ix).values(rows)
            new = stmt.inserted.expires_at
            stmt = stmt.on_duplicate_key_update(expires_at=_later_expiry(ix.c.expires_at, new))
        else:
            stmt = (postgresql if dialect == "postgresql" else sqlite).insert(ix).values(rows)
            new = stmt.excluded.expires_at
            stmt = stmt.on_conflict_do_update(index_elements=[ix.c.ix, ix.c.session],
                                              set_={"expires_at": _later_expiry(ix.c.expires_at, new)})
        with self._connect() as conn:
            self._run(conn, stmt)

    def index_find(self, index_key: str) -> list[str]:
        """Live sessions under ``index_key``: one SELECT joined with the sessions table."""
        ix, t, now = self.index_table, self.table, self._clock()
        stmt = (
            select(ix.c.session)
            .join(t, t.c.id == ix.c.session)
            .where(ix.c.ix == index_key, or_(ix.c.expires_at.is_(None), ix.c.expires_at > now), self._live(now))
            .order_by(ix.c.session)
        )
        with self._connect() as conn:
            return list(self._run(conn, stmt).scalars())

    def index_drop(self, key: str) -> int:
        """One DELETE of the session's rows."""
        ix = self.index_table
        with self._connect() as conn:
            return self._run(conn, delete(ix).where(ix.c.session == key)).rowcount

    # -- invalidation feed (PollFeed) ---------------------------------------------------

    def feed_publish(self, channel: str, message: bytes) -> None:
        """One INSERT; the database numbers the message."""
        stmt = insert(self.feed_table).values(channel=channel, message=bytes(message),
                                              expires_at=self._clock() + _FEED_RETENTION)
        with self._connect() as conn:
            self._run(conn, stmt)

    def feed_position(self, channel: str) -> _FeedCursor:
        feed = self.feed_table
        with self._connect() as conn:
            last = self._run(conn, select(func.max(feed.c.seq)).where(feed.c.channel == channel)).scalar()
        return _FeedCursor(int(last or 0))

    def feed_read(self, channel: str, cursor: Any) -> FeedBatch:
        """Messages numbered after ``cursor`` (and any it still misses below): one SELECT."""
        if not isinstance(cursor, _FeedCursor):
            raise TypeError("feed_read takes a cursor from feed_position or feed_read")
        feed = self.feed_table
        gaps = dict(cursor.gaps)
        wanted = feed.c.seq > cursor.seq
        if gaps:
            wanted = or_(wanted, feed.c.seq.in_(list(gaps)))
        stmt = select(feed.c.seq, feed.c.message).where(feed.c.channel == channel, wanted).order_by(feed.c.seq)
        with self._connect() as conn:
            rows = [(int(seq), _message(message)) for seq, message in self._run(conn, stmt)]
        now, lost = time.monotonic(), False
        found = {seq for seq, _ in rows}
        top = max([cursor.seq, *found])
        for seq in range(cursor.seq + 1, top):
            if seq not in found:
                gaps[seq] = now  # taken by an insert that has not committed yet (or never will)
        still = []
        for seq, since in gaps.items():
            if seq in found:
                continue
            if now - since < _FEED_GAP_WAIT:
                still.append((seq, since))
            else:
                lost = True
        if len(still) > _FEED_MAX_GAPS:
            lost, still = True, sorted(still)[-_FEED_MAX_GAPS:]
        return FeedBatch([message for _, message in rows], _FeedCursor(top, tuple(sorted(still))), lost)

    # -- cleaner -----------------------------------------------------------------

    def cleanup(self) -> int:
        """One cleaning pass if this node gets the cleaner lock.

        Returns the number of expired session rows deleted, or ``-1`` when
        another node holds the lock. Expired lock rows are removed too (not
        counted).
        """
        now = self._clock()
        with self._connect() as conn:
            if not self._acquire(conn, CLEANER_LOCK, self.node_name, now + CLEANER_LEASE, now):
                return -1
            try:
                return self._purge_expired(conn)
            finally:
                self._release(conn, CLEANER_LOCK, self.node_name, self._clock())

    def _purge_expired(self, conn: Connection) -> int:
        """Delete expired sessions, then expired locks, batch by batch.

        The cleaner lock is renewed after every batch; the pass stops if it
        was lost (lease ran out) or the store is closing.
        """
        deleted = 0
        tables = (
            (self.table, self.table.c.id),
            (self.lock_table, self.lock_table.c.name),
            (self.index_table, self.index_table.c.ix),
            (self.feed_table, self.feed_table.c.seq),
        )
        for table, key in tables:
            while True:
                found, gone = self._purge_batch(conn, table, key, self._clock())
                deleted += gone if table is self.table else 0
                if found < self._cleanup_batch:
                    break
                if self._closed.is_set() or not self._keep_cleaner_lock(conn):
                    return deleted
        return deleted

    def _keep_cleaner_lock(self, conn: Connection) -> bool:
        now = self._clock()
        return self._renew(conn, CLEANER_LOCK, self.node_name, now + CLEANER_LEASE, now)

    def _purge_batch(self, conn: Connection, table: Table, key: Column[Any], now: float) -> tuple[int, int]:
        """Delete up to ``cleanup_batch`` rows expired at ``now``: (found, deleted).

        SELECT the keys then DELETE them by key (re-checking the expiry, as a
        row may have been touched in between): two short autocommit
        statements that lock only those rows, and portable (MySQL has no
        LIMIT in an IN subquery, PostgreSQL no DELETE ... LIMIT).
        """
        expired = table.c.expires_at <= now
        stmt = select(key).where(expired).order_by(table.c.expires_at).limit(self._cleanup_batch)
        keys = list(self._run(conn, stmt).scalars())
        if not keys:
            return 0, 0
        return len(keys), self._run(conn, delete(table).where(key.in_(keys), expired)).rowcount

    def _start_cleaner(self) -> None:
        if self._cleanup_interval <= 0 or self._closed.is_set():
            return
        self._cleaner = threading.Thread(target=self._clean_forever, name="sessionstore-sql-cleaner", daemon=True)
        self._cleaner.start()

    def _clean_forever(self) -> None:
        while not self._closed.wait(self._cleanup_interval):
            try:
                self.cleanup()
            except Exception:  # keep cleaning on the next round
                log.warning("session cleanup failed", exc_info=True)


def _later_expiry(old: Any, new: Any) -> Any:
    """SQL for the later of two expiries, ``NULL`` meaning never."""
    return case((or_(old.is_(None), new.is_(None)), None), (new > old, new), else_=old)


def migrate(url: str) -> None:
    """Create the store's tables for ``url`` if missing (``sessionstore migrate``)."""
    store = SQLStore.from_url(url)
    try:
        store.create_schema()
    finally:
        store.close()
