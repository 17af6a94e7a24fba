"""Settings: every knob of sessionstore, validated at construction.

``Settings(**fields)`` checks types and values and raises
:class:`~sessionstore.errors.ConfigError` naming the field and what it
accepts. ``Settings.from_mapping(os.environ, prefix="SESSIONSTORE_")`` parses
strings (``"true"``, ``"1800"``, ``"k1,k2"``) into the same fields.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

from .errors import ConfigError

__all__ = ["Settings"]

_MODES = ("non-sticky", "sticky")
_BACKUPS = ("sync", "async")
_CONFLICTS = ("last-writer-wins", "error")
_DIRTY = ("deep", "always")
_SAMESITE = ("Lax", "Strict", "None")
_SERIALIZERS = ("json", "msgpack", "pickle")
_NODE_ID = re.compile(r"[A-Za-z0-9_]+\Z")
_KEY_PREFIX = re.compile(r"[!-~]{0,100}\Z")  # printable ASCII, no space / control
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Settings:
    """Configuration of a :class:`~sessionstore.SessionMiddleware`.

    Field names, defaults and meanings are those of the public contract
    (``docs/settings.md``). The sticky-mode local cache bounds
    (``local_cache_sessions``, ``local_cache_bytes``), ``node_dir`` (where a
    sticky node keeps its node-wide copy; default: a directory on tmpfs named
    after the application and the node id), ``node_lease_interval`` (seconds
    between renewals of the node-id lease that finds two hosts using one
    node_id) and ``encryption_key`` (encrypt
    stored sessions at rest; first key encrypts, all decrypt) are extensions.
    """

    store: str = "local://"
    mode: str = "non-sticky"
    node_id: str | None = None
    backup: str = "sync"
    locking: str = "none"
    lock_timeout: float = 2.0
    lock_expiry: float = 10.0
    on_conflict: str = "last-writer-wins"
    dirty_check: str = "deep"
    max_inactive: int = 1800
    max_age: int | None = None
    cookie_name: str = "session"
    cookie_domain: str | None = None
    cookie_path: str = "/"
    cookie_secure: bool | str = "auto"
    cookie_httponly: bool = True
    cookie_samesite: str | None = "Lax"
    secret_key: str | list[str] | None = field(default=None, repr=False)
    serializer: str = "json"
    ignore_pattern: str | None = None
    key_prefix: str = "sessionstore:"
    max_size: int = 1_000_000
    debug: bool = False
    environ_key: str = "sessionstore.session"
    encryption_key: str | list[str] | None = field(default=None, repr=False)
    local_cache_sessions: int = 10_000
    local_cache_bytes: int = 256 * 1024 * 1024
    node_dir: str | None = None
    node_lease_interval: float = 30.0

    def __post_init__(self) -> None:
        for check in _CHECKS:
            check(self)

    # -- derived ------------------------------------------------------------

    @property
    def secret_keys(self) -> list[str]:
        """The secret keys, newest (signing) first; empty when none is set."""
        if self.secret_key is None:
            return []
        if isinstance(self.secret_key, str):
            return [self.secret_key]
        return list(self.secret_key)

    @property
    def encryption_keys(self) -> list[str]:
        """The encryption keys, newest (encrypting) first; empty when none is set."""
        if self.encryption_key is None:
            return []
        if isinstance(self.encryption_key, str):
            return [self.encryption_key]
        return list(self.encryption_key)

    @property
    def sticky(self) -> bool:
        return self.mode == "sticky"

    def app_identity(self, *extra: str) -> tuple[str, ...]:
        """Names of this application on its host (``local://`` and node copies are named after them):
        the key prefix, the cookie name and the working directory, then ``extra``."""
        return (self.key_prefix, self.cookie_name, os.getcwd(), *extra)

    def replace(self, **changes: Any) -> "Settings":
        """A copy with ``changes`` applied (validated again)."""
        return replace(self, **changes)

    # -- parsing ------------------------------------------------------------

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], prefix: str = "") -> "Settings":
        """Build settings from ``mapping`` entries named ``prefix + FIELD``.

        Keys are matched case-insensitively after the prefix (``SESSIONSTORE_MAX_INACTIVE``
        sets ``max_inactive``); other keys are ignored. String values are parsed:
        booleans from ``true/false/1/0/yes/no/on/off``, numbers, ``none``/empty for
        optional fields, and comma-separated lists for ``secret_key``.
        """
        names = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        plen = len(prefix)
        for key, raw in mapping.items():
            if not key.upper().startswith(prefix.upper()):
                continue
            name = key[plen:].lower()
            if name in names:
                values[name] = _parse(name, raw) if isinstance(raw, str) else raw
        return cls(**values)


# -- string parsing -------------------------------------------------------------

_INT_FIELDS = {"max_inactive", "max_age", "max_size", "local_cache_sessions", "local_cache_bytes"}
_FLOAT_FIELDS = {"lock_timeout", "lock_expiry", "node_lease_interval"}
_BOOL_FIELDS = {"cookie_httponly", "debug"}
_OPTIONAL = {"node_dir", "node_id", "max_age", "cookie_domain", "secret_key", "ignore_pattern", "encryption_key"}
_SAMESITE_TEXT = {"lax": "Lax", "strict": "Strict", "none": "None", "": None, "null": None, "off": None}


def _parse(name: str, raw: str) -> Any:
    text = raw.strip()
    if name in _OPTIONAL and text.lower() in ("", "none", "null"):
        return None
    if name in _INT_FIELDS:
        return _number(name, text, int)
    if name in _FLOAT_FIELDS:
        return _number(name, text, float)
    if name in _BOOL_FIELDS:
        return _boolean(name, text)
    if name == "cookie_samesite":  # "None" is a SameSite value here, not "no attribute"
        if text.lower() not in _SAMESITE_TEXT:
            raise ConfigError(name, f"expected Lax, Strict, None, or empty for no attribute; got {text!r}")
        return _SAMESITE_TEXT[text.lower()]
    if name == "cookie_secure":
        return "auto" if text.lower() == "auto" else _boolean(name, text)
    if name in ("secret_key", "encryption_key"):
        keys = [k.strip() for k in text.split(",") if k.strip()]
        return keys[0] if len(keys) == 1 else keys
    return text


def _number(name: str, text: str, kind: type) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(name, f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None


def _boolean(name: str, text: str) -> bool:
    low = text.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ConfigError(name, f"expected true/false, got {text!r}")


# -- validation -----------------------------------------------------------------


def _one_of(name: str, allowed: tuple[Any, ...]):
    def check(s: Settings) -> None:
        value = getattr(s, name)
        if value not in allowed:
            raise ConfigError(name, f"expected one of {', '.join(map(repr, allowed))}; got {value!r}")

    return check


def _typed(name: str, kinds: tuple[type, ...], *, minimum: float | None = None, optional: bool = False):
    def check(s: Settings) -> None:
        value = getattr(s, name)
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise ConfigError(name, f"expected {'/'.join(k.__name__ for k in kinds)}, got {value!r}")
        if minimum is not None and value < minimum:
            raise ConfigError(name, f"must be >= {minimum}, got {value!r}")

    return check


def _check_store(s: Settings) -> None:
    if not isinstance(s.store, str) or "://" not in s.store:
        raise ConfigError("store", f"expected a store URL such as 'memory://' or 'redis://host:6379/0', got {s.store!r}")


def _check_node(s: Settings) -> None:
    if s.node_id is not None and (not isinstance(s.node_id, str) or not _NODE_ID.match(s.node_id)):
        raise ConfigError("node_id", f"expected [A-Za-z0-9_]+, got {s.node_id!r}")
    if s.sticky and s.node_id is None:
        raise ConfigError("node_id", "sticky mode needs a node_id (this node's route, like Tomcat's jvmRoute)")


def _check_locking(s: Settings) -> None:
    value = s.locking
    if not isinstance(value, str):
        raise ConfigError("locking", f"expected 'none', 'all', 'auto' or 'uri:<regex>', got {value!r}")
    if value.startswith("uri:"):
        try:
            re.compile(value[4:])
        except re.error as exc:
            raise ConfigError("locking", f"bad regex in {value!r}: {exc}") from None
    elif value not in ("none", "all", "auto"):
        raise ConfigError("locking", f"expected 'none', 'all', 'auto' or 'uri:<regex>', got {value!r}")


def _check_cookie(s: Settings) -> None:
    if not isinstance(s.cookie_name, str) or not re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", s.cookie_name):
        raise ConfigError("cookie_name", f"expected a cookie token (letters, digits, -_.), got {s.cookie_name!r}")
    if s.cookie_secure not in (True, False, "auto"):
        raise ConfigError("cookie_secure", f"expected 'auto', True or False, got {s.cookie_secure!r}")
    if s.cookie_samesite is not None and s.cookie_samesite not in _SAMESITE:
        raise ConfigError("cookie_samesite", f"expected one of 'Lax', 'Strict', 'None' or None, got {s.cookie_samesite!r}")
    if s.cookie_samesite == "None" and s.cookie_secure is False:
        raise ConfigError("cookie_samesite", "SameSite=None needs a Secure cookie (browsers reject it otherwise); set cookie_secure to True or 'auto'")
    if not isinstance(s.cookie_path, str) or not s.cookie_path.startswith("/"):
        raise ConfigError("cookie_path", f"expected a path starting with '/', got {s.cookie_path!r}")


def _check_keys(name: str, keys: object) -> None:
    if keys is None:
        return
    items = [keys] if isinstance(keys, str) else keys
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(k, str) and k for k in items):
        raise ConfigError(name, "expected a non-empty string or a non-empty list of non-empty strings")


def _check_secret(s: Settings) -> None:
    _check_keys("encryption_key", s.encryption_key)
    keys = s.secret_key
    if keys is None:
        if s.serializer == "pickle":
            raise ConfigError("serializer", "pickle needs a secret_key: payloads are signed and verified before unpickling")
        return
    items = [keys] if isinstance(keys, str) else keys
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(k, str) and k for k in items):
        raise ConfigError("secret_key", "expected a non-empty string or a non-empty list of non-empty strings")


def _check_patterns(s: Settings) -> None:
    if s.ignore_pattern is not None:
        try:
            re.compile(s.ignore_pattern)
        except (re.error, TypeError) as exc:
            raise ConfigError("ignore_pattern", f"not a valid regex: {exc}") from None
    if not isinstance(s.key_prefix, str) or not _KEY_PREFIX.match(s.key_prefix):
        raise ConfigError("key_prefix", f"expected up to 100 printable ASCII characters without spaces, got {s.key_prefix!r}")
    if not isinstance(s.environ_key, str) or not s.environ_key:
        raise ConfigError("environ_key", "expected a non-empty string")


_CHECKS = (
    _check_store,
    _one_of("mode", _MODES),
    _check_node,
    _one_of("backup", _BACKUPS),
    _check_locking,
    _typed("lock_timeout", (int, float), minimum=0),
    _typed("lock_expiry", (int, float), minimum=0.1),
    _one_of("on_conflict", _CONFLICTS),
    _one_of("dirty_check", _DIRTY),
    _typed("max_inactive", (int,)),
    _typed("max_age", (int,), minimum=1, optional=True),
    _check_cookie,
    _check_secret,
    _one_of("serializer", _SERIALIZERS),
    _check_patterns,
    _typed("max_size", (int,), minimum=64),
    _one_of("debug", (True, False)),
    _one_of("cookie_httponly", (True, False)),
    _typed("local_cache_sessions", (int,), minimum=1),
    _typed("local_cache_bytes", (int,), minimum=1024),
    _typed("node_dir", (str,), optional=True),
    _typed("node_lease_interval", (int, float), minimum=0.5),
)
