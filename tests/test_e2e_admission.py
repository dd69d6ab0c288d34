"""Exposed to hostile sources: access lists, per-source limits by network, blocks, global caps
and the safe default, against a running server; clients bound to distinct 127.0.x.y sources."""

from __future__ import annotations

import contextlib
import resource
import socket
import time
from pathlib import Path

import pytest
from conftest import TEST_USER, Server, udp_exchange, wait_until

U = TEST_USER
MODES = ["pool", "classic"]


def connect_from(source: str, port: int, host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(20)
    sock.bind((source, 0))
    sock.connect((host, port))
    return sock


def echo_from(source: str, port: int, payload: bytes = b"ping", host: str = "127.0.0.1") -> bytes:
    """An echo exchange from ``source``; b"" when the server closed or reset instead."""
    with connect_from(source, port, host) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            out = b""
            while chunk := sock.recv(65536):
                out += chunk
            return out
        except OSError:
            return b""


def held_from(source: str, port: int) -> socket.socket:
    """A connection from ``source`` that the echo service really serves (checked), kept open."""
    sock = connect_from(source, port)
    sock.sendall(b"h")
    assert sock.recv(1) == b"h"
    return sock


def refused_from(source: str, port: int) -> bool:
    with connect_from(source, port) as sock:
        try:
            return sock.recv(1) == b""
        except ConnectionResetError:
            return True


@pytest.mark.process
@pytest.mark.parametrize("mode", MODES)
def test_access_lists_on_stream_and_per_datagram(serve, mode: str) -> None:
    lists = "only_from=127.0.0.0/24, no_access=127.0.0.5"
    server: Server = serve(f"127.0.0.1:0 on socktype=stream, user={U}, args=echo, {lists};\n"
                           f"127.0.0.1:0 on socktype=dgram, protocol=udp, wait=yes, user={U}, "
                           f"args=echo, {lists};\n", mode=mode)
    tcp = server.port_of(server.listeners[0]["service"])
    udp = server.port_of(server.listeners[1]["service"], "dgram")
    assert echo_from("127.0.0.1", tcp) == b"ping"
    assert echo_from("127.0.0.5", tcp) == b""  # no_access wins over only_from
    assert echo_from("127.0.1.1", tcp) == b""  # not in only_from
    svc = server.service_status(server.listeners[0]["service"])
    assert svc["refused_by"] == {"no_access": 1, "only_from": 1}

    def udp_from(source: str) -> bytes | None:
        return udp_exchange(udp, b"datagram", source=source)

    assert udp_from("127.0.0.1") == b"datagram"
    assert udp_from("127.0.0.5") is None
    assert udp_from("127.0.1.1") is None
    assert udp_from("127.0.0.2") == b"datagram"  # the refused ones cost nobody else anything


@pytest.mark.process
@pytest.mark.parametrize("mode", MODES)
def test_sources_of_one_network_share_a_limit(serve, mode: str) -> None:
    server: Server = serve(f"127.0.0.1:0 on socktype=stream, user={U}, args=echo, "
                           "max_child_per_ip=1, source_v4_prefix=24;\n", mode=mode)
    port = server.port()
    with held_from("127.0.3.1", port):
        assert refused_from("127.0.3.2", port)  # the same /24
        assert echo_from("127.0.4.1", port) == b"ping"  # another /24 is served at once


@pytest.mark.process
@pytest.mark.parametrize("mode", MODES)
def test_a_source_over_its_rate_is_blocked_then_judged_afresh(serve, mode: str) -> None:
    server: Server = serve(f"127.0.0.1:0 on socktype=stream, user={U}, args=echo, "
                           "max_cpm_per_ip=2, block_time=3;\n", mode=mode)
    port = server.port()
    name = server.listeners[0]["service"]
    assert echo_from("127.0.5.1", port) == b"ping"
    assert echo_from("127.0.5.1", port) == b"ping"
    assert refused_from("127.0.5.1", port)  # over the rate: refused, and blocked from now
    blocked_at = time.monotonic()
    assert echo_from("127.0.5.2", port) == b"ping"  # another source is not affected
    assert refused_from("127.0.5.1", port)
    assert server.service_status(name)["refused_by"] == {"max_cpm_per_ip": 1, "blocked": 1}
    wait_until(lambda: time.monotonic() - blocked_at > 3.5, 10, "the block to expire")
    got = echo_from("127.0.5.1", port)
    assert got == b"ping", (server.service_status(name), server.log())  # judged afresh


@pytest.mark.process
@pytest.mark.parametrize("mode", MODES)
def test_a_global_cap_queues_the_next_client_until_a_slot_frees(serve, mode: str) -> None:
    server: Server = serve(f"127.0.0.1:0 on socktype=stream, user={U}, args=echo;\n"
                           f"127.0.0.2:0 on socktype=stream, user={U}, args=echo;\n",
                           "--max-connections", "2", mode=mode)
    a, b = server.port(0), server.port(1)
    first = held_from("127.0.6.1", a)
    second = connect_from("127.0.6.2", b, host="127.0.0.2")
    second.sendall(b"h")
    assert second.recv(1) == b"h"
    try:
        waiting = connect_from("127.0.6.3", a)  # in the kernel backlog, not refused
        waiting.sendall(b"queued")
        waiting.settimeout(1.0)
        with pytest.raises(TimeoutError):
            waiting.recv(6)
        first.close()
        waiting.settimeout(20)
        assert waiting.recv(6) == b"queued"  # served once a slot freed
        waiting.close()
        assert all(s["refused"] == 0 for s in server.status()["services"])
    finally:
        first.close()
        second.close()


@pytest.mark.process
def test_with_the_default_config_one_source_cannot_take_a_service(serve) -> None:
    """Pool mode, built-in defaults (16 workers x 256 connections): one source holds
    thousands of connections; another source is still served at once."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2300
    if hard < want:
        pytest.skip(f"the fd limit ({hard}) is too low for {want} client sockets")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    server: Server = serve(f"127.0.0.1:0 stream tcp nowait {U} internal echo\n")
    port = server.port()
    name = server.listeners[0]["service"]
    held: list[socket.socket] = []
    try:
        refused = 0
        for _ in range(2000):
            sock = connect_from("127.0.7.1", port)
            held.append(sock)
        for sock in held:  # the share (capacity / 4 = 1024) is served, the rest closed
            try:
                sock.sendall(b"x")
                got = sock.recv(1)
            except OSError:
                got = b""
            refused += got != b"x"
        svc = server.service_status(name)
        assert (refused, svc["active"], svc["refused_by"]) == (
            2000 - 1024, 1024, {"max_child_per_ip": 976})
        assert echo_from("127.0.7.2", port) == b"ping"
    finally:
        for sock in held:
            with contextlib.suppress(OSError):
                sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.process
def test_classic_mode_keeps_the_same_share(serve) -> None:
    server: Server = serve(f"127.0.0.1:0 stream tcp nowait/40 {U} internal echo\n",
                           mode="classic")
    port = server.port()
    held = [held_from("127.0.8.1", port) for _ in range(10)]  # 40 / 4
    try:
        assert refused_from("127.0.8.1", port)
        assert echo_from("127.0.8.2", port) == b"ping"
    finally:
        for sock in held:
            sock.close()


@pytest.mark.process
@pytest.mark.parametrize("mode", MODES)
def test_ipv6_lists_through_the_loopback(serve, mode: str) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("::1 is not configured")
    server: Server = serve(
        f"[::1]:0 on socktype=stream, protocol=tcp6, user={U}, args=echo, only_from=::1;\n"
        f"[::1]:0 on socktype=stream, protocol=tcp6, user={U}, args=daytime, "
        "no_access=::1/128;\n", mode=mode)
    assert echo_from("::1", server.port(0), host="::1") == b"ping"
    assert echo_from("::1", server.port(1), host="::1") == b""  # daytime would answer


@pytest.mark.process
@pytest.mark.parametrize("mode", MODES)
def test_a_datagram_wait_program_is_started_only_for_an_admitted_source(
        serve, staged_programs: Path, mode: str) -> None:
    server: Server = serve(f"127.0.0.1:0 on socktype=dgram, protocol=udp, wait=yes, user={U}, "
                           f"exec={staged_programs}/udp_wait_server.py, "
                           "args=udp_wait_server.py 0.3, no_access=127.0.9.9;\n", mode=mode)
    port = server.port_of(server.listeners[0]["service"], "dgram")
    name = server.listeners[0]["service"]

    def ask(source: str) -> bytes | None:
        return udp_exchange(port, b"rrq", timeout=5, source=source)

    assert ask("127.0.9.9") is None  # dropped before any program started
    assert server.service_status(name)["accepted"] == 0
    got = ask("127.0.9.1")
    assert got is not None and got.endswith(b" rrq")
    assert server.service_status(name)["refused_by"] == {"no_access": 1}
