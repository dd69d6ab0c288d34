"""Access lists (``only_from``/``no_access``) and per-source tracking keys.

Pure: no I/O. Two halves with different costs:

* config time: ``parse_cidr`` turns one ``ADDR[/LEN]`` word into a ``Network``
  or an error message; ``AddressList(networks)`` compiles a list once.
* connection time (the hot path): ``parse_ip`` turns a peer address string
  (as ``getpeername``/``recvfrom`` report it) into an ``Addr``;
  ``AddressList.matches``, ``decide`` and ``source_key`` judge it. These avoid
  ``ipaddress`` objects (about ten times slower than ``socket.inet_pton`` plus
  ``int.from_bytes``; see benchmarks/bench_admission.py).

An ``Addr`` is one int in IPv6 space: an IPv4 address a.b.c.d is the
IPv4-mapped ``::ffff:a.b.c.d``. So a ``tcp46`` listener's mapped peers and a
``tcp`` listener's plain IPv4 peers are the same address, match IPv4 entries
and share one tracking key. Native IPv6 entries never match IPv4 peers (not
even ``::/0``: write ``0.0.0.0/0`` for "every IPv4 client"); an entry written
inside ``::ffff:0:0/96`` is read as the IPv4 network it denotes.

Link-local addresses (fe80::/10) are only unique on their link, and the
kernel reports a link-local peer with its interface (``fe80::5%eth0``). An
entry inside fe80::/10 must therefore name its interface
(``fe80::5%eth0``, ``fe80::%eth1/10``) and matches only peers on that
interface; a wider entry (``::/0``) matches link-local peers on every link,
as written. (Unscoped, ``proxy_from=fe80::5`` trusted fe80::5 on every link.)

Matching is one ``bisect`` over the list's merged address ranges: O(log n) in
C, about as cheap for 10,000 entries of many prefix lengths as for one (a set
lookup per distinct prefix length was measured slower for every list size).
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_right as _bisect_right
from collections.abc import Iterable
from dataclasses import dataclass, field
from socket import AF_INET, AF_INET6, inet_pton

Addr = int  # an address in IPv6 space (IPv4 as ::ffff:a.b.c.d), from parse_ip
SourceKey = int | str  # from source_key: an int for IP peers, the peer string otherwise

_MAPPED = 0xFFFF << 32  # ::ffff:0.0.0.0, the IPv4-mapped prefix as an Addr
_V4_MASK = 0xFFFFFFFF
_from_bytes = int.from_bytes
_LINK_LOCAL = 0xFE80 << 112  # fe80::/10
_LINK_LOCAL_PREFIX = 10
# Interface names as the kernel allows them (IFNAMSIZ 16), or an interface index.
_SCOPE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-@")


@dataclass(frozen=True, slots=True, order=True)
class Network:
    """One CIDR network: ``version`` 4 or 6, ``value`` the network address as
    an int (host bits zero; IPv4 as a plain 32-bit int), ``prefix`` its length.

    ``note`` is not part of the value: "" or a remark a config diagnostic may
    show as a warning (the text had host bits set and they were cleared).
    """

    version: int
    value: int
    prefix: int
    note: str = field(default="", compare=False)
    scope: str = ""  # the interface of a link-local network ("" for every other)

    @property
    def bits(self) -> int:
        return 32 if self.version == 4 else 128

    def __str__(self) -> str:
        if self.version == 4:
            return f"{ipaddress.IPv4Address(self.value)}/{self.prefix}"
        scope = f"%{self.scope}" if self.scope else ""
        return f"{ipaddress.IPv6Address(self.value)}{scope}/{self.prefix}"

    def as_addr_range(self) -> tuple[int, int]:
        """(first, last) Addr of this network, inclusive, in IPv6 space."""
        base = self.value | _MAPPED if self.version == 4 else self.value
        return base, base | ((1 << (self.bits - self.prefix)) - 1)


def parse_cidr(text: str) -> Network | str:
    """``ADDR`` or ``ADDR/LEN`` (IPv4 or IPv6) -> a Network, or an error message.

    A bare address is a /32 or /128. LEN is decimal, 0-32 for IPv4 and 0-128
    for IPv6. Host bits set (``10.1.2.3/8``) are accepted and cleared, as
    ``ipaddress``'s non-strict mode and most access-list tools do, and the
    Network's ``note`` says so, so ``check`` can warn without failing. Host
    names, netmask notation and brackets are refused with a message that says
    which. A link-local network must name its interface (``fe80::5%eth0``) and
    only a link-local one may. The message never includes file or line: the
    caller adds ``file:line:field``.
    """
    addr_text, slash, len_text = text.partition("/")
    if not addr_text:
        return f"{text!r}: missing address before '/'" if slash else "empty address"
    if addr_text.startswith("["):
        return f"{text!r}: write IPv6 networks without brackets (2001:db8::/32)"
    addr_text, percent, scope = addr_text.partition("%")
    if percent and not _SCOPE_CHARS.issuperset(scope or "\0"):
        return f"{text!r}: {scope!r} is not an interface name"
    try:
        addr = ipaddress.ip_address(addr_text)
    except ValueError:
        return (
            f"{text!r}: {addr_text!r} is not an IPv4 or IPv6 address"
            " (host names are not accepted)"
        )
    bits: int = addr.max_prefixlen
    family = f"IPv{addr.version}"
    if not slash:
        prefix = bits
    elif not len_text:
        return f"{text!r}: missing prefix length after '/'"
    elif not (len_text.isascii() and len_text.isdigit()):
        return (
            f"{text!r}: prefix length {len_text!r} is not a number 0-{bits}"
            + (" (netmask notation is not accepted)" if "." in len_text or ":" in len_text else "")
        )
    else:
        prefix = int(len_text)
        if prefix > bits:
            return f"{text!r}: prefix length {prefix} out of range 0-{bits} for {family}"
    value = int(addr)
    version = addr.version
    if version == 6 and prefix >= 96 and value >> 32 == 0xFFFF:
        # an IPv4-mapped network: mapped peers are judged as IPv4, so it is one
        version, value, prefix, bits = 4, value & _V4_MASK, prefix - 96, 32
    shift = bits - prefix
    masked = value >> shift << shift
    link_local = version == 6 and prefix >= _LINK_LOCAL_PREFIX and (
        masked >> (128 - _LINK_LOCAL_PREFIX) == _LINK_LOCAL >> (128 - _LINK_LOCAL_PREFIX))
    if link_local and not scope:
        return (f"{text!r}: a link-local address is the same on every link: name the "
                f"interface ({addr_text}%eth0)")
    if scope and not link_local:
        return f"{text!r}: only a link-local address (fe80::/10) takes an interface (%...)"
    note = ""
    if masked != value:
        taken = Network(version, masked, prefix, scope=scope)
        note = f"host bits set: {text} is taken as {taken}"
    return Network(version, masked, prefix, note, scope)


def parse_ip(ip: str) -> Addr | None:
    """A peer address string -> its Addr, or None if it is not an IP address.

    Accepts what the kernel reports: dotted quad, IPv6 text (mapped or not),
    and an IPv6 scope suffix (``fe80::1%eth0``, ignored). Unix-socket peers
    ("" or a path) give None.
    """
    if ":" in ip:
        if "%" in ip:
            ip = ip.partition("%")[0]
        try:
            return _from_bytes(inet_pton(AF_INET6, ip))
        except (OSError, ValueError):
            return None
    try:
        return _MAPPED | _from_bytes(inet_pton(AF_INET, ip))
    except (OSError, ValueError):
        return None


def peer_scope(ip: str) -> str:
    """The interface of a link-local peer address string ("fe80::5%eth0" -> "eth0")."""
    return ip.partition("%")[2]


def is_v4(addr: Addr) -> bool:
    return addr >> 32 == 0xFFFF


def format_addr(addr: Addr) -> str:
    """An Addr as text (IPv4 as dotted quad); for logs, not the hot path."""
    if is_v4(addr):
        return str(ipaddress.IPv4Address(addr & _V4_MASK))
    return str(ipaddress.IPv6Address(addr))


class AddressList:
    """A compiled, immutable CIDR list. Empty is falsy (``decide``: "everyone").

    ``networks`` keeps the entries as given (sorted, duplicates removed) for
    display and for ``==`` (reload compares lists). For lookups the entries of
    each family are merged into sorted disjoint ranges of Addrs, so a lookup
    is one ``bisect`` (C code, O(log ranges)) and one comparison, however many
    entries and prefix lengths the list has.
    """

    __slots__ = ("_scoped", "_v4_ends", "_v4_starts", "_v6_ends", "_v6_starts", "networks")

    def __init__(self, networks: Iterable[Network] = ()) -> None:
        self.networks: tuple[Network, ...] = tuple(sorted(set(networks)))
        self._v4_starts, self._v4_ends = _merge(n for n in self.networks if n.version == 4)
        self._v6_starts, self._v6_ends = _merge(
            n for n in self.networks if n.version == 6 and not n.scope)
        # Link-local entries, by interface: few, so a scan (never on the unscoped path).
        self._scoped = tuple(n for n in self.networks if n.scope)

    def __len__(self) -> int:
        return len(self.networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AddressList) and self.networks == other.networks

    def __hash__(self) -> int:
        return hash(self.networks)

    def __repr__(self) -> str:
        return f"AddressList([{', '.join(map(str, self.networks))}])"

    @property
    def ranges(self) -> int:
        """How many disjoint address ranges the entries merged into."""
        return len(self._v4_starts) + len(self._v6_starts)

    def matches_addr(self, addr: Addr, scope: str = "") -> bool:
        """True if ``addr`` (from parse_ip) is in one of the networks. ``scope``: the
        interface of a link-local peer (``peer_scope``); only entries naming that
        interface, or wider unscoped ones, match it."""
        if addr >> 32 == 0xFFFF:
            starts, ends = self._v4_starts, self._v4_ends
        else:
            starts, ends = self._v6_starts, self._v6_ends
            if scope and self._scoped:
                for net in self._scoped:
                    first, last = net.as_addr_range()
                    if net.scope == scope and first <= addr <= last:
                        return True
        i = _bisect_right(starts, addr) - 1
        return i >= 0 and addr <= ends[i]

    def matches(self, ip: str) -> bool:
        """True if the peer address string is in one of the networks (never for non-IP peers)."""
        addr = parse_ip(ip)
        return addr is not None and self.matches_addr(addr, peer_scope(ip))

    def covers(self, net: Network) -> bool:
        """True if every address of ``net`` is in the list (maybe across several entries)."""
        first, last = net.as_addr_range()
        if net.version == 4:
            starts, ends = self._v4_starts, self._v4_ends
        else:
            starts, ends = self._v6_starts, self._v6_ends
            if net.scope and any(
                    other.scope == net.scope and other.as_addr_range()[0] <= first
                    and last <= other.as_addr_range()[1] for other in self._scoped):
                return True
        i = _bisect_right(starts, first) - 1
        return i >= 0 and last <= ends[i]


def _merge(networks: Iterable[Network]) -> tuple[list[int], list[int]]:
    """Sorted disjoint [start, end] Addr ranges covering exactly the networks;
    overlapping and adjacent ranges are joined."""
    starts: list[int] = []
    ends: list[int] = []
    for first, last in sorted(n.as_addr_range() for n in networks):
        if ends and first <= ends[-1] + 1:
            ends[-1] = max(ends[-1], last)
        else:
            starts.append(first)
            ends.append(last)
    return starts, ends


def access_reason(only_from: AddressList, no_access: AddressList, addr: Addr | None,
                  scope: str = "") -> str:
    """Why a peer is refused by the lists: "no_access", "only_from", or "" if allowed.

    ``scope``: the interface of a link-local peer (see ``AddressList.matches_addr``).

    ``no_access`` wins over ``only_from``; an empty ``only_from`` allows everyone.
    A peer that is not an IP address (None) matches no entry, so it is refused
    exactly when ``only_from`` is non-empty (fail closed).
    """
    if addr is None:
        return "only_from" if only_from else ""
    if no_access and no_access.matches_addr(addr, scope):
        return "no_access"
    if only_from and not only_from.matches_addr(addr, scope):
        return "only_from"
    return ""


def peer_access_reason(only_from: AddressList, no_access: AddressList, ip: str) -> str:
    """``access_reason`` of a peer address string (with its link-local scope, if any)."""
    return access_reason(only_from, no_access, parse_ip(ip), peer_scope(ip))


def decide(only_from: AddressList, no_access: AddressList, ip: str) -> bool:
    """True if a peer (address string) may connect; see ``access_reason``."""
    return not peer_access_reason(only_from, no_access, ip)


def shadowed(only_from: AddressList, no_access: AddressList) -> list[Network]:
    """The only_from entries that allow nobody: no_access covers all of each
    (perhaps with several entries). If that is every only_from entry, the
    service refuses every client: ``check`` should call the lists contradictory."""
    return [net for net in only_from.networks if no_access.covers(net)]


def source_key_addr(addr: Addr, v4_prefix: int, v6_prefix: int) -> int:
    """The tracking key of ``addr``: its network at ``v4_prefix`` (IPv4 and mapped
    peers) or ``v6_prefix`` (native IPv6), as one int. Prefixes must be in range
    (0-32, 0-128; config validates). Keys of different families or prefix lengths
    never collide: the low byte holds the prefix length in IPv6 space."""
    plen = 96 + v4_prefix if addr >> 32 == 0xFFFF else v6_prefix
    return (addr >> (128 - plen)) << 8 | plen


def source_key(ip: str, v4_prefix: int, v6_prefix: int) -> SourceKey:
    """``source_key_addr`` of a peer address string; a non-IP peer is its own key, and
    so is a link-local one with its interface (fe80::/64 is every host of every link)."""
    addr = parse_ip(ip)
    if addr is None or "%" in ip:
        return ip
    return source_key_addr(addr, v4_prefix, v6_prefix)


def format_key(key: SourceKey) -> str:
    """A tracking key as CIDR text for logs and status (``192.0.2.0/24``, ``2001:db8::/48``)."""
    if isinstance(key, str):
        return key
    plen = key & 0xFF
    value = (key >> 8) << (128 - plen)
    if plen >= 96 and value >> 32 == 0xFFFF:
        return f"{ipaddress.IPv4Address(value & _V4_MASK)}/{plen - 96}"
    return f"{ipaddress.IPv6Address(value)}/{plen}"
