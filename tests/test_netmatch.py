"""netmatch: CIDR parsing, the compiled matcher, access decisions and tracking keys.

Unit tests, then Hypothesis properties against an ``ipaddress`` oracle
(profiles: hypothesis_profiles.py).
"""

from __future__ import annotations

import ipaddress

import hypothesis_profiles  # noqa: F401  (registers and loads the profile)
import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolinetd.net.netmatch import (
    AddressList,
    Network,
    access_reason,
    decide,
    format_addr,
    format_key,
    parse_cidr,
    parse_ip,
    shadowed,
    source_key,
    source_key_addr,
)


def net(text: str) -> Network:
    parsed = parse_cidr(text)
    assert isinstance(parsed, Network), parsed
    return parsed


def alist(*texts: str) -> AddressList:
    return AddressList(net(t) for t in texts)


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("192.0.2.1", "192.0.2.1/32"),
        ("0.0.0.0/0", "0.0.0.0/0"),
        ("2001:db8::/32", "2001:db8::/32"),
        ("2001:DB8:0::1", "2001:db8::1/128"),
        ("::/0", "::/0"),
        ("::ffff:10.0.0.0/104", "10.0.0.0/8"),  # mapped networks are IPv4 networks
        ("::ffff:192.0.2.1", "192.0.2.1/32"),
        ("::ffff:0:0/96", "0.0.0.0/0"),
        ("::fffe:0:0/95", "::fffe:0:0/95"),  # wider than the mapped range: stays IPv6
        ("10.0.0.0/08", "10.0.0.0/8"),
    ],
)
def test_parse_cidr_accepts(text: str, canonical: str) -> None:
    parsed = net(text)
    assert str(parsed) == canonical and parsed.note == ""


def test_host_bits_are_cleared_with_a_note() -> None:
    parsed = net("10.1.2.3/8")
    assert parsed == net("10.0.0.0/8")
    assert parsed.note == "host bits set: 10.1.2.3/8 is taken as 10.0.0.0/8"
    assert net("2001:db8::1/32").note.endswith("is taken as 2001:db8::/32")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "empty address"),
        ("/8", "missing address"),
        ("10.0.0.0/", "missing prefix length"),
        ("10.0.0.0/33", "prefix length 33 out of range 0-32 for IPv4"),
        ("::/129", "prefix length 129 out of range 0-128 for IPv6"),
        ("10.0.0.0/255.0.0.0", "netmask notation is not accepted"),
        ("10.0.0.0/-1", "is not a number 0-32"),
        ("10.0.0.0/+8", "is not a number 0-32"),
        ("10.0.0.0/ 8", "is not a number 0-32"),
        ("10.0.0.0/\u0668", "is not a number 0-32"),  # an Arabic-Indic digit: int() takes it
        ("10.0.0.0/8/8", "is not a number 0-32"),
        ("host.example", "host names are not accepted"),
        ("10.0.0", "is not an IPv4 or IPv6 address"),
        ("010.0.0.1", "is not an IPv4 or IPv6 address"),  # octal or decimal? refuse
        ("[::1]", "without brackets"),
        ("fe80::1", "name the interface (fe80::1%eth0)"),
        ("fe80::/64", "name the interface"),
        ("fe80::1%", "is not an interface name"),
        ("fe80::1%eth0/0", "only a link-local address"),  # ::/0 is not link-local
        ("2001:db8::1%eth0", "only a link-local address (fe80::/10) takes an interface"),
    ],
)
def test_parse_cidr_refuses_with_a_reason(text: str, says: str) -> None:
    err = parse_cidr(text)
    assert isinstance(err, str)
    assert says in err


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        ("192.0.2.1", 0xFFFF_C000_0201),
        ("::ffff:192.0.2.1", 0xFFFF_C000_0201),  # a tcp46 listener's IPv4 peer
        ("::ffff:c000:201", 0xFFFF_C000_0201),
        ("::1", 1),
        ("fe80::1%lo", 0xFE80 << 112 | 1),  # scope id ignored
        ("", None),  # unix-socket peers
        ("/run/x.sock", None),
        ("::1::2", None),
        ("1.2.3", None),
    ],
)
def test_parse_ip(peer: str, expected: int | None) -> None:
    assert parse_ip(peer) == expected


def test_format_addr() -> None:
    assert format_addr(0xFFFF_C000_0201) == "192.0.2.1"
    assert format_addr(1) == "::1"


def test_matching_examples() -> None:
    lst = alist("10.0.0.0/8", "192.0.2.1", "2001:db8::/32")
    assert lst.matches("10.255.0.1") and lst.matches("::ffff:10.255.0.1")
    assert lst.matches("192.0.2.1") and not lst.matches("192.0.2.2")
    assert lst.matches("2001:db8:ffff::1") and not lst.matches("2001:db9::1")
    assert not lst.matches("11.0.0.1") and not lst.matches("") and not lst.matches("::1")


def test_families_stay_apart() -> None:
    assert not alist("::/0").matches("192.0.2.1")  # mapped peers are IPv4 peers
    assert not alist("::/0").matches("::ffff:192.0.2.1")
    assert not alist("0.0.0.0/0").matches("::1")
    assert alist("0.0.0.0/0").matches("::ffff:192.0.2.1")
    assert alist("::ffff:192.0.2.0/120").matches("192.0.2.9")


def test_entries_merge_into_ranges() -> None:
    lst = alist("10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.2.3.4", "2001:db8::/32")
    assert lst.ranges == 2  # the IPv4 entries are all inside 10.0.0.0/8
    assert len(lst) == 5  # but all are kept for display and comparison
    assert lst.matches("10.1.2.3") and lst.matches("10.255.255.255")
    assert not lst.matches("11.0.0.0") and not lst.matches("9.255.255.255")
    halves = alist("10.0.0.0/9", "10.128.0.0/9", "11.0.0.1")
    assert halves.ranges == 2  # adjacent halves join; 11.0.0.1 is not adjacent to 10/8's end
    assert halves.matches("10.127.255.255") and halves.matches("10.128.0.0")
    assert not halves.matches("11.0.0.0") and halves.matches("11.0.0.1")
    top6 = "ffff:" * 7 + "ffff"
    edges = alist("0.0.0.0/32", "255.255.255.255", "::/128", top6)
    assert all(map(edges.matches, ["0.0.0.0", "::ffff:0:0", "255.255.255.255", "::", top6]))
    assert not any(map(edges.matches, ["0.0.0.1", "255.255.255.254", "::1", "::ffff:0:1"]))


def test_address_list_value_semantics() -> None:
    assert alist("10.0.0.0/8", "192.0.2.1") == alist("192.0.2.1", "10.1.0.0/8", "10.0.0.0/8")
    assert alist("10.0.0.0/8") != alist("10.0.0.0/9")
    assert hash(alist("10.0.0.0/8")) == hash(alist("10.0.0.0/8"))
    assert not AddressList() and len(AddressList()) == 0
    assert repr(alist("10.0.0.0/8")) == "AddressList([10.0.0.0/8])"


def test_decide() -> None:
    everyone, nobody = AddressList(), AddressList()
    assert decide(everyone, nobody, "203.0.113.5")  # empty only_from: everyone
    assert decide(everyone, nobody, "")  # no lists: non-IP peers pass too
    ours = alist("10.0.0.0/8", "2001:db8::/32")
    bad = alist("10.6.6.0/24")
    assert decide(ours, bad, "10.1.1.1") and decide(ours, bad, "2001:db8::5")
    assert not decide(ours, bad, "10.6.6.6")  # no_access wins over only_from
    assert not decide(ours, bad, "192.0.2.1")
    assert not decide(everyone, bad, "::ffff:10.6.6.7")
    assert not decide(ours, nobody, "")  # not an IP: only_from cannot vouch for it
    assert access_reason(ours, bad, parse_ip("10.6.6.6")) == "no_access"
    assert access_reason(ours, bad, parse_ip("192.0.2.1")) == "only_from"
    assert access_reason(ours, bad, parse_ip("10.1.1.1")) == ""
    assert access_reason(ours, bad, None) == "only_from"
    assert access_reason(everyone, bad, None) == ""


def test_shadowed_only_from_entries() -> None:
    only = alist("10.1.0.0/16", "192.0.2.0/24", "2001:db8::/48", "198.51.100.0/24")
    no = alist(
        "10.0.0.0/8", "192.0.2.0/25", "2001:db8::/32", "198.51.100.0/25", "198.51.100.128/25"
    )
    assert [str(n) for n in shadowed(only, no)] == [
        "10.1.0.0/16",
        "198.51.100.0/24",  # covered by two entries together
        "2001:db8::/48",
    ]
    assert shadowed(only, AddressList()) == []
    assert shadowed(AddressList(), no) == []


def test_source_keys() -> None:
    k = source_key("192.0.2.77", 24, 64)
    assert k == source_key("192.0.2.1", 24, 64) == source_key("::ffff:192.0.2.200", 24, 64)
    assert k != source_key("192.0.3.1", 24, 64)
    assert format_key(k) == "192.0.2.0/24"
    assert source_key("192.0.2.77", 32, 128) != source_key("192.0.2.76", 32, 128)
    k6 = source_key("2001:db8:1:2:3::4", 24, 64)
    assert k6 == source_key("2001:db8:1:2::", 24, 64) and format_key(k6) == "2001:db8:1:2::/64"
    assert format_key(source_key("10.0.0.1", 0, 0)) == "0.0.0.0/0"
    assert format_key(source_key("::1", 0, 0)) == "::/0"
    assert source_key("", 24, 64) == "" and format_key("/run/s") == "/run/s"


# --- properties against an ipaddress oracle ---

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
V4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
V6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)
MAPPED_V6 = st.integers(0, 2**32 - 1).map(lambda v: ipaddress.IPv6Address(0xFFFF << 32 | v))


@st.composite
def cidr_texts(draw: st.DrawFn) -> str:
    """ADDR/LEN texts, host bits sometimes set, mapped networks included."""
    addr: IPAddress = draw(V4 | V6 | MAPPED_V6)
    bits = addr.max_prefixlen
    low = 96 if addr.version == 6 and addr.ipv4_mapped is not None and draw(st.booleans()) else 0
    prefix = draw(st.integers(low, bits))
    if draw(st.booleans()):  # clear the host bits, as most lists are written
        addr = ipaddress.ip_network((addr, prefix), strict=False).network_address
    return f"{addr}/{prefix}" if draw(st.booleans()) or prefix != bits else str(addr)


def oracle_network(text: str) -> IPNetwork:
    n = ipaddress.ip_network(text, strict=False)
    if isinstance(n, ipaddress.IPv6Network) and n.prefixlen >= 96:
        v4 = n.network_address.ipv4_mapped
        if v4 is not None:
            return ipaddress.IPv4Network((v4, n.prefixlen - 96))
    return n


def oracle_peer(addr: IPAddress) -> IPAddress:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def peer_texts(addr: IPAddress) -> list[str]:
    """How the kernel and ipaddress may spell a peer (mapped both ways)."""
    texts = [str(addr)]
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        texts.append(f"::ffff:{addr.ipv4_mapped}")
    if isinstance(addr, ipaddress.IPv4Address):
        texts.append(f"::ffff:{addr}")
    return texts


@st.composite
def lists_and_peers(draw: st.DrawFn) -> tuple[list[str], list[IPAddress]]:
    texts = draw(st.lists(cidr_texts(), max_size=12))
    peers: list[IPAddress] = draw(st.lists(V4 | V6 | MAPPED_V6, max_size=6))
    for text in texts:  # peers inside (and at the edges of) the listed networks
        n = oracle_network(text)
        if draw(st.booleans()):
            peers.append(n.network_address + draw(st.integers(0, n.num_addresses - 1)))
            peers.append(n.broadcast_address)
            if int(n.broadcast_address) < (1 << n.max_prefixlen) - 1:
                peers.append(n.broadcast_address + 1)
    return texts, peers


@given(lists_and_peers())
def test_matcher_agrees_with_ipaddress(case: tuple[list[str], list[IPAddress]]) -> None:
    texts, peers = case
    lst = AddressList(net(t) for t in texts)
    oracle = [oracle_network(t) for t in texts]
    for peer in peers:
        p = oracle_peer(peer)
        expected = any(p.version == n.version and p in n for n in oracle)
        for spelling in peer_texts(peer):
            assert lst.matches(spelling) == expected, (spelling, texts)


@given(cidr_texts())
def test_parse_cidr_agrees_with_ipaddress(text: str) -> None:
    parsed = net(text)
    expected = oracle_network(text)
    assert str(parsed) == str(expected)
    assert (parsed.note != "") == (
        ipaddress.ip_network(text, strict=False).network_address != ipaddress.ip_address(
            text.partition("/")[0]
        )
    )
    assert net(str(parsed)) == parsed  # the canonical form parses back to itself


@given(st.lists(cidr_texts(), max_size=8), st.lists(cidr_texts(), max_size=8))
def test_shadowed_agrees_with_collapse(only: list[str], no: list[str]) -> None:
    got = shadowed(AddressList(map(net, only)), AddressList(map(net, no)))
    no_nets = [oracle_network(t) for t in no]
    v4 = list(ipaddress.collapse_addresses(n for n in no_nets if n.version == 4))
    v6 = list(ipaddress.collapse_addresses(n for n in no_nets if n.version == 6))

    def covered(n: IPNetwork) -> bool:
        if isinstance(n, ipaddress.IPv4Network):
            return any(n.subnet_of(c) for c in v4)
        return any(n.subnet_of(c) for c in v6)

    expected = sorted({str(o) for o in map(oracle_network, only) if covered(o)})
    assert sorted(str(n) for n in got) == expected


@given(
    st.lists(V4 | V6 | MAPPED_V6, min_size=2, max_size=6),
    st.integers(0, 32),
    st.integers(0, 128),
)
def test_source_key_is_the_network_at_the_prefix(
    addrs: list[IPAddress], p4: int, p6: int
) -> None:
    def oracle(a: IPAddress) -> IPNetwork:
        a = oracle_peer(a)
        return ipaddress.ip_network((a, p4 if a.version == 4 else p6), strict=False)

    for a in addrs:
        key = source_key(str(a), p4, p6)
        assert isinstance(key, int)
        assert format_key(key) == str(oracle(a))
        for b in addrs:
            assert (key == source_key(str(b), p4, p6)) == (oracle(a) == oracle(b))
    # keys of one family at different prefix lengths never collide either
    first = parse_ip(str(addrs[0]))
    assert first is not None
    assert len({source_key_addr(first, q, q) for q in range(33)}) == 33


def test_link_local_entries_match_only_on_their_interface() -> None:
    """Issue 21: the peer's scope was dropped, so proxy_from=fe80::5 (then refused in the
    config only when scoped) trusted fe80::5 on another link. An entry names its link."""
    net = parse_cidr("fe80::5%eth0")
    assert isinstance(net, Network) and net.scope == "eth0" and str(net) == "fe80::5%eth0/128"
    lst = AddressList([net])
    assert lst.matches("fe80::5%eth0")
    assert not lst.matches("fe80::5%eth1")
    assert not lst.matches("fe80::5")  # a link-local peer without its link matches no entry
    assert not lst.matches("fe80::6%eth0")
    wide = parse_cidr("fe80::%eth1/10")
    assert isinstance(wide, Network)
    assert AddressList([wide]).matches("fe80::1234%eth1")
    assert not AddressList([wide]).matches("fe80::1234%eth0")
    everyone = parse_cidr("::/0")
    assert isinstance(everyone, Network)
    assert AddressList([everyone]).matches("fe80::5%eth7")  # as written: every IPv6 peer
    # no_access wins on the peer's own link only
    assert access_reason(AddressList([everyone]), lst, parse_ip("fe80::5%eth0"),
                         "eth0") == "no_access"
    assert access_reason(AddressList([everyone]), lst, parse_ip("fe80::5%eth1"), "eth1") == ""
    assert AddressList([everyone]).covers(net) and lst.covers(net)
    assert not AddressList([parse_cidr("fe80::5%eth1")]).covers(net)  # type: ignore[list-item]


def test_link_local_sources_are_keyed_per_link_and_address() -> None:
    """fe80::/64 is every host of every link: a link-local peer is a source of its own."""
    assert source_key("fe80::5%eth0", 32, 64) == "fe80::5%eth0"
    assert source_key("fe80::5%eth0", 32, 64) != source_key("fe80::5%eth1", 32, 64)
