"""Process creation: the fork discipline for workers and the launch of server programs.

Touches the OS: fork, posix_spawn, close, setproctitle.

``fork_child(body, keep)`` forks a Python child that closes every inherited
fd except ``keep`` and stdio, resets signals, runs ``body`` and always ends
in ``os._exit`` (a child that returned into the master's stack would run the
master's loop twice). ``launch(...)`` starts a server program with
``os.posix_spawn``: no Python runs between fork and exec, so the cost does
not grow with the caller's size and there is no preexec_fn hazard. These are
the primitives; what a service's program is given (environment, stderr,
user) is ``launch.program``'s.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping

from poolinetd.launch import signals

EX_SOFTWARE = 70  # an unexpected exception in a child
Body = Callable[[], int]  # what a forked child runs; its result is the exit code

# The soft RLIMIT_NOFILE poolinetd was started with (cli raises its own); a
# process that will run a program goes back to it, so programs that use
# select() or close every fd up to the limit see what they would under inetd.
original_nofile: int | None = None


def restore_fd_limit() -> None:
    """Put the soft fd limit back to what poolinetd was started with (if it was raised)."""
    if original_nofile is None:
        return
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (original_nofile, hard))
EX_WORKER_BOOT = 3  # the child could not get ready (privileges, setup)

# Signals a launched program gets back at their default disposition, whatever
# the worker had: inetd's contract says SIGPIPE is default for the server.
_DEFAULT_SIGNALS = (
    signal.SIGPIPE, signal.SIGCHLD, signal.SIGHUP, signal.SIGTERM, signal.SIGINT,
    signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU,
    signal.SIGALRM,
)


def set_title(title: str) -> None:
    """Set the process title shown by ps; never fails (setproctitle is cosmetic)."""
    try:
        import setproctitle
    except ImportError:  # pragma: no cover - setproctitle is a dependency
        return
    with contextlib.suppress(Exception):
        setproctitle.setproctitle(title)


def close_fds_except(keep: Iterable[int]) -> None:
    """Close every fd above 2 that is not in ``keep`` (in the child right after fork).

    CLOEXEC does not help a child that never execs: without this, a worker
    would hold the listeners and its siblings' channel ends, and a sibling's
    death would never show as EOF (guacamole-server #698).
    """
    low = 3
    for fd in sorted(k for k in set(keep) if k >= 3):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, max(65536, os.sysconf("SC_OPEN_MAX")))


def fork_child(body: Callable[[], int], keep: Iterable[int]) -> int:
    """Fork; in the child run ``body()`` and ``os._exit`` with its result. Returns the pid.

    The child keeps only stdio and ``keep``. An exception in ``body`` is
    printed to stderr and exits EX_SOFTWARE. The parent's fds are untouched.
    """
    keep = tuple(keep)
    pid = os.fork()
    if pid:
        return pid
    code = EX_SOFTWARE
    try:
        signals.reset_in_child()
        close_fds_except(keep)
        code = body()
    except SystemExit as exc:  # pragma: no cover - body should return, not exit
        code = exc.code if isinstance(exc.code, int) else EX_SOFTWARE
    except BaseException:
        with contextlib.suppress(Exception):
            traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(code)


def _fd_plan(sock_fd: int, stderr_fd: int | None) -> list[tuple[int, int]]:
    """inetd's contract: the connection on fds 0 and 1, and on 2 unless routed to the log."""
    return [(sock_fd, 0), (sock_fd, 1), (sock_fd if stderr_fd is None else stderr_fd, 2)]


def launch(
    program: str,
    argv: tuple[str, ...],
    env: Mapping[str, str],
    sock_fd: int,
    stderr_fd: int | None = None,
) -> int:
    """Start ``program`` with ``sock_fd`` on fds 0 and 1 (and 2 unless ``stderr_fd``).

    The child runs in a new session (setsid) with default signal dispositions
    and an empty signal mask. Only fds 0, 1, 2 reach it: every other fd of the
    caller is close-on-exec (Python's default, and received fds are created
    with MSG_CMSG_CLOEXEC). The caller keeps ownership of ``sock_fd`` and
    should close it once this returns. Returns the pid; raises OSError (with
    errno) when the program cannot be executed. ``exec_in_place`` applies the
    same rules to the calling process (classic mode's child).
    """
    actions = [(os.POSIX_SPAWN_DUP2, src, dst) for src, dst in _fd_plan(sock_fd, stderr_fd)]
    return os.posix_spawn(
        program,
        list(argv),
        dict(env),
        file_actions=actions,
        setsid=True,
        setsigdef=_DEFAULT_SIGNALS,
        setsigmask=(),
    )


def exec_in_place(
    program: str,
    argv: tuple[str, ...],
    env: Mapping[str, str],
    sock_fd: int,
    stderr_fd: int | None = None,
) -> None:
    """Become ``program`` under ``launch``'s rules (new session, fds, signals, mask).

    For a forked child that has nothing else to do (classic mode). Every fd
    but 0, 1, 2 must already be close-on-exec or closed. Returns only by
    raising OSError when the exec fails; fds 0-2 are then already replaced,
    so the caller logs through the log's own fd, not stderr.
    """
    os.setsid()
    for src, dst in _fd_plan(sock_fd, stderr_fd):
        os.dup2(src, dst, inheritable=True)
    signals.set_default(_DEFAULT_SIGNALS)
    os.execve(program, list(argv), dict(env))
