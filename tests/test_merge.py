"""Concurrent requests on one session: conditional saves and the per-attribute merge."""

from __future__ import annotations

import threading

import pytest
from werkzeug.test import Client

from sessionstore import ConflictError, SessionMiddleware, get_session
from sessionstore.debug import RequestRecord
from sessionstore.manager import SessionManager, merge
from sessionstore.session import Changes
from sessionstore.settings import Settings


def _manager(**fields) -> SessionManager:
    return SessionManager(Settings(secret_key="k", **fields))


def _start(manager: SessionManager, data: dict) -> str:
    session = manager.open(None, RequestRecord())
    session.update(data)
    outcome = manager.commit(session)
    return manager.signer.sign(outcome.session_id)


def _two(manager: SessionManager, cookie: str):
    a = manager.open(cookie, RequestRecord())
    b = manager.open(cookie, RequestRecord())
    a._ensure(), b._ensure()
    return a, b


def test_different_attributes_merge():
    m = _manager()
    cookie = _start(m, {"x": 0, "y": 0, "z": "keep"})
    a, b = _two(m, cookie)
    a["x"] = 1
    b["y"] = 2
    m.commit(a)
    m.commit(b)
    assert "concurrent-update" in b._record.causes and "conflicts" not in b._record.details
    assert dict(m.load(a.id)) == {"x": 1, "y": 2, "z": "keep"}


def test_same_attribute_last_writer_wins_and_is_named():
    m = _manager()
    cookie = _start(m, {"x": 0})
    a, b = _two(m, cookie)
    a["x"] = 1
    b["x"] = 2
    m.commit(a)
    m.commit(b)
    assert b._record.details["conflicts"] == ["x"]
    assert m.load(a.id)["x"] == 2


def test_same_attribute_error_mode_raises_and_saves_nothing():
    m = _manager(on_conflict="error")
    cookie = _start(m, {"x": 0, "y": 0})
    a, b = _two(m, cookie)
    a["x"] = 1
    b["x"] = 2
    b["y"] = 5
    m.commit(a)
    with pytest.raises(ConflictError) as info:
        m.commit(b)
    assert info.value.attributes == ["x"]
    assert dict(m.load(a.id)) == {"x": 1, "y": 0}


def test_in_place_mutation_merges_with_other_attribute():
    m = _manager()
    cookie = _start(m, {"cart": {"items": [1]}, "seen": 0})
    a, b = _two(m, cookie)
    a["cart"]["items"].append(2)
    b["seen"] += 1
    m.commit(b)
    m.commit(a)
    assert dict(m.load(a.id)) == {"cart": {"items": [1, 2]}, "seen": 1}


def test_removal_takes_part_in_the_merge():
    m = _manager()
    cookie = _start(m, {"flash": "hi", "n": 0})
    a, b = _two(m, cookie)
    del a["flash"]
    b["n"] = 1
    m.commit(b)
    m.commit(a)
    assert dict(m.load(a.id)) == {"n": 1}


def test_invalidated_session_is_not_resurrected_by_a_stale_save():
    m = _manager()
    cookie = _start(m, {"user": "alice"})
    a, b = _two(m, cookie)
    sid = a.id
    a.invalidate()
    b["cart"] = [1]
    m.commit(a)
    m.commit(b)
    assert m.load(sid) is None
    assert b._record.details.get("destroyed_meanwhile") is True


def test_merge_function():
    changes = Changes(written={"a": b"A2", "c": b"C1"}, removed={"d"})
    merged, conflicts = merge(
        base={"a": (b"A1", (1, 1)), "b": (b"B1", (1, 1)), "d": (b"D1", (1, 1))},
        theirs={"a": (b"A1", (1, 1)), "b": (b"B2", (2, 2)), "d": (b"D1", (1, 1)), "e": (b"E1", (1, 1))},
        changes=changes,
    )
    assert merged == {"a": (b"A2", (2, 2)), "b": (b"B2", (2, 2)), "c": (b"C1", (1, 1)), "e": (b"E1", (1, 1))}
    assert conflicts == {}


def test_merge_counts_the_updates_an_overwrite_loses():
    # two clean updates since our base: our write loses both
    _, conflicts = merge(base={"a": (b"1", (1, 1))}, theirs={"a": (b"3", (3, 3))}, changes=Changes(written={"a": b"2"}))
    assert conflicts == {"a": 2}
    # two saves since our base, but the second already overwrote the first: one effect left to lose
    _, conflicts = merge(base={"a": (b"1", (1, 1))}, theirs={"a": (b"2", (3, 2))}, changes=Changes(written={"a": b"2"}))
    assert conflicts == {"a": 1}  # equal values are still a conflict: two increments, one lost


def test_threads_incrementing_own_attributes_lose_nothing():
    """8 threads x 100 requests on one session through the middleware, memory store."""

    def app(environ, start_response):
        session = get_session(environ)
        name = environ["PATH_INFO"].strip("/")
        session[name] = session.get(name, 0) + 1
        start_response("200 OK", [])
        return [b"ok"]

    mw = SessionMiddleware(app, secret_key="k")
    first = Client(mw)
    first.get("/w0")
    cookie = first.get_cookie("session").value

    def worker(i: int) -> None:
        client = Client(mw)
        client.set_cookie("session", cookie)
        for _ in range(100):
            assert client.get(f"/w{i}").status_code == 200

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    data = dict(mw.manager.load(mw.manager.signer.unsign(cookie)))
    assert data == {f"w{i}": 100 + (i == 0) for i in range(8)}
