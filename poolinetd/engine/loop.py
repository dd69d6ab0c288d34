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
4. ``Dispatcher.hand_off``, then ``Dispatcher.flush`` once per batch (pool
   mode: what the batch gave one worker travels in one message).

fd ownership: the engine owns every listener, the signal pipe and the
control socket. An accepted connection is the engine's from accept() until
it is given to ``hand_off`` (the dispatcher's from then on, on every path);
one in the preamble stage is the engine's until handed off or dropped. A lent
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
from collections.abc import Callable, Hashable

from poolinetd.admission import readers
from poolinetd.admission.policy import LOOPING_PAUSE
from poolinetd.builtins import internal
from poolinetd.config.spec import Service, SocketType
from poolinetd.engine import reloadplan, reports
from poolinetd.engine.dispatch import Dispatcher, Watchable
from poolinetd.engine.runtime import Instance, Listener, Pending, ServiceRuntime
from poolinetd.launch import spawn
from poolinetd.launch.signals import SignalPipe
from poolinetd.launch.system import System
from poolinetd.net import preamble as pre
from poolinetd.observe import log, metrics, stagetrace, throttle
from poolinetd.ops import adopt, control, listeners, metricshttp
from poolinetd.ops.sdnotify import Notifier
from poolinetd.ops.upgrade import EXIT_GRACE as UPGRADE_EXIT_GRACE
from poolinetd.ops.upgrade import TIMEOUT as UPGRADE_TIMEOUT
from poolinetd.ops.upgrade import Upgrade

_NEVER = float("inf")
ACCEPT_BATCH = 64  # connections accepted per readable event before other work runs
# For programs, fewer: each launch costs its worker an exec, and connections left
# in the kernel's FIFO backlog are served more fairly than ones queued in a
# worker (measured: /bin/cat at c=64, p99 80 -> 62-68 ms, 1,840 -> 2,100 conn/s).
ACCEPT_BATCH_PROGRAM = 4
EMFILE_PAUSE = 1.0  # seconds a listener rests after running out of fds (inetd sleeps 1 s too)
FAST_STOP_TIMEOUT = 2.0
REFUSAL_LOG_INTERVAL = 10.0  # at most one conn_refused line per source and reason this often
METRICS_CACHE = 1.0  # seconds a rendered metrics text is served again
DGRAM_JUDGE_BATCH = 64  # datagrams judged (and refused) per event before other work runs
KILL_PASSES = 10  # SIGKILL passes (0.5 s apart) before a stop gives up waiting
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

SIGNALS = (signal.SIGCHLD, signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT,
           signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU)


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
        max_connections: int | None = None,
        max_programs: int | None = None,
        on_ready: Callable[[], None] | None = None,
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
        self.on_ready = on_ready
        self.notifier = notifier
        self.watchdog_interval = watchdog_interval
        self.next_watchdog = 0.0 if watchdog_interval else _NEVER
        self.loop_turn = metrics.Histogram(metrics.LOOP_TURN_BUCKETS)
        self._metrics_cache: tuple[float, bytes] | None = None
        self.sel: selectors.BaseSelector = selectors.DefaultSelector()
        self.sigpipe = SignalPipe()
        self.sigpipe.install(SIGNALS)
        self.sel.register(self.sigpipe.reader, selectors.EVENT_READ, self._on_signals)
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
        self.tcpmux_routes: dict[str, ServiceRuntime] = {}
        self.refusal_log = throttle.Throttle(REFUSAL_LOG_INTERVAL)
        self.max_connections = max_connections  # None = no global cap
        self.max_programs = max_programs
        self.active = 0  # connections and programs, all services (the global caps count these)
        self.active_programs = 0
        self.upgrade_argv = upgrade_argv
        self.upgrade_cwd = upgrade_cwd
        self.upgrading: Upgrade | None = None
        self.handed_over = False  # an upgrade's new master serves now; we drain
        self.stop_deferred = False  # the dispatcher's stop waits for the preamble stage
        self.control = (control.ControlServer(control_path, self, self.sel, self.system.clock,
                                              control_sock) if control_path else None)
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
        if self.preambles is not None:
            rt.preamble = self.preambles(service)
        else:
            rt.preamble = readers.for_service(service, self._tcpmux_names)
        if service.internal is not None:
            rt.reply = internal.engine_reply(service.internal, service.socket_type)
        # No dispatcher behind it: the engine reads the tcpmux name, or answers itself.
        rt.engine_served = service.internal == "tcpmux" or rt.reply is not None
        for sock in socks:
            rt.listeners.append(Listener(sock, rt, listeners.bound_address(sock)))
        self.runtimes.append(rt)
        if not rt.engine_served:
            self.dispatcher.add(rt)
        self.dirty.add(rt)
        self._index_tcpmux()
        return rt

    def _index_tcpmux(self) -> None:
        """tcpmux sub-services by lower-cased name (the generation that is not retired)."""
        self.tcpmux_routes = {rt.service.tcpmux_name: rt for rt in self.runtimes
                              if rt.service.tcpmux_name and not rt.retired}

    def _tcpmux_names(self) -> dict[str, bool]:
        return {name: rt.service.tcpmux_plus for name, rt in self.tcpmux_routes.items()}

    def _internal_ports(self) -> frozenset[int]:
        return internal.guarded_ports(lst.bound.port for rt in self.runtimes
                                      if rt.service.internal is not None for lst in rt.listeners)

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
        while not (self.stopping and not self.dispatcher.busy() and not self.pending):
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
                key.data(mask)  # every registration's data is its handler
            except Exception:  # the last line of defence: one event's bug
                # must not take every service down with the master.
                log.error("internal_error", traceback=traceback.format_exc())
        try:
            self.dispatcher.flush()  # hand-offs of this turn outside an accept batch
            self._timers()
            self._refresh_dirty()
        except Exception:
            log.error("internal_error", traceback=traceback.format_exc())
        self.loop_turn.observe(self.system.clock() - began)

    def watch(self, fileobj: Watchable, handler: Callable[[int], None]) -> None:
        """Call ``handler(mask)`` when ``fileobj`` is readable (dispatchers' channels)."""
        self.sel.register(fileobj, selectors.EVENT_READ, handler)

    def unwatch(self, fileobj: Watchable) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(fileobj)

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
            self.control.expire(now)
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
        if self.stop_deferred and not self.pending:
            self.stop_deferred = False
            self.dispatcher.begin_stop(False)  # the preamble stage has drained
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
        if open_ and not rt.engine_served:  # else it needs no workers
            self.dispatcher.maintain(rt, now)
        can_take = open_ and self._has_room(rt, now)
        for lst in rt.listeners:
            self._set_polled(lst, can_take and not lst.lent)

    def _has_room(self, rt: ServiceRuntime, now: float, draining: bool = False) -> bool:
        """Whether one more instance of ``rt`` may start now. ``draining``: a connection
        already accepted (in the preamble stage) may still be handed to a retiring one."""
        if rt.resting_until > now or rt.at_max_child():
            return False
        if rt.retired and not draining:
            return False
        if rt.counts_active:  # the global caps
            if self.max_connections is not None and self.active >= self.max_connections:
                return False
            if (self.max_programs is not None and rt.is_program
                    and self.active_programs >= self.max_programs):
                return False
        if rt.preamble is not None and rt.pending >= pre.MAX_PENDING:
            return False
        return rt.engine_served or self.dispatcher.can_take(rt)

    def _set_polled(self, lst: Listener, want: bool) -> None:
        if want == lst.polled:
            return
        if want:
            self.sel.register(lst.sock, selectors.EVENT_READ, lambda _mask: self._on_listener(lst))
        else:
            self.sel.unregister(lst.sock)
        lst.polled = want

    def _all_ready(self) -> bool:
        return all(rt.engine_served or self.dispatcher.ready(rt)
                   for rt in self.runtimes if not rt.retired)

    def _report_ready(self) -> None:
        self.ready_reported = True
        if self.on_ready is not None:
            self.on_ready()
        if self.ready_fd is not None:
            doc: dict[str, object] = {"pid": os.getpid(), "mode": self.dispatcher.mode,
                                      "listeners": self.listener_report()}
            if self.metrics is not None:
                doc["metrics"] = {"address": self.metrics.address, "port": self.metrics.port}
            try:
                os.write(self.ready_fd, log.json_bytes(doc) + b"\n")
                os.close(self.ready_fd)
            except OSError as exc:
                log.warning("ready_fd_failed", fd=self.ready_fd, error=exc.strerror)
            self.ready_fd = None
        log.info("ready", services=len(self.runtimes), mode=self.dispatcher.mode)
        if self.notifier is not None:
            self.notifier.ready(status=self.summary())

    # -- the accept path -------------------------------------------------------
    def _on_listener(self, lst: Listener) -> None:
        if not lst.polled:  # a stale event: a stop or reload closed it earlier in this turn
            return
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
        now = self.system.clock()  # one reading per batch: the batch takes microseconds
        for _ in range(batch):
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
            key: Hashable = ""
            if rt.service.proxy_protocol:
                # Only a trusted proxy may say who the client is; the client's own
                # limits are judged once the header has said it. (On a unix socket
                # the file's mode says who may connect: there is no address to trust.)
                trusted = peer is None or rt.service.proxy_from.matches(ip)
                why = "" if trusted else readers.PROXY_UNTRUSTED
            else:
                key = rt.admission.source(ip)
                why = rt.admission.check(key, ip, now)
            if why:
                os.close(fd)
                self._refused(rt, ip, why, now)
                if rt.admission.looping:
                    break
                continue
            if rt.preamble is not None:
                source = rt.admission.source(ip)
                if rt.pending_by.get(source, 0) >= pre.MAX_PENDING_PER_SOURCE:
                    os.close(fd)  # one source may not fill the stage (slowloris)
                    self._refused(rt, ip, "preamble_busy", now)
                    continue
                self._begin_preamble(lst, fd, family, peer, now)
            elif rt.reply is not None:
                self._answer(rt, fd, family, peer, now)
            else:
                self._hand_off(rt, fd, family, key, _wire_peer(peer), now)
        # What the batch gave each worker goes in one message (fdpass.MAX_CONN_BATCH).
        self.dispatcher.flush()

    def _hand_off(self, rt: ServiceRuntime, fd: int, family: int, key: Hashable, peer: str,
                  now: float, local: str = "") -> None:
        """Give fd to the dispatcher and count the instance; closes ``fd`` on every path."""
        iid = next(self.ids)
        if stagetrace.enabled:
            stagetrace.stamp("accepted", iid, now, f"peer={peer.replace(' ', ':')}")
        # Counted first: the dispatcher may report on it (program_started) at once.
        self.instances[iid] = Instance(iid, rt, key, now)
        rt.instances += 1
        self._count_active(rt, +1)
        rt.admission.started(key)  # before: hand_off may already report it lost
        handed = False
        try:
            handed = self.dispatcher.hand_off(rt, fd, family, peer, iid, local)  # takes fd
        finally:
            if not handed:
                rt.admission.ended(key)
                self._uncount(iid)
        if not handed:
            self._count_refusal(rt, "no_room")
            return
        rt.stats.accepted += 1
        rt.stats.handoff.observe(self.system.clock() - now)  # ``now``: when it was accepted

    def _answer(self, rt: ServiceRuntime, fd: int, family: int, peer: tuple[str, int] | None,
                now: float) -> None:
        """Send a one-shot built-in's reply from here and close ``fd`` (on every path).

        Admission has already passed. Never blocks: one non-blocking send of a
        few bytes into an empty send buffer; what does not fit (a client that
        is already gone) is dropped. The connection starts and ends in this
        call, so it counts as accepted and in the per-source counts for no time.
        (Why the root master may write this reply: README, Benchmarks.)
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
        self._count_active(inst.rt, -1)
        if inst.program_pid:
            inst.rt.programs -= 1

    def set_caps(self, max_connections: int | None, max_programs: int | None) -> None:
        """New global caps (a reload); every service re-decides whether it has room."""
        self.max_connections, self.max_programs = max_connections, max_programs
        self.dirty.update(self.runtimes)

    def _count_active(self, rt: ServiceRuntime, delta: int) -> None:
        """Keep the global counts (--max-connections, --max-programs) and wake every
        service when one frees a slot at a cap (their listeners were not polled)."""
        if not rt.counts_active:
            return  # a datagram built-in's loan is not a connection
        before = self.active
        self.active += delta
        at_cap = self.max_connections is not None and before >= self.max_connections
        if rt.is_program:
            before_programs = self.active_programs
            self.active_programs += delta
            at_cap = at_cap or (self.max_programs is not None
                                and before_programs >= self.max_programs)
        if delta < 0 and at_cap:
            self.dirty.update(self.runtimes)

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
        held = self.refusal_log.allow((rt.name, ip, why), now)
        if held is not None:
            log.warning("conn_refused", service=rt.name, peer=ip, reason=why,
                        refused_total=rt.stats.refused, held_back=held)

    def _dgram_refused(self, rt: ServiceRuntime, addr: object, why: str, now: float) -> None:
        """A datagram for a built-in dropped here (classic): the same event as a worker's."""
        self._count_refusal(rt, why)
        held = self.dispatcher.dgram_log_due(rt, now)  # one throttle with the children's
        if held is not None:
            peer = f"{addr[0]} {addr[1]}" if isinstance(addr, tuple) else str(addr)
            log.warning("dgram_refused", service=rt.name, pid=os.getpid(), peer=peer,
                        reason=why, refused_since_last=held + 1)

    def _lend(self, lst: Listener) -> None:
        """Lend ``lst`` (a wait program gets it on fd 0; a datagram built-in answers on it).

        Each program start is admitted like a connection. For a datagram
        ``wait`` program that means the datagram that would start it: its
        source is peeked, and a refused one is dropped unanswered (as NetBSD's
        inetd does); later datagrams are read by the program itself and cannot
        be filtered here. A stream ``wait`` program accepts its own
        connections, so only the service-wide rate applies to it.
        """
        rt = lst.rt
        now = self.system.clock()
        if lst.lent or not self._has_room(rt, now):
            return
        key: Hashable = ""
        if rt.service.internal is not None and self.dispatcher.lends_per_burst:
            # A datagram built-in served by a child per burst (classic): refused
            # datagrams are dropped here, so they cost no fork.
            if self._admit_datagram(lst, now, builtin=True) is None:
                return
        elif rt.service.internal is None:
            if rt.service.socket_type is SocketType.DGRAM:
                admitted = self._admit_datagram(lst, now)
                if admitted is None:
                    return
                key = admitted
            else:
                why = rt.admission.check_start(now)
                if why:
                    self._refused(rt, "", why, now)
                    return
        iid = next(self.ids)
        self.instances[iid] = Instance(iid, rt, key, now, listener=lst)
        rt.instances += 1
        self._count_active(rt, +1)
        if not self.dispatcher.lend(rt, lst, iid):
            self._uncount(iid)
            return
        rt.admission.started(key)
        lst.lent = iid
        self._set_polled(lst, False)
        if rt.service.internal is None:
            rt.stats.accepted += 1  # a wait program started; a built-in's loan is not a connection

    def _admit_datagram(self, lst: Listener, now: float, builtin: bool = False
                        ) -> Hashable | None:
        """The admission key of the first queued datagram's source, dropping refused ones.

        None when nothing admissible is queued (bounded: a flood of refused
        datagrams is judged 64 at a time, between other events). ``builtin``:
        judge by the access lists and the loop guard only (a built-in answers
        each datagram on its own; rates are for program starts).
        """
        rt = lst.rt
        for _ in range(DGRAM_JUDGE_BATCH):
            try:
                _, addr = lst.sock.recvfrom(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError:  # an error queued on the socket (ICMP): now cleared
                continue
            ip = addr[0] if isinstance(addr, tuple) else ""
            key = rt.admission.source(ip)
            if builtin:
                guard = (internal.loop_guard(addr[1], self.internal_ports)
                         if isinstance(addr, tuple) else None)
                why = rt.admission.check_lists(ip) or guard or ""
            else:
                why = rt.admission.check(key, ip, now)
            if not why:
                return key
            with contextlib.suppress(OSError):
                lst.sock.recv(1, socket.MSG_DONTWAIT)  # drop it, unanswered
            if builtin:
                self._dgram_refused(rt, addr, why, now)
                continue
            self._refused(rt, ip, why, now)
            if rt.admission.looping:
                return None
        return None

    # -- the preamble stage ------------------------------------------------------
    def _begin_preamble(self, lst: Listener, fd: int, family: int,
                        peer: tuple[str, int] | None, now: float) -> None:
        rt = lst.rt
        assert rt.preamble is not None
        sock = socket.socket(family, lst.sock.type, 0, fileno=fd)
        source = rt.admission.source(peer[0] if peer else "")
        item = Pending(sock, rt, peer, source, rt.preamble(), now + pre.DEADLINE)
        rt.pending_by[source] = rt.pending_by.get(source, 0) + 1
        self.pending[fd] = item
        self.pending_order.append(item)
        rt.pending += 1
        self._on_pending(item)  # the header is usually there already
        if fd in self.pending:
            self.sel.register(sock, selectors.EVENT_READ, lambda _mask: self._on_pending(item))

    def _on_pending(self, item: Pending) -> None:
        """Peek at what arrived and let the reader decide; never blocks, never over-reads.

        Bytes the reader said were all preamble (NeedMore) are taken off the
        socket for real, so a level-triggered selector does not wake the loop
        again for bytes it has already seen.
        """
        rt = item.rt
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
            if result.reply:
                with contextlib.suppress(OSError):
                    # Read what was peeked first: closing with unread bytes would send a
                    # reset, which can destroy the reply before the client reads it.
                    item.sock.recv(len(data), socket.MSG_DONTWAIT)
                    item.sock.send(result.reply, socket.MSG_DONTWAIT)  # best-effort
            if result.reason in readers.ANSWERED:  # e.g. tcpmux HELP: served, not refused
                self._forget_pending(item)
                item.sock.close()
                return
            self._drop_pending(item, result.reason)
            return
        # Decide first (the sub-service, its admission, its room): a client that will
        # be refused must not be told "+Go".
        peer = result.peer or item.peer
        ip = peer[0] if peer else ""
        now = self.system.clock()
        self._forget_pending(item)
        if result.route is not None:  # tcpmux: the sub-service takes it, with its limits
            target = self.tcpmux_routes.get(result.route)
            if target is None:
                item.sock.close()
                self._refused(rt, ip, readers.TCPMUX_UNKNOWN, now)
                return
            rt.stats.accepted += 1
            rt = target
        while rt.retired and rt.successor is not None:  # a reload changed the service meanwhile
            rt = rt.successor
        key = rt.admission.source(ip)
        why = rt.admission.check(key, ip, now)
        handing_over = self.stopping and not self.handed_over
        if why or rt.retired or handing_over or not self._has_room(rt, now, draining=True):
            item.sock.close()
            if why:
                self._refused(rt, ip, why, now)
            else:
                self._count_refusal(rt, "no_room")
            return
        # Consume exactly the rest of the preamble: it was peeked, so recv returns all of it.
        need = result.consumed - len(item.got)
        try:
            got = item.sock.recv(need, socket.MSG_DONTWAIT) if need > 0 else b""
            if len(got) == max(0, need) and result.reply:
                item.sock.send(result.reply, socket.MSG_DONTWAIT)
        except OSError:
            item.sock.close()
            self._count_refusal(rt, "preamble_reset")
            return
        if len(got) != max(0, need):
            item.sock.close()
            self._count_refusal(rt, "preamble_incomplete")
            return
        fd = item.sock.detach()
        accepted = item.deadline - pre.DEADLINE
        if rt.reply is not None:
            self._answer(rt, fd, item.sock.family, peer, accepted)
            return
        self._hand_off(rt, fd, item.sock.family, key, _wire_peer(peer), accepted,
                       _wire_peer(result.local) if result.local else "")

    def _forget_pending(self, item: Pending) -> None:
        fd = item.sock.fileno()
        if self.pending.pop(fd, None) is None:
            return
        rt = item.rt
        rt.pending -= 1
        left = rt.pending_by.get(item.source, 0) - 1
        if left > 0:
            rt.pending_by[item.source] = left
        else:
            rt.pending_by.pop(item.source, None)
        self.dirty.add(rt.successor or rt)
        with contextlib.suppress(KeyError, ValueError):  # not registered if decided at once
            self.sel.unregister(item.sock)

    def _drop_pending(self, item: Pending, why: str) -> None:
        rt = item.rt
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
        self._count_active(rt, -1)
        if inst.program_pid:
            rt.programs -= 1
        rt.admission.ended(inst.source)
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

    def lost(self, iid: int) -> None:
        """A handed-off connection never reached a worker (it died, or its queue was full)."""
        inst = self.instances.get(iid)
        if inst is not None:
            self._count_refusal(inst.rt, "no_room")
        self.ended(iid)

    def program_started(self, iid: int, pid: int) -> None:
        inst = self.instances.get(iid)
        if inst is not None and not inst.program_pid:
            inst.program_pid = pid
            inst.rt.programs += 1

    # -- signals ---------------------------------------------------------------
    def _on_signals(self, _mask: int = 0) -> None:
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
            if rt.retired or rt.engine_served:
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
            if not self.handed_over:
                for item in list(self.pending.values()):
                    self._forget_pending(item)
                    item.sock.close()
                self.pending_order.clear()
        if self.handed_over and self.pending and not fast:
            # An upgrade: connections still sending their header were accepted here and
            # finish here (within their deadline); the workers are told to stop after.
            self.stop_deferred = True
            return
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
            new.admission.update(service)
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
        self._index_tcpmux()
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
        if not rt.engine_served:
            self.dispatcher.retire(rt)
        self.dirty.add(rt)

    def collect_garbage(self) -> None:
        """Forget retired generations that serve nothing any more."""
        self.runtimes = [rt for rt in self.runtimes if not rt.retired or rt.instances
                         or rt.listeners or (not rt.engine_served and self.dispatcher.holds(rt))]
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
        self.sel.register(up.reader, selectors.EVENT_READ, lambda _mask: self._on_upgrade_pipe(up))
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
        # The control and metrics sockets are the new master's to answer now.
        if self.control is not None:
            listeners.disown(self.control.sock)
            self.control.close()
            self.control = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
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

    # -- documents (reports.py) --------------------------------------------------
    def status(self) -> dict[str, object]:
        """The live state, as ``poolinetd status --json`` prints it."""
        return reports.status(self)

    def render_metrics(self) -> bytes:
        """The metrics text, rendered at most once a second (a looping scraper must not
        turn the master's loop into a renderer; Prometheus scrapes every 15 s or so)."""
        now = self.system.clock()
        if self._metrics_cache is None or now - self._metrics_cache[0] >= METRICS_CACHE:
            self._metrics_cache = (now, reports.render_metrics(self))
        return self._metrics_cache[1]

    def listener_report(self) -> list[dict[str, object]]:
        return reports.listener_report(self)

    def summary(self) -> str:
        return reports.summary(self)

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
            self.control.close()
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
