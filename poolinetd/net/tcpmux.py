"""tcpmux (RFC 1078): the request line a client sends first, and the server's replies.

Pure. Contract, shaped like proxyproto's for the same non-blocking preamble reader:

    result = parse_request(peeked)   # peeked = recv(fd, MAX_REQUEST, MSG_PEEK) so far

* ``NeedMore(at_least)``: a valid start of a line; peek again when readable.
* ``Invalid(reason)``: refuse; send ``negative(reason)`` (or ``ERROR_READING``) and close.
  Decided as soon as a byte rules the line out (a control or non-ASCII byte, or no end
  of line within ``MAX_REQUEST`` bytes), so garbage is refused before the deadline.
* ``Request(name_lower, consumed)``: the line is ``peeked[:consumed]`` including its
  end of line; ``recv(fd, consumed)`` exactly that, so whatever the client sent after
  it reaches the sub-service intact. ``name_lower`` is the service name lower-cased
  (names are case-insensitive); ``is_help`` says it is ``HELP``.

As with proxyproto, ``NeedMore`` guarantees every byte so far belongs to the request
line, so the reader may ``recv`` them for real and parse its buffer plus the next peek
(no spinning on a level-triggered selector; see proxyproto's module doc).

The line ends in CRLF or, as FreeBSD's inetd accepts, a bare LF. A CR not followed by
LF is Invalid (accepting it would leave the LF in the stream for the program). Spaces
and tabs around the name are ignored; the name itself is printable ASCII without
spaces. ``MAX_REQUEST`` is FreeBSD's bound: 256 name bytes plus the CRLF.

Replies: ``GO`` is what poolinetd sends for a ``tcpmux/+NAME`` service before handing
over; ``help_reply(names)`` lists the names one per line (RFC 1078: then close);
``NOT_AVAILABLE`` answers an unknown name.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from poolinetd.net.preamble import Invalid, NeedMore

MAX_NAME = 256
MAX_REQUEST = MAX_NAME + 2  # FreeBSD's MAX_SERV_LEN: the name and CRLF
HELP = "help"

GO = b"+Go\r\n"
_BLANKS = b" \t"


@dataclass(frozen=True, slots=True)
class Request:
    """A complete request line ``buf[:consumed]`` naming ``name_lower``."""

    name_lower: str
    consumed: int

    @property
    def is_help(self) -> bool:
        return self.name_lower == HELP


Result = NeedMore | Invalid | Request


def parse_request(buf: bytes) -> Result:
    """Classify the bytes peeked so far at the start of a tcpmux connection (module doc)."""
    window = bytes(buf[:MAX_REQUEST])
    for i, c in enumerate(window):
        if c == 0x0A:
            return _finish(window[:i], i + 1)
        if c == 0x0D:
            if i + 1 == len(window):
                return NeedMore(1)
            if window[i + 1] != 0x0A:
                return Invalid("CR without LF in the request line")
            return _finish(window[:i], i + 2)
        if i >= MAX_NAME:
            return Invalid("request line too long")
        if not (0x20 <= c <= 0x7E or c == 0x09):
            return Invalid("control or non-ASCII byte in the request line")
    return NeedMore(1)


def _finish(line: bytes, consumed: int) -> Result:
    name = line.strip(_BLANKS)
    if not name:
        return Invalid("empty service name")
    if any(c in _BLANKS for c in name):
        return Invalid("blank inside the service name")
    return Request(name.decode("ascii").lower(), consumed)


def negative(reason: str) -> bytes:
    """``-reason\\r\\n``, with anything but printable ASCII in ``reason`` replaced by ``?``."""
    text = "".join(c if " " <= c <= "~" else "?" for c in reason)
    return b"-" + text.encode("ascii") + b"\r\n"


NOT_AVAILABLE = negative("Service not available")
ERROR_READING = negative("Error reading service name")


def help_reply(names: Iterable[str]) -> bytes:
    """The HELP answer: each name once (case-insensitively), in the given order, CRLF each."""
    seen: set[str] = set()
    lines: list[bytes] = []
    for name in names:
        key = name.lower()
        if key in seen:
            continue
        seen.add(key)
        lines.append(name.encode("ascii", "replace") + b"\r\n")
    return b"".join(lines)
