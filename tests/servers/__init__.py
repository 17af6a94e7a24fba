"""Real server processes for the tests: started on free loopback ports, stopped by pid.

Nothing here is a fake: each helper starts the real Debian binary
(redis-server, redis-sentinel, memcached, ...). A missing binary is a test
failure, never a skip: install them with ``scripts/test``.
"""
