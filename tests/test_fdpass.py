"""The wire: header codec, real SCM_RIGHTS over SOCK_SEQPACKET, and its failure checks."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolinetd import fdpass


@given(st.integers(0, 2**64 - 1), st.integers(0, 255), st.text(max_size=60))
def test_conn_round_trip(conn_id: int, family: int, peer: str) -> None:
    msg = fdpass.decode(fdpass.encode_conn(conn_id, family, peer))
    assert (msg.kind, msg.ident, msg.family, msg.peer) == (fdpass.CONN, conn_id, family, peer)


@given(st.lists(st.integers(0, 2**64 - 1), max_size=2000))
def test_done_batches_round_trip(ids: list[int]) -> None:
    got: list[int] = []
    for payload in fdpass.encode_done(ids):
        assert len(payload) <= fdpass.MAX_MESSAGE
        got.extend(fdpass.decode(payload).ids)
    assert got == ids


@given(st.binary(max_size=64))
def test_decode_never_crashes_on_garbage(data: bytes) -> None:
    with contextlib.suppress(fdpass.ProtocolError):
        fdpass.decode(data)


def test_fd_travels_and_stays_close_on_exec() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    with a, b:
        fdpass.send(a, fdpass.encode_lend(7), r)
        os.close(r)
        data, fd = fdpass.recv(b)
        assert fd is not None and fdpass.decode(data).ident == 7
        assert not os.get_inheritable(fd)
        os.write(w, b"x")
        assert os.read(fd, 1) == b"x"
        os.close(fd)
        os.close(w)
        a.close()
        assert fdpass.recv(b) == (b"", None)  # EOF: the peer is gone


def test_two_fds_in_one_message_are_refused_and_closed() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    with a, b:
        import array

        a.sendmsg([b"xx"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r, w]))])
        before = set(os.listdir("/proc/self/fd"))
        with pytest.raises(fdpass.ProtocolError, match="2 fds"):
            fdpass.recv(b)
        assert set(os.listdir("/proc/self/fd")) <= before
    os.close(r)
    os.close(w)


def test_ctrunc_when_the_receiver_has_no_fd_to_spare() -> None:
    """RLIMIT_NOFILE full in the receiver: the kernel drops the fd and sets MSG_CTRUNC."""
    code = textwrap.dedent("""
        import os, resource, socket, sys
        from poolinetd import fdpass
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        r, w = os.pipe()
        fdpass.send(a, fdpass.encode_lend(1), r)
        top = max(int(x) for x in os.listdir('/proc/self/fd'))
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1, hard))
        # fill every free fd below the limit
        held = []
        while True:
            try:
                held.append(os.dup(0))
            except OSError:
                break
        try:
            fdpass.recv(b)
        except fdpass.ProtocolError as exc:
            print('refused:', exc)
            sys.exit(0)
        sys.exit(1)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "MSG_CTRUNC" in out.stdout


def test_a_conn_whose_fd_was_dropped_is_still_identified() -> None:
    """MSG_CTRUNC: the header survives, so the worker can report the connection DONE."""
    code = textwrap.dedent("""
        import os, resource, socket, sys
        from poolinetd import fdpass
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        b.setblocking(False)
        r, w = os.pipe()
        fdpass.send(a, fdpass.encode_conn(77, socket.AF_INET, "192.0.2.1 5"), r)
        top = max(int(x) for x in os.listdir('/proc/self/fd'))
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1, hard))
        while True:
            try:
                os.dup(0)
            except OSError:
                break
        try:
            fdpass.receive(b)
        except fdpass.ProtocolError as exc:
            assert exc.message is not None and exc.message.ident == 77, exc.message
            print('identified')
            sys.exit(0)
        sys.exit(1)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "identified" in out.stdout


def test_stats_round_trip_and_split() -> None:
    exits = [(i % 256 - 9, i * 1000) for i in range(1000)]
    payloads = fdpass.encode_stats(15, 30, exits)
    assert len(payloads) > 1 and all(len(p) <= fdpass.MAX_MESSAGE for p in payloads)
    msgs = [fdpass.decode(p) for p in payloads]
    assert sum(m.bytes_in for m in msgs) == 15 and sum(m.bytes_out for m in msgs) == 30
    assert [e for m in msgs for e in m.exits] == exits
    assert fdpass.decode(fdpass.encode_stats(1, 2, [])[0]).exits == ()
