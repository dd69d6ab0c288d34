"""Load generator against a tiny in-test server on 127.0.0.1 (real sockets, < 5 s)."""

from __future__ import annotations

import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from benchmarks.loadgen import pattern_payload, run_load

# How the test server answers the bytes it received so far; None = wait for more.
Reply = Callable[[bytes], bytes | None]


@contextmanager
def tiny_server(reply: Reply, *, close_first: bool) -> Iterator[int]:
    """Serve on 127.0.0.1:0 in a thread; yields the port, stops and closes all on exit.

    Each connection collects input until ``reply`` returns bytes, sends them,
    then closes at once (``close_first``) or waits for the client to close.
    """
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(512)
    lsock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ, None)
    bufs: dict[socket.socket, bytearray] = {}
    stop = threading.Event()

    def close(c: socket.socket) -> None:
        sel.unregister(c)
        bufs.pop(c, None)
        c.close()

    def loop() -> None:
        deadline = time.monotonic() + 30  # bounded even if the test hangs
        while not stop.is_set() and time.monotonic() < deadline:
            for key, _ in sel.select(0.05):
                if key.data is None:
                    while True:
                        try:
                            c, _addr = lsock.accept()
                        except BlockingIOError:
                            break
                        c.setblocking(False)
                        bufs[c] = bytearray()
                        sel.register(c, selectors.EVENT_READ, "conn")
                        # Services like daytime answer without any input.
                        answer(c)
                    continue
                fo = key.fileobj
                assert isinstance(fo, socket.socket)
                c = fo
                try:
                    data = c.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    close(c)
                    continue
                bufs[c] += data
                answer(c)

    def answer(c: socket.socket) -> None:
        out = reply(bytes(bufs[c]))
        if out is None:
            return
        bufs[c].clear()
        try:
            c.sendall(out)
        except OSError:
            close(c)
            return
        if close_first:
            close(c)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield lsock.getsockname()[1]
    finally:
        stop.set()
        t.join(5)
        for c in list(bufs):
            close(c)
        sel.close()
        lsock.close()


PAYLOAD = pattern_payload(64)


def echo(data: bytes) -> bytes | None:
    return data if len(data) >= len(PAYLOAD) else None


def test_echo_counts_and_latencies() -> None:
    with tiny_server(echo, close_first=False) as port:
        r = run_load(
            "127.0.0.1", port, 4, 0.5, PAYLOAD, expect=PAYLOAD, warmup=0.1, timeout=2, fork=False
        )
    assert r.error_total == 0, r.errors
    assert r.completed > 50
    assert r.started >= r.completed
    assert r.conn_per_s == pytest.approx(r.completed / 0.5)
    assert 0 < r.p50_ms <= r.p90_ms <= r.p99_ms <= r.max_ms
    assert r.client_user_s + r.client_sys_s > 0


def test_wrong_reply_is_an_error() -> None:
    def upper(data: bytes) -> bytes | None:
        out = echo(data)
        return None if out is None else out.upper()

    with tiny_server(upper, close_first=False) as port:
        r = run_load(
            "127.0.0.1", port, 2, 0.3, PAYLOAD, expect=PAYLOAD, warmup=0.0, timeout=2, fork=False
        )
    assert r.completed == 0
    assert r.errors.get("wrong_reply", 0) > 0
    assert set(r.errors) == {"wrong_reply"}


def test_daytime_style_and_short_reply() -> None:
    line = b"Wed Nov 26 12:00:00 2025\r\n"
    with tiny_server(lambda _d: line, close_first=True) as port:
        ok = run_load("127.0.0.1", port, 2, 0.3, warmup=0.0, timeout=2, fork=False)
        # A reply that is a strict prefix of the expected one is "short".
        short = run_load(
            "127.0.0.1",
            port,
            2,
            0.3,
            expect=line + b"more",
            until_close=True,
            warmup=0.0,
            fork=False,
        )
    assert ok.error_total == 0 and ok.completed > 10
    assert short.completed == 0 and set(short.errors) == {"short_reply"}


def test_refused_and_loopback_only() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    r = run_load("127.0.0.1", port, 1, 0.1, warmup=0.0, fork=False, max_connections=200)
    assert r.completed == 0 and r.errors.get("ECONNREFUSED", 0) > 0
    assert r.started <= 200
    with pytest.raises(ValueError):
        run_load("192.0.2.1", 7, 1, 0.1)
