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
import ctypes  # imported here, by root: a child that dropped privileges may not reach it
import errno
import os
import resource
import signal
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence

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
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (original_nofile, hard))
# Limits a spawn can trip over itself (launch: glibc maps the child's stack).
_MEMORY_LIMITS = frozenset({resource.RLIMIT_AS, resource.RLIMIT_DATA})
EX_WORKER_BOOT = 3  # the child could not get ready (privileges, setup)

# Signals a launched program gets back at their default disposition, whatever
# the worker had: inetd's contract says SIGPIPE is default for the server.
_DEFAULT_SIGNALS = (
    signal.SIGPIPE, signal.SIGCHLD, signal.SIGHUP, signal.SIGTERM, signal.SIGINT,
    signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU,
    signal.SIGALRM,
    # A worker of a service with rlimit_cpu ignores SIGXCPU (launch.program.prepare_process).
    signal.SIGXCPU,
)


def set_title(title: str) -> None:
    """Set the process title shown by ps; never fails (setproctitle is cosmetic)."""
    try:
        import setproctitle
    except ImportError:  # pragma: no cover - setproctitle is a dependency
        return
    with contextlib.suppress(Exception):
        setproctitle.setproctitle(title)


def become_subreaper() -> None:
    """PR_SET_CHILD_SUBREAPER for this process: every descendant orphaned below it is
    reparented to it, not to init (or to the master). Raises OSError if refused."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER = 36
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


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
    rlimits: Sequence[tuple[int, int]] = (),
) -> int:
    """Start ``program`` with ``sock_fd`` on fds 0 and 1 (and 2 unless ``stderr_fd``).

    The child runs in a new session (setsid) with default signal dispositions
    and an empty signal mask. Only fds 0, 1, 2 reach it: every other fd of the
    caller is close-on-exec (Python's default, and received fds are created
    with MSG_CMSG_CLOEXEC). The caller keeps ownership of ``sock_fd`` and
    should close it once this returns. Returns the pid; raises OSError (with
    errno) when the program cannot be executed. ``exec_in_place`` applies the
    same rules to the calling process (classic mode's child).

    ``rlimits`` ((resource.RLIMIT_*, value) pairs) are what the program gets
    as both its soft and hard limit. posix_spawn has no attribute for them, so
    the caller's soft limits are set to the values around the spawn (the
    program starts with them: a vfork-like clone copies them) and put back
    after, then the program's hard limits are lowered with prlimit. The
    caller's hard limits must already be at least the values
    (``launch.program.prepare_process`` raises them while still root).
    So the soft limits hold from the program's first instruction; the hard
    limits a moment after its exec (the prlimit), not before. Not for
    RLIMIT_STACK: execve writes back the stack limit it started with after the
    caller has resumed, which can undo the prlimit; the caller holds that one
    itself (launch.program._launch_rlimits). RLIMIT_NPROC is
    checked at the spawn itself against the caller's user (as at the execve of
    a classic child): the launch fails with EAGAIN when that user already runs
    that many processes. An RLIMIT_AS or RLIMIT_DATA value below what the
    caller itself maps would fail the spawn (glibc maps the child's stack):
    the program then starts without those two, and gets them by the prlimit.
    """
    actions = [(os.POSIX_SPAWN_DUP2, src, dst) for src, dst in _fd_plan(sock_fd, stderr_fd)]
    if not rlimits:
        return os.posix_spawn(program, list(argv), dict(env), file_actions=actions,
                              setsid=True, setsigdef=_DEFAULT_SIGNALS, setsigmask=())
    args, environ = list(argv), dict(env)  # built before any limit is lowered
    try:
        pid = _spawn_limited(program, args, environ, actions, rlimits)
    except (MemoryError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno != errno.ENOMEM:
            raise
        # An address-space or data limit below what this process already maps: the
        # spawn itself needs memory (glibc maps the child's stack). Start the program
        # under the other limits; prlimit below lowers these a moment after its exec.
        light = [(res, value) for res, value in rlimits if res not in _MEMORY_LIMITS]
        pid = _spawn_limited(program, args, environ, actions, light)
    for res, value in rlimits:
        # EPERM: a set-user-ID program is no longer ours to limit (it keeps the soft
        # limits it started with); ESRCH: it has already exited.
        with contextlib.suppress(ValueError, OSError):
            resource.prlimit(pid, res, (value, value))
    return pid


def _spawn_limited(program: str, args: list[str], env: dict[str, str],
                   actions: list[tuple[int, int, int]],
                   rlimits: Sequence[tuple[int, int]]) -> int:
    """posix_spawn with this process's soft limits set to ``rlimits`` for the duration."""
    saved = [(res, resource.getrlimit(res)) for res, _ in rlimits]
    try:
        for (res, value), (_, (_, hard)) in zip(rlimits, saved, strict=True):
            resource.setrlimit(res, (value, hard))
        return os.posix_spawn(program, args, env, file_actions=actions, setsid=True,
                              setsigdef=_DEFAULT_SIGNALS, setsigmask=())
    except ValueError as exc:  # a value above this process's hard limit
        raise OSError(errno.EINVAL, f"resource limit: {exc}") from exc
    finally:
        for res, old in saved:
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(res, old)


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
