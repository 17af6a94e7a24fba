"""Test-wide fixtures. Server fixtures live in tests/servers/*_fixtures.py."""

pytest_plugins = [
    "tests.servers.redis_fixtures",
    "tests.servers.memcached_fixtures",
    "tests.servers.sql_fixtures",
]
