"""What the ``inspect``, ``doctor``, ``stats`` and ``migrate`` commands do.

:mod:`sessionstore.cli` is only the argparse layer; the work is here, usable
from Python as well:

:func:`inspect_session`
    Reads one session's record without sliding its expiry (a plain ``load``),
    decodes it, and reads its tombstone: an :class:`Inspection`, rendered by
    :func:`render_inspection` or :meth:`Inspection.as_json`.
:func:`run_doctor`
    Probes a store (save / load / delete of a temporary key), reads the
    server's version, memory and eviction settings, clock and persistence,
    and turns configuration problems into :class:`Check` lines.
:func:`stats_app`
    A WSGI app serving ``manager.stats()`` as JSON, or as Prometheus text
    with ``?format=prometheus`` or ``Accept: text/plain``; :func:`fetch_stats`
    and :func:`render_stats` are its client side.
:func:`migrate`
    Creates the SQL store's tables; other stores have no schema.

(Named ``diagnose`` rather than ``inspect`` so it never shadows the standard
library's :mod:`inspect`.)
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import secrets
import statistics
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import parse_qs, urlsplit

from . import ids
from .debug import log_id
from .errors import ConfigError, CorruptPayload, StoreError
from .metrics import prometheus_text
from .payload import Payload, decode
from .settings import Settings
from .signing import CookieSigner, Verdict, split_cookie
from .startup import startup_warnings
from .stores.base import Record, Store, companion_key
from .tombstones import Tombstones, read_stone

__all__ = [
    "CookieReading", "read_cookie_value", "Inspection", "inspect_session", "render_inspection",
    "Check", "run_doctor", "render_checks", "stats_app", "fetch_stats", "parse_prometheus",
    "render_stats", "migrate", "env_keys", "redact",
]

#: What each cause code ``inspect`` can report means, in one line.
CAUSE_HELP = {
    "expired": "the session passed its idle timeout (max_inactive) or max_age",
    "evicted": "the store lost a session that should still be alive (LRU eviction, maxmemory, "
               "a restart without persistence): run `sessionstore doctor`",
    "invalidated": "the session was invalidated (logout, manager.invalidate(), single sign-out)",
    "unknown-id": "the store holds nothing about this id: never saved (an empty new session is not "
                  "stored), its tombstone is gone too (over a day), or another store / key_prefix",
    "corrupt-payload": "the stored data cannot be decoded; the record is left in place and the app "
                       "issues a new session",
    "bad-signature": "the cookie fails verification with the given keys (tampered, or signed with a "
                     "key that is no longer configured): the app never looks it up",
}

_VALUE_WIDTH = 100
_SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mariadb")


# -- shared helpers ------------------------------------------------------------------


def env_keys(given: list[str] | None, variable: str, environ: Mapping[str, str] = os.environ) -> list[str]:
    """Keys from the command line, else from ``variable`` (comma-separated, like the settings)."""
    if given:
        return list(given)
    return [k.strip() for k in environ.get(variable, "").split(",") if k.strip()]


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    return re.sub(r"(//[^/@]*?:)[^/@]*@", r"\1***@", url)


def _iso(ts: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC (``2026-01-02T03:04:05Z``)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _span(seconds: float) -> str:
    """A duration for humans: ``42s``, ``3m 12s``, ``2h 5m``, ``3d 4h``."""
    s = int(round(abs(seconds)))
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if s >= size:
            return f"{s // size}{unit} {(s % size) // sub_size}{sub}"
    return f"{s}s"


def _when(ts: float | None, now: float) -> str:
    """``2026-01-02T03:04:05Z (3m 12s ago)`` or ``(in 5m 0s)``."""
    if ts is None:
        return "-"
    rel = f"{_span(now - ts)} ago" if ts <= now else f"in {_span(ts - now)}"
    return f"{_iso(ts)} ({rel})"


def _preview(value: Any, width: int) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _base_store(store: Any) -> Any:
    """The store doing the work: unwraps :class:`~sessionstore.metrics.TimedStore` and sticky mode."""
    while True:
        inner = getattr(store, "wrapped", None) or getattr(store, "remote", None)
        if inner is None:
            return store
        store = inner


def _kind(store: Any) -> str:
    """``redis``, ``memcached``, ``memory``, ``sql`` or the class name."""
    name = type(_base_store(store)).__name__
    return {"RedisStore": "redis", "MemcachedStore": "memcached", "MemoryStore": "memory",
            "SQLStore": "sql"}.get(name, name)


def _redis(store: Any) -> Any:
    """The redis-py client of a RedisStore (built on first use)."""
    return _base_store(store)._redis()  # no public accessor: see the report on RedisStore


def _memcached_nodes(store: Any) -> list[Any]:
    """Every node of a MemcachedStore, ring then failover-only (``.name``, ``.call(op)``)."""
    return list(_base_store(store)._nodes)  # no public accessor: see the report on MemcachedStore


# -- inspect: which session ------------------------------------------------------------


@dataclass(frozen=True)
class CookieReading:
    """What the argument of ``inspect`` named.

    ``form`` is ``"id"`` (a raw session id) or ``"cookie"`` (a signed cookie
    value); ``signature`` is ``None`` for a raw id, else ``"valid"``,
    ``"bad"`` or ``"unchecked"`` (no secret key given).
    """

    session_id: str
    form: str
    signature: str | None = None


def read_cookie_value(text: str, secret_keys: list[str]) -> CookieReading:
    """Tell a raw session id from a signed cookie value and verify the latter.

    Accepts ``name=value`` and a quoted value too. A value shaped like a
    cookie (``<random><signature>[.<route>]``) is one; otherwise it must be a
    well-formed id.

    :raise ConfigError: (field ``session``) neither a session id nor a cookie value.
    """
    value = text.strip().rpartition("=")[2].strip().strip('"')
    parsed = split_cookie(value)
    if parsed is not None:
        return CookieReading(parsed[0], "cookie", _signature(value, secret_keys))
    if ids.is_valid(value):
        return CookieReading(value, "id")
    raise ConfigError("session", f"{value[:80]!r} is neither a session id (43 URL-safe characters, "
                                 "optionally .<route>) nor a signed cookie value")


def _signature(value: str, secret_keys: list[str]) -> str:
    if not secret_keys:
        return "unchecked"
    return "bad" if isinstance(CookieSigner(secret_keys).unsign(value), Verdict) else "valid"


# -- inspect: what the store holds -------------------------------------------------------


@dataclass
class Attribute:
    """One stored attribute: its size, ``(generation, lineage)`` and a preview of its value."""

    name: str
    size: int
    generation: int
    lineage: int
    value: str


@dataclass
class Copy:
    """Where a copy of the record lives and its time to live (``ttl`` None: never expires)."""

    where: str
    ttl: float | None
    role: str = ""


@dataclass
class Inspection:
    """Everything ``sessionstore inspect`` reports about one session."""

    session_id: str
    key: str
    store: str
    form: str = "id"
    signature: str | None = None
    found: bool = False
    #: The cause code of the diagnosis when the app would not load the session.
    cause: str | None = None
    note: str | None = None
    version: str | None = None
    size: int | None = None
    encrypted: bool = False
    relocated: bool = False
    copies: list[Copy] = field(default_factory=list)
    ttl_note: str | None = None
    created: float | None = None
    last_saved: float | None = None
    max_inactive: int | None = None
    serializer: str | None = None
    index: dict[str, list[str]] = field(default_factory=dict)
    attributes: list[Attribute] = field(default_factory=list)
    tombstone: dict[str, Any] | None = None

    @property
    def sid(self) -> str:
        """How debug records name this session (``sid``: 12 hex of the id's SHA-256)."""
        return log_id(self.session_id) or ""

    @property
    def app_cause(self) -> str | None:
        """The cause code the app would log for this cookie or id (None: it loads the session)."""
        return "bad-signature" if self.signature == "bad" else self.cause

    @property
    def usable(self) -> bool:
        """Whether the app would load this session (found, decodable, signature not bad)."""
        return self.found and self.cause is None and self.signature != "bad"

    def as_json(self) -> dict[str, Any]:
        """A JSON-able dict: the fields, with ISO times next to the epoch ones."""
        data = dataclasses.asdict(self)
        data["usable"], data["app_cause"], data["sid"] = self.usable, self.app_cause, self.sid
        data["created_iso"], data["last_saved_iso"] = _iso(self.created), _iso(self.last_saved)
        return data


def inspect_session(
    store: Store,
    session_id: str,
    *,
    key_prefix: str = "sessionstore:",
    encryption_keys: list[str] | None = None,
    store_name: str = "",
    clock: Callable[[], float] = time.time,
) -> Inspection:
    """Read session ``session_id`` without sliding its expiry; decode it; read its tombstone.

    ``store`` may be a store object of a running manager too (``app.manager.store``).
    Raises :class:`~sessionstore.errors.StoreUnavailable` when the store cannot be reached.
    """
    key = f"{key_prefix}{{{session_id}}}"
    found = Inspection(session_id, key, store_name or type(_base_store(store)).__name__)
    try:
        record = store.load(key)
    except CorruptPayload as exc:  # a value the store itself cannot parse
        found.found, found.cause, found.note = True, "corrupt-payload", str(exc)
        record = None
    if record is not None:
        found.found = True
        _read_record(found, record, encryption_keys or [])
    try:
        _read_ttl(found, store, key)
    except Exception as exc:  # only the TTL is lost; the rest of the report stands
        found.ttl_note = f"could not read: {_reason(exc)}"
    found.tombstone = _read_tombstone(store, key)
    if not found.found:
        try:
            found.cause, found.note = Tombstones(store, clock).diagnose(key)
        except CorruptPayload as exc:
            found.cause, found.note = "corrupt-payload", str(exc)
    return found


def _read_record(found: Inspection, record: Record, encryption_keys: list[str]) -> None:
    version = record.version
    node, cas = getattr(version, "node", None), getattr(version, "cas", None)
    found.version = str(version) if node is None else f"cas {cas} on {node}"
    found.size = len(record.data)
    found.relocated = record.relocated
    data = record.data
    if data[:4] == b"SSE1":  # sessionstore.encryption's magic
        found.encrypted = True
        if not encryption_keys:
            found.note = "encrypted at rest: pass --encryption-key (or SESSIONSTORE_ENCRYPTION_KEY) to decode it"
            return
    try:
        if found.encrypted:
            from .encryption import Sealer

            data = Sealer(encryption_keys).open(data, found.key)
        payload = decode(data)
        _read_payload(found, payload)
    except CorruptPayload as exc:
        found.cause, found.note = "corrupt-payload", str(exc)


def _read_payload(found: Inspection, payload: Payload) -> None:
    meta = payload.meta
    found.created, found.last_saved = meta.created, meta.last_accessed
    found.max_inactive, found.serializer, found.index = meta.max_inactive, meta.serializer, meta.index
    loads = _value_reader(meta.serializer)
    for name, start, end, (generation, lineage) in payload.entries():
        found.attributes.append(Attribute(name, end - start, generation, lineage, loads(payload.data[start:end])))


def _value_reader(serializer: str) -> Callable[[bytes], str]:
    """``blob -> preview`` for ``serializer``; pickle is never unpickled here."""
    if serializer == "pickle":
        return lambda blob: "(pickle: not decoded — unpickling runs code)"
    try:
        from .serializers import get_serializer

        reader = get_serializer(serializer, [])
    except (ConfigError, ImportError) as exc:
        reason = str(exc)  # ``exc`` is unbound once the except block ends
        return lambda blob: f"(not decoded: {reason})"

    def preview(blob: bytes) -> str:
        try:
            return _preview(reader.loads(blob), _VALUE_WIDTH)
        except CorruptPayload as exc:
            return f"(undecodable: {exc})"

    return preview


def _read_tombstone(store: Store, key: str) -> dict[str, Any] | None:
    """The tombstone ``<key>:t`` as ``{"state", "written", "until"}`` (raw text if unreadable)."""
    try:
        stored = store.load(companion_key(key, "t"))
    except CorruptPayload as exc:  # the store's own framing of the value
        return {"state": "unreadable", "raw": str(exc)[:200]}
    if stored is None:
        return None
    try:
        stone = read_stone(stored.data)
    except CorruptPayload:
        return {"state": "unreadable", "raw": stored.data[:200].decode("utf-8", "replace")}
    return {"state": stone.state, "written": stone.written, "until": stone.until}


def _read_ttl(found: Inspection, store: Store, key: str) -> None:
    """Fill ``found.copies`` (where the record lives, with its TTL) or ``found.ttl_note``."""
    kind = _kind(store)
    if kind == "redis":
        pttl = _redis(store).pttl(key)
        if pttl != -2:
            found.copies.append(Copy("redis", None if pttl == -1 else pttl / 1000))
    elif kind == "memcached":
        found.copies.extend(_memcached_copies(store, key))
    elif kind == "memory":
        found.ttl_note = "n/a (in-process memory store)"
    else:
        found.ttl_note = f"not available for the {kind} store"


def _memcached_copies(store: Store, key: str) -> list[Copy]:
    """Every memcached node holding ``key``, with the copy's role and TTL (``mg <key> t f``)."""
    command = b"mg %s t f" % key.encode("ascii")
    copies = []
    for node in _memcached_nodes(store):
        try:
            reply = node.call(lambda wire: wire.raw_command(command))
        except Exception as exc:  # an unreachable node: say so, keep looking
            copies.append(Copy(node.name, None, f"unreachable ({_reason(exc)})"))
            continue
        flags = dict((t[:1], t[1:]) for t in reply.decode("ascii", "replace").split()[1:])
        if reply.startswith(b"HD"):
            ttl = int(flags.get("t", "-1"))
            role = {"1": "primary", "2": "backup"}.get(flags.get("f", ""), "copy")
            copies.append(Copy(node.name, None if ttl < 0 else float(ttl), role))
    order = {"primary": 0, "backup": 1, "copy": 2}
    return sorted(copies, key=lambda c: order.get(c.role, 3))


# -- inspect: rendering ------------------------------------------------------------


def render_inspection(found: Inspection, now: float | None = None) -> list[str]:
    """The text report of ``sessionstore inspect``, one line per item."""
    now = time.time() if now is None else now
    lines = [_row("session", found.session_id + _form(found)), _row("debug sid", found.sid), _row("key", found.key),
             _row("store", found.store), _row("status", _status(found))]
    if found.found:
        lines += _record_rows(found, now)
    lines += _ttl_rows(found, now)
    lines.append(_row("tombstone", _tombstone_text(found.tombstone, now)))
    return lines


def _row(label: str, text: str) -> str:
    return f"{label:<13}{text}"


def _form(found: Inspection) -> str:
    if found.form == "id":
        return " (raw session id)"
    return {"valid": " (signed cookie: signature valid)",
            "bad": " (signed cookie: BAD SIGNATURE with the given keys)",
            "unchecked": " (signed cookie: signature not checked, no --secret-key)"}[found.signature or "unchecked"]


def _status(found: Inspection) -> str:
    if found.usable:
        text = "FOUND: the app would load this session"
        return text + (" (from a backup copy: relocated)" if found.relocated else "")
    if found.signature == "bad":
        held = "the store holds a record for this id" if found.found else f"the store holds none ({found.cause})"
        return f"NOT USABLE: bad-signature — {CAUSE_HELP['bad-signature']} — {held}"
    head = ("FOUND but not usable" if found.found else "MISSING") + f": {found.cause}"
    help_text = CAUSE_HELP.get(found.cause or "", "")
    note = found.note if found.note and found.note not in help_text else None
    return " — ".join(p for p in (head, help_text, note) if p)


def _record_rows(found: Inspection, now: float) -> list[str]:
    if found.version is None:
        return []
    size = f"{found.size} bytes" + (" (encrypted at rest)" if found.encrypted else "")
    rows = [_row("version", found.version), _row("size", size)]
    if found.usable and found.note:
        rows.append(_row("note", found.note))
    if found.created is None:
        return rows
    inactive = f"{found.max_inactive} s" if (found.max_inactive or 0) > 0 else f"{found.max_inactive} (never expires)"
    rows += [_row("created", _when(found.created, now)), _row("last saved", _when(found.last_saved, now)),
             _row("max_inactive", inactive), _row("serializer", f"{found.serializer}")]
    index = "; ".join(f"{name}: {', '.join(values)}" for name, values in sorted(found.index.items()))
    rows.append(_row("index", index or "-"))
    rows.append(_row("attributes", f"{len(found.attributes)}"))
    width = max((len(a.name) for a in found.attributes), default=0)
    rows += [f"  {a.name:<{width}}  {a.size:>7} B  {a.value}" for a in found.attributes]
    return rows


def _ttl_rows(found: Inspection, now: float) -> list[str]:
    if found.ttl_note is not None:
        return [_row("ttl", found.ttl_note)]
    if not found.copies:
        return [_row("ttl", "-")] if found.found else []
    return [_row("ttl", _copy_text(copy, now)) for copy in found.copies]


def _copy_text(copy: Copy, now: float) -> str:
    if copy.role.startswith("unreachable"):
        return f"? ({copy.where} {copy.role})"
    left = "no expiry" if copy.ttl is None else f"{copy.ttl:.1f} s left, expires {_iso(now + copy.ttl)}"
    return left if copy.where == "redis" else f"{left} ({copy.role} copy on {copy.where})"


def _tombstone_text(stone: dict[str, Any] | None, now: float) -> str:
    if stone is None:
        return "none (never saved with a tombstone, or gone a day after the session)"
    if stone["state"] == "unreadable":
        return f"unreadable: {stone['raw']!r}"
    text = f"{stone['state']}, written {_when(stone['written'], now)}"
    if stone.get("until") is not None:
        text += f", guaranteed alive until {_when(stone['until'], now)}"
    return text


# -- doctor ------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One line of the doctor's report: ``level`` is ``OK``, ``WARN``, ``FAIL`` or ``INFO``."""

    level: str
    name: str
    message: str


def run_doctor(url: str, settings: Mapping[str, str] | None = None, *, rounds: int = 3) -> list[Check]:
    """Check the store at ``url`` and, if given, the settings (``field -> text``, as in the env).

    :raise ConfigError: the URL is not a store URL, or a setting name is unknown.
    """
    from .stores import open_store

    store = open_store(url, app=app_identity(settings))
    try:
        checks = _probe(store, rounds)
        if checks[0].level != "FAIL":
            checks += _server_checks(store, url)
        return checks + _config_checks(url, settings, store, reachable=checks[0].level != "FAIL")
    finally:
        store.close()


def _probe(store: Store, rounds: int) -> list[Check]:
    """Save, load and delete a temporary key ``rounds`` times; median latency of each."""
    key = f"sessionstore:{{doctor-{secrets.token_hex(8)}}}"  # never a valid session id
    data = b"sessionstore doctor probe " + secrets.token_bytes(16)
    times: dict[str, list[float]] = {"save": [], "load": [], "delete": []}
    try:
        for _ in range(rounds):
            if not _timed(times["save"], lambda: store.save(key, data, 60, expect=None).ok):
                return [Check("FAIL", "connectivity", "the probe save was refused")]
            got = _timed(times["load"], lambda: store.load(key))
            _timed(times["delete"], lambda: store.delete(key))
            if got is None or got.data != data:
                return [Check("FAIL", "connectivity", "the probe key read back wrong or not at all")]
    except StoreError as exc:
        return [Check("FAIL", "connectivity", f"{type(exc).__name__}: {exc}")]
    medians = {op: statistics.median(ts) * 1000 for op, ts in times.items()}
    text = ", ".join(f"{op} {ms:.2f} ms" for op, ms in medians.items()) + f" (median of {rounds})"
    slow = max(medians.values()) > 20
    return [Check("WARN" if slow else "OK", "connectivity", text + (": slow, every request pays this" if slow else ""))]


def _timed(into: list[float], op: Callable[[], Any]) -> Any:
    started = time.perf_counter()
    try:
        return op()
    finally:
        into.append(time.perf_counter() - started)


def _server_checks(store: Store, url: str) -> list[Check]:
    kind = _kind(store)
    if kind == "redis":
        return _redis_checks(store)
    if kind == "memcached":
        return _memcached_checks(store, url)
    if kind == "memory":
        return [Check("WARN", "store", "memory:// lives inside one process: the CLI sees its own, empty "
                                       "memory, and several workers or nodes never share sessions")]
    if kind == "LocalStore":
        local = _base_store(store)
        return [Check("OK", "store", f"local store in {local.path}: {len(local)} session(s), "
                                     f"{_mb(local.file_bytes())} of memory, shared by every process of this host")]
    return [Check("INFO", "server", f"server checks exist for Redis and memcached; none for the {kind} store")]


# -- doctor: Redis ---------------------------------------------------------------------


def _redis_checks(store: Store) -> list[Check]:
    """Version, memory and eviction, clock and persistence of each Redis server (each primary)."""
    checks = []
    for label, client in _redis_servers(_redis(store)):
        for check in (_redis_version, _redis_memory, _redis_clock, _redis_persistence):
            try:
                found = check(client)
            except Exception as exc:  # a check the server refuses (ACL, renamed command)
                found = Check("WARN", check.__name__[7:], f"could not check: {type(exc).__name__}: {exc}")
            checks.append(dataclasses.replace(found, name=f"{found.name}{label}"))
    return checks


def _redis_servers(client: Any) -> list[tuple[str, Any]]:
    """``(label, client)`` per server: the one server, or every primary of a cluster."""
    if hasattr(client, "get_primaries"):
        return [(f" {n.host}:{n.port}", n.redis_connection) for n in client.get_primaries()]
    return [("", client)]


def _redis_version(client: Any) -> Check:
    info = client.info("server")
    role = client.info("replication")
    version = str(info.get("redis_version", "?"))
    text = f"Redis {version}, {info.get('redis_mode', '?')}, {role.get('role')}"
    if role.get("role") == "master":
        text += f", {role.get('connected_slaves', 0)} replica(s)"
    major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else 0
    if major < 7:
        return Check("FAIL", "server", text + ": sessionstore needs Redis 7.0+ (GETEX, SET NX GET)")
    return Check("OK", "server", text)


def _redis_memory(client: Any) -> Check:
    memory, stats = client.info("memory"), client.info("stats")
    policy = _config_get(client, "maxmemory-policy") or str(memory.get("maxmemory_policy", "?"))
    limit, used = int(memory.get("maxmemory", 0)), int(memory.get("used_memory", 0))
    evicted = int(stats.get("evicted_keys", 0))
    text = f"{_mb(used)} used, " + (f"maxmemory {_mb(limit)}" if limit else "no maxmemory limit") + f", policy {policy}"
    if evicted:
        return Check("WARN", "memory", f"{text}: {evicted} key(s) evicted since start; "
                                       "sessions lost that way show as 'evicted'. Raise maxmemory")
    if limit and used > 0.9 * limit:
        return Check("WARN", "memory", f"{text}: over 90% full, eviction is near")
    if limit and policy == "noeviction":
        return Check("WARN", "memory", f"{text}: when full, every save fails instead of evicting")
    if limit and policy.endswith("random"):
        return Check("WARN", "memory", f"{text}: when full, random live sessions are evicted; "
                                       "prefer volatile-ttl or volatile-lru")
    return Check("OK", "memory", text)


def _config_get(client: Any, name: str) -> str | None:
    """``CONFIG GET name``, or None where CONFIG is not allowed (managed Redis, ACLs)."""
    try:
        value = client.config_get(name).get(name)
    except Exception:
        return None
    return value.decode() if isinstance(value, bytes) else value


def _redis_clock(client: Any) -> Check:
    before = time.time()
    seconds, micros = client.time()
    after = time.time()
    return _skew_check(seconds + micros / 1e6 - (before + after) / 2, (after - before) / 2, 1.0)


def _skew_check(skew: float, error: float, limit: float) -> Check:
    text = f"server clock {'ahead of' if skew >= 0 else 'behind'} this machine by {abs(skew):.3f} s (±{error:.3f})"
    if abs(skew) - error > limit:
        return Check("WARN", "clock", text + ": the store expires keys on its clock and the app dates "
                                             "tombstones on its own, so 'expired' and 'evicted' get mixed up")
    return Check("OK", "clock", text)


def _redis_persistence(client: Any) -> Check:
    aof = _config_get(client, "appendonly")
    save = _config_get(client, "save")
    if aof is None:
        aof = "yes" if int(client.info("persistence").get("aof_enabled", 0)) else "no"
    if aof == "yes":
        return Check("OK", "persistence", "appendonly yes: sessions survive a restart")
    if save:
        return Check("OK", "persistence", f"RDB snapshots (save {save!r}): a restart keeps the last snapshot; "
                                          "appendonly yes loses at most a second instead")
    unknown = " (RDB schedule unknown: CONFIG not allowed)" if save is None else ""
    return Check("WARN", "persistence", f"no persistence (appendonly no, save ''){unknown}: a restart loses "
                                        "every session and its tombstone (users then show as unknown-id)")


def _mb(size: float) -> str:
    return f"{size / 1048576:.1f} MB"


# -- doctor: memcached -------------------------------------------------------------------


def _memcached_checks(store: Store, url: str) -> list[Check]:
    """Each node's version, memory and evictions; clock skew; the backup-copy coverage."""
    checks, skews = [], []
    for node in _memcached_nodes(store):
        before = time.time()
        try:
            stats = node.call(lambda wire: wire.stats())
        except Exception as exc:
            checks.append(Check("FAIL", f"node {node.name}", f"unreachable ({_reason(exc)}); "
                                "its sessions are read from their backup copies (relocated)"))
            continue
        # ``time`` is whole seconds, refreshed once a second: the true time is in [time, time + 2).
        skews.append((int(stats.get(b"time", 0)) + 1.0 - (before + time.time()) / 2, node.name))
        checks.append(_memcached_node(node.name, stats))
    if skews:
        skew, name = max(skews, key=lambda s: abs(s[0]))
        found = _skew_check(skew, 1.0, 1.0)
        checks.append(dataclasses.replace(found, message=f"{found.message} (largest, on {name})"))
    return checks + [_memcached_redundancy(url)]


def _reason(exc: BaseException) -> str:
    """``Type: message`` of what really failed (the store wraps socket errors)."""
    real = exc.__cause__ or exc
    return f"{type(real).__name__}: {real}"


def _memcached_node(name: str, stats: Mapping[bytes, Any]) -> Check:
    version = _text(stats.get(b"version", b"?"))
    used, limit = int(stats.get(b"bytes", 0)), int(stats.get(b"limit_maxbytes", 0))
    evictions = int(stats.get(b"evictions", 0))
    text = (f"memcached {version}, up {_span(int(stats.get(b'uptime', 0)))}, {stats.get(b'curr_items', 0)} items, "
            f"{_mb(used)} of {_mb(limit)}, {evictions} evictions")
    major_minor = tuple(int(p) for p in re.findall(r"\d+", version)[:2]) or (0, 0)
    if major_minor < (1, 6):
        return Check("FAIL", f"node {name}", text + ": sessionstore needs memcached 1.6+ (meta commands)")
    if evictions:
        return Check("WARN", f"node {name}", text + ": live items were evicted (LRU); sessions lost that way "
                                                    "show as 'evicted'. Raise -m")
    if limit and used > 0.9 * limit:
        return Check("WARN", f"node {name}", text + ": over 90% full, LRU eviction is near")
    return Check("OK", f"node {name}", text)


def _text(value: Any) -> str:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)


def _memcached_redundancy(url: str) -> Check:
    ring = urlsplit(url).netloc.split(",")
    if len(ring) < 2:
        return Check("WARN", "persistence", "one memcached node and no disk: no backup copy, so a restart "
                                            "or crash of that node loses every session")
    return Check("OK", "persistence", f"{len(ring)} ring nodes, each session also on the next node: one node "
                                      "can restart; two neighbours restarting together lose sessions")


# -- doctor: configuration ------------------------------------------------------------


def settings_from(given: Iterable[str], environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """``SESSIONSTORE_*`` variables overridden by ``--setting key=value`` options, by field name.

    :raise ConfigError: (field ``setting``) a malformed option or an unknown field name.
    """
    known = {f.name for f in dataclasses.fields(Settings)}
    values = {k[13:].lower(): v for k, v in environ.items() if k.upper().startswith("SESSIONSTORE_")
              and k[13:].lower() in known}
    for item in given:
        name, sep, text = item.partition("=")
        name = name.strip().lower()
        if not sep or name not in known:
            fields = ", ".join(sorted(known))
            raise ConfigError("setting", f"{item!r}: expected field=value with a field among {fields}")
        values[name] = text
    return values


def _config_checks(url: str, given: Mapping[str, str] | None, store: Store, reachable: bool) -> list[Check]:
    if not given:
        return [Check("INFO", "config", "no settings given (--setting field=value or SESSIONSTORE_* "
                                        "variables): configuration checks skipped")]
    try:
        settings = Settings.from_mapping({**given, "store": url})
    except ConfigError as exc:
        return [Check("FAIL", "config", str(exc))]
    warnings = startup_warnings(settings, store, f"{settings.key_prefix}{{doctor-config}}")
    if not reachable:  # connectivity already failed; do not say it twice
        warnings = [w for w in warnings if not w.startswith("the store ")]
    checks = [Check("WARN", "config", message) for message in warnings]
    if reachable and settings.sticky:
        checks += [_node_lease_check(settings, store)]
    return checks or [Check("OK", "config", f"{len(given)} setting(s) checked, nothing to warn about")]


def app_identity(given: Mapping[str, str] | None) -> tuple[str, ...]:
    """The application ``local://`` is named after (the settings given, or the defaults)."""
    try:
        return Settings.from_mapping(dict(given or {}), prefix="").app_identity()
    except ConfigError:
        return Settings().app_identity()


def _node_lease_check(settings: Settings, store: Store) -> Check:
    """Is this node's id leased by this host, by another one, or by two (``node-id-collision``)?"""
    from .node_lease import lease_key, read_lease
    from .sticky import node_directory
    from .stores.local import LocalStore

    node, lease = settings.node_id, read_lease(store, settings.key_prefix, settings.node_id or "")
    directory = node_directory(settings)
    local = LocalStore(directory, counted=False) if (directory / "data.mdb").exists() else None
    key = lease_key(settings.key_prefix, node or "")
    host_record = None if local is None else local.load(companion_key(key, "host"))
    host = None if host_record is None else host_record.data.decode()
    if local is not None and local.load(companion_key(key, "collision")) is not None:
        return Check("FAIL", "node id", f"node_id {node!r} is used by two hosts (node-id-collision): give each "
                                        "host its own node_id")
    if lease is None:
        return Check("INFO", "node id", f"no node holds the lease of node_id {node!r} (none running, or it "
                                        "started less than node_lease_interval ago)")
    if host is None:
        return Check("INFO", "node id", f"node_id {node!r} is leased by a host; this host runs no node "
                                        f"{node!r} (no node copy in {directory})")
    if lease["h"] == host:
        return Check("OK", "node id", f"this host holds the lease of node_id {node!r}")
    return Check("WARN", "node id", f"node_id {node!r} is leased by another host while this host has a node "
                                    "copy for it: two hosts share the id, or this host's node stopped and "
                                    "another took the id over")


def render_checks(checks: list[Check]) -> list[str]:
    """The doctor's report: one line per check, then a summary."""
    lines = [f"{c.level:<5} {c.name}: {c.message}" for c in checks]
    counts = {level: sum(c.level == level for c in checks) for level in ("OK", "WARN", "FAIL")}
    lines.append("summary: " + ", ".join(f"{n} {level}" for level, n in counts.items()))
    return lines


# -- stats ---------------------------------------------------------------------------------


def stats_app(manager: Any) -> Callable[[dict, Callable], Iterable[bytes]]:
    """A WSGI app serving ``manager.stats()`` (a :class:`SessionMiddleware` works too).

    JSON by default; Prometheus text with ``?format=prometheus``, or an
    ``Accept`` header asking for ``text/plain`` / OpenMetrics and not for
    JSON (what a Prometheus scraper sends). ``?format=json`` forces JSON.
    """
    manager = getattr(manager, "manager", manager)

    def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD"), ("Content-Type", "text/plain")])
            return [b"GET or HEAD only\n"]
        stats = manager.stats()
        if _wants_prometheus(environ):
            body, ctype = prometheus_text(stats).encode(), "text/plain; version=0.0.4; charset=utf-8"
        else:
            body, ctype = json.dumps(stats, sort_keys=True).encode(), "application/json"
        start_response("200 OK", [("Content-Type", ctype), ("Content-Length", str(len(body))),
                                  ("Cache-Control", "no-store")])
        return [] if method == "HEAD" else [body]

    return app


def _wants_prometheus(environ: dict) -> bool:
    wanted = parse_qs(environ.get("QUERY_STRING", "")).get("format", [""])[0].lower()
    if wanted in ("prometheus", "json"):
        return wanted == "prometheus"
    accept = environ.get("HTTP_ACCEPT", "").lower()
    return "application/json" not in accept and ("text/plain" in accept or "openmetrics" in accept)


def fetch_stats(url: str, timeout: float = 5.0) -> dict[str, Any]:
    """GET ``url`` and parse it as ``manager.stats()`` JSON or Prometheus text.

    :raise ConfigError: (field ``url``) not an http(s) URL.
    :raise OSError: the request failed (``urllib.error.URLError`` is one).
    :raise ValueError: the answer is neither format.
    """
    if urlsplit(url).scheme not in ("http", "https"):
        raise ConfigError("url", f"expected an http:// or https:// URL, got {url!r}")
    request = urllib.request.Request(url, headers={"Accept": "application/json, text/plain;q=0.5"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        text = response.read().decode("utf-8", "replace")
    if text.lstrip().startswith("{"):
        return _normalized(json.loads(text))
    return parse_prometheus(text)


def _normalized(stats: dict[str, Any]) -> dict[str, Any]:
    """A stats dict with every section :func:`render_stats` reads (missing ones empty)."""
    if "requests" not in stats:
        raise ValueError("not sessionstore stats: no 'requests' field")
    causes = stats.get("causes", {})
    return {
        "requests": stats["requests"], "loads": stats.get("loads", {}), "saves": stats.get("saves", 0),
        "skipped_saves": stats.get("skipped_saves", 0), "causes": causes,
        "failovers": causes.get("route-changed", 0), "relocations": causes.get("relocated", 0),
        "conflicts": causes.get("concurrent-update", 0),
        "lock_waits": stats.get("lock_waits", {"count": 0, "seconds": 0.0}),
        "store_ops": stats.get("store_ops", {}),
    }


_SAMPLE = re.compile(r'([A-Za-z_:][\w:]*)(?:\{(\w+)="((?:[^"\\]|\\.)*)"\})?\s+(\S+)')


def parse_prometheus(text: str) -> dict[str, Any]:
    """Rebuild a ``manager.stats()`` dict from :func:`~sessionstore.metrics.prometheus_text` output.

    :raise ValueError: no ``<prefix>_requests_total`` sample in ``text``.
    """
    samples = [m.groups() for m in map(_SAMPLE.match, text.splitlines()) if m and not m.group(0).startswith("#")]
    prefix = next((n[: -len("_requests_total")] for n, *_ in samples if n.endswith("_requests_total")), None)
    if prefix is None:
        raise ValueError("neither sessionstore stats JSON nor Prometheus text with a *_requests_total sample")
    stats: dict[str, Any] = {"loads": {}, "causes": {}, "lock_waits": {"count": 0, "seconds": 0.0}, "store_ops": {}}
    for name, _label, value, number in samples:
        if name.startswith(prefix + "_"):
            _place(stats, name[len(prefix) + 1:], value, float(number))
    return _normalized(stats)


def _place(stats: dict[str, Any], metric: str, label: str | None, number: float) -> None:
    scalar = {"requests_total": "requests", "saves_total": "saves", "skipped_saves_total": "skipped_saves"}
    ops = {"store_ops_total": "count", "store_op_seconds_total": "seconds", "store_op_seconds_max": "max"}
    if metric in scalar:
        stats[scalar[metric]] = int(number)
    elif metric in ("loads_total", "causes_total") and label is not None:
        stats[metric[:-6]][label] = int(number)
    elif metric == "lock_waits_total":
        stats["lock_waits"]["count"] = int(number)
    elif metric == "lock_wait_seconds_total":
        stats["lock_waits"]["seconds"] = number
    elif metric in ops and label is not None:
        entry = stats["store_ops"].setdefault(label, {"count": 0, "seconds": 0.0, "max": 0.0})
        entry[ops[metric]] = int(number) if metric == "store_ops_total" else number


def render_stats(stats: dict[str, Any]) -> list[str]:
    """A compact table of a stats dict (as :func:`fetch_stats` returns)."""
    def counts(mapping: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(mapping.items(), key=lambda kv: (-kv[1], kv[0]))) or "-"

    waits = stats["lock_waits"]
    lines = [
        _row("requests", str(stats["requests"])),
        _row("loads", counts(stats["loads"])),
        _row("saves", f"{stats['saves']} ({stats['skipped_saves']} loaded sessions not rewritten)"),
        _row("causes", counts(stats["causes"])),
        _row("failovers", f"{stats['failovers']}   relocations {stats['relocations']}   "
                          f"conflicts {stats['conflicts']}"),
        _row("lock waits", f"{waits['count']} ({waits['seconds']:.3f} s in total)"),
    ]
    if stats["store_ops"]:
        lines += ["", f"{'store op':<16}{'calls':>9}{'avg ms':>10}{'max ms':>10}"]
        for op, entry in sorted(stats["store_ops"].items()):
            avg = entry["seconds"] / entry["count"] * 1000 if entry["count"] else 0.0
            lines.append(f"{op:<16}{entry['count']:>9}{avg:>10.3f}{entry['max'] * 1000:>10.3f}")
    return lines


# -- migrate -------------------------------------------------------------------------------


def migrate(url: str, out: Callable[[str], None] = print) -> None:
    """Create the SQL store's tables for ``url``; say that other stores need nothing.

    The SQL store is imported only for SQL URLs. Raises what its
    ``migrate(url)`` raises (:class:`~sessionstore.errors.StoreUnavailable`,
    :class:`ConfigError`).
    """
    scheme = url.partition("://")[0].lower()
    if "://" not in url:
        raise ConfigError("store", f"expected a store URL such as 'sqlite:///sessions.db', got {url!r}")
    if scheme.split("+")[0] not in _SQL_SCHEMES:
        out(f"{redact(url)}: only SQL stores need migrating; {scheme}:// has no schema. Nothing to do.")
        return
    try:
        module = importlib.import_module("sessionstore.stores.sql")
    except ImportError as exc:
        raise ConfigError("store", f"{scheme}:// needs an extra: pip install 'sessionstore[sql]' ({exc})") from None
    run = getattr(module, "migrate", None)
    if run is None:
        out("only SQL stores need migrating, and this SQL store has no migrate(): nothing to do.")
        return
    run(url)
    out(f"{redact(url)}: schema is up to date")

