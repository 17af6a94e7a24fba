"""PostgreSQL and MariaDB servers for the SQL store tests.

The servers are the system ones on their standard ports (PostgreSQL 5432,
trust auth; MariaDB 3306, root without password), database ``test``. A
server that is down is started (``pg_ctlcluster`` / ``start-stop-daemon``)
and waited for; if it still cannot be reached the fixture fails, it never
skips.

Tests put their tables under the per-run prefix given by ``sql_table``
(``ss_test_<random>``, optionally with a suffix); every table with that
prefix is dropped when the run ends.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from typing import Callable, Iterator

import pytest
from sqlalchemy import MetaData, create_engine

__all__ = ["postgres_url", "mariadb_url", "sql_table"]

PG_PORT = 5432
MARIADB_PORT = 3306
_HOST = "127.0.0.1"
_DATABASE = "test"
_START_TIMEOUT = 30.0
_TABLE_PREFIX = "ss_test_" + secrets.token_hex(4)
_DRIVERS = {"postgresql": "postgresql+psycopg", "mysql": "mysql+pymysql"}


@pytest.fixture(scope="session")
def sql_table() -> str:
    """This run's table name; also the prefix of every table the tests create."""
    return _TABLE_PREFIX


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """``postgresql://<user>@127.0.0.1:5432/test`` of a running server."""
    url = _serve("PostgreSQL", _postgres_url, _start_postgres)
    yield url
    _drop_test_tables(url)


@pytest.fixture(scope="session")
def mariadb_url() -> Iterator[str]:
    """``mysql://root@127.0.0.1:3306/test`` of a running MariaDB."""
    url = _serve("MariaDB", _mariadb_url, _start_mariadb)
    yield url
    _drop_test_tables(url)


# -- reaching and starting the servers -----------------------------------------


def _serve(name: str, probe: Callable[[], str], start: Callable[[], None]) -> str:
    """``probe()``'s URL, starting the server and waiting for it if needed."""
    try:
        return probe()
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable yet"
        first = exc
    start()
    deadline = time.monotonic() + _START_TIMEOUT
    while True:
        try:
            return probe()
        except Exception as exc:  # noqa: BLE001
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{name} on {_HOST} is not reachable ({first}); started it and waited "
                    f"{_START_TIMEOUT:.0f}s: {exc}"
                ) from exc
            time.sleep(0.25)


def _postgres_url() -> str:
    """Connect as root, else postgres; create database ``test`` if it is missing."""
    import psycopg

    errors = []
    for user in ("root", "postgres"):
        conninfo = f"host={_HOST} port={PG_PORT} user={user} connect_timeout=2"
        try:
            try:
                psycopg.connect(f"{conninfo} dbname={_DATABASE}").close()
            except psycopg.OperationalError as exc:
                if f'database "{_DATABASE}" does not exist' not in str(exc):
                    raise
                with psycopg.connect(f"{conninfo} dbname=postgres", autocommit=True) as conn:
                    conn.execute(f"CREATE DATABASE {_DATABASE}")
            return f"postgresql://{user}@{_HOST}:{PG_PORT}/{_DATABASE}"
        except psycopg.Error as exc:
            errors.append(f"{user}: {exc}")
    raise RuntimeError("; ".join(errors))


def _mariadb_url() -> str:
    import pymysql

    conn = pymysql.connect(host=_HOST, port=MARIADB_PORT, user="root", password="", connect_timeout=2)
    try:
        with conn.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE IF NOT EXISTS {_DATABASE}")
    finally:
        conn.close()
    return f"mysql://root@{_HOST}:{MARIADB_PORT}/{_DATABASE}"


def _start_postgres() -> None:
    for version in sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []:
        _run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"])


def _start_mariadb() -> None:
    if not os.path.isdir("/run/mysqld"):
        _run(["install", "-d", "-o", "mysql", "-g", "mysql", "/run/mysqld"])
    _run(["start-stop-daemon", "--start", "--oknodo", "--background", "--exec", "/usr/sbin/mariadbd"])


def _run(argv: list[str]) -> None:
    """Run a start command; its failure shows up as the server staying unreachable."""
    try:
        subprocess.run(argv, check=False, timeout=_START_TIMEOUT, capture_output=True)
    except (OSError, subprocess.TimeoutExpired):
        pass


def _drop_test_tables(url: str) -> None:
    """Drop every table whose name starts with this run's prefix."""
    scheme, rest = url.split("://", 1)
    engine = create_engine(f"{_DRIVERS[scheme]}://{rest}")
    try:
        metadata = MetaData()
        metadata.reflect(engine, only=lambda name, _meta: name.startswith(_TABLE_PREFIX))
        metadata.drop_all(engine)
    finally:
        engine.dispose()
