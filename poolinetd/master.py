"""The master: one thread, one selector loop, every listener, every pool.

Touches the OS: accept, sendmsg, fork (through spawn), waitpid, kill.

    Master(services, sockets, ...).run() -> exit code

Each iteration: select (timeout = next deadline) -> dispatch on the key's
data (Listener, WorkerHandle, the signal pipe, the control socket) -> timers.

fd ownership: the master owns every listener, its end of every worker's
channel and the signal pipe. An accepted connection is owned by the master
only between accept() and the send to a worker; the master closes its copy
right after the send, on every path. A lent listener stays the master's; it
only stops polling it while the loan lasts.

Backpressure: a listener is polled only while its service can take a
connection (a READY worker below its cap, instances below max-child); when
not, clients wait in the kernel backlog, and polling resumes when a worker
reports DONE or READY. A connection is never accepted without somewhere to go.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import itertools
import os
import selectors
import signal
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from poolinetd import control, fdpass, internal, listeners, log, reloadplan, spawn, worker
from poolinetd.admission import LOOPING_PAUSE, Admission
from poolinetd.pool import Pool, WorkerState
from poolinetd.signals import SignalPipe
from poolinetd.spec import Service, SocketType

_NEVER = float("inf")
ACCEPT_BATCH = 64  # connections accepted per readable event before other work runs
# For programs, fewer: each launch costs its worker an exec, and connections left
# in the kernel's FIFO backlog are served more fairly than ones queued in a
# worker (measured: /bin/cat at c=64, p99 80 -> 62-68 ms, 1,840 -> 2,100 conn/s).
ACCEPT_BATCH_PROGRAM = 4
EMFILE_PAUSE = 1.0  # seconds a listener rests after running out of fds (inetd sleeps 1 s too)
FAST_STOP_TIMEOUT = 2.0



@dataclass(slots=True, eq=False)
class Listener:
    """One listening (or bound datagram) socket of a service."""

    sock: socket.socket
    rt: ServiceRuntime
    bound: listeners.Bound
    polled: bool = False
    lent_to: int = 0  # pid of the worker holding it (wait services, datagram built-ins)
    lend_id: int = 0


@dataclass(slots=True, eq=False)
class WorkerHandle:
    """The master's record of one worker process; dropped only when reaped."""

    pid: int
    channel: socket.socket
    rt: ServiceRuntime
    closed: bool = False  # channel EOF seen and channel closed
    stop_sent: bool = False
    killed: bool = False
    boot_error: str = ""  # why it could not get ready (BOOT_FAILED)
    stop_pending: bool = False  # STOP could not be sent yet (channel full)


@dataclass(slots=True, eq=False)
class ConnRecord:
    """A connection (or loan) handed to a worker, until DONE or its program is reaped."""

    rt: ServiceRuntime
    worker_pid: int
    ip: str
    program_pid: int = 0
    listener: Listener | None = None  # set for loans


@dataclass(slots=True, eq=False)
class ServiceRuntime:
    """Everything the master tracks for one service generation."""

    service: Service
    pool: Pool
    listeners: list[Listener] = field(default_factory=list)
    instances: int = 0  # connections and loans being served (programs running)
    admission: Admission = field(init=False)
    paused_until: float = 0.0
    retired: bool = False  # removed or replaced by a reload: no new connections
    predecessors: list[ServiceRuntime] = field(default_factory=list)  # still-busy older ones
    successor: ServiceRuntime | None = None  # the generation that replaced this one
    accepted: int = 0
    refused: int = 0
    last_error: str = ""
    last_refusal_log: float = -60.0

    def __post_init__(self) -> None:
        self.admission = Admission(self.service.limits)

    @property
    def lends(self) -> bool:
        """Whether listeners are lent to a worker instead of accepted on."""
        return self.service.wait or (
            self.service.socket_type is SocketType.DGRAM)

    @property
    def resting_until(self) -> float:
        """Until when the listener rests (EMFILE pause, or the looping rule)."""
        return max(self.paused_until, self.admission.paused_until)

    def at_max_child(self) -> bool:
        limit = self.service.limits.max_child
        if not limit:
            return False
        # Instances of older generations (before a reload changed the service)
        # still run and still count.
        running = self.instances + sum(p.instances for p in self.predecessors)
        return running >= limit


class Master:
    """The poolinetd master. Construct with resolved services and their open sockets."""

    def __init__(
        self,
        services: list[tuple[Service, list[socket.socket]]],
        *,
        load_config: reloadplan.LoadConfig | None = None,
        open_sockets: Callable[[Service], list[socket.socket]] | None = None,
        ready_fd: int | None = None,
        control_path: str | None = None,
        graceful_timeout: float = 30.0,
        log_connections: bool = False,
        title: str = "poolinetd: master",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        self.load_config = load_config
        self.open_sockets = open_sockets
        self.ready_fd = ready_fd
        self.graceful_timeout = graceful_timeout
        self.log_connections = log_connections
        self.title = title
        self.sel = selectors.DefaultSelector()
        self.sigpipe = signal_pipe = _new_signal_pipe()
        self.sel.register(signal_pipe.reader, selectors.EVENT_READ, signal_pipe)
        self.runtimes: list[ServiceRuntime] = []
        self.workers: dict[int, WorkerHandle] = {}
        self.conns: dict[int, ConnRecord] = {}
        self.orphans: dict[int, int] = {}  # program pid -> conn_id (its worker died first)
        self.next_orphan_check = 0.0
        self.next_sweep = 0.0  # when _sweep must next run (see _wake_at)
        self.ids = itertools.count(1)
        self.stopping = False
        self.stop_deadline = 0.0
        self.kill_passes = 0
        self.started = time.time()
        self.reloads = 0
        self.control = control.ControlServer(control_path, self) if control_path else None
        if self.control is not None:
            self.sel.register(self.control.sock, selectors.EVENT_READ, self.control)
        for service, socks in services:
            self._add_runtime(service, socks)
        self.internal_ports = self._internal_ports()

    # -- setup ---------------------------------------------------------------
    def _add_runtime(self, service: Service, socks: list[socket.socket]) -> ServiceRuntime:
        rt = ServiceRuntime(service, Pool(service.pool))
        for sock in socks:
            rt.listeners.append(Listener(sock, rt, listeners.bound_address(sock)))
        self.runtimes.append(rt)
        return rt

    def _internal_ports(self) -> frozenset[int]:
        return internal.guarded_ports(lst.bound.port for rt in self.runtimes
                                      if rt.service.internal is not None for lst in rt.listeners)

    def listener_report(self) -> list[dict[str, object]]:
        """What is listened on, in config order (for --ready-fd, startup log, status)."""
        out: list[dict[str, object]] = []
        for rt in self.runtimes:
            if rt.retired:
                continue
            for lst in rt.listeners:
                out.append({"service": rt.service.name, "family": lst.bound.family,
                            "address": lst.bound.address, "port": lst.bound.port,
                            "socket_type": rt.service.socket_type.value,
                            "source": f"{rt.service.spec.source}:{rt.service.spec.lineno}"})
        return out

    # -- the loop --------------------------------------------------------------
    def run(self) -> int:
        """Serve until stopped; returns the exit code (0 after a clean stop)."""
        spawn.set_title(self.title)
        _become_subreaper()
        for lst in self._all_listeners():
            log.info("listening", service=lst.rt.service.name, family=lst.bound.family,
                     address=lst.bound.address, port=lst.bound.port,
                     pool_min=lst.rt.service.pool.pool_min, pool_max=lst.rt.service.pool.pool_max)
        for rt in self.runtimes:
            self._maintain(rt)
        ready_reported = False
        while True:
            if not ready_reported and self._all_ready():
                self._report_ready()
                ready_reported = True
            if self.stopping and not self.workers and not self.orphans:
                break
            now = self.clock()
            timeout = self._next_timeout(now)
            for key, mask in self.sel.select(timeout):
                try:
                    self._dispatch_event(key.data, mask)
                except Exception:  # the last line of defence: one event's bug
                    # must not take every service down with the master.
                    log.error("internal_error", traceback=traceback.format_exc())
            self._timers()
        self._close_all()
        log.info("stopped", pid=os.getpid())
        return 0

    def _dispatch_event(self, data: object, mask: int) -> None:
        if isinstance(data, Listener):
            self._on_listener(data)
        elif isinstance(data, WorkerHandle):
            self._on_worker(data)
        elif data is self.sigpipe:
            self._on_signals()
        elif isinstance(data, control.ControlServer):
            data.on_accept(self.sel)
        elif isinstance(data, control.ControlConn):
            data.on_event(self.sel, mask)

    def _next_timeout(self, now: float) -> float | None:
        deadlines: list[float] = []
        if self.next_sweep != _NEVER:
            deadlines.append(self.next_sweep)
        if self.stopping:
            deadlines.append(self.stop_deadline)
            deadlines.append(now + 0.5)  # stop progress (kill, reap) is checked often
        if self.control is not None:
            deadline = self.control.next_deadline()
            if deadline is not None:
                deadlines.append(deadline)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - now)

    def _timers(self) -> None:
        now = self.clock()
        if self.orphans and now >= self.next_orphan_check:
            self.next_orphan_check = now + 1.0
            self._prune_orphans()
        if self.control is not None:
            self.control.expire(self.sel, now)
        if self.stopping:
            if now >= self.stop_deadline:
                self._kill_remaining()
            return
        if now >= self.next_sweep:
            self._sweep(now)

    def _wake_at(self, when: float) -> None:
        """Make sure the loop sweeps the pools by ``when`` (a pause or backoff ends, a
        worker may be retired). Cheap: the hot path calls it instead of sweeping."""
        if when < self.next_sweep:
            self.next_sweep = when

    def _sweep(self, now: float) -> None:
        """Per-service housekeeping: retire idle surplus workers, start what pools
        need, resume rested listeners. Runs only when a deadline is due, so its
        cost does not grow with the number of services on every loop turn."""
        self.next_sweep = _NEVER
        for rt in self.runtimes:
            for pid in rt.pool.surplus(now):
                log.info("worker_retire", service=rt.service.name, pid=pid, reason="idle")
                self._stop_worker(rt, pid)
            self._maintain(rt)
            if rt.resting_until > now:
                self._wake_at(rt.resting_until)
            deadline = rt.pool.next_deadline(now)
            if deadline is not None:
                self._wake_at(deadline)

    def _all_listeners(self) -> list[Listener]:
        return [lst for rt in self.runtimes for lst in rt.listeners]

    def _all_ready(self) -> bool:
        for rt in self.runtimes:
            counts = rt.pool.counts()
            if counts["idle"] + counts["busy"] < min(1, rt.service.pool.pool_min) and not (
                rt.pool.failing
            ):
                return False
            if rt.lends and rt.service.internal is not None and any(
                not lst.lent_to for lst in rt.listeners
            ) and not rt.pool.failing:
                return False
        return True

    def _report_ready(self) -> None:
        import orjson

        if self.ready_fd is not None:
            line = orjson.dumps({"pid": os.getpid(), "listeners": self.listener_report()}) + b"\n"
            try:
                os.write(self.ready_fd, line)
                os.close(self.ready_fd)
            except OSError as exc:
                log.warning("ready_fd_failed", fd=self.ready_fd, error=exc.strerror)
            self.ready_fd = None
        log.info("ready", services=len(self.runtimes), workers=len(self.workers))

    # -- listeners -------------------------------------------------------------
    def _on_listener(self, lst: Listener) -> None:
        rt = lst.rt
        if rt.lends:
            self._lend(lst)
        else:
            self._accept_batch(lst)
        self._maintain(rt)

    def _accept_batch(self, lst: Listener) -> None:
        rt = lst.rt
        pool = rt.pool
        admission = rt.admission
        for _ in range(ACCEPT_BATCH if rt.service.internal is not None else ACCEPT_BATCH_PROGRAM):
            if rt.at_max_child():
                break
            pid = pool.pick()
            if pid is None:
                break
            try:
                # _accept() gives the bare fd: no socket object per connection,
                # the master only forwards it and closes it.
                fd, addr = lst.sock._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    rt.paused_until = self.clock() + EMFILE_PAUSE
                    self._wake_at(rt.paused_until)
                    rt.last_error = f"accept: {exc.strerror}"
                    log.error("accept_failed", service=rt.service.name, error=exc.strerror,
                              pause=EMFILE_PAUSE)
                    break
                continue  # ECONNABORTED, EPROTO...: that client is gone, the next one is not
            ip = addr[0] if isinstance(addr, tuple) else ""
            if admission.active:
                why = admission.check(ip, self.clock())
                if why:
                    os.close(fd)
                    self._refused(rt, ip, why)
                    if admission.looping:
                        break
                    continue
            try:
                self._dispatch(rt, pid, fd, lst.sock.family, ip, worker.format_addr(addr))
            finally:
                os.close(fd)  # sent (the worker has its own reference) or given up

    def _dispatch(self, rt: ServiceRuntime, pid: int, conn: int, family: int, ip: str,
                  peer: str) -> None:
        """Send fd ``conn`` to worker ``pid``, or to another if that one cannot take it.

        The caller keeps ownership of ``conn`` and closes it afterwards. A worker
        whose channel is broken (it just died) is written off and the next one
        tried, so a crash loses only what that worker was already serving.
        """
        handle = self.workers[pid]
        conn_id = 0
        for _ in range(4):
            conn_id = next(self.ids)
            try:
                fdpass.send(handle.channel, fdpass.encode_conn(conn_id, family, peer), conn)
                break
            except BlockingIOError:
                log.warning("worker_congested", service=rt.service.name, pid=pid, peer=peer)
                self._send_stop(handle)  # takes nothing more; a replacement is started
            except OSError as exc:
                log.warning("worker_unreachable", service=rt.service.name, pid=pid,
                            error=exc.strerror)
                self._worker_gone(handle, f"channel: {exc.strerror}")
            next_pid = rt.pool.pick()
            if next_pid is None:
                rt.refused += 1
                return
            pid, handle = next_pid, self.workers[next_pid]
        else:
            rt.refused += 1
            return
        rt.accepted += 1
        rt.instances += 1
        rt.admission.started(ip)
        self.conns[conn_id] = ConnRecord(rt, pid, ip)
        if rt.pool.assign(pid):
            log.info("worker_retire", service=rt.service.name, pid=pid, reason="max_requests")
            self._send_stop(handle)

    def _refused(self, rt: ServiceRuntime, ip: str, why: str) -> None:
        rt.refused += 1
        now = self.clock()
        if rt.admission.looping:
            self._wake_at(rt.admission.paused_until)
            limit = rt.service.limits.max_spawn_per_min
            rt.last_error = f"more than {limit} connections a minute"
            log.error("service_looping", service=rt.service.name, limit=limit,
                      pause=LOOPING_PAUSE)
            return
        if now - rt.last_refusal_log >= 10.0:
            rt.last_refusal_log = now
            log.warning("conn_refused", service=rt.service.name, peer=ip, reason=why,
                        refused_total=rt.refused)

    def _lend(self, lst: Listener) -> None:
        """Lend ``lst`` to a worker: a wait program gets it on fd 0, a dgram built-in serves it."""
        rt = lst.rt
        if lst.lent_to or rt.at_max_child():
            return
        pid = rt.pool.pick()
        if pid is None:
            return
        handle = self.workers[pid]
        lend_id = next(self.ids)
        try:
            fdpass.send(handle.channel, fdpass.encode_lend(lend_id), lst.sock.fileno())
        except OSError as exc:
            log.warning("lend_failed", service=rt.service.name, pid=pid, error=exc.strerror)
            return
        lst.lent_to, lst.lend_id = pid, lend_id
        self._set_polled(lst, False)
        if rt.pool.assign(pid):
            log.info("worker_retire", service=rt.service.name, pid=pid, reason="max_requests")
            self._send_stop(handle)
        rt.instances += 1
        if rt.service.internal is None:
            rt.accepted += 1  # a wait program started; a built-in's loan is not a connection
        self.conns[lend_id] = ConnRecord(rt, pid, "", listener=lst)

    def _set_polled(self, lst: Listener, want: bool) -> None:
        if want == lst.polled:
            return
        if want:
            self.sel.register(lst.sock, selectors.EVENT_READ, lst)
        else:
            self.sel.unregister(lst.sock)
        lst.polled = want

    def _maintain(self, rt: ServiceRuntime) -> None:
        """Start the workers the pool wants, then poll exactly the listeners that can be served."""
        now = self.clock()
        if not self.stopping and not rt.retired:
            for _ in range(rt.pool.spawns_needed(now)):
                self._spawn_worker(rt)
        can_take = (not self.stopping and not rt.retired and rt.resting_until <= now
                    and not rt.at_max_child() and rt.pool.pick() is not None)
        for lst in rt.listeners:
            if rt.lends and rt.service.internal is not None:
                # A datagram built-in's socket is lent once, as soon as a worker is READY.
                if can_take and not lst.lent_to:
                    self._lend(lst)
                continue
            self._set_polled(lst, can_take and not lst.lent_to)

    # -- workers ---------------------------------------------------------------
    def _spawn_worker(self, rt: ServiceRuntime) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        service = rt.service
        keep = [theirs.fileno()]
        log_fd = log.log_fd()
        if log_fd > 2:
            keep.append(log_fd)
        internal_ports = self.internal_ports
        log_connections = self.log_connections
        # Objects that exist now are shared copy-on-write with the child; freezing
        # them keeps the collector from touching (and so copying) their pages.
        gc.freeze()
        try:
            pid = spawn.fork_child(
                lambda: worker.run_worker(theirs, service, internal_ports, log_connections), keep)
        except OSError as exc:
            ours.close()
            theirs.close()
            rt.last_error = f"fork: {exc.strerror}"
            log.error("fork_failed", service=service.name, error=exc.strerror)
            rt.pool.backoff_until = self.clock() + EMFILE_PAUSE
            self._wake_at(rt.pool.backoff_until)
            return
        theirs.close()
        ours.setblocking(False)
        handle = WorkerHandle(pid, ours, rt)
        self.workers[pid] = handle
        rt.pool.add_booting(pid, self.clock())
        self.sel.register(ours, selectors.EVENT_READ, handle)

    def _on_worker(self, handle: WorkerHandle) -> None:
        rt = handle.rt
        released = 0
        now = self.clock()
        for _ in range(256):
            try:
                got = fdpass.receive(handle.channel)
            except fdpass.ProtocolError as exc:
                log.error("wire_error", service=rt.service.name, pid=handle.pid, error=str(exc))
                continue
            if got is None:
                break
            msg, fd = got
            if fd is not None:
                os.close(fd)  # workers never send fds
            if msg.kind == fdpass.EOF:
                self._worker_gone(handle, "channel closed")
                break
            if msg.kind == fdpass.DONE:
                for conn_id in msg.ids:
                    if self._end_conn(conn_id, from_worker=True):
                        released += 1
            elif msg.kind == fdpass.SPAWNED:
                rec = self.conns.get(msg.ident)
                if rec is not None:
                    rec.program_pid = msg.pid
            elif msg.kind == fdpass.BOOT_FAILED:
                handle.boot_error = msg.peer
            elif msg.kind == fdpass.READY and rt.pool.mark_ready(handle.pid, now):
                log.debug("worker_ready", service=rt.service.name, pid=handle.pid)
                self._wake_at(now + rt.pool.settings.idle_timeout)
                if handle.stop_sent or rt.retired or self.stopping:
                    self._send_stop(handle)
        if released:
            rt.pool.release(handle.pid, released, now)
            self._wake_at(now + rt.pool.settings.idle_timeout)  # it may now be surplus
        if handle.stop_pending and not handle.closed:
            handle.stop_pending = False
            self._send_stop(handle)
        self._maintain(rt)

    def _end_conn(self, conn_id: int, from_worker: bool) -> bool:
        """Forget a connection or loan; True if it was counted on its worker."""
        rec = self.conns.pop(conn_id, None)
        if rec is None:
            return False
        rt = rec.rt
        rt.instances -= 1
        successor = rt.successor
        while successor is not None:  # its max_child counted this instance too
            self._maintain(successor)
            successor = successor.successor
        if rec.ip and rt.admission.active:
            rt.admission.ended(rec.ip)
        lst = rec.listener
        if lst is not None and lst.lend_id == conn_id:
            lst.lent_to = lst.lend_id = 0
            if rt.service.internal is None and lst.sock.fileno() >= 0:
                # The program may have left the listener blocking (shared file status).
                # (A stop or reload may have closed the listener during the loan.)
                lst.sock.setblocking(False)
            if lst.rt is not rt:
                self._maintain(lst.rt)  # a reload moved it to a new generation
        return from_worker

    def _worker_gone(self, handle: WorkerHandle, reason: str) -> None:
        """The channel hit EOF (the worker exited or crashed). Safe to call twice."""
        if handle.closed:
            return
        handle.closed = True
        self._wake_at(self.clock())  # a backoff may have started: the sweep plans its end
        self.sel.unregister(handle.channel)
        handle.channel.close()
        rt = handle.rt
        slot = rt.pool.remove(handle.pid, self.clock(), reason)
        for conn_id, rec in list(self.conns.items()):
            if rec.worker_pid != handle.pid:
                continue
            if rec.program_pid and _exists(rec.program_pid):
                # The program outlives its worker; as subreaper we will reap it.
                self.orphans[rec.program_pid] = conn_id
                log.info("program_orphaned", service=rt.service.name, pid=rec.program_pid,
                         worker=handle.pid, reason=reason)
            else:
                self._end_conn(conn_id, from_worker=False)
        if slot is not None and slot.state is WorkerState.BOOTING:
            log.error("worker_boot_failed", service=rt.service.name, pid=handle.pid,
                      failures=rt.pool.boot_failures,
                      retry_in=round(max(0.0, rt.pool.backoff_until - self.clock()), 3))
        self._maintain(rt)

    def _send_stop(self, handle: WorkerHandle) -> None:
        if handle.stop_sent or handle.closed:
            return
        handle.stop_sent = True
        handle.rt.pool.drain(handle.pid)
        try:
            fdpass.send(handle.channel, fdpass.encode_stop())
        except BlockingIOError:
            # Its queue is full: retried when it next reports (see _on_worker).
            handle.stop_sent = False
            handle.stop_pending = True
        except OSError:
            pass  # already gone: EOF will follow

    def _stop_worker(self, rt: ServiceRuntime, pid: int) -> None:
        handle = self.workers.get(pid)
        if handle is not None:
            self._send_stop(handle)

    def _reap(self) -> None:
        """Collect every exited child: workers, orphaned programs, strays."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            handle = self.workers.pop(pid, None)
            if handle is not None:
                # Read what it sent before it died (DONE, SPAWNED) before closing.
                for _ in range(64):
                    if handle.closed:
                        break
                    self._on_worker(handle)
                self._worker_gone(handle, f"exited with status {code}")
                rt = handle.rt
                if handle.boot_error:
                    rt.last_error = rt.pool.last_failure = handle.boot_error
                elif code != 0:
                    rt.last_error = f"worker {pid} exited with status {code}"
                expected = self.stopping or (handle.stop_sent and code == 0)
                if not expected:
                    log.warning("worker_exit", service=rt.service.name, pid=pid, status=code)
                else:
                    log.debug("worker_exit", service=rt.service.name, pid=pid, status=code)
                self._maintain(rt)
                self.collect_garbage()
                continue
            if pid in self.orphans:
                self._reap_orphan(pid, code)
                continue
            log.debug("reaped_unknown", pid=pid, status=code)

    def _reap_orphan(self, pid: int, code: int) -> None:
        """A program whose worker died before it has exited (and been reaped by us)."""
        conn_id = self.orphans.pop(pid)
        rec = self.conns.get(conn_id)
        self._end_conn(conn_id, from_worker=False)
        if rec is not None:
            log.info("program_exit", service=rec.rt.service.name, pid=pid, status=code,
                     orphan=True)
            self._maintain(rec.rt)

    def _prune_orphans(self) -> None:
        """Forget orphans that no longer exist without our reaping them.

        A program's exit is normally reported by its worker (DONE) or reaped
        here (subreaper). Should neither happen (the pid was reaped elsewhere),
        waiting for it forever would block a stop; counting it forever would
        hold max_child.
        """
        for pid, conn_id in list(self.orphans.items()):
            with contextlib.suppress(ChildProcessError):
                reaped, status = os.waitpid(pid, os.WNOHANG)
                if reaped == pid:  # ours and exited, but its SIGCHLD went unnoticed
                    self._reap_orphan(pid, os.waitstatus_to_exitcode(status))
                    continue
            if not _exists(pid):
                del self.orphans[pid]
                rec = self.conns.get(conn_id)
                self._end_conn(conn_id, from_worker=False)
                log.warning("orphan_vanished", pid=pid,
                            service=rec.rt.service.name if rec else "?")

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
                self._send_log_fd()
            elif sig in (signal.SIGTTIN, signal.SIGTTOU):
                self._resize_pools(+1 if sig == signal.SIGTTIN else -1)

    def _send_log_fd(self) -> None:
        """Hand every worker the reopened log file (they cannot open it as their user)."""
        fd = log.log_fd()
        if fd <= 2:
            return  # logging to stderr: nothing was reopened
        for handle in self.workers.values():
            if not handle.closed:
                with contextlib.suppress(OSError):
                    fdpass.send(handle.channel, fdpass.encode_logfd(), fd)

    def _resize_pools(self, delta: int) -> None:
        from dataclasses import replace

        for rt in self.runtimes:
            settings = rt.pool.settings
            new_min = max(0, min(settings.pool_max, settings.pool_min + delta))
            rt.pool.settings = replace(settings, pool_min=new_min)
            log.info("pool_resized", service=rt.service.name, pool_min=new_min)
            self._wake_at(self.clock())
            if delta < 0:
                live = [s for s in rt.pool.workers.values() if s.state is not WorkerState.DRAINING]
                spare = [s for s in live if s.state is WorkerState.BOOTING or s.load == 0]
                if len(live) > new_min and spare:
                    self._stop_worker(rt, spare[-1].pid)
            self._maintain(rt)

    def begin_stop(self, timeout: float, why: str, fast: bool = False) -> None:
        """Stop accepting; let workers finish within ``timeout``; then kill what is left."""
        deadline = self.clock() + timeout
        if self.stopping:
            self.stop_deadline = min(self.stop_deadline, deadline)
        else:
            self.stopping = True
            self.stop_deadline = deadline
            log.info("stopping", reason=why, timeout=timeout)
            for rt in self.runtimes:
                for lst in rt.listeners:
                    self._set_polled(lst, False)
                    listeners.close_listener(lst.sock)
                rt.listeners = []
        for handle in list(self.workers.values()):
            self._send_stop(handle)
            if fast and not handle.killed:
                _kill(handle.pid, signal.SIGTERM)

    def _kill_remaining(self) -> None:
        """Past the stop deadline: SIGKILL every worker and program still running."""
        for handle in self.workers.values():
            if not handle.killed:
                handle.killed = True
                log.warning("worker_killed", service=handle.rt.service.name, pid=handle.pid)
                _kill(handle.pid, signal.SIGKILL)
        programs = {rec.program_pid for rec in self.conns.values() if rec.program_pid}
        for pid in programs | set(self.orphans):
            _kill(pid, signal.SIGKILL)
        self.kill_passes += 1
        if self.kill_passes > 10:
            # Everything was SIGKILLed 5 s ago and is still not reaped: something is
            # wrong (a pid we wait for is not our child). Say what, and stop anyway
            # rather than hang a shutdown forever.
            log.error("stop_abandoned", workers=sorted(self.workers),
                      orphans=sorted(self.orphans))
            self.workers.clear()
            self.orphans.clear()
        self.stop_deadline = self.clock() + 0.5

    # -- reload ------------------------------------------------------------------
    def reload(self) -> bool:
        """Re-read the config; apply it all or nothing. True if applied."""
        if self.load_config is None or self.open_sockets is None or self.stopping:
            return False
        prepared = reloadplan.prepare(
            self.load_config,
            {rt.service.key: (rt, rt.service) for rt in self.runtimes if not rt.retired},
            self.open_sockets, self._release_listeners)
        if prepared is None:
            return False
        diff, services, opened = prepared
        added, removed, changed = diff.added, diff.removed, diff.changed
        order = {s.key: i for i, s in enumerate(services)}
        for service, socks in opened:
            self._add_runtime(service, socks)
        for old, service in changed:
            # Same endpoints: the sockets move to a new generation with fresh
            # workers; the old workers finish what they serve and exit.
            new = self._add_runtime(service, [])
            # Limits span generations: running instances and per-IP counts carry over.
            new.predecessors = [p for p in (old, *old.predecessors) if p.instances]
            old.successor = new
            new.admission = old.admission
            new.admission.update(service.limits)
            for lst in old.listeners:
                self._set_polled(lst, False)
                lst.rt = new  # a lent one comes back through its loan's DONE
                new.listeners.append(lst)
            old.listeners = []
            self._retire(old, close_listeners=False)
        for rt in removed:
            self._retire(rt, close_listeners=True)
        self.runtimes.sort(key=lambda rt: (rt.retired, order.get(rt.service.key, 0)))
        self.internal_ports = self._internal_ports()
        for rt in self.runtimes:
            self._maintain(rt)
        self.reloads += 1
        self._wake_at(self.clock())
        self.collect_garbage()
        log.info("reloaded", added=len(added), changed=len(changed), removed=len(removed),
                 unchanged=diff.unchanged)
        return True

    def _release_listeners(self, rt: ServiceRuntime) -> Callable[[], None]:
        """Close a removed service's listeners ahead of the reload (its address is
        wanted by an added one); returns how to reopen them if the reload fails."""
        for lst in rt.listeners:
            self._set_polled(lst, False)
            listeners.close_listener(lst.sock)
        rt.listeners = []

        def restore() -> None:
            assert self.open_sockets is not None
            try:
                socks = self.open_sockets(rt.service)
            except listeners.ListenError as exc:
                log.error("restore_failed", service=rt.service.name, error=str(exc))
                return
            rt.listeners = [Listener(s, rt, listeners.bound_address(s)) for s in socks]
            self._maintain(rt)

        return restore

    def _retire(self, rt: ServiceRuntime, close_listeners: bool) -> None:
        rt.retired = True
        if close_listeners:
            for lst in rt.listeners:
                self._set_polled(lst, False)
                listeners.close_listener(lst.sock)
            rt.listeners = []
        for handle in list(self.workers.values()):
            if handle.rt is rt:
                self._send_stop(handle)

    def collect_garbage(self) -> None:
        """Forget retired generations whose workers and connections are all gone."""
        busy = {h.rt for h in self.workers.values()} | {r.rt for r in self.conns.values()}
        self.runtimes = [rt for rt in self.runtimes if not rt.retired or rt in busy
                         or rt.listeners]

    # -- status -----------------------------------------------------------------
    def status(self) -> dict[str, object]:
        """The live state, as ``poolinetd status --json`` prints it."""
        now = self.clock()
        services = []
        for rt in self.runtimes:
            pool = rt.pool
            programs = sum(1 for rec in self.conns.values() if rec.rt is rt and rec.program_pid)
            services.append({
                "service": rt.service.name,
                "source": f"{rt.service.spec.source}:{rt.service.spec.lineno}",
                "state": ("retiring" if rt.retired else "failing" if pool.failing
                          else "paused" if rt.resting_until > now else "serving"),
                "listeners": [str(lst.bound) for lst in rt.listeners],
                "workers": pool.counts(),
                "pool_min": pool.settings.pool_min,
                "pool_max": pool.settings.pool_max,
                "accepted": rt.accepted,
                "refused": rt.refused,
                "active": rt.instances,
                "programs": programs,
                "restarts": pool.restarts,
                "boot_failures": pool.boot_failures,
                "retry_in": round(max(0.0, pool.backoff_until - now), 3),
                "last_error": rt.last_error or pool.last_failure,
            })
        return {"pid": os.getpid(), "uptime": round(time.time() - self.started, 3),
                "reloads": self.reloads, "stopping": self.stopping, "services": services}

    # -- teardown -------------------------------------------------------------
    def _close_all(self) -> None:
        for rt in self.runtimes:
            for lst in rt.listeners:
                self._set_polled(lst, False)
                listeners.close_listener(lst.sock)
            rt.listeners = []
        if self.control is not None:
            self.control.close(self.sel)
        self.sel.unregister(self.sigpipe.reader)
        self.sigpipe.close()
        self.sel.close()
        if self.ready_fd is not None:
            os.close(self.ready_fd)
            self.ready_fd = None


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _exists(pid: int) -> bool:
    """True if ``pid`` is a live process (zombies included: they still await a reap)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _become_subreaper() -> None:
    """PR_SET_CHILD_SUBREAPER: programs whose worker died are reparented to us, not to init."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER = 36
    except (OSError, AttributeError):
        log.warning("subreaper_unavailable")


def _new_signal_pipe() -> SignalPipe:
    pipe = SignalPipe()
    pipe.install([signal.SIGCHLD, signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT,
                  signal.SIGUSR1, signal.SIGTTIN, signal.SIGTTOU])
    return pipe
