"""tcp_wrappers against a running poolinetd: hosts.allow/hosts.deny in a test directory
(``--tcp-wrappers-dir``), clients from distinct 127.0.0.x sources, both modes.

Names: 127.0.0.1 is ``localhost`` in /etc/hosts; the lookups run in the
resolver child while the connection waits in the engine.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import pytest
from conftest import TEST_USER, Server, wait_until

U = TEST_USER
MODES = ["pool", "classic"]
FINGERD = "/usr/sbin/in.fingerd"
TCPD = "/usr/sbin/tcpd"
TIMEOUT = 30.0  # a client's patience: a name lookup may wait out a silent DNS server


def exchange_from(source: str, port: int, payload: bytes = b"ping",
                  header: bytes = b"", host: str = "127.0.0.1") -> bytes:
    """Send ``header + payload`` from ``source``, half-close, read to EOF (b"" if refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.bind((source, 0))
        sock.connect((host, port))
        try:
            sock.sendall(header + payload)
            sock.shutdown(socket.SHUT_WR)
            out = b""
            while chunk := sock.recv(65536):
                out += chunk
            return out
        except OSError:
            return b""


def rules(directory: Path, allow: str, deny: str = "ALL: ALL\n") -> None:
    """Write both files; the new inode and mtime are seen at the next check (<= 1 s)."""
    for name, text in (("hosts.allow", allow), ("hosts.deny", deny)):
        tmp = directory / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, directory / name)


def refused_by(server: Server, name: str) -> dict[str, int]:
    got = server.service_status(name)["refused_by"]
    assert isinstance(got, dict)
    return got


@pytest.mark.process
@pytest.mark.parametrize("mode", MODES)
def test_rules_by_address_and_edit_without_reload(serve, tmp_path: Path, mode: str) -> None:
    rules(tmp_path, "echo: 127.0.0.2\ndaytime: 127.0.0.3 EXCEPT 127.0.0.1\n")
    server: Server = serve(f"127.0.0.1:0 stream tcp nowait {U} internal echo\n"
                           f"127.0.0.1:0 stream tcp nowait {U} internal daytime\n"
                           f"127.0.0.5:0 on socktype=stream, user={U}, args=echo, "
                           "tcp_wrappers=no;\n",
                           "--tcp-wrappers", "--tcp-wrappers-dir", str(tmp_path), mode=mode)
    echo, daytime, free = (server.port(i) for i in range(3))
    assert exchange_from("127.0.0.2", echo) == b"ping"
    assert exchange_from("127.0.0.1", echo) == b""
    assert exchange_from("127.0.0.3", daytime, b"") != b""
    assert exchange_from("127.0.0.1", daytime, b"") == b""
    assert exchange_from("127.0.0.1", free, host="127.0.0.5") == b"ping"  # tcp_wrappers=no
    name = server.listeners[0]["service"]
    assert refused_by(server, name) == {"tcp_wrappers": 1}
    # an edit takes effect without a reload (the files are stat'ed once a second)
    rules(tmp_path, "echo: 127.0.0.1\n")
    wait_until(lambda: exchange_from("127.0.0.1", echo) == b"ping", 20, "the edit applied")
    assert exchange_from("127.0.0.2", echo) == b""
    assert "reloaded" not in server.log()


@pytest.mark.process
@pytest.mark.parametrize("mode", MODES)
def test_rules_by_name_wait_for_the_resolver(serve, tmp_path: Path, mode: str) -> None:
    rules(tmp_path, "echo: localhost\n", "echo: 127.0.0.3\nALL: KNOWN\n")
    server: Server = serve(f"127.0.0.1:0 stream tcp nowait {U} internal echo\n",
                           "--tcp-wrappers", "--tcp-wrappers-dir", str(tmp_path), mode=mode)
    port = server.port()
    assert exchange_from("127.0.0.1", port) == b"ping"  # localhost, from /etc/hosts
    assert exchange_from("127.0.0.3", port) == b""  # an address rule: no lookup
    assert exchange_from("127.0.0.1", port) == b"ping"  # the cached name
    log = server.log()
    assert "resolver_failed" not in log and "internal_error" not in log, log


@pytest.mark.process
@pytest.mark.parametrize("mode", MODES)
def test_proxy_client_is_judged(serve, tmp_path: Path, mode: str) -> None:
    rules(tmp_path, "echo: 10.9.9.9\n")
    server: Server = serve(f"127.0.0.1:0 on socktype=stream, user={U}, args=echo, "
                           "proxy_protocol=yes, proxy_from=127.0.0.1;\n",
                           "--tcp-wrappers", "--tcp-wrappers-dir", str(tmp_path), mode=mode)
    port = server.port()
    header = b"PROXY TCP4 10.9.9.9 127.0.0.1 4000 7\r\n"
    assert exchange_from("127.0.0.1", port, header=header) == b"ping"
    other = b"PROXY TCP4 10.9.9.8 127.0.0.1 4000 7\r\n"
    assert exchange_from("127.0.0.1", port, header=other) == b""


@pytest.mark.process
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("flag", [False, True])
def test_debian_tcpd_line_is_wrapped_natively(serve, tmp_path: Path, mode: str,
                                              flag: bool) -> None:
    if not (os.access(FINGERD, os.X_OK) and os.access(TCPD, os.X_OK)):
        pytest.skip("in.fingerd or tcpd is not installed")
    rules(tmp_path, "in.fingerd: 127.0.0.2\n")
    args = ["--tcp-wrappers-dir", str(tmp_path), *(["--tcp-wrappers"] if flag else [])]
    # as the fingerd package writes it (one port-0 line: its own server)
    server: Server = serve(f"127.0.0.1:0 stream tcp nowait {U} {TCPD} {FINGERD}\n",
                           *args, mode=mode)
    port = server.port()
    reply = exchange_from("127.0.0.2", port, b"nobody\r\n").decode()
    assert re.search(r"^Login: nobody", reply, re.M), (reply, server.log())
    assert exchange_from("127.0.0.1", port, b"nobody\r\n") == b""
    # judged by poolinetd (tcpd would have run and been the one to refuse)
    assert refused_by(server, server.listeners[0]["service"]) == {"tcp_wrappers": 1}
