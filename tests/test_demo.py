"""The demo: two node processes behind the balancer, its self-test in both modes, the CLI, the example app.

CI runs ``sessionstore demo --selftest`` in both modes; these tests run it as a
subprocess (``python -m sessionstore demo``) and check every step passed, in
well under 30 s, and that every process it started is gone afterwards.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import re
import runpy
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from werkzeug.test import Client

from sessionstore.cli import main
from sessionstore.demo import NODE_IDS, SelfTest, build_app, selftest
from tests.servers.process import ignore_sigint

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def step_names(mode: str) -> list[str]:
    return [name for name, _ in SelfTest(mode).steps()]


def run_demo(*args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "sessionstore", "demo", *args],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    return result, time.monotonic() - started


def node_pids(output: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"node n\d: pid (\d+)", output)]


def assert_gone(pids: list[int]) -> None:
    """Each pid is gone (the demo reaped its children; nothing was left to init)."""
    assert pids
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        assert b"sessionstore.demo" not in cmdline, f"node process {pid} still runs: {cmdline!r}"


def assert_all_ok(result: subprocess.CompletedProcess, mode: str) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for name in step_names(mode):
        assert f"ok   {name}" in lines, result.stdout
    assert not [line for line in lines if line.startswith("FAIL")]
    assert f"{len(step_names(mode))} of {len(step_names(mode))} steps passed" in result.stdout


# -- the self-test, as CI runs it --------------------------------------------------------------


@pytest.mark.parametrize("mode", ["non-sticky", "sticky"])
def test_demo_has_the_promised_steps(mode):
    names = " | ".join(step_names(mode))
    for words in ("first visit", "counter", "cart", "login", "logout", "forged", "static", "debug record",
                  "kill", "SIGKILL"):
        assert words in names
    assert ("route-changed" in names) == (mode == "sticky")
    assert ("alternating nodes" in names) == (mode == "non-sticky")


@pytest.mark.parametrize("mode", ["non-sticky", "sticky"])
def test_selftest_passes_every_step_and_stops_its_processes(mode):
    result, seconds = run_demo("--selftest", "--mode", mode)
    assert_all_ok(result, mode)
    assert seconds < 30, f"the self-test took {seconds:.1f} s"
    assert f"{mode} mode, store local:///" in result.stdout  # the embedded default store
    pids = node_pids(result.stdout)
    assert len(pids) == 2
    assert_gone(pids)


def test_selftest_kills_through_the_page_button():
    result, _ = run_demo("--selftest", "--mode", "sticky", "--kill-node")
    assert_all_ok(result, "sticky")
    assert_gone(node_pids(result.stdout))


def test_selftest_in_process_leaves_no_thread_behind():
    before = set(threading.enumerate())
    lines: list[str] = []
    assert selftest("non-sticky", out=lines.append) == 0, "\n".join(lines)
    assert sum(line.startswith("ok   ") for line in lines) == len(step_names("non-sticky"))
    assert set(threading.enumerate()) <= before
    assert_gone(node_pids("\n".join(lines)))


def test_selftest_on_redis(redis_server):
    result, _ = run_demo("--selftest", "--mode", "non-sticky", "--store", redis_server.url)
    assert_all_ok(result, "non-sticky")
    assert f"store {redis_server.url}" in result.stdout


def test_selftest_on_memcached(memcached_cluster):
    result, _ = run_demo("--selftest", "--mode", "sticky", "--store", memcached_cluster.url())
    assert_all_ok(result, "sticky")


# -- the self-test notices what goes wrong ----------------------------------------------------


def test_selftest_fails_when_the_nodes_share_no_store():
    """memory:// lives in each node's process: the counter breaks as soon as a request changes node."""
    result, _ = run_demo("--selftest", "--mode", "non-sticky", "--store", "memory://")
    assert result.returncode == 1, result.stdout
    lines = result.stdout.splitlines()
    assert lines[0].startswith("warning: memory:// keeps sessions inside each node's process")
    assert "ok   first visit creates a session" in lines  # the other steps still ran
    counter = next(line for line in lines if line.startswith("FAIL counter"))
    assert "visit 2" in counter and "unknown-id" in counter
    assert any(line.startswith("FAIL cart add twice") for line in lines)
    assert "[n1 log]" in result.stdout  # the nodes' debug lines, to see why
    assert_gone(node_pids(result.stdout))


def test_sticky_selftest_fails_only_at_the_failover_without_a_shared_store():
    result, _ = run_demo("--selftest", "--mode", "sticky", "--store", "memory://")
    assert result.returncode == 1
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 1 and failed[0].startswith("FAIL kill the owner node"), result.stdout
    assert "the session did not survive the kill" in failed[0]
    assert_gone(node_pids(result.stdout))


# -- the interactive demo -------------------------------------------------------------------


class Demo:
    """``sessionstore demo`` as a user runs it, its output read line by line.

    Started with SIGINT ignored, as from a script's ``&``: Ctrl-C must stop it all the same.
    """

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "sessionstore", "demo", "--port", "0", *args],
                                     cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     preexec_fn=ignore_sigint)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.errors: list[str] = []
        threading.Thread(target=self._read, args=(self.proc.stdout, self.lines), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stderr, None), daemon=True).start()
        self.url = self.wait_for(r"^Open (http://\S+)").group(1)
        self.wait_for(r"Ctrl-C stops everything")
        self.pids = node_pids("\n".join(self.seen))

    def _read(self, stream, into: queue.Queue | None) -> None:
        for line in stream:
            if into is None:
                self.errors.append(line)
            else:
                into.put(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 20) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} in {timeout} s; got {self.seen} "
                                     f"stderr {self.errors[-10:]}") from None
            self.seen.append(line)
            match = re.search(pattern, line)
            if match:
                return match

    def request(self, method: str, path: str, cookie: str | None) -> tuple[dict, str | None]:
        host, port = self.url.removeprefix("http://").rstrip("/").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        headers = {"Accept": "application/json", **({"Cookie": f"session={cookie}"} if cookie else {})}
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        body = json.loads(response.read())
        conn.close()
        assert response.status == 200, body
        for header in response.headers.get_all("Set-Cookie") or []:
            if header.startswith("session="):
                cookie = header.split(";")[0].removeprefix("session=")
        return body, cookie

    def close(self) -> None:
        """Stop the demo if it still runs: SIGTERM (it cleans up, temporary folder included), then SIGKILL."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def test_interactive_demo_fails_over_restarts_and_stops_on_ctrl_c():
    demo = Demo("--mode", "non-sticky", "--kill-node")
    try:
        store_dir = Path(re.search(r"store local://(/\S+)/store\b", "\n".join(demo.seen)).group(1))
        assert store_dir.is_dir() and len(demo.pids) == 2
        assert any("Kill the node" in line for line in demo.seen)
        cookie = None
        served = []
        for visits in (1, 2):
            page, cookie = demo.request("GET", "/", cookie)
            assert page["visits"] == visits
            served.append(page["node"])
        assert sorted(served) == sorted(NODE_IDS)  # round robin
        killed, _ = demo.request("POST", "/_demo/kill", cookie)
        victim = killed["killed"]
        demo.wait_for(rf"\[demo\] node {victim} \(pid {killed['pid']}\) killed by SIGKILL")
        for visits in (3, 4):
            page, cookie = demo.request("GET", "/", cookie)
            assert page["visits"] == visits and page["node"] != victim
        back = demo.wait_for(rf"\[demo\] node {victim} is back: pid (\d+)", timeout=20)
        restarted = int(back.group(1))
        served = {demo.request("GET", "/", cookie)[0]["node"] for _ in range(2)}
        assert served == set(NODE_IDS)

        demo.proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert demo.proc.wait(15) == 0
        demo.wait_for(r"^stopped: the balancer and the node processes")
        assert_gone([*demo.pids, restarted])
        assert not store_dir.exists()  # the demo's folder (store, node copies) is removed
    finally:
        demo.close()


def test_nodes_stop_when_the_demo_is_killed():
    """Even SIGKILL on the demo leaves no node behind: each node stops when its stdin pipe closes."""
    demo = Demo("--mode", "sticky")
    try:
        store_dir = Path(re.search(r"store local://(/\S+)/store\b", "\n".join(demo.seen)).group(1))
        demo.proc.kill()
        demo.proc.wait(10)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert_gone(demo.pids)
                break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        demo.close()
        import shutil

        shutil.rmtree(store_dir, ignore_errors=True)


def test_port_in_use_is_reported():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "sessionstore", "demo", "--port", str(port)],
                                cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "--port" in result.stderr
    stopped = re.search(r"stopped: the balancer and the node processes \(pids (\d+), (\d+)\)", result.stdout)
    assert stopped, result.stdout
    assert_gone([int(pid) for pid in stopped.groups()])


# -- the CLI and the app in process ------------------------------------------------------------


def test_cli_reports_bad_settings_and_usage(capsys):
    assert main(["demo", "--selftest", "--store", "nonsense"]) == 2
    assert "store:" in capsys.readouterr().err
    assert main(["demo", "--selftest", "--store", "nosuch://x"]) == 2
    assert "unknown scheme 'nosuch'" in capsys.readouterr().err
    assert main(["demo", "--selftest", "--store", "redis://127.0.0.1:1/0"]) == 2
    assert "cannot reach redis://127.0.0.1:1/0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    for bad in (["demo", "--port", "70000"], ["demo", "--mode", "round-robin"]):
        with pytest.raises(SystemExit):
            main(bad)


def test_demo_page_escapes_what_the_user_sent():
    app, _ = build_app()
    client = Client(app)
    page = client.get("/login?user=<script>x</script>").get_data(as_text=True)
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_demo_page_shows_the_node_and_the_debug_record():
    app, _ = build_app(mode="sticky", node_id="n2")
    client = Client(app)
    client.get("/cart/add?item=apple")
    response = client.get("/cart/add?item=pear")
    page = response.get_data(as_text=True)
    assert 'id="node">n2<' in page and 'id="record-source">local<' in page
    assert 'id="record-mutated">cart<' in page and "X-Session-Debug: source=local; causes=mutated-in-place; saved=1" in page
    assert client.get_cookie("session").value.endswith(".n2")
    state = client.get("/json").get_json()
    assert state["node"] == "n2" and state["cart"] == ["apple", "pear"] and state["record"]["source"] == "local"
    # no kill button, no kill endpoint, unless asked for
    assert "/_demo/kill" not in page
    assert client.post("/_demo/kill").status_code == 404


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
