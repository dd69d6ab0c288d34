"""Whole-message reads (records.py) and the Linux behaviour they rely on, on real sockets."""

from __future__ import annotations

import array
import os
import select
import socket
from collections.abc import Iterator

import pytest

from poolinetd.builtins import records
from poolinetd.builtins.records import Status


@pytest.fixture
def seqpair() -> Iterator[tuple[socket.socket, socket.socket]]:
    client, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.setblocking(False)
    with client, server:
        yield client, server


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_linux_recv_says_0_for_an_empty_message_and_for_eof_alike(seqpair) -> None:
    # The fact that makes the plain recv() path wrong: both reads return b"".
    client, server = seqpair
    client.send(b"")
    assert server.recv(10) == b""
    client.shutdown(socket.SHUT_WR)
    assert server.recv(10) == b""
    # ...and Linux sets no MSG_EOR on seqpacket messages that could tell them apart.
    client2, server2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with client2, server2:
        client2.send(b"abc")
        assert server2.recvmsg(10)[2] & socket.MSG_EOR == 0


def test_an_empty_message_is_not_eof(seqpair) -> None:
    client, server = seqpair
    client.send(b"")  # queued before watch_eof: still told apart
    records.watch_eof(server)
    client.send(b"")
    client.send(b"after")
    assert records.recv_message(server, 1000) == b""
    assert records.recv_message(server, 1000) == b""
    assert records.recv_message(server, 1000) == b"after"
    assert records.recv_message(server, 1000) is Status.AGAIN
    client.send(b"")
    client.shutdown(socket.SHUT_WR)  # an empty last message, then EOF
    assert records.recv_message(server, 1000) == b""
    assert records.recv_message(server, 1000) is Status.EOF
    assert records.recv_message(server, 1000) is Status.EOF


def test_a_message_over_64_kib_comes_whole(seqpair) -> None:
    client, server = seqpair
    records.watch_eof(server)
    big = bytes(range(256)) * 400  # 102,400 bytes
    client.send(big)
    client.send(b"next")
    limit = records.send_limit(server)
    assert limit > len(big)
    assert records.recv_message(server, limit) == big
    assert records.recv_message(server, limit) == b"next"


def test_a_message_over_the_limit_is_reported_never_cut(seqpair) -> None:
    client, server = seqpair
    records.watch_eof(server)
    client.send(b"y" * 5000)
    client.send(b"small")
    assert records.recv_message(server, 4096) is Status.TOO_BIG
    assert records.recv_message(server, 4096) == b"small"


def test_descriptors_a_client_sends_along_are_never_installed(seqpair) -> None:
    client, server = seqpair
    records.watch_eof(server)
    r, w = os.pipe()
    try:
        before = _open_fds()
        fds = array.array("i", [r, w, r, w])
        client.sendmsg([b"with fds"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        client.sendmsg([b""], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds[:1])])
        assert records.recv_message(server, 100) == b"with fds"
        assert records.recv_message(server, 100) == b""
        assert _open_fds() == before
    finally:
        os.close(r)
        os.close(w)


def test_datagrams_are_whole_or_dropped_with_their_source() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as srv, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as cli:
        srv.bind(("127.0.0.1", 0))
        srv.setblocking(False)
        cli.bind(("127.0.0.1", 0))
        cli.sendto(b"z" * 65507, srv.getsockname())  # the largest UDP/IPv4 payload
        cli.sendto(b"z" * 3000, srv.getsockname())
        cli.sendto(b"", srv.getsockname())
        select.select([srv], [], [], 5)
        got = records.recv_datagram(srv, records.send_limit(srv))
        assert got == (b"z" * 65507, cli.getsockname())
        assert records.recv_datagram(srv, 2000) == (None, cli.getsockname())
        assert records.recv_datagram(srv, 2000) == (b"", cli.getsockname())
        assert records.recv_datagram(srv, 2000) is Status.AGAIN


def test_unix_datagrams_over_64_kib_are_read_whole() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        b.setblocking(False)
        a.send(b"u" * 150_000)
        got = records.recv_datagram(b, records.send_limit(b))
        assert isinstance(got, tuple) and got[0] == b"u" * 150_000


def test_the_shared_buffer_grows_and_is_reused() -> None:
    buf = records.Buffer()
    assert len(buf.view(10)) == 10
    big = buf.view(1000)
    assert len(big) == 1000 and len(buf.view(10)) == 10
    assert buf.view(1000).obj is big.obj  # not reallocated for a smaller request
