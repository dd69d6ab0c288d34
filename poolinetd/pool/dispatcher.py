"""Pool mode: connections go to pre-forked, privilege-dropped workers over SCM_RIGHTS.

Touches the OS: socketpair, sendmsg (fdpass), fork/kill through the
engine's ``System``. The bookkeeping of who is booting, ready or draining is
pool.py's (pure); this module carries out its answers.

fd ownership: the dispatcher owns its end of every worker's channel (closed
when the worker's EOF is seen, or at ``close``). A connection fd given to
``hand_off`` becomes the dispatcher's: it is counted on its worker at once
(so the next pick sees the load) and waits in that worker's outbox until
``flush`` (the end of the engine's accept batch) sends the whole outbox in
one CONN message; sendmsg puts a reference to each open file in the
message, and the dispatcher closes its copies right after. A connection
that cannot be sent (the worker died or its channel is full) is re-routed
to another worker or, failing that, closed and reported ``lost``. A lent
listener is sent at once and stays the engine's.

A worker that stops reading its channel (stopped with SIGSTOP, wedged in a
handler) would black-hole every connection sent to it. The kernel says how
much of what was sent is still unread (SIOCOUTQ); a worker whose unread
queue has not gone down for ``STALL_TIMEOUT`` seconds is *stalled*: it is
taken out of rotation (DRAINING), a replacement starts, status says so, and
after ``STALL_KILL`` more seconds it is killed, so the connections queued
in its channel are closed instead of hanging.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
from dataclasses import dataclass, field, replace

from poolinetd.engine.dispatch import Hooks
from poolinetd.engine.runtime import Listener, ServiceRuntime
from poolinetd.launch.system import System
from poolinetd.observe import log, stagetrace
from poolinetd.pool import wire, worker
from poolinetd.pool.bookkeeping import Pool, WorkerState

FORK_PAUSE = 1.0  # seconds a pool rests after fork itself failed
STALL_CHECK = 1.0  # how often a worker with unread messages is looked at
STALL_TIMEOUT = 2.0  # unread messages not going down this long: stalled
STALL_KILL = 3.0  # then killed this much later if still stalled
ORPHAN_CHECK = 1.0


@dataclass(slots=True, eq=False)
class WorkerHandle:
    """The dispatcher's record of one worker process; dropped only when reaped."""

    pid: int
    channel: socket.socket
    rt: ServiceRuntime
    dispatcher: PoolDispatcher
    closed: bool = False  # channel EOF seen and channel closed
    stop_sent: bool = False
    stop_pending: bool = False  # STOP could not be sent yet (channel full)
    killed: bool = False
    boot_error: str = ""  # why it could not get ready (BOOT_FAILED)
    unread: int = 0  # bytes of the channel it had not read at the last look
    unread_since: float = 0.0  # since when that number has not gone down (0 = all read)
    stalled_at: float = 0.0
    last_heard: float = 0.0  # when it last sent anything
    loans: int = 0  # lent sockets it holds (nothing else may be sent to it for a long time)
    # Connections counted on it but not sent yet (until the next flush), and their fds.
    outbox: list[wire.ConnInfo] = field(default_factory=list)
    outbox_fds: list[int] = field(default_factory=list)

    def on_event(self, mask: int) -> None:
        self.dispatcher.on_worker(self)

    def take_outbox(self) -> tuple[list[wire.ConnInfo], list[int]]:
        """What is queued for it (the caller now owns those fds), leaving it empty."""
        taken = self.outbox, self.outbox_fds
        self.outbox, self.outbox_fds = [], []
        return taken


@dataclass(slots=True, eq=False)
class ConnRecord:
    """A connection or loan handed to a worker, until DONE or its program is reaped."""

    worker_pid: int
    program_pid: int = 0
    program_start: int = 0  # its start time (/proc), so a reused pid is never signalled
    loan: bool = False
    launching: bool = False  # a program its worker has not launched yet (counted in the pool)


class PoolDispatcher:
    """Workers per service, chosen by pool.py; see the module docstring."""

    mode = "pool"
    lends_per_burst = False  # a datagram built-in's socket stays with one worker

    def __init__(self, system: System | None = None) -> None:
        self.system = system or System()
        self.pools: dict[ServiceRuntime, Pool] = {}
        self.workers: dict[int, WorkerHandle] = {}
        self.conns: dict[int, ConnRecord] = {}  # by instance id
        # program pid -> (instance id, service name, its dead worker's pid), for
        # programs whose worker died first
        self.orphans: dict[int, tuple[int, str, int]] = {}
        self.next_orphan_check = 0.0
        self.watch: set[WorkerHandle] = set()  # workers with unread messages
        self.outboxes: list[WorkerHandle] = []  # workers with connections to send
        self.hooks: Hooks

    def attach(self, hooks: Hooks) -> None:
        self.hooks = hooks

    # -- services --------------------------------------------------------------
    def add(self, rt: ServiceRuntime) -> None:
        self.pools[rt] = Pool(rt.service.pool)

    def retire(self, rt: ServiceRuntime) -> None:
        for handle in list(self.workers.values()):
            if handle.rt is rt:
                self._send_stop(handle)

    def holds(self, rt: ServiceRuntime) -> bool:
        if any(h.rt is rt for h in self.workers.values()):
            return True
        self.pools.pop(rt, None)
        return False

    def maintain(self, rt: ServiceRuntime, now: float) -> None:
        pool = self.pools[rt]
        for _ in range(pool.spawns_needed(now)):
            self._spawn_worker(rt, pool)

    def can_take(self, rt: ServiceRuntime) -> bool:
        return self.pools[rt].pick() is not None

    def ready(self, rt: ServiceRuntime) -> bool:
        pool = self.pools[rt]
        counts = pool.counts()
        return pool.failing or counts["idle"] + counts["busy"] >= min(1, pool.settings.pool_min)

    def failing(self, rt: ServiceRuntime) -> bool:
        return self.pools[rt].failing

    # -- dispatch ---------------------------------------------------------------
    def hand_off(self, rt: ServiceRuntime, fd: int, family: int, peer: str, iid: int,
                 local: str = "") -> bool:
        """Count ``fd`` on the pool's pick and queue it for the next ``flush``.

        Takes ``fd`` on every path (closed here when no worker can take it).
        """
        pool = self.pools[rt]
        pid = pool.pick()
        if pid is None:
            os.close(fd)
            return False
        self._queue(self.workers[pid], pool, wire.ConnInfo(iid, family, peer, local), fd)
        return True

    def _queue(self, handle: WorkerHandle, pool: Pool, info: wire.ConnInfo, fd: int) -> None:
        """Count ``info`` on ``handle`` and put it in its outbox (sent when full or flushed)."""
        if not handle.outbox:
            self.outboxes.append(handle)
        handle.outbox.append(info)
        handle.outbox_fds.append(fd)
        launch = handle.rt.service.program is not None
        self.conns[info.conn_id] = ConnRecord(handle.pid, launching=launch)
        self._assign(handle, pool, launch)
        if len(handle.outbox) >= wire.MAX_CONN_BATCH:
            self._flush_outbox(handle)

    def flush(self) -> None:
        """Send every outbox: one sendmsg per worker for what this batch gave it."""
        while self.outboxes:
            self._flush_outbox(self.outboxes.pop())

    def _flush_outbox(self, handle: WorkerHandle) -> None:
        if not handle.outbox:
            return
        infos, fds = handle.take_outbox()
        try:
            wire.send_fds(handle.channel, wire.encode_conns(infos), fds)
        except BlockingIOError:
            log.warning("worker_congested", service=handle.rt.name, pid=handle.pid,
                        connections=len(infos))
            self._reroute(handle, infos, fds, "")
            return
        except OSError as exc:
            log.warning("worker_unreachable", service=handle.rt.name, pid=handle.pid,
                        error=exc.strerror)
            self._reroute(handle, infos, fds, f"channel: {exc.strerror}")
            return
        for fd in fds:
            os.close(fd)  # the worker has its own copies now
        if stagetrace.enabled:
            pool = self.pools.get(handle.rt)
            slot = pool.workers.get(handle.pid) if pool is not None else None
            extra = f"to={handle.pid} load={slot.load if slot else 0} batch={len(infos)}"
            for info in infos:
                stagetrace.stamp("handed", info.conn_id, None, extra)

    def _reroute(self, handle: WorkerHandle, infos: list[wire.ConnInfo], fds: list[int],
                 gone: str) -> None:
        """``handle`` could not be sent ``infos``: give them to other workers, or lose them.

        ``gone``: why its channel is broken (it is written off), else its queue
        is full (it takes nothing more; a replacement starts). Each failure takes
        a worker out of rotation, so this ends.
        """
        pool = self.pools.get(handle.rt)
        now = self.system.clock()
        for info in infos:  # no longer that worker's
            rec = self.conns.pop(info.conn_id, None)
            if pool is not None:
                pool.release(handle.pid, 1, now)
                if rec is not None and rec.launching:
                    pool.launched(handle.pid)
        if gone:
            self._worker_gone(handle, gone)
        else:
            self._send_stop(handle)
        self._requeue(pool, infos, fds)

    def _requeue(self, pool: Pool | None, infos: list[wire.ConnInfo], fds: list[int]) -> None:
        """Queue connections no worker holds on the pool's next pick; close the rest."""
        for info, fd in zip(infos, fds, strict=True):
            pid = pool.pick() if pool is not None else None
            if pool is None or pid is None:
                os.close(fd)
                self.hooks.lost(info.conn_id)
                continue
            self._queue(self.workers[pid], pool, info, fd)

    def lend(self, rt: ServiceRuntime, lst: Listener, iid: int) -> bool:
        pool = self.pools[rt]
        pid = pool.pick()
        if pid is None:
            return False
        handle = self.workers[pid]
        try:
            wire.send(handle.channel, wire.encode_lend(iid), lst.sock.fileno())
        except OSError as exc:
            log.warning("lend_failed", service=rt.name, pid=pid, error=exc.strerror)
            return False
        launch = handle.rt.service.program is not None
        handle.loans += 1
        self.conns[iid] = ConnRecord(pid, loan=True, launching=launch)
        self._assign(handle, pool, launch)
        return True

    def _assign(self, handle: WorkerHandle, pool: Pool, launch: bool) -> None:
        """Count an instance on its worker; recycle it at max_requests; watch its queue.

        ``launch``: a program still to be launched; the pool counts it against
        the worker's ``launch_depth`` until SPAWNED (or DONE) comes back.
        """
        if pool.assign(handle.pid, launch):
            log.info("worker_retire", service=handle.rt.name, pid=handle.pid,
                     reason="max_requests")
            self._send_stop(handle)
        if not handle.unread_since:
            handle.unread_since = self.system.clock()
            handle.unread = 0
            self.watch.add(handle)
            self.hooks.wake_at(handle.unread_since + STALL_CHECK)

    # -- workers ---------------------------------------------------------------
    def _spawn_worker(self, rt: ServiceRuntime, pool: Pool) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        service = rt.service
        keep = [theirs.fileno()]
        log_fd = log.log_fd()
        if log_fd > 2:
            keep.append(log_fd)
        if stagetrace.enabled:
            keep.append(stagetrace.fd())
        internal_ports = self.hooks.internal_ports
        log_connections = self.hooks.log_connections
        # Objects that exist now are shared copy-on-write with the child; freezing
        # them keeps the collector from touching (and so copying) their pages.
        gc.freeze()
        try:
            pid = self.system.fork(
                lambda: worker.run_worker(theirs, service, internal_ports, log_connections), keep)
        except OSError as exc:
            ours.close()
            theirs.close()
            rt.last_error = f"fork: {exc.strerror}"
            log.error("fork_failed", service=service.name, error=exc.strerror)
            pool.backoff_until = self.system.clock() + FORK_PAUSE
            self.hooks.wake_at(pool.backoff_until)
            return
        theirs.close()
        ours.setblocking(False)
        handle = WorkerHandle(pid, ours, rt, self)
        self.workers[pid] = handle
        pool.add_booting(pid, self.system.clock())
        self.hooks.watch(ours, handle.on_event)

    def on_worker(self, handle: WorkerHandle) -> None:
        """Read what a worker said (bounded), then let the engine re-decide its service."""
        rt = handle.rt
        pool = self.pools.get(rt)
        released = 0
        now = self.system.clock()
        for _ in range(256):
            try:
                got = wire.receive(handle.channel)
            except wire.ProtocolError as exc:
                log.error("wire_error", service=rt.name, pid=handle.pid, error=str(exc))
                continue
            if got is None:
                break
            msg, fds = got
            for fd in fds:
                os.close(fd)  # workers send none: whatever kind a message says it is
            handle.last_heard = now
            if msg.kind == wire.EOF:
                self._worker_gone(handle, "channel closed")
                break
            if msg.kind == wire.DONE:
                for iid in msg.ids:
                    if stagetrace.enabled:
                        stagetrace.stamp("closed", iid)
                    rec = self.conns.get(iid)
                    if rec is None or rec.worker_pid != handle.pid:
                        continue  # not this worker's to end (a stale or forged id)
                    del self.conns[iid]
                    if rec.loan:
                        handle.loans -= 1
                    if rec.launching and pool is not None:
                        pool.launched(handle.pid)  # it never started (exec failed)
                    released += 1
                    self.hooks.ended(iid)
            elif msg.kind == wire.SPAWNED:
                self._spawned(handle, msg.ident, msg.pid)
            elif msg.kind == wire.STATS:
                stats = rt.stats
                stats.builtin_bytes_in += msg.bytes_in
                stats.builtin_bytes_out += msg.bytes_out
                for code, micros in msg.exits:
                    stats.program_exit(code, micros / 1_000_000)
            elif msg.kind == wire.BOOT_FAILED:
                handle.boot_error = msg.text
            elif msg.kind == wire.READY and pool is not None and pool.mark_ready(handle.pid,
                                                                                   now):
                log.debug("worker_ready", service=rt.name, pid=handle.pid)
                self.hooks.wake_at(now + pool.settings.idle_timeout)
                if handle.stop_sent or rt.retired or self.hooks.stopping:
                    self._send_stop(handle)
        if released and pool is not None:
            pool.release(handle.pid, released, now)
            self.hooks.wake_at(now + pool.settings.idle_timeout)  # it may now be surplus
        if handle.stop_pending and not handle.closed:
            handle.stop_pending = False
            self._send_stop(handle)
        self.hooks.refresh(rt)

    def _spawned(self, handle: WorkerHandle, iid: int, pid: int) -> None:
        """Record the program a worker says it started for ``iid``, if that is true.

        A worker runs as the service's user, and so can be taken over by it;
        the master, as root, signals programs at a stop. So it believes only
        a pid that really is a child of that worker (its parent in /proc),
        and keeps its start time: a pid that is not, or is no longer, that
        very process is never signalled.
        """
        rec = self.conns.get(iid)
        if rec is None or rec.worker_pid != handle.pid or pid <= 1:
            return
        if rec.launching:  # launched (or not: what it says of the pid is checked below)
            rec.launching = False
            pool = self.pools.get(handle.rt)
            if pool is not None:
                pool.launched(handle.pid)
        ident = self.system.identity(pid)
        if ident is not None and ident[0] != handle.pid:
            log.error("wire_error", service=handle.rt.name, pid=handle.pid,
                      error=f"SPAWNED names pid {pid}, which is not this worker's child")
            return
        rec.program_pid = pid
        rec.program_start = ident[1] if ident is not None else 0  # 0: already gone
        self.hooks.program_started(iid, pid)

    def _kill_program(self, pid: int, start: int) -> None:
        """SIGKILL a program only while ``pid`` is still the process that was started."""
        ident = self.system.identity(pid)
        if start and ident is not None and ident[1] == start:
            self.system.kill(pid, signal.SIGKILL)

    def _send_stop(self, handle: WorkerHandle) -> None:
        if handle.stop_sent or handle.closed:
            return
        self._flush_outbox(handle)  # what it was given comes before the STOP
        if handle.stop_sent or handle.closed:
            return  # (the flush failed and wrote it off)
        handle.stop_sent = True
        pool = self.pools.get(handle.rt)
        if pool is not None:
            pool.drain(handle.pid)
        try:
            wire.send(handle.channel, wire.encode_stop())
        except BlockingIOError:
            # Its queue is full: retried when it next reports (see on_worker).
            handle.stop_sent = False
            handle.stop_pending = True
        except OSError:
            pass  # already gone: EOF will follow

    def _worker_gone(self, handle: WorkerHandle, reason: str) -> None:
        """The channel hit EOF (the worker exited or crashed). Safe to call twice."""
        if handle.closed:
            return
        handle.closed = True
        self.watch.discard(handle)
        unsent, unsent_fds = handle.take_outbox()  # never reached it
        for info in unsent:
            self.conns.pop(info.conn_id, None)
        now = self.system.clock()
        self.hooks.wake_at(now)  # a backoff may have started: the sweep plans its end
        self.hooks.unwatch(handle.channel)
        handle.channel.close()
        rt = handle.rt
        pool = self.pools.get(rt)
        slot = pool.remove(handle.pid, now, reason) if pool is not None else None
        for iid, rec in list(self.conns.items()):
            if rec.worker_pid != handle.pid:
                continue
            if rec.program_pid and self.system.exists(rec.program_pid):
                # The program outlives its worker; as subreaper the master reaps it.
                self.orphans[rec.program_pid] = (iid, rt.name, handle.pid)
                log.info("program_orphaned", service=rt.name, pid=rec.program_pid,
                         worker=handle.pid, reason=reason)
            else:
                del self.conns[iid]
                self.hooks.ended(iid)
        if slot is not None and slot.state is WorkerState.BOOTING and pool is not None:
            log.error("worker_boot_failed", service=rt.name, pid=handle.pid,
                      failures=pool.boot_failures,
                      retry_in=round(max(0.0, pool.backoff_until - now), 3))
        self._requeue(pool, unsent, unsent_fds)
        self.hooks.refresh(rt)

    def child_exited(self, pid: int, code: int) -> bool:
        handle = self.workers.pop(pid, None)
        if handle is not None:
            # Read what it sent before it died (DONE, SPAWNED) before closing.
            for _ in range(64):
                if handle.closed:
                    break
                self.on_worker(handle)
            self._worker_gone(handle, f"exited with status {code}")
            rt = handle.rt
            pool = self.pools.get(rt)
            if handle.boot_error:
                rt.last_error = handle.boot_error
                if pool is not None:
                    pool.last_failure = handle.boot_error
            elif code != 0:
                rt.last_error = f"worker {pid} exited with status {code}"
            expected = self.hooks.stopping or (handle.stop_sent and code == 0)
            log.event(log.DEBUG if expected else log.WARNING, "worker_exit", service=rt.name, pid=pid,
                      status=code)
            return True
        orphan = self.orphans.pop(pid, None)
        if orphan is not None:
            iid, name, _ = orphan
            self.conns.pop(iid, None)
            log.info("program_exit", service=name, pid=pid, status=code, orphan=True)
            self.hooks.ended(iid)
            return True
        return False

    def dgram_log_due(self, rt: ServiceRuntime, now: float) -> int | None:
        return 0  # the engine never judges a pool's datagrams (its workers do, and log)

    # -- housekeeping --------------------------------------------------------------
    def sweep(self, now: float) -> None:
        for rt, pool in self.pools.items():
            if rt.retired:
                continue
            surplus = pool.surplus(now)
            for pid in surplus:
                log.info("worker_retire", service=rt.name, pid=pid, reason="idle")
                self._send_stop(self.workers[pid])
            deadline = pool.next_deadline(now)
            if deadline is not None:
                self.hooks.wake_at(deadline)
            if surplus or pool.spawns_needed(now):  # (a backoff ended, or the pool shrank)
                self.hooks.refresh(rt)
        self._ping_lenders(now)
        self._check_stalls(now)
        if self.orphans:
            if now >= self.next_orphan_check:
                self.next_orphan_check = now + ORPHAN_CHECK
                self._prune_orphans()
            self.hooks.wake_at(self.next_orphan_check)

    def _ping_lenders(self, now: float) -> None:
        """A worker that holds a lent datagram socket is sent nothing else, so its stall
        would go unseen: it is sent a PING every STALL_CHECK and watched like the rest."""
        for handle in self.workers.values():
            if handle.loans and not handle.closed and not handle.stop_sent:
                if handle not in self.watch:
                    with contextlib.suppress(OSError):
                        wire.send(handle.channel, wire.encode_ping())
                        handle.unread_since = now
                        handle.unread = 0
                        self.watch.add(handle)
                self.hooks.wake_at(now + STALL_CHECK)

    def _check_stalls(self, now: float) -> None:
        """Take out of rotation (then kill) workers that stopped reading their channel."""
        for handle in list(self.watch):
            if handle.closed:
                self.watch.discard(handle)
                continue
            unread = self.system.unread(handle.channel)
            if unread <= 0:  # all read (or the kernel cannot tell: assume progress)
                handle.unread_since = handle.unread = 0
                handle.stalled_at = 0.0
                self.watch.discard(handle)
                continue
            if unread < handle.unread or not handle.unread or handle.last_heard >= (
                    handle.unread_since):
                handle.unread = unread  # it read or said something: progress
                handle.unread_since = now
            elif now - handle.unread_since >= STALL_TIMEOUT and not handle.stalled_at:
                handle.stalled_at = now
                handle.rt.last_error = f"worker {handle.pid} stopped reading its connections"
                log.error("worker_stalled", service=handle.rt.name, pid=handle.pid,
                          unread_bytes=unread, seconds=round(now - handle.unread_since, 3))
                # No new connections; a replacement starts. If it wakes up, it
                # serves what is queued, then reads the STOP queued behind it.
                self._send_stop(handle)
                self.hooks.refresh(handle.rt)
            elif handle.stalled_at and now - handle.stalled_at >= STALL_KILL and not handle.killed:
                handle.killed = True
                log.error("worker_killed", service=handle.rt.name, pid=handle.pid,
                          reason="stalled")
                self.system.kill(handle.pid, signal.SIGKILL)
            self.hooks.wake_at(now + STALL_CHECK)

    def _prune_orphans(self) -> None:
        """Forget orphans that no longer exist without our reaping them.

        A program's exit is normally reported by its worker (DONE) or reaped by
        the engine (subreaper). Should neither happen (the pid was reaped
        elsewhere), waiting for it forever would block a stop; counting it
        forever would hold max_child.
        """
        for pid, (iid, _, worker_pid) in list(self.orphans.items()):
            try:
                reaped, status = self.system.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                # Not our child (yet: while its worker is still exiting, the kernel has
                # not handed it to us). A process with another parent is not ours to
                # wait for or to signal: forget it.
                ident = self.system.identity(pid)
                ours = ident is not None and ident[0] in (os.getpid(), worker_pid)
                reaped, status = (0, 0) if ours else (-1, 0)
            if reaped == pid:  # ours and exited, but its SIGCHLD went unnoticed
                self.child_exited(pid, os.waitstatus_to_exitcode(status))
                continue
            if reaped == -1 or not self.system.exists(pid):
                name = self.orphans.pop(pid)[1]
                self.conns.pop(iid, None)
                self.hooks.ended(iid)
                log.warning("orphan_vanished", service=name, pid=pid)

    # -- status ----------------------------------------------------------------------
    def report(self, rt: ServiceRuntime, now: float) -> dict[str, object]:
        pool = self.pools.get(rt)
        if pool is None:
            return {"workers": {"booting": 0, "idle": 0, "busy": 0, "draining": 0,
                                "stalled": 0}, "pool_min": 0, "pool_max": 0, "restarts": 0,
                    "boot_failures": 0, "retry_in": 0.0}
        counts: dict[str, int] = {**pool.counts(), "stalled": 0}
        for handle in self.workers.values():
            if handle.rt is rt and handle.stalled_at and not handle.closed:
                counts["stalled"] += 1
        return {"workers": counts, "pool_min": pool.settings.pool_min,
                "pool_max": pool.settings.pool_max, "restarts": pool.restarts,
                "boot_failures": pool.boot_failures,
                "retry_in": round(max(0.0, pool.backoff_until - now), 3),
                "last_error": pool.last_failure}

    # -- stop ------------------------------------------------------------------------
    def begin_stop(self, fast: bool) -> None:
        for handle in list(self.workers.values()):
            self._send_stop(handle)
            if fast and not handle.killed:
                self.system.kill(handle.pid, signal.SIGTERM)

    def kill_remaining(self) -> None:
        for handle in self.workers.values():
            if not handle.killed:
                handle.killed = True
                log.warning("worker_killed", service=handle.rt.name, pid=handle.pid,
                            reason="stop deadline")
                self.system.kill(handle.pid, signal.SIGKILL)
        for rec in self.conns.values():
            if rec.program_pid:
                self._kill_program(rec.program_pid, rec.program_start)

    def busy(self) -> bool:
        return bool(self.workers or self.orphans)

    def abandon(self) -> list[int]:
        pids = sorted(self.workers) + sorted(self.orphans)
        self.close()
        self.workers.clear()
        self.orphans.clear()
        return pids

    def reopen_log(self) -> None:
        """Hand every worker the reopened log file (they cannot open it as their user)."""
        fd = log.log_fd()
        if fd <= 2:
            return  # logging to stderr: nothing was reopened
        for handle in self.workers.values():
            if not handle.closed:
                with contextlib.suppress(OSError):
                    wire.send(handle.channel, wire.encode_logfd(), fd)

    def resize(self, rt: ServiceRuntime, delta: int) -> int | None:
        pool = self.pools[rt]
        settings = pool.settings
        new_min = max(0, min(settings.pool_max, settings.pool_min + delta))
        pool.settings = replace(settings, pool_min=new_min)
        self.hooks.wake_at(self.system.clock())
        if delta < 0:
            live = [s for s in pool.workers.values() if s.state is not WorkerState.DRAINING]
            spare = [s for s in live if s.state is WorkerState.BOOTING or s.load == 0]
            if len(live) > new_min and spare:
                self._send_stop(self.workers[spare[-1].pid])
        return new_min

    def close(self) -> None:
        """Close every worker channel still open (the workers see EOF and stop)."""
        self.flush()
        for handle in self.workers.values():
            if not handle.closed:
                handle.closed = True
                with contextlib.suppress(KeyError, ValueError):
                    self.hooks.unwatch(handle.channel)
                handle.channel.close()
