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

import selectors
import socket
from collections.abc import Callable

from poolinetd.observe import metrics
from poolinetd.ops import sockserve

CLIENT_TIMEOUT = 5.0
MAX_CLIENTS = 32
PER_SOURCE = 4


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


class MetricsServer(sockserve.RequestServer):
    """Serves ``render()`` at /metrics (metrics.HttpRequest decides every answer)."""

    max_clients = MAX_CLIENTS
    per_source = PER_SOURCE  # one scraper cannot take every slot
    timeout = CLIENT_TIMEOUT

    def __init__(self, sock: socket.socket, sel: selectors.BaseSelector,
                 render: Callable[[], bytes], clock: Callable[[], float]) -> None:
        self.render = render
        super().__init__(sock, sel, clock)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    @property
    def address(self) -> str:
        return str(self.sock.getsockname()[0])

    def answer(self, request: bytes, eof: bool) -> bytes | None:
        # A fresh reader over the whole request each time: requests are a few
        # hundred bytes, and this keeps no state per client beyond its bytes.
        reader = metrics.HttpRequest(self.render)
        return reader.feed(request) if not eof else reader.feed(request) or reader.feed(b"")
