"""Applying a reload: all of it, or nothing.

Touches the OS only through the socket opener it is given (``reloadplan``
opens the added listeners before anything running changes). A reload that
fails at any point (a config error, a listener that cannot be opened)
changes nothing: not the services, not their listeners, not the global
caps, which are applied together with the plan.

What a reload does to a service, by its identity (``reloadplan``):

    added      a new generation on its newly opened listeners
    changed    a new generation that takes over the old one's listeners;
               the old one is retired and finishes what it serves; running
               instances, per-source counts and stats carry over
    removed    its listeners close; it is retired
    unchanged  untouched (listeners, workers, counters)
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from poolinetd.config.spec import Service
from poolinetd.engine import reloadplan
from poolinetd.engine.ledger import Ledger
from poolinetd.engine.runtime import Listener, ServiceRuntime
from poolinetd.engine.services import ServiceTable
from poolinetd.observe import log
from poolinetd.ops import listeners

OpenSockets = Callable[[Service], list[socket.socket]]


class Reloader:
    """Re-reads the config with ``load_config`` and applies it to ``table``."""

    def __init__(self, table: ServiceTable, ledger: Ledger,
                 load_config: reloadplan.LoadConfig, open_sockets: OpenSockets) -> None:
        self.table = table
        self.ledger = ledger
        self.load_config = load_config
        self.open_sockets = open_sockets
        self.reloads = 0  # applied ones

    def reload(self) -> bool:
        """Re-read the config; apply it all or nothing. True if applied."""
        table = self.table
        prepared = reloadplan.prepare(
            self.load_config,
            {rt.service.key: (rt, rt.service) for rt in table.live()},
            self.open_sockets, self._release_listeners, self.table.dispose)
        if prepared is None:
            return False
        diff = prepared.plan
        order = {s.key: i for i, s in enumerate(prepared.services)}
        for service, socks in prepared.opened:
            table.add(service, socks)
        for old, service in diff.changed:
            self._replace(old, service)
        for rt in diff.removed:
            table.close_listeners(rt)
            table.retire(rt)
        table.runtimes.sort(key=lambda rt: (rt.retired, order.get(rt.service.key, 0)))
        table.index()
        # The caps go with the plan: only now that nothing can fail any more.
        self.ledger.caps = prepared.caps
        table.wake_all()
        self.reloads += 1
        table.collect_garbage()
        log.info("reloaded", added=len(diff.added), changed=len(diff.changed),
                 removed=len(diff.removed), unchanged=diff.unchanged)
        return True

    def _replace(self, old: ServiceRuntime, service: Service) -> None:
        """Same endpoints, new settings: the sockets move to a new generation (new workers
        in pool mode); what the old one serves finishes on its own."""
        table = self.table
        new = table.add(service, [])
        # Limits span generations: running instances and per-source counts carry over.
        new.predecessors = [p for p in (old, *old.predecessors) if p.instances]
        old.successor = new
        new.admission = old.admission
        new.admission.update(service)
        new.stats = old.stats
        for lst in old.listeners:
            table.set_polled(lst, False)
            listeners.update_socket_options(lst.sock, old.service, service)
            lst.rt = new  # a lent one comes back when its loan ends
            new.listeners.append(lst)
        old.listeners = []
        table.retire(old)

    def _release_listeners(self, rt: ServiceRuntime) -> Callable[[], None]:
        """Close a removed service's listeners ahead of the reload (its address is
        wanted by an added one); returns how to reopen them if the reload fails."""
        self.table.close_listeners(rt)

        def restore() -> None:
            try:
                socks = self.open_sockets(rt.service)
            except listeners.ListenError as exc:
                log.error("restore_failed", service=rt.name, error=str(exc))
                return
            rt.listeners = [Listener(s, rt, listeners.bound_address(s)) for s in socks]
            self.table.dirty.add(rt)

        return restore
