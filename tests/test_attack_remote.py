"""Attacks by remote clients on the master's own endpoints, against a running server.

Each test reproduces a finding of a hostile review (issue 21) on loopback and
fails without its fix.
"""

from __future__ import annotations

import contextlib
import socket
import time

import pytest

ECHO = "127.0.0.1:0 stream tcp nowait nobody internal echo\n"


def _backlog(port: int) -> int | None:
    """How many connections wait in the accept queue of the loopback listener on ``port``
    (/proc/net/tcp: a LISTEN socket's rx_queue is its accept queue)."""
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            local, state, queues = fields[1], fields[3], fields[4]
            if state == "0A" and int(local.split(":")[1], 16) == port:
                return int(queues.split(":")[1], 16)
    return None


def wait_accepted(port: int, timeout: float = 30.0) -> None:
    """Until the server has accepted every connection queued on ``port``."""
    deadline = time.monotonic() + timeout
    while _backlog(port) != 0:
        assert time.monotonic() < deadline, f"connections still queued on {port}"
        time.sleep(0.01)


def _scrape_from(source: str, port: int, timeout: float = 10.0) -> bytes:
    """GET /metrics from ``source`` (a loopback address), whole answer."""
    with socket.socket() as sock:
        sock.bind((source, 0))
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("mode", ["pool", "classic"])
def test_silent_connections_from_a_few_sources_cannot_blind_metrics(serve, mode: str) -> None:
    """Eight addresses x 4 silent connections held every /metrics slot: 0 of 35 scrapes
    were answered. A scraper from another source now takes the place of the heaviest
    source's oldest connection."""
    server = serve(ECHO, "--metrics", "127.0.0.1:0", mode=mode)
    port = server.info["metrics"]["port"]  # type: ignore[index]
    silent = []
    try:
        for i in range(8):
            for _ in range(4):
                sock = socket.socket()
                sock.bind((f"127.0.0.{i + 2}", 0))
                sock.connect(("127.0.0.1", port))
                silent.append(sock)
        wait_accepted(port)
        answered = 0
        for _ in range(35):
            reply = _scrape_from("127.0.0.20", port)
            answered += reply.startswith(b"HTTP/1.0 200")
        assert answered == 35
    finally:
        for sock in silent:
            sock.close()


@pytest.mark.parametrize("mode", ["pool", "classic"])
def test_one_source_holding_thousands_of_connections_does_not_delay_another(
        serve, mode: str) -> None:
    """Issue 21, item 15: one source held 5,000 connections to a built-in and the classic
    master forked up to 1,024 children (the pool's safe share) before anyone else was
    served: a second client got no echo within 2 s. Classic mode's share follows what it
    forks quickly (CLASSIC_SOURCE_SHARE); pool mode served it at once already."""
    import resource

    held = 2500
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, held + 1000)), hard))
    server = serve(ECHO, mode=mode)
    port = server.port()
    flood = []
    try:
        for _ in range(held):
            sock = socket.socket()
            sock.bind(("127.0.0.2", 0))
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect(("127.0.0.1", port))
            flood.append(sock)
        began = time.monotonic()
        with socket.socket() as other:
            other.bind(("127.0.0.3", 0))
            other.settimeout(10)
            other.connect(("127.0.0.1", port))
            other.sendall(b"hello")
            assert other.recv(5) == b"hello"
        assert time.monotonic() - began < 2.0
    finally:
        for sock in flood:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("mode", ["pool", "classic"])
def test_silent_sources_filling_tcpmux_do_not_shut_it_for_everyone(serve, mode: str) -> None:
    """Issue 21, item 4: four sources at a quarter each (4 x 256 silent connections)
    filled tcpmux's preamble stage and a legitimate client waited 9.4 s in the backlog.
    Now it takes the place of the heaviest source's oldest connection and is served."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    server = serve("127.0.0.1:0 stream tcp nowait root internal tcpmux\n"
                   "tcpmux/+echo stream tcp nowait nobody /bin/cat cat\n", mode=mode)
    port = server.port()
    silent = []
    try:
        for source in range(4):
            for _ in range(256):
                sock = socket.socket()
                sock.bind((f"127.0.0.{source + 2}", 0))
                sock.connect(("127.0.0.1", port))
                silent.append(sock)
        wait_accepted(port)
        began = time.monotonic()
        with socket.socket() as legit:
            legit.bind(("127.0.0.9", 0))
            legit.settimeout(20)
            legit.connect(("127.0.0.1", port))
            legit.sendall(b"echo\r\nhello")
            got = b""
            while not got.endswith(b"hello"):
                chunk = legit.recv(100)
                assert chunk, got
                got += chunk
        assert got == b"+Go\r\nhello"
        assert time.monotonic() - began < 5.0
        name = server.listeners[0]["service"]
        assert isinstance(name, str)
        refused = server.service_status(name)["refused_by"]
        assert refused.get("preamble_evicted") == 1, refused
    finally:
        for sock in silent:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
