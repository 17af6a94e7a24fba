"""Issue 14: bytes planted directly in real stores, property-based, at every layer.

Each backend writes with its own raw client, bypassing sessionstore: a Redis
key through redis-py, every memcached node through pymemcache, a SQLite row
through ``sqlite3``, the memory store's dict. Bytes go at a session key (a
fresh id's, whose signed cookie the request then sends), at a tombstone key
(the session itself absent, so the miss path reads it), and at an index
record (a login recording a CAS ticket writes it). Whatever was planted:

- no response is a 500;
- when the bytes do not decode (judged by sessionstore's own decoders, so
  that a mutation which happens to stay valid is not called corrupt), the
  request's debug record, in the ``X-Session-Debug`` header and in the JSON
  logged on ``sessionstore.debug``, names ``corrupt-payload``, the request
  got a new session, and the planted bytes are still there, byte-equal.

Example counts are small: the whole file runs in seconds.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from dataclasses import dataclass
from typing import Callable, Iterator

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st
from pymemcache.client.base import Client as MemcacheClient

from sessionstore import CorruptPayload, SessionMiddleware
from sessionstore.ids import new_id
from sessionstore.index import index_key
from sessionstore.payload import Meta, decode, encode
from sessionstore.serializers import get_serializer
from sessionstore.stores.base import companion_key
from sessionstore.stores.memcached import _read_entries
from sessionstore.stores.memory import MemoryStore
from sessionstore.tombstones import read_stone
from tests.helpers import FakeClock, json_app
from tests.servers.memcached_fixtures import memcached_peek
from tests.servers.redis_fixtures import redis_client

SECRET = "hostile-stores"
JSON = get_serializer("json", [SECRET])
VERSION = b"0123456789abcdef"  # a well-formed Redis version header
PROPERTY = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

HANDLERS = {  # the id is read last: a read that meets corrupt data replaces the session
    "/read": lambda s, e: {"all": dict(s), "user": s.get("user"), "new": s.is_new, "id": s.id},
    "/write": lambda s, e: (s.__setitem__("cart", ["book"]), s.id)[1],
    "/login": lambda s, e: (s.__setitem__("user", "alice"), s.index("cas", e["QUERY_STRING"]), s.id)[2],
}


# -- planting ---------------------------------------------------------------------------------------


@dataclass
class Backend:
    """A middleware on one real store, and raw access to that store around sessionstore."""

    name: str
    mw: SessionMiddleware
    put: Callable[[str, bytes], None]
    get: Callable[[str], object]
    framed: bool = False  # Redis: a value is <version header><data>
    copies: int = 1  # memcached: ``get`` reads every node

    def holds(self, key: str, raw: bytes) -> bool:
        """Whether ``key`` still holds exactly ``raw`` (on every node that got it)."""
        return self.get(key) == (raw if self.copies == 1 else [raw] * self.copies)


def _redis_backend(server, prefix: str) -> Backend:
    raw = redis_client(server.port)
    mw = _middleware(server.url, prefix)
    return Backend("redis", mw, lambda k, d: raw.set(k, d), lambda k: raw.get(k), framed=True)


def _memcached_backend(ring, prefix: str) -> Backend:
    # the ring's nodes (primary and backup copies alike); the failover-only node stays empty, as other
    # tests of this session check it is unused while the ring is up
    ports = [s.port for s in ring.ring]

    def put(key: str, data: bytes) -> None:
        for port in ports:
            client = MemcacheClient(("127.0.0.1", port), connect_timeout=2, timeout=2)
            try:
                client.set(key, data, expire=300, noreply=False)
            finally:
                client.close()

    return Backend("memcached", _middleware(ring.url(), prefix), put,
                   lambda k: [(memcached_peek(p, k) or (None,))[0] for p in ports], copies=len(ports))


def _sqlite_backend(path, prefix: str) -> Backend:
    mw = _middleware(f"sqlite:///{path}?cleanup_interval=0", prefix)
    mw.manager.store.load(prefix + "schema")  # the tables exist from the first use on
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    table = "sessionstore_sessions"

    def put(key: str, data: bytes) -> None:
        db.execute(f"INSERT OR REPLACE INTO {table} (id, version, expires_at, payload, created_at, updated_at) "
                   "VALUES (?, 7, NULL, ?, 0, 0)", (key, data))

    def get(key: str) -> object:
        row = db.execute(f"SELECT payload FROM {table} WHERE id = ?", (key,)).fetchone()
        return None if row is None else row[0]

    backend = Backend("sqlite", mw, put, get)
    backend.db = db  # type: ignore[attr-defined]
    return backend


def _memory_backend(prefix: str) -> Backend:
    store = MemoryStore(clock=FakeClock())
    mw = _middleware(store, prefix)

    def put(key: str, data: bytes) -> None:
        store._entries[key] = (bytes(data), 10**9, None)

    return Backend("memory", mw, put, lambda k: store._entries.get(k, (None,))[0])


def _middleware(store, prefix: str) -> SessionMiddleware:
    return SessionMiddleware(json_app(HANDLERS), store=store, secret_key=SECRET, debug=True, key_prefix=prefix)


def _backend(request, tmp_path_factory) -> Iterator[Backend]:
    prefix = f"hostile{new_id()[:8]}:"
    if request.param == "redis":
        made = _redis_backend(request.getfixturevalue("redis_server"), prefix)
    elif request.param == "memcached":
        made = _memcached_backend(request.getfixturevalue("memcached_cluster"), prefix)
    elif request.param == "sqlite":
        made = _sqlite_backend(tmp_path_factory.mktemp("hostile") / "sessions.db", prefix)
    else:
        made = _memory_backend(prefix)
    yield made
    made.mw.manager.close()


@pytest.fixture(scope="module", params=["memory", "redis", "memcached", "sqlite"])
def backend(request, tmp_path_factory) -> Iterator[Backend]:
    yield from _backend(request, tmp_path_factory)


@pytest.fixture(scope="module", params=["redis", "memcached"])
def indexed_backend(request, tmp_path_factory) -> Iterator[Backend]:
    """The stores whose index records are stored bytes a request reads (memory keeps objects;
    SQL keeps rows, see ``test_rows_planted_in_the_sql_index_are_never_returned``)."""
    yield from _backend(request, tmp_path_factory)


@pytest.fixture(scope="module")
def records() -> Iterator[list[dict]]:
    """The debug records logged on ``sessionstore.debug``, parsed (the last is the last request's)."""
    found: list[dict] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found.append(json.loads(record.getMessage()))

    logger = logging.getLogger("sessionstore.debug")
    handler, level = Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield found
    logger.removeHandler(handler)
    logger.setLevel(level)


def call(mw: SessionMiddleware, path: str, session_id: str | None = None, query: str = ""):
    """One request, the body read and closed as a server does: ``(status, headers, JSON body)``."""
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": query, "SERVER_NAME": "localhost",
               "SERVER_PORT": "80", "wsgi.url_scheme": "http", "wsgi.input": None, "wsgi.errors": None}
    if session_id is not None:
        environ["HTTP_COOKIE"] = f"session={mw.manager.signer.sign(session_id)}"
    seen: list = []
    body = mw(environ, lambda status, headers, exc_info=None: seen.append((status, dict(headers))))
    data = b"".join(body)
    body.close()
    status, headers = seen[-1]
    return status, headers, json.loads(data) if status.startswith("200") else data


def issued_id(backend: Backend, headers: dict) -> str | None:
    """The session id the response's cookie carries (None: no session cookie set)."""
    cookie = headers.get("Set-Cookie", "").split(";")[0].partition("=")[2]
    return backend.mw.manager.signer.unsign(cookie) if cookie else None


def assert_corrupt_outcome(status, headers, records, planted_id: str, issued_id: str) -> None:
    assert status == "200 OK"
    assert "corrupt-payload" in headers["X-Session-Debug"], headers["X-Session-Debug"]
    assert "corrupt-payload" in records[-1]["causes"], records[-1]
    assert issued_id != planted_id


# -- what decodes (sessionstore's own judgement, to tell valid mutations apart) ---------------------


def payload_decodes(data: bytes) -> bool:
    try:
        payload = decode(data)
        for name in payload.names():
            JSON.loads(payload.blob(name))
    except CorruptPayload:
        return False
    return payload.meta.serializer == "json"


def stone_decodes(data: bytes) -> bool:
    try:
        read_stone(data)
    except CorruptPayload:
        return False
    return True


# -- strategies -------------------------------------------------------------------------------------

VALID = encode(Meta(1_700_000_000.0, 1_700_000_000.0, 1800, "json"),
               [("user", b'"alice"', (1, 1)), ("cart", b'{" t":[1,{" s":[2]}]}', (2, 1)), ("n", b"7", (1, 1))])
HOSTILE_BLOBS = [b'{" u": 123}', b'{" n": "x"}', b'{" s": [[1]]}', b'{" m": [1]}', b"[" * 200 + b"]" * 200,
                 b'"\\ud800"', b'"\xff"', b"{", b"1 2", b'{" d": "x"}']
HOSTILE_HEADS = [b'{"c":NaN,"l":1,"i":60,"s":"json","b":%d}', b'{"c":Infinity,"l":1,"i":60,"s":"json","b":%d}',
                 b'{"c":1,"l":1,"i":60,"s":"json","b":%d,"x":{"cas":"ST"}}', b'{"c":1,"l":1,"i":1.5,"s":"j","b":%d}',
                 b'{"c":1,"l":1,"i":60,"s":"json","b":%d,"q":' + b"[" * 300 + b"]" * 300 + b"}", b"[]"]


def _replace_blob(blob: bytes) -> bytes:
    return encode(Meta(1.0, 1.0, 60, "json"), [("user", blob, (1, 1)), ("n", b"7", (1, 1))])


def _replace_head(head: bytes) -> bytes:
    meta_len = int.from_bytes(VALID[3:7], "big")
    head = head.replace(b"%d", str(decode(VALID).meta and len(VALID) - decode(VALID)._blobs_at).encode())
    return b"SS2" + len(head).to_bytes(4, "big") + head + VALID[7 + meta_len:]


def _flip(data: bytes, at: int, byte: int) -> bytes:
    at %= len(data)
    return data[:at] + bytes([byte]) + data[at + 1:]


payloads = st.one_of(
    st.binary(max_size=120),
    st.builds(lambda cut: VALID[:cut], st.integers(0, len(VALID) - 1)),
    st.builds(_flip, st.just(VALID), st.integers(0, len(VALID) - 1), st.integers(0, 255)),
    st.builds(_replace_blob, st.sampled_from(HOSTILE_BLOBS) | st.binary(max_size=30)),
    st.builds(_replace_head, st.sampled_from(HOSTILE_HEADS)),
)
stones = st.one_of(
    st.binary(max_size=60),
    st.sampled_from([b"[]", b'{"s":"alive"}', b'{"s":"alive","w":NaN}', b'{"s":"x","w":1}', b'{"s":1,"w":1}',
                     b'{"s":"alive","w":1,"u":"x"}', b'{"s":"alive","w":' + b"[" * 200 + b"1" + b"]" * 200 + b"}"]),
)
index_records = st.one_of(
    st.binary(max_size=60),
    st.sampled_from([b"[]", b'{"k": "soon"}', b'{"k": NaN}', b"[" * 300 + b"]" * 300, b"{"]),
)


def _framed(backend: Backend, data: bytes, with_header: bool) -> bytes:
    """What to plant: Redis values carry the version header, unless the test leaves it out."""
    return VERSION + data if backend.framed and with_header else data


# -- properties -------------------------------------------------------------------------------------


@PROPERTY
@given(data=payloads, with_header=st.booleans(), path=st.sampled_from(["/read", "/write"]))
def test_bytes_at_a_session_key(backend, records, data, with_header, path):
    planted_id = new_id()
    key = backend.mw.manager.key(planted_id)
    raw = _framed(backend, data, with_header)
    backend.put(key, raw)
    status, headers, body = call(backend.mw, path, planted_id)
    assert status == "200 OK", body
    corrupt = not (with_header or not backend.framed) or not payload_decodes(data)
    if path == "/write" and corrupt and _only_values_corrupt(data):
        event("values only, not read: copied by the save")
        return  # a save copies the blobs it never read: nothing here decodes them
    event("corrupt" if corrupt else "decodes")
    if corrupt:
        issued = issued_id(backend, headers) if path == "/write" else body["id"]  # /write: met by the save
        assert_corrupt_outcome(status, headers, records, planted_id, issued)
        assert backend.holds(key, raw)


def _only_values_corrupt(data: bytes) -> bool:
    """Whether ``data`` is sound up to its attribute values (header and whole index decode)."""
    try:
        decode(data).table()
    except CorruptPayload:
        return False
    return True


@PROPERTY
@given(data=stones, with_header=st.booleans())
def test_bytes_at_a_tombstone_key(backend, records, data, with_header):
    planted_id = new_id()
    key = companion_key(backend.mw.manager.key(planted_id), "t")
    raw = _framed(backend, data, with_header)
    backend.put(key, raw)
    status, headers, body = call(backend.mw, "/read", planted_id)
    assert status == "200 OK", body
    event("decodes" if stone_decodes(data) and (with_header or not backend.framed) else "corrupt")
    if (backend.framed and not with_header) or not stone_decodes(data):
        assert_corrupt_outcome(status, headers, records, planted_id, body["id"])
        assert backend.holds(key, raw)


@PROPERTY
@given(data=index_records)
def test_bytes_at_an_index_record(indexed_backend, records, data):
    """A login records a CAS ticket whose index record holds the planted bytes."""
    backend = indexed_backend
    ticket = f"ST-{new_id()[:12]}"
    key = index_key(backend.mw.manager.settings.key_prefix, "cas", ticket)
    backend.put(key, data)
    status, headers, body = call(backend.mw, "/login", None, ticket)
    assert status == "200 OK", body
    if backend.name == "redis" or _memcached_record_rejected(data):  # Redis: a string where a set belongs
        assert_corrupt_outcome(status, headers, records, body, issued_id(backend, headers))
        assert backend.holds(key, data)
        assert backend.mw.manager.find_by_index("cas", ticket) == []


def _memcached_record_rejected(data: bytes) -> bool:
    try:
        _read_entries(data)
    except CorruptPayload:
        return True
    return False


@PROPERTY
@given(session=st.text(max_size=40) | st.binary(max_size=40) | st.integers(-(2**63), 2**63 - 1),
       expiry=st.none() | st.floats())
def test_rows_planted_in_the_sql_index_are_never_returned(tmp_path_factory, session, expiry):
    """SQLite takes any type in any column: ``find_by_index`` returns only sessions that exist."""
    backend = _sql_index_backend(tmp_path_factory)
    ticket = f"ST-{new_id()[:12]}"
    status, _, sid = call(backend.mw, "/login", None, ticket)
    ix = index_key(backend.mw.manager.settings.key_prefix, "cas", ticket)
    backend.db.execute("INSERT INTO sessionstore_sessions_ix (ix, session, expires_at) VALUES (?, ?, ?)",
                       (ix, session, expiry))
    planted = "SELECT session, typeof(session) FROM sessionstore_sessions_ix WHERE ix = ? AND session != ?"
    before = backend.db.execute(planted, (ix, backend.mw.manager.key(sid))).fetchall()
    assert backend.mw.manager.find_by_index("cas", ticket) == [sid]
    assert backend.mw.manager.invalidate_by_index("cas", ticket) == 1
    assert backend.db.execute(planted, (ix, backend.mw.manager.key(sid))).fetchall() == before  # left in place


_SQL_INDEX: dict[str, Backend] = {}


def _sql_index_backend(tmp_path_factory) -> Backend:
    if "db" not in _SQL_INDEX:
        _SQL_INDEX["db"] = _sqlite_backend(tmp_path_factory.mktemp("hostile-ix") / "s.db", "ix:")
    return _SQL_INDEX["db"]


# -- explicit cases on the real stores --------------------------------------------------------------


def test_redis_value_without_version_header_and_on_the_tombstone_key(redis_server, records):
    backend = _redis_backend(redis_server, "hostile-explicit:")
    for key_of in (lambda k: k, lambda k: companion_key(k, "t")):
        planted_id = new_id()
        key = key_of(backend.mw.manager.key(planted_id))
        backend.put(key, b"not ours")
        status, headers, body = call(backend.mw, "/read", planted_id)
        assert_corrupt_outcome(status, headers, records, planted_id, body["id"])
        assert records[-1]["corrupt_part"] == "record" and backend.get(key) == b"not ours"


def test_redis_key_of_another_type_is_corrupt(redis_server, records):
    backend = _redis_backend(redis_server, "hostile-type:")
    planted_id = new_id()
    key = backend.mw.manager.key(planted_id)
    raw = redis_client(redis_server.port)
    raw.sadd(key, "a", "b")
    status, headers, body = call(backend.mw, "/read", planted_id)
    assert_corrupt_outcome(status, headers, records, planted_id, body["id"])
    assert raw.smembers(key) == {b"a", b"b"}


def test_redis_lock_holding_no_token_is_corrupt_not_a_lock_timeout(redis_server, records):
    mw = SessionMiddleware(json_app(HANDLERS), store=redis_server.url, secret_key=SECRET, debug=True,
                           key_prefix="hostile-lock:", locking="all", lock_timeout=5.0)
    status, headers, body = call(mw, "/login", None, "ST-1")
    sid = body
    lock = companion_key(mw.manager.key(sid), "lock")
    raw = redis_client(redis_server.port)
    raw.set(lock, b"\xff\x00 no token")  # no expiry: a real lock would block forever
    status, headers, body = call(mw, "/read", sid)
    assert_corrupt_outcome(status, headers, records, sid, body["id"])
    assert records[-1]["corrupt_part"] == "lock" and raw.get(lock) == b"\xff\x00 no token"
    mw.manager.close()


def test_redis_lock_taken_with_an_undecodable_session_is_released(redis_server, records):
    """The lock script takes the lock and returns the value in one call; the value does not decode:
    the lock must not be left to block the session's other requests for lock_expiry."""
    mw = SessionMiddleware(json_app(HANDLERS), store=redis_server.url, secret_key=SECRET, debug=True,
                           key_prefix="hostile-locked:", locking="all")
    planted_id = new_id()
    key = mw.manager.key(planted_id)
    raw = redis_client(redis_server.port)
    raw.set(key, b"no version header")
    status, headers, body = call(mw, "/read", planted_id)
    assert_corrupt_outcome(status, headers, records, planted_id, body["id"])
    assert raw.get(companion_key(key, "lock")) is None and raw.get(key) == b"no version header"
    mw.manager.close()


def test_sqlite_text_where_the_payload_or_version_belongs(tmp_path, records):
    backend = _sqlite_backend(tmp_path / "types.db", "hostile-sql:")
    for payload, version in (("text, not bytes", 7), (VALID, "not a number"), (VALID, 1.5)):
        planted_id = new_id()
        key = backend.mw.manager.key(planted_id)
        backend.db.execute("INSERT INTO sessionstore_sessions (id, version, expires_at, payload, created_at, "
                           "updated_at) VALUES (?, ?, NULL, ?, 0, 0)", (key, version, payload))
        status, headers, body = call(backend.mw, "/read", planted_id)
        assert_corrupt_outcome(status, headers, records, planted_id, body["id"])
        assert backend.get(key) == payload
    backend.mw.manager.close()


def test_memcached_garbage_index_record_is_not_overwritten(memcached_cluster, records):
    """index_add used to read it as empty and write a fresh record over it."""
    backend = _memcached_backend(memcached_cluster, "hostile-mc:")
    key = index_key("hostile-mc:", "cas", "ST-9")
    backend.put(key, b'{"not": "entries"')
    status, headers, body = call(backend.mw, "/login", None, "ST-9")
    assert status == "200 OK" and "corrupt-payload" in headers["X-Session-Debug"]
    assert backend.get(key) == [b'{"not": "entries"'] * len(memcached_cluster.ring)
    backend.mw.manager.close()
