"""PROXY protocol v1 and v2 (HAProxy's proxy-protocol.txt): a pure, total header parser.

Contract, shaped for a non-blocking reader that must consume EXACTLY the header:

    result = parse(peeked)      # peeked = what recv(fd, MAX_HEADER, MSG_PEEK) returned so far

* ``NeedMore(at_least)``: every byte so far is a valid start of a header; wait until
  readable (or the deadline) and peek again. ``at_least`` >= 1 is a lower bound on the
  bytes still missing (exact for v2 once its 16-byte fixed part is in).
* ``Invalid(reason)``: no continuation can make this a valid header; refuse the
  connection. Decided as early as the bytes allow: the first byte must be ``P`` (v1) or
  ``\\r`` (v2), every later byte is checked as it arrives (signature, v1 keyword and
  address characters, v2 version/command/family), so a client that does not speak the
  protocol is refused at once instead of at the deadline. ``reason`` is a fixed phrase
  (never client bytes), safe to log.
* ``Header(consumed, ...)``: a complete valid header occupies ``peeked[:consumed]``;
  ``recv(fd, consumed)`` it (and nothing more) and hand the rest of the stream to the
  program. ``src``/``dst`` is ``None`` when the real connection's addresses must be used:
  v1 ``UNKNOWN``, v2 ``LOCAL`` (HAProxy's health checks), v2 ``AF_UNSPEC``, and v2
  ``AF_UNIX`` (accepted as the spec's "fall back to UNSPEC" for a family this
  server does not implement: a unix path means nothing as a TCP peer).

Reading without spinning: ``NeedMore`` guarantees every byte of ``buf`` belongs to the
header (it is a strict prefix of any header it can become), so the reader may
``recv(len(peek))`` those bytes for real into its own buffer; otherwise a level-
triggered selector reports the unconsumed bytes readable forever. The loop is:

    peek = recv(fd, max_header - len(mine), MSG_PEEK); r = parse(mine + peek)
    NeedMore -> mine += recv(fd, len(peek))      (exactly; then wait for readable)
    Header   -> recv(fd, r.consumed - len(mine)) (exactly; the rest is client data)
    Invalid  -> refuse; EOF on the peek before a verdict -> refuse (truncated)

The parser never raises and never returns ``NeedMore`` once ``len(buf) >= max_header``,
so a reader that peeks ``max_header`` bytes always gets a verdict. ``max_header``
defaults to ``MAX_HEADER`` (4096): a v1 line is at most 107 bytes, and a v2 header is
16 + its length field (up to 65551 by the format); real senders' TLVs (ALPN,
authority, unique-id <= 128, SSL) stay far below 4 KiB, so larger ones are refused as
oversized rather than letting an untrusted peer make the reader buffer 64 KiB.

Strictness (the spec says a receiver must drop anything that does not match exactly):
v1 needs CRLF (a bare CR or LF is Invalid), single spaces, TCP4/TCP6 with matching
address families, no leading zeros in IPv4 octets or ports; IPv6 may carry a
dotted-quad tail (HAProxy's inet_ntop writes ``::ffff:a.b.c.d`` for v4-mapped). v2 needs
version 2, command LOCAL/PROXY, known family/transport nibbles; PROXY over DGRAM is
refused (this is a stream server); for INET/INET6/UNIX the length must cover the
address block and the rest must be a whole sequence of TLVs (each TLV's 3-byte head
and value within the header). TLVs are returned raw and not interpreted (in
particular PP2_TYPE_CRC32C is not verified, which the spec allows a receiver not to
support). For LOCAL and AF_UNSPEC the block after the fixed part is skipped as opaque,
as the spec requires.

Why not the ``proxy-protocol`` PyPI package: it is built on asyncio StreamReader reads
(readuntil/readexactly), which consume from the stream as they parse; poolinetd's
preamble stage runs in its own selector loop on peeked bytes and needs a verdict plus
an exact byte count, never a partial consumption. The format is small enough that an
own parser with a property test is less risk than an adapter.

``encode_v1``/``encode_v2`` build headers (for tests, and for anything that must speak
the protocol to a backend).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from poolinetd.net.preamble import Invalid, NeedMore

V1_SIGNATURE = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX_LINE = 107  # "PROXY UNKNOWN <v6> <v6> 65535 65535\r\n", the spec's worst case
V1_MIN_LINE = len(b"PROXY UNKNOWN\r\n")  # 15
V2_FIXED = 16  # signature (12), ver_cmd, fam, len (2)
V2_MAX_HEADER = V2_FIXED + 0xFFFF
MAX_HEADER = 4096
MIN_HEADER = min(V1_MIN_LINE, V2_FIXED)

# Registered TLV types a caller may want to look at (values are returned raw).
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_TYPE_NETNS = 0x30

Command = Literal["PROXY", "LOCAL"]
Family = Literal["inet", "inet6", "unix", "unspec"]
Address = tuple[str, int]
Tlv = tuple[int, bytes]


@dataclass(frozen=True, slots=True)
class Header:
    """A complete header: ``buf[:consumed]``. ``src``/``dst`` None = use the real ones.

    Hosts are in ``ipaddress``'s canonical text form (IPv6 compressed, lower case).
    """

    consumed: int
    version: Literal[1, 2]
    command: Command
    family: Family
    src: Address | None
    dst: Address | None
    tlvs: tuple[Tlv, ...] = ()


Result = NeedMore | Invalid | Header


def parse(buf: bytes, max_header: int = MAX_HEADER) -> Result:
    """Classify the bytes peeked so far at the start of a connection (see module doc).

    ``max_header`` is clamped to [V1_MAX_LINE, V2_MAX_HEADER] so that v1 always
    fits; a v2 header longer than it is Invalid.
    """
    limit = min(max(max_header, V1_MAX_LINE), V2_MAX_HEADER)
    buf = bytes(buf[:limit])
    if not buf:
        return NeedMore(MIN_HEADER)
    if buf[0] == V1_SIGNATURE[0]:
        return _parse_v1(buf)
    if buf[0] == V2_SIGNATURE[0]:
        return _parse_v2(buf, limit)
    return Invalid("not a PROXY protocol header")


# --- version 1 -------------------------------------------------------------------------

_V1_PROTOS = (b"TCP4", b"TCP6", b"UNKNOWN")
_DIGITS = frozenset(b"0123456789")
_V4_CHARS = _DIGITS | frozenset(b".")
_V6_CHARS = _DIGITS | frozenset(b"abcdefABCDEF:.")
_V4_TEXT_MAX = len("255.255.255.255")
_V6_TEXT_MAX = len("ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255")


def _parse_v1(buf: bytes) -> Result:
    window = buf[:V1_MAX_LINE]
    n = min(len(window), len(V1_SIGNATURE))
    if window[:n] != V1_SIGNATURE[:n]:
        return Invalid("bad v1 signature")
    end = _first_of(window, b"\r\n")
    if end < 0:
        if len(window) >= V1_MAX_LINE:
            return Invalid("v1 line longer than 107 bytes")
        bad = _v1_line(window, complete=False)
        if isinstance(bad, Invalid):
            return bad
        return NeedMore(max(1, V1_MIN_LINE - len(window)))
    if window[end] == ord("\n"):
        return Invalid("v1 line ends in a bare LF")
    if end + 1 == len(window):
        if len(window) >= V1_MAX_LINE:
            return Invalid("v1 line longer than 107 bytes")
        bad = _v1_line(window[:end], complete=False)
        return bad if isinstance(bad, Invalid) else NeedMore(1)
    if window[end + 1] != ord("\n"):
        return Invalid("v1 line has a CR without LF")
    parsed = _v1_line(window[:end], complete=True)
    if isinstance(parsed, Invalid):
        return parsed
    assert parsed is not None  # complete=True always decides
    family, src, dst = parsed
    return Header(end + 2, 1, "PROXY", family, src, dst)


def _first_of(data: bytes, chars: bytes) -> int:
    found = [i for i in (data.find(c) for c in chars) if i >= 0]
    return min(found) if found else -1


def _v1_line(
    line: bytes, complete: bool
) -> Invalid | tuple[Family, Address | None, Address | None] | None:
    """Check a v1 line without its CRLF. Partial lines (``complete=False``) only fail
    when no continuation could be valid, and return None when they might still be."""
    if len(line) < len(V1_SIGNATURE):
        return Invalid("truncated v1 line") if complete else None
    rest = line[len(V1_SIGNATURE) :]
    proto, space, fields = rest.partition(b" ")
    if not space:  # still inside the protocol keyword
        if complete:
            return ("unspec", None, None) if proto == b"UNKNOWN" else Invalid("bad v1 protocol")
        if any(p.startswith(proto) for p in _V1_PROTOS):
            return None
        return Invalid("bad v1 protocol")
    if proto == b"UNKNOWN":  # the receiver must ignore the rest of the line
        return ("unspec", None, None) if complete else None
    if proto not in (b"TCP4", b"TCP6"):
        return Invalid("bad v1 protocol")
    inet6 = proto == b"TCP6"
    tokens = fields.split(b" ")
    if len(tokens) > 4:
        return Invalid("too many v1 fields")
    for i, token in enumerate(tokens):
        last = i == len(tokens) - 1
        if last and not complete:
            if not _token_prefix_ok(token, is_port=i >= 2, inet6=inet6):
                return Invalid("bad v1 address or port")
        elif (_port(token) if i >= 2 else _host(token, inet6)) is None:
            return Invalid("bad v1 address or port")
    if not complete:
        return None
    if len(tokens) != 4:
        return Invalid("missing v1 fields")
    src_host, dst_host = _host(tokens[0], inet6), _host(tokens[1], inet6)
    src_port, dst_port = _port(tokens[2]), _port(tokens[3])
    assert src_host is not None and dst_host is not None
    assert src_port is not None and dst_port is not None
    return ("inet6" if inet6 else "inet", (src_host, src_port), (dst_host, dst_port))


def _token_prefix_ok(token: bytes, is_port: bool, inet6: bool) -> bool:
    """Whether ``token`` can still grow into a valid field (a numeric prefix of a
    decimal is at most that decimal, so ranges and leading zeros are decidable)."""
    if is_port:
        return _decimal_prefix_ok(token, 0xFFFF)
    if inet6:
        return len(token) <= _V6_TEXT_MAX and all(c in _V6_CHARS for c in token)
    octets = token.split(b".")
    return (
        len(octets) <= 4
        and all(_decimal(o, 255) is not None for o in octets[:-1])
        and _decimal_prefix_ok(octets[-1], 255)
    )


def _decimal_prefix_ok(token: bytes, maximum: int) -> bool:
    return not token or _decimal(token, maximum) is not None


def _host(token: bytes, inet6: bool) -> str | None:
    if not token:
        return None
    if inet6:
        if len(token) > _V6_TEXT_MAX or not all(c in _V6_CHARS for c in token):
            return None
        try:
            return str(ipaddress.IPv6Address(token.decode("ascii")))
        except ValueError:
            return None
    if len(token) > _V4_TEXT_MAX or not all(c in _V4_CHARS for c in token):
        return None
    octets = token.split(b".")
    if len(octets) != 4 or any(_decimal(o, 255) is None for o in octets):
        return None
    return token.decode("ascii")


def _port(token: bytes) -> int | None:
    return _decimal(token, 0xFFFF)


def _decimal(token: bytes, maximum: int) -> int | None:
    """A decimal without sign or leading zeros ("0" itself is fine), at most ``maximum``."""
    if not token or len(token) > len(str(maximum)) or not all(c in _DIGITS for c in token):
        return None
    if len(token) > 1 and token[0] == ord("0"):
        return None
    value = int(token)
    return value if value <= maximum else None


# --- version 2 -------------------------------------------------------------------------

_CMD_LOCAL, _CMD_PROXY = 0x0, 0x1
_FAMILIES: dict[int, tuple[Family, int]] = {  # family nibble -> name, address block size
    0x0: ("unspec", 0),
    0x1: ("inet", 12),
    0x2: ("inet6", 36),
    0x3: ("unix", 216),
}
_STREAM, _DGRAM = 0x1, 0x2
_PROXY_FAM_BYTES = frozenset({0x00, 0x11, 0x21, 0x31})  # UNSPEC, TCP4, TCP6, UNIX stream


def _parse_v2(buf: bytes, limit: int) -> Result:
    n = min(len(buf), len(V2_SIGNATURE))
    if buf[:n] != V2_SIGNATURE[:n]:
        return Invalid("bad v2 signature")
    if len(buf) <= 12:
        return NeedMore(V2_FIXED - len(buf))
    ver_cmd = buf[12]
    if ver_cmd >> 4 != 2:
        return Invalid("bad v2 version")
    command = ver_cmd & 0x0F
    if command not in (_CMD_LOCAL, _CMD_PROXY):
        return Invalid("bad v2 command")
    if len(buf) == 13:
        return NeedMore(V2_FIXED - 13)
    fam = buf[13]
    if fam >> 4 not in _FAMILIES:
        return Invalid("bad v2 address family")
    if fam & 0x0F > _DGRAM:
        return Invalid("bad v2 transport protocol")
    if command == _CMD_PROXY and fam & 0x0F == _DGRAM:
        return Invalid("v2 datagram header on a stream connection")
    if command == _CMD_PROXY and fam not in _PROXY_FAM_BYTES:
        return Invalid("bad v2 family/transport combination")
    family, addr_size = _FAMILIES[fam >> 4]
    if len(buf) < V2_FIXED:
        return NeedMore(V2_FIXED - len(buf))
    total = V2_FIXED + int.from_bytes(buf[14:16], "big")
    if total > limit:
        return Invalid("v2 header larger than the limit")
    if command == _CMD_PROXY and total - V2_FIXED < addr_size:
        return Invalid("v2 length shorter than the address block")
    if len(buf) < total:
        return NeedMore(total - len(buf))
    if command == _CMD_LOCAL:
        return Header(total, 2, "LOCAL", family, None, None)
    if family == "unspec":
        return Header(total, 2, "PROXY", "unspec", None, None)
    block = buf[V2_FIXED:total]
    tlvs = _tlvs(block[addr_size:])
    if tlvs is None:
        return Invalid("v2 TLV lengths inconsistent")
    src: Address | None = None
    dst: Address | None = None
    if family in ("inet", "inet6"):
        size = 4 if family == "inet" else 16
        hosts = [str(ipaddress.ip_address(block[i : i + size])) for i in (0, size)]
        ports = [int.from_bytes(block[2 * size + i : 2 * size + i + 2], "big") for i in (0, 2)]
        src, dst = (hosts[0], ports[0]), (hosts[1], ports[1])
    return Header(total, 2, "PROXY", family, src, dst, tlvs)


def _tlvs(data: bytes) -> tuple[Tlv, ...] | None:
    """Split ``data`` into whole TLVs, or None if a TLV head or value overruns it."""
    out: list[Tlv] = []
    i = 0
    while i < len(data):
        if len(data) - i < 3:
            return None
        length = int.from_bytes(data[i + 1 : i + 3], "big")
        if i + 3 + length > len(data):
            return None
        out.append((data[i], data[i + 3 : i + 3 + length]))
        i += 3 + length
    return tuple(out)


# --- encoders --------------------------------------------------------------------------


def encode_v1(src: Address | None, dst: Address | None) -> bytes:
    """A v1 line; both None gives ``PROXY UNKNOWN\\r\\n``. Raises ValueError on bad input."""
    if src is None or dst is None:
        if src is not None or dst is not None:
            raise ValueError("give both addresses or neither")
        return b"PROXY UNKNOWN\r\n"
    s, d = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
    if s.version != d.version:
        raise ValueError("source and destination families differ")
    for port in (src[1], dst[1]):
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"bad port {port}")
    proto = "TCP4" if s.version == 4 else "TCP6"
    return f"PROXY {proto} {s} {d} {src[1]} {dst[1]}\r\n".encode("ascii")


def encode_v2(
    src: Address | None,
    dst: Address | None,
    *,
    command: Command = "PROXY",
    tlvs: Iterable[Tlv] = (),
) -> bytes:
    """A v2 header. No addresses (or LOCAL) gives AF_UNSPEC. Raises ValueError on bad input."""
    body = bytearray()
    if command == "LOCAL" or src is None or dst is None:
        if src is not None or dst is not None:
            raise ValueError("LOCAL/UNSPEC headers carry no addresses")
        fam = 0x00
    else:
        s, d = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
        if s.version != d.version:
            raise ValueError("source and destination families differ")
        fam = 0x11 if s.version == 4 else 0x21
        body += s.packed + d.packed + src[1].to_bytes(2, "big") + dst[1].to_bytes(2, "big")
    for kind, value in tlvs:
        body += bytes([kind]) + len(value).to_bytes(2, "big") + value
    if len(body) > 0xFFFF:
        raise ValueError("v2 header too long")
    ver_cmd = 0x20 | (_CMD_LOCAL if command == "LOCAL" else _CMD_PROXY)
    return V2_SIGNATURE + bytes([ver_cmd, fam]) + len(body).to_bytes(2, "big") + bytes(body)
