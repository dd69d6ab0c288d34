"""The HAProxy harness (tests/haproxy.py) against a tiny PROXY-reading echo server.

The server reads the header the way poolinetd's preamble stage will (peek, parse with
proxyproto.parse, recv exactly what is settled; see proxyproto's module doc), records
it, then echoes the rest. So these tests prove both that the harness drives a real
HAProxy (send-proxy, send-proxy-v2, health checks with check-send-proxy) and that the
parser accepts what real HAProxy sends, consuming exactly the header (the echo must
return the client's bytes, and an echo health check only passes if no header byte
leaks into the stream). conf/haproxy.cfg is run unchanged too.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
from conftest import REPO, wait_until
from haproxy import (
    HAProxy,
    Route,
    Server,
    free_port,
    haproxy_binary,
    render_config,
    start,
    start_file,
)

from poolinetd.net.proxyproto import (
    MAX_HEADER,
    PP2_TYPE_CRC32C,
    Header,
    Invalid,
    NeedMore,
    Result,
    parse,
)

pytestmark = [
    pytest.mark.process,
    pytest.mark.skipif(haproxy_binary() is None, reason="haproxy not installed"),
]
READ_TIMEOUT = 20.0


@dataclass
class Record:
    """One connection the echo server saw: the parse verdict, the bytes echoed, the peer."""

    result: Result | None
    echoed: bytes
    peer: tuple[str, int]


class ProxyEcho:
    """A threaded loopback TCP server: PROXY header, then echo until EOF."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.create_server((host, 0), family=family)
        self.port: int = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.records: list[Record] = []
        self.threads: list[threading.Thread] = []
        self.closed = threading.Event()
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn, peer), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        result: Result | None = None
        echoed = b""
        with conn:
            conn.settimeout(READ_TIMEOUT)
            try:
                result = read_header(conn)
                if isinstance(result, Header):
                    while data := conn.recv(65536):
                        echoed += data
                        conn.sendall(data)
            except OSError:  # health checks may reset; the record says how far it got
                pass
        with self.lock:
            self.records.append(Record(result, echoed, peer[:2]))

    def snapshot(self) -> list[Record]:
        with self.lock:
            return list(self.records)

    def headers(self) -> list[Header]:
        return [r.result for r in self.snapshot() if isinstance(r.result, Header)]

    def close(self) -> None:
        self.closed.set()
        self.sock.close()
        for t in self.threads:
            t.join(READ_TIMEOUT)


def read_header(conn: socket.socket) -> Result | None:
    """The preamble loop: peek, parse, consume only bytes the verdict settles."""
    mine = b""
    while True:
        peek = conn.recv(MAX_HEADER - len(mine), socket.MSG_PEEK)
        if not peek:
            return None  # EOF before a complete header
        result = parse(mine + peek)
        if isinstance(result, NeedMore):
            mine += _recv_exact(conn, len(peek))
            continue
        if isinstance(result, Header):
            _recv_exact(conn, result.consumed - len(mine))
        return result


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("EOF inside a peeked header")
        data += chunk
    return data


@pytest.fixture
def echo_servers() -> Iterator[list[ProxyEcho]]:
    made: list[ProxyEcho] = []
    yield made
    for server in made:
        server.close()


@pytest.fixture
def hx_list() -> Iterator[list[HAProxy]]:
    made: list[HAProxy] = []
    yield made
    for hx in made:
        hx.stop()


def client_exchange(
    port: int, payload: bytes, source: str = "127.0.0.2", dest: str = "127.0.0.1"
) -> tuple[bytes, tuple[str, int]]:
    """Connect from ``source`` (any 127.0.x.y works on Linux loopback), send, half-close,
    read to EOF. Returns the reply and the client's own address."""
    family = socket.AF_INET6 if ":" in dest else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(READ_TIMEOUT)
        sock.bind((source, 0))
        sock.connect((dest, port))
        me = sock.getsockname()[:2]
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # a refusing server may have reset us already
            return b"", me
        reply = b""
        with contextlib.suppress(ConnectionResetError):  # a refusing server may reset
            while data := sock.recv(65536):
                reply += data
        return reply, me


def _client_headers(server: ProxyEcho, src: str) -> list[Header]:
    return [h for h in server.headers() if h.src is not None and h.src[0] == src]


def _headers_from(server: ProxyEcho, src: tuple[str, int]) -> list[Header]:
    return [h for h in server.headers() if h.src == src]


# -------------------------------------------------------------------------------------


def test_rendered_config_passes_haproxy_check(tmp_path: Path) -> None:
    routes = [
        Route("a", (Server("s1", 1, send_proxy="v1", check=True),), check_echo="PING"),
        Route(
            "b",
            (
                Server(
                    "s1",
                    2,
                    send_proxy="v2",
                    check=True,
                    check_send_proxy=True,
                    proxy_v2_options="crc32c",
                ),
            ),
            bind_host="::1",
        ),
    ]
    cfg = tmp_path / "check.cfg"
    cfg.write_text(render_config(routes, {"a": 10001, "b": 10002}, tmp_path / "s.sock"))
    binary = haproxy_binary()
    assert binary is not None
    done = subprocess.run(
        [binary, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr
    text = cfg.read_text()
    assert "send-proxy-v2 proxy-v2-options crc32c check inter 500ms" in text
    assert "bind [::1]:10002" in text and "tcp-check send PING\\r\\n" in text


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_send_proxy_carries_the_client_address_and_the_echo_is_exact(
    tmp_path: Path, echo_servers: list[ProxyEcho], hx_list: list[HAProxy], version: str
) -> None:
    server = ProxyEcho()
    echo_servers.append(server)
    srv = Server("s1", server.port, send_proxy="v1" if version == "v1" else "v2")
    hx = start(tmp_path, [Route("r", (srv,))])
    hx_list.append(hx)
    payload = b"PROXY TCP4 6.6.6.6 6.6.6.6 1 1\r\n\x00\r\n\r\n" + bytes(range(256)) * 40
    reply, me = client_exchange(hx.port, payload, source="127.0.0.2")
    assert reply == payload  # header-looking client bytes pass through untouched
    headers = wait_until(lambda: _client_headers(server, "127.0.0.2"), what="the header")
    assert isinstance(headers, list)
    (h,) = headers
    assert h.version == (1 if version == "v1" else 2)
    assert (h.command, h.family) == ("PROXY", "inet")
    assert h.src == me and h.dst == ("127.0.0.1", hx.port)


def test_v1_and_v2_over_ipv6(
    tmp_path: Path, echo_servers: list[ProxyEcho], hx_list: list[HAProxy]
) -> None:
    server = ProxyEcho()
    echo_servers.append(server)
    routes = [
        Route("six1", (Server("s1", server.port, send_proxy="v1"),), bind_host="::1"),
        Route("six2", (Server("s1", server.port, send_proxy="v2"),), bind_host="::1"),
    ]
    hx = start(tmp_path, routes)
    hx_list.append(hx)
    for name, version in (("six1", 1), ("six2", 2)):
        reply, me = client_exchange(hx.ports[name], b"v6", source="::1", dest="::1")
        assert reply == b"v6"
        got = wait_until(partial(_headers_from, server, me), what="the header")
        assert isinstance(got, list)
        (h,) = got
        assert (h.version, h.family, h.dst) == (version, "inet6", ("::1", hx.ports[name]))


def test_v2_tlvs_from_haproxy_are_skipped_safely(
    tmp_path: Path, echo_servers: list[ProxyEcho], hx_list: list[HAProxy]
) -> None:
    server = ProxyEcho()
    echo_servers.append(server)
    srv = Server("s1", server.port, send_proxy="v2", proxy_v2_options="crc32c")
    hx = start(tmp_path, [Route("tlv", (srv,))])
    hx_list.append(hx)
    reply, me = client_exchange(hx.port, b"after the TLVs", source="127.0.0.5")
    assert reply == b"after the TLVs"
    got = wait_until(lambda: _client_headers(server, "127.0.0.5"), what="the header")
    assert isinstance(got, list)
    (h,) = got
    assert h.src == me
    assert [(t, len(v)) for t, v in h.tlvs] == [(PP2_TYPE_CRC32C, 4)]


def test_v2_health_checks_send_local_and_pass_an_echo_check(
    tmp_path: Path, echo_servers: list[ProxyEcho], hx_list: list[HAProxy]
) -> None:
    server = ProxyEcho()
    echo_servers.append(server)
    srv = Server("s1", server.port, send_proxy="v2", check=True, check_send_proxy=True)
    hx = start(tmp_path, [Route("chk", (srv,), check_echo="PING")])
    hx_list.append(hx)
    wait_until(lambda: any(h.command == "LOCAL" for h in server.headers()), what="a check")
    hx.wait_server("chk", "s1", "UP")
    checks = [r for r in server.snapshot() if isinstance(r.result, Header)]
    assert checks
    for r in checks:
        assert isinstance(r.result, Header)
        assert (r.result.version, r.result.command, r.result.src) == (2, "LOCAL", None)
        assert r.echoed == b"PING\r\n"  # nothing of the header leaked into the stream


def test_v1_health_checks_send_a_header_the_parser_accepts(
    tmp_path: Path, echo_servers: list[ProxyEcho], hx_list: list[HAProxy]
) -> None:
    server = ProxyEcho()
    echo_servers.append(server)
    srv = Server("s1", server.port, send_proxy="v1", check=True, check_send_proxy=True)
    hx = start(tmp_path, [Route("chk1", (srv,), check_echo="PING")])
    hx_list.append(hx)
    wait_until(lambda: server.snapshot(), what="a health check")
    hx.wait_server("chk1", "s1", "UP")
    for r in server.snapshot():
        # HAProxy fills a v1 check's line with the check connection's own addresses.
        assert isinstance(r.result, Header) and r.result.version == 1, r
        assert (r.result.src, r.result.dst) == (r.peer, ("127.0.0.1", server.port))
        assert r.echoed == b"PING\r\n"


def test_a_dead_backend_is_seen_down(tmp_path: Path, hx_list: list[HAProxy]) -> None:
    """wait_server observes real check results, not a constant."""
    dead = free_port()
    hx = start(tmp_path, [Route("d", (Server("s1", dead, send_proxy="v2", check=True),))])
    hx_list.append(hx)
    hx.wait_server("d", "s1", "DOWN")
    assert "s1" in hx.log()


def test_a_non_proxy_sender_is_invalid_at_once(
    echo_servers: list[ProxyEcho],
) -> None:
    """Sanity of the server itself: a plain client gets no echo and an Invalid record."""
    server = ProxyEcho()
    echo_servers.append(server)
    reply, _ = client_exchange(server.port, b"GET / HTTP/1.0\r\n\r\n")
    assert reply == b""
    got = wait_until(lambda: server.snapshot(), what="the record")
    assert isinstance(got, list)
    assert isinstance(got[0].result, Invalid)


def test_conf_example_runs_unchanged(
    tmp_path: Path, echo_servers: list[ProxyEcho], hx_list: list[HAProxy]
) -> None:
    hosts = [ProxyEcho(), ProxyEcho()]
    echo_servers.extend(hosts)
    front = free_port()
    env = {
        "ECHO_FRONTEND": f"127.0.0.1:{front}",
        "ECHO_HOST1": f"127.0.0.1:{hosts[0].port}",
        "ECHO_HOST2": f"127.0.0.1:{hosts[1].port}",
        "CHECK_INTER": "500ms",
    }
    hx = start_file(tmp_path, REPO / "conf" / "haproxy.cfg", env, {"echo": front})
    hx_list.append(hx)
    for name in ("host1", "host2"):
        hx.wait_server("poolinetd_echo", name, "UP")
    for i in range(4):
        payload = f"hello {i}\n".encode()
        assert client_exchange(hx.port, payload, source="127.0.0.3")[0] == payload
    for host in hosts:  # round robin reached both, each saw the client and LOCAL checks
        wait_until(partial(_client_headers, host, "127.0.0.3"), what="client headers")
        assert any(h.command == "LOCAL" for h in host.headers())
        assert all(h.version == 2 for h in host.headers())


def test_stop_ends_haproxy_and_frees_the_port(tmp_path: Path) -> None:
    server = ProxyEcho()
    try:
        hx = start(tmp_path, [Route("s", (Server("s1", server.port),))])
        with hx:
            assert client_exchange(hx.port, b"")[0] == b""  # no PROXY header: no echo
        assert hx.proc.poll() is not None
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", hx.port), timeout=5),
        ):
            pytest.fail("the frontend still accepts after stop()")
    finally:
        server.close()
