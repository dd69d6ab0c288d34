"""A small request/reply server inside the engine's selector: the control socket, /metrics.

Touches the OS: accept, recv, send, all non-blocking. A client sends one
request (at most ``limit`` bytes), gets one reply, and is closed; every
client has a deadline and there are at most ``max_clients`` at once, so a
slow or hostile one can neither block nor pin the master. When accept runs
out of fds the listener rests a second instead of spinning. What a request
means is the subclass's ``answer`` (None: not complete yet).

fd ownership: the server owns its listener (``sock``) and every client
socket, and closes each on every path; ``close`` closes the listener through
``close_listener`` (the control socket's file is removed only if it made it).
"""

from __future__ import annotations

import contextlib
import errno
import selectors
import socket
from collections.abc import Callable, Hashable

from poolinetd.net import netmatch

_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Client:
    """One connection to a ``RequestServer``."""

    def __init__(self, server: RequestServer, sock: socket.socket, deadline: float,
                 source: Hashable = "") -> None:
        self.server = server
        self.sock = sock
        self.deadline = deadline
        self.source = source
        self.request = b""
        self.reply = memoryview(b"")

    def on_event(self, mask: int) -> None:
        if self.reply:
            self._write()
            return
        try:
            data = self.sock.recv(self.server.chunk)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        self.request += data
        answer = self.server.answer(self.request, eof=not data)
        if answer is None:
            return
        if not answer:
            self.server.drop(self)
            return
        self.reply = memoryview(answer)
        self.server.sel.modify(self.sock, selectors.EVENT_WRITE, self.on_event)
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


def _source(addr: object) -> Hashable:
    """Who a client is, for the per-source share: its address, an IPv6 one by its /64
    (one host usually holds a whole /64); "" for a unix peer."""
    if not isinstance(addr, tuple):
        return ""
    return netmatch.source_key(str(addr[0]), 32, 64)


class RequestServer:
    """Registered in ``sel`` at construction; the engine calls ``expire`` and ``close``."""

    chunk = 4096  # bytes read per wakeup
    max_clients = 16
    per_source = 0  # clients from one address at once (0: no separate cap)
    timeout = 5.0  # seconds a client may take for its whole exchange

    def __init__(self, sock: socket.socket, sel: selectors.BaseSelector,
                 clock: Callable[[], float],
                 close_listener: Callable[[socket.socket], None] | None = None) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.sel = sel
        self.clock = clock
        self._close_listener = close_listener
        self.clients: list[Client] = []
        self.by_source: dict[Hashable, int] = {}
        self.resume_at = 0.0  # > 0 while accepting rests after running out of fds
        sel.register(sock, selectors.EVENT_READ, self.on_event)

    def answer(self, request: bytes, eof: bool) -> bytes | None:
        """The whole reply to ``request`` (all bytes so far), or None to read on;
        b"" closes without a reply."""
        raise NotImplementedError

    def on_event(self, mask: int) -> None:
        for _ in range(self.max_clients):
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRORS:
                    self.sel.unregister(self.sock)
                    self.resume_at = self.clock() + 1.0
                return
            source = _source(addr)
            if not self._make_room(source):
                conn.close()
                continue
            conn.setblocking(False)
            client = Client(self, conn, self.clock() + self.timeout, source)
            self.by_source[source] = self.by_source.get(source, 0) + 1
            self.clients.append(client)
            self.sel.register(conn, selectors.EVENT_READ, client.on_event)

    def _make_room(self, source: Hashable) -> bool:
        """Whether a client from ``source`` may be served now.

        At most ``per_source`` clients per source; when every slot is taken, a
        newcomer takes the place of the oldest client of the source holding the
        most, unless that is its own source, so a few sources holding silent
        connections can never blind the server for everyone else (issue 21).
        """
        held = self.by_source.get(source, 0)
        if self.per_source and held >= self.per_source:
            return False
        if len(self.clients) < self.max_clients:
            return True
        heaviest = max(self.by_source, key=self.by_source.__getitem__)
        if self.by_source[heaviest] <= held:
            return False
        oldest = next(c for c in self.clients if c.source == heaviest)  # in arrival order
        self.drop(oldest)
        return True

    def drop(self, client: Client) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(client.sock)
        client.sock.close()
        with contextlib.suppress(ValueError):
            self.clients.remove(client)
            left = self.by_source.get(client.source, 0) - 1
            if left > 0:
                self.by_source[client.source] = left
            else:
                self.by_source.pop(client.source, None)

    def next_deadline(self) -> float | None:
        times = [c.deadline for c in self.clients]
        if self.resume_at:
            times.append(self.resume_at)
        return min(times, default=None)

    def expire(self, now: float) -> None:
        if self.resume_at and now >= self.resume_at:
            self.resume_at = 0.0
            self.sel.register(self.sock, selectors.EVENT_READ, self.on_event)
        for client in [c for c in self.clients if c.deadline <= now]:
            self.drop(client)

    def close(self) -> None:
        for client in list(self.clients):
            self.drop(client)
        if not self.resume_at:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(self.sock)
        if self._close_listener is not None:
            self._close_listener(self.sock)
        else:
            self.sock.close()
