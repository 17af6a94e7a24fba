"""Issue 14 A: one session, one cookie string. Every other spelling of a signed value fails.

A lenient base64 decoder reads many texts as the same signature bytes: the
two spare bits of the last character flipped, ``+``/``/`` for ``-``/``_``,
padding, embedded whitespace. :func:`spellings` writes every such spelling
of a real cookie value (plus case changes, which change the bytes) and says
which verdict it must get: ``bad-signature`` when the value still holds a
well-formed id followed by signature text, ``malformed-id`` when the id part
itself is no id (``+`` in the random part, whitespace before the signature).
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Iterator

import pytest

from sessionstore import SessionMiddleware, ids
from sessionstore.signing import CookieSigner, Verdict

from .helpers import CountingMemoryStore, FakeClock, ServerClient, install_store, json_app

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_R = ids.RANDOM_LENGTH
_SIG_END = _R + 43
_WHITESPACE = " \t\n\r\x0b\x0c"
_BAD, _MALFORMED = Verdict.BAD_SIGNATURE, Verdict.MALFORMED

Spelling = tuple[str, str, Verdict]


def _lenient(text: str) -> bytes:
    """The bytes a forgiving decoder reads from base64 text (any alphabet, padding, spare bits)."""
    text = "".join(text.split()).rstrip("=").replace("-", "+").replace("_", "/")
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _replace(text: str, at: int, char: str) -> str:
    return text[:at] + char + text[at + 1:]


def _spare_bits(value: str, last: int, verdict: Verdict) -> Iterator[Spelling]:
    """The three other texts for the 43rd character at ``last``: its 2 spare bits set otherwise."""
    index = _ALPHABET.index(value[last])
    assert index & 3 == 0, "a canonical value has zero spare bits"
    for bits in (1, 2, 3):
        yield f"spare bits {bits:02b} at {last}", _replace(value, last, _ALPHABET[index | bits]), verdict


def _alphabet(value: str, start: int, end: int, verdict: Verdict) -> Iterator[Spelling]:
    """Each ``-``/``_`` in ``value[start:end]`` as ``+``/``/``, one at a time and all at once."""
    standard = {"-": "+", "_": "/"}
    spots = [i for i in range(start, end) if value[i] in standard]
    for at in spots:
        yield f"{value[at]!r}->{standard[value[at]]!r} at {at}", _replace(value, at, standard[value[at]]), verdict
    part = value[start:end].replace("-", "+").replace("_", "/")
    yield f"standard alphabet in {start}:{end}", value[:start] + part + value[end:], verdict


def _padding(value: str) -> Iterator[Spelling]:
    for pad in ("=", "==", "==="):
        yield f"{pad} after the signature", value[:_SIG_END] + pad + value[_SIG_END:], _BAD
        yield f"{pad} after the random part", value[:_R] + pad + value[_R:], _BAD
        if len(value) > _SIG_END:  # a route: padding after it spoils the route
            yield f"{pad} after the route", value + pad, _MALFORMED


def _whitespace(value: str) -> Iterator[Spelling]:
    """Whitespace at every structural place; inside the id part it breaks the id itself."""
    places = {0: _MALFORMED, _R // 2: _MALFORMED, _R: _BAD, _R + 20: _BAD, _SIG_END: _BAD}
    if len(value) > _SIG_END:
        places[len(value)] = _MALFORMED  # after the route
    else:
        places[len(value)] = _BAD  # after the signature
    for char in _WHITESPACE:
        for at, verdict in places.items():
            yield f"{char!r} at {at}", value[:at] + char + value[at:], verdict
        yield f"{char!r} around", char + value + char, _MALFORMED
    for char in ("\u00a0", "\u2028", "\u3000"):  # non-ASCII whitespace
        yield f"{char!r} at {_SIG_END}", value[:_SIG_END] + char + value[_SIG_END:], _MALFORMED


def _case(value: str) -> Iterator[Spelling]:
    """Every letter's case swapped, one at a time: the random part, the signature, the route."""
    for at, char in enumerate(value):
        if char.isalpha():
            yield f"case at {at}", _replace(value, at, char.swapcase()), _BAD


def spellings(value: str) -> list[Spelling]:
    """``(how, text, expected verdict)`` of every non-canonical spelling of cookie ``value``."""
    found = [
        *_spare_bits(value, _SIG_END - 1, _BAD),
        *_spare_bits(value, _R - 1, _BAD),  # the random part: another id, whose signature fails
        *_alphabet(value, _R, _SIG_END, _BAD),
        *_alphabet(value, 0, _R, _MALFORMED),  # an id is strictly A-Za-z0-9_-
        *_padding(value),
        *_whitespace(value),
        *_case(value),
    ]
    texts = [text for _, text, _ in found]
    assert value not in texts and len(set(texts)) == len(texts)
    return found


def has_every_character_class(value: str) -> bool:
    """Whether both ``-`` and ``_`` occur in both the random part and the signature."""
    random_part, signature = value[:_R], value[_R:_SIG_END]
    return all(c in part for c in "-_" for part in (random_part, signature))


def rich_cookie(signer: CookieSigner, node: str | None = None) -> str:
    """A real signed value whose random part and signature both hold ``-`` and ``_``."""
    for _ in range(5000):
        value = signer.sign(ids.new_id(node))
        if has_every_character_class(value):
            return value
    raise AssertionError("no id with '-' and '_' in both parts")  # p < 1e-100


# -- through the signing API ---------------------------------------------------------------------


@pytest.mark.parametrize("node", [None, "node7"])
def test_the_canonical_value_verifies_and_no_other_spelling_does(node):
    signer = CookieSigner(["k"])
    value = rich_cookie(signer, node)
    session_id = signer.unsign(value)
    assert isinstance(session_id, str) and signer.sign(session_id) == value
    for how, text, verdict in spellings(value):
        assert signer.unsign(text) is verdict, (how, text)


def test_the_signature_spellings_are_the_same_bytes_to_a_lenient_decoder():
    """The spare-bit, alphabet, padding and whitespace spellings are genuine: equal bytes."""
    value = rich_cookie(CookieSigner(["k"]))
    signature = _lenient(value[_R:])
    respelled = [*_spare_bits(value, _SIG_END - 1, _BAD), *_alphabet(value, _R, _SIG_END, _BAD),
                 *((how, text, v) for how, text, v in _padding(value) if "signature" in how),
                 *((how, text, v) for how, text, v in _whitespace(value) if text[:_R] == value[:_R])]
    respelled = [(how, text) for how, text, verdict in respelled if verdict is _BAD]
    assert len(respelled) >= 27
    for how, text in respelled:
        assert _lenient(text[_R:]) == signature, how


def test_rotation_verifies_old_canonical_values_only():
    old, new = CookieSigner(["old"]), CookieSigner(["new"])
    both = CookieSigner(["new", "old"])
    for value in (rich_cookie(old), rich_cookie(old, "n1")):
        assert both.unsign(value) == old.unsign(value)
        assert new.unsign(value) is _BAD
        for how, text, verdict in spellings(value):
            assert both.unsign(text) is verdict, (how, text)
    fresh = both.sign(ids.new_id())
    assert both.unsign(fresh) == new.unsign(fresh) and old.unsign(fresh) is _BAD


# -- through the middleware ----------------------------------------------------------------------


def _login(session, environ):
    session["user"] = "alice"
    return session.id


def _whoami(session, environ):
    return {"user": session.get("user"), "new": session.is_new}


@pytest.fixture
def app():
    """The middleware with debug on, over a counting memory store, and a browser logged in
    whose cookie has ``-`` and ``_`` in both parts. Yields ``(middleware, store, cookie)``."""
    clock = FakeClock()
    mw = SessionMiddleware(json_app({"/login": _login, "/whoami": _whoami}), clock=clock,
                           secret_key=["new", "old"], debug=True)
    store = install_store(mw, CountingMemoryStore(clock=clock))
    old = CookieSigner(["old"])  # sessions logged in before the key rotated
    for _ in range(5000):
        session_id = ServerClient(mw).get("/login").json
        value = old.sign(session_id)
        if has_every_character_class(value):
            return mw, store, value
    raise AssertionError("no id with '-' and '_' in both parts")


def _request(mw: SessionMiddleware, cookie: str, caplog: pytest.LogCaptureFixture):
    """A request sending ``cookie`` exactly as the raw header (quoted when it has whitespace at
    an edge, which would otherwise be header whitespace), and its debug JSON record."""
    header = f'session="{cookie}"' if cookie != cookie.strip() else f"session={cookie}"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sessionstore.debug"):
        response = ServerClient(mw, use_cookies=False).get("/whoami", environ_overrides={"HTTP_COOKIE": header})
    (record,) = [r for r in caplog.records if r.name == "sessionstore.debug"]
    return response, json.loads(record.getMessage())


def test_middleware_opens_the_session_only_for_the_canonical_value(app, caplog):
    mw, store, value = app
    response, record = _request(mw, value, caplog)
    assert response.json == {"user": "alice", "new": False}
    assert record["causes"] == [] and record["store_ops"] >= 1
    for how, text, verdict in spellings(value):
        before = store.total
        response, record = _request(mw, text, caplog)
        assert response.json == {"user": None, "new": True}, (how, text)
        assert store.total == before, (how, "looked up in the store")
        assert record["causes"] == [verdict.value] and record["store_ops"] == 0, (how, record)
        assert response.headers["X-Session-Debug"] == f"source=new; causes={verdict.value}; saved=0", how
