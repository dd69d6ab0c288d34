"""The instance ledger: every connection or loan being served, and the global caps.

Pure bookkeeping (no I/O). One ledger per fact: an instance is counted here
and nowhere else, from the moment it is handed to a dispatcher (or a
listener is lent) until the dispatcher reports it ended. The per-service
counts (``ServiceRuntime.instances``/``programs``) and the global counts
that ``--max-connections`` and ``--max-programs`` cap move together, only
through ``open`` and ``close``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from poolinetd.engine.runtime import Instance, Listener, ServiceRuntime


@dataclass(frozen=True, slots=True)
class Caps:
    """The global caps (None = no cap): the config's defaults or the command line."""

    max_connections: int | None = None
    max_programs: int | None = None


NO_CAPS = Caps()


class Ledger:
    """Running instances by id, and how many count against the global caps.

    ``on_cap_freed`` is called when an instance ends while a cap was reached:
    every service's listeners were unpolled by the cap and must be re-decided.
    """

    def __init__(self, caps: Caps, on_cap_freed: Callable[[], None]) -> None:
        self._caps = caps
        self._uncapped = caps == NO_CAPS
        self.instances: dict[int, Instance] = {}
        self.active = 0  # connections and programs, all services (the global caps count these)
        self.active_programs = 0
        self._ids = itertools.count(1)
        self._on_cap_freed = on_cap_freed

    def open(self, rt: ServiceRuntime, source: Hashable, now: float,
             listener: Listener | None = None) -> int:
        """Count a new instance of ``rt`` (from admission key ``source``); its id."""
        iid = next(self._ids)
        self.instances[iid] = Instance(iid, rt, source, now, listener=listener)
        rt.instances += 1
        self._count(rt, +1)
        return iid

    def close(self, iid: int) -> Instance | None:
        """Uncount instance ``iid``; its record, or None if it was not counted (twice)."""
        inst = self.instances.pop(iid, None)
        if inst is None:
            return None
        inst.rt.instances -= 1
        self._count(inst.rt, -1)
        if inst.program_pid:
            inst.rt.programs -= 1
        return inst

    @property
    def caps(self) -> Caps:
        return self._caps

    @caps.setter
    def caps(self, caps: Caps) -> None:
        self._caps = caps
        self._uncapped = caps == NO_CAPS  # the common case, checked per connection

    def program_started(self, iid: int, pid: int) -> None:
        """Instance ``iid`` is served by program ``pid`` (counted once)."""
        inst = self.instances.get(iid)
        if inst is not None and not inst.program_pid:
            inst.program_pid = pid
            inst.rt.programs += 1

    def below_caps(self, rt: ServiceRuntime) -> bool:
        """Whether one more instance of ``rt`` fits under the global caps."""
        if self._uncapped or not rt.counts_active:
            return True
        caps = self._caps
        if caps.max_connections is not None and self.active >= caps.max_connections:
            return False
        return not (caps.max_programs is not None and rt.is_program
                    and self.active_programs >= caps.max_programs)

    def _count(self, rt: ServiceRuntime, delta: int) -> None:
        if not rt.counts_active:
            return  # a datagram built-in's loan is not a connection
        caps = self._caps
        before = self.active
        self.active += delta
        at_cap = caps.max_connections is not None and before >= caps.max_connections
        if rt.is_program:
            before_programs = self.active_programs
            self.active_programs += delta
            at_cap = at_cap or (caps.max_programs is not None
                                and before_programs >= caps.max_programs)
        if delta < 0 and at_cap:
            self._on_cap_freed()
