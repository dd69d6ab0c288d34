"""Whose child a reaped process was: the engine's own children first, then the dispatcher's.

Touches the OS only through the engine's ``System`` (waitpid). The master
forks a new master (an upgrade), tcp_wrappers commands, the resolver and the
closer itself, and its dispatcher forks workers (pool) or connection
children (classic); as the subreaper it also inherits every program whose
worker died first. A pid a worker names (SPAWNED) may be any of these:
``forked`` tells the engine's own children apart, so the dispatcher never
takes one of them for an orphaned program, and ``reap`` offers each pid to
them before the dispatcher.
"""

from __future__ import annotations

import os

from poolinetd.engine.dispatch import Dispatcher
from poolinetd.engine.upgrading import Upgrading
from poolinetd.engine.wrappers_stage import WrappersStage
from poolinetd.launch.closer import Closer
from poolinetd.launch.system import System
from poolinetd.observe import log


class Reaper:
    """Collects exited children (one waitpid loop) and says whose each one was."""

    def __init__(self, system: System, dispatcher: Dispatcher, upgrading: Upgrading,
                 wrappers: WrappersStage, closer: Closer) -> None:
        self.system = system
        self.dispatcher = dispatcher
        self.upgrading = upgrading
        self.wrappers = wrappers
        self.closer = closer

    def forked(self, pid: int) -> bool:
        """Whether the engine forked ``pid`` itself: never a program."""
        return (self.upgrading.owns(pid) or pid in self.wrappers.commands.running
                or pid == self.wrappers.resolver.pid
                or pid == self.closer.pid or pid in self.closer.killed)

    def reap(self) -> None:
        """Reap every exited child; each goes to the first part of the engine it is of."""
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
            if self.upgrading.child_exited(pid, code):
                continue
            if self.wrappers.commands.child_exited(pid, code):
                continue  # a tcp_wrappers spawn or twist command (it logs how it ended)
            if self.wrappers.child_exited(pid):
                log.warning("resolver_exited", pid=pid, status=code)
                continue
            if self.closer.child_exited(pid):
                log.warning("closer_exited", pid=pid, status=code)
                continue
            if not self.dispatcher.child_exited(pid, code):  # a worker, child or orphan
                log.debug("reaped_unknown", pid=pid, status=code)
