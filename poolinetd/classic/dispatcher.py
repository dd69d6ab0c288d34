"""Classic mode: inetd's fork per connection, on the same engine as the pool.

Touches the OS: fork (through the engine's ``System``); in the child:
privilege drop, the built-in or the exec. Only dispatch differs from pool
mode, which is what makes ``benchmarks/`` a fair comparison and makes this a
real fallback for a service that must not share a long-lived process.

* nowait: the engine accepts; a child drops privileges and serves the
  built-in or execs the program with the socket on fds 0, 1, 2
  (``launch.program``: the same contract as a pool worker's programs).
* wait: the child gets the listening (or bound datagram) socket on fd 0;
  the engine stops polling it until that child exits, as inetd does.
* datagram built-ins: a child drops privileges and answers what is queued,
  then exits (the engine polls again): a datagram reply must never carry
  more privilege than the service's user. (daytime and time over a
  connection are answered by the engine itself in both modes, before any
  dispatcher: a fixed reply of a few bytes, see docs/security.md.)

fd ownership: a child gets its own copy of the connection or listener by
fork and keeps only that and the log; the engine's copies stay the engine's.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from dataclasses import dataclass, replace

from poolinetd.builtins import dgram, internal
from poolinetd.config.spec import Service, SocketType
from poolinetd.engine.dispatch import Hooks
from poolinetd.engine.runtime import Listener, ServiceRuntime
from poolinetd.launch import program, spawn
from poolinetd.launch.system import System
from poolinetd.observe import log, syslog

CLASSIC_SOURCE_SHARE = 256  # children one source may hold by default (see ForkDispatcher)
_DGRAM_BATCHES = 16  # a datagram child answers at most this many batches, then exits
# A datagram child's exit status when it logged a refusal: the next child, forked
# with the time of that line, keeps the once-an-interval throttle across children.
DGRAM_LOGGED = 10
DGRAM_LOG_INTERVAL = 60.0
_SOCK_TYPES = {SocketType.STREAM: socket.SOCK_STREAM, SocketType.SEQPACKET: socket.SOCK_SEQPACKET,
               SocketType.DGRAM: socket.SOCK_DGRAM}


@dataclass(slots=True, eq=False)
class Child:
    """A forked child and the instance it serves."""

    iid: int
    rt: ServiceRuntime
    started: float
    program: bool  # it execs a program (else it serves a built-in)


class ForkDispatcher:
    """A child per connection (or per loan); see the module docstring."""

    mode = "classic"
    lends_per_burst = True  # a datagram built-in's socket goes to a child per burst
    # One source may hold at most this many children under the safe default
    # (max_child_per_ip not written): each is a fork in the master's loop, so a
    # source holding 1,024 (the pool's share) kept everyone else waiting 6 s on
    # this 2-core machine; 256 are forked well within 2 s (tests/test_attack_remote.py).
    source_share_cap: int | None = CLASSIC_SOURCE_SHARE

    def __init__(self, system: System | None = None) -> None:
        self.system = system or System()
        self.children: dict[int, Child] = {}
        self.guard_logged: dict[str, float] = {}  # service -> when a child last logged
        self.hooks: Hooks

    def attach(self, hooks: Hooks) -> None:
        self.hooks = hooks

    # -- services: nothing to prepare, nothing kept ready -------------------------
    def add(self, rt: ServiceRuntime) -> None:
        pass

    def retire(self, rt: ServiceRuntime) -> None:
        pass  # its children run on; they are counted until they exit

    def holds(self, rt: ServiceRuntime) -> bool:
        return any(child.rt is rt for child in self.children.values())

    def maintain(self, rt: ServiceRuntime, now: float) -> None:
        pass

    def can_take(self, rt: ServiceRuntime) -> bool:
        return True  # the engine's max_child is the only cap: a fork per connection

    def ready(self, rt: ServiceRuntime) -> bool:
        return True

    def failing(self, rt: ServiceRuntime) -> bool:
        return False

    # -- dispatch -------------------------------------------------------------------
    def hand_off(self, rt: ServiceRuntime, fd: int, family: int, peer: str, iid: int,
                 local: str = "", env: tuple[tuple[str, str], ...] = ()) -> bool:
        service = rt.service
        log_connections = self.hooks.log_connections
        forked = False
        try:
            forked = self._fork(rt, iid, fd, service.program is not None,
                                lambda: _serve_connection(service, fd, family, peer,
                                                          log_connections, local, env))
            return forked
        finally:
            if forked:
                os.close(fd)  # the child has its own copy
            else:  # the last copy: never blocking (a unix one may carry passed fds)
                self.hooks.release(fd, family)

    def flush(self) -> None:
        pass  # each connection was forked for at once

    def lend(self, rt: ServiceRuntime, lst: Listener, iid: int,
             env: tuple[tuple[str, str], ...] = ()) -> bool:
        service = rt.service
        fd = lst.sock.fileno()
        if service.internal is not None:  # a datagram built-in
            ports = self.hooks.internal_ports
            logged = self.guard_logged.get(rt.name)
            return self._fork(rt, iid, fd, False,
                              lambda: _answer_datagrams(service, fd, ports, logged))
        return self._fork(rt, iid, fd, True,
                          lambda: _serve_connection(service, fd, 0, "", False, "", env))

    def _fork(self, rt: ServiceRuntime, iid: int, fd: int, execs: bool,
              body: spawn.Body) -> bool:
        """Fork ``body`` keeping ``fd`` (and the log); ``execs``: the child becomes a program."""
        keep = [fd]
        if log.log_fd() > 2:
            keep.append(log.log_fd())  # the child's own errors go to the log
        keep.extend(syslog.child_fds())  # ... and to syslog, with --syslog
        try:
            pid = self.system.fork(body, keep)
        except OSError as exc:
            log.error("fork_failed", service=rt.name, error=exc.strerror)
            self.hooks.rest(rt, f"fork: {exc.strerror}")
            return False
        self.children[pid] = Child(iid, rt, self.system.clock(), execs)
        if execs:
            self.hooks.program_started(iid, pid)
        return True

    def child_exited(self, pid: int, code: int) -> bool:
        child = self.children.pop(pid, None)
        if child is None:
            return False
        if child.program:
            duration = self.system.clock() - child.started
            child.rt.stats.program_exit(code, duration)
            program.log_program_exit(child.rt.name, pid, code, duration,
                                     self.hooks.log_connections)
        elif code == DGRAM_LOGGED and child.rt.lends:
            self.guard_logged[child.rt.name] = time.monotonic()
        elif code != 0:
            log.warning("child_exit", service=child.rt.name, pid=pid, status=code)
        self.hooks.ended(child.iid)
        return True

    def sweep(self, now: float) -> None:
        pass

    def dgram_log_due(self, rt: ServiceRuntime, now: float) -> int | None:
        """Whether a dgram_refused line for ``rt`` may be logged now (the throttle its
        datagram children keep too, once a minute); None to hold it back."""
        last = self.guard_logged.get(rt.name)
        wall = time.monotonic()
        if last is not None and wall - last < DGRAM_LOG_INTERVAL:
            return None
        self.guard_logged[rt.name] = wall
        return 0

    def report(self, rt: ServiceRuntime, now: float) -> dict[str, object]:
        busy = sum(1 for child in self.children.values() if child.rt is rt)
        return {"workers": {"booting": 0, "idle": 0, "busy": busy, "draining": 0, "stalled": 0},
                "pool_min": 0, "pool_max": 0, "restarts": 0, "boot_failures": 0,
                "retry_in": 0.0}

    # -- stop --------------------------------------------------------------------------
    def begin_stop(self, fast: bool) -> None:
        if fast:
            for pid in self.children:
                self.system.kill(pid, signal.SIGTERM)

    def kill_remaining(self) -> None:
        for pid in self.children:
            self.system.kill(pid, signal.SIGKILL)

    def busy(self) -> bool:
        return bool(self.children)

    def abandon(self) -> list[int]:
        pids = sorted(self.children)
        self.children.clear()
        return pids

    def reopen_log(self) -> None:
        pass  # children are forked after the reopen and inherit the new file

    def resize(self, rt: ServiceRuntime, delta: int) -> int | None:
        return None

    def close(self) -> None:
        pass


def _drop(service: Service) -> bool:
    """In the child: set the program's process controls (as root: they may raise hard limits)
    and become the service's user; False (logged) if it cannot serve."""
    failed = program.prepare_process(service, pooled=False)
    if failed is None:
        failed = program.drop_privileges(service)
    if failed is not None:
        log.error("privileges_failed", service=service.name, pid=os.getpid(), error=failed)
        return False
    return True


def _serve_connection(service: Service, fd: int, family: int, peer: str,
                      log_connections: bool, local: str,
                      env: tuple[tuple[str, str], ...] = ()) -> int:
    """In the child: drop privileges, then serve ``fd`` (a connection, or a wait listener).

    ``local``: the address the client connected to, when a PROXY header said it;
    ``env``: tcp_wrappers' setenv pairs, after the service's own ``env``.
    """
    spawn.set_title(f"poolinetd: {service.name} {peer.replace(' ', ':') or 'wait'}")
    if not _drop(service):
        return spawn.EX_WORKER_BOOT
    sock = socket.socket(family or -1, _SOCK_TYPES.get(service.socket_type, -1), 0, fileno=fd)
    if service.internal is not None:
        started = time.monotonic()
        bytes_in, bytes_out = internal.serve_blocking(sock, service.internal,
                                                      service.conn_timeout)
        sock.close()
        if log_connections:
            log.info("conn_end", service=service.name, pid=os.getpid(), peer=peer,
                     status="done", duration=round(time.monotonic() - started, 6),
                     bytes_in=bytes_in, bytes_out=bytes_out)
        return 0
    if peer:  # (a lent wait listener has no peer, and its program no local address)
        local = program.local_address(sock, local)
    if env:  # this child's copy only: the program's environment ends with service.env
        service = replace(service, env=service.env + env)
    return program.exec_program(service, sock, peer, local)


def _answer_datagrams(service: Service, fd: int, internal_ports: frozenset[int],
                      logged: float | None) -> int:
    """In the child: drop privileges, answer the queued datagrams, exit.

    ``logged``: when an earlier child last logged a refusal (the log throttle
    spans children); exits DGRAM_LOGGED if this one logged one.
    """
    spawn.set_title(f"poolinetd: {service.name} datagrams")
    if not _drop(service):
        return spawn.EX_WORKER_BOOT
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    responder = dgram.DgramResponder(sock, service, internal_ports)
    if logged is not None:
        responder.last_guard_log = logged
    before = responder.last_guard_log
    for _ in range(_DGRAM_BATCHES):
        if responder.on_readable():
            break  # drained
    sock.detach()  # the engine's listener: the child's copy closes at exit anyway
    return DGRAM_LOGGED if responder.last_guard_log != before else 0
