"""Placeholder: filled in by the sql store work."""
