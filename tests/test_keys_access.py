"""only_from / no_access, source prefixes, block_time, reuseport, PROXY protocol keys:
parsed, diagnosed at FILE:LINE: field N, resolved into Service fields (issues 9 and 11)."""

from __future__ import annotations

import pytest
from config_helpers import errors, load, only, warnings

from poolinetd.config.spec import Options, Severity
from poolinetd.net.netmatch import AddressList, Network, parse_cidr


def nets(*words: str) -> AddressList:
    out: list[Network] = []
    for word in words:
        got = parse_cidr(word)
        assert not isinstance(got, str), got
        out.append(got)
    return AddressList(out)


ECHO = "7007 on protocol=tcp, user=nobody, args=echo"


def test_lists_resolve_into_the_service() -> None:
    svc = only(f"{ECHO}, only_from=127.0.0.0/8 ::1 10.1.0.0/16, no_access=10.1.2.0/24;")
    assert svc.only_from == nets("127.0.0.0/8", "::1", "10.1.0.0/16")
    assert svc.no_access == nets("10.1.2.0/24")
    assert svc.only_from.matches("127.0.0.9") and not svc.only_from.matches("10.2.0.1")


def test_without_lists_everyone_may_connect() -> None:
    svc = only(f"{ECHO};")
    assert not svc.only_from and not svc.no_access and not svc.proxy_from
    assert (svc.source_v4_prefix, svc.source_v6_prefix, svc.block_time) == (32, 64, 0.0)
    assert (svc.reuseport, svc.proxy_protocol) == (False, False)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("10.0.0.0/33", "only_from: '10.0.0.0/33': prefix length 33 out of range 0-32 for IPv4"),
        ("::/129", "only_from: '::/129': prefix length 129 out of range 0-128 for IPv6"),
        ("example.com", "only_from: 'example.com': 'example.com' is not an IPv4 or IPv6 address"),
        ("10.0.0.0/255.0.0.0", "(netmask notation is not accepted)"),
        ("[::1]", "write IPv6 networks without brackets"),
    ],
)
def test_a_bad_cidr_is_an_error_at_its_field(value: str, message: str) -> None:
    (err,) = errors(f"{ECHO}, only_from={value};")
    assert err.startswith(f"/etc/t.conf:1: field 6 'only_from={value}': "), err
    assert message in err


def test_host_bits_set_is_a_warning_with_the_network_meant() -> None:
    text = f"{ECHO}, no_access=10.1.2.3/8;"
    assert warnings(text) == [
        "/etc/t.conf:1: field 6 'no_access=10.1.2.3/8': warning: no_access: host bits set: "
        "10.1.2.3/8 is taken as 10.0.0.0/8 (write 10.0.0.0/8 to say what is meant)"
    ]
    assert only(text).no_access == nets("10.0.0.0/8")


def test_an_empty_list_is_an_error_that_says_how_to_allow_everyone() -> None:
    (err,) = errors(f"{ECHO}, only_from=;")
    assert "only_from needs at least one ADDR[/LEN]" in err
    assert "only_from=0.0.0.0/0 ::/0" in err


def test_contradictory_lists_are_an_error_naming_only_from() -> None:
    (err,) = errors(f"{ECHO},\n    only_from=10.1.0.0/16 10.2.0.0/16,\n"
                    "    no_access=10.0.0.0/8;")  # fmt: skip
    assert err.startswith("/etc/t.conf:2: field 6 'only_from=10.1.0.0/16 10.2.0.0/16': "
                          "only_from and no_access contradict"), err
    # Coverage by the union of no_access entries counts too.
    assert errors(f"{ECHO}, only_from=10.0.0.0/8, no_access=10.0.0.0/9 10.128.0.0/9;")


def test_a_partly_shadowed_only_from_is_a_warning() -> None:
    text = f"{ECHO}, only_from=10.0.0.0/8 192.0.2.0/24, no_access=192.0.2.0/25 192.0.2.128/25;"
    assert errors(text) == []
    (warn,) = warnings(text)
    assert "only_from entries inside no_access allow nobody: 192.0.2.0/24" in warn


def test_contradiction_between_the_entry_and_defaults_is_found_at_resolution() -> None:
    text = f"defaults on no_access=0.0.0.0/0;\n{ECHO}, only_from=127.0.0.1;\n"
    (err,) = errors(text)
    assert err.startswith("/etc/t.conf:2: field 6 'only_from=127.0.0.1': only_from and "
                          "no_access contradict"), err


def test_contradiction_inside_defaults_is_an_error_at_the_defaults_line() -> None:
    (err,) = errors("defaults on only_from=10.0.0.0/8, no_access=10.0.0.0/8;\n")
    assert err.startswith("/etc/t.conf:1: field 3 'only_from=10.0.0.0/8': only_from and "
                          "no_access contradict"), err


def test_lists_come_from_defaults_and_the_entry_replaces_them() -> None:
    loaded = load("defaults on only_from=10.0.0.0/8, no_access=10.9.0.0/16;\n"
                  f"{ECHO};\n7009 on protocol=tcp, user=nobody, args=discard, "
                  "only_from=0.0.0.0/0 ::/0;\n")  # fmt: skip
    assert loaded.errors == ()
    first, second = loaded.services
    assert first.only_from == nets("10.0.0.0/8") and first.no_access == nets("10.9.0.0/16")
    assert second.only_from == nets("0.0.0.0/0", "::/0")
    assert second.no_access == nets("10.9.0.0/16")


def test_lists_on_a_unix_service() -> None:
    (err,) = errors("/run/e.sock on socktype=stream, protocol=unix, user=nobody, args=echo, "
                    "only_from=127.0.0.1;")  # fmt: skip
    assert "field 7 'only_from=127.0.0.1': only_from needs an IP service" in err
    # From defaults they do not apply: unix peers have no address to match.
    svc = only("defaults on only_from=127.0.0.1;\n/run/echo stream unix nowait nobody internal")
    assert not svc.only_from


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("source_v4_prefix=33", "source_v4_prefix must be a prefix length from 0 to 32"),
        ("source_v6_prefix=129", "source_v6_prefix must be a prefix length from 0 to 128"),
        ("source_v4_prefix=-1", "source_v4_prefix must be a prefix length from 0 to 32"),
        ("block_time=-5", "block_time must be a number of seconds >= 0"),
        ("block_time=inf", "block_time must be a number of seconds >= 0"),
        ("reuseport=maybe", "reuseport must be yes or no"),
        ("proxy_protocol=1", "proxy_protocol must be yes or no"),
    ],
)
def test_bad_values(option: str, message: str) -> None:
    (err,) = errors(f"{ECHO}, {option};")
    assert err.startswith(f"/etc/t.conf:1: field 6 '{option}': {message}"), err


def test_prefixes_block_time_reuseport_resolve_with_defaults() -> None:
    loaded = load("defaults on source_v4_prefix=24, block_time=30, reuseport=yes;\n"
                  f"{ECHO}, source_v6_prefix=48;\n"
                  "7009 on protocol=tcp, user=nobody, args=discard, source_v4_prefix=0, "
                  "block_time=0, reuseport=no;\n")  # fmt: skip
    assert loaded.errors == ()
    a, b = loaded.services
    assert (a.source_v4_prefix, a.source_v6_prefix, a.block_time, a.reuseport) == (
        24, 48, 30.0, True)
    assert (b.source_v4_prefix, b.source_v6_prefix, b.block_time, b.reuseport) == (
        0, 64, 0.0, False)


def test_command_line_options_come_after_the_file() -> None:
    cli = Options(source_v4_prefix=16, reuseport=True)
    svc = only(f"defaults on source_v4_prefix=24;\n{ECHO};", cli)
    assert (svc.source_v4_prefix, svc.reuseport) == (24, True)


# -- PROXY protocol ---------------------------------------------------------------------------


def test_proxy_protocol_with_trusted_proxies() -> None:
    svc = only(f"{ECHO}, proxy_protocol=yes, proxy_from=127.0.0.1 10.0.0.0/24;")
    assert svc.proxy_protocol and svc.proxy_from == nets("127.0.0.1", "10.0.0.0/24")


def test_proxy_from_may_come_from_defaults() -> None:
    svc = only(f"defaults on proxy_from=10.0.0.5;\n{ECHO}, proxy_protocol=yes;")
    assert svc.proxy_protocol and svc.proxy_from == nets("10.0.0.5")
    # ...and a service without proxy_protocol keeps none (nothing to trust).
    assert not only(f"defaults on proxy_from=10.0.0.5;\n{ECHO};").proxy_from


def test_proxy_protocol_without_proxy_from_is_an_error() -> None:
    assert errors(f"{ECHO}, proxy_protocol=yes;") == [
        "/etc/t.conf:1: field 6 'proxy_protocol=yes': proxy_protocol=yes needs proxy_from=..., "
        "the proxies trusted to send the header (write e.g. proxy_from=10.0.0.5 10.0.0.6)"
    ]


@pytest.mark.parametrize(
    "entry",
    [
        "7007 on protocol=udp, user=nobody, args=echo",
        "7007 on protocol=tcp, wait=yes, user=nobody, exec=/bin/cat, args=cat",
        "/run/e.sock on socktype=seqpacket, protocol=unix, user=nobody, args=echo",
    ],
)
def test_proxy_protocol_only_on_stream_nowait_services(entry: str) -> None:
    (err,) = errors(f"{entry}, proxy_protocol=yes, proxy_from=127.0.0.1;")
    assert "proxy_protocol=yes needs a stream tcp or unix nowait service" in err


def test_proxy_protocol_on_a_unix_stream_service_needs_no_proxy_from() -> None:
    svc = only("/run/e.sock on socktype=stream, protocol=unix, user=nobody, args=echo, "
               "proxy_protocol=yes;")  # fmt: skip
    assert svc.proxy_protocol and not svc.proxy_from
    (err,) = errors("/run/e.sock on socktype=stream, protocol=unix, user=nobody, args=echo, "
                    "proxy_protocol=yes, proxy_from=127.0.0.1;")  # fmt: skip
    assert "proxy_from needs an IP service" in err


def test_proxy_from_without_proxy_protocol_is_a_warning() -> None:
    text = f"{ECHO}, proxy_from=127.0.0.1;"
    assert errors(text) == []
    (warn,) = load(text).warnings
    assert warn.severity is Severity.WARNING and warn.field == 6
    assert "proxy_from without proxy_protocol=yes is ignored" in warn.message
    assert not only(text).proxy_from


def test_proxy_protocol_is_not_a_default() -> None:
    (err,) = errors("defaults on proxy_protocol=yes;")
    assert "key not allowed in defaults 'proxy_protocol'" in err
