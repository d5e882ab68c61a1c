"""Old names of renamed public arguments and attributes, accepted with a ``DeprecationWarning``."""

from __future__ import annotations

import warnings
from typing import Any


def renamed_argument(function: str, given: dict[str, Any], old: str, new: str) -> Any:
    """The value passed as ``old=`` (renamed ``new``), with a warning; ``None`` when it was not passed.

    ``given`` is the function's ``**kwargs``: any other name in it is refused as Python would refuse it.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     renamed_argument("f", {"old": 2.0}, "old", "new")
        2.0
        >>> str(caught[0].message)
        'f(old=...) is deprecated: the argument is now called new (same meaning).'
    """
    unknown = sorted(set(given) - {old})
    if unknown:
        raise TypeError(f"{function}() got an unexpected keyword argument {unknown[0]!r}")
    if old not in given:
        return None
    warn_renamed(f"{function}({old}=...)", f"the argument is now called {new}", stacklevel=4)
    return given[old]


def warn_renamed(what: str, instead: str, stacklevel: int = 3) -> None:
    """A ``DeprecationWarning``; the default ``stacklevel`` points at the caller of the function calling this."""
    warnings.warn(f"{what} is deprecated: {instead} (same meaning).", DeprecationWarning, stacklevel=stacklevel)
