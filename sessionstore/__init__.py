"""sessionstore: distributed server-side sessions for WSGI applications.

::

    from sessionstore import SessionMiddleware, Settings, get_session

    app = SessionMiddleware(wsgi_app, Settings(store="redis://127.0.0.1:6379/0", secret_key="..."))

See ``docs/`` for the settings, the request flow and the stores.
"""

from .errors import (
    ConfigError,
    ConflictError,
    CorruptPayload,
    LockTimeout,
    SerializationError,
    SessionStoreError,
    SessionTooLarge,
    StoreError,
    StoreUnavailable,
)
from .events import SessionEvent
from .manager import SessionManager
from .middleware import SessionMiddleware, get_session
from .session import Session
from .settings import Settings

__all__ = [
    "SessionMiddleware",
    "Settings",
    "Session",
    "SessionManager",
    "SessionEvent",
    "get_session",
    "ConfigError",
    "ConflictError",
    "CorruptPayload",
    "LockTimeout",
    "SerializationError",
    "SessionStoreError",
    "SessionTooLarge",
    "StoreError",
    "StoreUnavailable",
]

__version__ = "0.1.0"
