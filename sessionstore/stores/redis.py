"""Redis store: standalone, TLS, Sentinel and Cluster, one code path.

One key per session. The value is the version followed by the payload::

    <16 lowercase hex digits: version><payload bytes>

The version is a random 64-bit token drawn by the client on every save, so it
changes on every write (even when a deleted key is created again, which a
counter restarting at 1 would not do) and stays the same on touch, which
never rewrites the value. Scripts read it with ``GETRANGE key 0 15`` so a
successful conditional write never copies the payload into Lua.

Every method is one round trip and one command, counted once with
:func:`~sessionstore.stores.base.count_ops`:

=====================  ===================================================
``load``               ``GET``
``load_and_touch``     ``GETEX key PX ms`` (``GETEX key PERSIST``)
``save``               ``EVALSHA`` of the save script
``touch``              ``PEXPIRE`` (``EVALSHA`` of a PERSIST script)
``delete``             ``DEL`` (``EVALSHA`` when conditional)
``lock``               ``SET lock token NX PX ms GET`` (``EVALSHA`` with load)
``renew``, ``unlock``  ``EVALSHA`` (owner-only)
``save_and_unlock``    ``EVALSHA`` of the save script
=====================  ===================================================

A value and its expiry are always written by the same command (``SET … PX``,
or ``SET`` without ``PX`` for ``ttl=None``), so no key ever exists without
its TTL. Scripts are sent with ``EVALSHA``; on ``NOSCRIPT`` (a fresh server,
a failover) the script is loaded once (three commands, still counted as
one) and ``EVALSHA`` is used afterwards. Reads and scripts go out on direct
connections off Cluster (:mod:`.redis_direct`), everything else through the
redis-py client.

redis-py retries a command after a connection error or timeout, and a
direct command that fails is repeated through the client, so a call may
reach the server twice. Saving and locking are idempotent for that: a
save whose stored version already is its own new version succeeds, and a
token that already holds the lock gets it.

Index (single sign-out, :class:`~.base.IndexStore`)
    A forward key per external id, ``<prefix>ix:{<sha256 hex>}``: a sorted
    set whose members are session keys scored by the entry's expiry
    (epoch ms on the server's clock, ``+inf`` for a session without TTL),
    so entries age out one by one and the key's own TTL is that of its
    longest-lived entry. A reverse set per session, ``<prefix>{<id>}:ix``
    (same slot as the session), holds the forward keys it is under.

    ``index_add`` is one script (``EVALSHA``) that writes the reverse set
    and every forward key atomically, pruning aged-out entries as it goes.
    ``index_find`` is one read-only script (members whose score is in the
    future) and then one ``EXISTS`` per member, pipelined: entries of
    sessions that expired or were deleted are left out. ``index_drop`` is
    ``SMEMBERS`` of the reverse set, then one script removing exactly those
    entries and the reverse set; an entry added between the two stays
    recorded in the reverse set (nothing is lost, it is dropped next time or
    ages out).

    Cluster: the forward keys hash to other slots than the session (their
    hash tag is the digest). Each call is split into one script per slot:
    the reverse set's slot first (with any forward key that happens to share
    it), then each other slot. Each script is atomic; the call as a whole is
    not. The order makes a forward entry exist only after the reverse record
    naming it, so a later ``index_drop`` always finds it; a failure between
    the scripts leaves a reverse record without its forward entry (the
    session is not found by that id) and the call raises.

Invalidation feed (:class:`~.base.PushFeed`)
    ``PUBLISH`` on a channel (one command per message); each subscribing node
    keeps one pub/sub connection and a listener thread (no command while
    idle, a ``PING`` every 30 s to notice a dead connection). In Cluster mode
    the subscriber connects to one primary; classic pub/sub messages reach
    every node of the cluster. Messages published while a subscriber was
    disconnected are lost, so after every reconnection the subscriber
    reports a possible loss (sticky mode then re-checks its local sessions).

Requires Redis 7.0 or later (``GETEX``, ``SET … NX GET``). The store only
differs between deployments in how the redis-py client is
built (:meth:`RedisStore.from_url`); Cluster works because a session key
``<prefix>{<id>}`` and its companions ``<prefix>{<id>}:<suffix>`` share a
hash slot.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, Union
from urllib.parse import parse_qs, unquote, urlsplit

from redis import Redis
from redis.backoff import EqualJitterBackoff, NoBackoff
from redis.client import PubSub
from redis.crc import key_slot
from redis.cluster import ClusterNode, RedisCluster
from redis.commands.core import Script
from redis.exceptions import (
    ClusterError,
    ConnectionError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ReadOnlyError,
    ResponseError,
    SlotNotCoveredError,
    TimeoutError,
    TryAgainError,
)
from redis.retry import Retry
from redis.sentinel import Sentinel

from ..decoding import lock_token
from ..errors import ConfigError, CorruptPayload, StoreError, StoreUnavailable
from .base import ANY, INDEX_SUFFIX, NO_LOAD, Record, SaveResult, companion_key, count_ops
from .redis_direct import MISS, DirectCommands

__all__ = ["RedisStore"]

_log = logging.getLogger("sessionstore")

#: A redis-py client the store can drive.
Client = Union[Redis, RedisCluster]

_VERSION_LEN = 16
_VERSION_RE = re.compile(rb"[0-9a-f]{16}")
#: ``expect`` as the save script sees it: ``*`` any, empty absent, else a version.
_EXPECT_ANY = "*"
_EXPECT_ABSENT = ""

# -- scripts -----------------------------------------------------------------
# Scripts are built without a client (their source is bytes, so no encoder is
# needed) and run with ``script(keys, args, client=...)``: EVALSHA, and on
# NOSCRIPT one SCRIPT LOAD (on every primary, for Cluster) then EVALSHA.

#: KEYS: session[, lock]. ARGV: expect, value, ttl ms or '' (none)[, token].
#: Writes if the stored version matches ``expect`` (see ``_EXPECT_*``) or
#: already is the new value's (a retried call whose first attempt was
#: applied), then releases the lock if ``token`` owns it, whether or not the
#: write happened. Returns ``{1}``, or ``{0, current value or nil}``.
_SAVE = Script(None, b"""
local stored = redis.call('GETRANGE', KEYS[1], 0, 15)
local ok = ARGV[1] == '*' or stored == ARGV[1] or stored == string.sub(ARGV[2], 1, 16)
if ok and ARGV[3] == '' then
  redis.call('SET', KEYS[1], ARGV[2])
elseif ok then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
if KEYS[2] and redis.call('GET', KEYS[2]) == ARGV[4] then
  redis.call('DEL', KEYS[2])
end
if ok then return {1} end
return {0, redis.call('GET', KEYS[1])}
""")

#: KEYS: session, lock. ARGV: token, lock expiry ms, session ttl ms or ''.
#: Takes the lock if free (or already ``token``'s), then loads and touches
#: the session. Returns ``{0, holder}`` or ``{1, value or nil}``.
_LOCK = Script(None, b"""
local holder = redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2], 'GET')
if holder and holder ~= ARGV[1] then return {0, holder} end
if ARGV[3] == '' then return {1, redis.call('GETEX', KEYS[1], 'PERSIST')} end
return {1, redis.call('GETEX', KEYS[1], 'PX', ARGV[3])}
""")

#: KEYS: lock. ARGV: token, new expiry ms or '' to release.
#: Acts only if ``token`` owns the lock; returns 1 if it acted, else 0.
_OWNER = Script(None, b"""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then return redis.call('DEL', KEYS[1]) end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
""")

#: KEYS: session. ARGV: version. Deletes if the stored version is that one.
_DELETE_IF = Script(None, b"""
if redis.call('GETRANGE', KEYS[1], 0, 15) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
""")

#: KEYS: session. Removes the expiry; 1 if the key exists (PERSIST alone
#: answers 0 for a key that has no expiry).
_PERSIST = Script(None, b"""
if redis.call('PERSIST', KEYS[1]) == 1 then return 1 end
return redis.call('EXISTS', KEYS[1])
""")

#: Server time in epoch milliseconds (scripts may call TIME since Redis 5).
_NOW = b"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

#: KEYS: [reverse set] then forward keys. ARGV: 1 if KEYS[1] is the reverse
#: set else 0, entry ttl ms or '' (never expires), session key, then (with
#: the reverse set) every index key to record in it. A key's TTL only grows:
#: it becomes at least the entry ttl; '' makes it persistent.
_INDEX_ADD = Script(None, _NOW + b"""
local function extend(key, existed)
  if ARGV[2] == '' then redis.call('PERSIST', key) return end
  local left = -2
  if existed == 1 then left = redis.call('PTTL', key) end
  if left == -1 then return end
  if left < tonumber(ARGV[2]) then redis.call('PEXPIRE', key, ARGV[2]) end
end
local first = 1
if ARGV[1] == '1' then
  first = 2
  local existed = redis.call('EXISTS', KEYS[1])
  redis.call('SADD', KEYS[1], unpack(ARGV, 4))
  extend(KEYS[1], existed)
end
local score = '+inf'
if ARGV[2] ~= '' then score = now + tonumber(ARGV[2]) end
for i = first, #KEYS do
  local existed = redis.call('EXISTS', KEYS[i])
  redis.call('ZADD', KEYS[i], 'GT', score, ARGV[3])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  extend(KEYS[i], existed)
end
return 1
""")

#: KEYS: forward key. Session keys whose entry has not aged out (read-only).
_INDEX_FIND = Script(None, _NOW + b"""
return redis.call('ZRANGE', KEYS[1], '(' .. now, '+inf', 'BYSCORE')
""")

#: KEYS: [reverse set] then forward keys. ARGV: 1 if KEYS[1] is the reverse
#: set else 0, session key, then (with the reverse set) the members to remove
#: from it. Removes the session from each forward key (deleting emptied
#: ones); the reverse set loses those members and goes when empty.
_INDEX_DROP = Script(None, b"""
local first = 1
if ARGV[1] == '1' then
  first = 2
  redis.call('SREM', KEYS[1], unpack(ARGV, 3))
end
for i = first, #KEYS do
  redis.call('ZREM', KEYS[i], ARGV[2])
end
return 1
""")

# -- errors ------------------------------------------------------------------

#: Failures meaning "cannot reach a server that can answer": connection
#: refused or reset, timeouts, no master known to Sentinel (these are all
#: ``ConnectionError``), cluster down, slot not served, writes refused by a
#: demoted master.
_UNAVAILABLE = (
    ConnectionError,
    TimeoutError,
    ClusterError,
    SlotNotCoveredError,
    TryAgainError,
    ReadOnlyError,
)


@contextmanager
def _translated() -> Iterator[None]:
    """Re-raise redis-py failures as :class:`StoreUnavailable` or :class:`StoreError`; a key
    of another type than ours (``WRONGTYPE``, also from inside a script) as :class:`CorruptPayload`."""
    try:
        yield
    except _UNAVAILABLE as exc:
        raise StoreUnavailable(f"redis: {exc}") from exc
    except ResponseError as exc:
        if "WRONGTYPE" in str(exc):
            raise CorruptPayload("bad record: redis: the key holds another type of value", part="record") from None
        raise StoreError(f"redis: {exc}") from exc
    except (RedisError, RedisClusterException) as exc:
        raise StoreError(f"redis: {exc}") from exc


# -- value format ------------------------------------------------------------


def _new_version() -> str:
    return secrets.token_hex(_VERSION_LEN // 2)


def _record(raw: bytes | None) -> Record | None:
    """Split a stored value into a :class:`Record`; ``None`` stays ``None``.

    :raise CorruptPayload: the value does not start with a version.
    """
    if raw is None:
        return None
    if not _VERSION_RE.match(raw):
        raise CorruptPayload("bad record: redis: stored value has no version header", part="record")
    return Record(raw[_VERSION_LEN:], raw[:_VERSION_LEN].decode("ascii"))


def _ms(seconds: float) -> int:
    """Seconds to whole milliseconds, at least 1 (``PX 0`` is an error)."""
    return max(1, round(seconds * 1000))


def _ttl_arg(ttl: float | None) -> int | str:
    """A script's ttl argument: milliseconds, or ``''`` for no expiry."""
    return "" if ttl is None else _ms(ttl)


def _expect_arg(expect: Any) -> Any:
    if expect is ANY:
        return _EXPECT_ANY
    return _EXPECT_ABSENT if expect is None else expect


class RedisStore:
    """Sessions in Redis, Redis Sentinel or Redis Cluster.

    Implements :class:`~sessionstore.stores.base.Store` and
    :class:`~sessionstore.stores.base.LockingStore`. Thread-safe: the
    redis-py client keeps a connection pool shared by all threads.

    :param client: a redis-py :class:`~redis.Redis` or
        :class:`~redis.cluster.RedisCluster`, or a callable returning one. A
        callable is called on first use (again after :meth:`close`), so a
        cluster that is down when the application starts makes requests fail
        with :class:`StoreUnavailable` instead of failing the start-up. The
        store owns the client: :meth:`close` closes it.
    """

    def __init__(self, client: Client | Callable[[], Client]) -> None:
        self._connect: Callable[[], Client] = (
            (lambda: client) if isinstance(client, (Redis, RedisCluster)) else client
        )
        self._client: Client | None = None
        self._direct: DirectCommands | None = None  # standalone and Sentinel: see redis_direct
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, *, clock: Callable[[], float] = time.time) -> "RedisStore":
        """Build a store from a URL.

        ``redis://[[user]:password@]host[:port][/db]``,
        ``rediss://…`` (TLS), ``redis+sentinel://[[user]:password@]h1:p1,h2:p2/<master>[/<db>]``
        (the password is the master's; sentinel port defaults to 26379),
        ``redis+cluster://[[user]:password@]h1:p1,h2:p2``.

        Query options: ``socket_timeout`` (seconds, default 1),
        ``socket_connect_timeout`` (default 1), ``max_connections`` (per
        server; default unbounded, one per concurrently busy thread; past
        it a call fails with :class:`StoreUnavailable` rather than waiting),
        ``retries`` (attempts after a connection error or timeout, with
        exponential backoff capped at ``retry_backoff`` seconds; default 3 and
        0.5 — raise both to ride out a Sentinel failover instead of failing
        the requests made during it), ``health_check_interval`` (seconds
        idle after which a pooled connection is PINGed before use; default 0,
        off). ``rediss`` also takes ``ssl_cert_reqs`` (``none``, ``optional``,
        ``required``), ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile`` and
        ``ssl_check_hostname`` (``true``/``false``).

        ``clock`` is accepted for a signature shared with the other stores;
        Redis expires keys on its own clock.

        :raise ConfigError: (field ``store``) the URL is malformed or names an
            unknown option.
        """
        del clock
        return cls(_parse_url(url).connector())

    # -- plumbing ------------------------------------------------------------

    def _redis(self) -> Client:
        """The client, built on first use (RedisCluster connects when built)."""
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._built()
                    if not isinstance(self._client, RedisCluster):
                        self._direct = DirectCommands(self._client)
                client = self._client
        return client

    def _built(self) -> Client:
        try:
            return self._connect()
        except RedisClusterException as exc:  # no startup node reachable
            raise StoreUnavailable(f"redis: {exc}") from exc

    def _command(self, *args: Any, **options: Any) -> Any:
        """Send one command; its reply as redis-py parses it (``options`` steer the parser)."""
        count_ops()
        with _translated():
            return self._redis().execute_command(*args, **options)

    def _read(self, *args: Any) -> Any:
        """Send one read command, directly when possible (:mod:`.redis_direct`), else as ``_command``."""
        direct = self._direct
        if direct is None:
            return self._command(*args)
        count_ops()
        with _translated():
            reply = direct.call(*args)
            if reply is MISS:
                return self._redis().execute_command(*args)
        return reply

    def _script(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        """Run ``script`` with EVALSHA (one command); its raw reply.

        Directly when possible (:mod:`.redis_direct`), else through the
        client. A server that does not know the script yet gets it loaded once
        (three commands, counted as one).
        """
        count_ops()
        with _translated():
            direct = self._direct
            if direct is not None:
                reply = self._direct_script(direct, script, [*keys, *args], len(keys))
                if reply is not MISS:
                    return reply
            return script(keys, args, client=self._redis())

    def _direct_script(self, direct: DirectCommands, script: Script, keys_and_args: list[Any], nkeys: int) -> Any:
        command = ("EVALSHA", script.sha, nkeys, *keys_and_args)
        try:
            return direct.call(*command)
        except NoScriptError:  # a fresh server, or a failover: load it once (as redis-py would), run it again
            self._redis().script_load(script.script)
        try:
            return direct.call(*command)
        except NoScriptError:
            return MISS

    def _save(self, keys: list[str], data: bytes, ttl: int | None, expect: Any, *extra: Any) -> SaveResult:
        version = _new_version()
        value = version.encode("ascii") + bytes(data)
        reply = self._script(_SAVE, keys, [_expect_arg(expect), value, _ttl_arg(ttl), *extra])
        if reply[0] == 1:
            return SaveResult(True, version=version)
        return SaveResult(False, current=_record(reply[1]))

    # -- Store ---------------------------------------------------------------

    def load(self, key: str) -> Record | None:
        """The record under ``key`` (``GET``); the expiry is left alone."""
        return _record(self._read("GET", key))

    def load_and_touch(self, key: str, ttl: int | None) -> Record | None:
        """The record under ``key``, its expiry slid to ``ttl`` (one ``GETEX``)."""
        expiry = ("PERSIST",) if ttl is None else ("PX", _ms(ttl))
        return _record(self._read("GETEX", key, *expiry))

    def save(self, key: str, data: bytes, ttl: int | None, expect: Any = ANY) -> SaveResult:
        """Write ``data`` with ``ttl`` if the stored version is ``expect``.

        One script call: on a failed condition the reply carries the stored
        value, returned as ``current``.
        """
        return self._save([key], data, ttl, expect)

    def touch(self, key: str, ttl: int | None) -> bool:
        """Slide the expiry (``PEXPIRE``; a script for ``ttl=None``); ``False`` if the key is gone."""
        if ttl is None:
            return self._script(_PERSIST, [key], []) == 1
        return bool(self._command("PEXPIRE", key, _ms(ttl)))

    def delete(self, key: str, expect: Any = ANY) -> bool:
        """Delete ``key`` (only if its version is ``expect``, when given).

        ``False`` if nothing was deleted; ``expect=None`` (absent) never
        deletes anything and sends nothing.
        """
        if expect is ANY:
            return self._command("DEL", key) > 0
        if expect is None:
            return False
        return self._script(_DELETE_IF, [key], [expect]) == 1

    def close(self) -> None:
        """Close the client's connections (and Sentinel's). The store reconnects if used again."""
        with self._lock:
            client, self._client = self._client, None
            direct, self._direct = self._direct, None
        if direct is not None:
            direct.close()
        if client is not None:
            _close(client)

    # -- LockingStore ----------------------------------------------------------

    def lock(
        self, key: str, token: str, expiry: float, load_ttl: Any = NO_LOAD
    ) -> tuple[bool, Record | None]:
        """Take the lock ``companion_key(key, "lock")`` if free, for ``expiry`` seconds.

        Without ``load_ttl`` this is ``SET lock token NX PX ms GET``; with
        it, one script that also does ``load_and_touch(key, load_ttl)`` once
        the lock is taken. A ``token`` that already holds the lock gets it
        (a call retried after a timeout must not lock its own caller out);
        tokens must therefore be unique per holder.
        """
        lock_key = companion_key(key, "lock")
        if load_ttl is NO_LOAD:
            holder = self._command("SET", lock_key, token, "NX", "PX", _ms(expiry), "GET", get=True)
            return holder is None or lock_token(holder) == token, None
        reply = self._script(_LOCK, [key, lock_key], [token, _ms(expiry), _ttl_arg(load_ttl)])
        if reply[0] == 1:
            try:
                return True, _record(reply[1])
            except CorruptPayload:  # the caller never learns it holds the lock: release it
                self.unlock(key, token)
                raise
        lock_token(reply[1])  # a held lock must hold a token: anything else is not ours
        return False, None

    def renew(self, key: str, token: str, expiry: float) -> bool:
        """Reset the lock's expiry to ``expiry`` seconds if ``token`` owns it."""
        return self._script(_OWNER, [companion_key(key, "lock")], [token, _ms(expiry)]) == 1

    def unlock(self, key: str, token: str) -> bool:
        """Delete the lock if ``token`` owns it."""
        return self._script(_OWNER, [companion_key(key, "lock")], [token, ""]) == 1

    def save_and_unlock(
        self, key: str, data: bytes, ttl: int | None, expect: Any, token: str
    ) -> SaveResult:
        """:meth:`save`, then release the lock if ``token`` owns it, in one script.

        The lock is released whether or not the conditional write succeeded.
        """
        return self._save([key, companion_key(key, "lock")], data, ttl, expect, token)

    # -- IndexStore --------------------------------------------------------------

    def index_add(self, key: str, index_keys: Sequence[str], ttl: int | None) -> None:
        """Record ``key`` under ``index_keys``: one script per slot (one in all off Cluster)."""
        names = list(dict.fromkeys(index_keys))
        if not names:
            return
        reverse = companion_key(key, INDEX_SUFFIX)
        ttl_arg = _ttl_arg(ttl)
        for holds_reverse, keys in _by_slot(self._redis(), reverse, names):
            args: list[Any] = ["1" if holds_reverse else "0", ttl_arg, key]
            if holds_reverse:
                args += names
            self._script(_INDEX_ADD, keys, args)

    def index_find(self, index_key: str) -> list[str]:
        """Live session keys under ``index_key``: one script, then one pipelined ``EXISTS`` each."""
        # entries are checked by the caller (SessionIndex.entry); undecodable bytes cannot pass it
        members = [m.decode("utf-8", "replace") for m in self._script(_INDEX_FIND, [index_key], [])]
        if not members:
            return []
        count_ops(len(members))
        with _translated():
            pipe = self._redis().pipeline(transaction=False)
            for member in members:
                pipe.exists(member)
            found = pipe.execute()
        return [m for m, n in zip(members, found) if n]

    def index_drop(self, key: str) -> int:
        """Drop ``key``'s entries: ``SMEMBERS`` of its reverse set, then one script per slot."""
        reverse = companion_key(key, INDEX_SUFFIX)
        names = sorted(_index_keys(self._command("SMEMBERS", reverse)))
        if not names:
            return 0
        for holds_reverse, keys in _by_slot(self._redis(), reverse, names):
            args: list[Any] = ["1" if holds_reverse else "0", key]
            if holds_reverse:
                args += names
            self._script(_INDEX_DROP, keys, args)
        return len(names)

    # -- PushFeed ------------------------------------------------------------------

    def feed_publish(self, channel: str, message: bytes) -> None:
        """``PUBLISH`` (one command; any Cluster node spreads it to all)."""
        self._command("PUBLISH", channel, bytes(message))

    def feed_subscribe(self, channel: str, deliver: Callable[[bytes], None],
                       lost: Callable[[], None]) -> _RedisSubscription:
        """Subscribe now (confirmed by the server); a listener thread calls ``deliver``."""
        return _RedisSubscription(self, channel, deliver, lost)


# -- index and feed helpers ------------------------------------------------------


def _index_keys(members: Sequence[bytes]) -> list[str]:
    """The index keys in a reverse set (printable ASCII: hashes of the pairs)."""
    try:
        return [m.decode("ascii") for m in members]
    except UnicodeDecodeError:
        raise CorruptPayload("bad index record: redis: a reverse index set holds a non-ASCII member",
                             part="index record") from None


def _by_slot(client: Client, first: str, others: Sequence[str]) -> list[tuple[bool, list[str]]]:
    """``[(holds first, keys)]``: one group per Cluster slot, ``first``'s group first.

    On a standalone server (or Sentinel) everything is one group.
    """
    if not isinstance(client, RedisCluster):
        return [(True, [first, *others])]
    home = key_slot(first.encode())
    groups: dict[int, list[str]] = {home: [first]}
    for key in others:
        groups.setdefault(key_slot(key.encode()), []).append(key)
    return [(slot == home, keys) for slot, keys in groups.items()]


class _TrackedPubSub(PubSub):
    """A PubSub counting its (re)connections: each one after the first may have lost messages."""

    connects = 0

    def on_connect(self, connection: Any) -> None:
        self.connects += 1
        super().on_connect(connection)


#: Seconds between PINGs on an idle subscription, and how long a PONG may take.
_FEED_PING = 30.0
_FEED_PONG_WAIT = 5.0


class _RedisSubscription:
    """One pub/sub connection and the thread listening on it (reconnects on failure)."""

    def __init__(self, store: "RedisStore", channel: str, deliver: Callable[[bytes], None],
                 lost: Callable[[], None]) -> None:
        self._store = store
        self._channel = channel
        self._deliver = deliver
        self._lost = lost
        self._closed = threading.Event()
        self._turn = 0  # Cluster: which primary to subscribe on (the next one after a failure)
        self._pubsub: _TrackedPubSub | None = self._subscribe()
        self._thread = threading.Thread(target=self._run, name="sessionstore-redis-feed", daemon=True)
        self._thread.start()

    def _subscribe(self) -> _TrackedPubSub:
        """Subscribe and wait for the server's confirmation (messages published after it arrive)."""
        client = self._store._redis()
        with _translated():
            if isinstance(client, RedisCluster):
                primaries = client.get_primaries()
                node = primaries[self._turn % len(primaries)]
                pool = client.get_redis_connection(node).connection_pool
            else:
                pool = client.connection_pool
            pubsub = _TrackedPubSub(pool)
            try:
                pubsub.subscribe(self._channel)
                deadline = time.monotonic() + 5.0
                while True:
                    message = pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
                    if message is not None and message["type"] == "subscribe":
                        return pubsub
                    if time.monotonic() >= deadline:
                        raise StoreUnavailable("redis: no pub/sub subscription confirmation within 5s")
            except BaseException:
                pubsub.close()
                raise

    def _run(self) -> None:
        backoff = 0.05
        pubsub = self._pubsub
        seen_connects = 0 if pubsub is None else pubsub.connects
        last_heard = time.monotonic()
        ping_sent: float | None = None
        while not self._closed.is_set():
            try:
                if pubsub is None:
                    pubsub = self._subscribe()
                    self._pubsub = pubsub
                    seen_connects, last_heard, ping_sent, backoff = pubsub.connects, time.monotonic(), None, 0.05
                    self._lost()
                message = pubsub.get_message(timeout=0.25)
                if pubsub.connects != seen_connects:  # redis-py reconnected and resubscribed by itself
                    seen_connects = pubsub.connects
                    self._lost()
                now = time.monotonic()
                if message is not None:
                    last_heard, ping_sent = now, None
                    if message["type"] == "message":
                        self._deliver(bytes(message["data"]))
                elif ping_sent is not None and now - ping_sent > _FEED_PONG_WAIT:
                    raise ConnectionError("no PONG on the pub/sub connection")
                elif ping_sent is None and now - last_heard > _FEED_PING:
                    pubsub.ping()
                    ping_sent = now
            except Exception as exc:  # noqa: BLE001 - any failure: start over on a new connection
                if self._closed.is_set():
                    break
                _log.warning("sessionstore: invalidation feed subscription lost (%s); reconnecting", exc)
                if pubsub is not None:
                    _quietly(pubsub.close)
                pubsub = self._pubsub = None
                self._turn += 1
                self._closed.wait(backoff)
                backoff = min(backoff * 2, 2.0)
        if pubsub is not None:
            _quietly(pubsub.close)

    def close(self) -> None:
        self._closed.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)


def _quietly(call: Callable[[], Any]) -> None:
    try:
        call()
    except Exception:  # noqa: BLE001 - closing a broken connection
        pass


def _close(client: Client) -> None:
    client.close()
    sentinel = getattr(getattr(client, "connection_pool", None), "sentinel_manager", None)
    if sentinel is not None:
        sentinel.close()


# -- URLs ----------------------------------------------------------------------

_SCHEMES = ("redis", "rediss", "redis+sentinel", "redis+cluster")
_DEFAULT_PORTS = {"redis+sentinel": 26379}
_SSL_CERT_REQS = ("none", "optional", "required")
_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _positive(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = convert(text)
        if value <= 0:
            raise ValueError("must be > 0")
        return value

    return parse


def _not_negative(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = convert(text)
        if value < 0:
            raise ValueError("must be >= 0")
        return value

    return parse


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"one of {', '.join(choices)}")
        return text

    return parse


def _boolean(text: str) -> bool:
    try:
        return _BOOLEANS[text.lower()]
    except KeyError:
        raise ValueError("true or false") from None


_OPTIONS: dict[str, Callable[[str], Any]] = {
    "socket_timeout": _positive(float),
    "socket_connect_timeout": _positive(float),
    "max_connections": _positive(int),
    "retries": _not_negative(int),
    "retry_backoff": _not_negative(float),
    "health_check_interval": _not_negative(int),
}
_SSL_OPTIONS: dict[str, Callable[[str], Any]] = {
    "ssl_cert_reqs": _choice(_SSL_CERT_REQS),
    "ssl_ca_certs": str,
    "ssl_certfile": str,
    "ssl_keyfile": str,
    "ssl_check_hostname": _boolean,
}


@dataclass(frozen=True)
class _Url:
    """A parsed store URL and how to build its client."""

    scheme: str
    hosts: list[tuple[str, int]]
    username: str | None
    password: str | None
    service: str | None
    db: int
    options: dict[str, Any]

    def connection_kwargs(self) -> dict[str, Any]:
        """redis-py keyword arguments for connections to data nodes."""
        options = dict(self.options)
        backoff = EqualJitterBackoff(cap=options.pop("retry_backoff", 0.5), base=0.025)
        kwargs: dict[str, Any] = {
            "socket_timeout": 1.0,
            "socket_connect_timeout": 1.0,
            "retry": Retry(backoff, options.pop("retries", 3)),
            "username": self.username,
            "password": self.password,
        }
        kwargs.update(options)
        return kwargs

    def connector(self) -> Callable[[], Client]:
        """A function building the client (called lazily by the store)."""
        kwargs = self.connection_kwargs()
        if self.scheme == "redis+cluster":
            nodes = [ClusterNode(host, port) for host, port in self.hosts]
            return lambda: RedisCluster(startup_nodes=nodes, **kwargs)
        if self.scheme == "redis+sentinel":
            return lambda: _sentinel_master(self.hosts, self.service, self.db, kwargs)
        (host, port), ssl = self.hosts[0], self.scheme == "rediss"
        return lambda: Redis(host=host, port=port, db=self.db, ssl=ssl, **kwargs)


def _sentinel_master(hosts: list[tuple[str, int]], service: str, db: int, kwargs: dict[str, Any]) -> Redis:
    """Client of ``service``'s master; each new connection asks the sentinels where it is."""
    sentinel_kwargs = {
        "socket_timeout": kwargs["socket_timeout"],
        "socket_connect_timeout": kwargs["socket_connect_timeout"],
        "retry": Retry(NoBackoff(), 0),  # discovery already tries every sentinel
    }
    return Sentinel(hosts, sentinel_kwargs=sentinel_kwargs).master_for(service, db=db, **kwargs)


def _parse_url(url: str) -> _Url:
    """Parse a store URL.

    :raise ConfigError: with field ``store``.
    """
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in _SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(s + '://' for s in _SCHEMES)}")
        userinfo, _, hostlist = parts.netloc.rpartition("@")
        username, password = _credentials(userinfo)
        hosts = [_host(h, _DEFAULT_PORTS.get(scheme, 6379)) for h in hostlist.split(",")]
        if len(hosts) > 1 and scheme in ("redis", "rediss"):
            raise ValueError(f"{scheme}:// takes one host; use redis+sentinel:// or redis+cluster://")
        service, db = _path(scheme, parts.path)
        options = _options(scheme, parts.query)
    except ValueError as exc:
        raise ConfigError("store", f"{_redacted(url)}: {exc}") from None
    return _Url(scheme, hosts, username, password, service, db, options)


def _redacted(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    return re.sub(r"(//[^/@]*?:)[^/@]*@", r"\1***@", url)


def _credentials(userinfo: str) -> tuple[str | None, str | None]:
    if not userinfo:
        return None, None
    user, colon, password = userinfo.partition(":")
    return unquote(user) or None, unquote(password) if colon else None


def _host(text: str, default_port: int) -> tuple[str, int]:
    """``host[:port]`` or ``[v6]:port`` to ``(host, port)``."""
    match = re.fullmatch(r"(\[[^\]]+\]|[^:\[\]]+)(?::(\d+))?", text)
    if match is None:
        raise ValueError(f"bad host {text!r}, expected host:port")
    port = int(match[2]) if match[2] else default_port
    if not 0 < port < 65536:
        raise ValueError(f"bad port {port}")
    return match[1].strip("[]"), port


def _path(scheme: str, path: str) -> tuple[str | None, int]:
    """``(sentinel service name, db)`` from the URL path."""
    segments = [unquote(s) for s in path.strip("/").split("/")] if path.strip("/") else []
    service = None
    if scheme == "redis+sentinel":
        if not segments or not segments[0]:
            raise ValueError("redis+sentinel:// needs the master name: .../<master>/<db>")
        service, segments = segments[0], segments[1:]
    if len(segments) > 1 or (segments and not segments[0].isdigit()):
        raise ValueError(f"bad path {path!r}, expected /<db number>")
    db = int(segments[0]) if segments else 0
    if db and scheme == "redis+cluster":
        raise ValueError("Redis Cluster has only database 0")
    return service, db


def _options(scheme: str, query: str) -> dict[str, Any]:
    accepted = _OPTIONS | (_SSL_OPTIONS if scheme == "rediss" else {})
    options = {}
    for name, values in parse_qs(query, keep_blank_values=True, strict_parsing=bool(query)).items():
        if name not in accepted:
            raise ValueError(f"unknown option {name!r}; accepted: {', '.join(accepted)}")
        if len(values) > 1:
            raise ValueError(f"option {name!r} given twice")
        try:
            options[name] = accepted[name](values[0])
        except ValueError as exc:
            raise ValueError(f"option {name}={values[0]!r}: {exc}") from None
    return options
