"""End-to-end attacks on the engine's accounting and dispatch, against a real server on loopback.

Each test performs what a hostile client or a hostile local user would do,
and asserts the safe outcome, in both modes where it applies.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import socket
import struct
import threading
from pathlib import Path

import pytest
from conftest import (
    IS_ROOT,
    TEST_USER,
    Server,
    refused,
    tcp_exchange,
    udp_exchange,
    wait_until,
)

U = TEST_USER
MODES = ["pool", "classic"]


def _echo_once(port: int, payload: bytes = b"ping", timeout: float = 20.0) -> bytes:
    return tcp_exchange(port, payload, timeout=timeout)


@pytest.mark.process
@pytest.mark.parametrize("mode", MODES)
def test_a_source_is_not_locked_out_by_reloads_that_drop_and_restore_its_limit(
        serve, mode: str) -> None:
    limited = f"127.0.0.1:0 on socktype=stream, user={U}, args=echo, max_child_per_ip=2;\n"
    server: Server = serve(limited, mode=mode)
    port = server.port()
    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
    for sock in held:  # both are really being served
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
    server.conf.write_text(f"127.0.0.1:0 on socktype=stream, user={U}, args=echo, "
                           "conn_timeout=299;\n")
    assert server.status()["reloads"] == 0
    server.send_signal(signal.SIGHUP)
    wait_until(lambda: server.status()["reloads"] == 1, 20, "the first reload")
    for sock in held:
        sock.close()
    wait_until(lambda: all(s["active"] == 0 for s in server.status()["services"]), 20,
               "the held connections to end")
    server.conf.write_text(limited)
    server.send_signal(signal.SIGHUP)
    wait_until(lambda: server.status()["reloads"] == 2, 20, "the second reload")
    assert _echo_once(port) == b"ping"  # served, not refused forever
    wait_until(lambda: all(s["active"] == 0 for s in server.status()["services"]), 20,
               "that connection's end to be counted")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as a, \
            socket.create_connection(("127.0.0.1", port), timeout=10) as b:
        for sock in (a, b):
            sock.sendall(b"y")
            assert sock.recv(1) == b"y"
        assert refused(port)  # the limit still holds: the third is refused


@pytest.mark.process
@pytest.mark.parametrize("mode", MODES)
def test_a_limit_added_by_reload_counts_the_connections_already_running(serve, mode: str) -> None:
    server: Server = serve(f"127.0.0.1:0 on socktype=stream, user={U}, args=echo;\n", mode=mode)
    port = server.port()
    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
    for sock in held:
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
    server.conf.write_text(f"127.0.0.1:0 on socktype=stream, user={U}, args=echo, "
                           "max_child_per_ip=2;\n")
    server.send_signal(signal.SIGHUP)
    wait_until(lambda: server.status()["reloads"] == 1, 20, "the reload")
    assert refused(port)
    for sock in held:
        sock.close()


@pytest.mark.process
def test_a_stopped_worker_is_routed_around_and_replaced(serve) -> None:
    server: Server = serve(f"127.0.0.1:0 on socktype=stream, user={U}, args=echo, "
                           "pool_min=1, pool_max=4;\n")
    port = server.port()
    assert _echo_once(port) == b"ping"
    (first,) = server.workers()
    os.kill(first, signal.SIGSTOP)
    try:
        results: list[bytes] = []

        def client() -> None:
            try:
                results.append(_echo_once(port, timeout=40))
            except OSError:
                results.append(b"")

        threads = [threading.Thread(target=client) for _ in range(5)]
        for t in threads:
            t.start()
        wait_until(lambda: "worker_stalled" in server.log(), 30, "the stall to be noticed")
        svc = server.status()["services"][0]
        assert svc["workers"]["stalled"] == 1 or "worker_killed" in server.log()
        # New clients are served at once by the replacement.
        assert _echo_once(port, timeout=20) == b"ping"
        for t in threads:
            t.join(60)
        assert len(results) == 5  # every client got an answer or a close: none hangs
        wait_until(lambda: "worker_killed" in server.log(), 30, "the stalled worker's kill")
    finally:
        with contextlib.suppress(ProcessLookupError):  # killed and reaped meanwhile
            os.kill(first, signal.SIGCONT)


@pytest.mark.process
@pytest.mark.parametrize("mode", MODES)
def test_log_connections_reports_built_in_byte_counts(serve, mode: str) -> None:
    server: Server = serve(f"127.0.0.1:0 stream tcp nowait {U} internal echo\n",
                           "--log-connections", mode=mode)
    assert _echo_once(server.port(), b"0123456789") == b"0123456789"
    wait_until(lambda: "conn_end" in server.log(), 20, "the conn_end line")
    line = next(ln for ln in server.log().splitlines() if "conn_end" in ln)
    assert "bytes_in=10" in line and "bytes_out=10" in line
    assert "program_exit" not in server.log()


@pytest.mark.process
@pytest.mark.parametrize("mode", MODES)
def test_ready_line_and_throttled_refusals_in_both_modes(serve, mode: str) -> None:
    server: Server = serve(f"127.0.0.1:0 on socktype=stream, user={U}, args=echo, "
                           "max_cpm_per_ip=1;\n", mode=mode)
    port = server.port()
    assert _echo_once(port) == b"ping"
    for _ in range(20):
        assert refused(port)
    wait_until(lambda: server.service_status(server.listeners[0]["service"])["refused"] == 20,
               20, "20 refusals")
    assert " ready " in server.log() or '"event":"ready"' in server.log()
    assert server.log().count("conn_refused") == 1  # throttled: one line per interval
    assert server.status()["services"][0]["refused_by"] == {"max_cpm_per_ip": 20}


@pytest.mark.process
@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason="needs root: the reply's credentials must be nobody's")
@pytest.mark.parametrize("mode", MODES)
def test_datagram_built_ins_answer_with_the_service_users_credentials(
        serve, public_dir: Path, mode: str) -> None:
    """A root master must never answer a datagram client itself (classic inetd does):
    the kernel's SCM_CREDENTIALS on the reply say who sent it."""
    path = public_dir / "echo.dgram"
    server: Server = serve(f"{path} dgram unix wait {U} internal echo\n", mode=mode)
    client_path = public_dir / "client.dgram"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
        client.bind(str(client_path))
        os.chmod(client_path, 0o777)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        client.settimeout(20)
        client.sendto(b"who are you", str(path))
        data, anc, _, _ = client.recvmsg(1024, socket.CMSG_SPACE(12))
    assert data == b"who are you"
    creds = [c for c in anc if c[0] == socket.SOL_SOCKET and c[1] == socket.SCM_CREDENTIALS]
    assert creds, "no credentials on the reply"
    pid, uid, _gid = struct.unpack("iII", creds[0][2][:12])
    assert uid == pwd.getpwnam(U).pw_uid and uid != 0
    assert pid != server.pid


@pytest.mark.process
def test_a_stopped_worker_holding_a_datagram_socket_is_replaced(serve) -> None:
    server: Server = serve(f"127.0.0.1:0 dgram udp wait {U} internal echo\n")
    port = server.port_of(server.listeners[0]["service"], "dgram")

    def ask() -> bytes | None:
        return udp_exchange(port, b"q", timeout=1.0)

    assert wait_until(ask, 20, "a first answer") == b"q"
    (holder,) = server.workers()
    os.kill(holder, signal.SIGSTOP)
    try:
        wait_until(lambda: "worker_stalled" in server.log(), 30, "the stall to be seen")
        assert wait_until(ask, 40, "an answer from the replacement") == b"q"
    finally:
        with contextlib.suppress(ProcessLookupError):  # killed and reaped meanwhile
            os.kill(holder, signal.SIGCONT)
