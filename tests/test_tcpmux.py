"""tcpmux.parse_request and the replies: examples, and Hypothesis properties (never raises,
exact consumption whatever follows, every strict prefix is NeedMore, verdicts are stable
as bytes arrive). Profiles: hypothesis_profiles.py."""

from __future__ import annotations

import hypothesis_profiles  # noqa: F401  (registers and loads the profile)
import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolinetd.net.tcpmux import (
    ERROR_READING,
    GO,
    MAX_NAME,
    MAX_REQUEST,
    NOT_AVAILABLE,
    Invalid,
    NeedMore,
    Request,
    help_reply,
    negative,
    parse_request,
)


@pytest.mark.parametrize(
    ("data", "name", "consumed"),
    [
        (b"echo\r\n", "echo", 6),
        (b"Echo\n", "echo", 5),  # bare LF, as FreeBSD accepts
        (b"HELP\r\nmore", "help", 6),
        (b"  My-Service.1 \t\r\nDATA", "my-service.1", 18),
        (b"x" * MAX_NAME + b"\r\n", "x" * MAX_NAME, MAX_REQUEST),
    ],
)
def test_requests(data: bytes, name: str, consumed: int) -> None:
    assert parse_request(data) == Request(name, consumed)


def test_help_is_recognised_in_any_case() -> None:
    for spelling in (b"help", b"HELP", b"HeLp"):
        r = parse_request(spelling + b"\r\n")
        assert isinstance(r, Request) and r.is_help
    r = parse_request(b"helpx\r\n")
    assert isinstance(r, Request) and not r.is_help


@pytest.mark.parametrize(
    "data",
    [
        b"\r\n",
        b"   \n",
        b"two words\r\n",
        b"echo\rX",
        b"ec\x00ho",
        b"\x16\x03\x01",
        b"caf\xc3\xa9",
        b"x" * (MAX_NAME + 1),
        b"x" * MAX_NAME + b"y\r\n",
    ],
)
def test_invalid_requests(data: bytes) -> None:
    assert isinstance(parse_request(data), Invalid)


def test_partial_lines_need_more() -> None:
    assert parse_request(b"") == NeedMore(1)
    assert parse_request(b"ech") == NeedMore(1)
    assert parse_request(b"echo\r") == NeedMore(1)
    assert parse_request(b"x" * MAX_NAME) == NeedMore(1)


def test_replies() -> None:
    assert GO == b"+Go\r\n"
    assert NOT_AVAILABLE == b"-Service not available\r\n"
    assert ERROR_READING.startswith(b"-") and ERROR_READING.endswith(b"\r\n")
    assert negative("bad\r\nname\xe9") == b"-bad??name?\r\n"
    assert help_reply(["echo", "Finger", "ECHO", "date"]) == b"echo\r\nFinger\r\ndate\r\n"
    assert help_reply([]) == b""


NAME = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=MAX_NAME)
BLANKS = st.text(" \t", max_size=3)
EOL = st.sampled_from([b"\r\n", b"\n"])


@st.composite
def lines(draw: st.DrawFn) -> tuple[bytes, str]:
    name = draw(NAME)
    line = (draw(BLANKS) + name + draw(BLANKS)).encode() + draw(EOL)
    if len(line) > MAX_REQUEST:  # blanks count against FreeBSD's bound too
        line = name.encode() + b"\r\n"
    return line, name.lower()


@given(
    st.binary(max_size=MAX_REQUEST + 20)
    | st.lists(st.sampled_from(list(b"ab \t\r\n\x00"))).map(bytes)
)
def test_total_on_any_bytes(data: bytes) -> None:
    r = parse_request(data)
    assert isinstance(r, NeedMore | Invalid | Request)
    if isinstance(r, Request):
        assert 0 < r.consumed <= min(len(data), MAX_REQUEST)
        assert r.name_lower == r.name_lower.lower() and r.name_lower
    if isinstance(r, NeedMore):
        assert r.at_least >= 1 and len(data) < MAX_REQUEST


@given(lines(), st.binary(max_size=64))
def test_exact_consumption_whatever_follows(case: tuple[bytes, str], tail: bytes) -> None:
    line, name = case
    assert parse_request(line + tail) == Request(name, len(line))


@given(lines(), st.data())
def test_every_strict_prefix_needs_more(case: tuple[bytes, str], data: st.DataObject) -> None:
    line, _ = case
    cut = data.draw(st.integers(0, len(line) - 1))
    assert parse_request(line[:cut]) == NeedMore(1)


@given(st.binary(max_size=MAX_REQUEST + 5), st.binary(min_size=1, max_size=10))
def test_verdicts_are_stable_as_bytes_arrive(data: bytes, more: bytes) -> None:
    r = parse_request(data)
    if isinstance(r, Invalid):
        assert isinstance(parse_request(data + more), Invalid)
    if isinstance(r, Request):
        assert parse_request(data[: r.consumed] + more) == r
