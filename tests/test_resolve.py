"""resolve: specs to services, with fake lookups (and a few real-system checks)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from config_fakes import fake_lookups
from config_helpers import errors, load, only

from poolinetd.config.inetdconf import parse
from poolinetd.config.resolve import load_file, load_text, resolve, system_lookups
from poolinetd.config.spec import (
    DEFAULT_POOL_MAX,
    DEFAULT_WORKER_CONNECTIONS_INTERNAL,
    DEFAULT_WORKER_CONNECTIONS_PROGRAM,
    Endpoint,
    Options,
    Service,
    SocketOwner,
    StderrRoute,
)

# -- endpoints -----------------------------------------------------------------------------

V4, V6, UNIX = int(socket.AF_INET), int(socket.AF_INET6), int(socket.AF_UNIX)


@pytest.mark.parametrize(
    ("line", "endpoints"),
    [
        ("echo stream tcp nowait root internal", [Endpoint(V4, "0.0.0.0", 7)]),
        ("echo stream tcp4 nowait root internal", [Endpoint(V4, "0.0.0.0", 7)]),
        ("echo stream tcp6 nowait root internal", [Endpoint(V6, "::", 7, True)]),
        ("echo stream tcp46 nowait root internal", [Endpoint(V6, "::", 7, False)]),
        ("echo dgram udp6 wait root internal", [Endpoint(V6, "::", 7, True)]),
        ("echo dgram udp46 wait root internal", [Endpoint(V6, "::", 7, False)]),
        ("/run/e.sock stream unix nowait root internal echo", [Endpoint(UNIX, "/run/e.sock", 0)]),
        (
            "127.0.0.1,192.0.2.9:echo stream tcp nowait root internal",
            [Endpoint(V4, "127.0.0.1", 7), Endpoint(V4, "192.0.2.9", 7)],
        ),
        ("[::1]:echo stream tcp6 nowait root internal", [Endpoint(V6, "::1", 7)]),
        (":::echo stream tcp nowait root internal", [Endpoint(V6, "::", 7)]),  # BusyBox
        ("localhost:echo stream tcp nowait root internal", [Endpoint(V4, "127.0.0.1", 7)]),
        ("localhost:echo stream tcp6 nowait root internal", [Endpoint(V6, "::1", 7)]),
        (
            "twohomed:echo stream tcp nowait root internal",
            [Endpoint(V4, "192.0.2.1", 7), Endpoint(V4, "192.0.2.2", 7)],
        ),
        (
            "127.0.0.1:7007 stream tcp nowait nobody internal echo",
            [Endpoint(V4, "127.0.0.1", 7007)],
        ),
        ("127.0.0.1:0 stream tcp nowait nobody internal echo", [Endpoint(V4, "127.0.0.1", 0)]),
    ],
)
def test_endpoints(line: str, endpoints: list[Endpoint]) -> None:
    assert list(only(line).key.endpoints) == endpoints


def test_address_family_mismatch_is_an_error() -> None:
    assert errors("::1,127.0.0.1:echo stream tcp4 nowait root internal") == [
        "/etc/t.conf:1: field 3 'tcp4': ::1 is IPv6 but tcp4 is IPv4-only "
        "(use tcp6/udp6 for IPv6 addresses)"
    ]
    assert "is IPv4 but tcp6" in errors("127.0.0.1:echo stream tcp6 nowait root internal")[0]


def test_unknown_host_and_service() -> None:
    assert errors("nosuch:echo stream tcp nowait root internal") == [
        "/etc/t.conf:1: field 1 'nosuch:echo': cannot resolve host 'nosuch' "
        "(write a numeric address or fix the name)"
    ]
    assert errors("bogus stream tcp nowait root /bin/cat cat") == [
        "/etc/t.conf:1: field 1 'bogus': unknown service 'bogus' for tcp "
        "(add it to /etc/services or write the port number)"
    ]
    # comsat is udp-only in the fake world
    assert (
        "unknown service 'comsat' for tcp"
        in errors("comsat stream tcp nowait root /bin/cat cat")[0]
    )


def test_service_name_is_as_written_plus_protocol() -> None:
    assert only("echo stream tcp6 nowait root internal").name == "echo/tcp6"
    # A bare number tells an operator nothing: the built-in or argv[0] goes in front.
    assert only("7007 stream tcp nowait root internal echo").name == "echo:7007/tcp"
    assert only("7008 stream tcp nowait root /bin/cat cat -u").name == "cat:7008/tcp"
    assert only("/run/x.sock stream unix nowait root internal echo").name == "/run/x.sock/unix"


# -- built-ins -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "builtin"),
    [
        ("echo stream tcp nowait root internal", "echo"),
        ("7 stream tcp nowait root internal", "echo"),  # official name of the port
        ("sink dgram udp wait root internal", "discard"),  # alias -> official name
        ("127.0.0.1:7007 stream tcp nowait nobody internal echo", "echo"),
        ("9999 stream tcp nowait root internal chargen", "chargen"),
        ("/var/run/echo stream unix nowait root internal", "echo"),  # FreeBSD: last component
        ("time stream tcp nowait root internal internal", "time"),  # GNU "internal internal"
    ],
)
def test_builtin_selection(line: str, builtin: str) -> None:
    svc = only(line)
    assert (svc.internal, svc.program, svc.argv) == (builtin, None, ())


def test_builtin_worker_connections_default() -> None:
    assert only("echo stream tcp nowait root internal").pool.worker_connections == (
        DEFAULT_WORKER_CONNECTIONS_INTERNAL
    )
    assert only("ftp stream tcp nowait root /usr/libexec/ftpd ftpd").pool.worker_connections == (
        DEFAULT_WORKER_CONNECTIONS_PROGRAM
    )


def test_unsupported_builtins() -> None:
    assert errors("auth stream tcp nowait root internal auth -r -f") == [
        "/etc/t.conf:1: field 7 'auth': built-in 'auth' is not supported by poolinetd "
        "(built-ins: echo, discard, chargen, daytime, time, tcpmux)"
    ]
    assert "no built-in service 'http'" in errors("http stream tcp nowait root internal")[0]
    assert "no built-in for port 7007" in errors("7007 stream tcp nowait root internal")[0]
    assert "takes no arguments" in errors("echo stream tcp nowait root internal echo -x")[0]


def test_stream_builtin_wait_is_forced_nowait_with_warning() -> None:
    loaded = load("echo stream tcp wait root internal")
    assert loaded.services[0].wait is False
    assert [str(d) for d in loaded.warnings] == [
        "/etc/t.conf:1: field 4 'wait': warning: stream built-in served as nowait (write nowait)"
    ]


def test_dgram_builtin_wait_is_fine() -> None:
    loaded = load("echo dgram udp wait root internal")
    assert loaded.diagnostics == () and loaded.services[0].wait is True


# -- kinds ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("echo raw tcp nowait root internal", "socket type raw is not supported"),
        ("echo rdm tcp nowait root internal", "socket type rdm is not supported"),
        ("echo seqpacket tcp nowait root internal", "seqpacket needs protocol unix"),
        ("echo stream udp nowait root internal", "stream does not go with udp"),
        ("echo dgram tcp wait root internal", "dgram does not go with tcp"),
    ],
)
def test_socket_type_protocol_mismatch(line: str, message: str) -> None:
    (err,) = errors(line)
    assert message in err


# -- programs ------------------------------------------------------------------------------


def test_program() -> None:
    svc = only("ftp stream tcp nowait root /usr/libexec/ftpd ftpd -l")
    assert (svc.internal, svc.program, svc.argv) == (None, "/usr/libexec/ftpd", ("ftpd", "-l"))


def test_missing_argv0_and_missing_program() -> None:
    assert errors("ftp stream tcp nowait root /usr/libexec/ftpd") == [
        "/etc/t.conf:1: field 6 '/usr/libexec/ftpd': argv[0] is missing "
        "(write the program name after the path: /usr/libexec/ftpd ftpd)"
    ]
    assert errors("ftp stream tcp nowait root /nope/ftpd ftpd") == [
        "/etc/t.conf:1: field 6 '/nope/ftpd': program /nope/ftpd not found or not executable "
        "(install it or fix the path)"
    ]


# -- users ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("word", "uid", "gid", "groups"),
    [
        ("root", 0, 0, (0, 10)),
        ("nobody:kmem", 65534, 15, (15,)),
        ("nobody.kmem", 65534, 15, (15,)),  # OpenBSD/BusyBox dot
        ("www.data", 33, 33, (33,)),  # a user whose name has a dot
        ("www.data:tty", 33, 5, (5,)),
        ("www.www", 80, 80, (80,)),  # not a user: split into www + group www
    ],
)
def test_user_and_group(word: str, uid: int, gid: int, groups: tuple[int, ...]) -> None:
    svc = only(f"echo stream tcp nowait {word} internal")
    assert (svc.uid, svc.gid, svc.groups) == (uid, gid, groups)


def test_unknown_user_and_group() -> None:
    assert errors("echo stream tcp nowait ghost internal") == [
        "/etc/t.conf:1: field 5 'ghost': unknown user 'ghost' (create the user or fix the name)"
    ]
    assert errors("echo stream tcp nowait root:ghosts internal") == [
        "/etc/t.conf:1: field 5 'root:ghosts': unknown group 'ghosts' "
        "(create the group or fix the name)"
    ]


def test_login_class_is_a_warning() -> None:
    loaded = load("echo stream tcp nowait root:wheel/daemon internal")
    assert loaded.errors == () and len(loaded.services) == 1
    assert [d.message for d in loaded.warnings] == ["login class 'daemon' ignored"]


def test_unix_socket_owner() -> None:
    svc = only(":nobody:tty:0660:/run/e.sock stream unix nowait root internal echo")
    assert svc.socket_owner == SocketOwner(65534, 5, 0o660)
    assert (
        "unknown socket owner"
        in errors(":ghost::0660:/run/e.sock stream unix nowait root internal echo")[0]
    )


def test_unix_path_too_long() -> None:
    assert (
        "socket path too long"
        in errors("/" + "x" * 120 + " stream unix nowait root internal echo")[0]
    )


# -- options -------------------------------------------------------------------------------


def test_option_precedence_entry_defaults_cli_builtin() -> None:
    text = (
        "defaults on pool_max=8, idle_timeout=5, env=A=file B=file;\n"
        "echo on protocol=tcp, user=root, pool_max=4, env=B=entry;\n"
        "daytime stream tcp nowait root internal\n"
    )
    cli = Options(
        pool_max=2,
        pool_min=0,
        conn_timeout=9.0,
        stderr=StderrRoute.LOG,
        env=(("A", "cli"), ("C", "cli")),
    )
    echo, daytime = load(text, cli).services
    assert (echo.pool.pool_max, daytime.pool.pool_max) == (4, 8)
    assert echo.pool.pool_min == 0 and echo.conn_timeout == 9.0 and echo.stderr is StderrRoute.LOG
    assert echo.pool.idle_timeout == 5.0
    assert dict(echo.env) == {"A": "file", "B": "entry", "C": "cli"}
    assert dict(daytime.env) == {"A": "file", "B": "file", "C": "cli"}
    assert only("echo stream tcp nowait root internal").pool.pool_max == DEFAULT_POOL_MAX


def test_pool_min_above_pool_max() -> None:
    assert errors("echo on protocol=tcp, user=root, pool_min=9, pool_max=3;") == [
        "/etc/t.conf:1: field 5 'pool_min=9': pool_min 9 is larger than pool_max 3 "
        "(raise pool_max or lower pool_min)"
    ]


def test_limits_carried() -> None:
    assert only("echo stream tcp nowait/3/10/1 root internal").limits.max_child_per_ip == 1


def test_disabled_entry_is_not_resolved() -> None:
    loaded = load("echo off protocol=tcp, user=ghost;")
    assert loaded.services == () and loaded.diagnostics == ()


# -- duplicates ----------------------------------------------------------------------------


def test_port_0_twins_cannot_be_told_apart_on_reload() -> None:
    loaded = load("127.0.0.1:0 stream tcp nowait root internal echo\n"
                  "127.0.0.1:0 stream tcp nowait root internal echo\n")
    (err,) = loaded.errors
    assert err.lineno == 2 and "duplicate service" in err.message


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("echo stream tcp nowait root internal", "7 stream tcp nowait root internal"),
        ("echo stream tcp nowait root internal", "127.0.0.1:echo stream tcp nowait root internal"),
        ("echo stream tcp46 nowait root internal", "echo stream tcp nowait root internal"),
        ("echo stream tcp6 nowait root internal", "[::1]:echo stream tcp6 nowait root internal"),
        (
            "/run/a stream unix nowait root internal echo",
            "/run/a dgram unix wait root internal echo",
        ),
    ],
)
def test_duplicates_name_both_lines(first: str, second: str) -> None:
    loaded = load(f"{first}\n{second}\n")
    (err,) = loaded.errors
    assert err.lineno == 2 and "duplicate service" in err.message and "/etc/t.conf:1" in err.message
    assert len(loaded.services) == 1


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("echo stream tcp nowait root internal", "echo dgram udp wait root internal"),
        ("echo stream tcp nowait root internal", "echo stream tcp6 nowait root internal"),
        (
            "127.0.0.1:echo stream tcp nowait root internal",
            "192.0.2.1:echo stream tcp nowait root internal",
        ),
        (
            "127.0.0.1:0 stream tcp nowait root internal echo",
            "127.0.0.1:0 stream tcp nowait root internal daytime",
        ),
    ],
)
def test_not_duplicates(first: str, second: str) -> None:
    assert len(only_all(f"{first}\n{second}\n")) == 2


def only_all(text: str) -> tuple[Service, ...]:
    loaded = load(text)
    assert loaded.errors == (), [str(d) for d in loaded.errors]
    return loaded.services


# -- resolve() itself, files, includes -------------------------------------------------------


def test_resolve_returns_only_its_own_diagnostics() -> None:
    parsed = parse("#@ x\necho stream tcp nowait ghost internal\n", "t.conf")
    services, diags = resolve(parsed, Options(), fake_lookups())
    assert services == () and [d.lineno for d in diags] == [2]


def test_lookups_that_raise_odd_errors_are_unknown() -> None:
    text = "\udcff stream tcp nowait root internal\nx\x00 stream tcp nowait root internal\n"
    loaded = load_text(text, "t.conf", Options(), system_lookups())
    assert len(loaded.errors) == 2


def test_unreadable_file_is_a_diagnostic(tmp_path: Path) -> None:
    loaded = load_file(str(tmp_path / "missing.conf"))
    assert loaded.services == ()
    (err,) = loaded.errors
    assert str(err).startswith(f"{tmp_path / 'missing.conf'}:0: cannot read the file: No such file")


def test_include_relative_glob_and_position(tmp_path: Path) -> None:
    (tmp_path / "inetd.d").mkdir()
    (tmp_path / "inetd.d" / "b.conf").write_text("daytime stream tcp nowait root internal\n")
    (tmp_path / "inetd.d" / "a.conf").write_text(
        "defaults on pool_max=3;\ntime stream tcp nowait root internal\n"
    )
    main = tmp_path / "inetd.conf"
    main.write_text(
        "echo stream tcp nowait root internal\n"
        '.include "inetd.d/*.conf"\n'
        "discard stream tcp nowait root internal\n"
        '.include "none/*"\n'
    )
    loaded = load_file(str(main), Options(), fake_lookups())
    assert [s.name for s in loaded.services] == [
        "echo/tcp",
        "time/tcp",
        "daytime/tcp",
        "discard/tcp",
    ]
    assert {s.pool.pool_max for s in loaded.services} == {3}
    assert [d.message for d in loaded.warnings] == [".include matched no files"]


def test_include_cycle(tmp_path: Path) -> None:
    main = tmp_path / "inetd.conf"
    main.write_text(".include inetd.conf\necho stream tcp nowait root internal\n")
    loaded = load_file(str(main), Options(), fake_lookups())
    assert len(loaded.services) == 1 and "include cycle" in loaded.errors[0].message


def test_latin1_comment_is_fine_latin1_argument_is_an_error(tmp_path: Path) -> None:
    conf = tmp_path / "l1.conf"
    conf.write_bytes(b"# caf\xe9\nftp stream tcp nowait root /usr/libexec/ftpd ftpd -m caf\xe9\n"
                     b"echo stream tcp nowait root internal\n")
    loaded = load_file(str(conf), Options(), fake_lookups())
    (err,) = loaded.errors
    assert (err.lineno, err.field) == (2, 9) and "0xe9" in err.message
    assert "\udce9" not in err.token and err.token == "caf\\xe9"
    assert [s.name for s in loaded.services] == ["echo/tcp"]  # the bad line yields nothing


def test_a_lone_surrogate_in_text_is_an_error_at_its_line_not_an_exception() -> None:
    # "\ud800" cannot come from decoding bytes (surrogateescape gives U+DC80..U+DCFF only),
    # but load_text takes any str: it must answer with a diagnostic, never raise.
    text = ("echo stream tcp nowait root internal\n"
            "ftp stream tcp nowait root /bin/ftpd ftpd -x\ud800y\n"
            "\ud800 stream tcp nowait root internal\n"
            "# a comment may hold one: \udbff\n")
    loaded = load_text(text, "t.conf", Options(), fake_lookups())
    assert [(d.lineno, d.field) for d in loaded.errors] == [(2, 8), (3, 1)]
    assert "U+D800 at column 45" in loaded.errors[0].message
    assert loaded.errors[0].token == "-x\\ud800y"  # shown escaped, valid text
    assert [s.name for s in loaded.services] == ["echo/tcp"]


def test_an_include_path_that_is_not_a_path_is_an_error_at_its_line(tmp_path: Path) -> None:
    # A NUL byte in an .include pattern, or a source directory that cannot be encoded, makes
    # os.stat raise ValueError: a diagnostic on the .include line, never an exception.
    loaded = load_text("echo stream tcp nowait root internal\n.include a\x00b\n", "t.conf",
                       Options(), fake_lookups())
    (err,) = loaded.errors
    assert (err.lineno, err.field) == (2, 2) and "cannot include" in err.message
    for pattern in ("x.conf", "*.conf"):
        loaded = load_text(f".include {pattern}\n", str(tmp_path / "\ud800" / "a.conf"),
                           Options(), fake_lookups())
        (err,) = loaded.errors
        assert err.lineno == 1 and "cannot include" in err.message
    (tmp_path / "nul.conf").write_bytes(b".include a\x00b\necho stream tcp nowait root internal\n")
    loaded = load_file(str(tmp_path / "nul.conf"), Options(), fake_lookups())
    assert [d.lineno for d in loaded.errors] == [1]
    assert [s.name for s in loaded.services] == ["echo/tcp"]


# -- the real system -------------------------------------------------------------------------


def test_real_system_lookups() -> None:
    loaded = load_text(
        "echo stream tcp nowait root internal\n", "t.conf", Options(), system_lookups()
    )
    assert loaded.errors == ()
    (svc,) = loaded.services
    assert svc.key.endpoints == (Endpoint(V4, "0.0.0.0", 7),)
    assert (svc.uid, svc.user_name) == (0, "root") and 0 in svc.groups


def test_real_system_program_and_unknown_user() -> None:
    loaded = load_text(
        "7007 stream tcp nowait root /bin/cat cat\n"
        "7008 stream tcp nowait no-such-user-xyz internal echo\n",
        "t.conf", Options(), system_lookups(),
    )  # fmt: skip
    assert [s.program for s in loaded.services] == ["/bin/cat"]
    assert [d.field for d in loaded.errors] == [5]
