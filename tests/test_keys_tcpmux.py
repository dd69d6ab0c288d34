"""tcpmux (RFC 1078) in the config: the internal listener and tcpmux/NAME, tcpmux/+NAME
sub-services, FreeBSD/NetBSD syntax (issue 11)."""

from __future__ import annotations

import pytest
from config_helpers import errors, load

from poolinetd.config.spec import TCPMUX, ServiceKey, SocketType

LISTENER = "tcpmux\tstream\ttcp\tnowait\troot\tinternal\n"


def test_the_listener_is_a_built_in_on_port_1() -> None:
    loaded = load(LISTENER)
    assert loaded.diagnostics == ()
    (mux,) = loaded.services
    assert (mux.internal, mux.program, mux.tcpmux_name) == (TCPMUX, None, None)
    assert [(ep.address, ep.port) for ep in mux.key.endpoints] == [("0.0.0.0", 1)]
    assert load("[::1]:7001 stream tcp6 nowait root internal tcpmux").errors == ()


def test_sub_services_have_no_endpoints_and_a_distinct_identity() -> None:
    loaded = load(LISTENER + "tcpmux/Date\tstream\ttcp\tnowait\tnobody\t/bin/date\tdate\n"
                  "tcpmux/+cat\tstream\ttcp\tnowait\tnobody\t/bin/cat\tcat\n"
                  "tcpmux/+ECHO\tstream\ttcp\tnowait\tnobody\tinternal\n")  # fmt: skip
    assert loaded.diagnostics == (), [str(d) for d in loaded.diagnostics]
    _, date, cat, echo = loaded.services
    assert (date.name, date.tcpmux_name, date.tcpmux_plus, date.program) == (
        "tcpmux/date", "date", False, "/bin/date")
    assert (cat.tcpmux_name, cat.tcpmux_plus, cat.user_name) == ("cat", True, "nobody")
    assert (echo.tcpmux_name, echo.internal) == ("echo", "echo")
    assert date.key == ServiceKey(SocketType.STREAM, False, (), "tcpmux/date")
    assert len({s.key for s in loaded.services}) == 4


def test_a_built_in_sub_service_names_its_built_in() -> None:
    loaded = load(LISTENER + "tcpmux/+chars stream tcp nowait nobody internal chargen\n")
    assert loaded.errors == ()
    assert loaded.services[1].internal == "chargen"
    (err,) = errors(LISTENER + "tcpmux/+nosuch stream tcp nowait nobody internal\n")
    assert "field 6 'internal': no built-in named 'nosuch'" in err


def test_a_built_in_without_plus_cannot_answer_the_tcpmux_reply() -> None:
    (err,) = errors(LISTENER + "tcpmux/echo stream tcp nowait nobody internal\n")
    assert "built-in echo cannot send tcpmux's '+' reply itself" in err


def test_duplicate_names_are_case_insensitive_errors() -> None:
    loaded = load(LISTENER + "tcpmux/date stream tcp nowait nobody /bin/date date\n"
                  "tcpmux/+DATE stream tcp nowait nobody /bin/date date\n")  # fmt: skip
    assert [str(d) for d in loaded.errors] == [
        "/etc/t.conf:3: field 1 'tcpmux/+DATE': duplicate tcpmux sub-service 'date': also at "
        "/etc/t.conf:2 (tcpmux names are case-insensitive) (remove one or rename it)"
    ]
    assert [s.name for s in loaded.services] == ["tcpmux/tcp", "tcpmux/date"]


def test_a_sub_service_without_a_listener_is_a_warning() -> None:
    loaded = load("tcpmux/date stream tcp nowait nobody /bin/date date\n")
    assert loaded.errors == ()
    assert [str(d) for d in loaded.warnings] == [
        "/etc/t.conf:1: field 1 'tcpmux/date': warning: no tcpmux listener is configured, so "
        "tcpmux/date cannot be reached (add: tcpmux stream tcp nowait root internal)"
    ]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("tcpmux/x dgram udp nowait nobody /bin/cat cat", "a tcpmux sub-service is stream only"),
        ("tcpmux/x stream tcp wait nobody /bin/cat cat", "a tcpmux sub-service is nowait"),
        ("tcpmux/help stream tcp nowait nobody /bin/cat cat", "HELP is tcpmux's own request"),
        ("tcpmux/x stream tcp nowait nobody internal tcpmux",
         "a tcpmux sub-service cannot be the tcpmux listener"),
        ("tcpmux/x stream tcp nowait nobody /bin/cat cat\n"
         "tcpmux/\u00e9 stream tcp nowait nobody /bin/cat cat", "a tcpmux name is printable ASCII"),
        ("tcpmux dgram udp wait root internal tcpmux", "the tcpmux built-in is stream tcp only"),
        ("/run/mux stream unix nowait root internal tcpmux",
         "the tcpmux built-in is stream tcp only"),
    ],
)
def test_refused_shapes(entry: str, message: str) -> None:
    assert any(message in e for e in errors(LISTENER + entry + "\n")), errors(LISTENER + entry)


def test_a_listen_address_on_a_sub_service_is_ignored_with_a_warning() -> None:
    loaded = load(LISTENER + "127.0.0.1:tcpmux/date stream tcp nowait nobody /bin/date date\n")
    assert loaded.errors == ()
    assert "listen address ignored" in loaded.warnings[0].message
    assert loaded.services[1].key.endpoints == ()


def test_sub_services_get_the_safe_default_and_may_set_their_own_limits() -> None:
    loaded = load(LISTENER + "tcpmux/date on protocol=tcp, wait=no, user=nobody, "
                  "exec=/bin/date, args=date, max_child_per_ip=2;\n"
                  "tcpmux/+cat stream tcp nowait nobody /bin/cat cat\n")  # fmt: skip
    assert loaded.errors == ()
    assert loaded.services[1].limits.max_child_per_ip == 2
    assert loaded.services[2].limits.max_child_per_ip == 256


def test_proxy_protocol_belongs_on_the_listener() -> None:
    text = ("tcpmux on protocol=tcp, user=root, proxy_protocol=yes, proxy_from=127.0.0.1;\n"
            "tcpmux/date on protocol=tcp, wait=no, user=nobody, exec=/bin/date, args=date, "
            "proxy_protocol=yes, proxy_from=127.0.0.1;\n")
    (err,) = errors(text)
    assert ":2: field 8 'proxy_protocol=yes': a tcpmux sub-service reads no PROXY header" in err
