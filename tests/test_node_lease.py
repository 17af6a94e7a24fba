"""Two hosts claiming one node_id are found out; a host that went away is not a collision."""

from __future__ import annotations

import logging
import time
import uuid

from sessionstore import SessionMiddleware
from sessionstore.node_lease import read_lease

from .helpers import ServerClient, json_app


def _node(redis_server, tmp_path, host: str, prefix: str) -> SessionMiddleware:
    return SessionMiddleware(json_app({"/inc": lambda s, e: s.setdefault("n", 1)}), mode="sticky", node_id="n1",
                             store=redis_server.url, secret_key="lease-secret", debug=True, key_prefix=prefix,
                             node_dir=str(tmp_path / host), node_lease_interval=0.5)


def _wait(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_two_hosts_with_one_node_id_are_detected(redis_server, tmp_path, caplog):
    prefix = f"lease{uuid.uuid4().hex[:8]}:"
    caplog.set_level(logging.WARNING, logger="sessionstore")
    first = _node(redis_server, tmp_path, "host-a", prefix)
    second = _node(redis_server, tmp_path, "host-b", prefix)
    try:
        assert _wait(lambda: first.manager.lease.collided() and second.manager.lease.collided())
        assert any("node id collision" in r.getMessage() and "'n1'" in r.getMessage() for r in caplog.records)
        response = ServerClient(second).get("/inc")
        assert "node-id-collision" in response.headers["X-Session-Debug"]
    finally:
        first.manager.close()
        second.manager.close()


def test_workers_of_one_host_share_the_lease(redis_server, tmp_path):
    prefix = f"lease{uuid.uuid4().hex[:8]}:"
    workers = [_node(redis_server, tmp_path, "host-a", prefix) for _ in range(3)]
    try:
        time.sleep(2.5)  # several renewals
        assert not any(w.manager.lease.collided() for w in workers)
        assert len({w.manager.lease.host for w in workers}) == 1
        response = ServerClient(workers[0]).get("/inc")
        assert "node-id-collision" not in response.headers["X-Session-Debug"]
    finally:
        for w in workers:
            w.manager.close()


def test_a_host_that_went_away_is_not_a_collision(redis_server, tmp_path):
    prefix = f"lease{uuid.uuid4().hex[:8]}:"
    gone = _node(redis_server, tmp_path, "before-reboot", prefix)
    old_host = gone.manager.lease.host
    gone.manager.close()  # stops renewing: the host rebooted (its tmpfs node copy is lost)
    rebooted = _node(redis_server, tmp_path, "after-reboot", prefix)
    try:
        store = rebooted.manager._shared
        assert _wait(lambda: (read_lease(store, prefix, "n1") or {}).get("h") == rebooted.manager.lease.host)
        assert rebooted.manager.lease.host != old_host
        assert not rebooted.manager.lease.collided()
    finally:
        rebooted.manager.close()


def test_doctor_reports_the_lease_and_a_collision(redis_server, tmp_path):
    from sessionstore.diagnose import run_doctor

    prefix = f"lease{uuid.uuid4().hex[:8]}:"
    first = _node(redis_server, tmp_path, "host-a", prefix)
    given = {"mode": "sticky", "node_id": "n1", "node_dir": str(tmp_path / "host-a"), "key_prefix": prefix,
             "secret_key": "lease-secret"}
    second = None
    try:
        checks = {c.name: c for c in run_doctor(redis_server.url, given)}
        assert checks["node id"].level == "OK" and "holds the lease" in checks["node id"].message
        second = _node(redis_server, tmp_path, "host-b", prefix)
        assert _wait(lambda: first.manager.lease.collided())
        checks = {c.name: c for c in run_doctor(redis_server.url, given)}
        assert checks["node id"].level == "FAIL" and "node-id-collision" in checks["node id"].message
    finally:
        first.manager.close()
        if second is not None:
            second.manager.close()
