"""The signal wakeup pipe: handlers record nothing, the loop does all the work.

Touches the OS: installs signal handlers and ``signal.set_wakeup_fd``.
``SignalPipe.install(signals)`` makes each listed signal write its number to a
non-blocking socketpair that the loop's selector watches; ``drain()`` returns
the signals that arrived. The handlers are no-ops on purpose: Python runs
them between bytecodes, and logging or reaping there re-enters code that may
hold locks (gunicorn #3198). ``signals.py`` is the only module that calls
``signal.signal``.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterable
from types import FrameType


def _record_only(signum: int, frame: FrameType | None) -> None:
    """Do nothing: set_wakeup_fd has already written the signal number."""


class SignalPipe:
    """Owns both ends of the wakeup socketpair; ``close()`` restores everything."""

    def __init__(self) -> None:
        self.reader, self._writer = socket.socketpair()
        self.reader.setblocking(False)
        self._writer.setblocking(False)
        self._previous_fd: int | None = None
        self._previous: dict[int, signal._HANDLER] = {}

    def install(self, signals: Iterable[signal.Signals]) -> None:
        """Route ``signals`` to the pipe; SIGPIPE is ignored (a write to a dead peer is EPIPE)."""
        self._previous_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        for sig in signals:
            self._previous[sig] = signal.signal(sig, _record_only)
        self._previous[signal.SIGPIPE] = signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def fileno(self) -> int:
        return self.reader.fileno()

    def drain(self) -> list[signal.Signals]:
        """Every signal recorded since the last call, in arrival order (duplicates kept)."""
        got: list[signal.Signals] = []
        while True:
            try:
                data = self.reader.recv(4096)
            except (BlockingIOError, InterruptedError):
                break
            if not data:
                break
            for num in data:
                try:
                    got.append(signal.Signals(num))
                except ValueError:
                    continue
        return got

    def close(self) -> None:
        """Restore the previous handlers and wakeup fd, then close both ends."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._previous_fd is not None:
            signal.set_wakeup_fd(self._previous_fd)
            self._previous_fd = None
        self.reader.close()
        self._writer.close()


# The master's operator signals (reload, log reopen, upgrade, pool resize): sent to
# the whole process group or unit (``kill -USR2 -PGID``, ``systemctl kill``, whose
# default is every process), they are the master's business; a forked child that
# died of one would drop its connections. Programs get them back at their default
# disposition (spawn._DEFAULT_SIGNALS).
MASTER_ONLY = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU)


def reset_in_child() -> None:
    """In a freshly forked child: default dispositions, no wakeup fd.

    The child must not write into the master's wakeup pipe, and must not
    inherit the master's no-op handlers (a worker that ignored SIGTERM could
    not be stopped). The master's operator signals are ignored (MASTER_ONLY).
    """
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD, signal.SIGALRM):
        signal.signal(sig, signal.SIG_DFL)
    for sig in MASTER_ONLY:
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)


def set_default(sigs: Iterable[int]) -> None:
    """Default dispositions and an empty mask, as a program must find them after exec."""
    for sig in sigs:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
