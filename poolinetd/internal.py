"""The inetd built-ins: echo (RFC 862), discard (863), chargen (864), daytime (867), time (868).

Pure except for the socket calls inside the stream handlers. Stream
built-ins are small non-blocking state machines driven by the worker's
selector (many connections per process); ``serve_blocking`` runs one to
completion for classic mode. Datagram built-ins are ``answer(name, data)``,
guarded by ``loop_guard`` (the FreeBSD/OpenBSD rule: never answer a
privileged source port or another built-in's port, which would let two
inetds, or a spoofed packet, ping-pong forever).
"""

from __future__ import annotations

import enum
import random
import selectors
import socket
import struct
import time
from collections.abc import Callable, Iterable

# Seconds from 1900-01-01 (RFC 868's epoch) to 1970-01-01.
RFC868_OFFSET = 2_208_988_800
CHARGEN_LINE = 72
_PRINTABLE = bytes(range(32, 127))  # the 95 printable ASCII characters
_RECV = 65536
_ECHO_HIGH_WATER = 256 * 1024  # stop reading while this much echo output is queued


class Want(enum.Flag):
    """What a stream handler waits for next; NONE means it is finished."""

    NONE = 0
    READ = enum.auto()
    WRITE = enum.auto()


def chargen_line(offset: int) -> bytes:
    """Line ``offset`` of the RFC 864 pattern: 72 characters starting one further along."""
    start = offset % len(_PRINTABLE)
    doubled = _PRINTABLE + _PRINTABLE
    return doubled[start : start + CHARGEN_LINE] + b"\r\n"


def daytime_text(now: float) -> bytes:
    """RFC 867 leaves the format free; like BSD inetd we send ctime(3) and CRLF."""
    return time.ctime(now).encode() + b"\r\n"


def time_bytes(now: float) -> bytes:
    """RFC 868: seconds since 1900 as a 32-bit big-endian number (wraps in 2036)."""
    return struct.pack("!I", (int(now) + RFC868_OFFSET) & 0xFFFFFFFF)


class StreamHandler:
    """One built-in stream connection. The worker owns ``sock`` and closes it when done.

    ``step()`` does as much work as it can without blocking (whichever event woke it)
    and returns what it waits for next. ``bytes_in``/``bytes_out`` feed the
    per-connection log line.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.bytes_in = 0
        self.bytes_out = 0

    def step(self) -> Want:
        raise NotImplementedError

    def _recv(self) -> bytes | None:
        """Bytes read; b"" at EOF or on error; None when nothing is there yet."""
        try:
            data = self.sock.recv(_RECV)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return b""
        self.bytes_in += len(data)
        return data

    def _send(self, data: bytes | bytearray | memoryview) -> int | None:
        """Bytes written (possibly 0 when the buffer is full); None on a dead peer."""
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            return None
        self.bytes_out += sent
        return sent


class Echo(StreamHandler):
    """RFC 862: send back everything, until the client closes its side."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self._out = bytearray()
        self._eof = False

    def step(self) -> Want:
        # The request is usually already queued when the fd arrives, so
        # always try both directions: most connections finish in one call.
        while not self._eof and len(self._out) < _ECHO_HIGH_WATER:
            data = self._recv()
            if data is None:
                break
            if not data:
                self._eof = True
                break
            self._out += data
            if not self._flush():
                return Want.NONE
            if len(data) < _RECV:
                break  # a short read drained the socket: skip the recv that would say EAGAIN
        if not self._flush():
            return Want.NONE
        if self._out:
            return Want.WRITE
        return Want.NONE if self._eof else Want.READ

    def _flush(self) -> bool:
        """Write what is queued; False when the peer is gone."""
        while self._out:
            sent = self._send(self._out)
            if sent is None:
                return False
            if sent == 0:
                break
            del self._out[:sent]
        return True


class Discard(StreamHandler):
    """RFC 863: read and throw away until the client closes."""

    def step(self) -> Want:
        while True:
            data = self._recv()
            if data is None:
                return Want.READ
            if not data:
                return Want.NONE


class Chargen(StreamHandler):
    """RFC 864: send the rotating 72-character lines until the client closes.

    Anything the client sends is discarded; its EOF (or a reset) ends the
    connection.
    """

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self._line = 0
        self._pending = memoryview(b"")

    def step(self) -> Want:
        while True:  # drain input: detects the client's close
            data = self._recv()
            if data is None:
                break
            if not data:
                return Want.NONE
        for _ in range(64):  # bounded, so one client cannot monopolise the worker
            if not self._pending:
                chunk = b"".join(chargen_line(self._line + i) for i in range(32))
                self._line += 32
                self._pending = memoryview(chunk)
            sent = self._send(self._pending)
            if sent is None:
                return Want.NONE
            if sent == 0:
                break
            self._pending = self._pending[sent:]
        return Want.READ | Want.WRITE


class _OneShot(StreamHandler):
    """Send one reply, then finish (daytime, time)."""

    def __init__(self, sock: socket.socket, reply: bytes) -> None:
        super().__init__(sock)
        self._reply = memoryview(reply)

    def step(self) -> Want:
        while self._reply:
            sent = self._send(self._reply)
            if sent is None:
                return Want.NONE
            if sent == 0:
                return Want.WRITE
            self._reply = self._reply[sent:]
        return Want.NONE


def _daytime(sock: socket.socket) -> StreamHandler:
    return _OneShot(sock, daytime_text(time.time()))


def _time(sock: socket.socket) -> StreamHandler:
    return _OneShot(sock, time_bytes(time.time()))


STREAM: dict[str, Callable[[socket.socket], StreamHandler]] = {
    "echo": Echo,
    "discard": Discard,
    "chargen": Chargen,
    "daytime": _daytime,
    "time": _time,
}


def answer(name: str, data: bytes, now: float, rng: random.Random | None = None) -> bytes | None:
    """The reply datagram of built-in ``name`` to ``data``, or None for no reply."""
    if name == "echo":
        return data
    if name == "daytime":
        return daytime_text(now)
    if name == "time":
        return time_bytes(now)
    if name == "chargen":
        # RFC 864 (UDP): a datagram of a random length between 0 and 512.
        size = (rng or random).randint(0, 512)
        lines = b"".join(chargen_line(i) for i in range(size // (CHARGEN_LINE + 2) + 1))
        return lines[:size]
    return None


# Well-known ports of the classic built-ins: a datagram from one of these is
# most likely another inetd's built-in, i.e. the start of a loop.
BUILTIN_PORTS = frozenset({7, 9, 13, 19, 37})


def guarded_ports(builtin_ports: Iterable[int]) -> frozenset[int]:
    """The source ports the loop guard refuses: the well-known built-ins plus ours."""
    return BUILTIN_PORTS | frozenset(p for p in builtin_ports if p)


def loop_guard(peer_port: int, internal_ports: frozenset[int]) -> str | None:
    """Why a datagram from ``peer_port`` must not be answered, or None if it may.

    Refused: privileged source ports (OpenBSD's rule; real clients use
    ephemeral ports, reflection attacks spoof service ports), and the ports
    of built-ins here or in the well-known set (FreeBSD's check_loop).
    """
    if peer_port < 1024:
        return f"privileged source port {peer_port}"
    if peer_port in internal_ports:
        return f"source port {peer_port} is a built-in service port"
    return None


def serve_blocking(sock: socket.socket, name: str, timeout: float) -> tuple[int, int]:
    """Run stream built-in ``name`` on ``sock`` to completion (classic mode).

    The caller owns ``sock`` and closes it. The connection ends when the
    handler finishes, the peer goes away, or ``timeout`` seconds pass with
    no progress. Returns (bytes_in, bytes_out).
    """
    sock.setblocking(False)
    handler = STREAM[name](sock)
    want = handler.step()
    with selectors.DefaultSelector() as sel:
        while want:
            events = 0
            if want & Want.READ:
                events |= selectors.EVENT_READ
            if want & Want.WRITE:
                events |= selectors.EVENT_WRITE
            sel.register(sock, events)
            ready = sel.select(timeout)
            sel.unregister(sock)
            if not ready:
                break
            want = handler.step()
    return handler.bytes_in, handler.bytes_out
