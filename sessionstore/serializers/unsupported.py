"""Find the object inside a value that a serializer cannot write, to name its type in errors.

Only the object's type and its role are reported, never where it sits: the
path to it goes through the keys of nested dicts, which are session content.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["Offender", "find_unsupported"]

_CONTAINERS = (dict, list, tuple, set, frozenset)


@dataclass(frozen=True, slots=True)
class Offender:
    """What :func:`find_unsupported` found."""

    obj: Any
    #: ``"value"``, ``"dict key"`` (a key, or inside one) or ``"cycle"`` (a container inside itself).
    role: str


def find_unsupported(value: Any, is_ok: Callable[[Any], bool], *, cycles_ok: bool = False) -> Offender | None:
    """The first object inside ``value`` (``value`` included) that ``is_ok`` rejects.

    Containers (dict, list, tuple, set, frozenset) that ``is_ok`` accepts are
    walked, dict keys included; anything else is a leaf. A container inside
    itself is a ``"cycle"`` unless ``cycles_ok`` (pickle writes those); one
    merely referenced twice is walked once.
    """
    walking: set[int] = set()  # the containers from ``value`` down to here
    walked: set[int] = set()
    stack: list[tuple[Any, bool, bool]] = [(value, False, False)]  # (object, in a key, leaving it)
    while stack:
        obj, in_key, leaving = stack.pop()
        if leaving:
            walking.discard(id(obj))
            walked.add(id(obj))
            continue
        container = isinstance(obj, _CONTAINERS)
        if container and id(obj) in walking:
            if cycles_ok:
                continue
            return Offender(obj, "cycle")
        if container and id(obj) in walked:
            continue
        if not is_ok(obj):
            return Offender(obj, "dict key" if in_key else "value")
        if not container:
            continue
        walking.add(id(obj))
        stack.append((obj, in_key, True))
        if isinstance(obj, dict):
            for k, v in obj.items():
                stack.append((v, in_key, False))
                stack.append((k, True, False))  # popped first: a bad key is found before its value
        else:
            stack.extend((item, in_key, False) for item in obj)
    return None
