"""The master<->worker wire: one small message, at most one fd, over AF_UNIX SOCK_SEQPACKET.

Mostly pure (encode/decode); ``send``/``recv`` touch the OS. SEQPACKET keeps
message boundaries, so an fd can never be attached to the wrong header
(systemd #15457 shows what stream framing does). ``recv`` checks MSG_CTRUNC
and the fd count, closes anything unexpected, and raises ProtocolError.

Master -> worker:  CONN(conn_id, family, peer) + the accepted socket (the worker asks
                   getsockname itself, and only for programs that need TCPLOCALIP)
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
from dataclasses import dataclass

VERSION = 1

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
# conn_id, address family (saves the receiver three getsockopts), length of the peer text
_CONN = struct.Struct("!QBH")
MAX_MESSAGE = 4096
_MAX_DONE_IDS = (MAX_MESSAGE - _HEAD.size) // _ID.size


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
class Message:
    kind: int
    ident: int = 0  # conn_id / lend_id / pid
    pid: int = 0
    family: int = 0
    ids: tuple[int, ...] = ()
    peer: str = ""
    local: str = ""  # CONN: the address the client connected to, when a PROXY header said it
    bytes_in: int = 0  # STATS: what built-in connections read and wrote since the last STATS
    bytes_out: int = 0
    exits: tuple[tuple[int, int], ...] = ()  # STATS: (exit code, run time in us) per program


def encode_conn(conn_id: int, family: int, peer: str, local: str = "") -> bytes:
    """CONN: ``peer``, then ``local`` (only if not the socket's own), as "HOST PORT" text."""
    raw = peer.encode()
    return _HEAD.pack(CONN, VERSION) + _CONN.pack(conn_id, family, len(raw)) + raw + (
        local.encode())


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
            ident, family, size = _CONN.unpack_from(body)
            text = body[_CONN.size :]
            if size > len(text):
                raise ProtocolError(f"CONN peer of {size} bytes in {len(text)}")
            return Message(CONN, ident, family=family, peer=text[:size].decode(),
                           local=text[size:].decode())
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
            return Message(BOOT_FAILED, peer=body.decode("utf-8", "replace"))
    except (struct.error, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed message kind {kind}: {exc}") from None
    raise ProtocolError(f"unknown message kind {kind} ({len(body)} byte body)")


_FDS_SPACE = socket.CMSG_SPACE(array.array("i", [0, 0, 0, 0]).itemsize * 4)


def send(channel: socket.socket, payload: bytes, fd: int | None = None) -> None:
    """Send one message, with ``fd`` attached if given.

    The caller keeps ownership of ``fd``: sendmsg puts a reference to the open
    file in the message, so the caller may (and usually should) close its copy
    right after this returns. Raises BlockingIOError when the peer's queue is
    full, BrokenPipeError/ConnectionResetError when the peer is gone.
    """
    if fd is None:
        channel.send(payload)
        return
    channel.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])


def recv(channel: socket.socket) -> tuple[bytes, int | None]:
    """Receive one message and the fd it carries (or None). ``(b"", None)`` means EOF.

    The caller owns the returned fd (already close-on-exec, so a program the
    worker launches never inherits it by accident). On MSG_CTRUNC (the fd was
    dropped: RLIMIT_NOFILE or an LSM) or more than one fd, every fd received
    is closed and ProtocolError is raised. BlockingIOError propagates.
    """
    data, ancdata, flags, _ = channel.recvmsg(MAX_MESSAGE, _FDS_SPACE, socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, ctype, cdata in ancdata:
        if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(cdata[: len(cdata) - (len(cdata) % arr.itemsize)])
            fds.extend(arr)
    if flags & socket.MSG_CTRUNC or len(fds) > 1:
        for fd in fds:
            os.close(fd)
        reason = "control data truncated (MSG_CTRUNC)" if flags & socket.MSG_CTRUNC else (
            f"{len(fds)} fds in one message")
        raise ProtocolError(reason, data)
    return data, (fds[0] if fds else None)


def receive(channel: socket.socket) -> tuple[Message, int | None] | None:
    """The next message on a non-blocking channel and the fd it carries.

    None when nothing is waiting; ``Message(EOF)`` when the peer is gone.
    A malformed message raises ProtocolError after closing any fd that came
    with it, so the caller can log it and read on. The caller owns the fd.
    """
    try:
        data, fd = recv(channel)
    except (BlockingIOError, InterruptedError):
        return None
    except ProtocolError as exc:
        if exc.data:
            with contextlib.suppress(ProtocolError):
                exc.message = decode(exc.data)
        raise
    except OSError:
        return Message(EOF), None
    if not data:
        if fd is not None:
            os.close(fd)
        return Message(EOF), None
    try:
        return decode(data), fd
    except ProtocolError:
        if fd is not None:
            os.close(fd)
        raise
