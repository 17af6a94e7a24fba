"""Encryption at rest: the store only sees ciphertext; altered payloads are refused."""

from __future__ import annotations

import pytest

from sessionstore import ConfigError, SessionMiddleware, Settings
from sessionstore.stores.memory import MemoryStore

from .helpers import ServerClient as Client
from .helpers import json_app

HANDLERS = {
    "/set": lambda s, e: s.__setitem__("card", "4111-1111-1111-1111") or s.id,
    "/get": lambda s, e: s.get("card"),
}


def _app(store, **fields):
    return SessionMiddleware(json_app(HANDLERS), secret_key="k", store=store, debug=True, **fields)


def test_store_sees_only_ciphertext_and_data_round_trips():
    store = MemoryStore()
    mw = _app(store, encryption_key="enc-key")
    client = Client(mw)
    sid = client.get("/set").json
    raw = store.load(mw.manager.key(sid)).data
    assert raw.startswith(b"SSE1") and b"4111" not in raw and b"card" not in raw
    assert client.get("/get").json == "4111-1111-1111-1111"


def test_altered_ciphertext_is_corrupt_payload_and_left_in_place():
    store = MemoryStore()
    mw = _app(store, encryption_key="enc-key")
    client = Client(mw)
    key = mw.manager.key(client.get("/set").json)
    raw = bytearray(store.load(key).data)
    raw[-1] ^= 1
    store.save(key, bytes(raw), 60)
    response = client.get("/get")
    assert response.json is None and "corrupt-payload" in response.headers["X-Session-Debug"]
    assert store.load(key).data == bytes(raw)


def test_plaintext_payload_is_refused_when_encryption_is_on():
    store = MemoryStore()
    plain = _app(store)
    client = Client(plain)
    client.get("/set")
    encrypted = _app(store, encryption_key="enc-key")
    other = Client(encrypted)
    other.set_cookie("session", client.get_cookie("session").value)
    response = other.get("/get")
    assert response.json is None and "corrupt-payload" in response.headers["X-Session-Debug"]


def test_key_rotation():
    store = MemoryStore()
    client = Client(_app(store, encryption_key="old"))
    client.get("/set")
    rotated = Client(_app(store, encryption_key=["new", "old"]))
    rotated.set_cookie("session", client.get_cookie("session").value)
    assert rotated.get("/get").json == "4111-1111-1111-1111"


def test_bad_encryption_key_setting():
    with pytest.raises(ConfigError, match="encryption_key"):
        Settings(encryption_key=[""])


def test_a_record_moved_to_another_session_key_is_refused():
    """An attacker with write access to the store cannot swap sealed records between sessions."""
    store = MemoryStore()
    mw = _app(store, encryption_key="enc-key")
    admin, guest = Client(mw), Client(mw)
    admin_key = mw.manager.key(admin.get("/set").json)
    guest_key = mw.manager.key(guest.get("/set").json)
    store.save(guest_key, store.load(admin_key).data, 60)
    response = guest.get("/get")
    assert response.json is None and "corrupt-payload" in response.headers["X-Session-Debug"]
