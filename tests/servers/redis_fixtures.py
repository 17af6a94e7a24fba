"""Placeholder: filled in by the redis store work."""
