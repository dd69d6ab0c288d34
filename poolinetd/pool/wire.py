"""The master<->worker wire: a SOCK_SEQPACKET channel down, a pipe up.

Mostly pure (encode/decode, framing); ``send``/``recv``/``receive`` and the
``UpWriter``/``UpReader`` ends touch the OS.

Down (master -> worker): one AF_UNIX SOCK_SEQPACKET socketpair per worker,
fds attached with SCM_RIGHTS. SEQPACKET keeps message boundaries, so an fd
can never be attached to the wrong header (systemd #15457 shows what stream
framing does). ``receive`` checks MSG_CTRUNC and that a message carries
exactly the fds its kind says, closes anything unexpected, and raises
ProtocolError. The master shuts its end for reading (``shutdown(SHUT_RD)``)
right after creating the pair, before the fork: the worker's sends on the
channel then fail with EPIPE, so nothing (no fd) can ever be queued to the
master's end, and closing it never drops a descriptor someone else made.

Up (worker -> master): one pipe per worker (``upward_pipe``). A pipe cannot
carry SCM_RIGHTS, so a worker, even one taken over by its service's user,
cannot hand the root master a descriptor whose last close would block it
(a TCP socket with SO_LINGER and unsent data: issue 21). Each message is a
frame: a 2-byte big-endian length, then the message (kind, version, body),
at most ``PIPE_BUF`` bytes in all, so every frame is one atomic write.
``UpReader`` reads a bounded amount per call; a frame with a bad length or a
malformed message is a protocol error (the master kills that worker).

Master -> worker:  CONN(n x (conn_id, family, peer, local, env)) + n accepted sockets, in
                   order (1 <= n <= MAX_CONN_BATCH: what one accept batch gave one
                   worker travels in one sendmsg; one message per connection cost
                   about ten times as much, benchmarks/README.md). The worker asks
                   getsockname itself, and only for programs that need TCPLOCALIP.
                   ``env``: tcp_wrappers' setenv pairs for that connection's program
                   (at most MAX_ENV_TEXT bytes; a connection with any travels alone).
                   LEND(lend_id, env) + a listening or bound socket the master keeps
                   too (``env``: tcp_wrappers' setenv for a datagram wait program)
                   STOP (finish what you serve, then exit)
                   LOGFD + the reopened log file (after SIGUSR1; only to workers of
                   stderr=log services, the only ones that hold the log)
                   PING (a worker that only holds a lent socket is sent this, so a
                   stopped one is seen: its channel stops draining)
Worker -> master:  READY(pid)
                   DONE(ids...)  connections or loans that ended (batched)
                   STATS(bytes in, bytes out, program exits)  for the metrics (batched);
                   an exit code is 0..255 or -1..-64 (a signal), anything else is a
                   protocol error
                   SPAWNED(conn_id, pid)  a program was launched for conn_id
                   BOOT_FAILED(reason)  the worker cannot serve; it exits next
                   LOG(level, event, fields)  one of the worker's own log lines, for the
                   master to write (workers do not hold the log file)
"""

from __future__ import annotations

import array
import contextlib
import os
import re
import select
import socket
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from poolinetd.admission.tcpwrappers_options import MAX_SETENV_TEXT
from poolinetd.launch.closer import passed_fds

VERSION = 4  # 3: the upward pipe, LOG, bounded exit codes; 4: CONN's env

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
LOG = 15

_HEAD = struct.Struct("!BB")  # kind, version
_ID = struct.Struct("!Q")
_PID = struct.Struct("!i")
_ID_PID = struct.Struct("!Qi")
_COUNT = struct.Struct("!H")
# conn_id, address family (saves the receiver three getsockopts), lengths of the peer
# and local texts and of the environment text
_CONN = struct.Struct("!QBHHH")
MAX_MESSAGE = 4096  # down: the largest message the worker reads off its channel
# Up: a frame is a length prefix and a message, at most PIPE_BUF bytes, so that a
# write of one frame is atomic (never interleaved, never half done).
PIPE_BUF = select.PIPE_BUF
_FRAME = struct.Struct("!H")
MAX_UP_MESSAGE = PIPE_BUF - _FRAME.size
_MAX_DONE_IDS = (MAX_UP_MESSAGE - _HEAD.size) // _ID.size
# Connections (and fds) in one CONN message. The texts are formatted socket
# addresses (at most 54 bytes: an IPv6 address with a scope and a port), so a
# full batch stays far below MAX_MESSAGE; the kernel's limit is 253 fds.
MAX_CONN_BATCH = 16
_MAX_ADDR_TEXT = 100
# setenv pairs of one connection as "NAME=VALUE" joined by NULs; a connection with
# any is sent alone (pool.dispatcher), so one CONN stays below MAX_MESSAGE.
MAX_ENV_TEXT = MAX_SETENV_TEXT


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
    env: tuple[tuple[str, str], ...] = ()  # tcp_wrappers' setenv pairs for its program


LogValue = str | int | float | bool | None


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
    level: int = 0  # LOG: the line's level (logging's numbers); ``text`` is its event name
    fields: tuple[tuple[str, LogValue], ...] = ()  # LOG: the line's fields, in order
    env: tuple[tuple[str, str], ...] = ()  # LEND: tcp_wrappers' setenv pairs


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
        env = env_text(info.env)
        if len(peer) > _MAX_ADDR_TEXT or len(local) > _MAX_ADDR_TEXT:
            raise ValueError("address text too long for CONN")
        parts += (_CONN.pack(info.conn_id, info.family, len(peer), len(local), len(env)),
                  peer, local, env)
    return b"".join(parts)


def env_text(pairs: Sequence[tuple[str, str]]) -> bytes:
    """setenv pairs as CONN carries them; ValueError past MAX_ENV_TEXT or for a NAME or
    VALUE that cannot be in an environment (a NUL, a "=" in the name)."""
    if not pairs:
        return b""
    for name, value in pairs:
        if not name or "=" in name or "\0" in name or "\0" in value:
            raise ValueError(f"not an environment variable: {name!r}")
    text = "\0".join(f"{name}={value}" for name, value in pairs).encode()
    if len(text) > MAX_ENV_TEXT:
        raise ValueError(f"environment text over {MAX_ENV_TEXT} bytes for CONN")
    return text


def _env_pairs(text: bytes) -> tuple[tuple[str, str], ...]:
    if not text:
        return ()
    pairs = []
    for item in text.decode().split("\0"):
        name, eq, value = item.partition("=")
        if not name or not eq:
            raise ProtocolError("CONN environment entry without NAME=")
        pairs.append((name, value))
    return tuple(pairs)


def encode_lend(lend_id: int, env: Sequence[tuple[str, str]] = ()) -> bytes:
    """LEND; ``env`` as CONN carries it (ValueError past MAX_ENV_TEXT)."""
    return _HEAD.pack(LEND, VERSION) + _ID.pack(lend_id) + env_text(env)


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
_MAX_EXITS = (MAX_UP_MESSAGE - _HEAD.size - _STATS.size) // _EXIT.size
# What os.waitstatus_to_exitcode can give for a reaped program: an exit status, or
# minus the signal that killed it. Anything else in STATS is a lie (each code is a
# metrics label: an unbounded set would grow the master and /metrics without end).
EXIT_CODES = range(-64, 256)


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
            (ident,) = _ID.unpack_from(body)
            env = body[_ID.size:]
            if len(env) > MAX_ENV_TEXT:
                raise ProtocolError(f"LEND environment of {len(env)} bytes")
            return Message(LEND, ident, env=_env_pairs(env))
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
            for code, _micros in exits:
                if code not in EXIT_CODES:
                    raise ProtocolError(f"STATS with exit code {code}")
            return Message(STATS, bytes_in=bytes_in, bytes_out=bytes_out, exits=exits)
        if kind == BOOT_FAILED:
            return Message(BOOT_FAILED, text=body.decode("utf-8", "replace"))
        if kind == LOG:
            return _decode_log(body)
    except (struct.error, UnicodeDecodeError, IndexError) as exc:
        raise ProtocolError(f"malformed message kind {kind}: {exc}") from None
    raise ProtocolError(f"unknown message kind {kind} ({len(body)} byte body)")


def _decode_conns(body: bytes) -> tuple[ConnInfo, ...]:
    (count,) = _COUNT.unpack_from(body)
    if not 1 <= count <= MAX_CONN_BATCH:
        raise ProtocolError(f"CONN with {count} connections")
    conns = []
    off = _COUNT.size
    for _ in range(count):
        conn_id, family, peer_len, local_len, env_len = _CONN.unpack_from(body, off)
        off += _CONN.size
        mid = off + peer_len + local_len
        end = mid + env_len
        if end > len(body) or env_len > MAX_ENV_TEXT:
            raise ProtocolError(f"CONN record of {end - off} bytes past the end")
        conns.append(ConnInfo(conn_id, family, body[off : off + peer_len].decode(),
                              body[off + peer_len : mid].decode(),
                              _env_pairs(body[mid:end])))
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
    fds = passed_fds(ancdata)
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


# -- LOG: a worker's own log line, written by the master -----------------------------------

LOG_LEVELS = frozenset({10, 20, 30, 40})  # logging's DEBUG, INFO, WARNING, ERROR
MAX_LOG_FIELDS = 16
_MAX_LOG_VALUE = 1024  # bytes of one text value (longer ones are cut by the worker)
_NAME = re.compile(rb"[a-z][a-z0-9_]{0,39}\Z")  # an event name or a field key
_LOG_HEAD = struct.Struct("!BB")  # level (logging's number), length of the event name
_TEXT_LEN = struct.Struct("!H")
_INT = struct.Struct("!q")
_FLOAT = struct.Struct("!d")


def encode_log(level: int, name: str, fields: Mapping[str, object]) -> bytes:
    """LOG for one line: ``level`` (logging's number), event ``name``, ``fields`` in order.

    Total: never raises on odd values. Ints outside 64 bits and other types
    travel as text; text values are cut to ``_MAX_LOG_VALUE`` bytes; fields past
    ``MAX_LOG_FIELDS`` or past what fits in one frame are left out (the line
    still says what happened). Keys that are not plain names are left out too.
    """
    parts = [_HEAD.pack(LOG, VERSION)]
    name_b = name.encode("ascii", "replace")[:40]
    parts.append(_LOG_HEAD.pack(level if level in LOG_LEVELS else 40, len(name_b)) + name_b)
    size = sum(len(p) for p in parts) + 1  # + the field count
    encoded: list[bytes] = []
    for key, value in fields.items():
        key_b = key.encode("ascii", "replace")
        if len(encoded) >= MAX_LOG_FIELDS or not _NAME.match(key_b):
            continue
        item = bytes([len(key_b)]) + key_b + _encode_value(value)
        if size + len(item) > MAX_UP_MESSAGE:
            continue
        size += len(item)
        encoded.append(item)
    return b"".join(parts) + bytes([len(encoded)]) + b"".join(encoded)


def _encode_value(value: object) -> bytes:
    """One tagged value: b(ool), n(one), i(nt64), f(loat64) or s(tring)."""
    if isinstance(value, bool):
        return b"b" + bytes([value])
    if value is None:
        return b"n"
    if isinstance(value, int) and -(2**63) <= value < 2**63:
        return b"i" + _INT.pack(value)
    if isinstance(value, float):
        return b"f" + _FLOAT.pack(value)
    text = str(value).encode("utf-8", "backslashreplace")[:_MAX_LOG_VALUE]
    return b"s" + _TEXT_LEN.pack(len(text)) + text


def _decode_log(body: bytes) -> Message:
    """LOG from a worker (untrusted): a known level, plain names, at most 16 fields,
    nothing left over. Raises ProtocolError (or struct.error) on anything else."""
    level, name_len = _LOG_HEAD.unpack_from(body)
    off = _LOG_HEAD.size
    name = body[off : off + name_len]
    off += name_len
    if level not in LOG_LEVELS or not _NAME.match(name):
        raise ProtocolError(f"LOG with level {level} or a bad event name")
    count = body[off]
    off += 1
    if count > MAX_LOG_FIELDS:
        raise ProtocolError(f"LOG with {count} fields")
    fields: list[tuple[str, LogValue]] = []
    for _ in range(count):
        key_len = body[off]
        key = body[off + 1 : off + 1 + key_len]
        off += 1 + key_len
        if not _NAME.match(key):
            raise ProtocolError("LOG with a bad field key")
        tag = body[off : off + 1]
        off += 1
        value: LogValue
        if tag == b"b":
            value = bool(body[off])
            off += 1
        elif tag == b"n":
            value = None
        elif tag == b"i":
            (value,) = _INT.unpack_from(body, off)
            off += _INT.size
        elif tag == b"f":
            (value,) = _FLOAT.unpack_from(body, off)
            off += _FLOAT.size
        elif tag == b"s":
            (length,) = _TEXT_LEN.unpack_from(body, off)
            off += _TEXT_LEN.size
            if length > _MAX_LOG_VALUE or off + length > len(body):
                raise ProtocolError("LOG with a text value past its bounds")
            value = body[off : off + length].decode("utf-8", "replace")
            off += length
        else:
            raise ProtocolError(f"LOG with value tag {tag!r}")
        fields.append((key.decode("ascii"), value))
    if off != len(body):
        raise ProtocolError(f"LOG with {len(body) - off} bytes after its fields")
    return Message(LOG, text=name.decode("ascii"), level=level, fields=tuple(fields))


# -- the upward pipe ---------------------------------------------------------------------------

UP_READ_SIZE = 4 * PIPE_BUF  # read per call: a bounded amount of work per loop event


def upward_pipe() -> tuple[int, int]:
    """A new upward pipe: (read end, write end), both close-on-exec.

    The read end is the master's and non-blocking; the write end is the
    worker's (kept across the fork, then closed by the master) and blocking: a
    worker whose master is slow to read waits, the master never does.
    Close-on-exec on the write end keeps it from the worker's programs, whose
    copies would hide the worker's death (no EOF while a program runs).
    """
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(read_end, False)
    return read_end, write_end


def frame(payload: bytes) -> bytes:
    """``payload`` as one upward frame (ValueError if it exceeds MAX_UP_MESSAGE)."""
    if not 0 < len(payload) <= MAX_UP_MESSAGE:
        raise ValueError(f"an upward message is 1 to {MAX_UP_MESSAGE} bytes")
    return _FRAME.pack(len(payload)) + payload


class UpWriter:
    """The worker's end of its upward pipe (owned: closed by ``close``; its EOF tells the
    master the worker is gone)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def send(self, payload: bytes) -> None:
        """Write one message as one atomic frame, waiting for room if the pipe is full
        (the worker's own stall, never the master's). Raises BrokenPipeError when the
        master is gone (SIGPIPE is ignored in a worker)."""
        self._write(frame(payload))

    def send_all(self, payloads: Sequence[bytes]) -> None:
        """Write messages as frames, as few writes as PIPE_BUF allows: each write is
        whole frames, at most PIPE_BUF bytes (atomic), or one frame. One wakeup of the
        master for a turn's reports instead of one per message. Waits and raises as
        ``send``."""
        chunk: list[bytes] = []
        size = 0
        for payload in payloads:
            data = frame(payload)
            if chunk and size + len(data) > PIPE_BUF:
                self._write(b"".join(chunk))
                chunk, size = [], 0
            chunk.append(data)
            size += len(data)
        if chunk:
            self._write(b"".join(chunk))

    def _write(self, data: bytes) -> None:
        while True:
            try:
                os.write(self.fd, data)  # <= PIPE_BUF: all or nothing
                return
            except BlockingIOError:  # a non-blocking end (tests): wait for room
                select.select([], [self.fd], [])

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class UpReader:
    """The master's end of one worker's upward pipe: frames in, messages out.

    Owns the read end (non-blocking) until ``close``. ``read`` never blocks
    and reads at most ``UP_READ_SIZE`` bytes per call; a frame cut by that
    bound waits in a buffer of less than PIPE_BUF bytes for the next call.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = b""

    def fileno(self) -> int:
        return self.fd

    @property
    def open(self) -> bool:
        return self.fd >= 0

    def read(self) -> tuple[list[Message], str]:
        """The messages that arrived, and "" or why the stream broke the protocol.

        The list ends with ``Message(EOF)`` when the worker closed its end.
        After an error nothing more should be read: the framing cannot be
        trusted any more (the caller kills the worker).
        """
        try:
            data = os.read(self.fd, UP_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return [], ""
        except OSError:
            return [Message(EOF)], ""
        if not data:
            return [Message(EOF)], "frame cut short by EOF" if self.buffer else ""
        buf = self.buffer + data
        msgs: list[Message] = []
        off = 0
        while len(buf) - off >= _FRAME.size:
            (length,) = _FRAME.unpack_from(buf, off)
            if not 0 < length <= MAX_UP_MESSAGE:
                self.buffer = b""
                return msgs, f"frame length {length}"
            end = off + _FRAME.size + length
            if end > len(buf):
                break
            try:
                msgs.append(decode(buf[off + _FRAME.size : end]))
            except ProtocolError as exc:
                self.buffer = b""
                return msgs, str(exc)
            off = end
        self.buffer = buf[off:]
        return msgs, ""

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
