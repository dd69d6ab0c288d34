"""poolinetd serving an xinetd tree: `-c xinetd.conf` starts, and a reload (SIGHUP) reads the
includedir again: a file added there is served, a removed one is not. Both modes, loopback."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest
from conftest import TEST_USER, Server, wait_until

MODES = ["pool", "classic"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def echo_block(ident: str, port: int) -> str:
    return (f"service echo\n{{\n\ttype = INTERNAL UNLISTED\n\tid = {ident}\n"
            f"\tsocket_type = stream\n\twait = no\n\tuser = {TEST_USER}\n\tport = {port}\n"
            f"\tbind = 127.0.0.1\n\tflags = NOLIBWRAP\n}}\n")


def echoes(port: int) -> bool:
    """Whether an echo answers on ``port`` now (False when nothing listens)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"e")
            return sock.recv(1) == b"e"
    except OSError:
        return False


def refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.parametrize("mode", MODES)
def test_reload_reads_the_includedir_again(serve, tmp_path: Path, mode: str) -> None:
    first, second = free_port(), free_port()
    confd = tmp_path / "xinetd.d"
    confd.mkdir()
    (confd / "first").write_text(echo_block("first", first))
    (confd / "second.dpkg-new").write_text(echo_block("second", second))  # skipped: a dot
    server: Server = serve("defaults\n{\n}\nincludedir xinetd.d\n", mode=mode)
    assert echoes(first) and refuses(second)
    (confd / "second.dpkg-new").rename(confd / "second")
    server.send_signal(signal.SIGHUP)
    wait_until(lambda: echoes(second), 30.0, "the added file's service after SIGHUP")
    (confd / "first").unlink()
    server.send_signal(signal.SIGHUP)
    wait_until(lambda: refuses(first), 30.0, "the removed file's service to close")
    assert echoes(second)


@pytest.mark.parametrize("mode", MODES)
def test_banner_fail_is_sent_when_tcp_wrappers_refuse(serve, tmp_path: Path, mode: str) -> None:
    """xinetd (built with libwrap) sends banner_fail to a client hosts.deny refuses; so does
    poolinetd for a service of an xinetd file, and serves the others."""
    port = free_port()
    banner = tmp_path / "denied.txt"
    banner.write_bytes(b"go away\r\n")
    banner.chmod(0o644)
    (tmp_path / "hosts.allow").write_text("")
    (tmp_path / "hosts.deny").write_text("echo: 127.0.0.3\n")
    conf = (f"service echo\n{{\n\ttype = INTERNAL UNLISTED\n\tsocket_type = stream\n"
            f"\twait = no\n\tuser = {TEST_USER}\n\tport = {port}\n\tbind = 127.0.0.1\n"
            f"\tbanner_fail = {banner}\n}}\n")
    server: Server = serve(conf, "--tcp-wrappers", "--tcp-wrappers-dir", str(tmp_path),
                           mode=mode)
    assert echoes(port)
    with socket.socket() as sock:
        sock.settimeout(10)
        sock.bind(("127.0.0.3", 0))
        sock.connect(("127.0.0.1", port))
        got = b""
        while chunk := sock.recv(100):
            got += chunk
    assert got == b"go away\r\n"
    wait_until(lambda: "reason=tcp_wrappers" in server.log(), 20.0, "the refusal logged")
