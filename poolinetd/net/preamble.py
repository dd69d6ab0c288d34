"""The preamble stage's contract: what a reader of a client's first bytes answers.

Pure. Some services read a few bytes from the client before the connection
goes anywhere: a PROXY protocol header (who the client really is), a tcpmux
service name (which service it wants). The engine drives a ``Preamble``
without ever blocking: it peeks (MSG_PEEK) at what has arrived, at most
``limit`` bytes, and feeds all of it each time; the reader answers

* ``NeedMore()``: not enough yet (the engine waits, under a deadline). It
  promises that every byte fed so far belongs to the preamble: the engine
  then takes them off the socket (so the selector does not wake it again for
  them) and feeds them again, with whatever follows, next time;
* ``Refuse(reason)``: malformed or not allowed (the engine closes, counts
  ``reason``, and logs, throttled);
* ``Proceed(consumed, ...)``: the engine reads exactly ``consumed`` bytes off
  the socket (they were peeked, so they are there), so the program or the
  built-in sees the client's data from the first byte after the preamble,
  and decides on the address the preamble gave.

A reader never sees anything but bytes and never does I/O, so it can be
fuzzed on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

DEADLINE = 10.0  # seconds a client has to finish its preamble
MAX_PENDING = 1024  # connections of one service in the preamble stage at once
MAX_PENDING_PER_SOURCE = MAX_PENDING // 4  # ... from one source (its network, as admission keys it)


@dataclass(frozen=True, slots=True)
class NeedMore:
    """Every byte so far is a valid prefix; wait for at least ``at_least`` (>= 1) more.

    The one "not yet" of every preamble parser (PROXY, tcpmux) and reader.
    """

    at_least: int = 1


@dataclass(frozen=True, slots=True)
class Invalid:
    """A parser's verdict: not valid, whatever follows. ``reason`` is fixed text, safe to
    log (a reader turns it into a ``Refuse``)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Refuse:
    """Close the connection; ``reason`` is counted in status and logged (throttled).

    ``reply`` is sent first, best-effort and never blocking (tcpmux's ``-`` line).
    """

    reason: str
    reply: bytes = b""


@dataclass(frozen=True, slots=True)
class Proceed:
    """The preamble is ``consumed`` bytes long.

    ``peer``/``local``: the client's and the server's address as the preamble
    says ((host, port)); None keeps the connection's own (PROXY ``LOCAL``,
    ``UNKNOWN``). ``reply`` is sent to the client before the hand-off. ``route``
    names the service that takes the connection instead of the listener's own.
    """

    consumed: int
    peer: tuple[str, int] | None = None
    local: tuple[str, int] | None = None
    reply: bytes = b""
    route: str | None = None  # tcpmux: the sub-service the connection goes to


Result = NeedMore | Refuse | Proceed


class Preamble(Protocol):
    """One connection's reader. ``feed`` gets every byte of the connection so far, each time."""

    limit: int  # never peek more than this many bytes

    def feed(self, data: bytes, eof: bool) -> Result:
        """What to do, given the first bytes of the connection (``eof``: no more will come)."""
