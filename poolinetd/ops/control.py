"""The control socket: ``poolinetd status``, ``reload``, ``metrics`` and ``upgrade`` talk
to the master here.

Touches the OS: a Unix stream socket (mode 0600, owner only). Protocol: the
client sends one line (``status``, ``reload``, ``metrics`` or ``upgrade``),
the master answers one
JSON document (orjson) and closes. Every connection is non-blocking and has
a deadline, so no client can block or pin the master.
"""

from __future__ import annotations

import errno
import selectors
import socket
from collections.abc import Callable
from typing import Protocol

import orjson

from poolinetd.observe import log
from poolinetd.ops import listeners, sockserve

REQUEST_MAX = 256
CLIENT_TIMEOUT = 5.0
MAX_CLIENTS = 16


class Controlled(Protocol):
    """What the control socket needs from the master."""

    def status(self) -> dict[str, object]: ...

    def reload(self) -> bool: ...

    def render_metrics(self) -> bytes: ...

    def upgrade(self) -> str: ...


class ControlServer(sockserve.RequestServer):
    """The control socket: one line in, one JSON document out."""

    max_clients = MAX_CLIENTS
    timeout = CLIENT_TIMEOUT
    chunk = REQUEST_MAX

    def __init__(self, path: str, master: Controlled, sel: selectors.BaseSelector,
                 clock: Callable[[], float], sock: socket.socket | None = None) -> None:
        """Bind ``path``, or adopt ``sock`` (already listening there: handed over by the
        previous master in an upgrade, so the control socket never goes away)."""
        self.path = path
        self.master = master
        if sock is None:
            # The same rules as unix listeners: only a stale *socket* is ever removed
            # (anything else at the path is an error), the file is born 0600 and
            # proven to be ours before use. OSError keeps the CLI's error path.
            try:
                sock = listeners.bind_unix(path, socket.SOCK_STREAM, mode=0o600, backlog=16)
            except listeners.SocketInUse as exc:
                raise OSError(errno.EADDRINUSE, str(exc)) from exc
            except listeners.ListenError as exc:
                raise OSError(errno.EEXIST, str(exc)) from exc
        super().__init__(sock, sel, clock, listeners.close_listener)

    def answer(self, request: bytes, eof: bool) -> bytes | None:
        if not eof and b"\n" not in request and len(request) < REQUEST_MAX:
            return None
        command = request.split(b"\n", 1)[0].strip().decode("ascii", "replace")
        return log.json_bytes(self.command(command)) + b"\n"

    def command(self, command: str) -> dict[str, object]:
        if command == "status":
            return {"ok": True, **self.master.status()}
        if command == "reload":
            return {"ok": self.master.reload()}
        if command == "metrics":
            return {"ok": True, "text": self.master.render_metrics().decode()}
        if command == "upgrade":
            why = self.master.upgrade()
            return {"ok": not why, "error": why} if why else {"ok": True}
        return {"ok": False, "error": f"unknown command {command!r} "
                                      "(use status, reload, metrics or upgrade)"}


def request(path: str, command: str, timeout: float = 10.0) -> dict[str, object]:
    """Client side: send ``command`` to the master at ``path`` and return its answer.

    Raises OSError if nobody listens there, ValueError on a malformed answer.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(command.encode() + b"\n")
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    doc = orjson.loads(b"".join(chunks))
    if not isinstance(doc, dict):
        raise ValueError("control answer is not an object")
    return doc
