"""The demo's self-test (in-process and as ``python -m sessionstore``), the CLI, and the example app."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from werkzeug.test import Client

from sessionstore import Session
from sessionstore.cli import main
from sessionstore.demo import SelfTest, build_app, selftest

ROOT = Path(__file__).resolve().parents[1]


def step_names() -> list[str]:
    _, sessions = build_app()
    return [name for name, _ in SelfTest(0, sessions).steps()]


def test_demo_has_the_promised_steps():
    names = " | ".join(step_names())
    for words in ("first visit", "counter", "cart", "login", "logout", "forged", "static"):
        assert words in names


def test_selftest_in_process(capsys):
    assert main(["demo", "--selftest"]) == 0
    out = capsys.readouterr().out
    for name in step_names():
        assert f"ok   {name}" in out
    assert "FAIL" not in out


def test_selftest_as_module():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-m", "sessionstore", "demo", "--selftest"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for name in step_names():
        assert f"ok   {name}" in lines, result.stdout
    assert not [line for line in lines if line.startswith("FAIL")]


def test_selftest_fails_when_the_session_misbehaves(monkeypatch):
    monkeypatch.setattr(Session, "rotate", lambda self: None)  # login no longer changes the id
    lines: list[str] = []
    assert selftest(out=lines.append) != 0
    assert any(line.startswith("FAIL login rotates the id") for line in lines)
    assert any(line.startswith("ok   counter") for line in lines)  # the other steps still ran


def test_cli_reports_bad_settings_and_usage(capsys):
    assert main(["demo", "--selftest", "--store", "nonsense"]) == 2
    assert "store:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        main(["demo", "--port", "70000"])


def test_demo_page_escapes_what_the_user_sent():
    app, _ = build_app()
    client = Client(app)
    page = client.get("/login?user=<script>x</script>").get_data(as_text=True)
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_basic_example():
    application = runpy.run_path(str(ROOT / "examples" / "basic_app.py"))["application"]
    client = Client(application)
    assert "Visits this session: 1" in client.get("/").get_data(as_text=True)
    first = client.get_cookie("session").value
    response = client.get("/login?user=bob")
    assert response.status_code == 303 and client.get_cookie("session").value != first
    page = client.get("/").get_data(as_text=True)
    assert "Hello bob" in page and "Visits this session: 2" in page
    response = client.get("/logout")
    assert "Max-Age=0" in response.headers["Set-Cookie"] and client.get_cookie("session") is None
    page = client.get("/").get_data(as_text=True)
    assert "Not logged in" in page and "Visits this session: 1" in page
