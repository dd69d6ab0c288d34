"""The OS seam of the engine and dispatchers: clock, fork, waitpid, kill, queue depth.

Touches the OS (this class is the only place the engine and the dispatchers
make these calls). Unit tests pass a fake with the same methods, so reload,
stop, reaping, backpressure and dispatch run in milliseconds without a
single real child; the end-to-end tests use this real one.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import socket
import termios
import time
from collections.abc import Callable, Iterable

from poolinetd.launch import spawn


class System:
    """The real operating system."""

    def clock(self) -> float:
        """Monotonic seconds: every deadline in the engine is measured on this."""
        return time.monotonic()

    def fork(self, body: Callable[[], int], keep: Iterable[int]) -> int:
        """Fork a child that keeps only stdio and ``keep``, runs ``body`` and exits."""
        return spawn.fork_child(body, keep)

    def waitpid(self, pid: int, options: int) -> tuple[int, int]:
        return os.waitpid(pid, options)

    def kill(self, pid: int, sig: int) -> None:
        """Signal ``pid``; a process that is already gone is not an error."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    def exists(self, pid: int) -> bool:
        """True if ``pid`` is a live process (a zombie still awaits its reap, so it counts)."""
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def identity(self, pid: int) -> tuple[int, int] | None:
        """(parent pid, start time in clock ticks) of ``pid``, from /proc; None if gone.

        The start time tells a process from a later one that got the same pid:
        the master signals a program only while both still match what it
        recorded when the program was started.
        """
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                data = fh.read(4096)
        except OSError:
            return None
        return parse_stat(data)

    def unread(self, sock: socket.socket) -> int:
        """Bytes sent on ``sock`` that the peer has not read yet (SIOCOUTQ on AF_UNIX).

        A worker that stops reading its channel (SIGSTOP, a wedged handler) is
        seen by this number not going down; -1 if the kernel cannot say.
        """
        buf = array.array("i", [0])
        try:
            fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, buf, True)
        except OSError:
            return -1
        return buf[0]


def parse_stat(data: bytes) -> tuple[int, int] | None:
    """(parent pid, start time) from a /proc/PID/stat text; None if it says the process is gone.

    A process the kernel is releasing (its parent is reaping it right now)
    shows parent 0: it is gone, not someone else's. (Only pid 1 and kernel
    threads have parent 0 otherwise, and a gone process is never signalled.)
    """
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        ppid, start = int(fields[1]), int(fields[19])
    except (IndexError, ValueError):
        return None
    return None if ppid == 0 else (ppid, start)
