"""Whole-message reads on SOCK_SEQPACKET and SOCK_DGRAM sockets: never truncated, EOF told apart.

Touches the OS (recvmsg). Two Linux facts this module is built on (tested in
tests/test_builtins_records.py):

* A message longer than the buffer is cut and its tail is lost. Passing
  MSG_TRUNC makes recvmsg return the message's real length, so a cut is seen.
  Callers pass a buffer as large as the biggest message they could answer
  whole (their socket's SO_SNDBUF: a longer one cannot be sent back in one
  send anyway); a longer message is reported as ``TOO_BIG``, never as data.
* On SOCK_SEQPACKET, recv returns 0 both for a zero-length message and at
  EOF, and Linux sets no MSG_EOR. With SO_PASSCRED on the receiving socket
  every message, even an empty one, even one queued before the option was
  set, carries an SCM_CREDENTIALS control message, and EOF carries none.
  That is the discriminator (``watch_eof``).

The callers own the sockets. Descriptors a client sends along (SCM_RIGHTS)
are never installed: the control buffer only has room for the credentials,
so the kernel drops them (MSG_CTRUNC); any that did arrive are closed.
"""

from __future__ import annotations

import array
import contextlib
import enum
import os
import socket
from typing import Any

# A datagram's source: (host, port, ...) for IP, a path (or abstract name bytes) for unix.
Address = tuple[Any, ...] | str | bytes

_CREDS_SPACE = socket.CMSG_SPACE(12)  # struct ucred: pid, uid, gid
DEFAULT_LIMIT = 212_992  # Linux's default net.core.wmem_default, if SO_SNDBUF cannot be read


class Status(enum.Enum):
    """A read that produced no message."""

    AGAIN = "again"  # nothing queued now
    EOF = "eof"  # the peer shut down its side (or the socket failed)
    TOO_BIG = "too_big"  # a message longer than the limit arrived; it is gone


def send_limit(sock: socket.socket) -> int:
    """The largest message worth reading whole on ``sock``: its SO_SNDBUF."""
    try:
        return max(1, sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
    except OSError:
        return DEFAULT_LIMIT


def watch_eof(sock: socket.socket) -> None:
    """Make ``recv_message`` able to tell an empty message from EOF on this seqpacket socket."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)


class Buffer:
    """A reusable receive buffer that grows to the largest limit asked of it.

    One per process is enough (every process here is single-threaded and
    copies a message out before its next read), so a thousand idle
    connections do not each hold a 200 KiB buffer.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def view(self, size: int) -> memoryview:
        if len(self._buf) < size:
            self._buf = bytearray(size)
        return memoryview(self._buf)[:size]


SHARED = Buffer()


def recv_message(sock: socket.socket, limit: int, buf: Buffer = SHARED) -> bytes | Status:
    """One whole message from a non-blocking SOCK_SEQPACKET socket (``watch_eof`` called).

    Returns its bytes (possibly b""), or a Status. A socket error is EOF.
    """
    view = buf.view(limit)
    try:
        n, anc, flags, _ = sock.recvmsg_into([view], _CREDS_SPACE, socket.MSG_TRUNC)
    except (BlockingIOError, InterruptedError):
        return Status.AGAIN
    except OSError:
        return Status.EOF
    has_creds = _close_fds(anc)
    if n > limit or flags & socket.MSG_TRUNC:
        return Status.TOO_BIG
    if n == 0 and not has_creds:
        return Status.EOF
    return bytes(view[:n])


def recv_datagram(sock: socket.socket, limit: int,
                  buf: Buffer = SHARED) -> tuple[bytes | None, Address] | Status:
    """One whole datagram and its source address from a non-blocking SOCK_DGRAM socket.

    Returns (bytes, address), or (None, address) when the datagram was longer
    than ``limit`` (it is gone: drop it unanswered), or AGAIN, or EOF for an
    error queued on the socket (e.g. an ICMP unreachable): read on after it.
    No control buffer: the kernel drops any descriptors a unix client sends.
    """
    view = buf.view(limit)
    try:
        n, _, flags, raw_addr = sock.recvmsg_into([view], 0, socket.MSG_TRUNC)
    except (BlockingIOError, InterruptedError):
        return Status.AGAIN
    except OSError:
        return Status.EOF
    addr: Address = raw_addr
    if n > limit or flags & socket.MSG_TRUNC:
        return None, addr
    return bytes(view[:n]), addr


def _close_fds(anc: list[tuple[int, int, bytes]]) -> bool:
    """Close descriptors that came as SCM_RIGHTS; True if credentials came."""
    has_creds = False
    for level, kind, data in anc:
        if level != socket.SOL_SOCKET:
            continue
        if kind == socket.SCM_CREDENTIALS:
            has_creds = True
        elif kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
    return has_creds
