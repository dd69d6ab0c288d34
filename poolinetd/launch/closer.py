"""The closer: a child process that closes, for the master, what may block in close().

Touches the OS: fork, a SOCK_SEQPACKET socketpair, SCM_RIGHTS, close.

Why: closing a descriptor whose last reference the master holds runs that
file's release in the master. For a TCP socket with SO_LINGER set and
unsent data, that waits up to the linger time; and a unix connection's
receive queue can hold descriptors a local client passed with SCM_RIGHTS,
which the kernel releases when the connection is closed, in the closer's
context. A local user who may connect to a unix-socket service could so
freeze the root master, and every service with it, for as long as they
chose (issue 21). So the master never closes such a connection itself when
nothing else holds it (a refused or engine-answered unix connection, one in
the preamble stage): it passes it here with SCM_RIGHTS, closes its own copy
(not the last one: the message in flight holds another), and goes on.

Ordering matters: the message in flight holds a reference only until the
closer receives it. If the closer closed its copy before the master closed
its own, the master would hold the last one again. So after closing its
copies the master sends a RELEASED message (no descriptors), and the closer
closes what it received only once that message arrives (or the master is
gone: EOF). The closer runs as ``nobody`` where that user exists, owns
nothing else, and closes each descriptor on a thread of its own (bounded),
so one that blocks holds up no other. The master's end of the pair is shut
for reading (SHUT_RD) right after it is made: the closer can send nothing
back, so the master's end never holds a foreign descriptor.

fd ownership: ``Closer.dispose(fd)`` takes ``fd`` on every path and sends it
at once; only what the closer's channel has no room for waits here
(``pending``) for the next ``flush``. If the closer cannot be started or has died and
cannot be restarted, the master closes the descriptor itself (and says so):
availability of one service is not worth a master that cannot close.
"""

from __future__ import annotations

import array
import contextlib
import os
import pwd
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable

from poolinetd.launch import privileges, spawn
from poolinetd.observe import log

MAX_FDS_PER_MESSAGE = 253  # SCM_MAX_FD: the kernel's limit per message
MAX_PENDING = 4096  # descriptors waiting for the closer before it counts as backed up
MAX_THREADS = 64  # descriptors the closer closes at once
# Seconds descriptors may wait for a closer that takes none (its queue full) before it
# is killed and replaced: a close that never ends (a descriptor nested in a passed
# unix socket's queue, with a linger time the closer cannot reset) takes a thread
# for good, and a closer whose threads are all taken, or that was stopped (it runs as
# nobody), would stop every unix-socket service (``backed_up``). Killed, its blocked
# closes end at once (a fatal signal ends a linger wait).
STALL_KILL = 2.0
BATCH = b"c"  # descriptors attached: hold them
RELEASED = b"r"  # the master has closed its copies of every batch before this
_LINGER_OFF = struct.pack("ii", 1, 0)  # close at once, reset the peer


# Room for the most descriptors one message can carry, for a recvmsg that must take
# every one it is sent (a descriptor without room is released in the receiver).
RIGHTS_SPACE = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * array.array("i").itemsize)


def passed_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors (SCM_RIGHTS) in a recvmsg's ancillary data; the caller owns them."""
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return fds.tolist()


class Closer:
    """The master's side: the closer's pid, its channel, and what waits to go to it.

    ``fork`` is the seam that starts the child (``spawn.fork_child`` by default).
    """

    def __init__(self, fork: Callable[[Callable[[], int], tuple[int, ...]], int] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 kill: Callable[[int, int], None] | None = None) -> None:
        self._fork = fork or spawn.fork_child
        self._clock = clock
        self._kill = kill or _kill
        self.pid = 0
        self.stuck_since = 0.0  # > 0 while descriptors wait for a closer that takes none
        self.killed: set[int] = set()  # closers killed for stalling, until reaped
        self.sock: socket.socket | None = None
        self.pending: list[int] = []
        self.owe_release = False  # batches sent whose RELEASED has not been sent yet
        self.closed_here = 0  # descriptors the master had to close itself

    def dispose(self, fd: int) -> None:
        """Close ``fd`` without ever blocking the caller (taken on every path).

        Sent at once, not batched: a descriptor the master still holds when it
        forks (a classic child, a worker) is inherited, and the child that
        closes it after the master let go would hold the last reference and
        block in its stead. Only when the closer is not keeping up do some wait
        here (the engine then stops accepting unix clients: ``backed_up``).
        """
        self.pending.append(fd)
        self.flush()

    def backed_up(self) -> bool:
        """Whether the closer is not keeping up (the engine stops accepting unix clients)."""
        return len(self.pending) >= MAX_PENDING

    def flush(self) -> None:
        """Send what waits to the closer, as far as it takes it without blocking."""
        while self.pending:
            sock = self._channel()
            if sock is None:
                self._close_here()
                return
            batch = self.pending[:MAX_FDS_PER_MESSAGE]
            try:
                sock.sendmsg([BATCH], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                        array.array("i", batch))], socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break  # its queue is full: try again next turn
            except OSError:
                self._lost()  # it died: the next round starts another
                continue
            del self.pending[:len(batch)]
            for fd in batch:  # not the last reference: the closer holds them until RELEASED
                os.close(fd)
            self.owe_release = True
        self._send_release()
        if not self.pending:
            self.stuck_since = 0.0
        elif not self.stuck_since:
            self.stuck_since = self._clock()

    def next_deadline(self) -> float | None:
        """When ``check`` should look again (None: nothing waits)."""
        return self.stuck_since + STALL_KILL if self.stuck_since else None

    def check(self, now: float) -> bool:
        """Kill and replace a closer that took nothing for STALL_KILL seconds; whether it
        was killed (its pid stays in ``killed`` until reaped)."""
        if not self.stuck_since or now - self.stuck_since < STALL_KILL or not self.pid:
            return False
        pid = self.pid
        log.warning("closer_stalled", pid=pid, waiting=len(self.pending),
                    seconds=round(now - self.stuck_since, 3))
        self.killed.add(pid)
        self._kill(pid, signal.SIGKILL)
        self._lost()
        self.stuck_since = 0.0
        self.flush()  # a new closer takes what waits
        return True

    def _send_release(self) -> None:
        """Tell the closer the master's copies are closed: it may close its own now."""
        if not self.owe_release or self.sock is None:
            return
        try:
            self.sock.send(RELEASED, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return  # its queue is full: the next flush says it
        except OSError:
            self._lost()  # gone: it closed everything it held at its exit
        self.owe_release = False

    def child_exited(self, pid: int) -> bool:
        """Whether reaped ``pid`` was the closer (the next ``flush`` starts a new one)."""
        if pid in self.killed:
            self.killed.discard(pid)
            return True
        if not pid or pid != self.pid:
            return False
        self._lost()
        return True

    def close(self) -> None:
        """At the end: send what is left if it can, then close the channel (the closer
        exits on EOF once it has closed everything it received)."""
        self.flush()
        self._close_here()
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _channel(self) -> socket.socket | None:
        if self.sock is not None:
            return self.sock
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            ours.shutdown(socket.SHUT_RD)  # it can send nothing back (no fds, ever)
            ours.setblocking(False)
            self.pid = self._fork(lambda: run_closer(theirs), (theirs.fileno(),))
        except OSError as exc:
            ours.close()
            log.error("closer_failed", error=exc.strerror,
                      action="the master closes descriptors itself")
            return None
        finally:
            theirs.close()
        self.sock = ours
        return ours

    def _lost(self) -> None:
        self.pid = 0
        self.owe_release = False
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _close_here(self) -> None:
        for fd in self.pending:
            os.close(fd)
        self.closed_here += len(self.pending)
        self.pending.clear()


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def run_closer(sock: socket.socket) -> int:
    """The closer's whole life: receive descriptors, hold them until the master says it
    has closed its copies (RELEASED) or is gone (EOF), then close each on its own thread."""
    spawn.set_title("poolinetd: closer")
    with contextlib.suppress(KeyError, privileges.PrivilegeError):
        nobody = pwd.getpwnam("nobody")
        privileges.drop(nobody.pw_uid, nobody.pw_gid, ())
    slots = threading.BoundedSemaphore(MAX_THREADS)
    held: list[int] = []
    while True:
        try:
            data, anc, _, _ = sock.recvmsg(1, RIGHTS_SPACE, socket.MSG_CMSG_CLOEXEC)
        except InterruptedError:
            continue
        except OSError:
            data, anc = b"", []
        held.extend(passed_fds(anc))
        if data == BATCH:
            continue
        for fd in held:  # RELEASED, or EOF: the master holds none of these any more
            slots.acquire()
            threading.Thread(target=_close_one, args=(fd, slots), daemon=True).start()
        held.clear()
        if not data:
            return 0  # what is still closing is released by the kernel at this exit


def _close_one(fd: int, slots: threading.BoundedSemaphore) -> None:
    try:
        _reset_linger(fd)
        with contextlib.suppress(OSError):
            os.close(fd)
    finally:
        slots.release()


def _reset_linger(fd: int) -> None:
    """A socket closes at once (a reset) instead of waiting out a linger time it was given."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return  # not a socket
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_OFF)
    sock.close()  # the dup: the original still holds the file
