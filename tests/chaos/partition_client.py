"""One client process of the partition test: increments counters in a MemcachedStore on command.

::

    python -m tests.chaos.partition_client --url memcached://... --name a

Reads one JSON command per line on stdin and answers each with one JSON
line on stdout:

``{"op": "create", "keys": [...]}``
    every key saved as ``0`` (``expect=None``);
``{"op": "start", "keys": [...]}``
    a thread increments the keys round robin (``load_and_touch`` then a
    ``save`` conditional on the version read) until ``stop``;
``{"op": "stop"}``
    stops it; answers ``{"events": [...]}``, one per attempt since ``start``:
    ``[key, read started, value read or None, done, outcome, value written,
    commands of the read, commands of the save]``, times on the system-wide
    monotonic clock (comparable between processes), outcome ``ack`` (the save
    succeeded), ``conflict`` (it was refused: nothing was written), ``missing``
    or ``error`` (an exception: the write may or may not have landed);
``{"op": "read", "keys": [...]}``
    ``{"values": [...]}``, each key's value (None: missing);
``{"op": "delete", "keys": [...]}``
    ``{"deleted": [...]}``, whether each key was there;
``{"op": "state"}``
    ``{"failed": [...], "suspects": [...]}``: the nodes this process saw
    fail itself, and the ones it holds suspect now (seen fail by any client);
``{"op": "quit"}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sessionstore.errors import StoreError  # noqa: E402
from sessionstore.stores.base import close_counter, open_counter  # noqa: E402
from sessionstore.stores.memcached import MemcachedStore  # noqa: E402

TTL = 600
#: Pause between two increments, so that two clients and three servers share 2 cores politely.
PAUSE = 0.004


class _FailedNodes(logging.Handler):
    """Collects the nodes the store logs as unreachable or restarted (it saw them fail)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.nodes: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if "skipped for" in record.getMessage():
            self.nodes.add(str(record.args[0]))


class Incrementer:
    """Increments ``keys`` round robin in a thread of its own, recording every attempt."""

    def __init__(self, store: MemcachedStore, keys: list[str]) -> None:
        self.store, self.keys = store, keys
        self.events: list[list] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        i = 0
        while not self.stopping.is_set():
            self.events.append(self._attempt(self.keys[i % len(self.keys)]))
            i += 1
            time.sleep(PAUSE)

    def _attempt(self, key: str) -> list:
        started, value, ops = time.monotonic(), None, []
        try:
            record = _counted(ops, lambda: self.store.load_and_touch(key, TTL))
            if record is None:
                return [key, started, None, time.monotonic(), "missing", None, *ops, 0]
            value = int(record.data)
            result = _counted(ops, lambda: self.store.save(key, b"%d" % (value + 1), TTL, expect=record.version))
        except StoreError:
            return [key, started, value, time.monotonic(), "error", None if value is None else value + 1, 0, 0]
        return [key, started, value, time.monotonic(), "ack" if result.ok else "conflict", value + 1, *ops]

    def stop(self) -> list[list]:
        self.stopping.set()
        self.thread.join()
        return self.events


def _counted(ops: list[int], call):
    """``call()``, appending to ``ops`` the store commands it sent."""
    counter, token = open_counter()
    try:
        return call()
    finally:
        close_counter(token)
        ops.append(counter.n)


def _serve(store: MemcachedStore, failed: _FailedNodes) -> None:
    running: Incrementer | None = None
    for line in sys.stdin:
        command = json.loads(line)
        op = command["op"]
        if op == "create":
            answer = {"ok": all(store.save(k, b"0", TTL, expect=None).ok for k in command["keys"])}
        elif op == "start":
            running = Incrementer(store, command["keys"])
            answer = {"ok": True}
        elif op == "stop":
            answer = {"events": running.stop() if running else []}
            running = None
        elif op == "read":
            records = [store.load(k) for k in command["keys"]]
            answer = {"values": [None if r is None else int(r.data) for r in records]}
        elif op == "delete":
            answer = {"deleted": [store.delete(k) for k in command["keys"]]}
        elif op == "state":
            answer = {"failed": sorted(failed.nodes), "suspects": sorted(getattr(store, "suspects", list)())}
        elif op == "quit":
            return
        else:
            answer = {"error": f"unknown op {op!r}"}
        print(json.dumps(answer), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--name", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s {args.name} %(name)s %(message)s")
    failed = _FailedNodes()
    logging.getLogger("sessionstore.memcached").addHandler(failed)
    store = MemcachedStore.from_url(args.url)
    try:
        _serve(store, failed)
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
