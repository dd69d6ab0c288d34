"""The inetd built-ins: echo (RFC 862), discard (863), chargen (864), daytime (867), time (868).

``TABLE`` is the one list of built-ins: every other list derives from it (the
names ``resolve`` accepts, the handler per socket type, the loop guard's
well-known ports, the ports of the CLI's built-in default config).

Pure except for the socket calls inside the connection handlers. Stream and
seqpacket built-ins are small non-blocking state machines driven by the
worker's selector (many connections per process); ``serve_blocking`` runs one
to completion for classic mode. Datagram built-ins are ``answer(name, data,
now)``, guarded by ``loop_guard`` (the FreeBSD/OpenBSD rule: never answer a
privileged source port or another built-in's port, which would let two inetds,
or a spoofed packet, ping-pong forever); ``builtins.dgram.DgramResponder`` drives
them on a socket.

Fairness: every ``step()`` does a bounded amount of work (at most
``STEP_READS`` reads and ``STEP_BYTES`` bytes in, and a bounded number of
sends), then returns what it waits for. The caller's selector is
level-triggered, so a handler that stopped at the bound while input is still
queued (READ) or while the socket can still take output (WRITE) is woken on
the next loop turn, after the worker's other connections had theirs.
"""

from __future__ import annotations

import collections
import errno
import random
import select
import selectors
import socket
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from poolinetd.builtins import records
from poolinetd.config.spec import SocketType

# Seconds from 1900-01-01 (RFC 868's epoch) to 1970-01-01.
RFC868_OFFSET = 2_208_988_800
CHARGEN_LINE = 72
_PRINTABLE = bytes(range(32, 127))  # the 95 printable ASCII characters
_RECV = 65536
_ECHO_HIGH_WATER = 256 * 1024  # stop reading while this much echo output is queued
# Work bounds per step(): one client's turn costs at most this, however fast it sends.
# 64 KiB = one full read; measured (bench_fairness.py) lower p50 beside a blaster than 256 KiB.
STEP_READS = 16
STEP_BYTES = 64 * 1024
_CHARGEN_SENDS = 28  # 2368-byte blocks chargen writes per step: about STEP_BYTES


class Want:
    """What a stream handler waits for next, as epoll event bits; NONE: finished.

    Plain ints, not an enum.Flag: ``step()`` returns one for every event, and
    Flag arithmetic cost more than the rest of an echo's step (py-spy). The
    values are the worker's poller bits, so they are registered as they are.
    """

    NONE: Final = 0
    READ: Final = select.EPOLLIN
    WRITE: Final = select.EPOLLOUT


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


# -- connection handlers ---------------------------------------------------------


class StreamHandler:
    """One built-in connection (SOCK_STREAM or SOCK_SEQPACKET). The caller owns ``sock``.

    ``step()`` does a bounded amount of work without blocking (whichever event
    woke it) and returns what it waits for next. ``bytes_in``/``bytes_out``
    feed the per-connection log line; ``end_reason`` says why it finished.

    With ``messages=True`` (SOCK_SEQPACKET) every read is one whole message,
    and a zero-length message is a message, not EOF (see records.py).
    """

    def __init__(self, sock: socket.socket, messages: bool = False) -> None:
        self.sock = sock
        self.bytes_in = 0
        self.bytes_out = 0
        self.end_reason = "done"
        self._messages = messages
        self._limit = _RECV
        if messages:
            records.watch_eof(sock)
            self._limit = records.send_limit(sock)

    def step(self) -> int:
        raise NotImplementedError

    def _recv(self) -> bytes | records.Status:
        """Bytes read (one whole message if ``messages``), ``AGAIN``, or ``EOF``.

        EOF also stands for an error, and for a message too long to echo whole
        (``end_reason`` says which). b"" is data, possible only in message mode.
        """
        if self._messages:
            got = records.recv_message(self.sock, self._limit)
            if got is records.Status.TOO_BIG:
                self.end_reason = "message_too_big"
                return records.Status.EOF
            if not isinstance(got, records.Status):
                self.bytes_in += len(got)
            return got
        try:
            data = self.sock.recv(_RECV)
        except (BlockingIOError, InterruptedError):
            return records.Status.AGAIN
        except OSError:
            return records.Status.EOF
        if not data:
            return records.Status.EOF
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

    def _drain_input(self) -> bool:
        """Read and drop what the client sent, within the step bound; False at its EOF."""
        taken = 0
        for _ in range(STEP_READS):
            data = self._recv()
            if data is records.Status.AGAIN:
                return True
            if isinstance(data, records.Status):
                return False  # EOF
            taken += len(data)
            if taken >= STEP_BYTES:
                break
        return True


class Echo(StreamHandler):
    """RFC 862 over a stream: send back everything, until the client closes its side."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self._out = bytearray()
        self._eof = False

    def step(self) -> int:
        # The request is usually already queued when the fd arrives, so
        # always try both directions: most connections finish in one call.
        taken = 0
        for _ in range(STEP_READS):
            if self._eof or len(self._out) >= _ECHO_HIGH_WATER or taken >= STEP_BYTES:
                break
            data = self._recv()
            if data is records.Status.AGAIN:
                break
            if isinstance(data, records.Status):
                self._eof = True
                break
            taken += len(data)
            self._out += data
            if not self._flush():
                return Want.NONE
            if len(data) < _RECV:
                break  # a short read drained the socket: skip the recv that would say EAGAIN
        if not self._flush():
            return Want.NONE
        if self._out:
            # Unsent output: the socket is full, so WRITE wakes us when it drains.
            # (Reading more would only grow the queue past the high-water mark.)
            return Want.WRITE
        # Still READ: if the bound stopped us with input queued, the level-triggered
        # selector reports it readable again on the next turn.
        return Want.NONE if self._eof else Want.READ

    def _flush(self) -> bool:
        """Write what is queued (at most the high-water mark); False when the peer is gone."""
        while self._out:
            sent = self._send(self._out)
            if sent is None:
                return False
            if sent == 0:
                break
            del self._out[:sent]
        return True


class MessageEcho(StreamHandler):
    """RFC 862 over SOCK_SEQPACKET: each message comes back whole, as one message.

    Zero-length messages are echoed too. A message longer than this socket
    could send back in one piece (its SO_SNDBUF) ends the connection after
    the echoes of the messages before it (``end_reason`` "message_too_big"):
    the client sees the connection reset (Linux: closed with input unread),
    never a cut reply nor a gap.
    """

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, messages=True)
        self._out: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._eof = False

    def step(self) -> int:
        taken = 0
        for _ in range(STEP_READS):
            if self._eof or self._queued >= _ECHO_HIGH_WATER or taken >= STEP_BYTES:
                break
            data = self._recv()
            if data is records.Status.AGAIN:
                break
            if isinstance(data, records.Status):
                # EOF, or a message was lost (end_reason): echo what came before it,
                # then end, so the client sees the connection end, not a gap.
                self._eof = True
                break
            taken += len(data)
            self._out.append(data)
            self._queued += len(data)
        if not self._flush():
            return Want.NONE
        if self._out and self.end_reason == "done":
            return Want.WRITE  # full: woken when the peer has read some
        return Want.NONE if self._eof else Want.READ

    def _flush(self) -> bool:
        """Send queued messages, each in one send; False when the peer is gone."""
        while self._out:
            msg = self._out[0]
            try:
                sent = self.sock.send(msg)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError as exc:  # gone, or EMSGSIZE: never send part of a message
                if exc.errno == errno.EMSGSIZE:
                    self.end_reason = "message_too_big"
                return False
            self.bytes_out += sent
            self._queued -= len(msg)
            self._out.popleft()
        return True


class Discard(StreamHandler):
    """RFC 863: read and throw away until the client closes."""

    def step(self) -> int:
        return Want.READ if self._drain_input() else Want.NONE


class Chargen(StreamHandler):
    """RFC 864: send the rotating 72-character lines until the client closes.

    Anything the client sends is discarded; its EOF (or a reset) ends the
    connection. On SOCK_SEQPACKET each block of 32 lines is one message.
    """

    def __init__(self, sock: socket.socket, messages: bool = False) -> None:
        super().__init__(sock, messages)
        self._line = 0
        self._pending = memoryview(b"")

    def step(self) -> int:
        if not self._drain_input():  # detects the client's close
            return Want.NONE
        for _ in range(_CHARGEN_SENDS):
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


class OneShot(StreamHandler):
    """Send one reply, then finish (daytime, time): reads nothing from the client."""

    def __init__(self, sock: socket.socket, reply: bytes) -> None:
        super().__init__(sock)
        self._reply = memoryview(reply)

    def step(self) -> int:
        while self._reply:  # the reply is a few bytes: one send, rarely two
            sent = self._send(self._reply)
            if sent is None:
                return Want.NONE
            if sent == 0:
                return Want.WRITE
            self._reply = self._reply[sent:]
        return Want.NONE


def _daytime(sock: socket.socket) -> StreamHandler:
    return OneShot(sock, daytime_text(time.time()))


def _time(sock: socket.socket) -> StreamHandler:
    return OneShot(sock, time_bytes(time.time()))


def _discard_messages(sock: socket.socket) -> StreamHandler:
    return Discard(sock, messages=True)


def _chargen_messages(sock: socket.socket) -> StreamHandler:
    return Chargen(sock, messages=True)


# -- datagram answers -----------------------------------------------------------


def _echo_answer(data: bytes, now: float, rng: random.Random) -> bytes | None:
    return data


def _no_answer(data: bytes, now: float, rng: random.Random) -> bytes | None:
    return None


def _daytime_answer(data: bytes, now: float, rng: random.Random) -> bytes | None:
    return daytime_text(now)


def _time_answer(data: bytes, now: float, rng: random.Random) -> bytes | None:
    return time_bytes(now)


def _chargen_answer(data: bytes, now: float, rng: random.Random) -> bytes | None:
    # RFC 864 (UDP): a datagram of a random length between 0 and 512.
    size = rng.randint(0, 512)
    lines = b"".join(chargen_line(i) for i in range(size // (CHARGEN_LINE + 2) + 1))
    return lines[:size]


# -- the table ------------------------------------------------------------------

HandlerFactory = Callable[[socket.socket], StreamHandler]
Answer = Callable[[bytes, float, random.Random], bytes | None]


@dataclass(frozen=True, slots=True)
class Builtin:
    """One built-in service and how it is served on each socket type it supports.

    A handler factory takes a connected non-blocking socket (the caller keeps
    owning it); ``datagram`` maps one request datagram to its reply (None: no
    reply). A socket type whose field is None is not supported.
    """

    name: str
    well_known_port: int  # its RFC port: a datagram from it is another inetd (loop guard)
    default_port: int  # its port in the CLI's built-in default config (unprivileged)
    one_shot: bool  # sends its reply at once and reads nothing from the client
    stream: HandlerFactory | None
    seqpacket: HandlerFactory | None
    datagram: Answer | None

    @property
    def socket_types(self) -> frozenset[SocketType]:
        kinds = ((SocketType.STREAM, self.stream), (SocketType.SEQPACKET, self.seqpacket),
                 (SocketType.DGRAM, self.datagram))
        return frozenset(kind for kind, how in kinds if how is not None)

    def handler(self, socket_type: SocketType) -> HandlerFactory | None:
        """The connection handler factory for ``socket_type`` (None for dgram or unsupported)."""
        if socket_type is SocketType.STREAM:
            return self.stream
        if socket_type is SocketType.SEQPACKET:
            return self.seqpacket
        return None


TABLE: tuple[Builtin, ...] = (
    Builtin("echo", 7, 7007, False, Echo, MessageEcho, _echo_answer),
    Builtin("discard", 9, 7009, False, Discard, _discard_messages, _no_answer),
    Builtin("chargen", 19, 7019, False, Chargen, _chargen_messages, _chargen_answer),
    Builtin("daytime", 13, 7013, True, _daytime, _daytime, _daytime_answer),
    Builtin("time", 37, 7037, True, _time, _time, _time_answer),
)
BY_NAME: Mapping[str, Builtin] = {b.name: b for b in TABLE}
NAMES: tuple[str, ...] = tuple(BY_NAME)  # in table order; what ``internal NAME`` may name

STREAM: Mapping[str, HandlerFactory] = {b.name: b.stream for b in TABLE if b.stream}
SEQPACKET: Mapping[str, HandlerFactory] = {b.name: b.seqpacket for b in TABLE if b.seqpacket}

# Well-known ports of the classic built-ins: a datagram from one of these is
# most likely another inetd's built-in, i.e. the start of a loop.
BUILTIN_PORTS = frozenset(b.well_known_port for b in TABLE)

_SOCK_KINDS = {socket.SOCK_STREAM: SocketType.STREAM, socket.SOCK_SEQPACKET: SocketType.SEQPACKET,
               socket.SOCK_DGRAM: SocketType.DGRAM}


class _EverySecond:
    """A reply that changes once a second (daytime, time): made once a second, not per
    connection."""

    def __init__(self, make: Callable[[float], bytes]) -> None:
        self.make = make
        self.second = -1
        self.reply = b""

    def __call__(self) -> bytes:
        second = int(time.time())
        if second != self.second:
            self.second, self.reply = second, self.make(second)
        return self.reply


def engine_reply(name: str, socket_type: SocketType) -> Callable[[], bytes] | None:
    """For a one-shot built-in on a connected socket type (daytime, time on stream or
    seqpacket): what the engine itself sends on each accepted connection, as
    every classic inetd does, instead of handing it to a worker. None otherwise.

    The reply is computed from the clock alone; nothing is read from the client.
    """
    entry = find(name, socket_type)
    if entry is None or not entry.one_shot or socket_type is SocketType.DGRAM:
        return None
    text = {"daytime": daytime_text, "time": time_bytes}.get(entry.name)
    if text is None:
        return None
    return _EverySecond(text)


def find(name: str, socket_type: SocketType) -> Builtin | None:
    """The built-in ``name`` if it supports ``socket_type``, else None."""
    entry = BY_NAME.get(name)
    return entry if entry is not None and socket_type in entry.socket_types else None


def new_handler(name: str, sock: socket.socket) -> StreamHandler:
    """The handler of built-in ``name`` for connected ``sock`` (by its type). KeyError if none."""
    kind = _SOCK_KINDS.get(sock.type)
    entry = BY_NAME[name]
    factory = entry.handler(kind) if kind is not None else None
    if factory is None:
        raise KeyError(f"built-in {name} has no handler for {sock.type!r}")
    return factory(sock)


def answer(name: str, data: bytes, now: float, rng: random.Random | None = None) -> bytes | None:
    """The reply datagram of built-in ``name`` to ``data``, or None for no reply."""
    entry = BY_NAME.get(name)
    if entry is None or entry.datagram is None:
        return None
    return entry.datagram(data, now, rng or _RNG)


_RNG = random.Random()


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
    """Run built-in ``name`` on connected ``sock`` to completion (classic mode).

    ``sock`` is SOCK_STREAM or SOCK_SEQPACKET; the caller owns it and closes
    it. The connection ends when the handler finishes, the peer goes away, or
    ``timeout`` seconds pass with no progress. Returns (bytes_in, bytes_out).
    """
    sock.setblocking(False)
    handler = new_handler(name, sock)
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
