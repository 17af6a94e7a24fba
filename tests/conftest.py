"""Test-wide fixtures. Server fixtures live in tests/servers/*_fixtures.py."""

import os
import shutil
import tempfile

pytest_plugins = [
    "tests.servers.redis_fixtures",
    "tests.servers.memcached_fixtures",
    "tests.servers.sql_fixtures",
]

# local:// stores and sticky node copies of this test session live here (on tmpfs when there is one),
# not among a developer's real ones; child processes (nodes, gunicorn) inherit it.
_LOCAL_ROOT = tempfile.mkdtemp(prefix="sessionstore-tests-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
os.environ["SESSIONSTORE_LOCAL_DIR"] = _LOCAL_ROOT


def pytest_unconfigure(config):
    shutil.rmtree(_LOCAL_ROOT, ignore_errors=True)
