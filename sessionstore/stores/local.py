"""Host-local store: one copy shared by every worker process of a host (LMDB).

``local://`` is the embedded default store, and sticky mode keeps each
node's primary copies in one of these. Every process and thread of a host
that opens the same directory sees the same sessions: ``gunicorn -w 8``,
uWSGI processes and workers recycled by ``--max-requests`` share them.

The engine is LMDB (the ``lmdb`` package): a memory-mapped B+tree file with
MVCC readers that never block and one writer at a time, guarded by a robust
process-shared mutex, so a process SIGKILLed in the middle of a write leaves
neither a half-written record nor a stuck lock (the next writer takes over;
its transaction was never committed). Reader slots of dead processes are
reclaimed at open and then every few seconds. The files live on tmpfs
(``/dev/shm``) by default: memory, not disk, and gone at reboot.

URL: ``local://`` (a directory named after the application, see
:func:`default_directory`) or ``local:///absolute/dir``; options
``?max_sessions=N&max_bytes=N``. ``SESSIONSTORE_LOCAL_DIR`` moves the
default root (``/dev/shm/sessionstore-<uid>``).

Layout (named databases of one environment):

=========  =======================================================  ==========
database   key → value                                              bound
=========  =======================================================  ==========
``s``      session key → header + payload (zlib when it pays)       LRU
``l``      access stamp (ms, big-endian) + key → ``b""``: LRU order  —
``c``      companion key (tombstone, marks) → header + data         TTL
``e``      expiry stamp + companion key → ``b""``: expiry order      —
``k``      lock key → expiry + owner token                          TTL
``x``      index key ``\\0`` session key → entry expiry             TTL
``m``      counters: payload bytes held, last version               —
=========  =======================================================  ==========

Costs (one process, 1 kB payloads, /dev/shm; see ``benchmarks/``):

====================  ============================================================
``load``              one read transaction (~1-2 µs)
``load_and_touch``    a read; a write only when the expiry moves by more than
                      :data:`SLIDE_STEP` s (so a hot session costs one write a second)
``save``/``delete``   one write transaction (~5-10 µs), LRU and byte count kept in it
``lock``/``unlock``   one write transaction
====================  ============================================================

Expiry is exact to :data:`SLIDE_STEP` seconds (as Redis' and memcached's
TTLs are whole seconds). Expired records are dropped when met and a bounded
batch at a time, coldest first, on each write. Beyond ``max_sessions`` or
``max_bytes`` the least recently used sessions are evicted (companion
records are not: a tombstone must outlive the session it explains).
Payloads are compressed with zlib (level 1) when that saves a tenth or
more, so the memory held stays near the serialized size.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import struct
import tempfile
import threading
import time
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import parse_qs, urlsplit

import lmdb

from ..errors import ConfigError, StoreUnavailable
from .base import ANY, NO_LOAD, Record, SaveResult, count_ops, is_companion

__all__ = ["LocalStore", "default_directory", "SLIDE_STEP"]

#: Seconds an expiry may lag behind a read before the read rewrites it.
SLIDE_STEP = 1.0
_SWEEP_BATCH = 16
_READER_CHECK_EVERY = 5.0
_NEVER = float("inf")
_EVER = -_NEVER  # "now" for decoding a record whatever its expiry
_COMPRESS_FROM = 128
# version, expires (inf: never), access stamp in ms, flags
_HEAD = struct.Struct("<QdQB")
_LOCK = struct.Struct("<d")
_STAMP = struct.Struct(">Q")
_EXPIRY = struct.Struct(">d")
_COUNT = struct.Struct("<Q")
_ZLIB = 1
_DEFAULT_SESSIONS = 100_000
_DEFAULT_BYTES = 512 * 1024 * 1024


def default_root() -> Path:
    """Where ``local://`` keeps its directories: ``$SESSIONSTORE_LOCAL_DIR``, else tmpfs."""
    override = os.environ.get("SESSIONSTORE_LOCAL_DIR")
    if override:
        return Path(override)
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else Path(tempfile.gettempdir())
    return base / f"sessionstore-{_user()}"


def default_directory(*names: str) -> Path:
    """The directory of one application's (or node's) local store under :func:`default_root`.

    ``names`` say whose it is (the manager passes the key prefix, the cookie
    name, the working directory and, for a node copy, the node id): two
    applications on one host get two stores, every worker of one gets one.
    """
    digest = hashlib.sha256("\0".join(names).encode()).hexdigest()[:16]
    return default_root() / digest


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (containers)
        return str(os.getuid())


class LocalStore:
    """Sessions in a host-local LMDB environment (see the module docstring)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
        max_sessions: int = _DEFAULT_SESSIONS,
        max_bytes: int = _DEFAULT_BYTES,
        counted: bool = True,
    ) -> None:
        """``counted=False``: calls are not store commands of the request (a node copy)."""
        self.path = Path(path)
        self.max_sessions = max_sessions
        self.max_bytes = max_bytes
        self._clock = clock
        self._tally = count_ops if counted else _no_count
        self._env: _Env | None = None
        self._open_lock = threading.Lock()
        self._recent = _Recent()
        self._next_reader_check = 0.0
        self._env_for()  # fail at construction, not on the first request

    @classmethod
    def from_url(cls, url: str, *, clock: Callable[[], float] = time.time, app: Sequence[str] = ()) -> "LocalStore":
        """``local://`` (a directory named after ``app``) or ``local:///dir``; see the module docstring."""
        parts = urlsplit(url)
        if parts.netloc:
            raise ConfigError("store", f"local:// takes an absolute path (local:///dir), not a host: {url!r}")
        options = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        unknown = set(options) - {"max_sessions", "max_bytes"}
        if unknown:
            raise ConfigError("store", f"unknown local:// option(s) {', '.join(sorted(unknown))}; "
                                       "expected max_sessions, max_bytes")
        limits = {name: _positive(name, options[name]) for name in ("max_sessions", "max_bytes") if name in options}
        path = Path(parts.path) if parts.path not in ("", "/") else default_directory(*app)
        return cls(path, clock=clock, **limits)

    # -- the environment (one per directory and process, reopened after fork) ---------

    def _env_for(self) -> "_Env":
        env = self._env
        if env is not None and env.open and not env._closing and env.pid == _pid():
            return env
        with self._open_lock:
            env = self._env
            if env is None or not env.usable():
                env = self._env = _Env.get(self.path, self.max_bytes)
            return env

    def _write(self) -> "_Guarded":
        return _Guarded(self._begin(write=True), self.path)

    def _read(self, buffers: bool = False) -> "_Guarded":
        return _Guarded(self._begin(write=False, buffers=buffers), self.path)

    def _begin(self, write: bool, buffers: bool = False) -> "_Txn":
        """A transaction on this process's environment (opened again if a fork closed it meanwhile:
        waiting for a fork in progress takes as long as the transactions it waits for)."""
        for _ in range(100):
            env = self._env_for()
            if write and time.monotonic() >= self._next_reader_check:  # slots of readers that died
                self._next_reader_check = time.monotonic() + _READER_CHECK_EVERY
                env.lmdb.reader_check()
            try:
                return env.begin(write=write, buffers=buffers)
            except _Closed:
                continue
        raise StoreUnavailable(f"local store {self.path}: closed by concurrent forks")

    @property
    def _dbs(self) -> "_Dbs":
        """The databases of the environment in use (inside a transaction: the transaction's)."""
        env = self._env
        return env.dbs if env is not None and env.open else self._env_for().dbs

    # -- contract ---------------------------------------------------------------------

    def load(self, key: str) -> Record | None:
        self._tally()
        found = self._look(key, self._clock())
        return None if found is None else Record(found[0], found[1])

    def load_and_touch(self, key: str, ttl: int | None) -> Record | None:
        self._tally()
        now = self._clock()
        found = self._look(key, now)
        if found is None:
            return None
        data, version, expires, stamp = found
        if _needs_slide(expires, ttl, now) or (now * 1000 - stamp > 2000 * SLIDE_STEP and "}:" not in key):
            self._retouch(key, ttl, version)  # the expiry (or the LRU stamp) is a second behind
        return Record(data, version)

    def _look(self, key: str, now: float) -> tuple[bytes, int, float, int] | None:
        """``(data, version, expires, stamp)`` of the live record ``key``, in one read transaction.

        The header is read in place; the payload comes from this process's
        recent reads when their version is the stored one (a version is never
        reused), so a hot session is neither copied nor decompressed again.
        (The hot path of every sticky read: written out, without the
        transaction wrappers.)
        """
        handle = self._begin(write=False, buffers=True)
        env, txn = handle.env, handle.txn
        try:
            raw = txn.get(key.encode(), db=env.dbs.c if "}:" in key else env.dbs.s)
            if raw is None:
                return None
            version, expires, stamp, flags = _HEAD.unpack_from(raw)
            if expires <= now:
                return None
            data = self._recent.get(key, version)
            if data is None:
                body = raw[_HEAD.size:]
                data = zlib.decompress(body) if flags & _ZLIB else bytes(body)
                self._recent.put(key, version, data)
            return data, version, expires, stamp
        except lmdb.Error as exc:
            raise _unavailable(exc, self.path) from None
        finally:
            txn.abort()
            env.done()

    def save(self, key: str, data: bytes, ttl: int | None, expect: Any = ANY) -> SaveResult:
        self._tally()
        return self._mapped(lambda: self._save(key, bytes(data), ttl, expect))

    def touch(self, key: str, ttl: int | None) -> bool:
        self._tally()
        return self._retouch(key, ttl, ANY, force=True)

    def delete(self, key: str, expect: Any = ANY) -> bool:
        self._tally()
        k, now = key.encode(), self._clock()
        with self._write() as txn:
            entry = _decode(txn.get(k, db=self._db_of(key)), now)
            if entry is None or (expect is not ANY and entry.version != expect):
                return False
            self._drop(txn, key, entry)
        return True

    def close(self) -> None:
        """Nothing to release for others: the environment stays open for this process's other users."""

    # -- writes (transaction held) ----------------------------------------------------------

    def _save(self, key: str, data: bytes, ttl: int | None, expect: Any) -> SaveResult:
        k, now = key.encode(), self._clock()
        with self._write() as txn:
            entry = _decode(txn.get(k, db=self._db_of(key)), now)
            if expect is not ANY and (None if entry is None else entry.version) != expect:
                return SaveResult(False, current=None if entry is None else Record(entry.data, entry.version))
            if entry is not None:
                self._drop(txn, key, entry)
            version = self._next_version(txn)
            self._put(txn, key, _Entry(data, version, _expires(ttl, now), _stamp(now)))
            self._sweep(txn, now)
            if not is_companion(key):
                self._evict(txn)
        self._recent.put(key, version, data)  # committed: a failed commit gives its version out again
        return SaveResult(True, version=version)

    def _retouch(self, key: str, ttl: int | None, version: Any, force: bool = False) -> bool:
        """Slide the expiry (and the LRU stamp) of ``key`` if it still holds ``version``."""
        k, now = key.encode(), self._clock()
        with self._write() as txn:
            entry = _decode(txn.get(k, db=self._db_of(key)), now)
            if entry is None or (version is not ANY and entry.version != version):
                return False
            if force or _needs_slide(entry.expires, ttl, now) or _stamp(now) - entry.stamp > 1000 * SLIDE_STEP:
                self._drop(txn, key, entry)
                self._put(txn, key, _Entry(entry.data, entry.version, _expires(ttl, now), _stamp(now)))
        return True

    def _put(self, txn: Any, key: str, entry: "_Entry") -> None:
        k, dbs = key.encode(), self._dbs
        body, flags = _pack_data(entry.data)
        txn.put(k, _HEAD.pack(entry.version, entry.expires, entry.stamp, flags) + body, db=self._db_of(key))
        if is_companion(key):
            txn.put(_EXPIRY.pack(entry.expires) + k, b"", db=dbs.e)
        else:
            txn.put(_STAMP.pack(entry.stamp) + k, b"", db=dbs.l)
            self._add_bytes(txn, len(body))

    def _drop(self, txn: Any, key: str, entry: "_Entry") -> None:
        k, dbs = key.encode(), self._dbs
        txn.delete(k, db=self._db_of(key))
        if is_companion(key):
            txn.delete(_EXPIRY.pack(entry.expires) + k, db=dbs.e)
        else:
            txn.delete(_STAMP.pack(entry.stamp) + k, db=dbs.l)
            self._add_bytes(txn, -entry.stored)

    def _add_bytes(self, txn: Any, n: int) -> None:
        txn.put(b"bytes", _COUNT.pack(max(0, self._bytes(txn) + n)), db=self._dbs.m)

    def _bytes(self, txn: Any) -> int:
        raw = txn.get(b"bytes", db=self._dbs.m)
        return 0 if raw is None else _COUNT.unpack(raw)[0]

    def _next_version(self, txn: Any) -> int:
        raw = txn.get(b"version", db=self._dbs.m)
        version = (0 if raw is None else _COUNT.unpack(raw)[0]) + 1
        txn.put(b"version", _COUNT.pack(version), db=self._dbs.m)
        return version

    def _sweep(self, txn: Any, now: float) -> None:
        """Drop a bounded number of expired records, coldest sessions and earliest companions first."""
        dbs = self._dbs
        for order in (dbs.l, dbs.e):
            for key in list(_first_keys(txn, order, _SWEEP_BATCH)):
                entry = _decode(txn.get(key.encode(), db=self._db_of(key)), _EVER)
                if entry is None:
                    continue
                if entry.expires <= now:
                    self._drop(txn, key, entry)

    def _evict(self, txn: Any) -> int:
        """Evict least recently used sessions while over a bound."""
        dbs, evicted = self._dbs, 0
        while True:
            count = txn.stat(dbs.s)["entries"]
            if count == 0 or (count <= self.max_sessions and self._bytes(txn) <= self.max_bytes):
                return evicted
            key = next(_first_keys(txn, dbs.l, 1))
            raw = txn.get(key.encode(), db=dbs.s)
            if raw is None:  # an order entry without its record: repair
                txn.delete(next(_first_raw(txn, dbs.l)), db=dbs.l)
                continue
            self._drop(txn, key, _decode(raw, _EVER))  # type: ignore[arg-type]
            evicted += 1

    def _mapped(self, write: Callable[[], Any]) -> Any:
        """Run ``write``; if the map or the file system is full, evict the least recently used
        quarter of the sessions (their pages are reused) and try once more."""
        try:
            return write()
        except _Full:
            with self._write() as txn:
                self._shed(txn)
            return write()

    def _shed(self, txn: Any) -> None:
        dbs = self._dbs
        for key in list(_first_keys(txn, dbs.l, max(1, txn.stat(dbs.s)["entries"] // 4))):
            entry = _decode(txn.get(key.encode(), db=dbs.s), _EVER)
            if entry is not None:
                self._drop(txn, key, entry)

    def _db_of(self, key: str) -> Any:
        dbs = self._dbs
        return dbs.c if is_companion(key) else dbs.s

    # -- session locks (LockingStore) ---------------------------------------------------------

    def lock(self, key: str, token: str, expiry: float, load_ttl: Any = NO_LOAD) -> tuple[bool, Record | None]:
        self._tally()
        k, now = key.encode(), self._clock()
        with self._write() as txn:
            held = txn.get(k, db=self._dbs.k)
            if held is not None and _LOCK.unpack_from(held)[0] > now and held[_LOCK.size:] != token.encode():
                return False, None
            txn.put(k, _LOCK.pack(now + expiry) + token.encode(), db=self._dbs.k)
        if load_ttl is NO_LOAD:
            return True, None
        return True, self.load_and_touch(key, load_ttl)

    def renew(self, key: str, token: str, expiry: float) -> bool:
        self._tally()
        return self._owned(key, token, lambda txn, k, now: txn.put(k, _LOCK.pack(now + expiry) + token.encode(),
                                                                    db=self._dbs.k))

    def unlock(self, key: str, token: str) -> bool:
        self._tally()
        return self._owned(key, token, lambda txn, k, now: txn.delete(k, db=self._dbs.k))

    def save_and_unlock(self, key: str, data: bytes, ttl: int | None, expect: Any, token: str) -> SaveResult:
        result = self.save(key, data, ttl, expect)
        self._owned(key, token, lambda txn, k, now: txn.delete(k, db=self._dbs.k), live_only=False)
        return result

    def _owned(self, key: str, token: str, change: Callable[[Any, bytes, float], Any], live_only: bool = True) -> bool:
        k, now = key.encode(), self._clock()
        with self._write() as txn:
            held = txn.get(k, db=self._dbs.k)
            if held is None or held[_LOCK.size:] != token.encode():
                return False
            live = _LOCK.unpack_from(held)[0] > now
            if live_only and not live:
                txn.delete(k, db=self._dbs.k)
                return False
            change(txn, k, now)
            return live

    # -- index (IndexStore) --------------------------------------------------------------------

    def index_add(self, key: str, index_keys: Sequence[str], ttl: int | None) -> None:
        self._tally()
        now = self._clock()
        until = _expires(ttl, now)
        with self._write() as txn:
            for ix in index_keys:
                k = _entry_key(ix, key)
                old = txn.get(k, db=self._dbs.x)
                later = until if old is None else max(until, _EXPIRY.unpack(old)[0])
                txn.put(k, _EXPIRY.pack(later), db=self._dbs.x)

    def index_find(self, index_key: str) -> list[str]:
        self._tally()
        now, prefix, found = self._clock(), index_key.encode() + b"\0", []
        with self._read() as txn:
            cursor = txn.cursor(db=self._dbs.x)
            if cursor.set_range(prefix):
                for k, v in cursor:
                    if not k.startswith(prefix):
                        break
                    session_key = k[len(prefix):]
                    if _EXPIRY.unpack(v)[0] > now and _decode(txn.get(session_key, db=self._dbs.s), now):
                        found.append(session_key.decode())
        return found

    def index_drop(self, key: str) -> int:
        """Every entry of ``key``: index keys are scanned (this store is small and local)."""
        self._tally()
        suffix, dropped = b"\0" + key.encode(), 0
        with self._write() as txn:
            cursor = txn.cursor(db=self._dbs.x)
            doomed = [k for k, _ in cursor if k.endswith(suffix)]
            for k in doomed:
                txn.delete(k, db=self._dbs.x)
                dropped += 1
        return dropped

    # -- introspection (tests, stats, doctor) ---------------------------------------------------

    def __len__(self) -> int:
        with self._read() as txn:
            return txn.stat(self._dbs.s)["entries"]

    def keys(self) -> list[str]:
        """Every session key held now (expired ones included until they are swept)."""
        with self._read() as txn:
            return [k.decode() for k, _ in txn.cursor(db=self._dbs.s)]

    @property
    def nbytes(self) -> int:
        """Payload bytes held (as stored: compressed where that paid)."""
        with self._read() as txn:
            return self._bytes(txn)

    def file_bytes(self) -> int:
        """Bytes of memory the data file takes (allocated tmpfs pages)."""
        return os.stat(self.path / "data.mdb").st_blocks * 512

    def ttl(self, key: str) -> float | None:
        """Seconds left for ``key`` (``None``: no expiry, or absent)."""
        with self._read() as txn:
            entry = _decode(txn.get(key.encode(), db=self._db_of(key)), self._clock())
        if entry is None or entry.expires == _NEVER:
            return None
        return entry.expires - self._clock()


# -- records ------------------------------------------------------------------------------------


class _Recent:
    """Payloads this process read or wrote lately, by key and version (bounded LRU).

    Only a hint: a payload is used only when its version is the one stored
    now, and versions are never reused, so it is never stale.
    """

    def __init__(self, max_entries: int = 1024, max_bytes: int = 16 * 1024 * 1024) -> None:
        self._entries: OrderedDict[str, tuple[int, bytes]] = OrderedDict()
        self._bytes = 0
        self._max_entries, self._max_bytes = max_entries, max_bytes
        self._lock = threading.Lock()

    def get(self, key: str, version: int) -> bytes | None:
        """(A dict lookup is atomic: no lock on the read path; the order is by last write.)"""
        found = self._entries.get(key)
        return found[1] if found is not None and found[0] == version else None

    def put(self, key: str, version: int, data: bytes) -> None:
        if len(data) > self._max_bytes // 8:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= len(old[1])
            self._entries[key] = (version, data)
            self._bytes += len(data)
            while len(self._entries) > self._max_entries or self._bytes > self._max_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._bytes -= len(dropped)


class _Entry:
    __slots__ = ("data", "version", "expires", "stamp", "stored")

    def __init__(self, data: bytes, version: int, expires: float, stamp: int, stored: int = 0) -> None:
        self.data, self.version, self.expires, self.stamp, self.stored = data, version, expires, stamp, stored


def _decode(raw: bytes | None, now: float) -> _Entry | None:
    """The live entry in ``raw`` (``None`` if absent or expired at ``now``)."""
    if raw is None:
        return None
    version, expires, stamp, flags = _HEAD.unpack_from(raw)
    if expires <= now:
        return None
    body = raw[_HEAD.size:]
    data = zlib.decompress(body) if flags & _ZLIB else body
    return _Entry(data, version, expires, stamp, len(body))


def _pack_data(data: bytes) -> tuple[bytes, int]:
    if len(data) >= _COMPRESS_FROM:
        packed = zlib.compress(data, 1)
        if len(packed) * 10 <= len(data) * 9:
            return packed, _ZLIB
    return data, 0


def _expires(ttl: int | None, now: float) -> float:
    return _NEVER if ttl is None else now + ttl


def _needs_slide(expires: float, ttl: int | None, now: float) -> bool:
    target = _expires(ttl, now)
    return target == _NEVER != expires or target - expires > SLIDE_STEP or target < expires


def _stamp(now: float) -> int:
    """The LRU order key of an access at ``now``: milliseconds (reads move it at most once a second)."""
    return int(now * 1000)


def _entry_key(index_key: str, key: str) -> bytes:
    return index_key.encode() + b"\0" + key.encode()


def _first_raw(txn: Any, db: Any) -> Any:
    cursor = txn.cursor(db=db)
    if cursor.first():
        yield from cursor.iternext(keys=True, values=False)


def _first_keys(txn: Any, order_db: Any, n: int) -> Any:
    """The record keys of the first ``n`` entries of an order database (stamp prefix stripped)."""
    for i, raw in enumerate(_first_raw(txn, order_db)):
        if i >= n:
            return
        yield raw[8:].decode()


def _positive(name: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError("store", f"local:// option {name} must be a positive integer, got {text!r}")
    return value


def _no_count(n: int = 1) -> None:
    pass


_pid = os.getpid


# -- environments: one per directory per process --------------------------------------------------


class _Dbs:
    __slots__ = ("s", "l", "c", "e", "k", "x", "m")

    def __init__(self, env: Any) -> None:
        for name in self.__slots__:
            setattr(self, name, env.open_db(name.encode()))


class _Env:
    """An open LMDB environment shared by every :class:`LocalStore` of this process on one directory.

    LMDB forbids opening one environment twice in a process (closing one
    would drop the other's locks) and using one across ``fork``: every
    environment is closed just before this process forks (once the
    transactions running in other threads are over) and opened again, in
    parent and child, on next use. That is what ``gunicorn --preload``
    needs: the master builds the application, the workers use it.
    """

    _open: dict[str, "_Env"] = {}
    _guard = threading.Lock()

    def __init__(self, path: Path, map_size: int) -> None:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            self.lmdb = lmdb.open(str(path), map_size=map_size, max_dbs=8, max_readers=1024,
                                  sync=False, metasync=False, readahead=False, lock=True)
        except lmdb.Error as exc:
            raise ConfigError("store", f"cannot open the local store in {path}: {exc}") from None
        self.pid = os.getpid()
        self.dbs = _Dbs(self.lmdb)
        self.open = True
        self._closing = False  # a fork waits to close it: no new transaction starts
        self._active = 0
        self._counting = threading.Lock()
        self.lmdb.reader_check()

    @classmethod
    def get(cls, path: Path, max_bytes: int) -> "_Env":
        name = str(path.absolute())
        with cls._guard:
            env = cls._open.get(name)
            if env is None or not env.usable():
                env = cls._open[name] = cls(path, _map_size(max_bytes))
            return env

    def usable(self) -> bool:
        """Open in this process, and no fork waiting to close it."""
        return self.open and not self._closing and self.pid == os.getpid()

    def begin(self, write: bool, buffers: bool = False) -> "_Txn":
        """A transaction; raises :class:`_Closed` if a fork closed the environment meanwhile.

        ``buffers=True``: values are memoryviews into the map, valid inside the transaction only.
        """
        with self._counting:
            if not self.open or self._closing:
                raise _Closed
            self._active += 1
        try:
            return _Txn(self, self.lmdb.begin(write=write, buffers=buffers))
        except BaseException:
            self.done()
            raise

    def done(self) -> None:
        with self._counting:
            self._active -= 1

    def close_for_fork(self) -> None:
        """Close once the transactions running in other threads are over (new ones wait for the
        reopened environment)."""
        with self._counting:
            self._closing = True
        deadline = time.monotonic() + 30.0
        while True:
            with self._counting:
                if self._active == 0 or time.monotonic() >= deadline:
                    self.open = False
                    self.lmdb.close()
                    return
            time.sleep(0.0005)

    @classmethod
    def close_all_for_fork(cls) -> None:
        cls._guard.acquire()
        for env in cls._open.values():
            if env.open and env.pid == os.getpid():
                env.close_for_fork()
        cls._open.clear()

    @classmethod
    def after_fork(cls) -> None:
        cls._guard.release()


class _Closed(Exception):
    """The environment was closed (for a fork) after it was looked up: open it again."""


class _Full(StoreUnavailable):
    """The map (or the file system under it) is full."""


class _Guarded:
    """A transaction whose LMDB failures surface as :class:`StoreUnavailable` (a full tmpfs,
    a map too small, a damaged file): the request gets the store-unavailable answer, not a 500."""

    __slots__ = ("txn", "path")

    def __init__(self, txn: "_Txn", path: Path) -> None:
        self.txn, self.path = txn, path

    def __enter__(self) -> Any:
        return self.txn.__enter__()

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> Any:
        try:
            result = self.txn.__exit__(kind, exc, tb)
        except lmdb.Error as failure:  # the commit itself failed
            raise _unavailable(failure, self.path) from None
        if isinstance(exc, lmdb.Error):
            raise _unavailable(exc, self.path) from None
        return result


def _unavailable(exc: Exception, path: Path) -> StoreUnavailable:
    kind = _Full if isinstance(exc, (lmdb.MapFullError, lmdb.DiskError)) else StoreUnavailable
    return kind(f"local store {path}: {type(exc).__name__}: {exc}")


class _Txn:
    """A transaction that tells its environment when it is over (see :meth:`_Env.close_for_fork`)."""

    __slots__ = ("env", "txn")

    def __init__(self, env: _Env, txn: Any) -> None:
        self.env, self.txn = env, txn

    def __enter__(self) -> Any:
        return self.txn.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        try:
            return self.txn.__exit__(*exc)
        finally:
            self.env.done()


def _map_size(max_bytes: int) -> int:
    """Address space for the map: room for the bound, B-tree pages and MVCC copies (tmpfs is sparse)."""
    return max(256 * 1024 * 1024, 4 * max_bytes)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_Env.close_all_for_fork, after_in_parent=_Env.after_fork,
                        after_in_child=_Env.after_fork)
