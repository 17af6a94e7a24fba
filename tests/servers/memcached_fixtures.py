"""Placeholder: filled in by the memcached store work."""
