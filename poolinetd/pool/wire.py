"""The master<->worker wire: small messages over AF_UNIX SOCK_SEQPACKET, fds attached.

Mostly pure (encode/decode); ``send``/``recv``/``receive`` touch the OS.
SEQPACKET keeps message boundaries, so an fd can never be attached to the
wrong header (systemd #15457 shows what stream framing does). ``receive``
checks MSG_CTRUNC and that a message carries exactly the fds its kind says,
closes anything unexpected, and raises ProtocolError.

Master -> worker:  CONN(n x (conn_id, family, peer, local)) + n accepted sockets, in
                   order (1 <= n <= MAX_CONN_BATCH: what one accept batch gave one
                   worker travels in one sendmsg; one message per connection cost
                   about ten times as much, benchmarks/README.md). The worker asks
                   getsockname itself, and only for programs that need TCPLOCALIP.
                   LEND(lend_id) + a listening or bound socket the master keeps too
                   STOP (finish what you serve, then exit)
                   LOGFD + the reopened log file (after SIGUSR1)
                   PING (a worker that only holds a lent socket is sent this, so a
                   stopped one is seen: its channel stops draining)
Worker -> master:  READY(pid)
                   DONE(ids...)  connections or loans that ended (batched)
                   STATS(bytes in, bytes out, program exits)  for the metrics (batched)
                   SPAWNED(conn_id, pid)  a program was launched for conn_id
                   BOOT_FAILED(reason)  the worker cannot serve; it exits next
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

VERSION = 2

EOF = 0  # not on the wire: what ``receive`` returns when the peer is gone
CONN = 1
LEND = 2
STOP = 3
LOGFD = 4
PING = 5  # nothing to do: read so the master sees the channel drain (liveness)
READY = 10
DONE = 11
SPAWNED = 12
BOOT_FAILED = 13
STATS = 14

_HEAD = struct.Struct("!BB")  # kind, version
_ID = struct.Struct("!Q")
_PID = struct.Struct("!i")
_ID_PID = struct.Struct("!Qi")
_COUNT = struct.Struct("!H")
# conn_id, address family (saves the receiver three getsockopts), lengths of the peer
# and local texts
_CONN = struct.Struct("!QBHH")
MAX_MESSAGE = 4096
_MAX_DONE_IDS = (MAX_MESSAGE - _HEAD.size) // _ID.size
# Connections (and fds) in one CONN message. The texts are formatted socket
# addresses (at most 54 bytes: an IPv6 address with a scope and a port), so a
# full batch stays far below MAX_MESSAGE; the kernel's limit is 253 fds.
MAX_CONN_BATCH = 16
_MAX_ADDR_TEXT = 100


class ProtocolError(Exception):
    """A message on the wire broke the protocol (truncated fds, bad header, ...).

    ``message`` is the decoded header when only the fd part was wrong (e.g. the
    receiver had no fd to spare): the receiver can still account for it.
    """

    def __init__(self, reason: str, data: bytes = b"") -> None:
        super().__init__(reason)
        self.data = data
        self.message: Message | None = None


@dataclass(frozen=True, slots=True)
class ConnInfo:
    """What CONN says of one connection; its fd is the one at the same position."""

    conn_id: int
    family: int  # address family: the receiver need not ask the kernel
    peer: str  # "HOST PORT" ("" for unix sockets)
    local: str = ""  # the address the client connected to, when a PROXY header said it


@dataclass(frozen=True, slots=True)
class Message:
    kind: int
    ident: int = 0  # lend_id / conn_id (SPAWNED)
    pid: int = 0
    ids: tuple[int, ...] = ()
    conns: tuple[ConnInfo, ...] = ()  # CONN: one per attached fd, in order
    text: str = ""  # BOOT_FAILED: the reason
    bytes_in: int = 0  # STATS: what built-in connections read and wrote since the last STATS
    bytes_out: int = 0
    exits: tuple[tuple[int, int], ...] = ()  # STATS: (exit code, run time in us) per program


def encode_conns(conns: Sequence[ConnInfo]) -> bytes:
    """CONN for 1 to MAX_CONN_BATCH connections, sent with their fds in the same order.

    Raises ValueError for an empty or oversized batch or an address text
    longer than any socket address (the master formats them itself).
    """
    if not 1 <= len(conns) <= MAX_CONN_BATCH:
        raise ValueError(f"a CONN message carries 1 to {MAX_CONN_BATCH} connections")
    parts = [_HEAD.pack(CONN, VERSION), _COUNT.pack(len(conns))]
    for info in conns:
        peer, local = info.peer.encode(), info.local.encode()
        if len(peer) > _MAX_ADDR_TEXT or len(local) > _MAX_ADDR_TEXT:
            raise ValueError("address text too long for CONN")
        parts += (_CONN.pack(info.conn_id, info.family, len(peer), len(local)), peer, local)
    return b"".join(parts)


def encode_lend(lend_id: int) -> bytes:
    return _HEAD.pack(LEND, VERSION) + _ID.pack(lend_id)


def encode_stop() -> bytes:
    return _HEAD.pack(STOP, VERSION)


def encode_logfd() -> bytes:
    return _HEAD.pack(LOGFD, VERSION)


def encode_ping() -> bytes:
    return _HEAD.pack(PING, VERSION)


def encode_ready(pid: int) -> bytes:
    return _HEAD.pack(READY, VERSION) + _PID.pack(pid)


def encode_done(ids: list[int]) -> list[bytes]:
    """One or more DONE messages carrying ``ids`` (split to fit MAX_MESSAGE)."""
    out = []
    for start in range(0, len(ids), _MAX_DONE_IDS):
        chunk = ids[start : start + _MAX_DONE_IDS]
        out.append(_HEAD.pack(DONE, VERSION) + struct.pack(f"!{len(chunk)}Q", *chunk))
    return out


def encode_spawned(conn_id: int, pid: int) -> bytes:
    return _HEAD.pack(SPAWNED, VERSION) + _ID_PID.pack(conn_id, pid)


_STATS = struct.Struct("!QQ")
_EXIT = struct.Struct("!iQ")
_MAX_EXITS = (MAX_MESSAGE - _HEAD.size - _STATS.size) // _EXIT.size


def encode_stats(bytes_in: int, bytes_out: int, exits: list[tuple[int, int]]) -> list[bytes]:
    """STATS for the metrics: built-in byte counts and program exits (split to fit)."""
    out = []
    for start in range(0, max(1, len(exits)), _MAX_EXITS):
        chunk = exits[start : start + _MAX_EXITS]
        body = _STATS.pack(bytes_in, bytes_out) + b"".join(_EXIT.pack(*e) for e in chunk)
        out.append(_HEAD.pack(STATS, VERSION) + body)
        bytes_in = bytes_out = 0  # counted once, in the first message
    return out


def encode_boot_failed(reason: str) -> bytes:
    return _HEAD.pack(BOOT_FAILED, VERSION) + reason.encode("utf-8", "replace")[:1024]


def decode(data: bytes) -> Message:
    """Parse one message; raises ProtocolError on anything malformed."""
    if len(data) < _HEAD.size:
        raise ProtocolError(f"short message ({len(data)} bytes)")
    kind, version = _HEAD.unpack_from(data)
    if version != VERSION:
        raise ProtocolError(f"wire version {version}, expected {VERSION}")
    body = data[_HEAD.size :]
    try:
        if kind == CONN:
            return Message(CONN, conns=_decode_conns(body))
        if kind == LEND:
            (ident,) = _ID.unpack(body)
            return Message(LEND, ident)
        if kind == STOP and not body:
            return Message(STOP)
        if kind == LOGFD and not body:
            return Message(LOGFD)
        if kind == PING and not body:
            return Message(PING)
        if kind == READY:
            (pid,) = _PID.unpack(body)
            return Message(READY, pid=pid)
        if kind == DONE and len(body) % _ID.size == 0:
            return Message(DONE, ids=struct.unpack(f"!{len(body) // _ID.size}Q", body))
        if kind == SPAWNED:
            ident, pid = _ID_PID.unpack(body)
            return Message(SPAWNED, ident, pid=pid)
        if kind == STATS and (len(body) - _STATS.size) % _EXIT.size == 0:
            bytes_in, bytes_out = _STATS.unpack_from(body)
            exits = tuple(_EXIT.unpack_from(body, off)
                          for off in range(_STATS.size, len(body), _EXIT.size))
            return Message(STATS, bytes_in=bytes_in, bytes_out=bytes_out, exits=exits)
        if kind == BOOT_FAILED:
            return Message(BOOT_FAILED, text=body.decode("utf-8", "replace"))
    except (struct.error, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed message kind {kind}: {exc}") from None
    raise ProtocolError(f"unknown message kind {kind} ({len(body)} byte body)")


def _decode_conns(body: bytes) -> tuple[ConnInfo, ...]:
    (count,) = _COUNT.unpack_from(body)
    if not 1 <= count <= MAX_CONN_BATCH:
        raise ProtocolError(f"CONN with {count} connections")
    conns = []
    off = _COUNT.size
    for _ in range(count):
        conn_id, family, peer_len, local_len = _CONN.unpack_from(body, off)
        off += _CONN.size
        end = off + peer_len + local_len
        if end > len(body):
            raise ProtocolError(f"CONN record of {peer_len + local_len} bytes past the end")
        conns.append(ConnInfo(conn_id, family, body[off : off + peer_len].decode(),
                              body[off + peer_len : end].decode()))
        off = end
    if off != len(body):
        raise ProtocolError(f"CONN with {len(body) - off} bytes after its records")
    return tuple(conns)


def fds_expected(msg: Message) -> int:
    """How many fds a message of this kind comes with."""
    if msg.kind == CONN:
        return len(msg.conns)
    return 1 if msg.kind in (LEND, LOGFD) else 0


_FDS_SPACE = socket.CMSG_SPACE(array.array("i").itemsize * MAX_CONN_BATCH)


def send(channel: socket.socket, payload: bytes, fd: int | None = None) -> None:
    """Send one message, with ``fd`` attached if given (see ``send_fds``)."""
    if fd is None:
        channel.send(payload)
        return
    send_fds(channel, payload, [fd])


def send_fds(channel: socket.socket, payload: bytes, fds: Sequence[int]) -> None:
    """Send one message with ``fds`` attached, in order.

    The caller keeps ownership of the fds: sendmsg puts a reference to each
    open file in the message, so the caller may (and usually should) close its
    copies right after this returns. Raises BlockingIOError when the peer's
    queue is full, BrokenPipeError/ConnectionResetError when the peer is gone.
    """
    channel.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


def recv(channel: socket.socket) -> tuple[bytes, list[int]]:
    """Receive one message and the fds it carries. ``(b"", [])`` means EOF.

    The caller owns the returned fds (already close-on-exec, so a program the
    worker launches never inherits one by accident). On MSG_CTRUNC (an fd was
    dropped: RLIMIT_NOFILE or an LSM) every fd received is closed and
    ProtocolError is raised. BlockingIOError propagates.
    """
    data, ancdata, flags, _ = channel.recvmsg(MAX_MESSAGE, _FDS_SPACE, socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, ctype, cdata in ancdata:
        if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(cdata[: len(cdata) - (len(cdata) % arr.itemsize)])
            fds.extend(arr)
    if flags & socket.MSG_CTRUNC:
        _close_all(fds)
        raise ProtocolError("control data truncated (MSG_CTRUNC)", data)
    return data, fds


def receive(channel: socket.socket) -> tuple[Message, list[int]] | None:
    """The next message on a non-blocking channel and the fds it carries.

    None when nothing is waiting; ``Message(EOF)`` when the peer is gone.
    A malformed message, or one with other fds than its kind says, raises
    ProtocolError after closing every fd that came with it, so the caller can
    log it and read on (``exc.message`` is the decoded message when only the
    fds were wrong). The caller owns the fds.
    """
    try:
        data, fds = recv(channel)
    except (BlockingIOError, InterruptedError):
        return None
    except ProtocolError as exc:
        if exc.data:
            with contextlib.suppress(ProtocolError):
                exc.message = decode(exc.data)
        raise
    except OSError:
        return Message(EOF), []
    if not data:
        _close_all(fds)
        return Message(EOF), []
    try:
        msg = decode(data)
    except ProtocolError:
        _close_all(fds)
        raise
    if len(fds) != fds_expected(msg):
        _close_all(fds)
        wrong = ProtocolError(f"{len(fds)} fds with a message that carries "
                              f"{fds_expected(msg)}", data)
        wrong.message = msg
        raise wrong
    return msg, fds


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
