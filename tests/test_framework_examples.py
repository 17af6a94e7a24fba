"""The plain-WSGI framework examples run and keep their sessions (Bottle, Falcon, Pyramid)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from .helpers import ServerClient as Client

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # Pyramid's Configurator looks its caller's package up there
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.mark.parametrize("name", ["bottle_app", "falcon_app", "pyramid_app"])
def test_example_keeps_the_session_and_rotates_at_login(name, monkeypatch):
    monkeypatch.setenv("SESSIONSTORE_SECRET_KEY", "example-secret")
    client = Client(_load(name).application)
    assert client.get("/").json["items"] == 1
    first_cookie = client.get_cookie("session").value
    assert client.get("/").json["items"] == 2  # in-place append persisted
    assert client.get("/login/alice").json == {"user": "alice"}
    assert client.get_cookie("session").value != first_cookie  # rotated
    assert client.get("/").json == {"items": 3, "user": "alice"}
