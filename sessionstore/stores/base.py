"""The store contract: what every session store implements.

A store deals in bytes under string keys. It knows nothing about HTTP,
sessions, cookies or serialization: the manager hands it an opaque payload,
a time-to-live and the version it expects to overwrite, and gets back the
payload and an opaque version token.

The contract is deliberately small (after Django's ``load / save / exists /
delete`` and Go's ``scs.Store``):

``load(key)``
    The record under ``key`` or ``None``. Does not change the expiry.
``load_and_touch(key, ttl)``
    Like ``load`` but also slides the expiry to ``ttl`` seconds from now, in
    one round trip where the backend allows. A read-only request costs this
    one call.
``save(key, data, ttl, expect=ANY)``
    Write ``data`` with ``ttl``. ``expect`` makes the write conditional:
    ``ANY`` writes unconditionally, ``None`` only if the key does not exist
    (creation), any other value only if the stored version is that one. The
    data and its expiry are set atomically: no key ever exists without its TTL.
    Returns a :class:`SaveResult`; on a failed condition ``current`` carries
    what the store holds now, so the caller can merge without another read.
``touch(key, ttl)``
    Slide the expiry without rewriting. ``False`` if the key is gone.
``delete(key, expect=ANY)``
    Remove the key (conditionally on its version if ``expect`` is given).
``close()``
    Release connections.

``ttl`` is whole seconds, or ``None`` for a record that never expires.

Backends raise :class:`~sessionstore.errors.StoreUnavailable` when the server
cannot be reached; any other failure is a bug. Extra powers (locks, an index
for single sign-out, pub/sub) are separate optional protocols, not methods
every store must grow.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, Final, Hashable, Protocol, Sequence, runtime_checkable

__all__ = [
    "ANY",
    "Record",
    "SaveResult",
    "Store",
    "count_ops",
    "OpCounter",
    "LockingStore",
    "IndexStore",
    "PushFeed",
    "PollFeed",
    "FeedBatch",
    "Subscription",
    "INDEX_SUFFIX",
]


class _Any:
    """Sentinel for an unconditional write."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "ANY"


#: ``expect=ANY``: write whatever the store holds.
ANY: Final[Any] = _Any()


@dataclass(frozen=True, slots=True)
class Record:
    """A payload and the version token the store gave it.

    ``version`` is opaque to callers: compare it only by handing it back as
    ``expect``. ``relocated`` is set by stores that found the record on a
    fallback node (the node that should hold it failed).
    """

    data: bytes
    version: Hashable
    relocated: bool = False


@dataclass(frozen=True, slots=True)
class SaveResult:
    """Outcome of :meth:`Store.save`.

    ``ok`` with the new ``version``; or not ``ok`` with ``current`` set to
    what the store holds now (``None`` when the key is absent).
    """

    ok: bool
    version: Hashable | None = None
    current: Record | None = None


@runtime_checkable
class Store(Protocol):
    """The contract described in the module docstring."""

    def load(self, key: str) -> Record | None: ...

    def load_and_touch(self, key: str, ttl: int | None) -> Record | None: ...

    def save(
        self, key: str, data: bytes, ttl: int | None, expect: Any = ANY
    ) -> SaveResult: ...

    def touch(self, key: str, ttl: int | None) -> bool: ...

    def delete(self, key: str, expect: Any = ANY) -> bool: ...

    def close(self) -> None: ...


class OpCounter:
    """Counts the commands a request sends to its store (for debug records).

    Stores call :func:`count_ops` with the number of commands each call sent
    to the server (a pipelined batch counts each command; a script call
    counts once). The manager opens a counter per request.
    """

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


_current: ContextVar[OpCounter | None] = ContextVar("sessionstore_ops", default=None)


def count_ops(n: int = 1) -> None:
    """Add ``n`` commands to the current request's counter, if any."""
    counter = _current.get()
    if counter is not None:
        counter.n += n


def open_counter() -> tuple[OpCounter, Any]:
    """Start counting for the current context; returns (counter, reset token)."""
    counter = OpCounter()
    return counter, _current.set(counter)


def enter_counter(counter: OpCounter) -> Any:
    """Count into ``counter`` again (a response body iterated later); returns a reset token."""
    return _current.set(counter)


def close_counter(token: Any) -> None:
    _current.reset(token)


# -- optional protocols ------------------------------------------------------


def companion_key(key: str, suffix: str) -> str:
    """Key of a record that belongs to session ``key`` (its lock, tombstone, index).

    Session keys are ``<prefix>{<id>}``: the braces are a Redis Cluster hash
    tag, so every companion ``<prefix>{<id>}:<suffix>`` lands in the same slot
    and can share a script or pipeline with the session key.
    """
    return f"{key}:{suffix}"


def is_companion(key: str) -> bool:
    """Whether ``key`` is a companion record (``<prefix>{<id>}:<suffix>``), not a session."""
    return "}:" in key


class _NoLoad:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NO_LOAD"


#: ``lock(..., load_ttl=NO_LOAD)``: take the lock without loading the session.
NO_LOAD: Final[Any] = _NoLoad()


@runtime_checkable
class LockingStore(Protocol):
    """A store that can hold a per-session lock (``locking`` setting).

    The lock lives under ``companion_key(key, "lock")`` and holds ``token``
    (the owner: printable ASCII without spaces, 1-255 characters). It is taken
    atomically only if free, expires by itself after ``expiry`` seconds, and
    only its owner may renew or release it. A store that reads the holder of
    a lock it could not take (Redis) raises :class:`~sessionstore.errors.CorruptPayload`
    (``lock``) when it holds anything but such a token.
    """

    def lock(
        self, key: str, token: str, expiry: float, load_ttl: Any = NO_LOAD
    ) -> tuple[bool, Record | None]:
        """Try once to take the lock of session ``key``.

        Returns ``(acquired, record)``. Unless ``load_ttl`` is ``NO_LOAD``, the
        same round trip also does ``load_and_touch(key, load_ttl)`` and
        ``record`` is its result (``None`` when not acquired).
        """
        ...

    def renew(self, key: str, token: str, expiry: float) -> bool:
        """Extend the lock if ``token`` still owns it."""
        ...

    def unlock(self, key: str, token: str) -> bool:
        """Release the lock if ``token`` owns it; never someone else's."""
        ...

    def save_and_unlock(
        self, key: str, data: bytes, ttl: int | None, expect: Any, token: str
    ) -> SaveResult:
        """``save`` then ``unlock`` in one round trip where the backend allows."""
        ...


# -- index (single sign-out) ---------------------------------------------------

#: Suffix of a session's reverse index record: ``companion_key(key, INDEX_SUFFIX)``.
INDEX_SUFFIX = "ix"


@runtime_checkable
class IndexStore(Protocol):
    """A store that can find sessions by an external id (``session.index(name, value)``).

    The manager hashes each ``(name, value)`` into an *index key*
    (``<prefix>ix:{<sha256 hex>}``: printable ASCII, safe as a memcached key,
    and its own Redis Cluster hash tag). An *entry* says "session ``key`` is
    indexed under index key ``ix``". Stores keep, per index key, the session
    keys recorded under it (the forward record) and, per session, the index
    keys it is recorded under (the reverse record,
    ``companion_key(key, INDEX_SUFFIX)``), so a session's entries can be
    dropped knowing only its key. Nothing ever scans the keyspace.

    Entries age out on their own: an entry added with ``ttl`` lives at least
    ``ttl`` seconds from the call (``None``: until dropped). Adding an entry
    that exists refreshes it (its life never gets shorter).
    """

    def index_add(self, key: str, index_keys: Sequence[str], ttl: int | None) -> None:
        """Record session ``key`` under each of ``index_keys`` (and them in its reverse record)."""
        ...

    def index_find(self, index_key: str) -> list[str]:
        """Session keys recorded under ``index_key`` whose entry has not aged out
        and whose session record exists now (expired or deleted sessions are left out)."""
        ...

    def index_drop(self, key: str) -> int:
        """Remove every entry of session ``key`` and its reverse record; how many index keys it had."""
        ...


# -- invalidation feed (sticky mode) ------------------------------------------------


class Subscription(Protocol):
    """A live subscription to a :class:`PushFeed` channel."""

    def close(self) -> None:
        """Stop delivering; release the connection."""
        ...


@runtime_checkable
class PushFeed(Protocol):
    """A store whose server pushes messages to subscribers (Redis pub/sub, in-process memory).

    ``feed_subscribe`` returns once the subscription is active: every message
    published on ``channel`` afterwards is handed to ``deliver`` (from a
    thread of the store's, or the publisher's thread for the in-process
    store). When the store had to reconnect and messages may have been
    missed meanwhile, it calls ``lost()`` once the subscription is active
    again. Raises :class:`~sessionstore.errors.StoreUnavailable` if the
    first subscription cannot be made.
    """

    def feed_publish(self, channel: str, message: bytes) -> None: ...

    def feed_subscribe(
        self, channel: str, deliver: Callable[[bytes], None], lost: Callable[[], None]
    ) -> Subscription: ...


@dataclass(frozen=True, slots=True)
class FeedBatch:
    """What :meth:`PollFeed.feed_read` found: messages, where to read next, and whether
    messages may have been lost (the log was reset, or a record vanished)."""

    messages: list[bytes]
    cursor: Any
    lost: bool = False


@runtime_checkable
class PollFeed(Protocol):
    """A store without push: an append-only log of messages read by sequence number.

    ``feed_position`` is the cursor at the end of the log now (reading from it
    returns only later messages); ``feed_read`` returns what was appended
    after ``cursor``. One ``feed_read`` while nothing was published costs one
    store command: that is the whole polling cost.
    """

    def feed_publish(self, channel: str, message: bytes) -> None: ...

    def feed_position(self, channel: str) -> Any: ...

    def feed_read(self, channel: str, cursor: Any) -> FeedBatch: ...
