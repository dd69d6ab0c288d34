"""The control socket: ``poolinetd status`` and ``poolinetd reload`` talk to the master here.

Touches the OS: a Unix stream socket (mode 0600, owner only). Protocol: the
client sends one line (``status`` or ``reload``), the master answers one
JSON document (orjson) and closes. Every connection is non-blocking and has
a deadline, so no client can block or pin the master.
"""

from __future__ import annotations

import contextlib
import errno
import selectors
import socket
import time
from typing import Protocol

import orjson

from poolinetd import listeners, log

REQUEST_MAX = 256
CLIENT_TIMEOUT = 5.0
MAX_CLIENTS = 16


class Controlled(Protocol):
    """What the control socket needs from the master."""

    def status(self) -> dict[str, object]: ...

    def reload(self) -> bool: ...

    def render_metrics(self) -> bytes: ...

    def upgrade(self) -> str: ...


class ControlConn:
    """One client of the control socket (owned by the ControlServer; closed on every path)."""

    def __init__(self, server: ControlServer, sock: socket.socket, deadline: float) -> None:
        self.server = server
        self.sock = sock
        self.deadline = deadline
        self.request = b""
        self.reply = memoryview(b"")

    def on_event(self, sel: selectors.BaseSelector, mask: int) -> None:
        if self.reply:
            self._write(sel)
            return
        try:
            data = self.sock.recv(REQUEST_MAX)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        self.request += data
        if data and b"\n" not in self.request and len(self.request) < REQUEST_MAX:
            return
        command = self.request.split(b"\n", 1)[0].strip().decode("ascii", "replace")
        self.reply = memoryview(log.json_bytes(self.server.answer(command)) + b"\n")
        sel.modify(self.sock, selectors.EVENT_WRITE, self)
        self._write(sel)

    def _write(self, sel: selectors.BaseSelector) -> None:
        try:
            sent = self.sock.send(self.reply)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            sent = len(self.reply)
        self.reply = self.reply[sent:]
        if not self.reply:
            self.server.drop(sel, self)


class ControlServer:
    """Owns the control listener and its clients."""

    def __init__(self, path: str, master: Controlled, sock: socket.socket | None = None) -> None:
        """Bind ``path``, or adopt ``sock`` (already listening there: handed over by the
        previous master in an upgrade, so the control socket never goes away)."""
        self.path = path
        self.master = master
        self.clients: list[ControlConn] = []
        self.resume_at = 0.0  # > 0 while accepting rests after EMFILE
        if sock is not None:
            sock.setblocking(False)
            self.sock = sock
            return
        # The same rules as unix listeners: only a stale *socket* is ever removed
        # (anything else at the path is an error), the file is born 0600 and
        # proven to be ours before use. OSError keeps the CLI's error path.
        try:
            self.sock = listeners.bind_unix(path, socket.SOCK_STREAM, mode=0o600, backlog=16)
        except listeners.SocketInUse as exc:
            raise OSError(errno.EADDRINUSE, str(exc)) from exc
        except listeners.ListenError as exc:
            raise OSError(errno.EEXIST, str(exc)) from exc

    def on_accept(self, sel: selectors.BaseSelector) -> None:
        for _ in range(MAX_CLIENTS):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of fds: stop polling for a second instead of spinning on a
                    # listener that stays readable.
                    sel.unregister(self.sock)
                    self.resume_at = time.monotonic() + 1.0
                return
            if len(self.clients) >= MAX_CLIENTS:
                conn.close()
                continue
            conn.setblocking(False)
            client = ControlConn(self, conn, time.monotonic() + CLIENT_TIMEOUT)
            self.clients.append(client)
            sel.register(conn, selectors.EVENT_READ, client)

    def answer(self, command: str) -> dict[str, object]:
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

    def drop(self, sel: selectors.BaseSelector, client: ControlConn) -> None:
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(client.sock)
        client.sock.close()
        with contextlib.suppress(ValueError):
            self.clients.remove(client)

    def next_deadline(self) -> float | None:
        times = [c.deadline for c in self.clients]
        if self.resume_at:
            times.append(self.resume_at)
        return min(times, default=None)

    def expire(self, sel: selectors.BaseSelector, now: float) -> None:
        if self.resume_at and now >= self.resume_at:
            self.resume_at = 0.0
            sel.register(self.sock, selectors.EVENT_READ, self)
        for client in [c for c in self.clients if c.deadline <= now]:
            self.drop(sel, client)

    def close(self, sel: selectors.BaseSelector) -> None:
        for client in list(self.clients):
            self.drop(sel, client)
        if not self.resume_at:
            with contextlib.suppress(KeyError, ValueError):
                sel.unregister(self.sock)
        listeners.close_listener(self.sock)


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
