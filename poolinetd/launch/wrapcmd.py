"""tcp_wrappers' shell commands: ``spawn`` and ``twist`` as libwrap runs them under tcpd.

Touches the OS: fork (through the caller's ``Fork``, normally
``spawn.fork_child``), then in the child only: setgroups/setgid/setuid,
open of /dev/null, PR_SET_CHILD_SUBREAPER, a fork whose child does setsid,
dup2 and execve of /bin/sh, and waitpid for the whole command.

The master decides, a child it forks runs the command. The child drops to
the service's user first (``privileges.drop``, which proves root cannot be
regained), so a command never has more privilege than the service's
program would: the root master runs nothing for a client itself. Then it
becomes ``/bin/sh -c COMMAND`` (the command was %-expanded with libwrap's
safe character set, so a client's name cannot add shell syntax) in a new
session with default signals, an empty mask and the clean environment of
the service's programs (``launch.program.connection_env``) plus the rule's
``setenv`` pairs:

* ``spawn``: fds 0, 1 and 2 on /dev/null (libwrap's shell_cmd does the
  same); the client's connection is not given to it;
* ``twist``: the client's connection on fds 0, 1 and 2, as tcpd's twist
  execs with the socket it was given on 0-2; the command serves the client
  instead of the service's program.

fd ownership: ``run`` never takes ``conn_fd``: the child gets its own copy
(fork) and the caller closes its one once ``run`` returns, on every path.
The child keeps no other descriptor of the master's (``fork_child`` closes
them) but the log's, which is close-on-exec.

Exit codes of a child that could not exec: EX_NOPERM (the drop failed: the
master does not run as root and the service's user is another) and
EX_EXEC_FAILED (no /bin/sh); the caller logs them when it reaps the child.
"""

from __future__ import annotations

import contextlib
import enum
import os
from collections.abc import Callable, Iterable, Mapping

from poolinetd.config.spec import Service
from poolinetd.launch import privileges, program, spawn

SHELL = "/bin/sh"
EX_NOPERM = 77  # sysexits' EX_NOPERM: the child could not become the service's user
EX_EXEC_FAILED = program.EX_EXEC_FAILED
Fork = Callable[[spawn.Body, tuple[int, ...]], int]


class Kind(enum.Enum):
    """Which option a command comes from."""

    SPAWN = "spawn"
    TWIST = "twist"


def environment(service: Service, peer: str, local: str,
                setenv: Iterable[tuple[str, str]]) -> dict[str, str]:
    """What the command (or the service's program) finds: the clean environment with the
    connection variables, then the rule's ``setenv`` pairs (they win, as on tcpd)."""
    env = program.connection_env(service, peer, local)
    env.update(setenv)
    return env


def run(fork: Fork, kind: Kind, service: Service, command: str, env: Mapping[str, str],
        conn_fd: int = -1) -> int:
    """Fork the child that runs ``command`` (``kind``); returns its pid, raises OSError
    when the fork fails. ``conn_fd``: the client's connection for TWIST (kept by the
    caller), ignored for SPAWN."""
    twist = kind is Kind.TWIST
    if twist and conn_fd < 0:
        raise ValueError("twist needs the client's connection")
    frozen = dict(env)  # built in the master: the child allocates as little as it can
    argv = ("sh", "-c", command)

    def body() -> int:
        return _become_shell(service, argv, frozen, conn_fd if twist else -1)

    return fork(body, (conn_fd,) if twist else ())


def _become_shell(service: Service, argv: tuple[str, ...], env: dict[str, str],
                  conn_fd: int) -> int:
    """In the forked child: drop to the service's user, then run the shell below itself
    and wait for it and for everything it leaves behind; returns the shell's status.

    The child is a subreaper: a command that puts itself in the background
    (``spawn (safe_finger -l @%h | mail root) &``, hosts_access(5)'s own
    example) or daemonizes stays below it, so the master's count of running
    commands (and its caps) holds until the last of them has exited, and a
    backgrounded twist keeps its slot for as long as it holds the client.
    """
    try:
        privileges.drop(service.uid, service.gid, service.groups)
    except privileges.PrivilegeError:
        return EX_NOPERM
    kind = "twist" if conn_fd >= 0 else "spawn"
    spawn.set_title(f"poolinetd: {service.name} tcp_wrappers {kind}")
    spawn.restore_fd_limit()
    if conn_fd < 0:
        fd = os.open(os.devnull, os.O_RDWR)  # close-on-exec: only its dups on 0-2 stay
    else:
        fd = conn_fd
        os.set_blocking(fd, True)  # a shell command expects a blocking socket
    with contextlib.suppress(OSError, AttributeError):  # refused: as without (logged by none)
        spawn.become_subreaper()
    shell = os.fork()
    if shell == 0:
        with contextlib.suppress(OSError):  # no /bin/sh: the exit code says so
            spawn.exec_in_place(SHELL, argv, env, fd)
        os._exit(EX_EXEC_FAILED)
    os.close(fd)  # the command's processes hold the connection now, not this one
    code = EX_EXEC_FAILED
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:  # the shell and all it left behind are gone
            break
        if pid == shell:
            got = os.waitstatus_to_exitcode(status)
            code = got if got >= 0 else 128 - got
    return code
