"""Pool mode: connections go to pre-forked, privilege-dropped workers over SCM_RIGHTS.

Touches the OS: socketpair, sendmsg (wire), fork/kill through the
engine's ``System``. The bookkeeping of who is booting, ready or draining is
``bookkeeping``'s (pure); what the master asked of each worker and whether it
reads its channel is ``handles``'; which worker and program serve each
instance is ``instances``' (with ``orphans``, programs whose worker died
first). This module carries out their answers.

fd ownership: the dispatcher owns its end of every worker's channel and the
read end of every worker's upward pipe (both closed when the worker's EOF
is seen on the pipe, when it breaks the protocol, or at ``close``). The
channel only goes down: its master end is shut for reading before the
fork, so a worker cannot queue anything to it, least of all an fd whose
last close would block the master (a lingering socket). Everything a worker
says comes up its pipe, which cannot carry fds. A connection fd given to
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
in its channel are closed instead of hanging (``handles.Liveness``).
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
from dataclasses import replace

from poolinetd.config.spec import StderrRoute
from poolinetd.engine.dispatch import Hooks
from poolinetd.engine.runtime import Listener, ServiceRuntime
from poolinetd.launch.system import System
from poolinetd.observe import log, stagetrace
from poolinetd.pool import bookkeeping, wire, worker, worker_log
from poolinetd.pool.bookkeeping import Pool, WorkerState
from poolinetd.pool.handles import (
    STALL_CHECK,
    STALL_KILL,
    STALL_TIMEOUT,
    Liveness,
    Phase,
    ReadBudget,
    StallStep,
    WorkerHandle,
)
from poolinetd.pool.instances import Instances

__all__ = ["STALL_CHECK", "STALL_KILL", "STALL_TIMEOUT", "PoolDispatcher"]

BOOT_ERROR_MAX = 512  # characters of a worker's BOOT_FAILED reason kept for status
FORK_PAUSE = 1.0  # seconds a pool rests after fork itself failed


class PoolDispatcher:
    """Workers per service, chosen by their ``bookkeeping.Pool``; see the module docstring."""

    mode = "pool"
    lends_per_burst = False  # a datagram built-in's socket stays with one worker
    source_share_cap: int | None = None  # the safe default's share holds as configured

    def __init__(self, system: System | None = None) -> None:
        self.system = system or System()
        self.pools: dict[ServiceRuntime, Pool] = {}
        self.workers: dict[int, WorkerHandle] = {}  # by pid, until reaped
        # Who serves each instance handed off; the master's own children are never programs.
        self.instances = Instances(self.system,
                                   lambda pid: pid in self.workers or self.hooks.forked(pid))
        self.outboxes: list[WorkerHandle] = []  # workers with connections to send
        self.read_budgets: dict[ServiceRuntime, ReadBudget] = {}  # upward messages decoded
        self.hooks: Hooks

    def attach(self, hooks: Hooks) -> None:
        self.hooks = hooks

    # -- services --------------------------------------------------------------
    def add(self, rt: ServiceRuntime) -> None:
        self.pools[rt] = Pool(rt.service.pool)
        self.read_budgets[rt] = ReadBudget()

    def retire(self, rt: ServiceRuntime) -> None:
        for handle in list(self.workers.values()):
            if handle.rt is rt:
                self._send_stop(handle)

    def holds(self, rt: ServiceRuntime) -> bool:
        if any(h.rt is rt for h in self.workers.values()):
            return True
        self.pools.pop(rt, None)
        self.read_budgets.pop(rt, None)
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
                 local: str = "", env: tuple[tuple[str, str], ...] = ()) -> bool:
        """Count ``fd`` on the pool's pick and queue it for the next ``flush``.

        Takes ``fd`` on every path (closed here when no worker can take it).
        """
        pool = self.pools[rt]
        pid = pool.pick()
        if pid is None:
            self.hooks.release(fd, family)
            return False
        self._queue(self.workers[pid], pool, wire.ConnInfo(iid, family, peer, local, env), fd)
        return True

    def _queue(self, handle: WorkerHandle, pool: Pool, info: wire.ConnInfo, fd: int) -> None:
        """Count ``info`` on ``handle`` and put it in its outbox (sent when full or flushed).
        One with setenv pairs travels alone (its text may fill wire.MAX_MESSAGE)."""
        if info.env:
            self._flush_outbox(handle)
        if not handle.outbox:
            self.outboxes.append(handle)
        handle.outbox.append(info)
        handle.outbox_fds.append(fd)
        self.instances.add(info.conn_id, handle.pid)
        self._assign(handle, pool, info.conn_id)
        if len(handle.outbox) >= wire.MAX_CONN_BATCH or info.env:
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
            self.instances.forget(info.conn_id)
            if pool is not None:
                pool.release(handle.pid, 1, now)
                pool.launched(handle.pid, info.conn_id)
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
                self.hooks.release(fd, info.family)
                self.hooks.lost(info.conn_id)
                continue
            self._queue(self.workers[pid], pool, info, fd)

    def lend(self, rt: ServiceRuntime, lst: Listener, iid: int,
             env: tuple[tuple[str, str], ...] = ()) -> bool:
        pool = self.pools[rt]
        pid = pool.pick()
        if pid is None:
            return False
        handle = self.workers[pid]
        try:
            wire.send(handle.channel, wire.encode_lend(iid, env), lst.sock.fileno())
        except OSError as exc:
            log.warning("lend_failed", service=rt.name, pid=pid, error=exc.strerror)
            return False
        handle.loans += 1
        self.instances.add(iid, pid, loan=True)
        self._assign(handle, pool, iid)
        return True

    def _assign(self, handle: WorkerHandle, pool: Pool, iid: int) -> None:
        """Count instance ``iid`` on its worker; recycle it at max_requests; watch its queue.

        A program service's instance is a launch pending in the pool (counted
        against the worker's ``launch_depth``) until SPAWNED or DONE comes back.
        """
        launch_id = iid if handle.rt.service.program is not None else None
        if pool.assign(handle.pid, launch_id):
            log.info("worker_retire", service=handle.rt.name, pid=handle.pid,
                     reason="max_requests")
            self._send_stop(handle)
        now = self.system.clock()
        if handle.watch_queue(now):
            self.hooks.wake_at(now + STALL_CHECK)

    # -- workers ---------------------------------------------------------------
    def _spawn_worker(self, rt: ServiceRuntime, pool: Pool) -> None:
        """Fork a worker of ``rt`` with a fresh channel (down) and pipe (up).

        The child keeps only its channel end, the write end of its pipe, the
        trace fd and, for a stderr=log service only, the log (its programs'
        stderr); the master keeps its channel end, shut for reading before the
        fork (nothing can ever be queued to it), and the pipe's read end, and
        closes the child's ends right after the fork (so EOF on the pipe means
        the worker is gone).
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.shutdown(socket.SHUT_RD)  # the worker's sends now fail with EPIPE
        up_read, up_write = wire.upward_pipe()
        service = rt.service
        keep = [theirs.fileno(), up_write]
        log_fd = log.log_fd()
        if service.stderr is StderrRoute.LOG:
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
                lambda: worker.run_worker(theirs, up_write, service, internal_ports,
                                          log_connections), keep)
        except OSError as exc:
            ours.close()
            theirs.close()
            os.close(up_read)
            os.close(up_write)
            rt.last_error = f"fork: {exc.strerror}"
            log.error("fork_failed", service=service.name, error=exc.strerror)
            pool.backoff_until = self.system.clock() + FORK_PAUSE
            self.hooks.wake_at(pool.backoff_until)
            return
        theirs.close()
        os.close(up_write)
        ours.setblocking(False)
        handle = WorkerHandle(pid, ours, wire.UpReader(up_read), rt)
        self.workers[pid] = handle
        pool.add_booting(pid, self.system.clock())
        self.hooks.watch(handle.upward, lambda _mask: self.on_worker(handle))

    def on_worker(self, handle: WorkerHandle) -> None:
        """Read what a worker said (bounded), then let the engine re-decide its service.

        A worker that breaks the protocol (a bad frame or message) is killed and
        written off at once: what it says can no longer be framed, and a
        well-behaved worker never does it.
        """
        rt = handle.rt
        pool = self.pools.get(rt)
        released = 0
        now = self.system.clock()
        msgs, error = handle.read(now)
        budget = self.read_budgets.get(rt)
        pause = budget.spend(len(msgs), now) if budget is not None else 0.0
        for msg in msgs:
            if msg.kind == wire.EOF:
                self._worker_gone(handle, "channel closed")
            elif msg.kind == wire.DONE:
                released += self._done(handle, pool, msg.ids)
            elif msg.kind == wire.SPAWNED:
                self._spawned(handle, msg.ident, msg.pid)
            elif msg.kind == wire.STATS:
                _add_stats(rt, msg)
            elif msg.kind == wire.LOG:
                worker_log.reemit(handle, msg, now)
            elif msg.kind == wire.BOOT_FAILED:
                # Shown by status in root's terminal: no escape sequences, bounded.
                handle.boot_error = log.worker_text(msg.text[:BOOT_ERROR_MAX])
            elif msg.kind == wire.READY and pool is not None and pool.mark_ready(handle.pid,
                                                                                   now):
                log.debug("worker_ready", service=rt.name, pid=handle.pid)
                self.hooks.wake_at(now + pool.settings.idle_timeout)
                if rt.retired or self.hooks.stopping:
                    self._send_stop(handle)
            elif msg.kind != wire.READY:
                error = error or f"a worker does not send kind {msg.kind}"
                break
        if released and pool is not None:
            pool.release(handle.pid, released, now)
            self.hooks.wake_at(now + pool.settings.idle_timeout)  # it may now be surplus
        worker_log.tell_drops(handle, now)
        if error and handle.open:
            log.error("wire_error", service=rt.name, pid=handle.pid, error=error)
            if handle.phase is not Phase.KILLED:
                self._kill(handle, "protocol error", log.ERROR)
            self._worker_gone(handle, f"protocol error: {error}")
        if handle.phase is Phase.STOP_QUEUED:
            self._send_stop(handle)  # its queue had no room for the STOP: try again
        if pause and handle.open and not handle.paused_until:
            # Its service's workers said more than the master decodes for them: this one
            # is not read for a while (its writes wait; a flood costs the others little).
            self.hooks.unwatch(handle.upward)
            handle.paused_until = now + pause
            self.hooks.wake_at(handle.paused_until)
        self.hooks.refresh(rt)

    def _done(self, handle: WorkerHandle, pool: Pool | None, ids: tuple[int, ...]) -> int:
        """End the instances a DONE names that really are ``handle``'s; how many it ended."""
        if stagetrace.enabled:
            for iid in ids:
                stagetrace.stamp("closed", iid)
        ended = 0
        for iid, rec in self.instances.done(handle, ids):
            if rec.loan:
                handle.loans -= 1
            if pool is not None:
                pool.launched(handle.pid, iid)  # if still pending, it never started (exec failed)
            ended += 1
            self.hooks.ended(iid)
        return ended

    def _spawned(self, handle: WorkerHandle, iid: int, pid: int) -> None:
        """A worker says it started program ``pid`` for ``iid``: its launch is no longer
        pending, whether or not the pid is believed (``Instances.spawned``)."""
        if self.instances.of(handle, iid) is None or pid <= 1:
            return
        pool = self.pools.get(handle.rt)
        if pool is not None:
            pool.launched(handle.pid, iid)
        if self.instances.spawned(handle, iid, pid):
            self.hooks.program_started(iid, pid)

    def _send_stop(self, handle: WorkerHandle) -> None:
        """Take ``handle`` out of rotation and send STOP after what it was given
        (queued for its next report if its channel is full)."""
        if not handle.stop_due:
            return
        self._flush_outbox(handle)  # what it was given comes before the STOP
        if not handle.stop_due:
            return  # (the flush failed and wrote it off)
        pool = self.pools.get(handle.rt)
        if pool is not None:
            pool.drain(handle.pid)
        try:
            wire.send(handle.channel, wire.encode_stop())
        except BlockingIOError:
            handle.stop_queued()  # retried when it next reports (see on_worker)
            return
        except OSError:
            pass  # already gone: EOF will follow
        handle.stop_sent()

    def _kill(self, handle: WorkerHandle, reason: str, level: log.Level) -> None:
        """SIGKILL a worker (once: KILLED is the last phase); it takes no more work."""
        handle.killed()
        pool = self.pools.get(handle.rt)
        if pool is not None:
            pool.drain(handle.pid)
        log.event(level, "worker_killed", service=handle.rt.name, pid=handle.pid, reason=reason)
        self.system.kill(handle.pid, signal.SIGKILL)

    def _worker_gone(self, handle: WorkerHandle, reason: str) -> None:
        """The channel hit EOF (the worker exited or crashed). Safe to call twice."""
        if not handle.close_channel(self.hooks.unwatch):
            return
        worker_log.tell_drops(handle, self.system.clock(), final=True)
        unsent, unsent_fds = handle.take_outbox()  # never reached it
        for info in unsent:
            self.instances.forget(info.conn_id)
        now = self.system.clock()
        self.hooks.wake_at(now)  # a backoff may have started: the sweep plans its end
        rt = handle.rt
        pool = self.pools.get(rt)
        slot = pool.remove(handle.pid, now, reason) if pool is not None else None
        for iid in self.instances.worker_gone(handle, reason):
            self.hooks.ended(iid)
        if slot is not None and slot.state is WorkerState.BOOTING and pool is not None:
            log.error("worker_boot_failed", service=rt.name, pid=handle.pid,
                      failures=pool.boot_failures,
                      retry_in=round(max(0.0, pool.backoff_until - now), 3))
        self._requeue(pool, unsent, unsent_fds)
        self.hooks.refresh(rt)

    def _end(self, iid: int) -> None:
        """Instance ``iid`` is over: forget its record and tell the engine."""
        self.instances.forget(iid)
        self.hooks.ended(iid)

    def child_exited(self, pid: int, code: int) -> bool:
        handle = self.workers.pop(pid, None)
        if handle is not None:
            # Read what it sent before it died (DONE, SPAWNED) before closing.
            for _ in range(64):
                if not handle.open:
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
            expected = self.hooks.stopping or (handle.told_to_stop and code == 0)
            log.event(log.DEBUG if expected else log.WARNING, "worker_exit", service=rt.name,
                      pid=pid, status=code)
            return True
        iid = self.instances.orphans.reaped(pid, code)
        if iid is None:
            return False
        self._end(iid)
        return True

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
        self._resume_reading(now)
        self._ping_lenders(now)
        self._check_stalls(now)
        orphans = self.instances.orphans
        if orphans:
            if orphans.due(now):
                orphans.prune(self.child_exited, self._end)
            self.hooks.wake_at(orphans.next_check)

    def _resume_reading(self, now: float) -> None:
        """Read again the workers whose pause (``on_worker``) is over."""
        for handle in self.workers.values():
            if not handle.paused_until:
                continue
            if now < handle.paused_until:
                self.hooks.wake_at(handle.paused_until)
                continue
            handle.paused_until = 0.0
            if handle.open:
                self._watch(handle)

    def _watch(self, handle: WorkerHandle) -> None:
        self.hooks.watch(handle.upward, lambda _mask: self.on_worker(handle))

    def _ping_lenders(self, now: float) -> None:
        """A worker that holds a lent datagram socket is sent nothing else, so its stall
        would go unseen: it is sent a PING every STALL_CHECK and watched like the rest."""
        for handle in self.workers.values():
            if handle.loans and handle.stop_due:
                if handle.liveness is Liveness.CLEAR:
                    with contextlib.suppress(OSError):
                        wire.send(handle.channel, wire.encode_ping())
                        handle.watch_queue(now)
                self.hooks.wake_at(now + STALL_CHECK)

    def _check_stalls(self, now: float) -> None:
        """Take out of rotation (then kill) workers that stopped reading their channel."""
        for handle in list(self.workers.values()):
            if handle.liveness is Liveness.CLEAR:
                continue
            unread = self.system.unread(handle.channel)
            step = handle.look(unread, now)
            if step is StallStep.CLEARED:
                continue
            if step is StallStep.STALLED:
                handle.rt.last_error = f"worker {handle.pid} stopped reading its connections"
                log.error("worker_stalled", service=handle.rt.name, pid=handle.pid,
                          unread_bytes=unread, seconds=round(now - handle.unread_since, 3))
                # No new connections; a replacement starts. If it wakes up, it
                # serves what is queued, then reads the STOP queued behind it.
                self._send_stop(handle)
                self.hooks.refresh(handle.rt)
            elif step is StallStep.KILL:
                self._kill(handle, "stalled", log.ERROR)
            self.hooks.wake_at(now + STALL_CHECK)

    # -- status ----------------------------------------------------------------------
    def report(self, rt: ServiceRuntime, now: float) -> dict[str, object]:
        stalled = sum(1 for handle in self.workers.values()
                      if handle.rt is rt and handle.liveness is Liveness.STALLED)
        return bookkeeping.report(self.pools.get(rt), stalled, now)

    # -- stop ------------------------------------------------------------------------
    def begin_stop(self, fast: bool) -> None:
        for handle in list(self.workers.values()):
            self._send_stop(handle)
            if fast and handle.phase is not Phase.KILLED:
                self.system.kill(handle.pid, signal.SIGTERM)

    def kill_remaining(self) -> None:
        for handle in list(self.workers.values()):
            if handle.phase is not Phase.KILLED:
                self._kill(handle, "stop deadline", log.WARNING)
        self.instances.kill_programs()

    def busy(self) -> bool:
        return bool(self.workers or self.instances.orphans)

    def abandon(self) -> list[int]:
        pids = sorted(self.workers) + self.instances.orphans.pids()
        self.close()
        self.workers.clear()
        self.instances.orphans.clear()
        return pids

    def reopen_log(self) -> None:
        worker_log.hand_reopened_log(self.workers.values())

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
            handle.close_channel(self._unwatch_quietly)

    def _unwatch_quietly(self, upward: wire.UpReader) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.hooks.unwatch(upward)


def _add_stats(rt: ServiceRuntime, msg: wire.Message) -> None:
    """Count a worker's STATS: built-in bytes, and each program exit with its run time.

    ``wire.decode`` already refused exit codes no program can have (so the
    metrics' exit-code labels stay within 320 values); exits reported by a
    worker whose service runs no program are ignored: it has none to report.
    """
    stats = rt.stats
    stats.builtin_bytes_in += msg.bytes_in
    stats.builtin_bytes_out += msg.bytes_out
    if rt.service.program is None:
        return
    for code, micros in msg.exits:
        stats.program_exit(code, micros / 1_000_000)
