"""Property-based tests: hostile input never breaks the middleware or reaches the store unsigned."""

from __future__ import annotations

import string

from hypothesis import HealthCheck, given, settings, strategies as st

from sessionstore import SessionMiddleware
from sessionstore import ids
from sessionstore.payload import Meta, decode, encode
from sessionstore.signing import CookieSigner, Verdict

from .helpers import CountingMemoryStore, json_app

HANDLERS = {
    "/set": lambda s, e: s.__setitem__("user", "alice") or s.id,
    "/get": lambda s, e: dict(s),
}
COOKIE_CHARS = string.printable + "é\u2028\x00\x7f"
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _call(mw, path: str, cookie_header: str | None) -> tuple[str, bytes]:
    environ = {
        "REQUEST_METHOD": "GET", "PATH_INFO": path, "SERVER_NAME": "localhost", "SERVER_PORT": "80",
        "wsgi.url_scheme": "http", "wsgi.input": None, "wsgi.errors": None,
    }
    if cookie_header is not None:
        environ["HTTP_COOKIE"] = cookie_header
    statuses: list[str] = []

    def start_response(status, headers, exc_info=None):
        statuses.append(status)

    body = mw(environ, start_response)
    data = b"".join(body)
    body.close()
    return statuses[-1], data


_store = CountingMemoryStore()
_mw = SessionMiddleware(json_app(HANDLERS), secret_key="fuzz", store=_store)


@FUZZ
@given(value=st.text(alphabet=COOKIE_CHARS, max_size=400))
def test_arbitrary_cookie_values_never_fail_and_never_reach_the_store(value):
    before = _store.total
    status, _ = _call(_mw, "/get", f"session={value}")
    assert status == "200 OK"
    assert _store.total == before  # nothing unsigned is ever looked up


@FUZZ
@given(header=st.text(alphabet=COOKIE_CHARS, max_size=600))
def test_arbitrary_cookie_headers_never_fail(header):
    status, _ = _call(_mw, "/get", header)
    assert status == "200 OK"


@FUZZ
@given(random_part=st.text(alphabet=string.ascii_letters + string.digits + "-_", min_size=43, max_size=43),
       route=st.none() | st.text(alphabet=string.ascii_letters + string.digits + "_", min_size=1, max_size=10))
def test_signed_but_unknown_ids_are_never_adopted(random_part, route):
    sid = random_part if route is None else f"{random_part}.{route}"
    cookie = _mw.manager.signer.sign(sid)
    status, body = _call(_mw, "/set", f"session={cookie}")
    assert status == "200 OK" and sid.encode() not in body


@FUZZ
@given(data=st.binary(max_size=300))
def test_corrupt_stored_payloads_give_a_new_session_and_stay_in_place(data):
    signer = _mw.manager.signer
    status, body = _call(_mw, "/set", None)
    sid = body.decode().strip('"')
    key = _mw.manager.key(sid)
    _store.save(key, data, 60)
    status, _ = _call(_mw, "/get", f"session={signer.sign(sid)}")
    assert status == "200 OK"
    assert _store.load(key).data == data


@FUZZ
@given(data=st.binary(max_size=200))
def test_payload_decoder_raises_only_corrupt_payload(data):
    from sessionstore import CorruptPayload

    try:
        payload = decode(data)
        for name in payload.names():
            payload.blob(name)
    except CorruptPayload:
        pass


@FUZZ
@given(names=st.lists(st.text(max_size=20), max_size=8, unique=True), blob=st.binary(max_size=50))
def test_payload_round_trips_any_attribute_names(names, blob):
    meta = Meta(1.0, 2.0, 60, "json")
    payload = decode(encode(meta, [(n, blob + n.encode(), (1, 1)) for n in names]))
    assert payload.names() == names
    for n in names:
        assert payload.blob(n) == blob + n.encode()
    assert "never-there\n" not in payload


@FUZZ
@given(value=st.text(max_size=200))
def test_only_well_formed_ids_validate(value):
    if ids.is_valid(value):
        assert len(value.split(".")[0]) == 43 and value.isascii()
    result = CookieSigner(["k"]).unsign(value)
    assert isinstance(result, Verdict) or ids.is_valid(result)
