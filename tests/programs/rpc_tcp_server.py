#!/usr/bin/env python3
"""A tiny ONC RPC server over TCP, run by poolinetd as ``stream rpc/tcp wait``.

Usage: rpc_tcp_server.py PROGRAM LOW-HIGH [IDLE_SECONDS]

The inetd ``wait`` contract for a stream service: fd 0 is the *listening*
socket (poolinetd keeps it and polls it again once this program exits). It
accepts clients one at a time and answers record-marked calls (RFC 5531):
procedure 0 (NULL, what ``rpcinfo -t`` calls) with nothing, procedure 1 with
the string ``hello from rpc/tcp pid PID``, anything else PROC_UNAVAIL; a wrong
program PROG_UNAVAIL, a version outside LOW-HIGH PROG_MISMATCH. It exits 0 once
no client came for IDLE_SECONDS (default 2). Standard library only (runs under
the system python3 as the service's user).
"""

from __future__ import annotations

import os
import select
import socket
import struct
import sys

MAX_RECORD = 64 * 1024


def read_record(conn: socket.socket) -> bytes | None:
    """One record (its fragments joined); None at EOF."""
    out = b""
    while True:
        head = recv_exact(conn, 4)
        if head is None:
            return None
        (mark,) = struct.unpack(">I", head)
        size = mark & 0x7FFFFFFF
        if size + len(out) > MAX_RECORD:
            return None
        body = recv_exact(conn, size)
        if body is None:
            return None
        out += body
        if mark & 0x80000000:
            return out


def recv_exact(conn: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def skip_auth(msg: bytes, pos: int) -> int:
    """Past an opaque_auth (flavour, length, body padded to 4)."""
    _, size = struct.unpack_from(">II", msg, pos)
    return pos + 8 + size + (-size % 4)


def answer(msg: bytes, program: int, low: int, high: int) -> bytes:
    xid, mtype, rpcvers, prog, vers, proc = struct.unpack_from(">6I", msg, 0)
    head = struct.pack(">IIIII", xid, 1, 0, 0, 0)  # REPLY, MSG_ACCEPTED, AUTH_NONE verifier
    if mtype != 0 or rpcvers != 2:
        return struct.pack(">IIIIII", xid, 1, 1, 0, 2, 2)  # MSG_DENIED, RPC_MISMATCH 2-2
    skip_auth(msg, skip_auth(msg, 24))  # credentials, verifier: AUTH_NONE expected
    if prog != program:
        return head + struct.pack(">I", 1)  # PROG_UNAVAIL
    if not low <= vers <= high:
        return head + struct.pack(">III", 2, low, high)  # PROG_MISMATCH
    if proc == 0:
        return head + struct.pack(">I", 0)
    if proc == 1:
        text = f"hello from rpc/tcp pid {os.getpid()}".encode()
        return head + struct.pack(">II", 0, len(text)) + text + b"\0" * (-len(text) % 4)
    return head + struct.pack(">I", 3)  # PROC_UNAVAIL


def main() -> int:
    program = int(sys.argv[1])
    low_text, _, high_text = sys.argv[2].partition("-")
    low, high = int(low_text), int(high_text or low_text)
    idle = float(sys.argv[3]) if len(sys.argv) > 3 else 2.0
    listener = socket.socket(fileno=os.dup(0))
    while True:
        ready, _, _ = select.select([listener], [], [], idle)
        if not ready:
            return 0  # idle: poolinetd polls the listener again
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            continue  # the listener is non-blocking: another process took the client
        with conn:
            conn.setblocking(True)
            conn.settimeout(5)
            try:
                while (msg := read_record(conn)) is not None:
                    reply = answer(msg, program, low, high)
                    conn.sendall(struct.pack(">I", 0x80000000 | len(reply)) + reply)
            except (OSError, struct.error):
                pass  # that client is gone or garbled: serve the next one


if __name__ == "__main__":
    sys.exit(main())
