"""The engine: the master's one thread and one selector loop, the same for both modes.

Touches the OS: select, accept, recv (preambles), signals, the control
socket; fork, waitpid and kill only through a ``System`` (system.py); how a
connection is served only through a ``Dispatcher`` (dispatch.py):
pooldispatch (pre-forked workers) or forkdispatch (a child per connection).

    Engine(services, dispatcher, ...).run() -> exit code

Each turn: select (timeout = the next deadline) -> one handler per event,
each behind the one error guard -> timers -> refresh the services whose
capacity changed (the dispatcher starts what they need; exactly the
listeners that can be served are polled).

The accept path, in order, for both modes:

1. accept, in bounded batches, only while the service has room (instances
   below max_child and the dispatcher able to take one): backpressure, so
   clients wait in the kernel backlog and a connection is never accepted
   without somewhere to go;
2. admission (admission.py, pure): a refused client is closed at once;
3. preamble (preamble.py), only where the service reads one: non-blocking
   peeks under a deadline, exact consumption, then admission again on the
   address it gave. With no preamble configured this stage costs nothing;
4. ``Dispatcher.hand_off``.

fd ownership: the engine owns every listener, the signal pipe and the
control socket. An accepted connection is the engine's from accept() until
``hand_off`` returns (the engine closes its copy then, on every path); one
in the preamble stage is the engine's until handed off or dropped. A lent
listener stays the engine's; it is only not polled while the loan lasts.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import os
import selectors
import signal
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from poolinetd import (
    adopt,
    control,
    internal,
    jsonsafe,
    listeners,
    log,
    metrics,
    metricshttp,
    reloadplan,
    spawn,
    stagetrace,
)
from poolinetd import preamble as pre
from poolinetd.admission import LOOPING_PAUSE, Admission
from poolinetd.dispatch import Dispatcher
from poolinetd.sdnotify import Notifier
from poolinetd.signals import SignalPipe
from poolinetd.spec import Service, SocketType
from poolinetd.system import System
from poolinetd.upgrade import EXIT_GRACE as UPGRADE_EXIT_GRACE
from poolinetd.upgrade import TIMEOUT as UPGRADE_TIMEOUT
from poolinetd.upgrade import Upgrade

_NEVER = float("inf")
ACCEPT_BATCH = 64  # connections accepted per readable event before other work runs
# For programs, fewer: each launch costs its worker an exec, and connections left
# in the kernel's FIFO backlog are served more fairly than ones queued in a
# worker (measured: /bin/cat at c=64, p99 80 -> 62-68 ms, 1,840 -> 2,100 conn/s).
ACCEPT_BATCH_PROGRAM = 4
EMFILE_PAUSE = 1.0  # seconds a listener rests after running out of fds (inetd sleeps 1 s too)
FAST_STOP_TIMEOUT = 2.0
REFUSAL_LOG_INTERVAL = 10.0  # at most one conn_refused line per service this often
KILL_PASSES = 10  # SIGKILL passes (0.5 s apart) before a stop gives up waiting
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

SIGNALS = (signal.SIGCHLD, signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT,
           signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU)


@dataclass(slots=True, eq=False)
class Listener:
    """One listening (or bound datagram) socket of a service; the engine owns ``sock``."""

    sock: socket.socket
    rt: ServiceRuntime
    bound: listeners.Bound
    polled: bool = False
    lent: int = 0  # the instance id of the loan holding it; 0 = not lent


@dataclass(slots=True, eq=False)
class Instance:
    """A connection or loan being served, counted until the dispatcher says it ended."""

    iid: int
    rt: ServiceRuntime
    ip: str
    started: float
    listener: Listener | None = None  # set for loans
    program_pid: int = 0


@dataclass(slots=True, eq=False)
class Pending:
    """A connection in the preamble stage; the engine owns ``sock`` until it moves on."""

    sock: socket.socket
    lst: Listener
    peer: tuple[str, int] | None
    reader: pre.Preamble
    deadline: float
    got: bytes = b""  # preamble bytes already taken off the socket


@dataclass(slots=True, eq=False)
class ServiceStats:
    """Counters of one service that live as long as the master, across reload generations
    (a Prometheus counter must never go back)."""

    accepted: int = 0
    refused: int = 0
    refused_by: dict[str, int] = field(default_factory=dict)
    builtin_bytes_in: int = 0
    builtin_bytes_out: int = 0
    program_exits: dict[str, int] = field(default_factory=dict)
    handoff: metrics.Histogram = field(
        default_factory=lambda: metrics.Histogram(metrics.HANDOFF_BUCKETS))
    program_run: metrics.Histogram = field(
        default_factory=lambda: metrics.Histogram(metrics.RUN_TIME_BUCKETS))

    def program_exit(self, code: int, seconds: float) -> None:
        """Count a program's exit: its exit code, or the signal's name (negative code)."""
        key = str(code) if code >= 0 else _signal_name(-code)
        self.program_exits[key] = self.program_exits.get(key, 0) + 1
        self.program_run.observe(seconds)


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


@dataclass(slots=True, eq=False)
class ServiceRuntime:
    """Everything the engine tracks for one generation of one service."""

    service: Service
    listeners: list[Listener] = field(default_factory=list)
    instances: int = 0  # connections and loans being served
    programs: int = 0  # of those, how many a program serves
    pending: int = 0  # connections in the preamble stage
    admission: Admission = field(init=False)
    paused_until: float = 0.0  # EMFILE rest
    retired: bool = False  # removed or replaced by a reload: takes nothing new
    predecessors: list[ServiceRuntime] = field(default_factory=list)  # older, still busy
    successor: ServiceRuntime | None = None  # the generation that replaced this one
    preamble: Callable[[], pre.Preamble] | None = None  # a reader per connection, if any
    # A one-shot built-in (daytime, time) answered by the engine itself: its reply.
    reply: Callable[[], bytes] | None = None
    stats: ServiceStats = field(default_factory=ServiceStats)
    last_error: str = ""
    last_refusal_log: float = -REFUSAL_LOG_INTERVAL

    def __post_init__(self) -> None:
        self.admission = Admission(self.service.limits)

    @property
    def name(self) -> str:
        return self.service.name

    @property
    def lends(self) -> bool:
        """Whether its listeners are lent (wait services, datagram built-ins), not accepted on."""
        return self.service.wait or self.service.socket_type is SocketType.DGRAM

    @property
    def resting_until(self) -> float:
        """Until when its listeners rest (EMFILE pause, or the looping rule)."""
        return max(self.paused_until, self.admission.paused_until)

    def at_max_child(self) -> bool:
        limit = self.service.limits.max_child
        if not limit:
            return False
        # Instances of older generations (before a reload changed the service)
        # still run and still count.
        running = self.instances + sum(p.instances for p in self.predecessors)
        return running >= limit


Opened = list[tuple[Service, list[socket.socket]]]


class Engine:
    """The master of either mode. Owns the sockets it is given and closes them."""

    def __init__(
        self,
        services: Opened,
        dispatcher: Dispatcher,
        *,
        system: System | None = None,
        load_config: reloadplan.LoadConfig | None = None,
        open_sockets: Callable[[Service], list[socket.socket]] | None = None,
        ready_fd: int | None = None,
        control_path: str | None = None,
        graceful_timeout: float = 30.0,
        log_connections: bool = False,
        title: str = "poolinetd: master",
        preambles: Callable[[Service], Callable[[], pre.Preamble] | None] | None = None,
        notifier: Notifier | None = None,
        watchdog_interval: float | None = None,
        metrics_sock: socket.socket | None = None,
        control_sock: socket.socket | None = None,
        upgrade_argv: list[str] | None = None,
        upgrade_cwd: str | None = None,
    ) -> None:
        self.system = system or System()
        stagetrace.open_from_env()  # before any worker is forked: they inherit it
        self.dispatcher = dispatcher
        self.load_config = load_config
        self.open_sockets = open_sockets
        self.ready_fd = ready_fd
        self.graceful_timeout = graceful_timeout
        self.log_connections = log_connections
        self.title = title
        self.preambles = preambles
        self.notifier = notifier
        self.watchdog_interval = watchdog_interval
        self.next_watchdog = 0.0 if watchdog_interval else _NEVER
        self.loop_turn = metrics.Histogram(metrics.LOOP_TURN_BUCKETS)
        self.sel: selectors.BaseSelector = selectors.DefaultSelector()
        self.sigpipe = SignalPipe()
        self.sigpipe.install(SIGNALS)
        self.sel.register(self.sigpipe.reader, selectors.EVENT_READ, self.sigpipe)
        self.runtimes: list[ServiceRuntime] = []
        self.instances: dict[int, Instance] = {}
        self.pending: dict[int, Pending] = {}  # by fd
        self.pending_order: collections.deque[Pending] = collections.deque()  # by deadline
        self.dirty: set[ServiceRuntime] = set()  # capacity changed this turn
        self.ids = itertools.count(1)
        self.next_sweep = 0.0
        self.stopping = False
        self.stop_deadline = 0.0
        self.kill_passes = 0
        self.ready_reported = False
        self.started = time.time()
        self.reloads = 0
        self.internal_ports: frozenset[int] = frozenset()
        self.upgrade_argv = upgrade_argv
        self.upgrade_cwd = upgrade_cwd
        self.upgrading: Upgrade | None = None
        self.handed_over = False  # an upgrade's new master serves now; we drain
        self.control = (control.ControlServer(control_path, self, control_sock)
                        if control_path else None)
        if self.control is not None:
            self.sel.register(self.control.sock, selectors.EVENT_READ, self.control)
        self.metrics = (metricshttp.MetricsServer(metrics_sock, self.sel, self.render_metrics,
                                                  self.system.clock)
                        if metrics_sock is not None else None)
        dispatcher.attach(self)
        for service, socks in services:
            self._add_runtime(service, socks)
        self.internal_ports = self._internal_ports()

    # -- setup ---------------------------------------------------------------
    def _add_runtime(self, service: Service, socks: list[socket.socket]) -> ServiceRuntime:
        rt = ServiceRuntime(service)
        rt.preamble = self.preambles(service) if self.preambles is not None else None
        if service.internal is not None:
            rt.reply = internal.engine_reply(service.internal, service.socket_type)
        for sock in socks:
            rt.listeners.append(Listener(sock, rt, listeners.bound_address(sock)))
        self.runtimes.append(rt)
        self.dispatcher.add(rt)
        self.dirty.add(rt)
        return rt

    def _internal_ports(self) -> frozenset[int]:
        return internal.guarded_ports(lst.bound.port for rt in self.runtimes
                                      if rt.service.internal is not None for lst in rt.listeners)

    def listener_report(self) -> list[dict[str, object]]:
        """What is listened on, in config order (for --ready-fd, startup log, status)."""
        return [{"service": rt.name, "family": lst.bound.family, "address": lst.bound.address,
                 "port": lst.bound.port, "socket_type": rt.service.socket_type.value,
                 "source": f"{rt.service.spec.source}:{rt.service.spec.lineno}"}
                for rt in self.runtimes if not rt.retired for lst in rt.listeners]

    # -- the loop --------------------------------------------------------------
    def run(self) -> int:
        """Serve until stopped; returns the exit code (0 after a clean stop)."""
        spawn.set_title(self.title)
        _become_subreaper()
        for rt in self.runtimes:
            for lst in rt.listeners:
                log.info("listening", service=rt.name, family=lst.bound.family,
                         address=lst.bound.address, port=lst.bound.port,
                         mode=self.dispatcher.mode)
        self._refresh_dirty()
        while not (self.stopping and not self.dispatcher.busy()):
            self.run_once()
        self._close_all()
        log.info("stopped", pid=os.getpid())
        return 0

    def run_once(self, max_wait: float | None = None) -> None:
        """One turn of the loop (``run`` repeats it; unit tests call it with ``max_wait``)."""
        if not self.ready_reported and self._all_ready():
            self._report_ready()
        timeout = self._next_timeout(self.system.clock())
        if max_wait is not None:
            timeout = max_wait if timeout is None else min(timeout, max_wait)
        events = self.sel.select(timeout)
        began = self.system.clock()
        for key, mask in events:
            try:
                self._on_event(key.data, mask)
            except Exception:  # the last line of defence: one event's bug
                # must not take every service down with the master.
                log.error("internal_error", traceback=traceback.format_exc())
        try:
            self._timers()
            self._refresh_dirty()
        except Exception:
            log.error("internal_error", traceback=traceback.format_exc())
        self.loop_turn.observe(self.system.clock() - began)

    def _on_event(self, data: object, mask: int) -> None:
        if isinstance(data, Listener):
            if data.polled:  # else a stale event: a stop or reload closed it in this batch
                self._on_listener(data)
        elif isinstance(data, Pending):
            self._on_pending(data)
        elif isinstance(data, Upgrade):
            self._on_upgrade_pipe(data)
        elif data is self.sigpipe:
            self._on_signals()
        elif isinstance(data, control.ControlServer):
            data.on_accept(self.sel)
        elif isinstance(data, control.ControlConn):
            data.on_event(self.sel, mask)
        else:
            handler = getattr(data, "on_event", None)  # a dispatcher's fd (a worker channel)
            if handler is not None:
                handler(mask)

    def _next_timeout(self, now: float) -> float | None:
        deadline = self.next_sweep
        if self.stopping:
            deadline = min(deadline, self.stop_deadline, now + 0.5)
        if self.pending_order:
            deadline = min(deadline, self.pending_order[0].deadline)
        deadline = min(deadline, self.next_watchdog)
        if self.upgrading is not None:
            deadline = min(deadline, self.upgrading.deadline)
        for server in (self.control, self.metrics):
            when = server.next_deadline() if server is not None else None
            if when is not None:
                deadline = min(deadline, when)
        if self.dirty:
            deadline = now
        return None if deadline == _NEVER else max(0.0, deadline - now)

    def _timers(self) -> None:
        now = self.system.clock()
        if self.control is not None:
            self.control.expire(self.sel, now)
        if self.metrics is not None:
            self.metrics.expire(now)
        while self.pending_order and self.pending_order[0].deadline <= now:
            item = self.pending_order.popleft()
            if item.sock.fileno() in self.pending and self.pending[item.sock.fileno()] is item:
                self._drop_pending(item, "preamble_timeout")
        if now >= self.next_watchdog and self.notifier is not None and self.watchdog_interval:
            self.notifier.watchdog()
            self.next_watchdog = now + self.watchdog_interval
        if self.upgrading is not None and now >= self.upgrading.deadline:
            self.system.kill(self.upgrading.pid, signal.SIGKILL)
            self._upgrade_failed(self.upgrading.failure or
                                 f"the new master was not ready within {UPGRADE_TIMEOUT:g} s")
        if self.stopping and now >= self.stop_deadline:
            self._kill_remaining()
        if now >= self.next_sweep:
            self._sweep(now)

    def wake_at(self, when: float) -> None:
        """Run the sweep by ``when`` (a pause or backoff ends, a worker may be retired)."""
        if when < self.next_sweep:
            self.next_sweep = when

    def _sweep(self, now: float) -> None:
        """Per-service deadlines: rests that end, and the dispatcher's housekeeping.

        Runs only when a deadline is due, so its cost does not grow with the
        number of services on every loop turn.
        """
        self.next_sweep = _NEVER
        self.dispatcher.sweep(now)
        self.collect_garbage()
        for rt in self.runtimes:
            rest = rt.resting_until
            if rest > now:
                self.wake_at(rest)
            elif rest:
                self.dirty.add(rt)  # a rest is over: poll again
                rt.paused_until = rt.admission.paused_until = 0.0

    def refresh(self, rt: ServiceRuntime) -> None:
        """``rt``'s capacity may have changed; re-decided at the end of this turn."""
        self.dirty.add(rt)

    def _refresh_dirty(self) -> None:
        while self.dirty:
            rt = self.dirty.pop()
            self._refresh(rt)

    def _refresh(self, rt: ServiceRuntime) -> None:
        """Start what ``rt`` needs, then poll exactly the listeners that can be served."""
        now = self.system.clock()
        open_ = not self.stopping and not rt.retired
        if open_ and rt.reply is None:  # an engine-answered service needs no workers
            self.dispatcher.maintain(rt, now)
        can_take = open_ and self._has_room(rt, now)
        for lst in rt.listeners:
            self._set_polled(lst, can_take and not lst.lent)

    def _has_room(self, rt: ServiceRuntime, now: float) -> bool:
        if rt.resting_until > now or rt.at_max_child():
            return False
        if rt.preamble is not None and rt.pending >= pre.MAX_PENDING:
            return False
        return rt.reply is not None or self.dispatcher.can_take(rt)

    def _set_polled(self, lst: Listener, want: bool) -> None:
        if want == lst.polled:
            return
        if want:
            self.sel.register(lst.sock, selectors.EVENT_READ, lst)
        else:
            self.sel.unregister(lst.sock)
        lst.polled = want

    def _all_ready(self) -> bool:
        return all(self.dispatcher.ready(rt) for rt in self.runtimes
                   if not rt.retired and rt.reply is None)

    def _report_ready(self) -> None:
        self.ready_reported = True
        if self.ready_fd is not None:
            doc: dict[str, object] = {"pid": os.getpid(), "mode": self.dispatcher.mode,
                                      "listeners": self.listener_report()}
            if self.metrics is not None:
                doc["metrics"] = {"address": self.metrics.address, "port": self.metrics.port}
            try:
                os.write(self.ready_fd, jsonsafe.dumps(doc) + b"\n")
                os.close(self.ready_fd)
            except OSError as exc:
                log.warning("ready_fd_failed", fd=self.ready_fd, error=exc.strerror)
            self.ready_fd = None
        log.info("ready", services=len(self.runtimes), mode=self.dispatcher.mode)
        if self.notifier is not None:
            self.notifier.ready(status=self.summary())

    def summary(self) -> str:
        """One line for systemd's STATUS=: what is served and how busy it is."""
        live = [rt for rt in self.runtimes if not rt.retired]
        active = sum(rt.instances for rt in self.runtimes)
        return (f"{self.dispatcher.mode} mode: {len(live)} services, {active} active, "
                f"{sum(rt.stats.accepted for rt in live)} accepted, {self.reloads} reloads")

    # -- the accept path -------------------------------------------------------
    def _on_listener(self, lst: Listener) -> None:
        rt = lst.rt
        if rt.lends:
            self._lend(lst)
        else:
            self._accept_batch(lst)
        self.dirty.add(rt)

    def _accept_batch(self, lst: Listener) -> None:
        rt = lst.rt
        batch = ACCEPT_BATCH if rt.service.internal is not None else ACCEPT_BATCH_PROGRAM
        # _accept() gives the bare fd: no socket object per connection, the
        # engine only forwards it and closes it.
        accept = lst.sock._accept  # type: ignore[attr-defined]
        family = lst.sock.family
        for _ in range(batch):
            now = self.system.clock()
            if not self._has_room(rt, now):
                break
            try:
                fd, addr = accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRORS:
                    self.rest(rt, f"accept: {exc.strerror}", now)
                    log.error("accept_failed", service=rt.name, error=exc.strerror,
                              pause=EMFILE_PAUSE)
                    break
                continue  # ECONNABORTED, EPROTO...: that client is gone, the next one is not
            peer = addr if isinstance(addr, tuple) else None
            ip = peer[0] if peer else ""
            why = rt.admission.check(ip, now) if rt.admission.active else ""
            if why:
                os.close(fd)
                self._refused(rt, ip, why, now)
                if rt.admission.looping:
                    break
                continue
            if rt.preamble is not None:
                self._begin_preamble(lst, fd, family, peer, now)
            elif rt.reply is not None:
                self._answer(rt, fd, family, peer, now)
            else:
                self._hand_off(rt, fd, family, ip, _wire_peer(peer), now)

    def _hand_off(self, rt: ServiceRuntime, fd: int, family: int, ip: str, peer: str,
                  now: float) -> None:
        """Give fd to the dispatcher and count the instance; closes ``fd`` on every path."""
        iid = next(self.ids)
        if stagetrace.enabled:
            stagetrace.stamp("accepted", iid, now, f"peer={peer.replace(' ', ':')}")
        # Counted first: the dispatcher may report on it (program_started) at once.
        self.instances[iid] = Instance(iid, rt, ip, now)
        rt.instances += 1
        handed = False
        try:
            handed = self.dispatcher.hand_off(rt, fd, family, peer, iid)
        finally:
            os.close(fd)  # sent (the worker or child has its own copy) or given up
            if not handed:
                self._uncount(iid)
        if not handed:
            self._count_refusal(rt, "no_room")
            return
        rt.stats.accepted += 1
        rt.admission.started(ip)

    def _answer(self, rt: ServiceRuntime, fd: int, family: int, peer: tuple[str, int] | None,
                now: float) -> None:
        """Send a one-shot built-in's reply from here and close ``fd`` (on every path).

        Admission has already passed. Never blocks: one non-blocking send of a
        few bytes into an empty send buffer; what does not fit (a client that
        is already gone) is dropped. The connection starts and ends in this
        call, so it counts as accepted and in the per-source counts for no time.
        """
        kind = socket.SOCK_SEQPACKET if rt.service.socket_type is SocketType.SEQPACKET else (
            socket.SOCK_STREAM)
        sock = socket.socket(family, kind, 0, fileno=fd)
        sent = 0
        try:
            assert rt.reply is not None
            sent = sock.send(rt.reply(), socket.MSG_DONTWAIT)
        except OSError:
            pass  # reset, or no room: the reply is dropped, the connection closed
        finally:
            sock.close()
        stats = rt.stats
        stats.accepted += 1
        stats.builtin_bytes_out += sent
        if self.log_connections:
            log.info("conn_end", service=rt.name, pid=os.getpid(), peer=_wire_peer(peer),
                     status="ok",
                     duration=round(self.system.clock() - now, 6), bytes_in=0, bytes_out=sent)

    def _uncount(self, iid: int) -> None:
        """Forget an instance the dispatcher could not take after all."""
        inst = self.instances.pop(iid)
        inst.rt.instances -= 1
        if inst.program_pid:
            inst.rt.programs -= 1

    def rest(self, rt: ServiceRuntime, why: str, now: float | None = None) -> None:
        """Out of a resource: ``rt``'s listeners rest EMFILE_PAUSE instead of spinning."""
        now = self.system.clock() if now is None else now
        rt.paused_until = now + EMFILE_PAUSE
        rt.last_error = why
        self.wake_at(rt.paused_until)

    def _count_refusal(self, rt: ServiceRuntime, why: str) -> None:
        stats = rt.stats
        stats.refused += 1
        stats.refused_by[why] = stats.refused_by.get(why, 0) + 1

    def _refused(self, rt: ServiceRuntime, ip: str, why: str, now: float) -> None:
        self._count_refusal(rt, why)
        if rt.admission.looping:
            self.wake_at(rt.admission.paused_until)
            limit = rt.service.limits.max_spawn_per_min
            rt.last_error = f"more than {limit} connections a minute"
            log.error("service_looping", service=rt.name, limit=limit, pause=LOOPING_PAUSE)
            return
        if now - rt.last_refusal_log >= REFUSAL_LOG_INTERVAL:
            rt.last_refusal_log = now
            log.warning("conn_refused", service=rt.name, peer=ip, reason=why,
                        refused_total=rt.stats.refused)

    def _lend(self, lst: Listener) -> None:
        """Lend ``lst`` (a wait program gets it on fd 0; a datagram built-in answers on it)."""
        rt = lst.rt
        now = self.system.clock()
        if lst.lent or not self._has_room(rt, now):
            return
        iid = next(self.ids)
        self.instances[iid] = Instance(iid, rt, "", now, listener=lst)
        rt.instances += 1
        if not self.dispatcher.lend(rt, lst, iid):
            self._uncount(iid)
            return
        lst.lent = iid
        self._set_polled(lst, False)
        if rt.service.internal is None:
            rt.stats.accepted += 1  # a wait program started; a built-in's loan is not a connection

    # -- the preamble stage ------------------------------------------------------
    def _begin_preamble(self, lst: Listener, fd: int, family: int,
                        peer: tuple[str, int] | None, now: float) -> None:
        rt = lst.rt
        assert rt.preamble is not None
        sock = socket.socket(family, lst.sock.type, 0, fileno=fd)
        item = Pending(sock, lst, peer, rt.preamble(), now + pre.DEADLINE)
        self.pending[fd] = item
        self.pending_order.append(item)
        rt.pending += 1
        self._on_pending(item)  # the header is usually there already
        if fd in self.pending:
            self.sel.register(sock, selectors.EVENT_READ, item)

    def _on_pending(self, item: Pending) -> None:
        """Peek at what arrived and let the reader decide; never blocks, never over-reads.

        Bytes the reader said were all preamble (NeedMore) are taken off the
        socket for real, so a level-triggered selector does not wake the loop
        again for bytes it has already seen.
        """
        rt = item.lst.rt
        room = item.reader.limit - len(item.got)
        try:
            data = item.sock.recv(room, socket.MSG_PEEK | socket.MSG_DONTWAIT) if room else b""
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop_pending(item, "preamble_reset")
            return
        result = item.reader.feed(item.got + data, eof=not data)
        if isinstance(result, pre.NeedMore):
            if not data:  # EOF (or the limit) before a verdict
                self._drop_pending(item, "preamble_incomplete")
                return
            try:
                item.got += item.sock.recv(len(data), socket.MSG_DONTWAIT)
            except OSError:
                self._drop_pending(item, "preamble_reset")
            return
        if isinstance(result, pre.Refuse):
            self._drop_pending(item, result.reason)
            return
        # Consume exactly the rest of the preamble: it was peeked, so recv returns all of it.
        need = result.consumed - len(item.got)
        try:
            got = item.sock.recv(need, socket.MSG_DONTWAIT) if need > 0 else b""
            if result.reply:
                item.sock.send(result.reply, socket.MSG_DONTWAIT)
        except OSError:
            self._drop_pending(item, "preamble_reset")
            return
        if len(got) != max(0, need):
            self._drop_pending(item, "preamble_incomplete")
            return
        peer = result.peer or item.peer
        ip = peer[0] if peer else ""
        now = self.system.clock()
        self._forget_pending(item)
        why = rt.admission.check(ip, now) if rt.admission.active else ""
        if why or rt.retired or self.stopping or not self._has_room(rt, now):
            item.sock.close()
            if why:
                self._refused(rt, ip, why, now)
            else:
                self._count_refusal(rt, "no_room")
            return
        fd = item.sock.detach()
        if rt.reply is not None:
            self._answer(rt, fd, item.sock.family, peer, now)
        else:
            self._hand_off(rt, fd, item.sock.family, ip, _wire_peer(peer), now)

    def _forget_pending(self, item: Pending) -> None:
        fd = item.sock.fileno()
        if self.pending.pop(fd, None) is None:
            return
        item.lst.rt.pending -= 1
        self.dirty.add(item.lst.rt)
        with contextlib.suppress(KeyError, ValueError):  # not registered if decided at once
            self.sel.unregister(item.sock)

    def _drop_pending(self, item: Pending, why: str) -> None:
        rt = item.lst.rt
        self._forget_pending(item)
        ip = item.peer[0] if item.peer else ""
        item.sock.close()
        self._refused(rt, ip, why, self.system.clock())

    # -- what dispatchers report ---------------------------------------------------
    def ended(self, iid: int) -> None:
        """Instance ``iid`` is over: uncount it, give a lent listener back."""
        inst = self.instances.pop(iid, None)
        if inst is None:
            return
        rt = inst.rt
        rt.instances -= 1
        if inst.program_pid:
            rt.programs -= 1
        rt.admission.ended(inst.ip)
        self.dirty.add(rt)
        successor = rt.successor
        while successor is not None:  # its max_child counted this instance too
            self.dirty.add(successor)
            successor = successor.successor
        lst = inst.listener
        if lst is not None and lst.lent == iid:
            lst.lent = 0
            if rt.service.internal is None and lst.sock.fileno() >= 0:
                # The program may have left the listener blocking (shared file
                # status); a stop or reload may have closed it during the loan.
                lst.sock.setblocking(False)
            self.dirty.add(lst.rt)  # a reload may have moved it to a new generation

    def program_started(self, iid: int, pid: int) -> None:
        inst = self.instances.get(iid)
        if inst is not None and not inst.program_pid:
            inst.program_pid = pid
            inst.rt.programs += 1

    # -- signals ---------------------------------------------------------------
    def _on_signals(self) -> None:
        for sig in self.sigpipe.drain():
            if sig == signal.SIGCHLD:
                self._reap()
            elif sig == signal.SIGHUP:
                self.reload()
            elif sig == signal.SIGTERM:
                self.begin_stop(self.graceful_timeout, "SIGTERM")
            elif sig in (signal.SIGINT, signal.SIGQUIT):
                self.begin_stop(FAST_STOP_TIMEOUT, sig.name, fast=True)
            elif sig == signal.SIGUSR1:
                log.reopen()
                log.info("log_reopened")
                self.dispatcher.reopen_log()
            elif sig == signal.SIGUSR2:
                why = self.upgrade()
                if why:
                    log.warning("upgrade_refused", reason=why)
            elif sig in (signal.SIGTTIN, signal.SIGTTOU):
                self._resize(+1 if sig == signal.SIGTTIN else -1)

    def _reap(self) -> None:
        """Collect every exited child (one waitpid loop); the dispatcher says whose it was."""
        while True:
            try:
                pid, status = self.system.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            if self.dispatcher.child_exited(pid, code):
                continue
            if self.upgrading is not None and pid == self.upgrading.pid:
                self.upgrading.exited(code)
                self._upgrade_failed(f"the new master exited with status {code}")
                continue
            log.debug("reaped_unknown", pid=pid, status=code)

    def _resize(self, delta: int) -> None:
        for rt in self.runtimes:
            if rt.retired:
                continue
            new_min = self.dispatcher.resize(rt, delta)
            if new_min is None:
                log.info("resize_ignored", service=rt.name,
                         reason=f"{self.dispatcher.mode} mode has no pools")
                return
            log.info("pool_resized", service=rt.name, pool_min=new_min)
            self.dirty.add(rt)

    # -- stop ------------------------------------------------------------------
    def begin_stop(self, timeout: float, why: str, fast: bool = False) -> None:
        """Stop accepting; let what runs finish within ``timeout``; then kill what is left."""
        deadline = self.system.clock() + timeout
        if self.stopping:
            self.stop_deadline = min(self.stop_deadline, deadline)
        else:
            self.stopping = True
            self.stop_deadline = deadline
            log.info("stopping", reason=why, timeout=timeout, mode=self.dispatcher.mode)
            if self.notifier is not None and not self.handed_over:
                self.notifier.stopping()
            if self.upgrading is not None:
                self._upgrade_failed("this master is stopping")
            for rt in self.runtimes:
                self._close_listeners(rt)
            for item in list(self.pending.values()):
                self._forget_pending(item)
                item.sock.close()
            self.pending_order.clear()
        self.dispatcher.begin_stop(fast)

    def _kill_remaining(self) -> None:
        """Past the stop deadline: SIGKILL what still runs; give up after KILL_PASSES."""
        self.dispatcher.kill_remaining()
        self.kill_passes += 1
        if self.kill_passes > KILL_PASSES:
            # Everything was SIGKILLed 5 s ago and is still not reaped: something is
            # wrong (a pid we wait for is not our child). Say what, and stop anyway
            # rather than hang a shutdown forever.
            log.error("stop_abandoned", pids=self.dispatcher.abandon())
        self.stop_deadline = self.system.clock() + 0.5

    def _close_listeners(self, rt: ServiceRuntime) -> None:
        for lst in rt.listeners:
            self._set_polled(lst, False)
            listeners.close_listener(lst.sock)
        rt.listeners = []

    # -- reload ------------------------------------------------------------------
    def reload(self) -> bool:
        """Re-read the config; apply it all or nothing. True if applied."""
        if self.load_config is None or self.open_sockets is None or self.stopping:
            return False
        if self.notifier is not None:
            self.notifier.reloading()
        try:
            return self._reload()
        finally:
            if self.notifier is not None and not self.stopping:
                self.notifier.ready(status=self.summary())

    def _reload(self) -> bool:
        assert self.load_config is not None and self.open_sockets is not None
        prepared = reloadplan.prepare(
            self.load_config,
            {rt.service.key: (rt, rt.service) for rt in self.runtimes if not rt.retired},
            self.open_sockets, self._release_listeners)
        if prepared is None:
            return False
        diff, services, opened = prepared
        order = {s.key: i for i, s in enumerate(services)}
        for service, socks in opened:
            self._add_runtime(service, socks)
        for old, service in diff.changed:
            # Same endpoints: the sockets move to a new generation (new workers in
            # pool mode); what the old one serves finishes on its own.
            new = self._add_runtime(service, [])
            # Limits span generations: running instances and per-source counts carry over.
            new.predecessors = [p for p in (old, *old.predecessors) if p.instances]
            old.successor = new
            new.admission = old.admission
            new.admission.update(service.limits)
            new.stats = old.stats
            for lst in old.listeners:
                self._set_polled(lst, False)
                lst.rt = new  # a lent one comes back when its loan ends
                new.listeners.append(lst)
            old.listeners = []
            self._retire(old)
        for rt in diff.removed:
            self._close_listeners(rt)
            self._retire(rt)
        self.runtimes.sort(key=lambda rt: (rt.retired, order.get(rt.service.key, 0)))
        self.internal_ports = self._internal_ports()
        self.reloads += 1
        self.wake_at(self.system.clock())
        self.collect_garbage()
        log.info("reloaded", added=len(diff.added), changed=len(diff.changed),
                 removed=len(diff.removed), unchanged=diff.unchanged)
        return True

    def _release_listeners(self, rt: ServiceRuntime) -> Callable[[], None]:
        """Close a removed service's listeners ahead of the reload (its address is
        wanted by an added one); returns how to reopen them if the reload fails."""
        self._close_listeners(rt)

        def restore() -> None:
            assert self.open_sockets is not None
            try:
                socks = self.open_sockets(rt.service)
            except listeners.ListenError as exc:
                log.error("restore_failed", service=rt.name, error=str(exc))
                return
            rt.listeners = [Listener(s, rt, listeners.bound_address(s)) for s in socks]
            self.dirty.add(rt)

        return restore

    def _retire(self, rt: ServiceRuntime) -> None:
        rt.retired = True
        self.dispatcher.retire(rt)
        self.dirty.add(rt)

    def collect_garbage(self) -> None:
        """Forget retired generations that serve nothing any more."""
        self.runtimes = [rt for rt in self.runtimes if not rt.retired or rt.instances
                         or rt.listeners or self.dispatcher.holds(rt)]
        for rt in self.runtimes:
            rt.predecessors = [p for p in rt.predecessors if p.instances]

    # -- upgrade -----------------------------------------------------------------
    def upgrade(self) -> str:
        """Start a new master on our sockets (see upgrade.py); "" if started, else why not."""
        if self.upgrade_argv is None:
            return "this master was not given a command line to start a new one with"
        if self.stopping:
            return "this master is stopping"
        if self.upgrading is not None:
            return f"an upgrade is already under way (new master {self.upgrading.pid})"
        sockets = [(lst.sock.fileno(), adopt.endpoint_name(rt.service, i))
                   for rt in self.runtimes if not rt.retired
                   for i, lst in enumerate(rt.listeners)]
        if self.control is not None:
            sockets.append((self.control.sock.fileno(), adopt.CONTROL_NAME))
        if self.metrics is not None:
            sockets.append((self.metrics.sock.fileno(), adopt.METRICS_NAME))
        env: dict[str, str] = {}
        pid_variables = ["LISTEN_PID"]
        if self.notifier is not None:
            env["NOTIFY_SOCKET"] = self.notifier.address
            if self.watchdog_interval:
                env["WATCHDOG_USEC"] = str(int(self.watchdog_interval * 2_000_000))
                pid_variables.append("WATCHDOG_PID")
        try:
            up = Upgrade.start(self.upgrade_argv, sockets, env, self.system.clock(),
                                       pid_variables, self.upgrade_cwd)
        except OSError as exc:
            log.error("upgrade_failed", reason=f"cannot start a new master: {exc.strerror}",
                      action="this master keeps serving")
            return f"cannot start a new master: {exc.strerror}"
        self.upgrading = up
        self.sel.register(up.reader, selectors.EVENT_READ, up)
        log.info("upgrade_started", new_pid=up.pid, listeners=len(sockets))
        return ""

    def _on_upgrade_pipe(self, up: Upgrade) -> None:
        got = up.read()
        if got is None:
            return
        if isinstance(got, str):
            if up.eof:
                # Most likely it is exiting: wait a moment for its status, which says more.
                self.sel.unregister(up.reader)
                up.deadline = min(up.deadline, self.system.clock() + UPGRADE_EXIT_GRACE)
                up.failure = got
                return
            self._upgrade_failed(got)
            return
        # The new master serves every socket now: stop accepting, drain, exit.
        self._forget_upgrade(up)
        up.exited(0)  # it outlives us; it is not ours to reap or to warn about
        self.handed_over = True
        log.info("upgrade_ready", new_pid=up.pid)
        if self.notifier is not None:
            self.notifier.mainpid(up.pid, ready=True)
        for rt in self.runtimes:
            for lst in rt.listeners:
                listeners.disown(lst.sock)  # its unix socket file is the new master's now
        if self.control is not None:
            listeners.disown(self.control.sock)
        self.begin_stop(self.graceful_timeout, "upgrade")

    def _upgrade_failed(self, why: str) -> None:
        up = self.upgrading
        if up is None:
            return
        self._forget_upgrade(up)
        log.error("upgrade_failed", new_pid=up.pid, reason=why,
                  action="this master keeps serving")

    def _forget_upgrade(self, up: Upgrade) -> None:
        self.upgrading = None
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(up.reader)
        up.close()

    # -- status -----------------------------------------------------------------
    def status(self) -> dict[str, object]:
        """The live state, as ``poolinetd status --json`` prints it (the same in both modes)."""
        now = self.system.clock()
        self.collect_garbage()
        services = []
        for rt in self.runtimes:
            report = self.dispatcher.report(rt, now)
            state = ("retiring" if rt.retired else "failing" if self.dispatcher.failing(rt)
                     else "paused" if rt.resting_until > now else "serving")
            services.append({
                "service": rt.name,
                "source": f"{rt.service.spec.source}:{rt.service.spec.lineno}",
                "state": state,
                "listeners": [str(lst.bound) for lst in rt.listeners],
                "accepted": rt.stats.accepted,
                "refused": rt.stats.refused,
                "refused_by": dict(rt.stats.refused_by),
                "active": rt.instances,
                "programs": rt.programs,
                "preamble": rt.pending,
                **report,
                "last_error": rt.last_error or report.get("last_error", ""),
            })
        return {"pid": os.getpid(), "mode": self.dispatcher.mode,
                "uptime": round(time.time() - self.started, 3), "reloads": self.reloads,
                "stopping": self.stopping,
                "upgrading": self.upgrading.pid if self.upgrading is not None else 0,
                "services": services}

    def render_metrics(self) -> bytes:
        return metrics.render(self.metrics_document())

    def metrics_document(self) -> metrics.MetricsDocument:
        """Every counter for ``render`` (the /metrics endpoint, ``poolinetd metrics``)."""
        now = self.system.clock()
        services: list[metrics.ServiceMetrics] = []
        seen: dict[int, metrics.ServiceMetrics] = {}
        for rt in self.runtimes:  # generations of one service share their stats
            report = self.dispatcher.report(rt, now)
            workers = report.get("workers", {})
            assert isinstance(workers, dict)
            entry = seen.get(id(rt.stats))
            if entry is None:
                stats = rt.stats
                entry = {
                    "service": rt.name, "accepted": stats.accepted,
                    "refused": dict(stats.refused_by), "active_connections": 0,
                    "running_programs": 0, "workers": {k: 0 for k in workers},
                    "restarts": 0, "boot_failures": 0,
                    "builtin_bytes_in": stats.builtin_bytes_in,
                    "builtin_bytes_out": stats.builtin_bytes_out,
                    "program_exits": dict(stats.program_exits),
                    "handoff_seconds": stats.handoff.snapshot(),
                    "program_run_seconds": stats.program_run.snapshot()}
                seen[id(rt.stats)] = entry
                services.append(entry)
            entry["active_connections"] += rt.instances
            entry["running_programs"] += rt.programs
            for state, count in workers.items():
                entry["workers"][state] = entry["workers"].get(state, 0) + int(count)
            restarts, failures = report.get("restarts", 0), report.get("boot_failures", 0)
            assert isinstance(restarts, int) and isinstance(failures, int)
            entry["restarts"] += restarts
            entry["boot_failures"] += failures
        try:
            open_fds = len(os.listdir("/proc/self/fd"))
        except OSError:
            open_fds = 0
        return {"engine": {"loop_turn_seconds": self.loop_turn.snapshot(), "open_fds": open_fds},
                "services": services}

    # -- teardown -------------------------------------------------------------
    def _close_all(self) -> None:
        stagetrace.flush()
        for rt in self.runtimes:
            self._close_listeners(rt)
        for item in list(self.pending.values()):
            self._forget_pending(item)
            item.sock.close()
        self.dispatcher.close()
        if self.control is not None:
            self.control.close(self.sel)
        if self.metrics is not None:
            self.metrics.close()
        self.sel.unregister(self.sigpipe.reader)
        self.sigpipe.close()
        self.sel.close()
        if self.ready_fd is not None:
            os.close(self.ready_fd)
            self.ready_fd = None


def _wire_peer(peer: tuple[str, int] | None) -> str:
    """The peer as the wire and the environment carry it: "HOST PORT" ("" for unix)."""
    return f"{peer[0]} {peer[1]}" if peer else ""


def _become_subreaper() -> None:
    """PR_SET_CHILD_SUBREAPER: programs whose worker died are reparented to us, not to init."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER = 36
    except (OSError, AttributeError):
        log.warning("subreaper_unavailable")
