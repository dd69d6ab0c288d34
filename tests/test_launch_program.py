"""launch.program: the launch contract both modes share (environment, addresses, exit lines)."""

from __future__ import annotations

import dataclasses
import logging
import socket

import pytest
from engine_fakes import services_from
from log_events import Event
from log_events import events as events  # the fixture

from poolinetd.config.spec import Service
from poolinetd.launch import program


def service(line: str) -> Service:
    return services_from(line)[0]


TCP = "127.0.0.1:0 stream tcp nowait {user} /bin/cat cat\n"
UDP = "127.0.0.1:0 dgram udp wait {user} /bin/cat cat\n"


def test_tcp_environment_is_clean_plus_ucspi_and_cgi_variables() -> None:
    svc = service(TCP)
    env = program.connection_env(svc, "198.51.100.7 40122", "192.0.2.1 79")
    assert env == {
        "PATH": program.BASE_PATH, "HOME": svc.home, "USER": svc.user_name,
        "LOGNAME": svc.user_name, "SHELL": "/bin/sh", "PROTO": "TCP",
        "TCPREMOTEIP": "198.51.100.7", "TCPREMOTEPORT": "40122",
        "TCPLOCALIP": "192.0.2.1", "TCPLOCALPORT": "79",
        "REMOTE_ADDR": "198.51.100.7", "REMOTE_PORT": "40122",
    }


def test_v6_clients_say_tcp6_and_mapped_v4_clients_are_reported_as_v4() -> None:
    svc = service(TCP)
    six = program.connection_env(svc, "2001:db8::7 40122", "2001:db8::1 79")
    assert six["PROTO"] == "TCP6" and six["TCPREMOTEIP"] == "2001:db8::7"
    assert not any(key.startswith("TCP6") for key in six)  # UCSPI names stay TCP...
    mapped = program.connection_env(svc, "::ffff:192.0.2.9 5", "::ffff:192.0.2.1 79")
    assert mapped["PROTO"] == "TCP" and mapped["REMOTE_ADDR"] == "192.0.2.9"
    assert mapped["TCPLOCALIP"] == "192.0.2.1"


def test_udp_gets_udp_variables_and_the_service_env_wins() -> None:
    svc = dataclasses.replace(service(UDP), env={"PATH": "/opt/bin", "EXTRA": "1"})
    env = program.connection_env(svc, "192.0.2.5 53", "192.0.2.1 69")
    assert env["PROTO"] == "UDP" and env["UDPREMOTEIP"] == "192.0.2.5"
    assert "TCPREMOTEIP" not in env
    assert env["PATH"] == "/opt/bin" and env["EXTRA"] == "1"


def test_addresses_in_wire_form() -> None:
    assert program.format_addr(("192.0.2.1", 79)) == "192.0.2.1 79"
    assert program.format_addr(("2001:db8::1", 79, 0, 0)) == "2001:db8::1 79"
    assert program.format_addr("/run/sock") == ""
    with socket.create_server(("127.0.0.1", 0)) as lst:
        port = lst.getsockname()[1]
        assert program.local_address(lst, "") == f"127.0.0.1 {port}"
        assert program.local_address(lst, "203.0.113.1 80") == "203.0.113.1 80"  # PROXY said


def test_exit_lines_say_failures_always_and_successes_when_asked(events: list[Event]) -> None:
    program.log_program_exit("cat", 42, 0, 0.5, log_connections=False)
    assert events == []
    program.log_program_exit("cat", 42, 0, 0.5, log_connections=True, peer="192.0.2.5 1")
    program.log_program_exit("cat", 43, 3, 0.25, log_connections=False)
    assert events == [
        (logging.INFO, "program_exit", {"service": "cat", "pid": 42, "peer": "192.0.2.5 1",
                                        "status": 0, "duration": 0.5}),
        (logging.WARNING, "program_exit", {"service": "cat", "pid": 43, "status": 3,
                                           "duration": 0.25}),
    ]


def test_spawn_failure_raises_and_leaves_the_socket_to_the_caller(events: list[Event]) -> None:
    svc = dataclasses.replace(service(TCP), program="/nonexistent/program")
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(OSError) as info:
            program.spawn_program(svc, a, "", "")
        assert a.fileno() >= 0  # still the caller's
        program.log_exec_failed(svc, 7, info.value)
    assert events[-1][1] == "exec_failed" and events[-1][2]["errno"] == "ENOENT"
    assert "peer" not in events[-1][2]
