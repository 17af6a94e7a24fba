from __future__ import annotations

import pytest

from sessionstore import ConfigError, Settings


def test_defaults_follow_the_contract():
    s = Settings()
    assert (s.store, s.mode, s.node_id, s.backup, s.locking) == ("local://", "non-sticky", None, "sync", "none")
    assert (s.lock_timeout, s.lock_expiry, s.on_conflict, s.dirty_check) == (2.0, 10.0, "last-writer-wins", "deep")
    assert (s.max_inactive, s.max_age, s.cookie_name, s.cookie_domain, s.cookie_path) == (1800, None, "session", None, "/")
    assert (s.cookie_secure, s.cookie_httponly, s.cookie_samesite) == ("auto", True, "Lax")
    assert (s.secret_key, s.serializer, s.ignore_pattern, s.key_prefix) == (None, "json", None, "sessionstore:")
    assert (s.max_size, s.debug, s.environ_key) == (1_000_000, False, "sessionstore.session")


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"mode": "sticky"}, "node_id"),
        ({"mode": "both"}, "mode"),
        ({"node_id": "n-1"}, "node_id"),
        ({"backup": "later"}, "backup"),
        ({"locking": "sometimes"}, "locking"),
        ({"locking": "uri:("}, "locking"),
        ({"node_dir": 3}, "node_dir"),
        ({"lock_timeout": -1}, "lock_timeout"),
        ({"on_conflict": "panic"}, "on_conflict"),
        ({"dirty_check": "shallow"}, "dirty_check"),
        ({"max_inactive": "30"}, "max_inactive"),
        ({"max_age": 0}, "max_age"),
        ({"cookie_name": "a b"}, "cookie_name"),
        ({"cookie_secure": "yes"}, "cookie_secure"),
        ({"cookie_samesite": "lax"}, "cookie_samesite"),
        ({"cookie_samesite": "None", "cookie_secure": False}, "cookie_samesite"),
        ({"cookie_path": "x"}, "cookie_path"),
        ({"secret_key": ""}, "secret_key"),
        ({"secret_key": []}, "secret_key"),
        ({"serializer": "yaml"}, "serializer"),
        ({"serializer": "pickle"}, "serializer"),
        ({"ignore_pattern": "("}, "ignore_pattern"),
        ({"key_prefix": "has space"}, "key_prefix"),
        ({"max_size": 10}, "max_size"),
        ({"store": "localhost:6379"}, "store"),
        ({"debug": "yes"}, "debug"),
    ],
)
def test_bad_values_name_the_field(fields, field):
    with pytest.raises(ConfigError) as info:
        Settings(**fields)
    assert info.value.field == field
    assert str(info.value).startswith(field + ":")


def test_from_mapping_parses_strings():
    env = {
        "SESSIONSTORE_STORE": "redis://127.0.0.1:6379/0",
        "SESSIONSTORE_MODE": "sticky",
        "SESSIONSTORE_NODE_ID": "n1",
        "SESSIONSTORE_MAX_INACTIVE": "600",
        "SESSIONSTORE_MAX_AGE": "none",
        "SESSIONSTORE_DEBUG": "true",
        "SESSIONSTORE_COOKIE_SECURE": "auto",
        "SESSIONSTORE_COOKIE_HTTPONLY": "0",
        "SESSIONSTORE_LOCK_TIMEOUT": "0.5",
        "SESSIONSTORE_SECRET_KEY": "new, old",
        "PATH": "/usr/bin",
    }
    s = Settings.from_mapping(env, prefix="SESSIONSTORE_")
    assert s.store == "redis://127.0.0.1:6379/0" and s.mode == "sticky" and s.node_id == "n1"
    assert s.max_inactive == 600 and s.max_age is None and s.debug is True
    assert s.cookie_secure == "auto" and s.cookie_httponly is False and s.lock_timeout == 0.5
    assert s.secret_keys == ["new", "old"]


def test_from_mapping_bad_value_names_field():
    with pytest.raises(ConfigError, match="max_inactive"):
        Settings.from_mapping({"SESSIONSTORE_MAX_INACTIVE": "soon"}, prefix="SESSIONSTORE_")
    with pytest.raises(ConfigError, match="debug"):
        Settings.from_mapping({"X_DEBUG": "maybe"}, prefix="X_")


def test_from_mapping_accepts_typed_values():
    s = Settings.from_mapping({"max_inactive": 60, "debug": True})
    assert s.max_inactive == 60 and s.debug


def test_unknown_store_scheme_is_a_config_error():
    from sessionstore import SessionMiddleware

    with pytest.raises(ConfigError, match="store"):
        SessionMiddleware(lambda e, s: [], store="mongodb://x")


def test_samesite_none_from_text_is_the_value_none():
    s = Settings.from_mapping({"X_COOKIE_SAMESITE": "None", "X_COOKIE_SECURE": "true"}, prefix="X_")
    assert s.cookie_samesite == "None"
    assert Settings.from_mapping({"X_COOKIE_SAMESITE": ""}, prefix="X_").cookie_samesite is None
    assert Settings.from_mapping({"X_COOKIE_SAMESITE": "strict"}, prefix="X_").cookie_samesite == "Strict"
