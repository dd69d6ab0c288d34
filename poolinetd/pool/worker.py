"""The worker: one pre-forked, privilege-dropped process of a service's pool.

Touches the OS: selector loop over its channel, its built-in connections,
its lent sockets and its children (pidfds); launches programs.

``run_worker(channel, upward, service, ...)`` runs in the child after
``spawn.fork_child`` has closed every inherited fd but the channel, the
write end of its upward pipe and stdio (and the log, for a stderr=log
service). It points its stdio away from the master's (``_own_stdio``),
sends its log lines up the pipe (LOG: the master writes them), drops
privileges, says READY, and then serves until told to STOP (or the master
goes away):

* CONN + fd: a built-in is served in-process, non-blocking, many at once; a
  program is launched on the socket (fds 0, 1, 2: ``launch.program``, the
  same contract as classic mode's) and the worker goes straight back to its
  loop; the connection ends when the program exits.
* LEND + fd: a socket the master keeps too. For a ``wait`` program it becomes
  the program's fd 0 (inetd's tftpd contract); for a datagram built-in the
  worker answers datagrams on it for as long as it lives.

fd ownership: the worker owns every fd it receives and closes it on every
path; the master learns that a connection (or loan) ended from DONE, and
which program serves it from SPAWNED. The channel only brings messages
down (the master's end is shut for reading: a send on it fails with EPIPE);
everything the worker says goes up its pipe (``wire.UpWriter``), which it
closes last, so the master sees EOF when it is done. Its fd 2 is where a
program's stderr goes for a stderr=log service (the log), else /dev/null:
only workers of stderr=log services hold the log file.

``Worker`` runs in-process too (the unit tests drive it turn by turn over a
real socketpair): ``run`` is ``take_signals``, ``start``, ``turn`` while
``serving``, ``close``; the clock and the title setter are parameters.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace

from poolinetd.builtins import internal
from poolinetd.builtins.dgram import DgramResponder as DgramResponder
from poolinetd.config.spec import Service, SocketType, StderrRoute
from poolinetd.launch import program, spawn
from poolinetd.launch.signals import MASTER_ONLY, SignalPipe
from poolinetd.observe import log, stagetrace
from poolinetd.pool import wire
from poolinetd.pool.poller import Poller
from poolinetd.pool.preloaded import Preloaded

STOP_GRACE_ON_MASTER_LOSS = 10.0  # seconds to finish built-in connections if the master dies
_TIMEOUT_SCAN = 1.0
# STATS and the process title are for people (metrics are rendered at most once a
# second, ps is read by eye): sent or set at most this often while busy, at once
# when the worker goes idle. Per loop turn they cost a syscall each.
_REPORT_INTERVAL = 1.0
_TITLE_INTERVAL = 0.5
# The events a worker process logs (its lines travel to the master as LOG). The
# master writes only these: a taken-over worker cannot forge the master's own
# lines ("stopped", "reloaded", ...). Add a worker-side event here, or it is dropped.
LOGGED_EVENTS = frozenset({
    "wire_error", "bad_fd", "bad_loan", "conn_end", "worker_boot_failed", "worker_error",
    "exec_failed", "program_exit", "dgram_refused", "preload_ready", "preload_failed",
    "preload_exit", "preload_threads", "preload_stalled",
})


@dataclass(slots=True)
class _Conn:
    """A built-in stream connection being served."""

    conn_id: int
    sock: socket.socket
    handler: internal.StreamHandler
    peer: str
    started: float
    deadline: float
    events: int = 0


@dataclass(slots=True)
class _Child:
    """A launched program and the connection (or loan) it serves."""

    conn_id: int
    pid: int
    pidfd: int
    peer: str
    started: float
    ours: bool = True  # False: a preloaded program whose preloader died (not reapable here)


@dataclass(slots=True)
class _DgramLoan:
    """A bound datagram socket lent for a built-in: answered until the worker exits."""

    lend_id: int
    sock: socket.socket
    responder: DgramResponder


class Worker:
    """The state of one worker process; ``run()`` is its whole life."""

    def __init__(self, channel: socket.socket, upward: wire.UpWriter, service: Service,
                 internal_ports: frozenset[int], log_connections: bool = False,
                 clock: Callable[[], float] = time.monotonic,
                 set_title: Callable[[str], None] = spawn.set_title) -> None:
        """``channel``: the worker's end of its socketpair (messages down); ``upward``: the
        write end of its pipe (messages up); both owned from now on (closed by
        ``close``). ``clock``: monotonic seconds for every deadline."""
        self.channel = channel
        self.upward = upward
        self.service = service
        self.internal_ports = internal_ports
        self.log_connections = log_connections
        self.clock = clock
        self.set_title = set_title
        self.poller = Poller()
        self.sigpipe: SignalPipe | None = None  # only when it owns the process (take_signals)
        self.next_scan = 0.0  # when silent connections are next looked for
        self.conns: dict[int, _Conn] = {}  # by fd
        self.children: dict[int, _Child] = {}  # by pidfd
        self.dgram: dict[int, _DgramLoan] = {}  # by fd
        self.done: list[int] = []  # ids to report in the next DONE batch
        self.spawned_msgs: list[bytes] = []  # SPAWNED of this turn, sent with its DONE
        self.stat_in = 0  # built-in bytes and program exits, for the next STATS
        self.stat_out = 0
        self.stat_exits: list[tuple[int, int]] = []
        self.stats_due = 0.0  # when pending STATS may be sent while busy
        self.title_due = 0.0  # when the title may change again
        self.title_stale = False  # the state changed since the title was set
        self.stopping = False
        self.stop_deadline: float | None = None
        self.preloader_fd: int | None = None  # polled while a preloader runs
        self.title_state = ""
        self.pid = os.getpid()
        self.sock_type = (socket.SOCK_SEQPACKET if service.socket_type is SocketType.SEQPACKET
                          else socket.SOCK_STREAM)
        # The built-in's connection handler for this socket type, looked up once.
        entry = internal.BY_NAME.get(service.internal) if service.internal else None
        self.handler_factory = entry.handler(service.socket_type) if entry else None
        # preload=python: programs are forked by a preloaded interpreter (pool/preloaded.py).
        self.preloaded = (Preloaded(self, service, clock) if service.preload is not None
                          and service.program is not None else None)

    # -- main loop --------------------------------------------------------
    def run(self) -> int:
        """The worker process's whole life: signals, READY, serve until done, exit code."""
        self.take_signals()
        self.start()
        while self.serving:
            self.turn()
        self.close()
        return 0

    def take_signals(self) -> None:
        """Own the process's signals (only in a worker process: ``close`` restores just
        SIGTERM's and SIGPIPE's handlers, the ignored ones stay ignored).

        SIGTERM (e.g. sent to the whole process group) means what STOP means:
        finish what is being served, then exit. Signals an operator means for
        the master (Ctrl-C, reload, log reopen, resize) are ignored when they
        reach the whole group: the master acts on them and tells the workers.
        """
        self.sigpipe = SignalPipe()
        self.sigpipe.install([signal.SIGTERM])
        for sig in (signal.SIGINT, signal.SIGQUIT, *MASTER_ONLY):
            signal.signal(sig, signal.SIG_IGN)
        self.poller.register(self.sigpipe.reader.fileno(), internal.Want.READ, self.sigpipe)

    def start(self) -> None:
        """Watch the channel and say READY (the master starts sending work)."""
        self.channel.setblocking(False)
        self.poller.register(self.channel.fileno(), internal.Want.READ, None)
        now = self.clock()
        self._set_title(now)
        self.upward.send(wire.encode_ready(self.pid))
        self.next_scan = now + _TIMEOUT_SCAN
        if self.preloaded is not None:
            self.preloaded.start()

    @property
    def serving(self) -> bool:
        """False once it was told to stop and nothing it serves is left."""
        return not (self.stopping and not self.conns and not self.children
                    and not (self.preloaded and self.preloaded.busy))

    def turn(self, max_wait: float | None = None) -> None:
        """One loop turn: wait (at most ``max_wait`` seconds) for something to do, do it,
        expire silent connections, report what ended."""
        now = self.clock()
        deadlines = [self.next_scan] if self.conns or self.stopping else []
        if self.title_stale:
            deadlines.append(self.title_due)
        if self._stats_pending():
            deadlines.append(self.stats_due)
        restart = self.preloaded.due() if self.preloaded is not None else None
        if restart is not None:
            deadlines.append(restart)
        timeout = max(0.0, min(deadlines) - now) if deadlines else None
        if max_wait is not None:
            timeout = max_wait if timeout is None else min(timeout, max_wait)
        for data, _ in self.poller.poll(timeout):
            if data is None:
                self._on_channel()
            elif isinstance(data, SignalPipe):
                if signal.SIGTERM in data.drain():
                    self._begin_stop(None)
            elif isinstance(data, _Conn):
                self._on_conn(data)
            elif isinstance(data, _Child):
                self._on_child(data)
            elif isinstance(data, _DgramLoan):
                data.responder.on_readable()
            elif isinstance(data, Preloaded):
                data.on_readable()
        now = self.clock()
        if self.preloaded is not None:
            self.preloaded.tick(now, self.stopping)
        if now >= self.next_scan:
            self.next_scan = now + _TIMEOUT_SCAN
            self._expire(now)
        # One DONE per loop turn carries every connection that ended in it,
        # the timed-out ones included (sent after _expire: the loop may sleep
        # for good next). Holding DONEs back longer to batch more was
        # measured slower: the master then sees load late.
        self._report(now)
        self._set_title(now)

    def close(self) -> None:
        """The last STATS and DONE, then close every fd the worker still owns (the
        upward pipe last: its EOF tells the master this worker is done)."""
        self._report(None)
        stagetrace.flush()
        if self.preloaded is not None:
            self.preloaded.close()
        for loan in self.dgram.values():
            loan.sock.close()
        self.dgram.clear()
        self.poller.close()
        if self.sigpipe is not None:
            self.sigpipe.close()
        self.channel.close()
        self.upward.close()

    def _on_channel(self) -> None:
        for _ in range(256):  # bounded: connections already here get served too
            try:
                got = wire.receive(self.channel)
            except wire.ProtocolError as exc:
                log.error("wire_error", service=self.service.name, pid=self.pid, error=str(exc))
                lost = exc.message  # the master must not count these forever
                if lost is not None and lost.kind == wire.CONN:
                    self.done.extend(info.conn_id for info in lost.conns)
                elif lost is not None and lost.kind == wire.LEND:
                    self.done.append(lost.ident)
                continue
            if got is None:
                return
            msg, fds = got  # receive checked that fds match the kind
            if msg.kind == wire.CONN:
                for n, (info, fd) in enumerate(zip(msg.conns, fds, strict=True)):
                    if stagetrace.enabled:
                        stagetrace.stamp("received", info.conn_id, None, f"batch={n + 1}")
                    self._on_conn_msg(info, fd)
            elif msg.kind == wire.EOF:
                self._begin_stop(STOP_GRACE_ON_MASTER_LOSS)
                return
            elif msg.kind == wire.LEND:
                self._on_lend(msg.ident, fds[0], msg.env)
            elif msg.kind == wire.STOP:
                self._begin_stop(None)
            elif msg.kind == wire.LOGFD:
                self._adopt_log(fds[0])
            elif msg.kind == wire.PING:
                pass  # reading it was the point
            else:
                log.error("wire_error", service=self.service.name, pid=self.pid,
                          error=f"unexpected message kind {msg.kind}")

    def _adopt_log(self, fd: int) -> None:
        """The master reopened its log (SIGUSR1): a stderr=log worker's fd 2, which its
        programs get as stderr, becomes the new file. Any other worker only closes it
        (the master sends it to none)."""
        if self.service.stderr is StderrRoute.LOG:
            os.dup2(fd, 2)
        os.close(fd)

    def _begin_stop(self, grace: float | None) -> None:
        """Take no more work; finish what is being served (within ``grace`` if given)."""
        if not self.stopping:
            self.stopping = True
            with contextlib.suppress(KeyError, ValueError):
                self.poller.unregister(self.channel.fileno())
            for fd, loan in list(self.dgram.items()):
                self.poller.unregister(fd)
                loan.sock.close()
                self.done.append(loan.lend_id)
                del self.dgram[fd]
        if grace is not None:
            deadline = self.clock() + grace
            if self.stop_deadline is None or deadline < self.stop_deadline:
                self.stop_deadline = deadline

    # -- connections --------------------------------------------------------
    def _on_conn_msg(self, info: wire.ConnInfo, fd: int) -> None:
        try:
            # Family and type given: the socket module need not ask the kernel.
            sock = socket.socket(info.family or -1, self.sock_type, 0, fileno=fd)
        except OSError as exc:
            os.close(fd)
            log.error("bad_fd", service=self.service.name, pid=self.pid, error=exc.strerror)
            self.done.append(info.conn_id)
            return
        if self.service.internal is not None:
            self._start_builtin(info.conn_id, sock, info.peer)
        else:
            self._launch(info.conn_id, sock, info.peer, program.local_address(sock, info.local),
                         info.env)

    def _start_builtin(self, conn_id: int, sock: socket.socket, peer: str) -> None:
        # resolve admits only built-ins the table serves on this socket type
        assert self.handler_factory is not None
        sock.setblocking(False)
        handler = self.handler_factory(sock)
        now = self.clock()
        conn = _Conn(conn_id, sock, handler, peer, now, now + self.service.conn_timeout)
        self._advance(conn, handler.step(), registered=False)

    def _on_conn(self, conn: _Conn) -> None:
        conn.deadline = self.clock() + self.service.conn_timeout
        want = conn.handler.step()
        self._advance(conn, want, registered=True)

    def _advance(self, conn: _Conn, want: int, registered: bool) -> None:
        """Register the connection for what it waits on, or finish it."""
        if not want:
            if registered:
                fd = conn.sock.fileno()
                self.poller.unregister(fd)
                del self.conns[fd]
            self._finish_builtin(conn, conn.handler.end_reason)
            return
        if not registered:  # (Want's values are the poller's epoll bits)
            fd = conn.sock.fileno()
            self.poller.register(fd, want, conn)
            self.conns[fd] = conn
        elif want != conn.events:
            self.poller.modify(conn.sock.fileno(), want)
        conn.events = want

    def _finish_builtin(self, conn: _Conn, status: str) -> None:
        handler = conn.handler
        conn.sock.close()
        self.done.append(conn.conn_id)
        self.stat_in += handler.bytes_in
        self.stat_out += handler.bytes_out
        if stagetrace.enabled:
            stagetrace.stamp("finished", conn.conn_id)
        if self.log_connections:
            log.info("conn_end", service=self.service.name, pid=self.pid, peer=conn.peer,
                     status=status, duration=round(self.clock() - conn.started, 6),
                     bytes_in=handler.bytes_in, bytes_out=handler.bytes_out)

    def _expire(self, now: float) -> None:
        """Close built-in connections silent for conn_timeout (or past the stop deadline)."""
        hard = self.stop_deadline is not None and now >= self.stop_deadline
        for fd, conn in list(self.conns.items()):
            if hard or now >= conn.deadline:
                self.poller.unregister(fd)
                del self.conns[fd]
                self._finish_builtin(conn, "timeout")
        if hard:
            self.children.clear()  # programs run on by themselves; the master is their reaper
            if self.preloaded is not None:
                self.preloaded.abandon()

    # -- programs -----------------------------------------------------------
    def _launch(self, conn_id: int, sock: socket.socket, peer: str, local: str,
                env: tuple[tuple[str, str], ...] = ()) -> None:
        """Start the program on ``sock`` (preloaded, or exec'd); the worker's copy is
        closed on every path. ``env``: tcp_wrappers' setenv pairs (such a rare connection
        is exec'd, so the preloader's protocol need not carry them)."""
        if self.preloaded is not None and not env:
            self.preloaded.launch(conn_id, sock, peer, local)
        else:
            self.exec_now(conn_id, sock, peer, local, env)

    def exec_now(self, conn_id: int, sock: socket.socket, peer: str, local: str,
                 env: tuple[tuple[str, str], ...] = ()) -> None:
        """posix_spawn the program on ``sock``, then close the worker's copy; ``env`` goes
        after the service's own (connection_env ends with ``service.env``)."""
        service = replace(self.service, env=self.service.env + env) if env else self.service
        try:
            pid = program.spawn_program(service, sock, peer, local)
        except OSError as exc:
            program.log_exec_failed(self.service, self.pid, exc, peer=peer)
            self.done.append(conn_id)
            return
        finally:
            sock.close()
        self._track_child(conn_id, pid, peer)

    def _track_child(self, conn_id: int, pid: int, peer: str) -> None:
        self.spawned(conn_id, pid)
        self._watch(conn_id, pid, peer, ours=True)

    def _watch(self, conn_id: int, pid: int, peer: str, ours: bool) -> None:
        """Watch program ``pid`` through a pidfd until it exits (``ours``: reap it then)."""
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            # Ours: not possible before waitpid (reap it anyway). Not ours: already gone.
            if ours:
                os.waitpid(pid, os.WNOHANG)
            self.done.append(conn_id)
            return
        child = _Child(conn_id, pid, pidfd, peer, self.clock(), ours)
        self.children[pidfd] = child
        self.poller.register(pidfd, internal.Want.READ, child)

    def _on_child(self, child: _Child) -> None:
        status = 0
        if child.ours:
            try:
                pid, status = os.waitpid(child.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = child.pid, 0
            if pid == 0:
                return
        self.poller.unregister(child.pidfd)
        os.close(child.pidfd)
        del self.children[child.pidfd]
        if not child.ours:  # its status went to its dead parent's successor, the master
            self.dropped(child.conn_id)
            return
        self.ended(child.conn_id, child.pid, os.waitstatus_to_exitcode(status),
                   self.clock() - child.started, child.peer)

    # -- LaunchHost: what pool.preloaded asks of the worker ---------------------
    def spawned(self, conn_id: int, pid: int) -> None:
        """SPAWNED: the master records which program serves ``conn_id``."""
        if stagetrace.enabled:
            stagetrace.stamp("spawned", conn_id)
        self.spawned_msgs.append(wire.encode_spawned(conn_id, pid))

    def ended(self, conn_id: int, pid: int, code: int, duration: float, peer: str) -> None:
        """A program exited with ``code`` after ``duration`` seconds."""
        self.done.append(conn_id)
        if stagetrace.enabled:
            stagetrace.stamp("exited", conn_id)
        self.stat_exits.append((code, int(duration * 1_000_000)))
        program.log_program_exit(self.service.name, pid, code, duration,
                                 self.log_connections, peer=peer)

    def dropped(self, conn_id: int) -> None:
        self.done.append(conn_id)

    def watch_foreign(self, conn_id: int, pid: int, peer: str) -> None:
        self._watch(conn_id, pid, peer, ours=False)

    def watch_preloader(self, fd: int | None) -> None:
        if fd is None:
            if self.preloader_fd is not None:
                self.poller.unregister(self.preloader_fd)
                self.preloader_fd = None
        else:
            self.preloader_fd = fd
            self.poller.register(fd, internal.Want.READ, self.preloaded)

    # -- loans ----------------------------------------------------------------
    def _on_lend(self, lend_id: int, fd: int, env: tuple[tuple[str, str], ...] = ()) -> None:
        sock = socket.socket(fileno=fd)
        if self.service.internal is not None and self.service.socket_type is SocketType.DGRAM:
            sock.setblocking(False)
            loan = _DgramLoan(lend_id, sock, DgramResponder(sock, self.service,
                                                            self.internal_ports, self.clock))
            self.dgram[sock.fileno()] = loan
            self.poller.register(sock.fileno(), internal.Want.READ, loan)
            return
        if self.service.program is None:
            log.error("bad_loan", service=self.service.name, pid=self.pid)
            sock.close()
            self.done.append(lend_id)
            return
        self._launch(lend_id, sock, "", "", env)

    # -- reporting ------------------------------------------------------------
    def _stats_pending(self) -> bool:
        return bool(self.stat_in or self.stat_out or self.stat_exits)

    def _report(self, now: float | None) -> None:
        """DONE for what ended in this turn; STATS when due, idle or ``now`` is None (exit)."""
        payloads = self.spawned_msgs  # before DONE: a program may end in the same turn
        self.spawned_msgs = []
        if self.done:
            payloads += wire.encode_done(self.done)
            self.done.clear()
        if self._stats_pending() and (now is None or now >= self.stats_due or not (
                self.conns or self.children)):
            payloads += wire.encode_stats(self.stat_in, self.stat_out, self.stat_exits)
            self.stat_in = self.stat_out = 0
            self.stat_exits = []
            self.stats_due = (now or 0.0) + _REPORT_INTERVAL
        # Blocks while the pipe is full: better the worker waits for the master than
        # a DONE is lost (the master would count it forever). One write for the turn:
        # one wakeup of the master, not one per message. OSError: the master is gone
        # (its successor finds any program as an orphan).
        with contextlib.suppress(OSError):
            self.upward.send_all(payloads)

    def _set_title(self, now: float) -> None:
        busy = len(self.conns) + len(self.children) + len(self.dgram) + (
            self.preloaded.busy if self.preloaded is not None else 0)
        if busy == 0:
            state = "draining" if self.stopping else "idle"
        elif busy == 1 and len(self.conns) == 1:
            peer = next(iter(self.conns.values())).peer
            state = peer.replace(" ", ":") if peer else "1 connection"
        else:
            state = f"{busy} connection{'' if busy == 1 else 's'}"
        if state == self.title_state:
            self.title_stale = False
            return
        if now < self.title_due:
            self.title_stale = True  # the loop wakes at title_due to set it
            return
        self.title_state = state
        self.title_stale = False
        self.title_due = now + _TITLE_INTERVAL
        self.set_title(f"poolinetd: {self.service.name} worker {state}")


def run_worker(channel: socket.socket, upward_fd: int, service: Service,
               internal_ports: frozenset[int], log_connections: bool) -> int:
    """The body of a worker child: own its stdio and log, drop privileges, check it can
    serve, then serve.

    Returns the exit code. A worker that cannot serve (privileges refused, the
    program not executable by the service's user) says BOOT_FAILED with the
    reason and exits EX_WORKER_BOOT before READY, so the master puts the
    service into backoff instead of respawning in a loop, and shows the reason
    in status. Fixing the cause needs no restart: the next probe succeeds.
    An unexpected exception is logged (``worker_error``, up the pipe: its
    stderr is /dev/null) and exits EX_SOFTWARE.
    """
    upward = wire.UpWriter(upward_fd)
    _own_stdio(service)
    log.forward(lambda level, name, fields: _send_log(upward, level, name, fields))
    try:
        spawn.set_title(f"poolinetd: {service.name} worker booting")
        stagetrace.forked()
        # Process controls first: raising hard limits and lowering nice need root.
        failed = program.prepare_process(service, pooled=True)
        if failed is None:
            failed = program.drop_privileges(service)
        if failed is not None:
            return _boot_failed(upward, service, failed)
        # Checked here, as the service's user: a program every connection would fail
        # to exec (mode, a directory on the path nobody can search) is one clear error.
        if service.program is not None and not os.access(service.program, os.X_OK):
            return _boot_failed(upward, service, f"{service.program} is not executable by "
                                                 f"{service.user_name}")
        if service.program is not None:
            spawn.restore_fd_limit()  # launched programs inherit it; this worker needs few fds
        return Worker(channel, upward, service, internal_ports, log_connections).run()
    except Exception:
        log.error("worker_error", service=service.name, pid=os.getpid(),
                  traceback=traceback.format_exc()[-1000:])
        return spawn.EX_SOFTWARE


def _own_stdio(service: Service) -> None:
    """Point fds 0 and 1 at /dev/null, and fd 2 at the log for a stderr=log service (its
    programs' stderr), else at /dev/null.

    Whatever the master's stdio is (often the log itself, or the journal), a
    worker, which may be taken over by its service's user, must not hold it:
    with a writable log fd it could truncate the log and forge lines. Its own
    lines go up its pipe instead. Called before ``log.forward`` (which makes
    ``log.log_fd`` answer 2).
    """
    null = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(null, 0)
        os.dup2(null, 1)
        if service.stderr is StderrRoute.LOG:
            log_fd = log.log_fd()  # the master's log (kept across the fork for this)
            if log_fd != 2:
                os.dup2(log_fd, 2)
                os.close(log_fd)  # (the inherited handler is never used again)
        else:
            os.dup2(null, 2)
    finally:
        if null > 2:
            os.close(null)


def _send_log(upward: wire.UpWriter, level: int, name: str, fields: dict[str, object]) -> None:
    """``log.forward``'s sink in a worker: the line goes up as LOG (never raises, never
    logs: a gone master simply misses it)."""
    with contextlib.suppress(OSError, ValueError):
        upward.send(wire.encode_log(level, name, fields))


def _boot_failed(upward: wire.UpWriter, service: Service, reason: str) -> int:
    log.error("worker_boot_failed", service=service.name, pid=os.getpid(), error=reason)
    with contextlib.suppress(OSError):
        upward.send(wire.encode_boot_failed(reason))
    return spawn.EX_WORKER_BOOT
