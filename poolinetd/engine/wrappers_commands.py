"""tcp_wrappers' ``spawn`` and ``twist`` commands in the master: started, counted, capped,
reaped. The commands themselves run in children (``launch/wrapcmd.py``: forked,
dropped to the service's user, ``/bin/sh -c``).

Touches the OS only through the ``Fork`` it is given (a fork is the one
system call on the engine's loop here; nothing waits for a command). The
engine's SIGCHLD reaping hands every pid to ``child_exited``.

Bounds: at most MAX_PER_SERVICE commands (spawn and twist together) run
for one service (by name, over its generations), MAX_PER_SOURCE of them for
one client address, and MAX_RUNNING over all, so a command that never ends,
or a flood of clients that each start one, cannot fill the process table
from the root master, and one client cannot hold a service's slots (a
command counts until its last process has exited: launch/wrapcmd.py keeps
backgrounded ones below it); and at most MAX_STARTS_PER_SECOND start per
service, MAX_STARTS_PER_SECOND_TOTAL over all, in any one-second window,
since each start costs the master's loop a fork (about 1-2 ms of its CPU,
measured), so a flood of clients whose rules spawn a quick command cannot
keep the loop forking. Past a bound a spawn is not run and a twisted connection is refused
(``tcp_wrappers_busy``); a ``wrappers_command_refused`` line says which
bound, at most once per service and kind every REFUSED_LOG_INTERVAL
seconds.

Twisted connections are not instances of the service (the ledger does not
count them: max_child and per-source limits stop at the accept, as the
connection was admitted before the rules ran); the caps above bound them.
A stop does not kill running commands (tcpd's children outlive inetd too).
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from poolinetd.config.spec import Service
from poolinetd.launch import wrapcmd
from poolinetd.observe import log, throttle

MAX_PER_SERVICE = 32  # commands running at once for one service
MAX_RUNNING = 256  # ... over every service
MAX_STARTS_PER_SECOND = 64  # commands started per service in one one-second window
MAX_STARTS_PER_SECOND_TOTAL = 128  # ... over every service (each is a fork of the master)
MAX_PER_SOURCE = 4  # commands running at once for one client address, per service
_K = TypeVar("_K")
REFUSED_LOG_INTERVAL = 10.0  # seconds between two wrappers_command_refused per service, kind


@dataclass(slots=True)
class Running:
    """One command the master started and has not reaped."""

    service: str
    kind: wrapcmd.Kind
    peer: str
    started: float


class Commands:
    """The spawn and twist children of every wrapped service."""

    def __init__(self, fork: wrapcmd.Fork, clock: Callable[[], float],
                 log_connections: bool) -> None:
        self.fork = fork
        self.clock = clock
        self.log_connections = log_connections
        self.running: dict[int, Running] = {}
        self.per_service: dict[str, int] = {}
        self.window = 0.0  # when the current one-second window started
        self.started: dict[str, int] = {}  # starts per service in this window
        self.started_total = 0  # ... over every service
        self.per_source: dict[tuple[str, str], int] = {}  # (service, client host) -> running
        self.log_throttle = throttle.Throttle(REFUSED_LOG_INTERVAL)

    def __len__(self) -> int:
        return len(self.running)

    def start(self, kind: wrapcmd.Kind, name: str, service: Service, command: str,
              env: dict[str, str], peer: str, conn_fd: int = -1) -> bool:
        """Start ``command`` for service ``name`` unless a cap is reached; True if started.

        ``conn_fd`` (TWIST): the client's connection, still the caller's to close."""
        now = self.clock()
        if now - self.window >= 1.0:
            self.window = now
            self.started.clear()
            self.started_total = 0
        held = self.per_service.get(name, 0)
        rate = self.started.get(name, 0)
        source = (name, _host(peer))
        if held >= MAX_PER_SERVICE or len(self.running) >= MAX_RUNNING:
            why = "running"
        elif self.per_source.get(source, 0) >= MAX_PER_SOURCE:
            why = "source"
        elif rate >= MAX_STARTS_PER_SECOND or self.started_total >= MAX_STARTS_PER_SECOND_TOTAL:
            why = "rate"
        else:
            why = ""
        if why:
            late = self.log_throttle.allow((name, kind.value), now)
            if late is not None:
                log.warning("wrappers_command_refused", service=name, kind=kind.value,
                            peer=peer, reason=why, running=held, limit=MAX_PER_SERVICE,
                            running_total=len(self.running), limit_total=MAX_RUNNING,
                            per_second=MAX_STARTS_PER_SECOND, held_back=late)
            return False
        self.started[name] = rate + 1
        self.started_total += 1
        try:
            pid = wrapcmd.run(self.fork, kind, service, command, env, conn_fd)
        except OSError as exc:
            log.error("wrappers_command_failed", service=name, kind=kind.value, peer=peer,
                      errno=errno.errorcode.get(exc.errno or 0, "?"), error=exc.strerror)
            return False
        self.running[pid] = Running(name, kind, peer, now)
        self.per_service[name] = held + 1
        self.per_source[source] = self.per_source.get(source, 0) + 1
        return True

    def child_exited(self, pid: int, code: int) -> bool:
        """Whether reaped ``pid`` was a command; logs how it ended."""
        cmd = self.running.pop(pid, None)
        if cmd is None:
            return False
        _release(self.per_service, cmd.service)
        _release(self.per_source, (cmd.service, _host(cmd.peer)))
        if code != 0 or self.log_connections:
            why = {wrapcmd.EX_NOPERM: "could not become the service's user",
                   wrapcmd.EX_EXEC_FAILED: f"could not run {wrapcmd.SHELL}"}.get(code)
            log.event(log.INFO if code == 0 else log.WARNING, "wrappers_command_exit",
                      service=cmd.service, kind=cmd.kind.value, pid=pid, peer=cmd.peer,
                      status=code, duration=round(self.clock() - cmd.started, 6),
                      **({"reason": why} if why else {}))
        return True

    def pids(self) -> Iterable[int]:
        """The commands still running (tests, status)."""
        return tuple(self.running)


def _host(peer: str) -> str:
    """The client's address in a peer text ("HOST PORT", "" for unix)."""
    return peer.rsplit(" ", 1)[0]


def _release(counts: dict[_K, int], key: _K) -> None:
    """One fewer running under ``key`` (forgotten at zero, so the table stays small)."""
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
