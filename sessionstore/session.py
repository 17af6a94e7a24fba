"""The session object the application sees: a lazy, access-tracking mapping.

Nothing is loaded until the application first touches the session. Each
attribute is deserialized on first access and remembered; at the end of the
request only those attributes are serialized again and compared, byte for
byte, with what was loaded. An attribute never handed to the application
cannot have changed, so it is neither decoded nor re-encoded, and a change
made in place (``session["cart"]["items"].append(1)``) is seen like an
assignment.

A :class:`Session` is one request's view; the data lives in a
:class:`SessionState` of its own (parallel requests of one session each
have theirs, and their saves merge per attribute, in both modes).
"""

from __future__ import annotations

import threading
from collections.abc import ItemsView, KeysView, ValuesView
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, MutableMapping

from .debug import log_id
from .errors import CorruptPayload, SerializationError
from .payload import Meta, Payload

if TYPE_CHECKING:  # pragma: no cover
    from .debug import RequestRecord
    from .manager import SessionManager

__all__ = ["Session", "SessionState", "Changes"]


@dataclass(slots=True)
class Changes:
    """What requests did to a session since it was loaded or last saved."""

    #: name -> new serialized blob, for attributes whose content changed.
    written: dict[str, bytes] = field(default_factory=dict)
    #: names removed (that existed when loaded).
    removed: set[str] = field(default_factory=set)
    #: changed attributes that were never assigned: mutated in place.
    mutated: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.written or self.removed)


class SessionState:
    """One session's data: what was loaded, and what requests did to it since."""

    __slots__ = (
        "id", "is_new", "meta", "payload", "version", "values", "assigned", "removed",
        "forced", "meta_changed", "stale_ids", "lock",
    )

    def __init__(self) -> None:
        self.stale_ids: list[tuple[str, str, bool]] = []  # (old id, reason, had index entries)
        self.lock = threading.RLock()
        self.reset()

    def reset(self) -> None:
        self.id: str | None = None
        self.is_new = True
        self.meta: Meta | None = None
        self.payload: Payload | None = None
        self.version: Any = None
        self.values: dict[str, Any] = {}
        self.assigned: set[str] = set()
        self.removed: set[str] = set()
        self.forced = False
        self.meta_changed = False

    def assigned_values(self) -> dict[str, Any]:
        """The attributes requests assigned since the last load or save, with their values."""
        return {name: self.values[name] for name in self.assigned if name in self.values}

    def assign(self, values: dict[str, Any]) -> None:
        for name, value in values.items():
            self.values[name] = value
            self.assigned.add(name)

    def names(self) -> list[str]:
        names = list(self.values)
        if self.payload is not None:
            values, removed = self.values, self.removed
            names.extend(n for n in self.payload.names() if n not in values and n not in removed)
        return names

    def changes(self, dumps: Callable[[Any, str], bytes]) -> Changes:
        """Serialize the touched attributes and diff them against what was loaded.

        Raises :class:`~sessionstore.errors.SerializationError` naming the
        attribute whose value cannot be serialized (and the offending type).
        """
        changes = Changes(removed=set(self.removed))
        payload = self.payload
        for name, value in self.values.items():
            blob = dumps(value, name)
            if payload is not None and name not in self.removed:
                span = payload.span(name)
                if span is not None:
                    if payload.data[span[0]:span[1]] == blob:
                        continue
                    if name not in self.assigned:
                        changes.mutated.append(name)
            changes.written[name] = blob
        return changes

    def saved(self, payload: Payload, version: Any) -> None:
        """After a successful write the state reflects what is stored.

        ``is_new`` stays as it was: the client learns of a new session only
        from this response.
        """
        self.payload = payload
        self.meta = payload.meta
        self.version = version
        self.assigned.clear()
        self.removed.clear()
        self.forced = False
        self.meta_changed = False


class Session(MutableMapping[str, Any]):
    """A server-side session: a ``MutableMapping[str, Any]`` with Tomcat's extras.

    ``id``, ``is_new``, ``created``, ``last_accessed`` and ``max_inactive``
    load the session if it is not loaded yet, like any data access.
    """

    __slots__ = ("_manager", "_cookie", "_record", "_path", "_loaded", "_requested_id", "_lock", "_s",
                 "__weakref__")

    def __init__(self, manager: "SessionManager", cookie: str | None, record: "RequestRecord",
                 path: str = "") -> None:
        self._manager = manager
        self._cookie = cookie  # raw cookie value, verified on first touch
        self._record = record
        self._path = path  # the request path (lock policy)
        self._loaded = False
        self._requested_id: str | None = None  # the verified id the client sent
        self._lock: tuple[str, str] | None = None  # (session key, owner token) while locked
        self._s = SessionState()

    # -- loading --------------------------------------------------------------

    def _ensure(self) -> SessionState:
        if not self._loaded:
            self._manager._load(self)
        return self._s

    @property
    def loaded(self) -> bool:
        """Whether the application has touched (and so loaded) the session."""
        return self._loaded

    # -- Tomcat-style attributes ---------------------------------------------------

    @property
    def id(self) -> str:
        """The session id (``<random>.<node>`` in sticky mode)."""
        return self._ensure().id  # type: ignore[return-value]

    @property
    def is_new(self) -> bool:
        """True until the session has been stored once and sent back by the client."""
        return self._ensure().is_new

    @property
    def created(self) -> float:
        """Creation time, epoch seconds."""
        return self._ensure().meta.created  # type: ignore[union-attr]

    @property
    def last_accessed(self) -> float:
        """Time of the last save of this session (epoch seconds).

        Read-only requests only slide the store expiry and do not rewrite the
        session, so this is the time of the last request that changed it.
        """
        return self._ensure().meta.last_accessed  # type: ignore[union-attr]

    @property
    def max_inactive(self) -> int:
        """Idle timeout of this session in seconds; ``<= 0`` never expires."""
        return self._ensure().meta.max_inactive  # type: ignore[union-attr]

    @max_inactive.setter
    def max_inactive(self, seconds: int) -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, int):
            raise TypeError("max_inactive must be an int (seconds)")
        s = self._ensure()
        if seconds != s.meta.max_inactive:  # type: ignore[union-attr]
            s.meta.max_inactive = seconds  # type: ignore[union-attr]
            s.meta_changed = True

    def invalidate(self) -> None:
        """Destroy this session now (logout).

        The stored session is deleted at the end of the request and the
        ``destroyed`` listeners fire. The object becomes a new, empty session:
        data written to it afterwards starts a fresh session with a new id.
        """
        self._ensure()
        self._manager._renew(self, keep_data=False)

    def rotate(self) -> None:
        """Give this session a new id, keeping its data (call it at login).

        The old id is deleted from the store at the end of the request and
        loads nothing afterwards; ``id_changed`` listeners fire.
        """
        self._ensure()
        self._manager._renew(self, keep_data=True)

    @property
    def stored(self) -> bool:
        """Whether the store holds this session under its current id."""
        return self._loaded and self._s.version is not None

    def has_changes(self) -> bool:
        """Whether committing now would write: changed content (deep check), a new id,
        a forced save, or changed metadata. An attribute that cannot be serialized
        counts as a change (saving it will fail and say why)."""
        if not self._loaded:
            return False
        s = self._s
        with s.lock:
            if s.forced or s.meta_changed or s.stale_ids:
                return True
            try:
                return bool(s.changes(self._manager.serializer.dumps))
            except SerializationError:
                return True
            except CorruptPayload as exc:  # the attribute index: a new session now
                self._manager._corrupt(self, exc)
        return self.has_changes()

    def mark_modified(self) -> None:
        """Save this session at the end of the request even if nothing changed."""
        self._ensure().forced = True

    def index(self, name: str, value: str) -> None:
        """Record an external id for this session (e.g. a CAS service ticket).

        ``manager.find_by_index(name, value)`` and ``manager.invalidate_by_index``
        then find this session from any node.
        """
        if not isinstance(name, str) or not isinstance(value, str) or not name or not value:
            raise TypeError("index name and value must be non-empty strings")
        s = self._ensure()
        values = s.meta.index.setdefault(name, [])  # type: ignore[union-attr]
        if value not in values:
            values.append(value)
            s.meta_changed = True

    # -- mapping --------------------------------------------------------------

    def __getitem__(self, name: str) -> Any:
        s = self._ensure()
        try:
            return s.values[name]
        except KeyError:
            pass
        payload = s.payload
        if payload is None or name in s.removed:
            raise KeyError(name)
        try:
            span = payload.span(name)
            if span is None:
                raise KeyError(name)
            value = self._manager._decode_attribute(s, name, payload.data[span[0]:span[1]])
        except CorruptPayload as exc:
            self._manager._corrupt(self, exc)  # a new session, which holds no such attribute
            raise KeyError(name) from None
        s.values[name] = value
        return value

    def get(self, name: str, default: Any = None) -> Any:
        """``session[name]``, or ``default`` if the session has no such attribute (also when
        it does not decode: the session is a new one then)."""
        if name not in self:  # no KeyError raised and caught on a miss
            return default
        try:
            return self[name]
        except KeyError:
            return default

    def __setitem__(self, name: str, value: Any) -> None:
        if not isinstance(name, str):
            raise TypeError(f"session attribute names are str, got {type(name).__name__}")
        s = self._ensure()
        s.values[name] = value
        s.assigned.add(name)
        s.removed.discard(name)

    def __delitem__(self, name: str) -> None:
        if name not in self:
            raise KeyError(name)
        s = self._s  # the membership test may have replaced a damaged session
        try:
            stored = s.payload is not None and name in s.payload
        except CorruptPayload as exc:
            self._manager._corrupt(self, exc)
            s, stored = self._s, False
        s.values.pop(name, None)
        if stored:
            s.removed.add(name)

    def __contains__(self, name: object) -> bool:
        s = self._ensure()
        if name in s.values:
            return True
        payload = s.payload
        if payload is None or name in s.removed:
            return False
        try:
            return name in payload
        except CorruptPayload as exc:  # a damaged index: the same fallback as a damaged value
            self._manager._corrupt(self, exc)
            return name in self._s.values

    def _names(self) -> list[str]:
        """Every attribute name (the new session's, if the attribute index does not decode)."""
        s = self._ensure()
        try:
            return s.names()
        except CorruptPayload as exc:
            self._manager._corrupt(self, exc)
            return self._s.names()

    def _decoded(self) -> dict[str, Any]:
        """Every attribute decoded (so all of them touched): the whole session, or, when an
        attribute does not decode, the new session that replaced it (never a part of each)."""
        s = self._ensure()
        if s.payload is not None:
            try:
                self._manager._decode_all(s)
            except CorruptPayload as exc:
                self._manager._corrupt(self, exc)
        return dict(self._s.values)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __bool__(self) -> bool:
        """Whether the session holds any attribute; without parsing the index when it can."""
        s = self._ensure()
        if s.values:
            return True
        if s.payload is None or not s.payload.has_entries:
            return False
        return not s.removed or bool(self._names())

    def keys(self) -> KeysView[str]:
        """The attribute names. Iterating the view decodes every attribute first, so that
        ``dict(session)`` (which lists the keys, then reads each) sees one consistent session."""
        return _Keys(self)

    def items(self) -> ItemsView[str, Any]:
        return _Items(self)

    def values(self) -> ValuesView[Any]:
        return _Values(self)

    def copy(self) -> dict[str, Any]:
        """A plain dict of every attribute (marks them all touched)."""
        return self._decoded()

    def clear(self) -> None:
        for name in self._names():
            del self[name]

    def __repr__(self) -> str:
        if not self._loaded:
            return "<Session (not loaded)>"
        s = self._s
        return f"<Session {log_id(s.id)} new={s.is_new} keys={self._names()!r}>"

    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        return self is other


class _Keys(KeysView):
    """``session.keys()``: live like a dict's view; iterating it decodes the session whole first."""

    __slots__ = ()

    def __iter__(self) -> Iterator[str]:
        return iter(self._mapping._decoded())


class _Items(ItemsView):
    """``session.items()``: pairs of one consistent session (see :meth:`Session._decoded`)."""

    __slots__ = ()

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return iter(self._mapping._decoded().items())


class _Values(ValuesView):
    """``session.values()``: values of one consistent session (see :meth:`Session._decoded`)."""

    __slots__ = ()

    def __iter__(self) -> Iterator[Any]:
        return iter(self._mapping._decoded().values())
