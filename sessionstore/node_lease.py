"""Node-id leases: two hosts that claim one ``node_id`` are found out.

A sticky node's id is its route: two hosts started with the same one (a
copied configuration) would each think every session of that route is
theirs, and serve stale copies of each other's sessions. So each node
holds a lease in the shared store, ``<prefix>node:{<node_id>}``, naming its
host: a random token kept in the node copy, the same for every worker
process of the host and gone when the host reboots.

Every :data:`LEASE_INTERVAL` seconds one worker of the node (whichever
claims the turn in the node copy first) renews it: it reads the lease and,
if it is its own or free, writes it back with a higher sequence number.
A lease of another host whose sequence moved since the last look is a live
rival: a collision. The rival that finds the lease taken also leaves a
contest record, ``<prefix>node:{<node_id>}:c``, so the lease holder learns
it on its next renewal too. A lease that stops moving is a host that went
away (or rebooted): it expires after three intervals and is taken over, so a
reboot is never mistaken for a collision.

A collision is logged as an error by the worker that finds it, recorded in
the node copy so every worker reports it (debug cause ``node-id-collision``)
and shown by ``sessionstore doctor``. It costs 2-3 store commands per
interval per node, sent from a background thread: never inside a request.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import threading
import time
import weakref
from typing import Any, Callable

from .errors import StoreError
from .stores.base import Store, companion_key
from .stores.local import LocalStore

__all__ = ["NodeLease", "LEASE_INTERVAL", "lease_key", "read_lease"]

_log = logging.getLogger("sessionstore")

#: Seconds between two renewals of a node's lease.
LEASE_INTERVAL = 30.0
#: A lease (and a contest record) lives this many intervals without renewal.
_LIFETIMES = 3
#: Seconds a worker trusts its last look at the node's collision mark.
_RECHECK = 1.0


def lease_key(prefix: str, node_id: str) -> str:
    """Store key of the lease of ``node_id``."""
    return f"{prefix}node:{{{node_id}}}"


def read_lease(store: Store, prefix: str, node_id: str) -> dict[str, Any] | None:
    """The lease of ``node_id`` as stored (``{"h": host token, "n": sequence}``), or ``None``."""
    return _decode(store.load(lease_key(prefix, node_id)))


class NodeLease:
    """This node's lease on its id in ``shared``, renewed in the background."""

    def __init__(self, shared: Store, local: LocalStore, prefix: str, node_id: str, *,
                 interval: float = LEASE_INTERVAL, clock: Callable[[], float] = time.time) -> None:
        self.shared = shared
        self.local = local
        self.node_id = node_id
        self.interval = interval
        self.key = lease_key(prefix, node_id)
        self._contest = companion_key(self.key, "c")
        self.host = self._host_token()
        self._seen: tuple[str, int] | None = None  # the last rival lease looked at
        self._known = (False, 0.0)  # (collision, when this process last looked)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what requests ask ----------------------------------------------------------------

    def collided(self) -> bool:
        """Whether another host claims this node id (cached for a second per process)."""
        known, at = self._known
        now = time.monotonic()
        if now - at >= _RECHECK:
            known = self.local.load(companion_key(self.key, "collision")) is not None
            self._known = (known, now)
        return known

    # -- renewing ---------------------------------------------------------------------------

    def start(self) -> None:
        """Look once now (a rival found at start-up is warned about), then renew in the background."""
        self.renew()
        self._thread = threading.Thread(target=_run, args=(weakref.ref(self), self._stop, self.interval),
                                        name="sessionstore-node-lease", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()

    def renew(self) -> None:
        """One renewal: take or extend the lease, or look at the rival holding it."""
        try:
            record = self.shared.load(self.key)
            lease = _decode(record)
            if lease is None or lease["h"] == self.host:
                sequence = 0 if lease is None else lease["n"] + 1
                self.shared.save(self.key, _encode(self.host, sequence), self._ttl(),
                                 expect=None if record is None else record.version)
                contest = _decode(self.shared.load(self._contest))
                if contest is not None and contest["h"] != self.host:
                    self._collision("another host tried to take this node's lease")
            else:
                self._rival(lease)
        except StoreError as exc:
            _log.debug("sessionstore: node lease not renewed (%s); next try in %.0fs", exc, self.interval)

    def _rival(self, lease: dict[str, Any]) -> None:
        rival = (lease["h"], lease["n"])
        self.shared.save(self._contest, _encode(self.host, 0), self._ttl())
        if self._seen is None:
            _log.warning("sessionstore: node_id %r is leased by another host; if that host is still running, "
                         "two hosts share one node id (checking again in %.0fs)", self.node_id, self.interval)
        elif self._seen[0] == rival[0] and self._seen[1] != rival[1]:
            self._collision("its lease is renewed by another host")
        self._seen = rival

    def _collision(self, how: str) -> None:
        mark = companion_key(self.key, "collision")
        first = self.local.load(mark) is None
        self.local.save(mark, b"", self._ttl())
        self._known = (True, time.monotonic())
        if first:
            _log.error("sessionstore: node id collision: node_id %r is used by another host too (%s). Each host "
                       "needs its own node_id, or sessions of this route are served from two diverging copies.",
                       self.node_id, how)

    def _turn(self) -> bool:
        """Whether this worker renews this interval (one worker per node does)."""
        ttl = max(1, math.floor(self.interval) - 1)
        return self.local.save(companion_key(self.key, "turn"), b"", ttl, expect=None).ok

    def _ttl(self) -> int:
        return max(1, math.ceil(self.interval * _LIFETIMES))

    def _host_token(self) -> str:
        """This host's token: in the node copy, made by the first worker that needs it."""
        key = companion_key(self.key, "host")
        token = secrets.token_hex(16).encode()
        result = self.local.save(key, token, None, expect=None)
        return (token if result.ok else result.current.data).decode()  # type: ignore[union-attr]


def _run(ref: "weakref.ref[NodeLease]", stop: threading.Event, interval: float) -> None:
    while not stop.wait(interval):
        lease = ref()
        if lease is None:  # its manager is gone
            return
        try:
            if lease._turn():
                lease.renew()
        except Exception:  # a bug must not end the renewals
            _log.exception("sessionstore: node lease renewal failed")
        del lease


def _encode(host: str, sequence: int) -> bytes:
    return json.dumps({"h": host, "n": sequence}, separators=(",", ":")).encode()


def _decode(record: Any) -> dict[str, Any] | None:
    if record is None:
        return None
    try:
        value = json.loads(record.data)
        if isinstance(value, dict) and isinstance(value.get("h"), str) and isinstance(value.get("n"), int):
            return value
    except (ValueError, UnicodeDecodeError):
        pass
    return None
