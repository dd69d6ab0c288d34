"""Classic mode: inetd's fork-per-connection dispatch on poolinetd's own modules.

Touches the OS: accept, fork, exec, waitpid. Same parser, listeners,
signals, privileges and built-ins as pool mode; only dispatch differs, which
is what makes ``benchmarks/`` a fair comparison and makes this a real
fallback for a service that must not share a long-lived process.

* nowait: the master accepts and forks; the child drops privileges and runs
  the built-in or execs the program with the socket on fds 0, 1, 2.
* wait: the child gets the listening (or bound datagram) socket on fd 0; the
  master stops polling it until that child exits.
* datagram built-ins are answered by the master itself (as inetd does),
  behind the loop guard.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson

from poolinetd import control, internal, listeners, log, privileges, reloadplan, spawn, worker
from poolinetd.admission import Admission
from poolinetd.signals import SignalPipe
from poolinetd.spec import Service, SocketType, StderrRoute

EMFILE_PAUSE = 1.0
FAST_STOP_TIMEOUT = 2.0


@dataclass(slots=True, eq=False)
class _Listener:
    sock: socket.socket
    service: Service
    bound: listeners.Bound
    polled: bool = False
    lent_to: int = 0  # pid of the wait child holding it


@dataclass(slots=True, eq=False)
class _ServiceState:
    service: Service
    listeners: list[_Listener] = field(default_factory=list)
    children: set[int] = field(default_factory=set)
    paused_until: float = 0.0
    accepted: int = 0
    retired: bool = False  # removed or replaced by a reload; its children run on
    refused: int = 0
    admission: Admission = field(init=False)
    predecessors: list[_ServiceState] = field(default_factory=list)  # still-busy older ones

    def __post_init__(self) -> None:
        self.admission = Admission(self.service.limits)

    @property
    def resting_until(self) -> float:
        return max(self.paused_until, self.admission.paused_until)


class Classic:
    """The fork-per-connection server. Owns the listeners it is given and closes them."""

    def __init__(self, services: list[tuple[Service, list[socket.socket]]], *,
                 ready_fd: int | None = None, title: str = "poolinetd: master (classic)",
                 graceful_timeout: float = 30.0, log_connections: bool = False,
                 control_path: str | None = None,
                 load_config: reloadplan.LoadConfig | None = None,
                 open_sockets: Callable[[Service], list[socket.socket]] | None = None) -> None:
        self.ready_fd = ready_fd
        self.load_config = load_config
        self.open_sockets = open_sockets
        self.started = time.time()
        self.reloads = 0
        self.title = title
        self.graceful_timeout = graceful_timeout
        self.log_connections = log_connections
        self.sel = selectors.DefaultSelector()
        self.sigpipe = SignalPipe()
        self.sigpipe.install([signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT,
                              signal.SIGUSR1, signal.SIGHUP])
        self.sel.register(self.sigpipe.reader, selectors.EVENT_READ, self.sigpipe)
        self.states: list[_ServiceState] = []
        # pid -> (service, lent listener, start time, peer IP)
        self.children: dict[int, tuple[_ServiceState, _Listener | None, float, str]] = {}
        self.stopping = False
        self.stop_deadline = 0.0
        for service, socks in services:
            self._add_state(service, socks)
        self.internal_ports = self._internal_ports()
        self.control = control.ControlServer(control_path, self) if control_path else None
        if self.control is not None:
            self.sel.register(self.control.sock, selectors.EVENT_READ, self.control)

    def _add_state(self, service: Service, socks: list[socket.socket]) -> _ServiceState:
        state = _ServiceState(service)
        for sock in socks:
            state.listeners.append(_Listener(sock, service, listeners.bound_address(sock)))
        self.states.append(state)
        return state

    def _internal_ports(self) -> frozenset[int]:
        return internal.guarded_ports(lst.bound.port for s in self.states
                                      if s.service.internal is not None for lst in s.listeners)

    def run(self) -> int:
        spawn.set_title(self.title)
        for state in self.states:
            for lst in state.listeners:
                log.info("listening", service=state.service.name, family=lst.bound.family,
                         address=lst.bound.address, port=lst.bound.port, mode="classic")
            self._update(state)
        self._report_ready()
        while not (self.stopping and not self.children):
            timeout = self._timeout()
            for key, mask in self.sel.select(timeout):
                if key.data is self.sigpipe:
                    self._on_signals()
                elif isinstance(key.data, control.ControlServer):
                    key.data.on_accept(self.sel)
                elif isinstance(key.data, control.ControlConn):
                    key.data.on_event(self.sel, mask)
                else:
                    lst = key.data
                    assert isinstance(lst, _Listener)
                    self._on_listener(lst)
            now = time.monotonic()
            if self.control is not None:
                self.control.expire(self.sel, now)
            if self.stopping and now >= self.stop_deadline:
                for pid in self.children:
                    _kill(pid, signal.SIGKILL)
                self.stop_deadline = now + 0.5
            for state in self.states:
                self._update(state)
        self._close()
        log.info("stopped", pid=os.getpid())
        return 0

    def _timeout(self) -> float | None:
        now = time.monotonic()
        times = [s.resting_until for s in self.states if s.resting_until > now]
        if self.control is not None and (deadline := self.control.next_deadline()) is not None:
            times.append(deadline)
        if self.stopping:
            times.append(min(self.stop_deadline, now + 0.5))
        return max(0.0, min(times) - now) if times else None

    def _report_ready(self) -> None:
        if self.ready_fd is None:
            return
        report = [{"service": s.service.name, "family": lst.bound.family,
                   "address": lst.bound.address, "port": lst.bound.port,
                   "socket_type": s.service.socket_type.value,
                   "source": f"{s.service.spec.source}:{s.service.spec.lineno}"}
                  for s in self.states for lst in s.listeners]
        try:
            os.write(self.ready_fd, orjson.dumps({"pid": os.getpid(), "mode": "classic",
                                                  "listeners": report}) + b"\n")
            os.close(self.ready_fd)
        except OSError as exc:
            log.warning("ready_fd_failed", fd=self.ready_fd, error=exc.strerror)
        self.ready_fd = None

    def _update(self, state: _ServiceState) -> None:
        """Poll a listener only while its service may start another child."""
        limit = state.service.limits.max_child
        can = (not self.stopping and not state.retired
               and state.resting_until <= time.monotonic()
               and not (limit and len(state.children)
                        + sum(len(p.children) for p in state.predecessors) >= limit))
        for lst in state.listeners:
            want = can and not lst.lent_to
            if state.service.internal is not None and state.service.socket_type is SocketType.DGRAM:
                want = not self.stopping and not state.retired  # answered here, never forked
            if want != lst.polled:
                if want:
                    self.sel.register(lst.sock, selectors.EVENT_READ, lst)
                else:
                    self.sel.unregister(lst.sock)
                lst.polled = want

    def _on_listener(self, lst: _Listener) -> None:
        state = next((s for s in self.states if lst in s.listeners), None)
        if state is None or lst.sock.fileno() < 0:
            return  # a stale event for a listener a stop or reload closed in this batch
        service = state.service
        if service.internal is not None and service.socket_type is SocketType.DGRAM:
            worker.DgramResponder(lst.sock, service, self.internal_ports).on_readable()
        elif service.wait or service.socket_type is SocketType.DGRAM:
            lst.polled = False
            self.sel.unregister(lst.sock)
            pid = self._fork(state, lst.sock, "", "", lst)
            if pid:
                lst.lent_to = pid
        else:
            try:
                conn, addr = lst.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    state.paused_until = time.monotonic() + EMFILE_PAUSE
                    log.error("accept_failed", service=service.name, error=exc.strerror)
                return
            ip = addr[0] if isinstance(addr, tuple) else ""
            try:
                why = state.admission.check(ip, time.monotonic()) if state.admission.active else ""
                if why:
                    state.refused += 1
                    if state.admission.looping:
                        log.error("service_looping", service=service.name,
                                  limit=service.limits.max_spawn_per_min)
                    else:
                        log.warning("conn_refused", service=service.name, peer=ip, reason=why)
                else:
                    self._fork(state, conn, worker.format_addr(addr), ip, None)
            finally:
                conn.close()
        self._update(state)

    def _fork(self, state: _ServiceState, sock: socket.socket, peer: str, ip: str,
              lst: _Listener | None) -> int:
        service = state.service
        fd = sock.fileno()
        try:
            keep = [fd, log.log_fd()]  # the log file too, if any, for the child's own errors
            pid = spawn.fork_child(lambda: self._child(service, fd, peer), keep)
        except OSError as exc:
            log.error("fork_failed", service=service.name, error=exc.strerror)
            state.paused_until = time.monotonic() + EMFILE_PAUSE
            return 0
        state.children.add(pid)
        state.accepted += 1
        state.admission.started(ip)
        self.children[pid] = (state, lst, time.monotonic(), ip)
        return pid

    def _child(self, service: Service, fd: int, peer: str) -> int:
        """In the forked child: drop privileges, then serve ``fd`` (never returns to the loop)."""
        spawn.set_title(f"poolinetd: {service.name} {peer.replace(' ', ':') or 'wait'}")
        try:
            privileges.drop(service.uid, service.gid, service.groups)
        except privileges.PrivilegeError as exc:
            log.error("privileges_failed", service=service.name, pid=os.getpid(), error=str(exc))
            return spawn.EX_WORKER_BOOT
        sock = socket.socket(fileno=fd)
        if service.internal is not None:
            internal.serve_blocking(sock, service.internal, service.conn_timeout)
            sock.close()
            return 0
        assert service.program is not None
        local = worker.format_addr(sock.getsockname()) if peer else ""
        env = worker.connection_env(service, peer, local)
        sock.setblocking(True)
        spawn.restore_fd_limit()
        os.setsid()
        saved_log = os.dup(log.log_fd())  # close-on-exec: only used if exec fails
        os.dup2(fd, 0)
        os.dup2(fd, 1)
        os.dup2(log.log_fd() if service.stderr is StderrRoute.LOG else fd, 2)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        try:
            os.execve(service.program, list(service.argv), env)
        except OSError as exc:
            os.dup2(saved_log, 2)  # fd 2 is the client's socket now: log to the real log
            log.error("exec_failed", service=service.name, pid=os.getpid(),
                      program=service.program, errno=errno.errorcode.get(exc.errno or 0, "?"),
                      error=exc.strerror)
        return 127

    def _on_signals(self) -> None:
        for sig in self.sigpipe.drain():
            if sig == signal.SIGCHLD:
                self._reap()
            elif sig == signal.SIGTERM:
                self._begin_stop(self.graceful_timeout)
            elif sig in (signal.SIGINT, signal.SIGQUIT):
                self._begin_stop(FAST_STOP_TIMEOUT)
                for pid in self.children:
                    _kill(pid, signal.SIGTERM)
            elif sig == signal.SIGUSR1:
                log.reopen()
            elif sig == signal.SIGHUP:
                self.reload()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            entry = self.children.pop(pid, None)
            if entry is None:
                continue
            state, lst, started, ip = entry
            state.children.discard(pid)
            state.admission.ended(ip)
            if state.retired and not state.children and state in self.states:
                self.states.remove(state)
            if lst is not None:
                lst.lent_to = 0
                if lst.sock.fileno() >= 0:  # a stop or reload may have closed it meanwhile
                    lst.sock.setblocking(False)
            code = os.waitstatus_to_exitcode(status)
            if self.log_connections or code != 0:
                log.event(20 if code == 0 else 30, "program_exit", service=state.service.name,
                          pid=pid, status=code, duration=round(time.monotonic() - started, 6))

    def _begin_stop(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if self.stopping:
            self.stop_deadline = min(self.stop_deadline, deadline)
            return
        self.stopping = True
        self.stop_deadline = deadline
        log.info("stopping", timeout=timeout, children=len(self.children))
        for state in self.states:
            self._update(state)
            for lst in state.listeners:
                listeners.close_listener(lst.sock)
            state.listeners = []

    def reload(self) -> bool:
        """Re-read the config and apply it all or nothing; running children are never cut."""
        if self.load_config is None or self.open_sockets is None or self.stopping:
            return False
        prepared = reloadplan.prepare(
            self.load_config,
            {s.service.key: (s, s.service) for s in self.states if not s.retired},
            self.open_sockets, self._release_listeners)
        if prepared is None:
            return False
        diff, services, opened = prepared
        for service, socks in opened:
            self._add_state(service, socks)
        for old, service in diff.changed:
            new = self._add_state(service, [])
            # Limits span generations: running children and per-IP counts carry over.
            new.predecessors = [p for p in (old, *old.predecessors) if p.children]
            new.admission = old.admission
            new.admission.update(service.limits)
            for lst in old.listeners:
                lst.service = service
                new.listeners.append(lst)
            old.listeners = []
            old.retired = True
        for state in diff.removed:
            state.retired = True
            for lst in state.listeners:
                if lst.polled:
                    self.sel.unregister(lst.sock)
                    lst.polled = False
                listeners.close_listener(lst.sock)
            state.listeners = []
        order = {s.key: i for i, s in enumerate(services)}
        self.states = [s for s in self.states if not s.retired or s.children]
        self.states.sort(key=lambda s: (s.retired, order.get(s.service.key, 0)))
        self.internal_ports = self._internal_ports()
        self.reloads += 1
        log.info("reloaded", added=len(diff.added), changed=len(diff.changed),
                 removed=len(diff.removed), unchanged=diff.unchanged)
        return True

    def _release_listeners(self, state: _ServiceState) -> Callable[[], None]:
        """Close a removed service's listeners ahead of the reload; returns how to reopen."""
        for lst in state.listeners:
            if lst.polled:
                self.sel.unregister(lst.sock)
                lst.polled = False
            listeners.close_listener(lst.sock)
        state.listeners = []

        def restore() -> None:
            assert self.open_sockets is not None
            try:
                socks = self.open_sockets(state.service)
            except listeners.ListenError as exc:
                log.error("restore_failed", service=state.service.name, error=str(exc))
                return
            state.listeners = [_Listener(s, state.service, listeners.bound_address(s))
                               for s in socks]

        return restore

    def status(self) -> dict[str, object]:
        """The same document as pool mode's status; classic has no workers to count."""
        services = [{
            "service": s.service.name,
            "source": f"{s.service.spec.source}:{s.service.spec.lineno}",
            "state": ("retiring" if s.retired else "paused" if s.resting_until > time.monotonic()
                      else "serving"),
            "listeners": [str(lst.bound) for lst in s.listeners],
            "workers": {"booting": 0, "idle": 0, "busy": len(s.children), "draining": 0},
            "pool_min": 0, "pool_max": 0, "accepted": s.accepted, "refused": s.refused,
            "active": len(s.children), "programs": len(s.children), "restarts": 0,
            "boot_failures": 0, "retry_in": 0.0, "last_error": "",
        } for s in self.states]
        uptime = round(time.time() - self.started, 3)
        return {"pid": os.getpid(), "mode": "classic", "uptime": uptime,
                "reloads": self.reloads, "stopping": self.stopping, "services": services}

    def _close(self) -> None:
        for state in self.states:
            for lst in state.listeners:
                if lst.polled:
                    self.sel.unregister(lst.sock)
                listeners.close_listener(lst.sock)
            state.listeners = []
        if self.control is not None:
            self.control.close(self.sel)
        self.sel.unregister(self.sigpipe.reader)
        self.sigpipe.close()
        self.sel.close()


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
