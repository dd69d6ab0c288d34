"""Converters from a value as written in inetd.conf to what it means.

Pure: each takes the text and returns the value, or None when the text is
not a valid value (the caller reports it, with the key's own wording).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from poolinetd.config.spec import RLIM_UNLIMITED, Limits, PreloadKind, StderrRoute

_UINT = re.compile(r"[0-9]{1,10}")
_FLOAT = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
INT_MAX = 2**31 - 1
_SIZE = re.compile(r"([0-9]{1,19})([kKmMgG]?)")
_SCALE = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
RLIM_MAX = 2**63 - 2  # the largest finite rlimit (2**64-1 is RLIM_INFINITY)
_OCTAL_MODE = re.compile(r"0?[0-7]{1,3}")
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


def preload_kind(text: str) -> PreloadKind | None:
    """``python`` or ``no``, else None."""
    try:
        return PreloadKind(text)
    except ValueError:
        return None


_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


def module_name(text: str) -> str | None:
    """A dotted Python module name (``json``, ``email.mime.text``), at most 200 characters."""
    return text if len(text) <= 200 and _MODULE.fullmatch(text) else None


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


def size(text: str, most: int = RLIM_MAX) -> int | None:
    """N, NK, NM or NG (binary: K = 1024, as xinetd reads them) up to ``most``, else None."""
    match = _SIZE.fullmatch(text)
    if match is None:
        return None
    value = int(match[1]) * _SCALE[match[2].lower()]
    return value if value <= most else None


def rlimit(text: str) -> int | None:
    """An rlimit_* value: ``size`` or ``unlimited`` (RLIM_UNLIMITED), else None."""
    return RLIM_UNLIMITED if text == UNLIMITED else size(text)


def nice(text: str) -> int | None:
    """A nice value -20..19, else None."""
    negative = text.startswith("-")
    value = uint(text[1:] if negative else text)
    if value is None:
        return None
    value = -value if negative else value
    return value if -20 <= value <= 19 else None


def umask(text: str) -> int | None:
    """An octal umask 0..0777 (``022``, ``0027``), else None."""
    return int(text, 8) if _OCTAL_MODE.fullmatch(text) else None


def buffer_size(text: str) -> int | None:
    """A socket buffer size: ``size`` from 1 byte to 2 GiB - 1 (setsockopt takes an int)."""
    value = size(text, INT_MAX)
    return value if value is not None and value > 0 else None


def backlog(text: str) -> int | None:
    """A listen backlog 1..65535 (the kernel caps it at net.core.somaxconn), else None."""
    value = positive(text)
    return value if value is not None and value <= 65535 else None


def seconds(text: str) -> int | None:
    """Whole seconds 0..2**31-1 (TCP_DEFER_ACCEPT), else None."""
    return uint(text)
