"""The engine: the master's one thread and one selector loop, the same for both modes.

Touches the OS: select, signals, waitpid and kill (through a ``System``,
launch/system.py). How a connection is served is a ``Dispatcher``'s
business (engine/dispatch.py): pool/ (pre-forked workers) or classic/ (a
child per connection).

    Engine(services, dispatcher, ...).run() -> exit code

Each turn: select (timeout = the next deadline) -> every ready
registration's handler (its selector data), each behind the one error
guard -> timers -> re-decide the services whose capacity changed (the
dispatcher starts what they need; exactly the listeners that can be served
are polled).

The parts, each its own module:

    services.ServiceTable    generations, listeners, polling
    ledger.Ledger            running instances and the global caps
    accept.AcceptStage       accept batch, admission, preamble, hand-off, loans
    refusals.Refusals        counting and logging refusals
    reload.Reloader          applying a reload, all or nothing
    upgrading.Upgrading      the old master's side of an upgrade
    reports                  status, metrics, ready report, STATUS=

fd ownership: the engine owns the signal pipe and, through its parts, every
listener (the service table), every connection in the accept and preamble
stages, and the control and metrics sockets. An accepted connection is the
dispatcher's from ``hand_off`` on, on every path.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import time
import traceback
from collections.abc import Callable

from poolinetd.config.spec import Service
from poolinetd.engine import reports
from poolinetd.engine.accept import EMFILE_PAUSE, AcceptStage
from poolinetd.engine.dispatch import Dispatcher, Watchable
from poolinetd.engine.ledger import NO_CAPS, Caps, Ledger
from poolinetd.engine.reaper import Reaper
from poolinetd.engine.refusals import Refusals
from poolinetd.engine.reload import OpenSockets, Reloader
from poolinetd.engine.reloadplan import LoadConfig
from poolinetd.engine.runtime import Instance, Listener, ServiceRuntime
from poolinetd.engine.services import PreambleFactory, ServiceTable
from poolinetd.engine.upgrading import Upgrading
from poolinetd.launch import spawn
from poolinetd.launch.closer import Closer
from poolinetd.launch.signals import SignalPipe
from poolinetd.launch.system import System
from poolinetd.observe import log, metrics, stagetrace
from poolinetd.ops import control, metricshttp, rpcbind
from poolinetd.ops.sdnotify import Notifier

_NEVER = float("inf")
FAST_STOP_TIMEOUT = 2.0
METRICS_CACHE = 1.0  # seconds a rendered metrics text is served again
KILL_PASSES = 10  # SIGKILL passes (0.5 s apart) before a stop gives up waiting

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
        load_config: LoadConfig | None = None,
        open_sockets: OpenSockets | None = None,
        ready_fd: int | None = None,
        control_path: str | None = None,
        graceful_timeout: float = 30.0,
        log_connections: bool = False,
        tcp_wrappers_dir: str = "/etc",
        title: str = "poolinetd: master",
        preambles: PreambleFactory | None = None,
        notifier: Notifier | None = None,
        watchdog_interval: float | None = None,
        metrics_sock: socket.socket | None = None,
        control_sock: socket.socket | None = None,
        upgrade_argv: list[str] | None = None,
        upgrade_cwd: str | None = None,
        caps: Caps = NO_CAPS,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.system = system or System()
        stagetrace.open_from_env()  # before any worker is forked: they inherit it
        self.dispatcher = dispatcher
        self.ready_fd = ready_fd
        self.graceful_timeout = graceful_timeout
        self.log_connections = log_connections
        self.title = title
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
        self.next_sweep = 0.0
        self.stopping = False
        self.stop_deadline = 0.0
        self.kill_passes = 0
        self.ready_reported = False
        self.started = time.time()
        self.stop_deferred = False  # the dispatcher's stop waits for the preamble stage
        self.closer = Closer(self.system.fork, self.system.clock, self.system.kill)
        self.closer_backed_up = False  # as last seen: its end wakes the unix services
        self.table = ServiceTable(self.sel, dispatcher, self._on_listener, preambles,
                                  self.closer.dispose)
        # RPC services' rpcbind mappings follow their listeners (table.sync_rpc).
        self.rpc = rpcbind.Registrar(self.sel, self.system.clock)
        self.table.registrar = self.rpc
        self.ledger = Ledger(caps, self.table.wake_all)
        self.refusals = Refusals(dispatcher, self.wake_at)
        self.accept = AcceptStage(self, self.sel, self.table, self.ledger, dispatcher,
                                  self.refusals, self.system.clock, log_connections,
                                  self.closer.dispose, tcp_wrappers_dir)
        self.reloader = (Reloader(self.table, self.ledger, load_config, open_sockets)
                         if load_config is not None and open_sockets is not None else None)
        self.upgrading = Upgrading(self, self.sel, self.system, upgrade_argv, upgrade_cwd,
                                   graceful_timeout)
        self.control = (control.ControlServer(control_path, self, self.sel, self.system.clock,
                                              control_sock) if control_path else None)
        self.metrics = (metricshttp.MetricsServer(metrics_sock, self.sel, self.render_metrics,
                                                  self.system.clock)
                        if metrics_sock is not None else None)
        self.reaper = Reaper(self.system, dispatcher, self.upgrading, self.accept.wrappers,
                             self.closer)
        dispatcher.attach(self)
        for service, socks in services:
            self.table.add(service, socks)
        self.table.index()

    # -- what the parts and the dispatcher see ---------------------------------------
    @property
    def runtimes(self) -> list[ServiceRuntime]:
        return self.table.runtimes

    @property
    def instances(self) -> dict[int, Instance]:
        return self.ledger.instances

    @property
    def internal_ports(self) -> frozenset[int]:
        return self.table.internal_ports

    def live(self) -> list[ServiceRuntime]:
        return self.table.live()

    def watch(self, fileobj: Watchable, handler: Callable[[int], None]) -> None:
        """Call ``handler(mask)`` when ``fileobj`` is readable (dispatchers' channels)."""
        self.sel.register(fileobj, selectors.EVENT_READ, handler)

    def unwatch(self, fileobj: Watchable) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(fileobj)

    def release(self, fd: int, family: int) -> None:
        """Close a connection nobody else holds without blocking (dispatchers' failures)."""
        self.accept.release_fd(fd, family)

    # -- the loop ----------------------------------------------------------------------
    def run(self) -> int:
        """Serve until stopped; returns the exit code (0 after a clean stop)."""
        spawn.set_title(self.title)
        _become_subreaper()
        for rt in self.table.runtimes:
            for lst in rt.listeners:
                log.info("listening", service=rt.name, family=lst.bound.family,
                         address=lst.bound.address, port=lst.bound.port,
                         mode=self.dispatcher.mode)
        self._refresh_dirty()
        while not (self.stopping and not self.dispatcher.busy() and not self.accept.preambles
                   and not self.rpc.busy()):
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
            self.closer.flush()  # unix connections closed this turn (never blocks)
            self._closer_caught_up()
            self._timers()
            self._refresh_dirty()
        except Exception:
            log.error("internal_error", traceback=traceback.format_exc())
        self.loop_turn.observe(self.system.clock() - began)

    def _closer_caught_up(self) -> None:
        """While the closer was behind, unix services stopped polling (``has_room``);
        once it has caught up, every service re-decides (else they stayed unpolled
        until something else of theirs changed)."""
        backed_up = self.closer.backed_up()
        if self.closer_backed_up and not backed_up:
            self.table.wake_all()
        self.closer_backed_up = backed_up

    def _on_listener(self, lst: Listener) -> None:
        self.accept.on_listener(lst)

    def _next_timeout(self, now: float) -> float | None:
        deadline = self.next_sweep
        if self.stopping:
            deadline = min(deadline, self.stop_deadline, now + 0.5)
        deadline = min(deadline, self.next_watchdog)
        for when in (self.accept.preambles.next_deadline(), self.upgrading.next_deadline(),
                     self.accept.wrappers.next_deadline(),
                     self.rpc.next_deadline(),
                     self.closer.next_deadline(),
                     *(server.next_deadline() for server in (self.control, self.metrics)
                       if server is not None)):
            if when is not None:
                deadline = min(deadline, when)
        if self.table.dirty:
            deadline = now
        return None if deadline == _NEVER else max(0.0, deadline - now)

    def _timers(self) -> None:
        now = self.system.clock()
        if self.control is not None:
            self.control.expire(now)
        if self.metrics is not None:
            self.metrics.expire(now)
        self.accept.preambles.expire(now)
        self.accept.wrappers.expire(now)
        self.rpc.expire(now)
        self.closer.check(now)
        if now >= self.next_watchdog and self.notifier is not None and self.watchdog_interval:
            self.notifier.watchdog()
            self.next_watchdog = now + self.watchdog_interval
        self.upgrading.expire(now)
        if self.stop_deferred and not self.accept.preambles:
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
        self.table.collect_garbage()
        for rt in self.table.runtimes:
            rest = rt.resting_until
            if rest > now:
                self.wake_at(rest)
            elif rest:
                self.table.dirty.add(rt)  # a rest is over: poll again
                rt.paused_until = rt.admission.paused_until = 0.0

    # -- capacity ----------------------------------------------------------------------
    def refresh(self, rt: ServiceRuntime) -> None:
        """``rt``'s capacity may have changed; re-decided at the end of this turn."""
        self.table.dirty.add(rt)

    def _refresh_dirty(self) -> None:
        dirty = self.table.dirty
        self.accept.caught_up.clear()
        while dirty:
            self._refresh(dirty.pop())

    def _refresh(self, rt: ServiceRuntime) -> None:
        """Start what ``rt`` needs, then poll exactly the listeners that can be served."""
        now = self.system.clock()
        open_ = not self.stopping and not rt.retired
        if open_ and not rt.engine_served:  # else it needs no workers
            self.dispatcher.maintain(rt, now)
        can_take = open_ and self.has_room(rt, now)
        for lst in rt.listeners:
            want = can_take and not lst.lent
            if not (want and not lst.polled and self.accept.catch_up(lst)):
                self.table.set_polled(lst, want)

    def has_room(self, rt: ServiceRuntime, now: float, draining: bool = False) -> bool:
        """Whether one more instance of ``rt`` may start now. ``draining``: a connection
        already accepted (in the preamble stage) may still be handed to a retiring one."""
        if rt.resting_until > now or (rt.at_max_child() and not rt.refuses_at_max_child()):
            return False  # (an xinetd service keeps accepting: each one past it is refused)
        if rt.retired and not draining:
            return False
        if not self.ledger.below_caps(rt):
            return False
        if rt.is_unix and self.closer.backed_up():
            return False  # closing what unix clients passed is not keeping up: they wait
        # A full preamble stage does not stop accepting: a newcomer from a light
        # source takes the place of the heaviest source's oldest (PreambleStage.admits).
        return rt.engine_served or self.dispatcher.can_take(rt)

    def rest(self, rt: ServiceRuntime, why: str, now: float | None = None) -> None:
        """Out of a resource: ``rt``'s listeners rest EMFILE_PAUSE instead of spinning."""
        now = self.system.clock() if now is None else now
        rt.paused_until = now + EMFILE_PAUSE
        rt.last_error = why
        self.wake_at(rt.paused_until)

    def finishes_preambles(self) -> bool:
        """A stop refuses connections still in their preamble; a hand-over to a new
        master (upgrade) lets them finish here."""
        return not self.stopping or self.upgrading.handed_over

    def set_caps(self, caps: Caps) -> None:
        """New global caps; every service re-decides whether it has room."""
        self.ledger.caps = caps
        self.table.wake_all()

    # -- ready ---------------------------------------------------------------------------
    def _all_ready(self) -> bool:
        return all(rt.engine_served or self.dispatcher.ready(rt) for rt in self.table.live())

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
        log.info("ready", services=len(self.table.runtimes), mode=self.dispatcher.mode)
        if self.notifier is not None:
            self.notifier.ready(status=self.summary())

    # -- what dispatchers report -----------------------------------------------------------
    def ended(self, iid: int) -> None:
        """Instance ``iid`` is over: uncount it, give a lent listener back."""
        inst = self.ledger.close(iid)
        if inst is None:
            return
        rt = inst.rt
        rt.admission.ended(inst.source)
        self.table.wake_successors(rt)  # their max_child counted this instance too
        lst = inst.listener
        if lst is not None and lst.lent == iid:
            lst.lent = 0
            if lst.sock.fileno() >= 0:  # a stop or reload may have closed it during the loan
                if rt.service.internal is None:
                    # The program may have left the listener blocking (shared file status).
                    lst.sock.setblocking(False)
                self.table.check_returned(lst)
            self.table.dirty.add(lst.rt)  # a reload may have moved it to a new generation

    def lost(self, iid: int) -> None:
        """A handed-off connection never reached a worker (it died, or its queue was full)."""
        inst = self.ledger.instances.get(iid)
        if inst is not None:
            self.refusals.count(inst.rt, "no_room")
        self.ended(iid)

    def program_started(self, iid: int, pid: int) -> None:
        self.ledger.program_started(iid, pid)

    # -- signals -------------------------------------------------------------------------
    def _on_signals(self, _mask: int = 0) -> None:
        for sig in self.sigpipe.drain():
            if sig == signal.SIGCHLD:
                self.reaper.reap()
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

    def forked(self, pid: int) -> bool:
        return self.reaper.forked(pid)

    def _resize(self, delta: int) -> None:
        for rt in self.table.live():
            if rt.engine_served:
                continue
            new_min = self.dispatcher.resize(rt, delta)
            if new_min is None:
                log.info("resize_ignored", service=rt.name,
                         reason=f"{self.dispatcher.mode} mode has no pools")
                return
            log.info("pool_resized", service=rt.name, pool_min=new_min)
            self.table.dirty.add(rt)

    # -- stop ------------------------------------------------------------------------------
    def begin_stop(self, timeout: float, why: str, fast: bool = False) -> None:
        """Stop accepting; let what runs finish within ``timeout``; then kill what is left."""
        deadline = self.system.clock() + timeout
        handed_over = self.upgrading.handed_over
        if self.stopping:
            self.stop_deadline = min(self.stop_deadline, deadline)
        else:
            self.stopping = True
            self.stop_deadline = deadline
            log.info("stopping", reason=why, timeout=timeout, mode=self.dispatcher.mode)
            if self.notifier is not None and not handed_over:
                self.notifier.stopping()
            self.upgrading.failed("this master is stopping")
            self.rpc.stop()  # what it registered is unset once (close_all), not retried
            self.table.close_all()
            if not handed_over:
                self.accept.preambles.close_all()
        if handed_over and self.accept.preambles and not fast:
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

    # -- reload and upgrade ------------------------------------------------------------------
    def reload(self) -> bool:
        """Re-read the config; apply it all or nothing. True if applied."""
        if self.reloader is None or self.stopping:
            return False
        if self.notifier is not None:
            self.notifier.reloading()
        try:
            applied = self.reloader.reload()
            if applied:
                self.wake_at(self.system.clock())
            return applied
        finally:
            if self.notifier is not None and not self.stopping:
                self.notifier.ready(status=self.summary())

    def upgrade(self) -> str:
        """Start a new master on our sockets (engine/upgrading.py); "" if started, else why."""
        return self.upgrading.start()

    # -- documents (reports.py) ----------------------------------------------------------------
    def status(self) -> dict[str, object]:
        """The live state, as ``poolinetd status --json`` prints it."""
        self.table.collect_garbage()
        return reports.status(self.table.runtimes, self.dispatcher, self.system.clock(),
                              started=self.started, reloads=self.reloads,
                              stopping=self.stopping, upgrading=self.upgrading.pid,
                              rpc=self.rpc.state)

    def disown_rpc(self, new_pid: int) -> None:
        """An upgrade's new master serves on our RPC sockets: the mappings of those it holds
        are its own now (it found them registered with the same port and kept them), so
        this master's stop must not unset them. Those it did not take are unset as usual."""
        socks = [lst.sock for rt in self.table.runtimes if rt.service.rpc is not None
                 for lst in rt.listeners]
        if socks:
            held = rpcbind.held_by(new_pid, socks)
            self.rpc.disown(list(self.table.rpc_mappings(held)))

    @property
    def reloads(self) -> int:
        return self.reloader.reloads if self.reloader is not None else 0

    def render_metrics(self) -> bytes:
        """The metrics text, rendered at most once a second (a looping scraper must not
        turn the master's loop into a renderer; Prometheus scrapes every 15 s or so)."""
        now = self.system.clock()
        if self._metrics_cache is None or now - self._metrics_cache[0] >= METRICS_CACHE:
            doc = reports.metrics_document(self.table.runtimes, self.dispatcher, now,
                                           self.loop_turn)
            self._metrics_cache = (now, metrics.render(doc))
        return self._metrics_cache[1]

    def listener_report(self) -> list[dict[str, object]]:
        return reports.listener_report(self.table.runtimes)

    def summary(self) -> str:
        return reports.summary(self.table.runtimes, self.dispatcher.mode, self.reloads)

    # -- teardown ----------------------------------------------------------------------------
    def _close_all(self) -> None:
        stagetrace.flush()
        self.table.close_all()
        self.accept.preambles.close_all()
        self.accept.wrappers.close_all()
        self.dispatcher.close()
        self.closer.close()
        self.rpc.close()
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


def _become_subreaper() -> None:
    """PR_SET_CHILD_SUBREAPER: programs whose worker died are reparented to us, not to init."""
    try:
        spawn.become_subreaper()
    except (OSError, AttributeError):
        log.warning("subreaper_unavailable")
