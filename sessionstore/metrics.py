"""Counters and timings of one manager, and their Prometheus exposition.

``manager.stats()`` returns a snapshot::

    {"requests": 120, "loads": {"store": 80, "new": 30, ...}, "saves": 40,
     "skipped_saves": 75, "causes": {"no-cookie": 30, ...},
     "lock_waits": {"count": 3, "seconds": 0.12},
     "store_ops": {"load_and_touch": {"count": 80, "seconds": 0.02, "max": 0.001}, ...}}

``failovers``, ``relocations``, ``conflicts`` and errors are cause counts
(``route-changed``, ``relocated``, ``concurrent-update``,
``store-unavailable``…). :func:`prometheus_text` renders a snapshot in the
Prometheus text format for a ``/metrics`` endpoint.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

from .debug import RequestRecord

__all__ = ["Metrics", "TimedStore", "prometheus_text"]

#: Store methods whose latency is recorded.
TIMED_OPS = (
    "load", "load_and_touch", "save", "touch", "delete", "lock", "renew", "unlock",
    "save_and_unlock", "fetch", "load_backup",
    "index_add", "index_find", "index_drop", "feed_publish", "feed_read",
)


class Metrics:
    """Thread-safe counters fed by every finished request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.loads: Counter[str] = Counter()
        self.saves = 0
        self.skipped_saves = 0
        self.causes: Counter[str] = Counter()
        self.lock_waits = 0
        self.lock_wait_seconds = 0.0
        self.ops: dict[str, list[float]] = {}  # op -> [count, seconds, max]

    def observe(self, record: RequestRecord, loaded: bool) -> None:
        with self._lock:
            self.requests += 1
            if loaded:
                self.loads[record.source] += 1
                if record.saved:
                    self.saves += 1
                else:
                    self.skipped_saves += 1
            for cause in record.causes:  # usually none: cheaper than Counter.update
                self.causes[cause] += 1
            wait = record.details.get("lock_wait_ms")
            if wait is not None:
                self.lock_waits += 1
                self.lock_wait_seconds += wait / 1000

    def store_op(self, name: str, seconds: float) -> None:
        with self._lock:
            entry = self.ops.get(name)
            if entry is None:
                self.ops[name] = [1, seconds, seconds]
            else:
                entry[0] += 1
                entry[1] += seconds
                if seconds > entry[2]:
                    entry[2] = seconds

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": self.requests,
                "loads": dict(self.loads),
                "saves": self.saves,
                "skipped_saves": self.skipped_saves,
                "failovers": self.causes.get("route-changed", 0),
                "relocations": self.causes.get("relocated", 0),
                "conflicts": self.causes.get("concurrent-update", 0),
                "causes": dict(self.causes),
                "lock_waits": {"count": self.lock_waits, "seconds": round(self.lock_wait_seconds, 6)},
                "store_ops": {
                    name: {"count": int(c), "seconds": round(s, 6), "max": round(m, 6)}
                    for name, (c, s, m) in self.ops.items()
                },
            }


class TimedStore:
    """Wraps a store and records the latency of each call in :class:`Metrics`.

    Every other attribute is the wrapped store's, so optional protocols
    (locks, sticky extras) keep working.
    """

    def __init__(self, store: Any, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if name not in TIMED_OPS or not callable(attr):
            return attr
        record = self._metrics.store_op

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                record(name, time.perf_counter() - started)

        self.__dict__[name] = timed  # later lookups skip __getattr__
        return timed

    @property
    def wrapped(self) -> Any:
        return self._store


def prometheus_text(stats: dict[str, Any], prefix: str = "sessionstore") -> str:
    """A :meth:`Metrics.snapshot` in the Prometheus text exposition format."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {prefix}_{name} {help_text}")
        lines.append(f"# TYPE {prefix}_{name} {kind}")
        for labels, value in samples:
            lines.append(f"{prefix}_{name}{labels} {value}")

    metric("requests_total", "counter", "Requests seen by the middleware.", [("", stats["requests"])])
    metric("loads_total", "counter", "Sessions loaded, by source.",
           [(f'{{source="{k}"}}', v) for k, v in sorted(stats["loads"].items())])
    metric("saves_total", "counter", "Sessions written.", [("", stats["saves"])])
    metric("skipped_saves_total", "counter", "Loaded sessions not rewritten (nothing changed).",
           [("", stats["skipped_saves"])])
    metric("causes_total", "counter", "Debug cause codes, by code.",
           [(f'{{cause="{k}"}}', v) for k, v in sorted(stats["causes"].items())])
    metric("lock_waits_total", "counter", "Requests that waited for a session lock.",
           [("", stats["lock_waits"]["count"])])
    metric("lock_wait_seconds_total", "counter", "Time spent waiting for session locks.",
           [("", stats["lock_waits"]["seconds"])])
    ops = sorted(stats["store_ops"].items())
    metric("store_ops_total", "counter", "Store calls, by operation.",
           [(f'{{op="{k}"}}', v["count"]) for k, v in ops])
    metric("store_op_seconds_total", "counter", "Time spent in store calls, by operation.",
           [(f'{{op="{k}"}}', v["seconds"]) for k, v in ops])
    metric("store_op_seconds_max", "gauge", "Slowest store call, by operation.",
           [(f'{{op="{k}"}}', v["max"]) for k, v in ops])
    return "\n".join(lines) + "\n"
