"""--syslog: RFC 3164 datagrams on a syslog socket, from the master, workers and classic
children, and a daemon that stops reading never stalls anything (drops are counted)."""

from __future__ import annotations

import io
import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TEST_USER, tcp_exchange, wait_until

from poolinetd.observe import log, syslog

U = TEST_USER
# <PRI>Mmm dd hh:mm:ss poolinetd[PID]: LEVEL EVENT key=value ...
LINE = re.compile(r"<(\d+)>([A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d) poolinetd\[(\d+)\]: "
                  r"(debug|info|warning|error) (\w+)(?: (.*))?")


def test_frame_is_rfc3164_as_libc_writes_it() -> None:
    when = time.mktime((2026, 3, 5, 7, 8, 9, 0, 0, -1))
    assert syslog.frame(syslog.FACILITIES["daemon"], logging.WARNING, when, 42,
                        "warning x a=1") == b"<28>Mar  5 07:08:09 poolinetd[42]: warning x a=1"
    assert syslog.frame(syslog.FACILITIES["local7"], logging.ERROR, when, 1,
                        "é")[:5] == b"<187>"
    long = syslog.frame(3, logging.INFO, when, 1, "x" * 20000)
    assert len(long) == syslog.MAX_LINE


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A syslog-like datagram socket (the test reads it, or never does)."""
    path = str(tmp_path / "log.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    os.chmod(path, 0o666)
    try:
        yield path, sock
    finally:
        sock.close()


def _read(sock: socket.socket, until: object, timeout: float = 20.0) -> list[str]:
    """Datagrams as text until ``until(lines)`` is true (fails the test after ``timeout``)."""
    lines: list[str] = []
    sock.settimeout(0.2)

    def more() -> bool:
        try:
            while True:
                lines.append(sock.recv(65536).decode())
        except TimeoutError:
            pass
        return bool(until(lines))  # type: ignore[operator]

    wait_until(more, timeout, "syslog lines")
    return lines


@pytest.fixture(autouse=True)
def _keep_the_logger() -> Iterator[None]:
    """Tests that configure poolinetd's logger leave it as they found it."""
    handlers, level = list(log.LOGGER.handlers), log.LOGGER.level
    yield
    log.LOGGER.handlers[:] = handlers
    log.LOGGER.setLevel(level)


def test_handler_counts_drops_and_warns_once(receiver) -> None:
    path, sock = receiver
    out = io.StringIO()
    log.setup("text", logging.INFO, stream=out)
    handler = syslog.install(path, "local0")
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        started = time.monotonic()
        for i in range(3000):
            log.info("probe", n=i)
        elapsed = time.monotonic() - started
        assert handler.dropped > 0 and handler.sent > 0
        assert handler.sent + handler.dropped == 3000
        assert elapsed < 10, elapsed  # never waited for the reader
        text = out.getvalue()
        assert text.count("syslog_dropped") == 1, text[-500:]  # at most once a minute
        assert syslog.status()["syslog"] == {"socket": path, "sent": handler.sent,
                                             "dropped": handler.dropped}
        first = sock.recv(65536).decode()
        match = LINE.fullmatch(first)
        assert match and match[1] == str(16 * 8 + 6) and match[5] == "probe", first
        assert match[3] == str(os.getpid())
    finally:
        log.LOGGER.removeHandler(handler)
        handler.close()


def test_a_missing_daemon_is_reached_when_it_appears(tmp_path: Path) -> None:
    path = str(tmp_path / "late.sock")
    log.setup("text", logging.INFO, stream=io.StringIO())
    handler = syslog.install(path)
    try:
        log.info("before")  # nobody there: dropped
        assert handler.dropped == 1
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)

            def arrives() -> bool:
                log.info("after")  # reconnects at most once a second
                sock.settimeout(0.05)
                try:
                    return b"after" in sock.recv(65536)
                except TimeoutError:
                    return False

            wait_until(arrives, 20, "a line after the daemon appeared")
    finally:
        log.LOGGER.removeHandler(handler)
        handler.close()


@pytest.fixture(params=["pool", "classic"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_server_lines_reach_syslog_from_every_process(serve, receiver, mode: str) -> None:
    path, sock = receiver
    conf = (f"127.0.0.1:0 stream tcp nowait {U} internal echo\n"
            f"127.0.0.1:0 on protocol=tcp, user={U}, args=daytime, only_from=192.0.2.1;\n"
            f"127.0.0.1:0 stream tcp nowait {U} /bin/sh sh -c \"exit 3\"\n")
    server = serve(conf, "--syslog", "--syslog-socket", path, "--syslog-facility", "local3",
                   "--log-connections", mode=mode)
    assert tcp_exchange(server.port(0), b"hi") == b"hi"
    assert tcp_exchange(server.port(1)) == b""  # refused: only_from
    tcp_exchange(server.port(2))  # the program exits 3: program_exit, a warning

    def complete(lines: list[str]) -> bool:
        text = "\n".join(lines)
        return all(f" {e} " in text for e in ("ready", "conn_refused", "program_exit",
                                                   "conn_end"))

    lines = _read(sock, complete)
    parsed = [LINE.fullmatch(line) for line in lines]
    assert all(parsed), [line for line, m in zip(lines, parsed, strict=True) if not m]
    by_event = {m[5]: m for m in parsed if m}
    facility = syslog.FACILITIES["local3"]
    assert by_event["ready"][1] == str(facility * 8 + 6)
    assert by_event["ready"][3] == str(server.pid)
    refused = by_event["conn_refused"]
    assert refused[1] == str(facility * 8 + 4) and "peer=127.0.0.1 reason=only_from" in refused[6]
    # A worker's lines (pool: program_exit) and a classic child's (conn_end of the echo it
    # served) are tagged with that process's pid, not the master's.
    assert "status=3" in by_event["program_exit"][6]
    other = by_event["program_exit" if mode == "pool" else "conn_end"]
    assert other[3] != str(server.pid), other[0]
    status = server.status()["syslog"]  # the master's own count (a classic child counts its own)
    assert status["socket"] == path and status["sent"] >= len(lines) - 2


def _fill(path: str) -> None:
    """Fill the receiver's queue (net.unix.max_dgram_qlen datagrams) so that every send
    to it fails with EAGAIN, as for a syslog daemon that stopped reading."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as filler:
        filler.connect(path)
        filler.setblocking(False)
        for _ in range(100_000):
            try:
                filler.send(b"<14>filler")
            except BlockingIOError:
                return
    raise AssertionError("the receiver's queue never filled")


def test_a_daemon_that_never_reads_stalls_nothing(serve, receiver, mode: str) -> None:
    """The socket is never read: lines are dropped, counted and warned about, and the
    server answers as fast as before."""
    path, _ = receiver
    _fill(path)
    conf = f"127.0.0.1:0 stream tcp nowait {U} internal echo\n"
    server = serve(conf, "--syslog", "--syslog-socket", path, "--log-connections",
                   "--log-level", "debug", mode=mode)
    port = server.port(0)
    started = time.monotonic()
    slowest = 0.0
    for _ in range(300):
        t = time.monotonic()
        assert tcp_exchange(port, b"x") == b"x"
        slowest = max(slowest, time.monotonic() - t)
    elapsed = time.monotonic() - started
    wait_until(lambda: server.status()["syslog"]["dropped"] > 0, 20, "drops counted")
    wait_until(lambda: "syslog_dropped" in server.log(), 20, "the syslog_dropped warning")
    assert server.log().count("syslog_dropped") == 1  # at most once a minute
    # Generous for two busy shared cores; a blocking send would hang for good.
    assert slowest < 5 and elapsed < 120, (slowest, elapsed)
