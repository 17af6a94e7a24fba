"""Session stores, chosen by URL scheme.

=====================================  =========================================
``local://``                           :class:`~.local.LocalStore` (every process
                                       of one host; the default)
``memory://``                          :class:`~.memory.MemoryStore` (one process)
``redis://``, ``rediss://``,           :class:`~.redis.RedisStore`
``redis+sentinel://``, ``redis+cluster://``
``memcached://``                       :class:`~.memcached.MemcachedStore`
``sqlite://``, ``postgresql://``,      :class:`~.sql.SQLStore`
``mysql://``
=====================================  =========================================
"""

from __future__ import annotations

import importlib
import time
from typing import Callable, Sequence

from ..errors import ConfigError
from .base import ANY, NO_LOAD, LockingStore, Record, SaveResult, Store

__all__ = ["open_store", "Store", "LockingStore", "Record", "SaveResult", "ANY", "NO_LOAD"]

_BACKENDS = {
    "local": ("local", "LocalStore", None),
    "memory": ("memory", "MemoryStore", None),
    "redis": ("redis", "RedisStore", "redis"),
    "rediss": ("redis", "RedisStore", "redis"),
    "redis+sentinel": ("redis", "RedisStore", "redis"),
    "redis+cluster": ("redis", "RedisStore", "redis"),
    "memcached": ("memcached", "MemcachedStore", "memcached"),
    "sqlite": ("sql", "SQLStore", "sql"),
    "postgresql": ("sql", "SQLStore", "sql"),
    "postgres": ("sql", "SQLStore", "sql"),
    "mysql": ("sql", "SQLStore", "sql"),
    "mariadb": ("sql", "SQLStore", "sql"),
}


def open_store(url: str, *, clock: Callable[[], float] = time.time, app: Sequence[str] = ()) -> Store:
    """The store for ``url``. Unknown schemes and missing extras raise ConfigError.

    ``app`` names the application (``local://`` without a path keeps one
    directory per name, so two applications on one host stay apart).
    """
    scheme = url.partition("://")[0].lower()
    try:
        module_name, class_name, extra = _BACKENDS[scheme]
    except KeyError:
        raise ConfigError(
            "store", f"unknown scheme {scheme!r}; expected one of {', '.join(sorted(_BACKENDS))}"
        ) from None
    if module_name == "memory":
        from .memory import MemoryStore

        return MemoryStore(clock=clock)
    if module_name == "local":
        from .local import LocalStore

        return LocalStore.from_url(url, clock=clock, app=app)
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ImportError as exc:
        raise ConfigError(
            "store", f"{scheme}:// needs an extra: pip install 'sessionstore[{extra}]' ({exc})"
        ) from None
    return getattr(module, class_name).from_url(url, clock=clock)
