"""inetdconf.parse/format_spec: one example per grammar point of issue 2."""

from __future__ import annotations

from dataclasses import replace

import pytest
from config_helpers import parse_errors as errors
from config_helpers import parse_one as one
from config_helpers import parse_warnings as warnings

from poolinetd.config.inetdconf import format_spec, parse
from poolinetd.config.spec import (
    Limits,
    Options,
    ParsedConfig,
    Protocol,
    RpcSpec,
    ServiceSpec,
    Severity,
    SocketType,
    StderrRoute,
    UnixPerms,
)

ECHO = ServiceSpec("echo", SocketType.STREAM, Protocol.TCP, False, "root", "internal")


# -- lexical -------------------------------------------------------------------------------


def test_plain_entry() -> None:
    assert one("echo stream tcp nowait root internal\n") == ECHO


def test_comments_blank_lines_trailing_whitespace_crlf_no_final_newline() -> None:
    text = (
        "# comment\n\n   \t\r\n#echo stream tcp nowait root internal\r\n"
        "echo\tstream tcp nowait root internal \t\r"
    )
    spec = one(text)
    assert spec == ECHO
    assert spec.lineno == 5


def test_continuation_line_appends_fields() -> None:
    spec = one("ftp stream tcp nowait root\n\t/usr/libexec/ftpd ftpd\n  -l\n")
    assert spec.server == "/usr/libexec/ftpd"
    assert spec.argv == ("ftpd", "-l")
    assert spec.lineno == 1


def test_blank_line_ends_entry_and_continuation_does_not_cross_it() -> None:
    text = "ftp stream tcp nowait root /usr/libexec/ftpd ftpd\n\n"
    text += "next stream tcp nowait root internal\n"
    parsed = parse(text, "t.conf")
    assert [s.argv for s in parsed.specs] == [("ftpd",), ()]


def test_ipsec_line_is_a_warning() -> None:
    parsed = parse("#@ ipsec ah/require\necho stream tcp nowait root internal\n#@\n", "t.conf")
    assert parsed.specs == (ECHO,)
    assert [d.lineno for d in parsed.warnings] == [1]
    assert "IPsec" in parsed.warnings[0].message


def test_quoted_arguments_freebsd() -> None:
    spec = one('x stream tcp nowait root /bin/sh sh -c "echo a b" \'it"s\'\n')
    assert spec.argv == ("sh", "-c", "echo a b", 'it"s')


def test_unterminated_quote_is_an_error() -> None:
    assert errors('x stream tcp nowait root /bin/sh sh "oops\n') == [
        "t.conf:1: field 8 '\"oops': unterminated quote (close the argument with \")"
    ]


def test_too_few_fields() -> None:
    assert errors("echo stream tcp nowait root\n") == [
        "t.conf:1: field 5 'root': entry ends after field 5; expected at least 6 "
        "(write: service socket-type protocol wait user server [args])"
    ]


# -- addresses -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field1", "service", "addresses"),
    [
        ("127.0.0.1:echo", "echo", ("127.0.0.1",)),
        ("192.0.2.1,192.0.2.2:echo", "echo", ("192.0.2.1", "192.0.2.2")),
        ("[::1]:echo", "echo", ("::1",)),
        ("[::1],127.0.0.1:echo", "echo", ("::1", "127.0.0.1")),
        ("*:echo", "echo", ()),
        (":::echo", "echo", ("::",)),  # BusyBox IPv6 wildcard
        ("localhost:7007", "7007", ("localhost",)),
    ],
)
def test_address_prefix(field1: str, service: str, addresses: tuple[str, ...]) -> None:
    spec = one(f"{field1} stream tcp nowait root internal\n")
    assert (spec.service, spec.addresses) == (service, addresses)


def test_default_address_line_and_reset() -> None:
    text = (
        "127.0.0.1:\necho stream tcp nowait root internal\n"
        "*:echo dgram udp wait root internal\n"
        "*:\ndaytime stream tcp nowait root internal\n"
    )
    specs = parse(text, "t.conf").specs
    assert [s.addresses for s in specs] == [("127.0.0.1",), (), ()]


@pytest.mark.parametrize("field1", ["[::1:echo", "*,127.0.0.1:echo", ",x:echo", "[]:echo"])
def test_bad_address_prefix(field1: str) -> None:
    errs = parse(f"{field1} stream tcp nowait root internal\n", "t.conf").errors
    assert len(errs) == 1 and errs[0].field == 1 and errs[0].token == field1


# -- service -------------------------------------------------------------------------------


def test_numeric_port_and_range() -> None:
    assert one("7007 stream tcp nowait root internal echo\n").service == "7007"
    assert errors("70000 stream tcp nowait root internal echo\n") == [
        "t.conf:1: field 1 '70000': bad port '70000' (a port is a number from 0 to 65535)"
    ]


def test_unix_path_and_freebsd_perms_prefix() -> None:
    assert one("/run/e.sock stream unix nowait root internal\n").service == "/run/e.sock"
    spec = one(":news:daemon:0220:/var/run/echo stream unix nowait root internal\n")
    assert spec.service == "/var/run/echo"
    assert spec.unix_perms == UnixPerms("news", "daemon", 0o220)
    assert errors("relative stream unix nowait root internal\n")[0].endswith(
        "a unix service must be an absolute path "
        "(write /run/name.sock or :owner:group:mode:/run/name.sock)"
    )


def test_tcpmux_kept_in_spec() -> None:
    spec = one("tcpmux/+date stream tcp nowait guest /bin/date date\n")
    assert (spec.service, spec.tcpmux, spec.tcpmux_plus) == ("tcpmux", "date", True)
    spec = one("tcpmux/help stream tcp nowait guest /bin/date date\n")
    assert (spec.tcpmux, spec.tcpmux_plus) == ("help", False)


# -- socket type and protocol -------------------------------------------------------------


@pytest.mark.parametrize("st", list(SocketType))
def test_every_socket_type_parses(st: SocketType) -> None:
    assert one(f"/run/x {st.value} unix nowait root internal echo\n").socket_type is st


def test_unknown_socket_type() -> None:
    assert errors("echo streem tcp nowait root internal\n") == [
        "t.conf:1: field 2 'streem': unknown socket type 'streem' "
        "(use one of stream, dgram, seqpacket, raw, rdm)"
    ]


def test_accept_filter_is_a_warning() -> None:
    assert (
        one("http stream:httpready tcp nowait root /bin/cat cat\n").socket_type is SocketType.STREAM
    )
    assert warnings("http stream:httpready tcp nowait root /bin/cat cat\n")[0].startswith(
        "t.conf:1: field 2 'stream:httpready': warning: accept filter ignored"
    )


@pytest.mark.parametrize("proto", list(Protocol))
def test_every_protocol_parses(proto: Protocol) -> None:
    service = "/run/x" if proto.is_unix else "echo"
    assert one(f"{service} stream {proto.value} nowait root internal\n").protocol is proto


def test_rpc_entries_parse_and_a_bad_one_leaves_the_rest() -> None:
    text = (
        "rstatd/1-3 dgram rpc/udp wait root /usr/libexec/rpc.rstatd rpc.rstatd\n"
        "rstatd/3-1 dgram rpc/udp wait root /usr/libexec/rpc.rstatd rpc.rstatd\n"
        "echo stream tcp nowait root internal\n"
    )
    parsed = parse(text, "t.conf")
    assert [(s.service, s.rpc) for s in parsed.specs] == [("rstatd", RpcSpec(1, 3)),
                                                           ("echo", None)]
    assert [str(d) for d in parsed.errors] == [
        "t.conf:2: field 1 'rstatd/3-1': RPC version range '3-1' runs backwards (write 1-3)"
    ]  # tests/test_rpc_config.py has the rest


def test_protocol_suffixes_and_netbsd_buffers() -> None:
    assert one("echo stream tcp/ttcp nowait root internal\n").protocol is Protocol.TCP
    assert "T/TCP is obsolete" in warnings("echo stream tcp/ttcp nowait root internal\n")[0]
    assert "FAITH" in errors("echo stream tcp/faith nowait root internal\n")[0]
    assert (
        one("echo stream tcp,sndbuf=64k,rcvbuf=1m nowait root internal\n").protocol is Protocol.TCP
    )
    buffered = one("echo stream tcp,sndbuf=64k,rcvbuf=1m nowait root internal\n").options
    assert (buffered.sndbuf, buffered.rcvbuf) == (65536, 1048576)  # honoured, not ignored
    assert warnings("echo stream tcp,sndbuf=64k nowait root internal\n") == []
    assert "bad protocol option" in errors("echo stream tcp,sndbuf=big nowait root internal\n")[0]


# -- wait and limits -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("word", "wait", "limits"),
    [
        ("wait", True, Limits()),
        ("nowait", False, Limits()),
        ("nowait/10", False, Limits(max_child=10)),
        ("nowait/10/20", False, Limits(max_child=10, max_cpm_per_ip=20)),
        ("nowait/10/20/3", False, Limits(10, 20, 3)),
        ("nowait.100", False, Limits(max_spawn_per_min=100)),  # OpenBSD/GNU/BusyBox
        ("wait:100", True, Limits(max_spawn_per_min=100)),  # NetBSD
        # FreeBSD /0 = no limit, recorded as written ("unlimited"), never as 0.
        ("nowait/0", False, Limits(unlimited=frozenset({"max_child"}))),
        ("nowait/0/0/0", False,
         Limits(unlimited=frozenset({"max_child", "max_cpm_per_ip", "max_child_per_ip"}))),
        ("nowait/5/0/2", False,
         Limits(max_child=5, max_child_per_ip=2, unlimited=frozenset({"max_cpm_per_ip"}))),
        # GNU/BusyBox .0 = no limit; NetBSD :0 = nothing is started (its inetd's meaning).
        ("nowait.0", False, Limits(unlimited=frozenset({"max_spawn_per_min"}))),
        ("nowait:0", False, Limits(max_spawn_per_min=0)),
    ],
)
def test_wait_limits_each_in_its_own_field(word: str, wait: bool, limits: Limits) -> None:
    spec = one(f"echo stream tcp {word} root internal\n")
    assert (spec.wait, spec.limits) == (wait, limits)


@pytest.mark.parametrize(
    "word", ["nowait/x", "nowait/1/2/3/4", "nowait.", "nowait:-1", "nowait/", "waitx", "sometimes"]
)
def test_bad_wait(word: str) -> None:
    errs = parse(f"echo stream tcp {word} root internal\n", "t.conf").errors
    assert len(errs) == 1 and (errs[0].field, errs[0].token) == (4, word)


# -- user ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("word", "user", "group", "login_class"),
    [
        ("root", "root", None, None),
        ("nobody:kmem", "nobody", "kmem", None),
        ("www.www", "www.www", None, None),  # kept whole; resolve tries the dotted name first
        ("root:wheel/daemon", "root", "wheel", "daemon"),
        ("root/daemon", "root", None, "daemon"),
    ],
)
def test_user_forms(word: str, user: str, group: str | None, login_class: str | None) -> None:
    spec = one(f"echo stream tcp nowait {word} internal\n")
    assert (spec.user, spec.group, spec.login_class) == (user, group, login_class)


@pytest.mark.parametrize("word", ["root:", ":wheel", "root/", "a:b:c"])
def test_bad_user(word: str) -> None:
    errs = parse(f"echo stream tcp nowait {word} internal\n", "t.conf").errors
    assert len(errs) == 1 and (errs[0].field, errs[0].token) == (5, word)


# -- server --------------------------------------------------------------------------------


def test_internal_with_builtin_name() -> None:
    spec = one("127.0.0.1:7007 stream tcp nowait nobody internal echo\n")
    assert spec.is_internal and spec.argv == ("echo",)


def test_relative_server_is_an_error() -> None:
    assert errors("smtp stream tcp nowait root tcpd sendmail -v\n") == [
        "t.conf:1: field 6 'tcpd': server must be an absolute path or 'internal' "
        "(write e.g. /usr/sbin/in.fingerd in.fingerd)"
    ]


def test_program_without_argv0_parses_resolve_refuses() -> None:
    assert one("x stream tcp nowait root /bin/cat\n").argv == ()


# -- key-values ----------------------------------------------------------------------------


def test_netbsd_key_values() -> None:
    spec = one(
        "finger on bind=0.0.0.0, protocol=tcp, wait=no, user=nobody,"
        " exec=/usr/libexec/fingerd, args=fingerd -lsm;\n"
    )
    assert spec == ServiceSpec(
        "finger", SocketType.STREAM, Protocol.TCP, False, "nobody", "/usr/libexec/fingerd",
        argv=("fingerd", "-lsm"), addresses=("0.0.0.0",),
    )  # fmt: skip


def test_key_values_span_lines_with_comments_and_escapes() -> None:
    text = (
        "127.0.0.1:7007 on socktype=stream, # the socket\n"
        "    user=nobody, args=echo,\n"
        "\n"
        "    # tuning\n"
        "    pool_min=2, pool_max=8, worker_connections=1, max_requests=100,\n"
        "    idle_timeout=2.5, conn_timeout=30, stderr=log,\n"
        '    env="GREETING=hi there" A=1 "T=\\t\\x41";\n'
    )
    spec = one(text)
    assert spec.addresses == ("127.0.0.1",)
    assert spec.options == Options(
        pool_min=2, pool_max=8, worker_connections=1, max_requests=100, idle_timeout=2.5,
        conn_timeout=30.0, stderr=StderrRoute.LOG,
        env=(("GREETING", "hi there"), ("A", "1"), ("T", "\tA")),
    )  # fmt: skip
    assert spec.wait is False and spec.is_internal


def test_key_values_limits_and_netbsd_aliases() -> None:
    spec = one(
        "echo on protocol=tcp, user=root, service_max=40, ip_max=5,"
        " max_child=3, max_child_per_ip=1;"
    )
    assert spec.limits == Limits(
        max_child=3, max_cpm_per_ip=5, max_child_per_ip=1, max_spawn_per_min=40
    )


def test_key_values_off() -> None:
    assert one("echo off protocol=tcp, user=root;").enabled is False


def test_unknown_key_and_bad_values_each_reported() -> None:
    errs = parse(
        "echo on protocol=tcp, user=root, colour=red, pool_max=0, stderr=tty;", "t.conf"
    ).errors
    assert [(d.field, d.token) for d in errs] == [
        (5, "colour=red"), (6, "pool_max=0"), (7, "stderr=tty"),
    ]  # fmt: skip
    assert "valid keys: bind, socktype" in errs[0].hint


def test_key_values_missing_semicolon_names_the_definition() -> None:
    text = "echo on protocol=tcp, user=root\ndaytime stream tcp nowait root internal\n"
    parsed = parse(text, "t.conf")
    assert [str(d) for d in parsed.errors] == [
        "t.conf:1: field 2 'on': key-values definition has no closing ';' "
        "(end it with ';'; continuation lines start with a space or tab)"
    ]
    assert [s.service for s in parsed.specs] == ["daytime"]


def test_key_values_required_keys() -> None:
    errs = errors("x on exec=/bin/cat, args=cat;")
    assert any("protocol= is required" in e for e in errs)
    assert any("wait= is required" in e for e in errs)
    assert any("user= is required" in e for e in errs)


def test_ignored_netbsd_keys_warn() -> None:
    text = "echo on protocol=tcp, user=root, acceptfilter=x, ipsec=;"
    assert one(text) == ECHO
    assert len(warnings(text)) == 2


def test_netbsd_buffer_keys_are_honoured() -> None:
    text = "echo on protocol=tcp, user=root, sndbuf=1k, recvbuf=2k;"
    assert (one(text).options.sndbuf, one(text).options.rcvbuf) == (1024, 2048)
    assert warnings(text) == []
    twice = errors('echo on protocol="tcp,sndbuf=1k", user=root, sndbuf=2k;')
    assert "sndbuf given twice" in twice[0]


def test_defaults_definition_any_position() -> None:
    text = "echo stream tcp nowait root internal\ndefaults on pool_max=4, env=A=1;\n"
    parsed = parse(text, "t.conf")
    assert parsed.defaults == Options(pool_max=4, env=(("A", "1"),))
    assert parsed.specs == (ECHO,)


def test_defaults_refuses_entry_keys() -> None:
    assert errors("defaults on user=root;") == [
        "t.conf:1: field 3 'user=root': key not allowed in defaults 'user' (defaults accept: "
        "max_child, max_cpm_per_ip, max_child_per_ip, max_spawn_per_min, "
        "pool_min, pool_max, worker_connections, max_requests, idle_timeout, conn_timeout, "
        "stderr, env, preload, preload_modules, only_from, no_access, source_v4_prefix, "
        "source_v6_prefix, block_time, reuseport, proxy_from, tcp_wrappers, max_connections, "
        "max_programs, rlimit_as, rlimit_cpu, rlimit_data, rlimit_rss, rlimit_stack, "
        "rlimit_files, rlimit_nproc, rlimit_core, nice, umask, rcvbuf, sndbuf, keepalive, "
        "nodelay, backlog, defer_accept)"
    ]


def test_include_is_recorded_not_expanded() -> None:
    parsed = parse(
        'echo stream tcp nowait root internal\n.include "inetd.d/*.conf"\n', "/etc/inetd.conf"
    )
    assert [(i.pattern, i.lineno, i.position) for i in parsed.includes] == [
        ("inetd.d/*.conf", 2, 1)
    ]


# -- totality and formatting ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "\x00",
        "\ud800 stream tcp nowait root internal",
        "a" * 200_000,
        'x on "\\',
        'x on a="',
        ";;;",
        "\n\t\n",
    ],
)
def test_parse_never_raises(text: str) -> None:
    assert isinstance(parse(text, "t.conf"), ParsedConfig)


def test_long_token_is_shortened_in_diagnostics() -> None:
    (err,) = parse("x" * 5000 + " stream tcp nowait root internal\n", "t.conf").errors or (None,)
    assert err is None or len(err.token) <= 120


@pytest.mark.parametrize(
    "line",
    [
        "echo stream tcp nowait root internal",
        "[::1],127.0.0.1:7007 stream tcp6 nowait/1/2/3 root:wheel/daemon internal echo",
        'x dgram udp wait.5 nobody /bin/cat cat \'a "b\' "c d"',
        ":a:b:0600:/run/x seqpacket unix nowait root internal",
        "echo on protocol=tcp, user=root, pool_max=3;",
        "echo off protocol=tcp, user=root;",
        'x on protocol=tcp, wait=no, user=root, exec=/bin/cat, args=cat "a\\nb" "\'\\"";',
    ],
)
def test_format_round_trip(line: str) -> None:
    spec = one(line)
    assert one(format_spec(spec)) == spec


def test_format_prefers_positional() -> None:
    assert format_spec(ECHO) == "echo\tstream\ttcp\tnowait\troot\tinternal"
    assert format_spec(replace(ECHO, options=Options(pool_max=2))).endswith("pool_max=2;")


def test_severity_of_warnings() -> None:
    parsed = parse("#@ x\n", "t.conf")
    assert parsed.diagnostics[0].severity is Severity.WARNING and parsed.errors == ()
