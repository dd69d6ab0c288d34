"""The program launch contract, the same in both modes: how a service's program is started.

Touches the OS: setgroups/setgid/setuid, posix_spawn, exec, getsockname.
A pool worker (``pool.worker``) calls ``spawn_program`` for every
connection and goes straight back to its loop; a classic child
(``classic.dispatcher``) calls ``exec_program`` and becomes the program.
Either way the program finds inetd's contract:

* the connection (or, for a ``wait`` service, the listener) on fds 0 and 1,
  and on 2 unless the service routes stderr to the log; no other fd;
* a new session, default signal dispositions, an empty signal mask;
* a clean environment: PATH, HOME, USER, LOGNAME, SHELL, the UCSPI and CGI
  connection variables (``connection_env``), then the service's own ``env``;
* the service's user, groups and (in the caller) fd limit;
* the service's process controls (``rlimit_*``, ``nice``, ``umask``):
  each rlimit as both soft and hard limit, the nice value, the umask.
  ``prepare_process`` runs first in both modes, as root (it may raise
  hard limits and lower the nice value), in the worker at boot or in the
  classic child before it drops privileges. nice and umask are then the
  process's own and the program inherits them (a worker launches only its
  service's programs); the rlimits are applied per launch, so a worker keeps
  the fds, memory and CPU it needs itself (``spawn.launch`` for how).

fd ownership: the caller owns the socket it passes; ``spawn_program``
never closes it (the caller closes its copy once the program has its own),
``exec_program`` replaces fds 0-2 with it and only returns if the exec
failed. Exit logging (``log_program_exit``) is the caller's once it has
reaped the program: a worker through its pidfd, the classic master through
SIGCHLD.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import socket

from poolinetd.config.spec import RLIMIT_KEYS, Service, StderrRoute
from poolinetd.launch import privileges, spawn
from poolinetd.observe import log

BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
EX_EXEC_FAILED = 127  # a classic child whose exec failed (the shell's "command not found")


def drop_privileges(service: Service) -> str | None:
    """Become ``service``'s user and groups; None when done, else why it could not.

    Not logged here: a worker that cannot drop is a boot failure (the master
    backs off), a classic child that cannot is one lost connection, and each
    mode says so with its own event.
    """
    try:
        privileges.drop(service.uid, service.gid, service.groups)
    except privileges.PrivilegeError as exc:
        return str(exc)
    return None


def service_rlimits(service: Service) -> tuple[tuple[int, int], ...]:
    """The service's rlimit_* keys as (resource.RLIMIT_*, value) pairs (RLIM_INFINITY = -1)."""
    names = dict(RLIMIT_KEYS)
    return tuple((getattr(resource, names[key]), value) for key, value in
                 service.process.rlimits)


def _launch_rlimits(service: Service) -> tuple[tuple[int, int], ...]:
    """The rlimits a worker applies per launch: all but RLIMIT_STACK, its own since boot.

    execve snapshots RLIMIT_STACK when it starts and writes it back after the
    vfork parent has resumed, so a prlimit in that window would be lost: the
    program's hard stack limit must be in place before the spawn.
    """
    return tuple(pair for pair in service_rlimits(service) if pair[0] != resource.RLIMIT_STACK)


def prepare_process(service: Service, pooled: bool) -> str | None:
    """Set up this process (still root) for launching ``service``'s programs; None when done,
    else why it could not (the caller's boot or connection fails, as for privileges).

    Raises each hard limit below an rlimit_* value to it (only root may), so that
    the limits can be applied after privileges are dropped; sets the nice value
    (absolute: poolinetd's own is the base) and the umask. ``pooled``: a worker
    takes rlimit_stack as its own (soft and hard; it needs well under 1 MiB of
    stack), see ``_launch_rlimits``. A classic child sets rlimit_nproc before it
    drops privileges: setuid then marks it when its user already runs more
    processes, and the execve fails with EAGAIN, as a worker's spawn does
    (spawn.launch). A worker that lowers its own soft RLIMIT_CPU
    around each spawn ignores SIGXCPU, which its own accumulated CPU time would
    otherwise raise; the program gets it back at its default
    (spawn._DEFAULT_SIGNALS).
    """
    controls = service.process
    if controls.empty or service.program is None:
        return None
    try:
        for res, value in service_rlimits(service):
            soft, hard = resource.getrlimit(res)
            if hard != resource.RLIM_INFINITY and (value == resource.RLIM_INFINITY
                                                   or value > hard):
                resource.setrlimit(res, (soft, value))  # soft <= hard < value
            if ((pooled and res == resource.RLIMIT_STACK)
                    or (not pooled and res == resource.RLIMIT_NPROC)):
                resource.setrlimit(res, (value, value))
        if controls.nice is not None:
            os.setpriority(os.PRIO_PROCESS, 0, controls.nice)
    except (OSError, ValueError) as exc:
        return f"cannot set process controls: {exc}"
    if controls.umask is not None:
        os.umask(controls.umask)
    if pooled and any(key == "rlimit_cpu" for key, _ in controls.rlimits):
        signal.signal(signal.SIGXCPU, signal.SIG_IGN)
    return None


def format_addr(addr: object) -> str:
    """The wire form of a socket address: "HOST PORT", or "" for unix sockets."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]} {addr[1]}"
    return ""


def local_address(sock: socket.socket, said: str) -> str:
    """The address the client connected to: what a PROXY header ``said``, else ``sock``'s own.

    "" for unix sockets, or when the kernel cannot say (the socket is already reset).
    """
    if said:
        return said
    try:
        return format_addr(sock.getsockname())
    except OSError:
        return ""


def _unmap(host: str) -> str:
    """``::ffff:192.0.2.1`` (a v4 client of a tcp46 socket) is reported as ``192.0.2.1``."""
    return host[7:] if host.startswith("::ffff:") and "." in host else host


def connection_env(service: Service, peer: str, local: str) -> dict[str, str]:
    """The environment of a launched program: clean, plus UCSPI and CGI connection variables.

    ``peer``/``local`` are "HOST PORT" as the master wrote them ("" for unix).
    """
    env = _login_env(service)
    if service.spec.protocol.is_unix:
        env["PROTO"] = "UNIX"
    else:
        rhost, _, rport = peer.partition(" ")
        lhost, _, lport = local.partition(" ")
        rhost, lhost = _unmap(rhost), _unmap(lhost)
        proto = "UDP" if service.spec.protocol.is_udp else "TCP"
        if ":" in rhost:
            proto += "6"
        env.update({"PROTO": proto, f"{proto[:3]}REMOTEIP": rhost, f"{proto[:3]}REMOTEPORT": rport,
                    f"{proto[:3]}LOCALIP": lhost, f"{proto[:3]}LOCALPORT": lport,
                    "REMOTE_ADDR": rhost, "REMOTE_PORT": rport})
        if proto.startswith("TCP"):
            env.update({"TCPREMOTEIP": rhost, "TCPREMOTEPORT": rport,
                        "TCPLOCALIP": lhost, "TCPLOCALPORT": lport})
    env.update(service.env)
    return env


def _login_env(service: Service) -> dict[str, str]:
    """What every program starts with, before the connection and the service's env."""
    return {"PATH": BASE_PATH, "HOME": service.home, "USER": service.user_name,
            "LOGNAME": service.user_name, "SHELL": "/bin/sh"}


def preloader_env(service: Service) -> dict[str, str]:
    """A preloader's own environment: a program's, without the connection's variables
    (so the interpreter starts as an exec'd one would: PYTHON* from ``env`` apply)."""
    return {**_login_env(service), **dict(service.env)}


def _stderr_fd(service: Service) -> int | None:
    """Where the program's fd 2 goes: the log's fd if the service routes it there, else the
    connection (None)."""
    return log.log_fd() if service.stderr is StderrRoute.LOG else None


def spawn_program(service: Service, sock: socket.socket, peer: str, local: str) -> int:
    """posix_spawn ``service.program`` on ``sock``; returns its pid, raises OSError.

    ``sock`` is made blocking (O_NONBLOCK is shared by every dup, and programs
    expect a blocking socket) and stays the caller's: close it once this
    returns, on every path.
    """
    assert service.program is not None
    sock.setblocking(True)
    return spawn.launch(service.program, service.argv, connection_env(service, peer, local),
                        sock.fileno(), _stderr_fd(service), _launch_rlimits(service))


def exec_program(service: Service, sock: socket.socket, peer: str, local: str) -> int:
    """Become ``service.program`` on ``sock`` (a classic child). Returns only if exec failed.

    Then ``exec_failed`` is logged (through the log's own fd: fds 0-2 are the
    client's by then) and EX_EXEC_FAILED is returned for the child to exit with.
    """
    assert service.program is not None
    env = connection_env(service, peer, local)
    sock.setblocking(True)
    spawn.restore_fd_limit()
    saved_log = os.dup(log.log_fd())  # close-on-exec: only used if the exec fails
    try:
        for res, value in service_rlimits(service):  # prepare_process raised the hard limits
            try:
                resource.setrlimit(res, (value, value))
            except ValueError as exc:
                raise OSError(errno.EINVAL, f"resource limit: {exc}") from exc
        spawn.exec_in_place(service.program, service.argv, env, sock.fileno(),
                            _stderr_fd(service))
    except OSError as exc:
        os.dup2(saved_log, 2)  # fd 2 is the client's socket now: log to the real log
        log_exec_failed(service, os.getpid(), exc)
    return EX_EXEC_FAILED


def log_exec_failed(service: Service, pid: int, exc: OSError, peer: str | None = None) -> None:
    """``exec_failed`` for a program that could not be started (``peer`` where known)."""
    where = {} if peer is None else {"peer": peer}
    log.error("exec_failed", service=service.name, pid=pid, **where, program=service.program,
              errno=errno.errorcode.get(exc.errno or 0, "?"), error=exc.strerror)


def log_program_exit(name: str, pid: int, code: int, duration: float, log_connections: bool,
                     peer: str | None = None) -> None:
    """``program_exit`` for a reaped program: always when it failed, else only when
    connections are logged (``peer`` where the reaper knows it)."""
    if not log_connections and code == 0:
        return
    where = {} if peer is None else {"peer": peer}
    log.event(log.INFO if code == 0 else log.WARNING, "program_exit", service=name,
              pid=pid, **where, status=code, duration=round(duration, 6))
