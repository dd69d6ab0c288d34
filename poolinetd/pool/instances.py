"""The pool's ledger of instances: which worker serves each one, and which program.

Touches the OS only through the engine's ``System`` (identity, exists,
kill). An instance (a connection or a loan, by the id the engine chose) is
recorded when it is queued for a worker and forgotten when the worker says
DONE, when it is re-routed, or when its worker is gone and no program of it
outlives the worker (one that does becomes an orphan: ``orphans``).

Trust: a worker runs as the service's user and can be taken over by it, so
what it says is believed only about its own instances. A program pid it
names is recorded as said (SPAWNED comes for every launch, and reading
/proc for each one cost the master more than the rest of its work for the
connection) and checked only when the master would act on it: it adopts a
program as an orphan, or signals one, only while /proc shows the process as
that worker's child, or its grandchild through a child of the worker (a
preloaded program's preloader). Once the worker is gone its programs are
the master's (the subreaper's) children: then a child of the master
counts, or a grandchild through one, but never one the master forked itself
(a worker, a new master, a tcp_wrappers command, the resolver, the closer:
``is_own``). A pid named falsely, or taken over by a later process, fails
that check: it is someone else's.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator

from poolinetd.launch.system import System
from poolinetd.pool.handles import ConnRecord, WorkerHandle
from poolinetd.pool.orphans import Orphans


class Instances:
    """Records by instance id (``by_id``), plus the orphaned programs (``orphans``)."""

    def __init__(self, system: System, is_own: Callable[[int], bool]) -> None:
        """``is_own(pid)``: whether the master forked ``pid`` itself (never a program)."""
        self.system = system
        self.is_own = is_own
        self.by_id: dict[int, ConnRecord] = {}
        self.orphans = Orphans(system)

    def add(self, iid: int, worker_pid: int, loan: bool = False) -> None:
        self.by_id[iid] = ConnRecord(worker_pid, loan=loan)

    def forget(self, iid: int) -> ConnRecord | None:
        return self.by_id.pop(iid, None)

    def of(self, handle: WorkerHandle, iid: int) -> ConnRecord | None:
        """``iid``'s record if ``handle``'s worker serves it (else it may not speak of it)."""
        rec = self.by_id.get(iid)
        return rec if rec is not None and rec.worker_pid == handle.pid else None

    def done(self, handle: WorkerHandle, ids: tuple[int, ...]) -> Iterator[tuple[int, ConnRecord]]:
        """Forget the ids of a DONE that really are ``handle``'s, yielding each; stale or
        forged ids are skipped."""
        for iid in ids:
            rec = self.of(handle, iid)
            if rec is not None:
                del self.by_id[iid]
                yield iid, rec

    def spawned(self, handle: WorkerHandle, iid: int, pid: int) -> bool:
        """Record program ``pid`` for ``iid`` as ``handle``'s worker says (checked when used).

        False if the worker may not say so: not its instance, or a pid <= 1.
        """
        rec = self.of(handle, iid)
        if rec is None or pid <= 1:
            return False
        rec.program_pid = pid
        return True

    def _descends(self, pid: int, worker_pid: int, gone: bool) -> bool:
        """Whether live process ``pid`` is a program of ``worker_pid``: its child, or its
        grandchild through a child of it; once the worker is ``gone``, also the master's
        child (or grandchild through one) that the master did not fork itself."""
        ident = self.system.identity(pid)
        if ident is None or ident[0] <= 1:
            return False
        if self._parent_is(ident[0], pid, worker_pid, gone):
            return True
        parent = self.system.identity(ident[0])
        return parent is not None and self._parent_is(parent[0], ident[0], worker_pid, gone)

    def _parent_is(self, ppid: int, pid: int, worker_pid: int, gone: bool) -> bool:
        return ppid == worker_pid or (gone and ppid == os.getpid() and not self.is_own(pid))

    def worker_gone(self, handle: WorkerHandle, reason: str) -> list[int]:
        """``handle``'s worker is gone: its programs still running become orphans; the ids
        of every other instance it served are forgotten and returned (they ended)."""
        ended = []
        for iid, rec in list(self.by_id.items()):
            if rec.worker_pid != handle.pid:
                continue
            # One program serves one instance: a pid already adopted for another (a
            # lying worker named it in several SPAWNED) would be overwritten there and
            # this instance counted for ever; it ended with its worker instead.
            if (rec.program_pid and rec.program_pid not in self.orphans.by_pid
                    and self._descends(rec.program_pid, handle.pid, gone=True)):
                # The program outlives its worker; as subreaper the master reaps it.
                self.orphans.adopt(rec.program_pid, iid, handle.rt.name, handle.pid, reason)
            else:
                del self.by_id[iid]
                ended.append(iid)
        return ended

    def kill_programs(self) -> None:
        """SIGKILL every recorded program that /proc still shows as its worker's."""
        for rec in self.by_id.values():
            gone = rec.program_pid in self.orphans.by_pid  # adopted: its worker is gone
            if rec.program_pid and self._descends(rec.program_pid, rec.worker_pid, gone):
                self.system.kill(rec.program_pid, signal.SIGKILL)
