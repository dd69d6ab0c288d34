"""A ``preload=python`` worker's launches: through its preloader, or exec'd when it cannot.

Touches the OS through ``launch.preload.Preloader`` (the process and its
channel) and the worker (``LaunchHost``: exec, pidfds, reports). The
preloader forks one child per connection; this class keeps what the worker
must know of each:

* ``queue``: connections that came in the first QUEUE_WHILE_BOOTING seconds
  of the preloader's import; sent when it says READY, exec'd if it fails or
  takes longer (later ones are exec'd at once until it is ready; one not ready
  in BOOT_TIMEOUT is killed and reported as failed);
* ``held``: connections sent to it, whose socket the worker still holds
  until SPAWNED (then closed) or REFUSED: if the preloader dies first, the
  program is exec'd on the held socket, so no client is left hanging;
* ``running``: children serving a connection, until the preloader reports
  their EXIT. If the preloader dies, they run on (the master, a subreaper,
  becomes their parent): the worker watches each through a pidfd and reports
  its end without a status (``LaunchHost.watch_foreign``).

A preloader that dies after it was ready is started again: at once if it
had served for RESTART_CALM seconds, else after a delay that doubles up to
RESTART_MAX (a script child that kills its parent on every connection costs
one import per delay, and its own connection). Meanwhile programs are exec'd.
A script that cannot be preloaded (``Failed``) is exec'd for the worker's life.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from poolinetd.config.spec import Service
from poolinetd.launch import preload, program
from poolinetd.observe import log

QUEUE_WHILE_BOOTING = 2.0  # seconds connections wait for a booting preloader; then exec'd
BOOT_TIMEOUT = 60.0  # a preloader not ready by then is killed: preload_failed, exec'd
RESTART_CALM = 10.0  # seconds a preloader must have served to be restarted at once
# While it answers for connections, the preloader is pinged every PING_EVERY seconds; one
# that has not answered PING_TIMEOUT seconds later (stopped, wedged) is killed, so its
# connections are exec'd and its children watched (their ends reported) without it.
PING_EVERY = 5.0
PING_TIMEOUT = 5.0
RESTART_FIRST = 0.5  # then: the first delay
RESTART_MAX = 30.0  # the longest delay


class LaunchHost(Protocol):
    """What the worker does for its preloaded launches."""

    def exec_now(self, conn_id: int, sock: socket.socket, peer: str, local: str) -> None:
        """Launch the program on ``sock`` by exec (closes the worker's copy)."""

    def spawned(self, conn_id: int, pid: int) -> None:
        """SPAWNED for the master."""

    def ended(self, conn_id: int, pid: int, code: int, duration: float, peer: str) -> None:
        """A program exited: DONE, its statistics and its exit line."""

    def dropped(self, conn_id: int) -> None:
        """A connection ended without a program (DONE only)."""

    def watch_foreign(self, conn_id: int, pid: int, peer: str) -> None:
        """Report ``conn_id`` done when ``pid`` (not the worker's child) exits."""

    def watch_preloader(self, fd: int | None) -> None:
        """Poll the preloader's channel (``fd``), or stop polling it (None)."""


@dataclass(slots=True)
class _Held:
    conn_id: int
    sock: socket.socket
    peer: str
    local: str


@dataclass(slots=True)
class _Running:
    pid: int
    peer: str


class Preloaded:
    """The preloaded launches of one worker."""

    def __init__(self, host: LaunchHost, service: Service, clock: Callable[[], float]) -> None:
        self.host = host
        self.service = service
        self.clock = clock
        self.preloader = preload.Preloader(service, program.preloader_env(service),
                                           program.service_rlimits(service))
        self.queue: list[_Held] = []
        self.held: dict[int, _Held] = {}
        self.running: dict[int, _Running] = {}
        self.started_at = 0.0
        self.delay = 0.0  # the next restart's delay (0: at once)
        self.restart_at: float | None = None
        self.ping_at = 0.0  # when to ping next
        self.pinged: float | None = None  # when the unanswered ping was sent

    @property
    def busy(self) -> int:
        """Connections it still answers for (queued, handed, running)."""
        return len(self.queue) + len(self.held) + len(self.running)

    def start(self) -> None:
        """Start the preloader (at the worker's boot, and for each restart)."""
        self.restart_at = None
        self.started_at = self.clock()
        self.pinged = None
        self.ping_at = self.started_at + PING_EVERY
        failed = self.preloader.start()
        if failed is not None:
            self._failed(failed)
            return
        self.host.watch_preloader(self.preloader.fileno())

    def launch(self, conn_id: int, sock: socket.socket, peer: str, local: str) -> None:
        """Launch the program for a connection: through the preloader when it is ready,
        queued while it imports, exec'd otherwise. The socket is the caller's no more."""
        held = _Held(conn_id, sock, peer, local)
        state = self.preloader.state
        if state is preload.State.BOOTING and self.clock() - self.started_at < QUEUE_WHILE_BOOTING:
            self.queue.append(held)
        elif state is preload.State.READY:
            self._send(held)
        else:
            self.host.exec_now(conn_id, sock, peer, local)

    def _send(self, held: _Held) -> None:
        env = program.connection_env(self.service, held.peer, held.local)
        held.sock.setblocking(True)  # O_NONBLOCK is shared with the program's copy
        if self.preloader.send(held.conn_id, held.sock, env):
            self.held[held.conn_id] = held
        else:  # the channel is full or gone: this one is exec'd
            self.host.exec_now(held.conn_id, held.sock, held.peer, held.local)

    def on_readable(self) -> None:
        """Act on what the preloader reported."""
        for event in self.preloader.events():
            if isinstance(event, preload.Spawned):
                held = self.held.pop(event.conn_id, None)
                if held is not None:
                    held.sock.close()
                    self.running[event.conn_id] = _Running(event.pid, held.peer)
                    self.host.spawned(event.conn_id, event.pid)
            elif isinstance(event, preload.Exited):
                run = self.running.pop(event.conn_id, None)
                if run is not None:
                    self.host.ended(event.conn_id, run.pid, event.status, event.usec / 1e6,
                                    run.peer)
            elif isinstance(event, preload.Refused):
                held = self.held.pop(event.conn_id, None)
                if held is not None:
                    held.sock.close()
                    log.error("exec_failed", service=self.service.name,
                              pid=self.preloader.pid, peer=held.peer,
                              program=self.service.program, errno=str(event.errno),
                              error=f"fork: {event.error}")
                    self.host.dropped(event.conn_id)
            elif isinstance(event, preload.Pong):
                self.pinged = None
            elif isinstance(event, preload.Ready):
                self._ready(event)
            elif isinstance(event, preload.Failed):
                self._failed(event)
            else:
                self._died(event)

    def _ready(self, event: preload.Ready) -> None:
        log.info("preload_ready", service=self.service.name, preloader=event.pid,
                 modules=event.modules,
                 seconds=round(self.clock() - self.started_at, 3))
        if event.threads > 1:
            log.warning("preload_threads", service=self.service.name, preloader=event.pid,
                        threads=event.threads)
        queued, self.queue = self.queue, []
        for held in queued:
            self._send(held)

    def _failed(self, event: preload.Failed) -> None:
        """The script cannot be preloaded: said once, with file and line; exec'd from now."""
        log.error("preload_failed", service=self.service.name, file=event.file,
                  line=event.line, error=event.error)
        self.host.watch_preloader(None)
        self.preloader.reap()
        self._exec_waiting()

    def _died(self, event: preload.Died) -> None:
        now = self.clock()
        self.host.watch_preloader(None)
        status = self.preloader.reap()
        log.warning("preload_exit", service=self.service.name, status=status,
                    running=len(self.running))
        self._exec_waiting()
        for conn_id, run in self.running.items():
            self.host.watch_foreign(conn_id, run.pid, run.peer)
        self.running.clear()
        if now - self.started_at >= RESTART_CALM:
            self.delay = 0.0
        else:
            self.delay = min(RESTART_MAX, max(RESTART_FIRST, self.delay * 2))
        self.restart_at = now + self.delay

    def _exec_waiting(self) -> None:
        """Exec the program for every connection the preloader has not taken."""
        waiting = [*self.queue, *self.held.values()]
        self.queue, self.held = [], {}
        for held in waiting:
            self.host.exec_now(held.conn_id, held.sock, held.peer, held.local)

    def due(self) -> float | None:
        """When the worker should call ``tick`` next (a restart, the end of the boot's
        queueing or its timeout), or None."""
        if self.preloader.state is preload.State.BOOTING:
            boot = self.started_at + (QUEUE_WHILE_BOOTING if self.queue else BOOT_TIMEOUT)
            return boot if self.restart_at is None else min(boot, self.restart_at)
        if self.preloader.state is preload.State.READY and (self.held or self.running):
            check = self.ping_at if self.pinged is None else self.pinged + PING_TIMEOUT
            return check if self.restart_at is None else min(check, self.restart_at)
        return self.restart_at

    def tick(self, now: float, stopping: bool) -> None:
        """Restart the preloader when its delay is over (not while the worker stops); exec
        what waited too long for a booting one, and give up on one that never gets ready
        (an import that hangs must not leave clients waiting)."""
        if self.preloader.state is preload.State.BOOTING:
            if self.queue and now - self.started_at >= QUEUE_WHILE_BOOTING:
                queued, self.queue = self.queue, []
                for held in queued:
                    self.host.exec_now(held.conn_id, held.sock, held.peer, held.local)
            if now - self.started_at >= BOOT_TIMEOUT:
                pre = self.service.preload
                assert pre is not None
                why = f"not ready in {BOOT_TIMEOUT:.0f} s (an import hangs?)"
                self._failed(preload.Failed(pre.script, 0, why))
        elif self.preloader.state is preload.State.READY and (self.held or self.running):
            self._check_alive(now)
        if self.restart_at is not None and now >= self.restart_at:
            self.restart_at = None
            if not stopping:
                self.start()

    def _check_alive(self, now: float) -> None:
        """Ping the preloader while it answers for connections; kill it when a ping went
        unanswered (a same-user process can SIGSTOP it: its clients must not wait)."""
        if self.pinged is not None:
            if now - self.pinged >= PING_TIMEOUT:
                log.warning("preload_stalled", service=self.service.name,
                            preloader=self.preloader.pid, seconds=round(now - self.pinged, 1),
                            waiting=len(self.held), running=len(self.running))
                self.pinged = None
                self.preloader.kill()  # its EOF comes next: Died
        elif now >= self.ping_at:
            self.ping_at = now + PING_EVERY
            if self.preloader.ping():
                self.pinged = now

    def abandon(self) -> None:
        """Past the stop deadline: let go of everything (running children run on)."""
        for held in [*self.queue, *self.held.values()]:
            held.sock.close()
        self.queue, self.held = [], {}
        self.running.clear()

    def close(self) -> None:
        self.host.watch_preloader(None)
        self.preloader.close()
        self.abandon()
