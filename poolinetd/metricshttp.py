"""The ``--metrics ADDR:PORT`` endpoint: ``GET /metrics`` served from the engine's own loop.

Touches the OS: one TCP listener and its clients, all non-blocking, in the
engine's selector (no thread: the master forks). What to answer is decided
by ``metrics.HttpRequest`` (pure). Every client has a deadline and there are
at most ``MAX_CLIENTS`` at once, so a slow or hostile scraper can neither
block nor pin the master; the response is rendered only for a complete,
valid request.

fd ownership: the server owns its listener (``sock``) and every client
socket, and closes each on every path.
"""

from __future__ import annotations

import contextlib
import errno
import selectors
import socket
import time
from collections.abc import Callable

from poolinetd import metrics

CLIENT_TIMEOUT = 5.0
MAX_CLIENTS = 32
_RECV = 4096


def open_listener(address: str, port: int) -> socket.socket:
    """Bind and listen on ``address:port`` (non-blocking). Raises OSError."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(64)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def parse_address(text: str) -> tuple[str, int]:
    """``ADDR:PORT`` or ``[V6ADDR]:PORT`` -> (address, port); ValueError with the reason."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r}: expected ADDR:PORT (e.g. 127.0.0.1:9100)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: port must be 0-65535")
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        raise ValueError(f"{text!r}: {host!r} is not a numeric address") from None
    return host, int(port)


class _Client:
    def __init__(self, server: MetricsServer, sock: socket.socket, deadline: float) -> None:
        self.server = server
        self.sock = sock
        self.deadline = deadline
        self.request = metrics.HttpRequest(server.render)
        self.reply = memoryview(b"")

    def on_event(self, mask: int) -> None:
        if self.reply:
            self._write()
            return
        try:
            data = self.sock.recv(_RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        answer = self.request.feed(data)
        if answer is None:
            return
        if not answer:
            self.server.drop(self)
            return
        self.reply = memoryview(answer)
        self.server.sel.modify(self.sock, selectors.EVENT_WRITE, self)
        self._write()

    def _write(self) -> None:
        try:
            sent = self.sock.send(self.reply)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            sent = len(self.reply)
        self.reply = self.reply[sent:]
        if not self.reply:
            self.server.drop(self)


class MetricsServer:
    """Serves ``render()`` at /metrics; registered in ``sel`` by the engine."""

    def __init__(self, sock: socket.socket, sel: selectors.BaseSelector,
                 render: Callable[[], bytes], clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.sock = sock
        self.sel = sel
        self.render = render
        self.clock = clock
        self.clients: list[_Client] = []
        self.resume_at = 0.0
        sel.register(sock, selectors.EVENT_READ, self)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    @property
    def address(self) -> str:
        return str(self.sock.getsockname()[0])

    def on_event(self, mask: int) -> None:
        for _ in range(MAX_CLIENTS):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.sel.unregister(self.sock)  # rest instead of spinning
                    self.resume_at = self.clock() + 1.0
                return
            if len(self.clients) >= MAX_CLIENTS:
                conn.close()
                continue
            conn.setblocking(False)
            client = _Client(self, conn, self.clock() + CLIENT_TIMEOUT)
            self.clients.append(client)
            self.sel.register(conn, selectors.EVENT_READ, client)

    def drop(self, client: _Client) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(client.sock)
        client.sock.close()
        with contextlib.suppress(ValueError):
            self.clients.remove(client)

    def next_deadline(self) -> float | None:
        times = [c.deadline for c in self.clients]
        if self.resume_at:
            times.append(self.resume_at)
        return min(times, default=None)

    def expire(self, now: float) -> None:
        if self.resume_at and now >= self.resume_at:
            self.resume_at = 0.0
            self.sel.register(self.sock, selectors.EVENT_READ, self)
        for client in [c for c in self.clients if c.deadline <= now]:
            self.drop(client)

    def close(self) -> None:
        for client in list(self.clients):
            self.drop(client)
        if not self.resume_at:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(self.sock)
        self.sock.close()
