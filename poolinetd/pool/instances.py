"""The pool's ledger of instances: which worker serves each one, and which program.

Touches the OS only through the engine's ``System`` (identity, exists,
kill). An instance (a connection or a loan, by the id the engine chose) is
recorded when it is queued for a worker and forgotten when the worker says
DONE, when it is re-routed, or when its worker is gone and no program of it
outlives the worker (one that does becomes an orphan: ``orphans``).

Trust: a worker runs as the service's user and can be taken over by it, so
what it says is believed only about its own instances, and a program pid
only if /proc shows that worker as its parent; the master, as root,
signals a program only while its start time still matches.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

from poolinetd.launch.system import System
from poolinetd.observe import log
from poolinetd.pool.handles import ConnRecord, WorkerHandle
from poolinetd.pool.orphans import Orphans


class Instances:
    """Records by instance id (``by_id``), plus the orphaned programs (``orphans``)."""

    def __init__(self, system: System) -> None:
        self.system = system
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
        """Record program ``pid`` for ``iid`` if it really is a child of ``handle``'s worker.

        False if the worker may not say so (not its instance, a pid <= 1, or
        /proc names another parent: logged). A pid already gone is recorded
        with start time 0, so it is never signalled.
        """
        rec = self.of(handle, iid)
        if rec is None or pid <= 1:
            return False
        ident = self.system.identity(pid)
        if ident is not None and ident[0] != handle.pid and not self._preloaded(handle, ident):
            log.error("wire_error", service=handle.rt.name, pid=handle.pid,
                      error=f"SPAWNED names pid {pid}, which is not this worker's child")
            return False
        rec.program_pid = pid
        rec.program_start = ident[1] if ident is not None else 0  # 0: already gone
        return True

    def _preloaded(self, handle: WorkerHandle, ident: tuple[int, int]) -> bool:
        """A preload=python program: its parent is the worker's preloader (the worker's
        own child), so it is the worker's grandchild."""
        if handle.rt.service.preload is None:
            return False
        parent = self.system.identity(ident[0])
        return parent is not None and parent[0] == handle.pid

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
                    and self.system.exists(rec.program_pid)):
                # The program outlives its worker; as subreaper the master reaps it.
                self.orphans.adopt(rec.program_pid, iid, handle.rt.name, handle.pid, reason)
            else:
                del self.by_id[iid]
                ended.append(iid)
        return ended

    def kill_programs(self) -> None:
        """SIGKILL every recorded program that is still the very process that was started."""
        for rec in self.by_id.values():
            if not rec.program_pid or not rec.program_start:
                continue
            ident = self.system.identity(rec.program_pid)
            if ident is not None and ident[1] == rec.program_start:
                self.system.kill(rec.program_pid, signal.SIGKILL)
