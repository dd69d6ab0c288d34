"""NetBSD's key-values notation as NetBSD's own files write it: blanks around '=', options
on indented lines, '=' and values on the lines after their key (issue 9)."""

from __future__ import annotations

from config_fakes import fake_lookups

from poolinetd.config.inetdconf import parse
from poolinetd.config.resolve import load_text
from poolinetd.config.spec import Limits, Protocol, SocketType

# Shaped like the key-values examples in NetBSD's inetd.conf and inetd(8).
NETBSD = """\
# key-values definitions, NetBSD style
echo on
\tsocktype = stream,
\tprotocol = tcp,
\tuser = root;

daytime on
\tprotocol = udp,
\twait = yes,
\tuser = nobody,
\tservice_max = 0;\t# nothing is started

finger on bind = 127.0.0.1, protocol = tcp, wait = no, user = nobody,
\texec = /usr/libexec/fingerd,
\targs = fingerd -lsm,  # a comment inside the definition
\tip_max = 3;
"""


def test_netbsd_style_file_loads() -> None:
    loaded = load_text(NETBSD, "/etc/inetd.conf", lookups=fake_lookups())
    assert loaded.diagnostics == (), [str(d) for d in loaded.diagnostics]
    echo, daytime, finger = loaded.services
    assert (echo.name, echo.socket_type, echo.user_name) == ("echo/tcp", SocketType.STREAM, "root")
    assert (daytime.name, daytime.wait) == ("daytime/udp", True)
    assert daytime.limits.max_spawn_per_min == 0
    assert finger.program == "/usr/libexec/fingerd"
    assert finger.argv == ("fingerd", "-lsm")
    assert finger.key.endpoints[0].address == "127.0.0.1"
    assert finger.limits.max_cpm_per_ip == 3


def test_blanks_around_equals_read_like_no_blanks() -> None:
    spaced = parse("echo on protocol  =  tcp , user\t=\troot ;\n", "t.conf")
    tight = parse("echo on protocol=tcp, user=root;\n", "t.conf")
    assert spaced.errors == () and spaced.specs == tight.specs


def test_equals_and_values_on_the_following_lines() -> None:
    parsed = parse("chargen on protocol\n\t= tcp, user =\n\troot, ip_max\n\n\t=\n\t7;\n", "t.conf")
    assert parsed.errors == (), [str(d) for d in parsed.errors]
    (spec,) = parsed.specs
    assert (spec.protocol, spec.user, spec.limits) == (Protocol.TCP, "root",
                                                       Limits(max_cpm_per_ip=7))


def test_unindented_lines_continue_an_open_definition() -> None:
    parsed = parse("echo on\nprotocol = tcp,\nuser = root;\ndaytime stream tcp nowait root "
                   "internal\n", "t.conf")  # fmt: skip
    assert parsed.errors == (), [str(d) for d in parsed.errors]
    assert [s.service for s in parsed.specs] == ["echo", "daytime"]


def test_a_missing_semicolon_is_still_reported_not_swallowed() -> None:
    parsed = parse("echo on protocol = tcp, user = root\ndaytime stream tcp nowait root "
                   "internal\n", "t.conf")  # fmt: skip
    assert [str(d) for d in parsed.errors] == [
        "t.conf:1: field 2 'on': key-values definition has no closing ';' (end it with ';'; "
        "continuation lines start with a space or tab)"
    ]
    assert [s.service for s in parsed.specs] == ["daytime"]


def test_a_key_without_equals_is_an_error_at_its_field() -> None:
    parsed = parse("echo on protocol tcp, user = root;\n", "t.conf")
    assert [str(d) for d in parsed.errors] == [
        "t.conf:1: field 3 'protocol': expected key=value, not 'protocol' (separate options "
        "with ',' and end the definition with ';')"
    ]


def test_field_numbers_and_tokens_of_spaced_options() -> None:
    parsed = parse("echo on protocol = tcp, user = root, pool_max = 0;\n", "t.conf")
    assert [str(d) for d in parsed.errors] == [
        "t.conf:1: field 5 'pool_max = 0': pool_max must be an integer >= 1, not '0' "
        "(write e.g. pool_max=32)"
    ]


def test_spaced_defaults() -> None:
    parsed = parse("defaults on\n\tpool_max = 4,\n\tonly_from = 10.0.0.0/8 ::1;\n", "t.conf")
    assert parsed.errors == ()
    assert parsed.defaults.pool_max == 4
    assert parsed.defaults.only_from is not None and len(parsed.defaults.only_from) == 2
