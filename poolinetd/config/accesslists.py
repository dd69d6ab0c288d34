"""The one judgement on an access-list pair both the parser and resolve make: which
``only_from`` entries ``no_access`` makes useless.

Pure. The parser judges the lists an entry (or ``defaults``) writes
together; resolve judges an entry's list against the other one from ``defaults``.
"""

from __future__ import annotations

from typing import NamedTuple

from poolinetd.net import netmatch
from poolinetd.net.netmatch import AddressList

_SHOWN = 5  # entries quoted in the message


class Contradiction(NamedTuple):
    """What to report: an error when no_access covers every only_from entry, else a warning."""

    message: str
    hint: str
    error: bool


def contradiction(
    only: AddressList, deny: AddressList, *, hint_more: str = ""
) -> Contradiction | None:
    """The problem with ``only`` given ``deny``, or None; ``hint_more`` ends the error's hint."""
    dead = netmatch.shadowed(only, deny)
    if not dead:
        return None
    shown = ", ".join(str(n) for n in dead[:_SHOWN]) + (", ..." if len(dead) > _SHOWN else "")
    if len(dead) == len(only):
        return Contradiction(
            "only_from and no_access contradict: no_access covers every only_from entry "
            f"({shown}), so the service refuses every client",
            "remove the no_access entries that cover only_from, or fix only_from" + hint_more,
            error=True,
        )
    return Contradiction(
        f"only_from entries inside no_access allow nobody: {shown}",
        "remove them from only_from",
        error=False,
    )
