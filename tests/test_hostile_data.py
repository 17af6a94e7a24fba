"""Issue 14: hostile store data, one explicit test per case found, on the memory store.

Each planted record must give: no 500, cause ``corrupt-payload`` in the debug
record, a new session, and the planted bytes still in the store, byte-equal.
The same properties over random bytes and on the real stores are in
``tests/integration/test_hostile_stores.py``.
"""

from __future__ import annotations

import json
import logging

import msgpack
import pytest
from hypothesis import given, settings, strategies as st


from sessionstore import CorruptPayload, SessionMiddleware, decoding
from sessionstore.ids import new_id
from sessionstore.invalidation import InvalidationFeed, read_message
from sessionstore.payload import Meta, decode, encode
from sessionstore.serializers import get_serializer
from sessionstore.stores.base import ANY, companion_key
from sessionstore.stores.memory import MemoryStore
from sessionstore.tombstones import read_stone

from .helpers import FakeClock, ServerClient as Client, json_app

SECRET = "hostile-secret"
JSON = get_serializer("json", [SECRET])

HANDLERS = {  # the id is read last: a read that meets corrupt data replaces the session
    "/login": lambda s, e: (s.__setitem__("user", "alice"), s.id)[1],
    "/get": lambda s, e: {"user": s.get("user"), "cart": s.get("cart"), "new": s.is_new, "id": s.id},
    "/dict": lambda s, e: {"all": dict(s), "id": s.id},
    "/copy": lambda s, e: {"all": s.copy(), "id": s.id},
    "/items": lambda s, e: {"all": dict(s.items()), "values": len(list(s.values())), "id": s.id},
    "/iterate": lambda s, e: {"names": sorted(s), "id": s.id},
    "/write": lambda s, e: (s.__setitem__("cart", ["book"]), s.id)[1],
    "/pop": lambda s, e: {"user": s.pop("user", None), "id": s.id},
}


def payload(blobs: dict[str, bytes], *, head: bytes | None = None, **meta: object) -> bytes:
    """A payload of ``blobs``; ``head`` replaces the metadata JSON (``%d``: the blob total)."""
    fields = {"created": 1_700_000_000.0, "last_accessed": 1_700_000_000.0, "max_inactive": 1800,
              "serializer": "json", **meta}
    data = encode(Meta(**fields), [(name, blob, (1, 1)) for name, blob in blobs.items()])  # type: ignore[arg-type]
    if head is None:
        return data
    meta_len = int.from_bytes(data[3:7], "big")
    rest = data[7 + meta_len:]
    head = head.replace(b"%d", str(sum(map(len, blobs.values()))).encode())
    return b"SS2" + len(head).to_bytes(4, "big") + head + rest


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def debug_records():
    records: list[dict] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(json.loads(record.getMessage()))

    logger = logging.getLogger("sessionstore.debug")
    handler, level = Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def make(clock):
    def build(**fields):
        fields.setdefault("secret_key", SECRET)
        fields.setdefault("debug", True)
        fields.setdefault("store", "memory://")
        mw = SessionMiddleware(json_app(HANDLERS), clock=clock, **fields)
        return mw, Client(mw)

    return build


def plant(mw: SessionMiddleware, data: bytes, *, at: str = "session") -> tuple[str, str]:
    """Put ``data`` straight into the memory store's dict under a fresh id's session key (or its
    tombstone key, ``at="tombstone"``); ``(session id, key written)``."""
    sid = new_id()
    key = mw.manager.key(sid)
    if at == "tombstone":
        key = companion_key(key, "t")
    store = mw.manager.store.wrapped
    store._entries[key] = (data, 10**9, None)
    return sid, key


def stored(mw: SessionMiddleware, key: str) -> bytes:
    return mw.manager.store.wrapped._entries[key][0]


def request(mw: SessionMiddleware, client: Client, sid: str, path: str):
    client.set_cookie("session", mw.manager.signer.sign(sid))
    response = client.get(path)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response


def assert_corrupt(mw, response, sid: str, key: str, data: bytes, records: list[dict]) -> None:
    """The contract's corrupt-payload outcome: cause in header and log, a new session, data in place."""
    assert "corrupt-payload" in response.headers["X-Session-Debug"]
    assert "corrupt-payload" in records[-1]["causes"]
    assert response.json["id"] != sid
    assert stored(mw, key) == data


# -- the cases of issue 14 --------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/get", "/dict", "/copy", "/items", "/pop"])
def test_an_undecodable_attribute_gives_a_new_session_to_every_reader(make, debug_records, path):
    mw, client = make()
    data = payload({"user": b'"alic\xff', "cart": b"[1]"})
    sid, key = plant(mw, data)
    response = request(mw, client, sid, path)
    assert_corrupt(mw, response, sid, key, data, debug_records)
    assert "user" not in json.dumps(response.json.get("all", {}))
    assert debug_records[-1]["corrupt_part"] == "attribute"


@pytest.mark.parametrize("blob", [
    b'{" u": 123}',  # AttributeError in uuid.UUID
    b'{" n": "x"}',  # decimal.InvalidOperation
    b'{" n": 5}',
    b'{" s": [[1]]}',  # unhashable
    b'{" t": "abc"}',
    b'{" m": [1, 2]}',
    b'{" m": [[[1], 2]]}',
    b'{" b": "!!"}',
    b'{" d": "yesterday"}',
    b'{" d": "2020-01-01T00:00:00@99999999999999999999"}',  # OverflowError
    b'{" D": 20200101}',
    b'"\\ud800"',  # a lone surrogate: the dirty check could not write it back
    b"1 2",
    b"",
])
def test_tagged_json_with_the_wrong_shape_is_corrupt(make, debug_records, blob):
    mw, client = make()
    data = payload({"user": blob})
    sid, key = plant(mw, data)
    assert_corrupt(mw, request(mw, client, sid, "/dict"), sid, key, data, debug_records)


def test_deep_nesting_in_an_attribute_is_corrupt_before_any_recursion(make, debug_records):
    mw, client = make()
    data = payload({"user": b"[" * 100_000 + b"]" * 100_000})
    sid, key = plant(mw, data)
    assert_corrupt(mw, request(mw, client, sid, "/get"), sid, key, data, debug_records)


def test_nesting_up_to_the_limit_is_fine_and_one_more_is_not():
    ok = b"[" * decoding.MAX_DEPTH + b"]" * decoding.MAX_DEPTH
    assert JSON.loads(ok) is not None
    with pytest.raises(CorruptPayload):
        JSON.loads(b"[" + ok + b"]")
    quoted = b'["' + b"[" * 500 + b'"]'  # brackets inside a string do not nest
    assert JSON.loads(quoted) == ["[" * 500]


@pytest.mark.parametrize("head", [
    b'{"c":1,"l":1,"i":60,"s":"json","b":%d,"z":' + b"[" * 5000 + b"]" * 5000 + b"}",  # deep metadata
    b'{"c":NaN,"l":1,"i":60,"s":"json","b":%d}',
    b'{"c":Infinity,"l":1,"i":60,"s":"json","b":%d}',
    b'{"c":1e999,"l":1,"i":60,"s":"json","b":%d}',
    b'{"c":"1","l":1,"i":60,"s":"json","b":%d}',
    b'{"c":1,"l":1,"i":1.5,"s":"json","b":%d}',
    b'{"c":1,"l":1,"i":99999999999999,"s":"json","b":%d}',
    b'{"c":1,"l":1,"i":true,"s":"json","b":%d}',
    b'{"c":1,"l":1,"i":60,"s":5,"b":%d}',
    b'{"c":1,"l":1,"i":60,"s":"json","b":%d,"x":{"cas":"ST-1"}}',  # a non-list index field
    b'{"c":1,"l":1,"i":60,"s":"json","b":%d,"x":["ST-1"]}',
    b'{"c":1,"l":1,"i":60,"s":"json","b":%d,"x":{"cas":[1]}}',
    b'{"c":1,"l":1,"i":60,"s":"json","b":%d,"t":-1}',
    b'{"c":1,"l":1,"i":60,"s":"json"}',
    b'[1,2,3]',
    b'{"c":1,"l":1,"i":60,"s":"json","b":%d}  ',
])
def test_hostile_metadata_is_corrupt_with_or_without_max_age(make, debug_records, head):
    for fields in ({}, {"max_age": 3600}):
        mw, client = make(**fields)
        data = payload({"user": b'"alice"'}, head=head)
        sid, key = plant(mw, data)
        assert_corrupt(mw, request(mw, client, sid, "/get"), sid, key, data, debug_records)
        assert debug_records[-1]["corrupt_part"] == "payload header"


def _with_index(data: bytes, index: bytes) -> bytes:
    payload_ = decode(data)
    meta_end = payload_._blobs_at - len(payload_._index) - 4
    blobs = data[payload_._blobs_at:]
    return data[:meta_end] + len(index).to_bytes(4, "big") + index + blobs


@pytest.mark.parametrize("index", [
    b'\n"user"\x1f0\x1fx\x1f1\x1f1\n"cart"\x1f7\x1f3\x1f1\x1f1',  # a length that is no number
    b'\n"user"\x1f0\x1f7\x1f1\n"cart"\x1f7\x1f3\x1f1\x1f1',  # four fields
    b'\n"user"\x1f0\x1f7\x1f1\x1f1\n"user"\x1f7\x1f3\x1f1\x1f1',  # a name twice
    b'\n"us\\u0065r"\x1f0\x1f7\x1f1\x1f1\n"cart"\x1f7\x1f3\x1f1\x1f1',  # not the canonical encoding
    b'\n"user"\x1f0\x1f7\x1f1\x1f1\n"cart"\x1f5\x1f5\x1f1\x1f1',  # overlapping blobs
    b'\n"user"\x1f0\x1f7\x1f1\x1f1\n"cart"\x1f7\x1f3\x1f+1\x1f1',  # a sign int() would accept
    b'\n"user"\x1f0\x1f7\x1f1\x1f1\n' + b"[" * 10_000 + b'"cart"\x1f7\x1f3\x1f1\x1f1',  # deep nesting
    b'\n"user"\x1f0\x1f7\x1f1\x1f1\n"cart"\x1f7\x1f' + b"9" * 5000 + b"\x1f1\x1f1",  # too many digits
])
@pytest.mark.parametrize("path", ["/iterate", "/dict", "/write"])
def test_a_damaged_index_met_while_iterating_or_saving_is_corrupt(make, debug_records, index, path):
    """``/write`` never reads: the damage is met by the save, which needs every entry."""
    mw, client = make()
    data = _with_index(payload({"user": b'"alice"', "cart": b"[1]"}), index)
    sid, key = plant(mw, data)
    response = request(mw, client, sid, path)
    assert "corrupt-payload" in response.headers["X-Session-Debug"]
    assert stored(mw, key) == data
    new_id_ = response.json if path == "/write" else response.json["id"]
    if path == "/write":  # the new session keeps what this request assigned, and is stored
        assert mw.manager.load(mw.manager.signer.unsign(client.get_cookie("session").value))["cart"] == ["book"]
    else:
        assert new_id_ != sid


def test_a_lone_bad_index_line_read_with_get_is_corrupt(make, debug_records):
    mw, client = make()
    data = _with_index(payload({"user": b'"alice"'}), b'\n"user"\x1f0\x1f7\x1fx\x1f1')
    sid, key = plant(mw, data)
    assert_corrupt(mw, request(mw, client, sid, "/get"), sid, key, data, debug_records)


@pytest.mark.parametrize("stone", [
    b"not json", b"[]", b'{"s":"alive"}', b'{"s":"alive","w":NaN}', b'{"s":"alive","w":1,"u":"soon"}',
    b'{"s":"zombie","w":1}', b'{"s":5,"w":1}', b'{"s":"alive","w":1,"u":' + b"[" * 999 + b"]" * 999 + b"}",
])
def test_an_undecodable_tombstone_is_corrupt_not_unknown_id(make, debug_records, stone):
    mw, client = make()
    sid, key = plant(mw, stone, at="tombstone")
    response = request(mw, client, sid, "/get")
    assert_corrupt(mw, response, sid, key, stone, debug_records)
    assert "unknown-id" not in response.headers["X-Session-Debug"]


class _Interloper(MemoryStore):
    """A memory store where, once armed, someone plants garbage just before a conditional save."""

    garbage = b"SS2 planted by someone else"
    armed: str | None = None

    def save(self, key, data, ttl, expect=ANY):
        if key == self.armed and expect is not ANY and expect is not None:
            self.armed = None
            self._entries[key] = (self.garbage, 10**9, None)
        return super().save(key, data, ttl, expect)


def test_a_record_left_by_a_concurrent_writer_is_not_overwritten(clock, debug_records):
    """The conditional save fails; the record now there does not decode: the merge refuses it."""
    store = _Interloper(clock=clock)
    mw = SessionMiddleware(json_app(HANDLERS), clock=clock, store=store, secret_key=SECRET, debug=True)
    client = Client(mw)
    sid = client.get("/login").json
    key = store.armed = mw.manager.key(sid)
    response = client.get("/write")
    assert response.status_code == 200
    assert "corrupt-payload" in response.headers["X-Session-Debug"]
    assert store._entries[key][0] == _Interloper.garbage
    new = mw.manager.signer.unsign(client.get_cookie("session").value)
    assert new != sid and mw.manager.load(new)["cart"] == ["book"]


def test_get_dict_and_copy_are_consistent_after_the_reset(make):
    """A corrupt attribute met midway leaves none of the old session's values behind."""
    mw, client = make()
    blobs = {f"a{i}": b"%d" % i for i in range(20)}
    blobs["a10"] = b"{bad"
    sid, _ = plant(mw, payload(blobs))
    assert request(mw, client, sid, "/dict").json["all"] == {}
    assert request(mw, client, sid, "/copy").json["all"] == {}


# -- decoders ---------------------------------------------------------------------------------------


def test_the_attribute_table_is_built_once_and_serves_every_lookup():
    data = encode(Meta(1.0, 1.0, 60, "json"), [(f"a{i}", b"%d" % i, (1, 1)) for i in range(1000)])
    p = decode(data)
    for i in range(1000):
        assert p.blob(f"a{i}") == b"%d" % i
    assert p._table is not None and len(p._found) <= 8  # a few scans, then the table
    table = p.table()
    assert p.names() == [f"a{i}" for i in range(1000)] and p.table() is table


@pytest.mark.parametrize("message", [
    b"", b"{}", b'{"o":"n1","r":"invalidated"}', b'{"o":5,"r":"x","i":[]}', b'{"o":"n","r":"x","i":"abc"}',
    b"[" * 100 + b"]" * 100,
])
def test_an_unreadable_feed_message_makes_the_node_recheck_its_sessions(message):
    seen, losses = [], []
    feed = InvalidationFeed(MemoryStore(), "ch", "me", lambda ids, why: seen.append(ids), lambda: losses.append(1))
    with pytest.raises(CorruptPayload):
        read_message(message)
    feed._deliver(message)
    assert not seen and losses == [1]


def test_a_feed_message_keeps_its_well_formed_ids():
    sid = new_id()
    assert read_message(json.dumps({"o": "n1", "r": "invalidated", "i": [sid, "../x", 5]}).encode()) == (
        "n1", "invalidated", [sid])


def test_a_tombstone_decodes_only_in_its_own_shape():
    assert read_stone(b'{"s": "alive", "w": 1.5, "u": 2}').until == 2.0
    with pytest.raises(CorruptPayload):
        read_stone(b'{"s": "alive", "w": 1e999}')


def test_lock_tokens_are_printable_ascii():
    assert decoding.lock_token(b"abc_-XYZ") == "abc_-XYZ"
    for bad in (b"", b"has space", b"\xff\xfe", b"x" * 256):
        with pytest.raises(CorruptPayload):
            decoding.lock_token(bad)


# -- fuzzing the decoders: CorruptPayload is their only failure -------------------------------------

TAGS = [" t", " s", " f", " b", " d", " D", " u", " n", " m", " x", ""]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
    | st.sampled_from(["2020-01-01", "2020-01-01T00:00:00@1", "@", "AAAA", "ffffffffffffffffffffffffffffffff"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(TAGS) | st.text(max_size=3), inner,
                                                                max_size=3),
    max_leaves=12,
)
FUZZ = settings(max_examples=400, deadline=None)


@FUZZ
@given(value=json_values)
def test_attribute_decoding_raises_only_corrupt_payload(value):
    """What decodes can also be written back (the dirty check re-encodes every value read)."""
    blobs = {JSON: json.dumps(value).encode()}
    try:
        blobs[get_serializer("msgpack", [])] = msgpack.packb(value)
    except (OverflowError, ValueError):  # beyond 64 bits: not a value msgpack itself writes
        pass
    for serializer, blob in blobs.items():
        try:
            serializer.dumps(serializer.loads(blob), "fuzz")
        except CorruptPayload:
            pass


@FUZZ
@given(value=json_values, data=st.binary(max_size=80))
def test_store_record_readers_raise_only_corrupt_payload(value, data):
    from sessionstore.stores.memcached import _read_entries, _read_reverse

    for raw in (json.dumps(value).encode(), data):
        for read in (read_stone, read_message, _read_entries, _read_reverse, decoding.lock_token):
            try:
                read(raw)
            except CorruptPayload:
                pass


@FUZZ
@given(head=json_values, index=st.binary(max_size=40), blobs=st.binary(max_size=20))
def test_payload_decoding_raises_only_corrupt_payload(head, index, blobs):
    meta = json.dumps(head).encode()
    data = b"SS2" + len(meta).to_bytes(4, "big") + meta + len(index).to_bytes(4, "big") + index + blobs
    try:
        payload = decode(data)
        for name in payload.names():
            payload.blob(name)
    except CorruptPayload:
        pass


@pytest.mark.parametrize("data", [
    payload({"user": b'"alice"'}, head=b'{"c":"SECRET-c","l":1,"i":60,"s":"json","b":%d}'),
    payload({"user": b'"alice"'}, head=b'{"c":1,"l":1,"i":60,"s":"SECRET-serializer","b":%d}'),
    payload({"user": b'"alice"'}, head=b'{"c":1,"l":1,"i":60,"s":"json","b":%d,"x":{"cas":"SECRET-x"}}'),
    payload({"user": b'{" D": "SECRET-date"}'}),
    payload({"user": b'{" n": "SECRET-decimal"}'}),
    _with_index(payload({"user": b'"alice"'}), b'\n"user"\x1f0\x1f7\x1fSECRET\x1f1'),
])
def test_what_fails_to_decode_is_named_never_quoted(make, caplog, data):
    """Stored bytes are session content (issue 14 B): messages name the part and the error type."""
    mw, client = make()
    sid, _ = plant(mw, data)
    with caplog.at_level(logging.DEBUG):
        response = request(mw, client, sid, "/dict")
    assert "corrupt-payload" in response.headers["X-Session-Debug"]
    texts = [record.getMessage() for record in caplog.records] + [str(response.headers), response.get_data(as_text=True)]
    assert not [text for text in texts if "SECRET" in text]


@pytest.mark.parametrize("data", [payload({"user": b'{" u": 1}', "cart": b"[1]"}), b"SS2 garbage"])
def test_sticky_mode_issues_a_new_session_and_leaves_the_backup_in_place(make, debug_records, data):
    """The backup is loaded into this node's copy first; the damage met there is answered alike."""
    mw, client = make(mode="sticky", node_id="n1")
    sid = f"{new_id()}.n1"
    key = mw.manager.key(sid)
    shared = mw.manager._shared.wrapped
    shared._entries[key] = (data, 10**9, None)
    response = request(mw, client, sid, "/dict")
    assert "corrupt-payload" in response.headers["X-Session-Debug"] and response.json["id"] != sid
    assert response.json["all"] == {} and shared._entries[key][0] == data
