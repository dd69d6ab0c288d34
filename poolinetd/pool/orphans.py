"""Programs whose worker died first: the master, as child subreaper, reaps them.

Touches the OS only through the engine's ``System`` (waitpid, identity,
exists). A launched program outlives a crashed or killed worker; the kernel
re-parents it to the master (``PR_SET_CHILD_SUBREAPER``), which keeps
counting its connection until it is reaped, so ``max_child`` and a stop
still see it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from poolinetd.launch.system import System
from poolinetd.observe import log

ORPHAN_CHECK = 1.0  # how often orphans are looked for without a SIGCHLD


@dataclass(frozen=True, slots=True)
class Orphan:
    iid: int  # the instance it serves
    service: str
    worker_pid: int  # the worker that launched it (dead, or dying)


class Orphans:
    """Orphaned programs by pid, until reaped (``reaped``) or seen gone (``prune``)."""

    def __init__(self, system: System) -> None:
        self.system = system
        self.by_pid: dict[int, Orphan] = {}
        self.next_check = 0.0

    def __bool__(self) -> bool:
        return bool(self.by_pid)

    def pids(self) -> list[int]:
        return sorted(self.by_pid)

    def clear(self) -> None:
        self.by_pid.clear()

    def adopt(self, pid: int, iid: int, service: str, worker_pid: int, reason: str) -> None:
        """Program ``pid`` serving ``iid`` outlives its worker ``worker_pid`` (gone: ``reason``)."""
        self.by_pid[pid] = Orphan(iid, service, worker_pid)
        log.info("program_orphaned", service=service, pid=pid, worker=worker_pid, reason=reason)

    def reaped(self, pid: int, code: int) -> int | None:
        """``pid`` was reaped with ``code``: the instance it served, or None if not an orphan."""
        orphan = self.by_pid.pop(pid, None)
        if orphan is None:
            return None
        log.info("program_exit", service=orphan.service, pid=pid, status=code, orphan=True)
        return orphan.iid

    def due(self, now: float) -> bool:
        """Whether a ``prune`` is due (at most once every ORPHAN_CHECK); ``next_check`` is
        then when to come back."""
        if now < self.next_check:
            return False
        self.next_check = now + ORPHAN_CHECK
        return True

    def prune(self, exited: Callable[[int, int], object], ended: Callable[[int], None]) -> None:
        """Forget orphans that no longer exist without our reaping them.

        A program's exit is normally reported by its worker (DONE) or reaped by
        the engine (subreaper). Should neither happen (the pid was reaped
        elsewhere), waiting for it forever would block a stop; counting it
        forever would hold max_child. ``exited(pid, code)``: one was ours and
        had exited unnoticed (reaped here); ``ended(iid)``: one vanished.
        """
        for pid, orphan in list(self.by_pid.items()):
            try:
                reaped, status = self.system.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                # Not our child (yet: while its worker is still exiting, the kernel has
                # not handed it to us). A process with another parent is not ours to
                # wait for or to signal: forget it.
                ident = self.system.identity(pid)
                mine = (os.getpid(), orphan.worker_pid)
                ours = ident is not None and (ident[0] in mine or self._grandchild(ident, mine))
                reaped, status = (0, 0) if ours else (-1, 0)
            if reaped == pid:  # ours and exited, but its SIGCHLD went unnoticed
                exited(pid, os.waitstatus_to_exitcode(status))
                continue
            if reaped == -1 or not self.system.exists(pid):
                del self.by_pid[pid]
                ended(orphan.iid)
                log.warning("orphan_vanished", service=orphan.service, pid=pid)

    def _grandchild(self, ident: tuple[int, int], mine: tuple[int, int]) -> bool:
        """A preloaded program whose preloader (a child of its worker, then of the master)
        is still exiting: it comes to the master next."""
        parent = self.system.identity(ident[0])
        return parent is not None and parent[0] in mine
