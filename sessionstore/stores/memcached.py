"""Memcached store: a consistent-hash ring of nodes, each session on two of them.

URL: ``memcached://h1:p1,h2:p2?failover=h3:p3&timeout=0.5&connect_timeout=0.5&retry_after=5&pool_size=32&rejoin_after=10&suspect_poll=1``.

Placement
    The primary nodes form a ring of 160 md5 points per node (ketama style,
    keyed by ``host:port``, so every process that lists the same servers, in
    any order, places a key identically). A key's *preference list* is the
    ring walked clockwise from the md5 of the key, each node once. Its *live
    list* drops the nodes this process marked dead; when no primary node is
    live it is the failover ring instead (``?failover=`` nodes are used only
    then). The first live node holds the *primary copy*, the second the
    *backup copy* (memcached-session-manager's non-sticky layout). A node is
    marked dead on a connection error or timeout and skipped for
    ``retry_after`` seconds of the injected clock; then it is tried again.
    No live node for a key: :class:`~sessionstore.errors.StoreUnavailable`.

Copies and versions
    Each copy carries its role in the memcached client flags (1 primary, 2
    backup). The version token is :class:`Version` ``(node, cas)``: the node
    the record was read from and that copy's CAS unique. Memcached 1.6.18 has
    no way to give two nodes the same CAS (meta ``E`` arrived later), so the
    token names the copy it belongs to and a save checks it on that copy
    (while that node is suspect the token also carries the next node's CAS,
    ``next_cas``, which is checked first: see "Partitions").

    ``load`` is ``gets`` and ``load_and_touch`` is ``gats`` on the primary
    node: one command. On a miss there the backup node is asked too (an
    unknown or expired id costs 2). A record is ``relocated`` when it came
    from the backup node, or from a backup copy that now sits first in the
    live list (its primary died and nobody saved it since).

    ``save`` with ``ANY`` / ``None`` / a version of the primary copy is a
    meta set (``ms``: set / add / compare-and-swap, returning the new CAS) on
    the primary, then a plain ``ms`` of the backup copy: 2 commands, so a
    modifying request costs ``gats`` + 2 = 3. A failed condition returns
    ``current`` read with ``load`` (extra commands only on that path).

    A version of a *backup* copy (a relocated record) is saved in the other
    order: compare-and-swap on the backup copy (the check on what was read),
    then ``add`` on the primary (the primary held nothing when the record was
    read; every other writer writes the primary first, so a failed ``add``
    means someone saved meanwhile, and the backup copy just written is taken
    back with a CAS-conditional delete; while the primary is suspect its copy
    is set instead, see "Partitions"). A version naming a node that is no
    longer first or second in the live list (the ring changed between load
    and save) fails with ``current``; the caller merges as for any conflict.

Node restarts, stale copies, known limits
    * A node that restarted while this process used it rejoins only when its
      uptime reaches ``rejoin_after`` (10 s): every process reads the same
      uptime, so they all put it back in their rings at the same moment and
      never disagree for long on which node holds a key (a disagreement lets
      two processes overwrite each other's writes through different copies).
    * A primary that restarted empty: its keys are read from the backup node
      (``relocated``) and the next save writes both copies again.
    * A dead primary: the backup node is first in the live list, so reads go
      there directly and the next save there is a plain CAS; the record stays
      ``relocated`` until that save rewrites it as a primary copy.
    * The backup is written after the primary and is not atomic with it: if
      the process dies between the two, or the backup node dropped the key,
      the backup is one version behind. Losing the primary then loses that
      last write; the version check still refuses stale overwrites.
    * ``load_and_touch`` slides only the primary copy's expiry (the read-only
      cost target is one command); ``save`` and ``touch`` refresh both. A
      session that is only read for longer than its TTL has no backup left.
    * A node that was unreachable but kept its data (a partition, not a
      restart) holds older copies when it answers again: see "Partitions".
    * ``delete`` removes the key from the first three live nodes (primary,
      backup, and where the backup lived before a single failover), so an
      invalidated session does not come back from an old backup copy when a
      node fails later. A conditional delete checks the version on its copy
      first; in the moment between that and the other deletes a reader sees
      the session as relocated.

Partitions: suspect nodes
    A ring node that any client saw fail (a timeout or connection error, or
    a restart seen by ``rejoin_after``) is *suspect* when it answers again:
    while it was out, writes went around it to the next node, and it may
    answer with copies older than theirs. The client that marks it dead
    merges ``{node: window end}`` into the record of suspect nodes that each
    ring node keeps (``sessionstore:ring:suspects``, JSON, read-modify-write
    with CAS), on every ring node but that one. Every process reads the
    record of the first two live ring nodes (by name: two, as a node's own
    record lacks its entry) at the start of an operation once
    ``suspect_poll`` seconds (1) have passed since its last poll. So a
    process learns of a suspicion it did not see itself within about a
    second, whether or not it talked to the node meanwhile.

    While the first live node of a key is suspect, the next node's copy
    decides: a read asks both (the suspect node's ``gets``/``gats``, then
    ``mg`` on the next node), and the next node's copy wins when it carries
    the primary flag and differs (it was written while the first node was
    skipped, or by a save in the window); the winner is written over the
    older copy (``ms`` CAS-checked on the copy read: the repair), and the
    record's version carries both CAS values. A save in the window goes to the
    next node first, checked there (``ms`` with ``next_cas``, or ``add``; a
    version of that copy itself, read while the node was skipped or missed
    the key, with its own CAS), then sets the suspect node's copy, both with
    the primary flag; if only the first write lands, the save returns the
    version of that copy. Writers
    that still skip the node (their retry is not due yet) compare-and-swap
    the same copy, so every acknowledged write of the key in the window was
    checked on one copy, whoever wrote it. A version read before the process
    knew of the suspicion is refused (``current`` is read compared). ``touch``
    slides both copies.

    A delete that goes around a dead node cannot remove the copy there, so
    it leaves a *gone copy* (client flags 3, no data) in place of the first
    live node's copy (one ``mg`` more, for how long the copy had left): reads
    take it for no record, and it wins over a suspect node's differing copy,
    which the compared read then deletes. It lives, and keeps the node
    suspect, as long as the copies left behind may: the longest TTL the
    process has used (with tombstones, the idle timeout + 1 day), or that
    copy's own if longer, + 60 s. A create that finds one (its ``add`` fails
    and nothing can be read) takes its place with a CAS.

    The window lasts as long as a copy it must outdo can live: at first
    ``retry_after`` + fence + 60 s, and every write that goes around the
    node, and every write or touch of its copies in the window, extends it
    to that TTL + 60 s (published again only once half a TTL more is
    needed): with tombstones, which outlive sessions by a day, windows last
    about a day. The *fence*: a process writes around a dead node, or through the
    next node's copy, only ``fence`` = 2 x ``suspect_poll`` +
    ``connect_timeout`` + ``timeout`` seconds (3 s) after it learned that the
    node is suspect (it waits, once per suspicion). By then every process
    polling the ring compares: no copy goes stale while someone still reads
    it alone, and no save still writes the suspect node's copy first. So a
    partition of any length is covered, not only long ones; the price is a
    wait of up to 3 s for the first writes of the node's sessions.

    Limits: a process stalled for longer than the fence minus a poll can
    still read one stale copy; the record may be lost with its node or
    evicted (the other nodes still hold it); a second failure within a window
    (the suspect node holding a dead node's backup copies; the failover ring
    in use) is not compared; sessions without TTL keep their node suspect for
    ever (2 commands per read of its keys); ``touch`` counts a gone copy as
    a record.

Costs (commands)
    ============================  =====================  =================================
    operation                     normally               first live node suspect
    ============================  =====================  =================================
    ``load``, ``load_and_touch``  1 (2 on a miss)        2; 3 when its copy is repaired
    ``save``                      2 (``copies=1``: 1)    2 (``copies=1`` too)
    ``save`` of a relocated copy  2 (CAS, ``add``)       2
    ``touch``                     2 (``copies=1``: 1)    2
    ============================  =====================  =================================

    Besides: the poll, 2 ``get`` per process once per ``suspect_poll``
    seconds while the store is in use; a process that sees a node fail
    merges its entry into each other ring node's record (``gets`` + ``ms``:
    2 per node), unless it knew of the suspicion already, and so does one
    that extends a window (about once per half TTL); the first write of a
    suspect node's sessions in a process waits out the fence (up to 3 s).

Locks
    ``companion_key(key, "lock")`` lives on the session's primary node only,
    holding the owner token: ``lock`` is an ``add`` with the expiry rounded
    up to whole seconds (then ``gats`` of the session when asked: 2
    commands); ``renew`` and ``unlock`` read the lock with ``gets``, compare
    the token and then ``ms``/``md`` with that CAS, so they never touch a
    lock someone else took meanwhile. If the primary node dies the lock is
    lost and another request may take one on the next node; the version check
    still protects the data.

Index (single sign-out, :class:`~.base.IndexStore`)
    CAS-checked records, written with the same conditional ``save`` as
    sessions (so each has a backup copy on the next node): a forward record
    per index key (``<prefix>ix:{<sha256 hex>}``), a JSON object ``{session
    key: expiry}``, and a reverse record per session (``<key>:ix``) holding
    its index keys and its own expiry. A change is written conditionally:
    ``index_add`` first tries each record as a create (a login's records
    are new, so no read is needed); a create that fails returns the record
    there, which is changed and written back with its CAS, retried with the
    record a failed write returns. Entries and records carry absolute
    expiries (the injected clock): aged-out entries are pruned on every
    write and a record's TTL is that of its longest-lived entry.
    ``index_find`` reads the forward record and asks each session's nodes
    whether the session exists (meta ``mg`` without flags: no value is
    sent back). Costs: a new record 2 commands (the ``add`` on the primary
    node and the backup copy), an existing one 4 (failed ``add``, read, CAS
    write, copy): a login recording one pair 4, a refresh 4 per record;
    ``index_find`` 1-2 plus 1-2 per entry; ``index_drop`` 1 plus 3 per entry
    plus the reverse record's delete (up to 3).

Invalidation feed (:class:`~.base.PollFeed`)
    An ``incr`` sequence ``<channel>:seq`` on its ring node (created with
    ``add``, TTL 30 days, starting at its creation time in ms times 10^6, so
    a sequence created again is told apart from the one it replaces) and one
    record per message, ``<channel>:<n>`` (TTL 10 minutes, one copy: a
    record lost with its node is reported lost by the readers). Publishing:
    ``incr`` then the record's ``set`` (2 commands). Polling: one ``get`` of
    the sequence; only when it moved are the new records read. A record not
    there yet (its publisher is between the ``incr`` and the write) is
    waited for up to 2 s, then reported lost; so is a sequence that went
    backwards, vanished or was created again (its node restarted, the key
    expired or was evicted).

Connections
    One bounded pool of pymemcache clients per node (``pool_size``), with
    ``TCP_NODELAY`` (Nagle otherwise stalls a request ~40 ms), timeouts, and
    one transparent retry when a pooled connection turns out to be closed
    (the node restarted behind it). Absolute expiry (TTL over 30 days) uses
    the wall clock, which is the server's; the injected clock only times
    ``retry_after``.
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import json
import logging
import math
import re
import threading
import time
from dataclasses import dataclass
from itertools import islice
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence, TypeVar
from urllib.parse import parse_qsl, urlsplit

from pymemcache.client.base import Client, _readline, _readvalue
from pymemcache.exceptions import MemcacheError, MemcacheUnexpectedCloseError, MemcacheUnknownError

from ..decoding import epoch, field, json_document
from ..errors import ConfigError, CorruptPayload, StoreError, StoreUnavailable
from .base import ANY, INDEX_SUFFIX, NO_LOAD, FeedBatch, Record, SaveResult, companion_key, count_ops

__all__ = ["MemcachedStore", "Version"]

log = logging.getLogger("sessionstore.memcached")

T = TypeVar("T")

#: Client flags marking which copy an item is; a gone copy marks a deletion that went around a
#: dead node, so that the older copy left there loses to it when the node answers again.
_PRIMARY = 1
_BACKUP = 2
_GONE = 3
#: ``expect`` of a create that may take a gone copy's place: ``save`` retries with it a create
#: that failed where nothing can be read (a create finds nothing else to do in the common case).
_OVER_GONE = object()
#: Memcached reads larger expiry values as an absolute unix time.
_MAX_RELATIVE_TTL = 30 * 24 * 3600
_KEY = re.compile(r"[\x21-\x7e]{1,250}")
_POINTS_PER_NODE = 160
#: Live nodes a key needs at most: primary, backup, the pre-failover backup.
_SPREAD = 3
_DEFAULT_PORT = 11211
#: A pooled connection the server closed behind our back.
_STALE = (MemcacheUnexpectedCloseError, ConnectionResetError, BrokenPipeError)
#: What a damaged index record is reported as (see sessionstore.decoding.PARTS).
_RECORD = "index record"
#: Read-modify-write rounds of an index record before giving up.
_CAS_ROUNDS = 64
#: Lifetime of the feed sequence and of each feed record.
_FEED_SEQ_TTL = 30 * 24 * 3600
_FEED_RECORD_TTL = 600
#: A feed sequence starts at <creation time in ms> * _FEED_EPOCH: a sequence created again
#: (its node restarted, the key expired or was evicted) is told apart by its epoch.
_FEED_EPOCH = 10**6
#: How long a feed record announced by the sequence may be missing before it counts as lost.
_FEED_RECORD_WAIT = 2.0
#: At most this many feed records are read per poll (older ones count as lost).
_FEED_MAX_BATCH = 1000
#: The ring's record of suspect nodes, ``{node name: suspect until or null}``, on every ring node.
_SUSPECTS_KEY = b"sessionstore:ring:suspects"
#: A node seen failing is suspect at least this long (and then as long as writes go around it).
_SUSPECT_AT_LEAST = 60.0
#: A suspect window outlasts the copies it covers by this much (clocks of hosts differ a little).
_COVER_MARGIN = 60.0


class Version(NamedTuple):
    """Version token: the node a copy was read from and that copy's CAS unique.

    ``next_cas``: when that node was suspect at the read, the CAS of the copy
    on the next node (0: it had none), which a save checks first; else None.
    """

    node: str
    cas: int
    next_cas: int | None = None


@dataclass(frozen=True, slots=True)
class _Item:
    data: bytes
    flags: int
    cas: int
    #: seconds left (-1: never expires), when read with a meta get; else None
    ttl: int | None = None


def _wire_key(key: Any) -> bytes:
    """``key`` as protocol bytes, or ``ValueError`` if memcached cannot hold it."""
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise ValueError(
            "memcached key must be a str of 1-250 printable ASCII characters "
            f"without whitespace or control characters, got {key!r:.80}"
        )
    return key.encode("ascii")


def _exptime(ttl: float | None) -> int:
    """Memcached exptime for ``ttl`` seconds: 0 never expires, -1 already expired."""
    if ttl is None:
        return 0
    seconds = math.ceil(ttl)
    if seconds <= 0:
        return -1
    if seconds > _MAX_RELATIVE_TTL:
        return int(time.time()) + seconds
    return seconds


def _lock_exptime(expiry: float) -> int:
    """Lock expiry in whole seconds, so that the lock lives at least ``expiry`` seconds.

    memcached expires items on a whole-second clock: an item given N seconds
    lives between N-1 and N, so one more second is added.
    """
    return _exptime(math.ceil(expiry) + 1)


def _hash(data: bytes) -> int:
    return int.from_bytes(hashlib.md5(data, usedforsecurity=False).digest()[:4], "big")


# -- wire --------------------------------------------------------------------


class _RawSerde:
    """Values stay bytes; reads hand back ``(bytes, flags)``."""

    def serialize(self, key: bytes, value: bytes) -> tuple[bytes, int]:
        return value, 0

    def deserialize(self, key: bytes, value: bytes, flags: int) -> tuple[bytes, int]:
        return value, flags


class _Wire(Client):
    """A pymemcache client with the commands pymemcache 4.0 lacks (gats, meta)."""

    def fetch(self, key: bytes, exptime: int | None) -> _Item | None:
        """``gets`` (``exptime`` None) or ``gats exptime``."""
        name = b"gets" if exptime is None else b"gats %d" % exptime
        found = self._fetch_cmd(name, [key], True)
        if key not in found:
            return None
        (data, flags), cas = found[key]
        return _Item(data, flags, int(cas))

    def meta_fetch(self, key: bytes, exptime: int | None) -> _Item | None:
        """``mg key v f c t`` (``T<exptime>``: touched too): the item with the seconds it has left."""
        command = b"mg %s v f c t" % key + (b"" if exptime is None else b" T%d" % exptime)
        if self.sock is None:
            self._connect()
        try:
            self.sock.sendall(command + b"\r\n")
            buf, line = _readline(self.sock, b"")
            if line == b"EN":
                return None
            self._raise_errors(line, b"mg")
            head = line.split()
            if head[0] != b"VA":
                raise MemcacheUnknownError(line[:32])
            _, data = _readvalue(self.sock, buf, int(head[1]))
        except Exception:
            self.close()  # never leave the connection mid-response
            raise
        fields = {part[:1]: int(part[1:]) for part in head[2:]}
        return _Item(data, fields[b"f"], fields[b"c"], fields[b"t"])

    def meta_head(self, key: bytes) -> _Item | None:
        """``mg key f c t``: the item's flags, CAS and seconds left, without its value."""
        line = self.raw_command(b"mg %s f c t" % key)
        if line == b"EN":
            return None
        if not line.startswith(b"HD"):
            raise MemcacheUnknownError(line[:32])
        fields = {part[:1]: int(part[1:]) for part in line.split()[1:]}
        return _Item(b"", fields[b"f"], fields[b"c"], fields[b"t"])

    def meta_set(
        self, key: bytes, data: bytes, exptime: int, flags: int, mode: bytes, cas: int | None
    ) -> int | None:
        """``ms`` in ``mode`` (S set, E add), compared to ``cas`` if given.

        Returns the new CAS, or None when not stored (NS, EX, NF).
        """
        options = b"T%d F%d M%s c" % (exptime, flags, mode)
        if cas is not None:
            options += b" C%d" % cas
        line = self.raw_command(b"ms %s %d %s\r\n%s" % (key, len(data), options, data))
        status, _, rest = line.partition(b" ")
        return int(rest[1:]) if status == b"HD" else None

    def meta_delete(self, key: bytes, cas: int) -> bool:
        """``md key C<cas>``: delete only if the item still has that CAS."""
        return self.raw_command(b"md %s C%d" % (key, cas)) == b"HD"


class _NodeDown(Exception):
    """``node`` cannot be used: unreachable, or (``for_seconds``) back too recently."""

    def __init__(self, node: "_Node", for_seconds: float | None = None) -> None:
        super().__init__(node.name)
        self.node = node
        self.for_seconds = for_seconds


@dataclass(frozen=True)
class _Options:
    timeout: float = 0.5
    connect_timeout: float = 0.5
    retry_after: float = 5.0
    pool_size: int = 32
    rejoin_after: float = 10.0
    suspect_poll: float = 1.0


class _Node:
    """One memcached server: a bounded connection pool and a dead-until mark."""

    def __init__(self, name: str, address: tuple[str, int], options: _Options) -> None:
        self.name = name
        self.dead_until = 0.0
        self._known_since = time.monotonic()
        self._address = address
        self._options = options
        self._idle: list[_Wire] = []
        self._guard = threading.Lock()
        self._slots = threading.BoundedSemaphore(options.pool_size)

    def alive(self, now: float) -> bool:
        return now >= self.dead_until

    def call(self, op: Callable[[_Wire], T]) -> T:
        """Run ``op`` on a pooled connection; ``_NodeDown`` if the server is unreachable."""
        wait = self._options.connect_timeout + self._options.timeout
        if not self._slots.acquire(timeout=wait):
            raise StoreUnavailable(f"memcached {self.name}: no free connection within {wait}s")
        try:
            client = self._checkout()
            try:
                return self._attempt(client, op)
            except BaseException:
                client.close()  # never hand back a connection left mid-response
                raise
            finally:
                with self._guard:
                    self._idle.append(client)
        finally:
            self._slots.release()

    def _attempt(self, client: _Wire, op: Callable[[_Wire], T]) -> T:
        retry_stale = client.sock is not None
        while True:
            try:
                if client.sock is None:
                    self._check_uptime(client)
                result = op(client)
            except _STALE as exc:
                client.close()
                if not retry_stale:
                    raise _NodeDown(self) from exc
                retry_stale = False
                continue
            except OSError as exc:
                raise _NodeDown(self) from exc
            except MemcacheError as exc:  # its text can quote a key (a session id) or the server's reply
                raise StoreError(f"memcached {self.name}: {type(exc).__name__}") from None
            count_ops()
            return result

    def _check_uptime(self, client: _Wire) -> None:
        """On every new connection: a server that restarted while this process was using
        it rejoins only ``rejoin_after`` seconds after its start.

        A node that comes back empty must rejoin every app process's ring at the
        same moment, or two processes disagreeing on which node holds a key can
        overwrite each other's acknowledged writes. Its uptime is the one clock
        they all read alike. A server older than this process's knowledge of it
        (a fresh deployment, a process started later) is used at once.
        """
        uptime = float(client.stats()[b"uptime"])
        restarted_meanwhile = uptime < time.monotonic() - self._known_since
        if restarted_meanwhile and uptime < self._options.rejoin_after:
            client.close()
            raise _NodeDown(self, self._options.rejoin_after - uptime)

    def _checkout(self) -> _Wire:
        with self._guard:
            if self._idle:
                return self._idle.pop()
        return _Wire(
            self._address,
            serde=_RawSerde(),
            connect_timeout=self._options.connect_timeout,
            timeout=self._options.timeout,
            no_delay=True,
            default_noreply=False,
        )

    def close(self) -> None:
        """Close the idle connections (ones in use close when they fail)."""
        with self._guard:
            idle, self._idle = self._idle, []
        for client in idle:
            client.close()


class _Ring:
    """Consistent-hash ring of nodes; ``walk`` yields each node once, clockwise."""

    def __init__(self, nodes: Iterable[_Node]) -> None:
        points = sorted(
            ((_hash(b"%s-%d" % (node.name.encode(), i)), node) for node in nodes for i in range(_POINTS_PER_NODE)),
            key=lambda point: (point[0], point[1].name),
        )
        self._hashes = [h for h, _ in points]
        self._owners = [node for _, node in points]
        self._size = len({node.name for node in self._owners})

    def walk(self, key: bytes) -> Iterator[_Node]:
        start = bisect.bisect(self._hashes, _hash(key))
        seen: set[str] = set()
        count = len(self._owners)
        for i in range(count):
            node = self._owners[(start + i) % count]
            if node.name not in seen:
                seen.add(node.name)
                yield node
                if len(seen) == self._size:
                    return


class _Suspects:
    """The ring nodes some client saw fail, as this process knows them (see "Partitions").

    A node is suspect until its window (an absolute time of the injected clock,
    None: for ever) runs out. ``since`` is when this process learned of it, which
    times the fence. ``due`` says when the ring's records must be read again.
    Shared by a store's views (``single_copy``), with the longest lifetime the
    process gave a record (``note``, ``longest``: how long a gone copy lives).
    """

    def __init__(self, poll: float, fence: float, clock: Callable[[], float]) -> None:
        self.poll, self.fence = poll, fence
        self.polling = threading.Lock()
        self._clock = clock
        self._until: dict[str, float | None] = {}
        self._since: dict[str, float] = {}
        self._polled = -math.inf
        self._guard = threading.Lock()
        self._longest: float | None = 0.0
        self._noted = False

    def due(self) -> bool:
        return time.monotonic() - self._polled >= self.poll

    def polled(self, started: float) -> None:
        """The records were read by a poll that started at ``started`` (monotonic)."""
        self._polled = started

    def holds(self, name: str) -> bool:
        """Whether ``name`` is suspect now."""
        return bool(self._until) and self._window(name, self._clock()) is not False

    def covers(self, name: str, until: float | None) -> bool:
        """Whether ``name`` is known suspect until ``until`` (None: for ever) at least."""
        window = self._window(name, self._clock())
        return window is None or (window is not False and until is not None and window >= until)

    def learn(self, entries: dict[str, float | None]) -> None:
        """Merge ``{name: until}`` into what this process knows (the later window wins)."""
        now = self._clock()
        with self._guard:
            for name, until in entries.items():
                if until is not None and until <= now:
                    continue
                window = self._window(name, now)
                if window is False:
                    self._since[name] = time.monotonic()
                    self._until[name] = until
                else:
                    self._until[name] = _later(window, until)

    def note(self, exptime: int) -> None:
        """A record was written or touched with ``exptime``: remembered for :meth:`longest`."""
        lifetime = _lifetime(exptime)
        if not self._noted:
            self._longest, self._noted = lifetime, True
        elif self._longest is not None:
            self._longest = None if lifetime is None else max(self._longest, lifetime)

    def longest(self, ttl: int | None) -> float | None:
        """The longest lifetime noted, or ``ttl`` seconds (-1: for ever) if longer; None: for ever.
        Nothing noted yet: the longest relative TTL memcached takes (30 days)."""
        known = self._longest if self._noted else float(_MAX_RELATIVE_TTL)
        if ttl is not None and ttl < 0 or known is None:
            return None
        return max(known, float(ttl or 0))

    def fence_left(self, name: str) -> float:
        """Seconds until every process polling the ring has surely learned that ``name`` is suspect."""
        return self._since.get(name, -math.inf) + self.fence - time.monotonic()

    def names(self) -> list[str]:
        return sorted(name for name in list(self._until) if self.holds(name))

    def _window(self, name: str, now: float) -> float | None | bool:
        """``name``'s window end (None: for ever), or False if it is not suspect at ``now``."""
        if name not in self._until:
            return False
        until = self._until[name]
        return until if until is None or until > now else False


# -- URL ---------------------------------------------------------------------


_HOST = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[^\s:\[\]@/,?#]+))(?::(?P<port>\d{1,5}))?")


def _parse_hosts(text: str) -> list[tuple[str, int]]:
    """``h1:p1,h2,[::1]:p3`` as (host, port) pairs (port 11211 by default)."""
    hosts = []
    for part in text.split(","):
        match = _HOST.fullmatch(part.strip())
        port = int(match["port"] or _DEFAULT_PORT) if match else 0
        if not 0 < port < 65536:
            raise ConfigError("store", f"bad memcached node {part!r}: expected host:port")
        hosts.append((match["v6"] or match["name"], port))
    return hosts


_OPTION_PARSERS: dict[str, tuple[Callable[[str], Any], Callable[[Any], bool], str]] = {
    "timeout": (float, lambda v: v > 0, "a number > 0"),
    "connect_timeout": (float, lambda v: v > 0, "a number > 0"),
    "retry_after": (float, lambda v: v >= 0, "a number >= 0"),
    "pool_size": (int, lambda v: v >= 1, "an integer >= 1"),
    "rejoin_after": (float, lambda v: v >= 0, "a number >= 0"),
    "suspect_poll": (float, lambda v: v > 0, "a number > 0"),
}


def _parse_option(name: str, text: str) -> Any:
    if name not in _OPTION_PARSERS:
        accepted = ", ".join(["failover", *_OPTION_PARSERS])
        raise ConfigError("store", f"unknown memcached option {name!r} (accepted: {accepted})")
    convert, valid, expected = _OPTION_PARSERS[name]
    try:
        value = convert(text)
    except ValueError:
        value = None
    if value is None or not valid(value) or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError("store", f"memcached option {name}={text!r}: expected {expected}")
    return value


def _node_name(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- store -------------------------------------------------------------------


class MemcachedStore:
    """Sessions on a memcached ring, each with a backup copy (see the module docs)."""

    def __init__(
        self,
        servers: Iterable[tuple[str, int]],
        *,
        failover: Iterable[tuple[str, int]] = (),
        timeout: float = 0.5,
        connect_timeout: float = 0.5,
        retry_after: float = 5.0,
        rejoin_after: float = 10.0,
        suspect_poll: float = 1.0,
        pool_size: int = 32,
        copies: int = 2,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if copies not in (1, 2):
            raise ConfigError("store", f"memcached copies must be 1 or 2, got {copies!r}")
        self._copies = copies
        options = _Options(timeout, connect_timeout, retry_after, pool_size, rejoin_after, suspect_poll)
        primaries = [_Node(_node_name(h, p), (h, p), options) for h, p in servers]
        standby = [_Node(_node_name(h, p), (h, p), options) for h, p in failover]
        names = [node.name for node in primaries + standby]
        if not primaries:
            raise ConfigError("store", "memcached needs at least one server")
        if len(set(names)) != len(names):
            raise ConfigError("store", f"memcached servers listed twice: {names}")
        self._nodes = primaries + standby
        self._rings = [_Ring(primaries)] + ([_Ring(standby)] if standby else [])
        self._primaries = frozenset(primaries)
        self._poll_order = sorted(primaries, key=lambda node: node.name) if len(primaries) > 1 else []
        self._retry_after = retry_after
        self._clock = clock
        # the fence: one poll interval for every process to poll, one more for a slow poll, and
        # one command's timeouts for an operation that started just before its process learned
        fence = 2 * suspect_poll + connect_timeout + timeout
        self._suspects = _Suspects(suspect_poll, fence, clock)

    @classmethod
    def from_url(cls, url: str, *, clock: Callable[[], float] = time.time) -> "MemcachedStore":
        """Build from ``memcached://h1:p1,h2:p2?failover=h3:p3&timeout=...``."""
        try:
            parts = urlsplit(url)
            query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
        except ValueError as exc:
            raise ConfigError("store", f"bad memcached URL {url!r}: {exc}") from None
        if parts.scheme != "memcached" or parts.path not in ("", "/") or parts.fragment:
            raise ConfigError("store", f"bad memcached URL {url!r}: expected memcached://host:port,...")
        names = [name for name, _ in query]
        if len(set(names)) != len(names):
            raise ConfigError("store", f"memcached URL repeats an option: {url!r}")
        params = dict(query)
        failover = _parse_hosts(params.pop("failover")) if "failover" in params else []
        options = {name: _parse_option(name, text) for name, text in params.items()}
        return cls(_parse_hosts(parts.netloc), failover=failover, clock=clock, **options)

    # -- placement -----------------------------------------------------------

    def _live(self, key: bytes) -> list[_Node]:
        """The first live nodes of ``key``'s preference list (failover ring if no primary is up)."""
        now = self._clock()
        for ring in self._rings:
            nodes = list(islice((n for n in ring.walk(key) if n.alive(now)), _SPREAD))
            if nodes:
                return nodes
        return []

    def _mark_dead(self, node: _Node, for_seconds: float | None = None, publish: bool = True) -> None:
        """Skip ``node`` for ``retry_after`` seconds (or ``for_seconds``: a node back too recently).

        A ring node becomes suspect, and (``publish``) the other ring nodes are told.
        """
        now = self._clock()
        pause = self._retry_after if for_seconds is None else for_seconds
        if node.alive(now):
            why = "unreachable" if for_seconds is None else "restarted moments ago"
            log.warning("memcached %s %s; skipped for %.1fs", node.name, why, pause)
        node.dead_until = now + pause
        node.close()
        until = self._first_window(now, pause)
        if node in self._primaries and not self._suspects.covers(node.name, until):
            self._suspects.learn({node.name: until})
            if publish:
                self._publish({node.name: until})

    def _first_window(self, now: float, pause: float) -> float:
        """How long a node seen failing at ``now`` and skipped for ``pause`` is suspect at first."""
        return now + pause + self._suspects.fence + _SUSPECT_AT_LEAST

    # -- suspect nodes -------------------------------------------------------

    def suspects(self) -> list[str]:
        """Names of the ring nodes held suspect now (some client saw them fail; see the module docs)."""
        return self._suspects.names()

    def _poll_suspects(self) -> None:
        """Read the ring's record of suspect nodes (first two live ring nodes by name), if it is time."""
        if not self._poll_order or not self._suspects.due():
            return
        with self._suspects.polling:
            if not self._suspects.due():
                return  # another thread polled meanwhile
            started, read = time.monotonic(), 0
            for node in self._poll_order:
                if read == 2:
                    break
                if not node.alive(self._clock()):
                    continue
                try:
                    item = node.call(lambda w: w.fetch(_SUSPECTS_KEY, None))
                except _NodeDown as down:
                    self._mark_dead(node, down.for_seconds)
                    continue
                self._suspects.learn(_read_suspects(None if item is None else item.data))
                read += 1
            self._suspects.polled(started)

    def _publish(self, entries: dict[str, float | None]) -> None:
        """Merge ``entries`` into the record on every live ring node they do not name.

        A node that fails meanwhile is marked dead, and its own entry published in turn.
        """
        failed: dict[str, float | None] = {}
        for node in self._poll_order:
            if node.name in entries or not node.alive(self._clock()):
                continue
            try:
                self._merge_suspects(node, entries)
            except _NodeDown as down:
                self._mark_dead(node, down.for_seconds, publish=False)
                failed[node.name] = self._first_window(self._clock(), down.for_seconds or self._retry_after)
        if failed:
            self._publish(failed)

    def _merge_suspects(self, node: _Node, entries: dict[str, float | None]) -> None:
        """Read-modify-write of ``node``'s record (CAS-checked), keeping the later window of each node."""
        for _ in range(_CAS_ROUNDS):
            item = node.call(lambda w: w.fetch(_SUSPECTS_KEY, None))
            old = _read_suspects(None if item is None else item.data)
            merged = _merge_windows(old, entries, self._clock())
            if merged == old:
                return
            data, exptime = _write_suspects(merged), _exptime(_longest(merged.values(), self._clock()))
            mode, cas = (b"E", None) if item is None else (b"S", item.cas)
            if node.call(lambda w: w.meta_set(_SUSPECTS_KEY, data, exptime, 0, mode, cas)) is not None:
                return
        raise StoreError(f"memcached {node.name}: the record of suspect nodes kept changing")

    def _compares(self, nodes: list[_Node]) -> bool:
        """Whether reads and writes of these live nodes' key go through the next node's copy."""
        return len(nodes) > 1 and self._suspects.holds(nodes[0].name)

    def _cover(self, node: _Node, exptime: int) -> None:
        """Keep ``node`` suspect at least as long as a copy on it given ``exptime`` may live."""
        lifetime = _lifetime(exptime)
        if lifetime is not None and lifetime <= 0:
            return
        needed = None if lifetime is None else self._clock() + lifetime + _COVER_MARGIN
        if not self._suspects.covers(node.name, needed):
            # half a lifetime more: the next write with this TTL needs no publishing for a while
            extended = None if needed is None else needed + lifetime / 2
            self._suspects.learn({node.name: extended})
            self._publish({node.name: extended})

    def _skipped(self, key: bytes, first: _Node) -> list[_Node]:
        """The ring nodes before ``first`` in ``key``'s preference list (dead: a write goes around them)."""
        around = []
        for node in self._rings[0].walk(key):
            if node is first:
                return around
            around.append(node)
        return []  # a failover node: the ring is down, and nobody can be told (a known limit)

    def _fenced(self, node: _Node, exptime: int) -> None:
        """Before a write that goes around suspect ``node`` or through the next node's copy: keep
        ``node`` suspect as long as the copy the write leaves there may live, and wait out the fence
        (until every process polling the ring compares, no copy on ``node`` may go stale)."""
        self._cover(node, exptime)
        wait = self._suspects.fence_left(node.name)
        if wait > 0:
            log.info("memcached: writes around %s wait %.1fs, until every client knows it is suspect",
                     node.name, wait)
            time.sleep(wait)

    def _run(self, key: bytes, op: Callable[[list[_Node]], T]) -> T:
        """``op(live nodes of key)``, again on the new live list after a node fails."""
        self._poll_suspects()
        for _ in range(len(self._nodes) + 1):
            nodes = self._live(key)
            if not nodes:
                break
            try:
                return op(nodes)
            except _NodeDown as down:
                self._mark_dead(down.node, down.for_seconds)
        raise StoreUnavailable("no memcached node that could hold this key is reachable")

    def _reach(self, node: _Node, op: Callable[[_Wire], T]) -> T | _NodeDown:
        """``node.call(op)``, or the failure (the node is marked dead) instead of raising it."""
        try:
            return node.call(op)
        except _NodeDown as down:
            self._mark_dead(node, down.for_seconds)
            return down

    def _on_each(self, nodes: Iterable[_Node], op: Callable[[_Wire], bool]) -> bool:
        """``op`` on every node, skipping the unreachable: did any return True?

        Raises the last ``_NodeDown`` if no node answered (``_run`` then retries).
        """
        answers = [self._reach(node, op) for node in nodes]
        if answers and all(isinstance(a, _NodeDown) for a in answers):
            raise answers[-1]
        return any(a is True for a in answers)

    # -- reads ---------------------------------------------------------------

    def load(self, key: str) -> Record | None:
        """``gets`` on the primary node (and the backup node on a miss)."""
        wire = _wire_key(key)
        return self._run(wire, lambda nodes: self._read(nodes, wire, None))

    def load_and_touch(self, key: str, ttl: int | None) -> Record | None:
        """``gats`` on the primary node (and the backup node on a miss)."""
        wire, exptime = _wire_key(key), _exptime(ttl)
        self._suspects.note(exptime)
        return self._run(wire, lambda nodes: self._read(nodes, wire, exptime))

    def _read(self, nodes: list[_Node], key: bytes, exptime: int | None) -> Record | None:
        if self._compares(nodes):
            return self._read_compared(nodes[0], nodes[1], key, exptime)
        for position, node in enumerate(nodes[:2]):
            item = node.call(lambda w: w.fetch(key, exptime))
            if item is not None and item.flags == _GONE:
                return None
            if item is not None:
                relocated = position > 0 or item.flags == _BACKUP
                return Record(item.data, Version(node.name, item.cas), relocated)
        return None

    def _read_compared(self, first: _Node, second: _Node, key: bytes, exptime: int | None) -> Record | None:
        """Read a suspect node's copy and the next node's; the next one's wins if it is newer."""
        if exptime is not None:
            self._cover(first, exptime)
        mine = first.call(lambda w: w.fetch(key, exptime))
        theirs = second.call(lambda w: w.meta_fetch(key, exptime if mine is None else None))
        if mine is None:
            if theirs is None or theirs.flags == _GONE:
                return None
            return Record(theirs.data, Version(second.name, theirs.cas), True)
        newer = theirs is not None and theirs.flags in (_PRIMARY, _GONE) and (
            theirs.flags, theirs.data) != (mine.flags, mine.data)
        if newer and theirs.flags == _GONE:  # deleted while ``first`` was skipped: so is its copy
            first.call(lambda w: w.meta_delete(key, mine.cas))
            return None
        if newer:
            return self._repair(first, key, mine, theirs, exptime)
        if mine.flags == _GONE:
            return None
        next_cas = 0 if theirs is None else theirs.cas
        return Record(mine.data, Version(first.name, mine.cas, next_cas), mine.flags == _BACKUP)

    def _repair(self, first: _Node, key: bytes, stale: _Item, newer: _Item, exptime: int | None) -> Record:
        """Write the next node's newer copy over ``first``'s, if that is still the one read.

        If it is not, the record is returned ``relocated`` (the caller saves it again).
        """
        if exptime is None:
            exptime = 0 if newer.ttl is None or newer.ttl < 0 else _exptime(newer.ttl)
        self._cover(first, exptime)
        cas = self._put(first, key, newer.data, exptime, _PRIMARY, b"S", stale.cas)
        log.info("memcached: %s held an older copy; %s", first.name, "repaired" if cas else "repair lost a race")
        return Record(newer.data, Version(first.name, stale.cas if cas is None else cas, newer.cas), cas is None)

    # -- writes --------------------------------------------------------------

    def save(self, key: str, data: bytes, ttl: int | None, expect: Any = ANY) -> SaveResult:
        """Write the primary copy (conditionally on ``expect``), then the backup copy."""
        wire, data, exptime = _wire_key(key), bytes(data), _exptime(ttl)
        self._suspects.note(exptime)
        written = self._run(wire, lambda nodes: self._commit(nodes, wire, data, exptime, expect))
        if written is None:
            current = self.load(key)
            if current is not None or expect is not None:
                return SaveResult(False, current=current)
            written = self._run(wire, lambda nodes: self._commit(nodes, wire, data, exptime, _OVER_GONE))
            if written is None:
                return SaveResult(False, current=self.load(key))
        primary, version, backed_up = written
        if not backed_up and self._copies == 2:
            self._write_backup(wire, primary, data, exptime)
        return SaveResult(True, version=version)

    def _commit(
        self, nodes: list[_Node], key: bytes, data: bytes, exptime: int, expect: Any
    ) -> tuple[_Node, Version, bool] | None:
        """The conditional write. Returns (primary node, new version, backup written) or None."""
        primary = nodes[0]
        for node in self._skipped(key, primary):
            self._fenced(node, exptime)
        if self._compares(nodes):
            return self._commit_compared(primary, nodes[1], key, data, exptime, expect)
        if expect is ANY or expect is None or expect is _OVER_GONE:
            cas = self._write(primary, key, data, exptime, _PRIMARY, b"S" if expect is ANY else b"E", expect)
        elif isinstance(expect, Version) and expect.node == primary.name:
            cas = self._put(primary, key, data, exptime, _PRIMARY, b"S", expect.cas)
        elif isinstance(expect, Version) and len(nodes) > 1 and expect.node == nodes[1].name:
            return self._commit_relocated(primary, nodes[1], key, data, exptime, expect.cas)
        else:
            return None
        return None if cas is None else (primary, Version(primary.name, cas), False)

    def _commit_compared(
        self, first: _Node, second: _Node, key: bytes, data: bytes, exptime: int, expect: Any
    ) -> tuple[_Node, Version, bool] | None:
        """The conditional write while ``first`` is suspect: on the next node first, where it is
        checked, then on ``first`` (see "Partitions"). Both copies carry the primary flag.

        A version of the next node's copy (read while ``first`` was skipped, or missed it) is
        checked there too: ``first`` may hold an older copy, so it is set, not added to.
        """
        if isinstance(expect, Version) and expect.node == second.name:
            mode, cas = b"S", expect.cas
        elif expect is ANY or expect is None or expect is _OVER_GONE:
            mode, cas = (b"S" if expect is ANY else b"E"), None
        elif isinstance(expect, Version) and expect.node == first.name and expect.next_cas is not None:
            mode, cas = (b"S", expect.next_cas) if expect.next_cas else (b"E", None)
        else:
            return None  # read before this process knew ``first`` was suspect: read again, compared
        self._fenced(first, exptime)
        next_cas = self._write(second, key, data, exptime, _PRIMARY, mode, expect, cas)
        if next_cas is None:
            return None
        mode = b"E" if expect is None or expect is _OVER_GONE else b"S"
        try:
            mine = self._write(first, key, data, exptime, _PRIMARY, mode, expect)
        except _NodeDown as down:  # written where it is checked: ``first`` is read against it later
            self._mark_dead(first, down.for_seconds)
            return second, Version(second.name, next_cas), True
        if mine is None:  # a create, and ``first`` holds the record: take the next node's copy back
            second.call(lambda w: w.meta_delete(key, next_cas))
            return None
        return first, Version(first.name, mine, next_cas), True

    def _commit_relocated(
        self, primary: _Node, backup: _Node, key: bytes, data: bytes, exptime: int, expect: int
    ) -> tuple[_Node, Version, bool] | None:
        """Save a record read from the backup copy: CAS there, then ``add`` on the primary."""
        backup_cas = self._put(backup, key, data, exptime, _BACKUP, b"S", expect)
        if backup_cas is None:
            return None
        cas = self._put(primary, key, data, exptime, _PRIMARY, b"E")
        if cas is None:  # someone saved the primary meanwhile: take our backup copy back
            backup.call(lambda w: w.meta_delete(key, backup_cas))
            return None
        return primary, Version(primary.name, cas), True

    def _write_backup(self, key: bytes, primary: _Node, data: bytes, exptime: int) -> None:
        """Set the backup copy on the next live node after ``primary``, if there is one."""
        write = lambda w: w.meta_set(key, data, exptime, _BACKUP, b"S", None)  # noqa: E731
        for _ in range(len(self._nodes)):
            backup = next((n for n in self._live(key) if n is not primary), None)
            if backup is None or not isinstance(self._reach(backup, write), _NodeDown):
                return

    @staticmethod
    def _put(
        node: _Node, key: bytes, data: bytes, exptime: int, flags: int, mode: bytes, cas: int | None = None
    ) -> int | None:
        return node.call(lambda w: w.meta_set(key, data, exptime, flags, mode, cas))

    def _write(
        self, node: _Node, key: bytes, data: bytes, exptime: int, flags: int, mode: bytes, expect: Any,
        cas: int | None = None,
    ) -> int | None:
        """``_put`` of a record; with ``expect`` ``_OVER_GONE`` a create (``add``) also takes the
        place of a gone copy (CAS-checked)."""
        new = self._put(node, key, data, exptime, flags, mode, cas)
        if new is not None or mode != b"E" or expect is not _OVER_GONE:
            return new
        there = node.call(lambda w: w.meta_head(key))
        if there is None or there.flags != _GONE:
            return None
        return self._put(node, key, data, exptime, flags, b"S", there.cas)

    def touch(self, key: str, ttl: int | None) -> bool:
        """Slide the expiry of both copies (of the one copy with ``copies=1``); False if none exists."""
        wire, exptime = _wire_key(key), _exptime(ttl)
        self._suspects.note(exptime)
        touch = lambda w: w.touch(wire, exptime, noreply=False)  # noqa: E731
        return self._run(wire, lambda nodes: self._on_each(nodes[: self._touched(nodes, exptime)], touch))

    def _touched(self, nodes: list[_Node], exptime: int) -> int:
        """How many of ``nodes`` a touch slides: both while the first is suspect (the next may hold
        the newer copy), else one per copy kept."""
        if not self._compares(nodes):
            return self._copies
        self._cover(nodes[0], exptime)
        return 2

    def single_copy(self) -> "MemcachedStore":
        """This store, sharing its connections, keeping one copy per key.

        Sticky mode's backup uses it: the node's own memory holds the primary
        copy, so the store needs only one; if its memcached node dies, the
        next backup write or refresh puts it on the next node of the ring.
        """
        view = copy.copy(self)
        view._copies = 1
        return view

    def delete(self, key: str, expect: Any = ANY) -> bool:
        """Remove the key from the first three live nodes (conditionally on its version)."""
        wire = _wire_key(key)
        if expect is ANY:
            return self._run(wire, lambda nodes: self._remove(nodes, wire))
        if not isinstance(expect, Version):
            return False
        return self._run(wire, lambda nodes: self._delete_version(nodes, wire, expect))

    def _remove(self, nodes: list[_Node], key: bytes, done: _Node | None = None) -> bool:
        """Delete from ``nodes`` (but ``done``, deleted already) in reverse order, so the first copy
        goes last; whether one held the record. Around dead nodes, a gone copy takes the place of
        the first copy instead (see "Partitions")."""
        delete = lambda w: w.delete(key, noreply=False)  # noqa: E731
        around = self._skipped(key, nodes[0])
        if not around:
            rest = [node for node in reversed(nodes) if node is not done]
            return bool(rest) and self._on_each(rest, delete)
        there = nodes[0].call(lambda w: w.meta_head(key))
        exptime = self._gone_exptime(there)
        for node in around:
            self._fenced(node, exptime)
        rest = [node for node in reversed(nodes[1:]) if node is not done]
        existed = bool(rest) and self._on_each(rest, delete)
        self._put(nodes[0], key, b"", exptime, _GONE, b"S")
        return existed or (there is not None and there.flags != _GONE)

    def _gone_exptime(self, there: _Item | None) -> int:
        """Expiry of a gone copy: it must outlive the copies left on the nodes it went around,
        which lived at most as long as the longest TTL this process used, or ``there`` has."""
        lifetime = self._suspects.longest(None if there is None else there.ttl)
        return 0 if lifetime is None else _exptime(lifetime + _COVER_MARGIN)

    def _delete_version(self, nodes: list[_Node], key: bytes, expect: Version) -> bool:
        owner = next((n for n in nodes[:2] if n.name == expect.node), None)
        if owner is None or not owner.call(lambda w: w.meta_delete(key, expect.cas)):
            return False
        self._remove(nodes, key, done=owner)
        return True

    def close(self) -> None:
        for node in self._nodes:
            node.close()

    # -- locks ---------------------------------------------------------------

    def lock(self, key: str, token: str, expiry: float, load_ttl: Any = NO_LOAD) -> tuple[bool, Record | None]:
        """``add`` the lock on the session's primary node, then ``gats`` the session if asked."""
        wire, lock, owner = self._lock_args(key, token)
        exptime = _lock_exptime(expiry)
        acquired = self._run(wire, lambda nodes: self._put(nodes[0], lock, owner, exptime, 0, b"E") is not None)
        if not acquired or load_ttl is NO_LOAD:
            return acquired, None
        return True, self.load_and_touch(key, load_ttl)

    def renew(self, key: str, token: str, expiry: float) -> bool:
        """Extend the lock to ``expiry`` seconds from now if ``token`` still owns it."""
        wire, lock, owner = self._lock_args(key, token)
        exptime = _lock_exptime(expiry)

        def extend(cas: int, client: _Wire) -> bool:
            return client.meta_set(lock, owner, exptime, 0, b"S", cas) is not None

        return self._run(wire, lambda nodes: self._if_owner(nodes[0], lock, owner, extend))

    def unlock(self, key: str, token: str) -> bool:
        """Delete the lock if ``token`` owns it (a CAS-conditional meta delete)."""
        wire, lock, owner = self._lock_args(key, token)

        def release(cas: int, client: _Wire) -> bool:
            return client.meta_delete(lock, cas)

        return self._run(wire, lambda nodes: self._if_owner(nodes[0], lock, owner, release))

    def save_and_unlock(self, key: str, data: bytes, ttl: int | None, expect: Any, token: str) -> SaveResult:
        """``save`` then ``unlock`` (pymemcache cannot pipeline commands to two nodes)."""
        result = self.save(key, data, ttl, expect)
        self.unlock(key, token)
        return result

    # -- index -------------------------------------------------------------------

    def index_add(self, key: str, index_keys: Sequence[str], ttl: int | None) -> None:
        """Record ``key`` in its reverse record and in each forward record (CAS-checked)."""
        names = list(dict.fromkeys(index_keys))
        if not names:
            return
        until = None if ttl is None else self._clock() + ttl
        reverse = companion_key(key, INDEX_SUFFIX)

        def add_names(old: bytes | None) -> tuple[bytes | None, float | None]:
            expiry, recorded = _read_reverse(old)
            expiry = _later(expiry, until) if old is not None else until
            return _write_reverse(expiry, recorded | set(names)), expiry

        # optimistic: a login's records are new, so each is first tried as a create (no read)
        self._rewrite(reverse, add_names, absent=True)  # first: a forward entry never exists without it
        for name in names:
            self._rewrite(name, lambda old: self._with_entry(old, key, until), absent=True)

    def _with_entry(self, old: bytes | None, key: str, until: float | None) -> tuple[bytes | None, float | None]:
        entries = self._live_entries(old)
        entries[key] = _later(entries[key], until) if key in entries else until
        return _write_entries(entries), _last(entries.values())

    def _live_entries(self, data: bytes | None) -> dict[str, float | None]:
        now = self._clock()
        return {k: t for k, t in _read_entries(data).items() if t is None or t > now}

    def index_find(self, index_key: str) -> list[str]:
        """Session keys under ``index_key`` whose entry is alive and whose session exists."""
        record = self.load(index_key)
        if record is None:
            return []
        return [k for k in self._live_entries(record.data) if self._exists(k)]

    def _exists(self, key: str) -> bool:
        """Whether the primary or backup node holds ``key`` (meta get, no value sent back; while
        the primary node is suspect, the copies are read and compared)."""
        wire = _wire_key(key)

        def held(node: _Node) -> bool:
            there = node.call(lambda w: w.meta_head(wire))
            return there is not None and there.flags != _GONE

        def probe(nodes: list[_Node]) -> bool:
            if self._compares(nodes):
                return self._read_compared(nodes[0], nodes[1], wire, None) is not None
            return any(held(node) for node in nodes[:2])

        return self._run(wire, probe)

    def index_drop(self, key: str) -> int:
        """Remove ``key`` from each forward record it is in, then delete its reverse record."""
        reverse = companion_key(key, INDEX_SUFFIX)
        record = self.load(reverse)
        if record is None:
            return 0
        _, names = _read_reverse(record.data)

        def without(old: bytes | None) -> tuple[bytes | None, float | None]:
            entries = self._live_entries(old)
            entries.pop(key, None)
            return (_write_entries(entries) if entries else None), _last(entries.values())

        for name in sorted(names):
            self._rewrite(name, without)
        self.delete(reverse)
        return len(names)

    def _rewrite(self, key: str, change: Callable[[bytes | None], tuple[bytes | None, float | None]],
                 absent: bool = False) -> None:
        """Read ``key``, ``change(data)`` into ``(new data or None to delete, expiry)``, write it
        back only if nobody wrote meanwhile (CAS); retried with what the store holds then.

        ``absent``: skip the first read and try to create the record (a failed
        create returns what is there, and the usual CAS rounds follow).
        """
        current = None if absent else self.load(key)
        for _ in range(_CAS_ROUNDS):
            data, expiry = change(None if current is None else current.data)
            if data is None:
                if current is None or self.delete(key, expect=current.version):
                    return
                current = self.load(key)
                continue
            ttl = None if expiry is None else max(1, math.ceil(expiry - self._clock()))
            result = self.save(key, data, ttl, expect=None if current is None else current.version)
            if result.ok:
                return
            current = result.current
        raise StoreError(f"memcached: index record {key!r} kept changing under {_CAS_ROUNDS} writers")

    # -- invalidation feed ------------------------------------------------------------

    def feed_publish(self, channel: str, message: bytes) -> None:
        """``incr`` the channel's sequence, then write the message under its new number."""
        seq = self._bump(_wire_key(f"{channel}:seq"))
        # one copy: a record lost with its node is reported lost by the readers (who then check)
        self.single_copy().save(f"{channel}:{seq}", bytes(message), _FEED_RECORD_TTL)

    def _bump(self, wire: bytes) -> int:
        def bump(nodes: list[_Node]) -> int:
            node = nodes[0]
            value = node.call(lambda w: w.incr(wire, 1, noreply=False))
            if value is None:  # not there (first use, expired, its node restarted): start it
                node.call(lambda w: w.add(wire, _feed_base(), _exptime(_FEED_SEQ_TTL), noreply=False))
                value = node.call(lambda w: w.incr(wire, 1, noreply=False))
            return int(value)

        return self._run(wire, bump)

    def _sequence(self, wire: bytes) -> int | None:
        """The sequence's value (one ``get`` on its node), or None if it is not there."""
        def read(nodes: list[_Node]) -> int | None:
            found = nodes[0].call(lambda w: w.get(wire))
            return None if found is None else int(found[0])

        return self._run(wire, read)

    def _start_sequence(self, wire: bytes) -> int:
        """Create the sequence if it is missing; its value now."""
        self._run(wire, lambda nodes: nodes[0].call(
            lambda w: w.add(wire, _feed_base(), _exptime(_FEED_SEQ_TTL), noreply=False)))
        seq = self._sequence(wire)
        if seq is None:
            raise StoreUnavailable("memcached: the feed sequence vanished as it was created")
        return seq

    def feed_position(self, channel: str) -> "_FeedCursor":
        wire = _wire_key(f"{channel}:seq")
        seq = self._sequence(wire)
        if seq is None:
            seq = self._start_sequence(wire)  # so that every later poll is one hit
        return _FeedCursor(seq, ())

    def feed_read(self, channel: str, cursor: Any) -> FeedBatch:
        """Messages after ``cursor``: one ``get`` of the sequence, plus the new records if it moved."""
        if not isinstance(cursor, _FeedCursor):
            raise TypeError("feed_read takes a cursor from feed_position or feed_read")
        wire = _wire_key(f"{channel}:seq")
        seq = self._sequence(wire)
        lost = False
        start, waiting = cursor.seq, dict(cursor.waiting)
        if seq is None:
            seq = self._start_sequence(wire)
        if seq // _FEED_EPOCH != start // _FEED_EPOCH or seq < start:
            # the sequence was created again (its node restarted, it expired or was evicted):
            # what was published in between is lost; read the new epoch from its start
            lost, start, waiting = True, seq // _FEED_EPOCH * _FEED_EPOCH, {}
        if seq == start and not waiting:
            return FeedBatch([], cursor if not lost else _FeedCursor(seq, ()), lost)
        wanted = sorted(set(waiting) | set(range(start + 1, seq + 1)))
        if len(wanted) > _FEED_MAX_BATCH:
            lost, wanted = True, wanted[-_FEED_MAX_BATCH:]
        now = time.monotonic()
        messages, still = [], []
        for n in wanted:
            record = self.load(f"{channel}:{n}")
            if record is not None:
                messages.append(record.data)
            elif now - waiting.get(n, now) < _FEED_RECORD_WAIT:
                still.append((n, waiting.get(n, now)))  # announced, not written yet: wait for it
            else:
                lost = True
        return FeedBatch(messages, _FeedCursor(seq, tuple(still)), lost)

    @staticmethod
    def _lock_args(key: str, token: str) -> tuple[bytes, bytes, bytes]:
        """(session key, lock key, owner token) as protocol bytes, validated."""
        if not isinstance(token, str) or not token:
            raise ValueError("lock token must be a non-empty str")
        return _wire_key(key), _wire_key(companion_key(key, "lock")), token.encode()

    @staticmethod
    def _if_owner(node: _Node, lock: bytes, owner: bytes, act: Callable[[int, _Wire], bool]) -> bool:
        """``act(cas, client)`` on the lock if it holds ``owner``; the CAS makes it race-free."""
        item = node.call(lambda client: client.fetch(lock, None))
        if item is None or item.data != owner:
            return False
        return node.call(lambda client: act(item.cas, client))


# -- index and feed records -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class _FeedCursor:
    """Where a reader is in a feed: the last sequence number read, and announced
    records not found yet as ``(number, monotonic time first missed)``."""

    seq: int
    waiting: tuple[tuple[int, float], ...]


def _later(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else max(a, b)


def _feed_base() -> bytes:
    """Initial value of a feed sequence: its epoch (creation time in ms) times ``_FEED_EPOCH``."""
    return b"%d" % (int(time.time() * 1000) * _FEED_EPOCH)


def _last(expiries: Iterable[float | None]) -> float | None:
    """The latest of some expiries (``None``: never), for a record holding them all."""
    latest: float | None = 0.0
    for expiry in expiries:
        latest = _later(latest, expiry)
    return latest


def _read_entries(data: bytes | None) -> dict[str, float | None]:
    """A forward record: ``{session key: expiry or None}`` (a JSON object).

    :raise CorruptPayload: (``index record``) it is not one; it is then left as it is.
    """
    if not data:
        return {}
    raw = json_document(data, _RECORD)
    if type(raw) is not dict:
        raise CorruptPayload(f"bad {_RECORD}: memcached: a forward index record is not a JSON object", part=_RECORD)
    return {key: _expiry(value, "expiry") for key, value in raw.items()}  # a key names a session: never shown


def _write_entries(entries: dict[str, float | None]) -> bytes:
    return json.dumps({k: (None if v is None else round(v, 3)) for k, v in entries.items()},
                      separators=(",", ":")).encode()


def _read_reverse(data: bytes | None) -> tuple[float | None, set[str]]:
    """A reverse record: ``(its expiry or None, index keys)``.

    :raise CorruptPayload: (``index record``) it is not one; it is then left as it is.
    """
    if not data:
        return None, set()
    raw = json_document(data, _RECORD)
    names = raw.get("x") if type(raw) is dict else None
    if type(names) is not list or not all(type(n) is str for n in names):
        raise CorruptPayload(f"bad {_RECORD}: memcached: a reverse index record lacks its list of index keys",
                             part=_RECORD)
    return field(raw, "e", _RECORD, _expiry), set(names)


def _expiry(value: object, name: str, part: str = "index record") -> float | None:
    """An entry's or record's expiry: epoch seconds, or None (never)."""
    return None if value is None else epoch(value, name, part)


def _write_reverse(expiry: float | None, names: set[str]) -> bytes:
    return json.dumps({"e": None if expiry is None else round(expiry, 3), "x": sorted(names)},
                      separators=(",", ":")).encode()


# -- the record of suspect nodes --------------------------------------------------


def _read_suspects(data: bytes | None) -> dict[str, float | None]:
    """The ring's record of suspect nodes: ``{node name: window end or None (for ever)}``."""
    if not data:
        return {}
    try:
        raw = json.loads(data)
        return {str(k): (None if v is None else float(v)) for k, v in raw.items()}
    except (ValueError, AttributeError, TypeError):
        log.warning("memcached: unreadable record of suspect nodes ignored")
        return {}


def _write_suspects(windows: dict[str, float | None]) -> bytes:
    return json.dumps({k: (None if v is None else round(v, 3)) for k, v in sorted(windows.items())},
                      separators=(",", ":")).encode()


def _merge_windows(old: dict[str, float | None], new: dict[str, float | None],
                   now: float) -> dict[str, float | None]:
    """``old`` and ``new`` together, the later window of each node, without the ones over at ``now``."""
    merged = {name: _later(old[name], until) if name in old else until for name, until in new.items()}
    merged = {**old, **merged}
    return {name: until for name, until in merged.items() if until is None or until > now}


def _longest(windows: Iterable[float | None], now: float) -> float | None:
    """Seconds from ``now`` until the last of ``windows`` ends (None: one never does)."""
    last = _last(windows)
    return None if last is None else max(1.0, last - now)


def _lifetime(exptime: int) -> float | None:
    """Seconds an item given memcached ``exptime`` lives at most (None: for ever)."""
    if exptime == 0:
        return None
    if exptime < 0:
        return 0.0
    return exptime - time.time() if exptime > _MAX_RELATIVE_TTL else float(exptime)
