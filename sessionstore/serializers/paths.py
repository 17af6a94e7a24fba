"""Find where in a value an unsupported object sits, to name it in errors."""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["child_path", "find_unsupported"]


def child_path(path: str, key: Any) -> str:
    """``cart`` + ``"items"`` -> ``cart.items``; ``cart.items`` + ``2`` -> ``cart.items[2]``."""
    if isinstance(key, str) and key.isidentifier():
        return f"{path}.{key}"
    return f"{path}[{key!r}]"


def find_unsupported(value: Any, path: str, is_leaf_ok: Callable[[Any], bool]) -> tuple[str, Any] | None:
    """First ``(path, object)`` inside ``value`` that ``is_leaf_ok`` rejects.

    Containers (dict, list, tuple, set, frozenset) are walked; anything else is
    a leaf. Cycles are reported as unsupported.
    """
    seen: set[int] = set()
    stack: list[tuple[str, Any]] = [(path, value)]
    while stack:
        where, obj = stack.pop()
        if isinstance(obj, (dict, list, tuple, set, frozenset)):
            if id(obj) in seen:
                return where, obj
            seen.add(id(obj))
            if isinstance(obj, dict):
                for k, v in obj.items():
                    if not is_leaf_ok(k) or isinstance(k, (dict, list, set)):
                        return child_path(where, k), k
                    stack.append((child_path(where, k), v))
            else:
                stack.extend((f"{where}[{i}]", v) for i, v in enumerate(obj))
        elif not is_leaf_ok(obj):
            return where, obj
    return None
