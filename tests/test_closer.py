"""launch/closer.py: the master never blocks closing what a client could have poisoned."""

from __future__ import annotations

import array
import os
import signal
import socket
import time
from collections.abc import Callable

import pytest

from poolinetd.launch import closer as closer_mod
from poolinetd.launch.closer import Closer


def _reap(pid: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    raise AssertionError(f"closer {pid} did not exit")


def test_disposed_descriptors_are_closed_by_the_closer_not_here() -> None:
    closer = Closer()
    pairs = [socket.socketpair() for _ in range(300)]  # more than one message's worth
    for _, theirs in pairs:
        closer.dispose(theirs.detach())
    deadline = time.monotonic() + 30
    while closer.pending or closer.owe_release:  # its queue may fill while it starts
        assert time.monotonic() < deadline, "the closer never took them"
        time.sleep(0.01)
        closer.flush()
    assert closer.pid > 0 and closer.closed_here == 0
    for ours, _ in pairs:  # the closer closed the other ends: each of ours sees EOF
        ours.settimeout(10)
        assert ours.recv(1) == b""
        ours.close()
    pid = closer.pid
    closer.close()
    assert _reap(pid) == 0  # EOF on its channel: it exits


def test_the_closer_cannot_send_anything_back() -> None:
    """The master's end is shut for reading: the closer (or whoever holds its end) cannot
    queue a message, let alone a descriptor, for the master."""
    seen: list[socket.socket] = []

    def fork(body: Callable[[], int], keep: tuple[int, ...]) -> int:
        seen.append(socket.socket(fileno=os.dup(keep[0])))
        return 424242

    closer = Closer(fork)
    a, b = socket.socketpair()
    closer.dispose(b.detach())
    closer.flush()
    theirs = seen[0]
    with pytest.raises(BrokenPipeError):
        theirs.send(b"x")
    theirs.close()
    a.close()
    closer.close()


def test_the_closer_waits_for_released_before_closing() -> None:
    """The master's copy must be closed first, or the master holds the last reference:
    a batch without RELEASED is held, not closed (until EOF)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the closer under test
        ours.close()
        os._exit(closer_mod.run_closer(theirs))
    theirs.close()
    a, b = socket.socketpair()
    ours.sendmsg([closer_mod.BATCH], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                       array.array("i", [b.fileno()]))])
    b.close()
    a.settimeout(0.5)
    with pytest.raises(TimeoutError):
        a.recv(1)  # still held: no RELEASED yet
    ours.send(closer_mod.RELEASED)
    a.settimeout(10)
    assert a.recv(1) == b""
    a.close()
    ours.close()
    assert _reap(pid) == 0


def test_a_dead_closer_is_replaced_and_nothing_is_lost() -> None:
    closer = Closer()
    a, b = socket.socketpair()
    closer.dispose(b.detach())
    closer.flush()
    first = closer.pid
    os.kill(first, signal.SIGKILL)
    _reap(first)
    assert closer.child_exited(first)
    c, d = socket.socketpair()
    closer.dispose(d.detach())
    closer.flush()
    assert closer.pid not in (0, first)
    c.settimeout(10)
    assert c.recv(1) == b""
    for sock in (a, c):
        sock.close()
    pid = closer.pid
    closer.close()
    assert _reap(pid) == 0


def test_without_a_closer_the_master_closes_descriptors_itself() -> None:
    def fork(body: Callable[[], int], keep: tuple[int, ...]) -> int:
        raise OSError(11, "Resource temporarily unavailable")

    closer = Closer(fork)
    a, b = socket.socketpair()
    closer.dispose(b.detach())
    closer.flush()
    assert closer.pending == [] and closer.closed_here == 1
    a.settimeout(5)
    assert a.recv(1) == b""
    a.close()


def test_a_backed_up_closer_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(closer_mod, "MAX_PENDING", 2)
    closer = Closer()
    closer.pending = [os.dup(0), os.dup(0)]
    assert closer.backed_up()
    closer.flush()
    assert not closer.backed_up()
    assert not closer.owe_release  # RELEASED followed the batch
    pid = closer.pid
    closer.close()
    _reap(pid)
