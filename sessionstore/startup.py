"""Checks run once when a middleware starts; each problem is logged as a warning.

They catch what would otherwise show up later as sessions that "disappear":
cookie settings browsers reject, a store that cannot be reached, a missing
secret key.
"""

from __future__ import annotations

import logging

from .errors import StoreError
from .settings import Settings
from .stores.base import Store

__all__ = ["startup_warnings", "log_startup_warnings"]

_log = logging.getLogger("sessionstore")


def startup_warnings(settings: Settings, store: Store, probe_key: str) -> list[str]:
    """Everything worth a warning about this configuration, reaching the store once."""
    warnings = _cookie_warnings(settings)
    if not settings.secret_keys:
        warnings.append("no secret_key: a random per-process key signs cookies, so sessions do not "
                        "survive a restart and are not shared between nodes")
    if settings.store.startswith("memory://") and settings.mode == "non-sticky":
        warnings.append("store memory:// keeps sessions in this process only: fine for one process, "
                        "not for several workers or nodes")
    try:
        store.load(probe_key)
    except StoreError as exc:
        warnings.append(f"the store {_redact(settings.store)} cannot be reached: {exc}")
    return warnings


def _cookie_warnings(s: Settings) -> list[str]:
    found = []
    name = s.cookie_name
    if name.startswith("__Host-") and (s.cookie_secure is not True or s.cookie_domain or s.cookie_path != "/"):
        found.append("a __Host- cookie needs cookie_secure=True, no cookie_domain and cookie_path='/'; "
                     "browsers reject it otherwise")
    elif name.startswith("__Secure-") and s.cookie_secure is not True:
        found.append("a __Secure- cookie needs cookie_secure=True; browsers reject it otherwise")
    if s.cookie_samesite == "None" and s.cookie_secure == "auto":
        found.append("SameSite=None: on plain http the cookie is not Secure and browsers reject it")
    if s.cookie_domain and s.cookie_domain.strip(".").count(".") == 0 and s.cookie_domain != "localhost":
        found.append(f"cookie_domain={s.cookie_domain!r} has no dot: browsers reject single-label domains "
                     "(except localhost)")
    return found


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest


def log_startup_warnings(warnings: list[str]) -> None:
    for message in warnings:
        _log.warning("sessionstore: %s", message)
