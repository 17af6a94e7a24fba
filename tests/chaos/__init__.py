"""Chaos run: real app nodes, a real balancer, real stores, killed and restarted mid-load.

``python -m tests.chaos.chaos --help``; :mod:`tests.chaos.test_chaos` runs it under pytest.
"""
