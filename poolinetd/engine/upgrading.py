"""The old master's side of a binary upgrade (SIGUSR2, ``poolinetd upgrade``).

Touches the OS: starts the new master (``ops.upgrade``), watches its ready
pipe in the engine's selector, SIGKILLs it if it is not ready in time.

    start()          pass every live listener and the control and metrics
                     sockets to a new master; until it is ready both serve
    on_pipe()        its ready line: hand over (``handed_over``) and drain;
                     anything else: the upgrade failed, this master serves on
    child_exited()   the new master died before it was ready: failed
    expire(now)      not ready by its deadline: SIGKILL, failed

fd ownership: the ``Upgrade`` record owns the pipe's read end; every passed
socket stays this master's (the new master has its own copies). After the
hand-over this master closes its control and metrics servers and disowns
its unix listeners' files (they are the new master's now).
"""

from __future__ import annotations

import contextlib
import selectors
import signal
from typing import Protocol

from poolinetd.engine.runtime import ServiceRuntime
from poolinetd.launch.system import System
from poolinetd.observe import log
from poolinetd.ops import adopt, control, listeners, metricshttp
from poolinetd.ops.sdnotify import Notifier
from poolinetd.ops.upgrade import EXIT_GRACE, TIMEOUT, Upgrade


class Host(Protocol):
    """What the upgrade asks of the engine."""

    control: control.ControlServer | None
    metrics: metricshttp.MetricsServer | None
    notifier: Notifier | None
    watchdog_interval: float | None
    stopping: bool

    def live(self) -> list[ServiceRuntime]:
        """The generations that take new connections."""

    def begin_stop(self, timeout: float, why: str, fast: bool = False) -> None:
        """Stop accepting and drain."""

    def disown_rpc(self, new_pid: int) -> None:
        """Leave the rpcbind mappings of the sockets ``new_pid`` holds registered."""


class Upgrading:
    """At most one upgrade at a time; ``current`` is it, or None."""

    def __init__(self, host: Host, sel: selectors.BaseSelector, system: System,
                 argv: list[str] | None, cwd: str | None, graceful_timeout: float) -> None:
        self.host = host
        self.sel = sel
        self.system = system
        self.argv = argv
        self.cwd = cwd
        self.graceful_timeout = graceful_timeout
        self.current: Upgrade | None = None
        self.handed_over = False  # the new master serves now; this one drains
        self.handed_to = 0  # then: that new master's pid (still a child of this one)

    def start(self) -> str:
        """Start a new master on our sockets; "" if started, else why not."""
        host = self.host
        if self.argv is None:
            return "this master was not given a command line to start a new one with"
        if host.stopping:
            return "this master is stopping"
        if self.current is not None:
            return f"an upgrade is already under way (new master {self.current.pid})"
        sockets = [(lst.sock.fileno(), adopt.endpoint_name(rt.service, i))
                   for rt in host.live() for i, lst in enumerate(rt.listeners)]
        if host.control is not None:
            sockets.append((host.control.sock.fileno(), adopt.CONTROL_NAME))
        if host.metrics is not None:
            sockets.append((host.metrics.sock.fileno(), adopt.METRICS_NAME))
        env: dict[str, str] = {}
        pid_variables = ["LISTEN_PID"]
        if host.notifier is not None:
            env["NOTIFY_SOCKET"] = host.notifier.address
            if host.watchdog_interval:
                env["WATCHDOG_USEC"] = str(int(host.watchdog_interval * 2_000_000))
                pid_variables.append("WATCHDOG_PID")
        try:
            up = Upgrade.start(self.argv, sockets, env, self.system.clock(), pid_variables,
                               self.cwd)
        except OSError as exc:
            log.error("upgrade_failed", reason=f"cannot start a new master: {exc.strerror}",
                      action="this master keeps serving")
            return f"cannot start a new master: {exc.strerror}"
        self.current = up
        self.sel.register(up.reader, selectors.EVENT_READ, lambda _mask: self.on_pipe(up))
        log.info("upgrade_started", new_pid=up.pid, listeners=len(sockets))
        return ""

    def on_pipe(self, up: Upgrade) -> None:
        got = up.read()
        if got is None:
            return
        if isinstance(got, str):
            if up.eof:
                # Most likely it is exiting: wait a moment for its status, which says more.
                self.sel.unregister(up.reader)
                up.deadline = min(up.deadline, self.system.clock() + EXIT_GRACE)
                up.failure = got
                return
            self.failed(got)
            return
        self._hand_over(up)

    def _hand_over(self, up: Upgrade) -> None:
        """The new master serves every socket now: stop accepting, drain, exit."""
        host = self.host
        self._forget(up)
        up.exited(0)  # it outlives us; it is not ours to reap or to warn about
        self.handed_over = True
        self.handed_to = up.pid
        log.info("upgrade_ready", new_pid=up.pid)
        if host.notifier is not None:
            host.notifier.mainpid(up.pid, ready=True)
        for rt in host.live():
            for lst in rt.listeners:
                listeners.disown(lst.sock)  # its unix socket file is the new master's now
        host.disown_rpc(up.pid)  # and so are the rpcbind mappings of the sockets it took
        # The control and metrics sockets are the new master's to answer now.
        if host.control is not None:
            listeners.disown(host.control.sock)
            host.control.close()
            host.control = None
        if host.metrics is not None:
            host.metrics.close()
            host.metrics = None
        host.begin_stop(self.graceful_timeout, "upgrade")

    def child_exited(self, pid: int, code: int) -> bool:
        """Whether reaped ``pid`` was the new master (then the upgrade failed)."""
        up = self.current
        if up is None or pid != up.pid:
            return False
        up.exited(code)
        self.failed(f"the new master exited with status {code}")
        return True

    def next_deadline(self) -> float | None:
        return self.current.deadline if self.current is not None else None

    def expire(self, now: float) -> None:
        up = self.current
        if up is not None and now >= up.deadline:
            self.system.kill(up.pid, signal.SIGKILL)
            self.failed(up.failure or f"the new master was not ready within {TIMEOUT:g} s")

    def failed(self, why: str) -> None:
        """The upgrade is over without a hand-over: say why; this master serves on."""
        up = self.current
        if up is None:
            return
        self._forget(up)
        log.error("upgrade_failed", new_pid=up.pid, reason=why,
                  action="this master keeps serving")

    def _forget(self, up: Upgrade) -> None:
        self.current = None
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(up.reader)
        up.close()

    def owns(self, pid: int) -> bool:
        """Whether ``pid`` is a new master this one started (under way, or handed over)."""
        return pid > 0 and pid in (self.pid, self.handed_to)

    @property
    def pid(self) -> int:
        """The new master's pid while an upgrade is under way, else 0 (status)."""
        return self.current.pid if self.current is not None else 0

