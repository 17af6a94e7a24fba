"""The backup writer: copies sticky sessions to the shared store.

``backup="sync"`` writes in the request thread, before the response is
finished, also while older operations wait in the queue (a session write
with a ledger sends the current bytes, so it never has to wait behind
them); only while the store is known to be down (a retry is pending) is a
write queued instead. ``backup="async"`` hands the write to a background thread and
returns at once. Either way, when the store cannot be reached the operation
is queued and retried with backoff until it lands; requests are never
failed or blocked by the backup.

The queue holds at most one operation per session key (a newer write or a
delete replaces the pending one: writes coalesce), so its size is bounded by
the number of sessions, and by ``max_pending`` beyond which the oldest
pending operation is dropped with an error in the log. ``flush()`` (called
by ``manager.close()`` and at interpreter exit) waits until the queue is
empty.

With a ``ledger`` (sticky mode's node copy, shared by the node's worker
processes), a session write does not send the bytes it was handed but the
node copy's current ones, under the session's lease, and only if the
backup does not hold that version or a newer one yet: several workers
writing backups of one session can never make it go back to an older copy,
however their queues are ordered.

Index entries of a session (``index`` / ``unindex``) travel through the same
queue, under the key ``<session key>:ix``, so in async mode they land after
the session write queued before them.

A session destroyed from another node (single sign-out) must never be
written back: :meth:`BackupWriter.discard` drops what is pending for it, and
the optional ``gate(key)`` is asked before every write (and again after
one: a session write that raced with the destruction is deleted again).
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from .errors import StoreError
from .stores.base import INDEX_SUFFIX, Store, companion_key, is_companion

__all__ = ["BackupWriter"]

_log = logging.getLogger("sessionstore")

#: Seconds a backup write waits for another worker writing the same session's backup.
_LEASE_WAIT = 1.0


@dataclass(frozen=True, slots=True)
class _Op:
    kind: str  # "save" | "touch" | "delete" | "index" | "unindex"
    data: bytes | None = None
    ttl: int | None = None
    names: tuple[str, ...] = ()  # "index": the index keys to record
    version: Any = None  # "save": the node-copy version of ``data`` (with a ledger)


class BackupWriter:
    """Writes, touches and deletes session backups in ``store``."""

    def __init__(self, store: Store, *, asynchronous: bool, max_pending: int = 100_000,
                 max_backoff: float = 5.0, index_store: Any = None,
                 gate: Callable[[str], bool] | None = None, ledger: Any = None) -> None:
        """``index_store``: where ``index``/``unindex`` go (default ``store``); ``gate(key)``:
        False when ``key`` (or the session it belongs to) must not be written any more;
        ``ledger``: the node copy's record of backups (see the module docstring)."""
        self.store = store
        self.ledger = ledger
        self.index_store = store if index_store is None else index_store
        self._gate = gate
        self.asynchronous = asynchronous
        self.max_pending = max_pending
        self.max_backoff = max_backoff
        self._pending: OrderedDict[str, _Op] = OrderedDict()
        self._inflight: str | None = None
        self._cond = threading.Condition()
        self._closed = False
        self._retry_at = 0.0  # while the store is down: no attempt before this (monotonic)
        self._thread: threading.Thread | None = None
        self.dropped = 0
        self.failures = 0
        _live_writers.add(self)

    # -- operations ------------------------------------------------------------------

    def save(self, key: str, data: bytes, ttl: int | None, version: Any = None) -> bool:
        return self._submit(key, _Op("save", data, ttl, version=version))

    def touch(self, key: str, ttl: int | None, data: bytes) -> bool:
        """Slide the backup's expiry; if the store lost it (its node died), write ``data`` again."""
        return self._submit(key, _Op("touch", data, ttl))

    def delete(self, key: str) -> bool:
        return self._submit(key, _Op("delete"))

    def index(self, key: str, names: Iterable[str], ttl: int | None) -> bool:
        """Record session ``key`` under the index keys ``names`` (``IndexStore.index_add``)."""
        return self._submit(companion_key(key, INDEX_SUFFIX), _Op("index", ttl=ttl, names=tuple(names)))

    def unindex(self, key: str) -> bool:
        """Drop the index entries of session ``key`` (``IndexStore.index_drop``)."""
        return self._submit(companion_key(key, INDEX_SUFFIX), _Op("unindex"))

    def discard(self, keys: Iterable[str]) -> int:
        """Drop the pending operations of ``keys`` (a destroyed session); how many there were.

        An operation being applied right now cannot be taken back: the gate
        catches it after it lands.
        """
        with self._cond:
            dropped = sum(self._pending.pop(key, None) is not None for key in keys)
            self._cond.notify_all()
        return dropped

    @property
    def pending(self) -> int:
        """Operations waiting for the store."""
        with self._cond:
            return len(self._pending) + (self._inflight is not None)

    def _submit(self, key: str, op: _Op) -> bool:
        """Run ``op`` now (sync mode, store reachable) or queue it. True if it landed now."""
        if not self.asynchronous and self._may_write_now(key, op):
            try:
                self._apply(key, op)
            except StoreError as exc:
                self.failures += 1
                _log.warning("sessionstore: backup write failed, queued for retry: %s", exc)
            else:
                self._superseded(key, op)
                return True
        self._enqueue(key, op)
        return False

    def _may_write_now(self, key: str, op: _Op) -> bool:
        """Sync mode: write in the request unless the store is known to be down (then the queue
        retries it). Without a ledger, never overtake queued work (per-key order); with one, a
        session write sends the current bytes whatever is queued, so it need not wait."""
        with self._cond:
            if time.monotonic() < self._retry_at:
                return False
            if self.ledger is not None and op.kind in ("save", "touch") and not is_companion(key):
                return True
            return not self._pending and self._inflight is None

    def _superseded(self, key: str, op: _Op) -> None:
        """A session write just landed with the current bytes: a queued older one is moot."""
        if self.ledger is None or op.kind != "save" or is_companion(key):
            return
        with self._cond:
            pending = self._pending.get(key)
            if pending is not None and pending.kind in ("save", "touch"):
                del self._pending[key]
                self._cond.notify_all()

    def _enqueue(self, key: str, op: _Op) -> None:
        with self._cond:
            pending = self._pending.get(key)
            if op.kind == "touch" and pending is not None and pending.kind == "save":
                op = _Op("save", op.data, op.ttl, version=pending.version)  # the touch's data is as new
            elif op.kind == "index" and pending is not None and pending.kind == "index":
                ttl = None if op.ttl is None or pending.ttl is None else max(op.ttl, pending.ttl)
                op = _Op("index", ttl=ttl, names=tuple(dict.fromkeys(pending.names + op.names)))
            self._pending.pop(key, None)
            self._pending[key] = op
            while len(self._pending) > self.max_pending:
                dropped, _ = self._pending.popitem(last=False)
                self.dropped += 1
                _log.error("sessionstore: backup queue full (%d); dropped the pending backup of one session",
                           self.max_pending)
            self._ensure_thread()
            self._cond.notify_all()

    # -- background thread -------------------------------------------------------------

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="sessionstore-backup", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        backoff = 0.05
        while True:
            with self._cond:
                while not self._closed and (not self._pending or time.monotonic() < self._retry_at):
                    # new work does not cut a backoff short: wait out the retry time
                    self._cond.wait(max(0.0, self._retry_at - time.monotonic()) if self._pending else None)
                if not self._pending:
                    return
                key, op = self._pending.popitem(last=False)
                self._inflight = key
            try:
                self._apply(key, op)
                backoff, self._retry_at = 0.05, 0.0
            except StoreError as exc:
                self.failures += 1
                with self._cond:
                    if key not in self._pending:  # not superseded meanwhile: retry it first
                        self._pending[key] = op
                        self._pending.move_to_end(key, last=False)
                    self._inflight = None
                    self._retry_at = time.monotonic() + backoff
                    _log.debug("sessionstore: backup store unavailable (%s); retrying in %.2fs", exc, backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            except Exception:  # a bug in a store must not kill the writer
                _log.exception("sessionstore: backup operation failed")
            with self._cond:
                self._inflight = None
                self._cond.notify_all()

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until every queued operation has landed. False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._pending or self._inflight is not None:
                if self._pending:
                    self._ensure_thread()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(0.05 if remaining is None else min(0.05, remaining))
        return True

    def close(self, timeout: float | None = 10.0) -> None:
        """Flush, then stop the thread."""
        if not self.flush(timeout):
            _log.error("sessionstore: %d session backup(s) could not be written before close", self.pending)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        _live_writers.discard(self)

    def _apply(self, key: str, op: _Op) -> Any:
        """Apply ``op`` unless the gate forbids it; undo a session write the gate closed on meanwhile."""
        gate = self._gate
        if gate is None or op.kind in ("delete", "unindex"):
            return _apply(self.store, self.index_store, key, op)
        if not gate(key):
            return None
        if self.ledger is not None and op.kind in ("save", "touch") and not is_companion(key):
            result = self._apply_current(key, op)
        else:
            result = _apply(self.store, self.index_store, key, op)
        if op.kind in ("save", "touch") and not is_companion(key) and not gate(key):
            self.store.delete(key)  # destroyed while this write was on its way: take it back
        return result

    def _apply_current(self, key: str, op: _Op) -> None:
        """Write the node copy's current bytes of session ``key`` unless the backup holds them already."""
        if op.kind == "touch" and self.store.touch(key, op.ttl):
            return
        ledger = self.ledger
        with ledger.lease(key, wait=_LEASE_WAIT):
            current = ledger.current(key)
            data, version = (op.data, op.version) if current is None else (current.data, current.version)
            if op.kind == "save" and ledger.holds_newer(key, version):
                return
            if op.kind == "touch":
                _log.info("sessionstore: a session backup was gone from the store; rewritten")
            self.store.save(key, data, op.ttl)  # type: ignore[arg-type]
            ledger.backed(key, version, op.ttl)


def _apply(store: Store, index_store: Any, key: str, op: _Op) -> Any:
    if op.kind == "save":
        return store.save(key, op.data, op.ttl)  # type: ignore[arg-type]
    if op.kind == "touch":
        if not store.touch(key, op.ttl):  # lost (evicted, its node died): rewrite it from the primary
            _log.info("sessionstore: a session backup was gone from the store; rewritten")
            store.save(key, op.data, op.ttl)  # type: ignore[arg-type]
        return None
    if op.kind == "index":
        return index_store.index_add(_session_key(key), list(op.names), op.ttl)
    if op.kind == "unindex":
        return index_store.index_drop(_session_key(key))
    return store.delete(key)


def _session_key(index_companion: str) -> str:
    return index_companion[: -len(INDEX_SUFFIX) - 1]


_live_writers: "weakref.WeakSet[BackupWriter]" = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    for writer in list(_live_writers):
        writer.flush(timeout=5.0)
