"""Argument checks shared by the callbacks' constructors."""

from __future__ import annotations

import operator
from typing import Any


def checked_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int, or a ``ValueError`` naming the argument (bools and floats are refused)."""
    try:
        number = minimum - 1 if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = minimum - 1
    if number < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return number
