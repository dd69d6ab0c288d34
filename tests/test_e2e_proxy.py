"""Behind a real HAProxy (PROXY v1/v2, health checks), tcpmux with real exchanges, and several
masters on one port (SO_REUSEPORT); both modes, on loopback."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TEST_USER, Server, start_server, tcp_exchange, wait_until
from haproxy import HAProxy, Route, haproxy_binary, start
from haproxy import Server as Backend

from poolinetd.net import preamble, proxyproto

U = TEST_USER
MODES = ["pool", "classic"]
needs_haproxy = pytest.mark.skipif(haproxy_binary() is None, reason="haproxy not installed")


@pytest.fixture
def proxies() -> Iterator[list[HAProxy]]:
    started: list[HAProxy] = []
    yield started
    for hx in started:
        hx.stop()


def exchange_from(source: str, port: int, payload: bytes, timeout: float = 20.0,
                  shut: bool = True) -> bytes:
    """Connect from loopback address ``source`` (a distinct client), send, read to EOF."""
    with socket.socket() as sock:
        sock.settimeout(timeout)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        try:
            if payload:
                sock.sendall(payload)
            if shut:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError, OSError):
            return b""  # refused (and reset) before we were done sending
        chunks = []
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)


def _env(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


@needs_haproxy
@pytest.mark.process
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_program_behind_haproxy_sees_the_client(serve, tmp_path: Path, proxies: list[HAProxy],
                                                  staged_programs: Path, mode: str,
                                                  version: str) -> None:
    server: Server = serve(f"127.0.0.1:0 on socktype=stream, wait=no, user={U}, "
                           f"exec={staged_programs}/report.sh, args=report.sh, "
                           "proxy_protocol=yes, proxy_from=127.0.0.1;\n", mode=mode)
    hx = start(tmp_path, [Route("r", (Backend("p1", server.port(), send_proxy=version),))])
    proxies.append(hx)
    # No half-close: HAProxy would take a client's early FIN as an abort before connecting.
    out = exchange_from("127.0.0.5", hx.port, b"", shut=False).decode()
    env = _env(out)
    assert "TCPREMOTEIP" in env, (out, server.log(), hx.log())
    assert env["TCPREMOTEIP"] == "127.0.0.5" and env["REMOTE_ADDR"] == "127.0.0.5"
    assert env["TCPLOCALPORT"] == str(hx.port)  # the header's destination: HAProxy's frontend
    assert env["TCPLOCALIP"] == "127.0.0.1"
    name = server.listeners[0]["service"]
    assert server.service_status(name)["accepted"] == 1


@needs_haproxy
@pytest.mark.process
@pytest.mark.parametrize("mode", MODES)
def test_echo_behind_haproxy_is_exact_and_health_checks_pass(
        serve, tmp_path: Path, proxies: list[HAProxy], mode: str) -> None:
    server: Server = serve(f"127.0.0.1:0 on socktype=stream, user={U}, args=echo, "
                           "proxy_protocol=yes, proxy_from=127.0.0.0/8;\n", mode=mode)
    hx = start(tmp_path, [Route("e", (Backend("p1", server.port(), send_proxy="v2", check=True,
                                              check_send_proxy=True),), check_echo="PING")])
    proxies.append(hx)
    hx.wait_server("e", "p1", "UP")  # v2 LOCAL health checks consumed exactly, then echoed
    payload = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n" + bytes(range(256)) * 64
    assert exchange_from("127.0.0.6", hx.port, payload) == payload


@pytest.mark.process
@pytest.mark.parametrize("mode", MODES)
def test_forged_malformed_and_silent_headers_are_refused_others_served(serve,
                                                                        mode: str) -> None:
    server: Server = serve(f"127.0.0.1:0 on socktype=stream, user={U}, args=echo, "
                           "proxy_protocol=yes, proxy_from=127.0.0.1/32;\n", mode=mode)
    port = server.port()
    name = server.listeners[0]["service"]
    good = proxyproto.encode_v1(("192.0.2.1", 1234), ("127.0.0.1", port))
    # A header from outside proxy_from is refused, whatever it says.
    assert exchange_from("127.0.0.9", port, good + b"forged") == b""
    # Garbage from a trusted proxy is refused as soon as it is seen.
    assert exchange_from("127.0.0.1", port, b"GET / HTTP/1.0\r\n\r\n") == b""
    # A silent client holds nothing: others are served meanwhile, it is dropped at the deadline.
    with socket.create_connection(("127.0.0.1", port), timeout=60) as silent:
        started = time.monotonic()
        for i in range(5):
            data = b"payload %d" % i
            assert exchange_from("127.0.0.1", port, good + data) == data
        silent.settimeout(preamble.DEADLINE + 30)
        assert silent.recv(10) == b""
        assert time.monotonic() - started >= preamble.DEADLINE - 1
    refused = server.service_status(name)["refused_by"]
    assert refused == {"proxy_untrusted": 1, "proxy_malformed": 1, "preamble_timeout": 1}


@pytest.mark.process
@pytest.mark.parametrize("mode", MODES)
def test_per_source_limits_judge_the_client_the_header_names(serve, mode: str) -> None:
    server: Server = serve(f"127.0.0.1:0 on socktype=stream, user={U}, args=echo, "
                           "proxy_protocol=yes, proxy_from=127.0.0.1, max_child_per_ip=1;\n",
                           mode=mode)
    port = server.port()

    def header(client: str) -> bytes:
        return proxyproto.encode_v2((client, 4000), ("127.0.0.1", port))

    with socket.create_connection(("127.0.0.1", port), timeout=20) as held:
        held.sendall(header("198.51.100.1") + b"x")
        assert held.recv(1) == b"x"
        # Same proxy, same client: over its limit. Another client: served.
        assert exchange_from("127.0.0.1", port, header("198.51.100.1") + b"y") == b""
        assert exchange_from("127.0.0.1", port, header("198.51.100.2") + b"z") == b"z"


@pytest.mark.process
@pytest.mark.parametrize("mode", MODES)
def test_tcpmux_routes_by_name_with_its_users_and_replies(serve, staged_programs: Path,
                                                          mode: str) -> None:
    server: Server = serve(
        "127.0.0.1:0 stream tcp nowait root internal tcpmux\n"
        f"tcpmux/+Report stream tcp nowait {U} {staged_programs}/report.sh report.sh\n"
        f"tcpmux/cat stream tcp nowait {U} /bin/cat cat\n", mode=mode)
    port = server.port_of(server.listeners[0]["service"])
    out = tcp_exchange(port, b"REPORT\r\n", timeout=20)
    assert out.startswith(b"+Go\r\n")
    env = _env(out.decode())
    assert env["TCPREMOTEIP"] == "127.0.0.1" and env["USER"] == U
    # tcpmux/cat answers for itself: no +Go, and the bytes after the line reach it intact.
    assert tcp_exchange(port, b"cat\r\nhello, world", timeout=20) == b"hello, world"
    assert tcp_exchange(port, b"help\r\n", timeout=20) == b"cat\r\nreport\r\n"
    assert tcp_exchange(port, b"nothing-here\r\n", timeout=20).startswith(b"-")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.process
@pytest.mark.parametrize("mode", MODES)
def test_two_masters_share_a_port_with_reuseport(tmp_path: Path, mode: str) -> None:
    port = _free_port()
    conf = f"127.0.0.1:{port} on socktype=stream, user={U}, args=echo, reuseport=yes;\n"
    first = start_server(tmp_path, conf, mode=mode)
    try:
        second = start_server(tmp_path, conf, mode=mode)
        try:
            for i in range(60):
                assert tcp_exchange(port, b"%d" % i, timeout=20) == b"%d" % i
            name = first.listeners[0]["service"]
            counts = [s.service_status(name)["accepted"] for s in (first, second)]
            assert sum(counts) == 60 and min(counts) > 0  # the kernel spread them
        finally:
            second.stop()
    finally:
        first.stop()
    without = f"127.0.0.1:{port} on socktype=stream, user={U}, args=echo;\n"
    only = start_server(tmp_path, without, mode=mode)
    try:
        blocked = start_server(tmp_path, without, mode=mode, expect_ready=False)
        wait_until(lambda: blocked.proc.poll() is not None, 30, "the second master to give up")
        assert blocked.proc.returncode == 71  # address in use: no reuseport, no sharing
    finally:
        only.stop()
