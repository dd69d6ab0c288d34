"""Converters from a value as written in inetd.conf to what it means.

Pure: each takes the text and returns the value, or None when the text is
not a valid value (the caller reports it, with the key's own wording).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from poolinetd.config.spec import Limits, StderrRoute

_UINT = re.compile(r"[0-9]{1,10}")
_FLOAT = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
INT_MAX = 2**31 - 1
# A limit or global cap written as "no limit" (key-values and defaults).
UNLIMITED = "unlimited"


def uint(text: str) -> int | None:
    """A decimal integer 0..2**31-1 written in ASCII digits, else None."""
    if _UINT.fullmatch(text) is None:
        return None
    value = int(text)
    return value if value <= INT_MAX else None


def ufloat(text: str) -> float | None:
    """A finite, non-negative decimal number, else None."""
    if _FLOAT.fullmatch(text) is None:
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def positive(text: str) -> int | None:
    """An integer 1..2**31-1, else None."""
    value = uint(text)
    return value if value is not None and value > 0 else None


def positive_float(text: str) -> float | None:
    """A finite number > 0, else None."""
    value = ufloat(text)
    return value if value is not None and value > 0 else None


def stderr_route(text: str) -> StderrRoute | None:
    """``socket`` or ``log``, else None."""
    try:
        return StderrRoute(text)
    except ValueError:
        return None


def yes_no(text: str) -> bool | None:
    """``yes`` -> True, ``no`` -> False, else None."""
    return {"yes": True, "no": False}.get(text)


def prefix_length(bits: int) -> Callable[[str], int | None]:
    """A converter for a prefix length 0..``bits``."""

    def parse(text: str) -> int | None:
        value = uint(text)
        return value if value is not None and value <= bits else None

    return parse


def cap(text: str) -> int | None:
    """A global cap: N >= 1, or unlimited (stored as 0: "explicitly no cap")."""
    return 0 if text == UNLIMITED else positive(text)


def limits_from(values: dict[str, int | None]) -> Limits:
    """Limits from parsed limit keys (a None value = "unlimited" written)."""
    numbers = {k: v for k, v in values.items() if v is not None}
    lifted = frozenset(k for k, v in values.items() if v is None)
    return Limits(**numbers, unlimited=lifted, safe_default=False)
