"""proxyproto.parse: examples from HAProxy's spec, and Hypothesis properties (never raises,
round-trips the encoders with any payload after the header, every strict prefix is
NeedMore with an honest lower bound, corrupted signatures and extensions of Invalid
stay Invalid). Profiles: hypothesis_profiles.py."""

from __future__ import annotations

import ipaddress

import hypothesis_profiles  # noqa: F401  (registers and loads the profile)
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from poolinetd.net.proxyproto import (
    MAX_HEADER,
    MIN_HEADER,
    V1_MAX_LINE,
    V1_SIGNATURE,
    V2_FIXED,
    V2_MAX_HEADER,
    V2_SIGNATURE,
    Address,
    Family,
    Header,
    Invalid,
    NeedMore,
    encode_v1,
    encode_v2,
    parse,
)

# --- examples ---------------------------------------------------------------------------


def test_v1_tcp4_with_payload_consumes_exactly_the_line() -> None:
    line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    r = parse(line + b"GET / HTTP/1.1\r\n")
    assert r == Header(len(line), 1, "PROXY", "inet", ("192.168.0.1", 56324), ("192.168.0.11", 443))


def test_v1_tcp6_canonicalises_hosts() -> None:
    r = parse(b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::FFFF:10.0.0.1 1 65535\r\n")
    assert isinstance(r, Header) and r.family == "inet6"
    assert r.src == ("2001:db8::1", 1)
    assert r.dst == (str(ipaddress.IPv6Address("::ffff:10.0.0.1")), 65535)


@pytest.mark.parametrize(
    "line", [b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ffff::2 65535 65535\r\n"]
)
def test_v1_unknown_means_the_real_addresses(line: bytes) -> None:
    assert parse(line + b"data") == Header(len(line), 1, "PROXY", "unspec", None, None)


def test_v1_worst_case_107_bytes_is_accepted_and_108_refused() -> None:
    v6 = "ffff:" * 7 + "ffff"
    line = f"PROXY UNKNOWN {v6} {v6} 65535 65535\r\n".encode()
    assert len(line) == V1_MAX_LINE
    assert isinstance(parse(line), Header)
    longer = line.replace(b"65535 65535", b"65535 655350")
    assert parse(longer) == Invalid("v1 line longer than 107 bytes")
    assert parse(longer[:-1]) == Invalid("v1 line longer than 107 bytes")  # CR at byte 108
    assert parse(b"PROXY UNKNOWN " + b"x" * 200) == Invalid("v1 line longer than 107 bytes")


@pytest.mark.parametrize(
    "data",
    [
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",  # bare LF
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX",  # CR without LF
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",  # extra field
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",  # missing field
        b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",  # double space
        b"PROXY TCP4 1.2.3.04 5.6.7.8 1 2\r\n",  # leading zero (octal confusion)
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",  # leading zero in a port
        b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
        b"PROXY TCP4 ::1 ::2 1 2\r\n",  # family mismatch
        b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP6 fe80::1%eth0 ::2 1 2\r\n",  # scope ids are not addresses on the wire
        b"PROXY TCP6 1::2::3 ::2 1 2\r\n",
        b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY UNKNOWNX\r\n",
        b"PROXY TCP4\r\n",
        b"PROXY \r\n",
        b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    ],
)
def test_v1_malformed_lines_are_invalid(data: bytes) -> None:
    assert isinstance(parse(data), Invalid)


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.0\r\n",
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"\x16\x03\x01\x02\x00",  # a TLS ClientHello
        b"H",
        b"\x00",
        b"PR0",
        b"PROXY\t",
        b"PROXY X",
        b"PROXY TCP4 a",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 ",
        b"\r\n\r\n\x01",
        b"\r\n\r\n\x00\r\nQUIT\n\x10",  # version 1 in a v2 header
        b"\r\n\r\n\x00\r\nQUIT\n\x22",  # command 2
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x41",  # family 4
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x13",  # transport 3
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x12",  # PROXY over UDP on a stream connection
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x10",  # INET with UNSPEC transport
    ],
)
def test_non_proxy_or_bad_starts_are_refused_from_the_first_bytes(data: bytes) -> None:
    """No wait for the deadline: the verdict comes as soon as the bytes rule it out."""
    assert isinstance(parse(data), Invalid)


def test_empty_and_signature_prefixes_need_more() -> None:
    assert parse(b"") == NeedMore(MIN_HEADER)
    assert parse(b"P") == NeedMore(MIN_HEADER - 1)
    assert parse(V2_SIGNATURE[:5]) == NeedMore(V2_FIXED - 5)
    assert parse(V2_SIGNATURE + b"\x21\x11\x00") == NeedMore(1)
    assert parse(V2_SIGNATURE + b"\x21\x11\x00\x0c") == NeedMore(12)


def test_v2_inet_inet6_and_tlvs() -> None:
    tlvs = ((0x05, b"unique"), (0x04, b""), (0x20, b"\x01\x00\x00\x00\x00"))
    hdr = encode_v2(("10.0.0.1", 1234), ("10.0.0.2", 80), tlvs=tlvs)
    assert parse(hdr + b"\r\n\r\n") == Header(
        len(hdr), 2, "PROXY", "inet", ("10.0.0.1", 1234), ("10.0.0.2", 80), tlvs
    )
    hdr6 = encode_v2(("2001:db8::1", 0), ("::1", 65535))
    assert parse(hdr6) == Header(len(hdr6), 2, "PROXY", "inet6", ("2001:db8::1", 0), ("::1", 65535))


def test_v2_local_skips_any_block_and_uses_the_real_addresses() -> None:
    assert parse(encode_v2(None, None, command="LOCAL")) == Header(
        V2_FIXED, 2, "LOCAL", "unspec", None, None
    )
    # Receivers must honour the length even for LOCAL, whatever the block holds.
    junk = V2_SIGNATURE + b"\x20\x11\x00\x05" + b"\xff" * 5
    assert parse(junk + b"x") == Header(len(junk), 2, "LOCAL", "inet", None, None)


def test_v2_unspec_and_unix_fall_back_to_the_real_addresses() -> None:
    unspec = V2_SIGNATURE + b"\x21\x00\x00\x03abc"
    assert parse(unspec) == Header(len(unspec), 2, "PROXY", "unspec", None, None)
    unix = V2_SIGNATURE + b"\x21\x31" + (216 + 4).to_bytes(2, "big") + b"/s".ljust(216, b"\0")
    unix += b"\x04\x00\x01z"
    assert parse(unix) == Header(len(unix), 2, "PROXY", "unix", None, None, ((4, b"z"),))


@pytest.mark.parametrize(
    ("fam", "block", "reason"),
    [
        (0x11, b"\0" * 11, "v2 length shorter than the address block"),
        (0x21, b"\0" * 35, "v2 length shorter than the address block"),
        (0x31, b"\0" * 215, "v2 length shorter than the address block"),
        (0x11, b"\0" * 12 + b"\x01\x00", "v2 TLV lengths inconsistent"),  # partial TLV head
        (0x11, b"\0" * 12 + b"\x01\x00\x05abcd", "v2 TLV lengths inconsistent"),  # overrun
        (0x11, b"\0" * 12 + b"\x01\x00\x00\x02\xff\xff", "v2 TLV lengths inconsistent"),
    ],
)
def test_v2_inconsistent_lengths_are_invalid(fam: int, block: bytes, reason: str) -> None:
    data = V2_SIGNATURE + bytes([0x21, fam]) + len(block).to_bytes(2, "big") + block
    assert parse(data + b"payload") == Invalid(reason)


def test_v2_oversized_is_refused_as_soon_as_the_length_is_known() -> None:
    fixed = V2_SIGNATURE + b"\x21\x11" + (MAX_HEADER - V2_FIXED + 1).to_bytes(2, "big")
    assert parse(fixed) == Invalid("v2 header larger than the limit")
    ok = encode_v2(("1.1.1.1", 1), ("2.2.2.2", 2), tlvs=[(0xE0, b"x" * 5000)])
    assert parse(ok) == Invalid("v2 header larger than the limit")
    assert isinstance(parse(ok, max_header=V2_MAX_HEADER), Header)
    # Below the v1 bound the limit is clamped, so v1 lines are always decidable.
    assert isinstance(parse(b"PROXY UNKNOWN\r\n", max_header=1), Header)


def test_encoders_refuse_bad_input() -> None:
    with pytest.raises(ValueError):
        encode_v1(("1.2.3.4", 1), ("::1", 2))
    with pytest.raises(ValueError):
        encode_v1(("1.2.3.4", 1), None)
    with pytest.raises(ValueError):
        encode_v1(("1.2.3.4", 70000), ("1.2.3.4", 1))
    with pytest.raises(ValueError):
        encode_v2(("1.2.3.4", 1), ("1.2.3.4", 1), command="LOCAL")
    with pytest.raises(ValueError):
        encode_v2(("1.2.3.4", 1), ("::1", 1))


# --- properties -------------------------------------------------------------------------

PORT = st.integers(0, 0xFFFF)
V4 = st.ip_addresses(v=4).map(str)
V6 = st.ip_addresses(v=6).map(str)
PAIR = st.one_of(
    st.tuples(st.tuples(V4, PORT), st.tuples(V4, PORT)),
    st.tuples(st.tuples(V6, PORT), st.tuples(V6, PORT)),
)
TLVS = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4)
PAYLOAD = st.binary(max_size=64)


@st.composite
def valid_headers(draw: st.DrawFn) -> tuple[bytes, Header]:
    """A header from the encoders and what parse must say about it."""
    kind = draw(st.sampled_from(["v1", "v1-unknown", "v2", "v2-local", "v2-unspec"]))
    if kind == "v1-unknown":
        raw = encode_v1(None, None)
        return raw, Header(len(raw), 1, "PROXY", "unspec", None, None)
    if kind == "v2-local":
        raw = encode_v2(None, None, command="LOCAL", tlvs=draw(TLVS))
        return raw, Header(len(raw), 2, "LOCAL", "unspec", None, None)
    if kind == "v2-unspec":
        raw = encode_v2(None, None, tlvs=draw(TLVS))
        return raw, Header(len(raw), 2, "PROXY", "unspec", None, None)
    src, dst = draw(PAIR)
    family: Family = "inet" if ipaddress.ip_address(src[0]).version == 4 else "inet6"
    if kind == "v1":
        raw = encode_v1(src, dst)
        return raw, Header(len(raw), 1, "PROXY", family, _canon(src), _canon(dst))
    tlvs = tuple(draw(TLVS))
    raw = encode_v2(src, dst, tlvs=tlvs)
    return raw, Header(len(raw), 2, "PROXY", family, _canon(src), _canon(dst), tlvs)


def _canon(addr: Address) -> Address:
    return (str(ipaddress.ip_address(addr[0])), addr[1])


# Arbitrary bytes rarely get past the first byte; these starts drive the fuzz deeper.
STARTS = st.sampled_from(
    [
        b"",
        V1_SIGNATURE,
        b"PROXY TCP4 ",
        b"PROXY TCP6 ",
        b"PROXY UNKNOWN",
        V2_SIGNATURE,
        V2_SIGNATURE + b"\x21\x11",
        V2_SIGNATURE + b"\x21\x21",
        V2_SIGNATURE + b"\x20\x00",
        V2_SIGNATURE + b"\x21\x11\x00\x0c",
    ]
)
ALPHABET = st.sampled_from(list(b"0123456789abcdef.: \r\nPROXYTCUNKW\x00\x01\x03\x0c\x11\xff"))
FUZZ = st.builds(
    lambda start, tail: start + tail,
    STARTS,
    st.binary(max_size=150) | st.lists(ALPHABET, max_size=120).map(bytes),
)


@given(FUZZ, st.integers(0, 2 * MAX_HEADER))
def test_total_and_consistent_on_any_bytes(data: bytes, max_header: int) -> None:
    r = parse(data, max_header)
    assert isinstance(r, NeedMore | Invalid | Header)
    if isinstance(r, NeedMore):
        assert r.at_least >= 1
        assert len(data) < max(max_header, V1_MAX_LINE)  # a full peek always decides
    if isinstance(r, Header):
        assert 0 < r.consumed <= len(data)
        assert (r.src is None) == (r.dst is None)


@given(FUZZ, st.binary(min_size=1, max_size=40))
def test_verdicts_never_change_when_more_bytes_arrive(data: bytes, more: bytes) -> None:
    """Invalid stays Invalid, a Header is the same whatever follows it: exact consumption."""
    r = parse(data)
    if isinstance(r, Invalid):
        assert isinstance(parse(data + more), Invalid)
    if isinstance(r, Header):
        assert parse(data[: r.consumed] + more) == r


@given(valid_headers(), PAYLOAD)
def test_round_trip_with_any_payload(case: tuple[bytes, Header], payload: bytes) -> None:
    raw, expected = case
    assert parse(raw + payload) == expected


@given(valid_headers(), st.data())
def test_every_strict_prefix_needs_more_with_an_honest_bound(
    case: tuple[bytes, Header], data: st.DataObject
) -> None:
    raw, _ = case
    cut = data.draw(st.integers(0, len(raw) - 1))
    r = parse(raw[:cut])
    assert isinstance(r, NeedMore)
    assert 1 <= r.at_least <= len(raw) - cut


@given(valid_headers(), st.data())
def test_a_corrupted_signature_is_invalid(case: tuple[bytes, Header], data: st.DataObject) -> None:
    raw, _ = case
    sig_len = len(V1_SIGNATURE) if raw.startswith(V1_SIGNATURE) else len(V2_SIGNATURE)
    i = data.draw(st.integers(0, sig_len - 1))
    bad = data.draw(st.integers(0, 255).filter(lambda b: b != raw[i]))
    corrupted = raw[:i] + bytes([bad]) + raw[i + 1 :]
    assert isinstance(parse(corrupted), Invalid)
    # ... and as early as that byte, unless it turned into the other version's first byte.
    if i > 0 or bad not in (V1_SIGNATURE[0], V2_SIGNATURE[0]):
        assert isinstance(parse(corrupted[: i + 1]), Invalid)


@given(valid_headers(), st.data())
def test_single_byte_mutations_never_raise_or_overrun(
    case: tuple[bytes, Header], data: st.DataObject
) -> None:
    raw, _ = case
    i = data.draw(st.integers(0, len(raw) - 1))
    b = data.draw(st.integers(0, 255))
    assume(b != raw[i])
    mutated = raw[:i] + bytes([b]) + raw[i + 1 :]
    r = parse(mutated)
    if isinstance(r, Header):
        assert r.consumed <= len(mutated)
