"""Built-in connection handlers on real sockets: bounded work per step, wake-ups, whole messages.

Each handler is driven the way the worker drives it: step(), register for
what it wants, and step again when a level-triggered selector says so.
"""

from __future__ import annotations

import selectors
import socket
import threading
from collections.abc import Iterator

import pytest

from poolinetd.builtins import internal
from poolinetd.builtins.internal import Want

BLAST = 8 * 1024 * 1024


def _events(want: int) -> int:
    return (selectors.EVENT_READ if want & Want.READ else 0) | (
        selectors.EVENT_WRITE if want & Want.WRITE else 0)


def _woken(sock: socket.socket, want: int) -> bool:
    """Would a level-triggered selector report ``sock`` for ``want`` right now?"""
    with selectors.DefaultSelector() as sel:
        sel.register(sock, _events(want))
        return bool(sel.select(0))


def _drive(handler: internal.StreamHandler, want: int, timeout: float = 30.0) -> None:
    """Step ``handler`` until it finishes, as the worker does."""
    with selectors.DefaultSelector() as sel:
        sel.register(handler.sock, _events(want))
        while want:
            assert sel.select(timeout), "a handler that wants something was never woken"
            want = handler.step()
            if want:
                sel.modify(handler.sock, _events(want))


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(client, server) over loopback TCP, the server side non-blocking, as a worker has it.

    Big buffers, so that megabytes can be queued towards the server at once.
    """
    with socket.create_server(("127.0.0.1", 0)) as lst:
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        client.connect(lst.getsockname())
        server, _ = lst.accept()
    server.setblocking(False)
    with client, server:
        yield client, server


def _queue(client: socket.socket, most: int, fill: bytes = b"q") -> int:
    """Send up to ``most`` bytes without blocking; how many went."""
    client.setblocking(False)
    queued = 0
    chunk = fill * 65536
    while queued < most:
        try:
            queued += client.send(chunk[: most - queued])
        except BlockingIOError:
            break
    client.setblocking(True)
    return queued


def _wait_readable(sock: socket.socket) -> None:
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ)
        assert sel.select(30)


def test_echo_step_is_bounded_while_its_client_keeps_up(tcp_pair) -> None:
    # A client with megabytes queued that reads the echo as fast as it comes:
    # the old step() read and wrote until the input ran dry, all in one turn.
    client, server = tcp_pair
    queued = _queue(client, BLAST, b"e")
    assert queued > 2 * internal.STEP_BYTES
    client.settimeout(30)
    got: list[bytes] = []
    receiver = threading.Thread(
        target=lambda: got.extend(iter(lambda: client.recv(1 << 16), b"")), daemon=True)
    receiver.start()
    _wait_readable(server)
    handler = internal.Echo(server)
    want = handler.step()
    assert handler.bytes_in <= internal.STEP_BYTES + 65536 < queued
    assert want == Want.READ and _woken(server, want)  # the rest wakes it on the next turn
    client.shutdown(socket.SHUT_WR)
    _drive(handler, want)
    server.close()  # as the worker does: the client's reader sees EOF
    receiver.join(30)
    assert not receiver.is_alive()
    assert b"".join(got) == b"e" * queued
    assert handler.bytes_in == handler.bytes_out == queued


def test_echo_stopped_by_the_bound_is_woken_again(tcp_pair) -> None:
    # A client that does not read: the echo output backs up too.
    client, server = tcp_pair
    queued = _queue(client, BLAST)
    _wait_readable(server)
    handler = internal.Echo(server)
    want = handler.step()
    assert handler.bytes_in < queued
    # Either input is still queued (READ fires now) or output is (WRITE fires once
    # the client reads): either way a level-triggered selector wakes the handler.
    assert want in (Want.READ, Want.WRITE)
    if want == Want.READ:
        assert _woken(server, want)
    client.shutdown(socket.SHUT_WR)
    client.settimeout(30)
    got: list[bytes] = []
    reader = threading.Thread(
        target=lambda: got.extend(iter(lambda: client.recv(1 << 16), b"")), daemon=True)
    reader.start()
    _drive(handler, want)
    server.close()
    reader.join(30)
    assert not reader.is_alive()
    assert handler.bytes_in == handler.bytes_out == queued == len(b"".join(got))


@pytest.mark.parametrize("kind", ["discard", "chargen"])
def test_input_loops_of_discard_and_chargen_are_bounded(tcp_pair, kind: str) -> None:
    client, server = tcp_pair
    queued = _queue(client, BLAST)
    _wait_readable(server)
    handler = internal.STREAM[kind](server)
    want = handler.step()
    assert 0 < handler.bytes_in <= internal.STEP_BYTES + 65536 < queued
    assert want & Want.READ and _woken(server, Want.READ)  # the rest wakes it again


def test_one_shots_read_nothing_and_finish_in_one_step(tcp_pair) -> None:
    client, server = tcp_pair
    client.sendall(b"ignored")
    for name in ("daytime", "time"):
        assert internal.BY_NAME[name].one_shot
        handler = internal.STREAM[name](server)
        assert handler.step() == Want.NONE and handler.bytes_in == 0
    client.settimeout(5)
    assert len(client.recv(100)) > 4


# -- SOCK_SEQPACKET ---------------------------------------------------------------

@pytest.fixture
def seq_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    # The client blocks without a timeout: with one, Python polls for POLLOUT
    # before each send, and Linux reports a unix seqpacket socket writable only
    # while less than a quarter of its send buffer is in use. Reads go through
    # _recv, which has a deadline.
    client, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.setblocking(False)
    with client, server:
        yield client, server


def _recv(sock: socket.socket, size: int = 1 << 20, timeout: float = 30.0) -> bytes:
    """One message, or fail after ``timeout`` seconds."""
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ)
        assert sel.select(timeout), "no message in time"
    return sock.recv(size)


def _recv_all(sock: socket.socket) -> list[bytes]:
    """Every message until EOF. (An empty message ends this too: callers send none.)"""
    out = []
    while data := _recv(sock):
        out.append(data)
    return out


def test_seqpacket_echo_keeps_each_message_whole_and_separate(seq_pair) -> None:
    client, server = seq_pair
    messages = [b"one", b"", b"x" * 100_000, b"", b"two"]
    for msg in messages:
        client.send(msg)
    handler = internal.new_handler("echo", server)
    for _ in range(len(messages)):  # a few steps: each is bounded
        want = handler.step()
        assert want == Want.READ  # the empty messages did not end it
    got = [_recv(client) for _ in messages]
    assert got == messages
    assert handler.bytes_in == handler.bytes_out == sum(map(len, messages))
    client.send(b"")
    client.shutdown(socket.SHUT_WR)  # an empty last message, then EOF
    _drive(handler, want)
    server.close()  # as the worker does when the handler is finished
    assert _recv(client) == b"" and _recv(client) == b""  # the empty message, then EOF
    assert handler.end_reason == "done"


def test_seqpacket_echo_ends_the_connection_rather_than_cut_a_message(seq_pair) -> None:
    client, server = seq_pair
    limit = server.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * limit)
    client.send(b"fits")
    client.send(b"L" * (limit + 1000))  # more than the server could send back in one piece
    client.send(b"after")
    handler = internal.new_handler("echo", server)
    _drive(handler, Want.READ)
    server.close()
    assert handler.end_reason == "message_too_big"
    # The client learns of the loss (Linux reports the reset of a socket closed with
    # unread input before the messages queued ahead of it); what it does get is
    # whole: "fits", and nothing that came after the lost message.
    got = []
    while True:
        try:
            data = _recv(client)
        except ConnectionResetError:
            continue
        if not data:
            break
        got.append(data)
    assert got == [b"fits"]


def test_seqpacket_echo_with_a_slow_reader_waits_for_write(seq_pair) -> None:
    client, server = seq_pair
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)  # fills after a few replies
    handler = internal.new_handler("echo", server)
    messages: list[bytes] = []
    want = Want.READ
    client.setblocking(False)
    for i in range(200):  # a client that does not read yet: the server's sends hit EAGAIN
        msg = b"%d:" % i + b"m" * 8000
        try:
            client.send(msg)
        except BlockingIOError:
            pass
        else:
            messages.append(msg)
        want = handler.step()
        if want == Want.WRITE:
            break
    assert want == Want.WRITE and not _woken(server, Want.WRITE)
    client.setblocking(True)
    client.shutdown(socket.SHUT_WR)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.extend(_recv_all(client)))
    reader.start()
    _drive(handler, want)
    server.close()
    reader.join(30)
    assert got == messages


@pytest.mark.parametrize("kind", ["discard", "chargen"])
def test_seqpacket_discard_and_chargen_survive_an_empty_message(seq_pair, kind: str) -> None:
    client, server = seq_pair
    client.send(b"")
    handler = internal.new_handler(kind, server)
    want = handler.step()
    assert want & Want.READ, "an empty message was taken for EOF"
    client.shutdown(socket.SHUT_WR)
    _drive(handler, want)  # EOF ends it


def test_serve_blocking_on_seqpacket(seq_pair) -> None:
    client, server = seq_pair
    result: list[tuple[int, int]] = []
    thread = threading.Thread(target=lambda: result.append(
        internal.serve_blocking(server, "echo", 10)))
    thread.start()
    for msg in (b"a", b"", b"b" * 70_000):
        client.send(msg)
        assert _recv(client) == msg
    client.shutdown(socket.SHUT_WR)
    thread.join(10)
    assert result == [(70_001, 70_001)]
