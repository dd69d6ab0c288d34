"""The service table: every generation the engine runs, its listeners and their polling.

Touches the OS only through the selector it is given (register/unregister a
listener) and ``listeners.close_listener``. Owns the listeners of every
generation: they are closed here (a stop, a removed service) or moved to a
new generation by a reload; a lent listener stays here, only unpolled.

    table.add(service, socks)   a new generation (start, reload)
    table.dirty                 generations whose capacity changed this turn:
                                the engine re-decides their polling at the
                                end of the turn (backpressure)
    table.set_polled(lst, ...)  exactly the listeners that can be served are
                                in the selector
"""

from __future__ import annotations

import dataclasses
import selectors
import socket
from collections.abc import Callable, Collection, Iterable

from poolinetd.admission import readers
from poolinetd.builtins import internal
from poolinetd.config.spec import Service
from poolinetd.engine.dispatch import Dispatcher
from poolinetd.engine.runtime import Listener, ServiceRuntime
from poolinetd.net import preamble as pre
from poolinetd.observe import log
from poolinetd.ops import listeners, rpcbind

PreambleFactory = Callable[[Service], Callable[[], pre.Preamble] | None]


class ServiceTable:
    """The engine's generations in config order (retired ones last), and their listeners.

    ``on_listener(lst)`` is what the selector calls when a polled listener is
    readable. ``preambles`` overrides how a service's preamble reader is
    chosen (unit tests); by default ``readers.for_service``.
    """

    def __init__(self, sel: selectors.BaseSelector, dispatcher: Dispatcher,
                 on_listener: Callable[[Listener], None],
                 preambles: PreambleFactory | None = None,
                 dispose: Callable[[int], None] | None = None) -> None:
        """``dispose(fd)`` closes a unix listener without blocking (the closer)."""
        self.sel = sel
        self.dispose = dispose
        self.dispatcher = dispatcher
        self.on_listener = on_listener
        self.preambles = preambles
        self.runtimes: list[ServiceRuntime] = []
        self.dirty: set[ServiceRuntime] = set()
        self.tcpmux_routes: dict[str, ServiceRuntime] = {}
        self.internal_ports: frozenset[int] = frozenset()
        # Keeps rpcbind's mappings in step with the open RPC listeners (set by the engine).
        self.registrar: rpcbind.Registrar | None = None

    def add(self, service: Service, socks: Iterable[socket.socket]) -> ServiceRuntime:
        """A new generation of ``service`` on ``socks`` (taken: the table owns them now).

        Call ``index`` after the last ``add`` of a batch (start, reload)."""
        rt = ServiceRuntime(service, share_cap=self.dispatcher.source_share_cap)
        if self.preambles is not None:
            rt.preamble = self.preambles(service)
        else:
            rt.preamble = readers.for_service(service, self._tcpmux_names)
        if service.internal is not None:
            rt.reply = internal.engine_reply(service.internal, service.socket_type)
        # No dispatcher behind it: the engine reads the tcpmux name, or answers itself.
        rt.engine_served = service.internal == "tcpmux" or rt.reply is not None
        for sock in socks:
            rt.listeners.append(Listener(sock, rt, listeners.bound_address(sock)))
        self.runtimes.append(rt)
        if not rt.engine_served:
            self.dispatcher.add(rt)
        self.dirty.add(rt)
        return rt  # the caller calls ``index`` once it has added them all (O(n), not O(n^2))

    def index(self) -> None:
        """Re-derive what depends on the set of live generations (after add, reload)."""
        self.tcpmux_routes = {rt.service.tcpmux_name: rt for rt in self.runtimes
                              if rt.service.tcpmux_name and not rt.retired}
        self.internal_ports = internal.guarded_ports(
            lst.bound.port for rt in self.runtimes if rt.service.internal is not None
            for lst in rt.listeners)
        self.sync_rpc()

    def rpc_mappings(self, only: Collection[socket.socket] | None = None
                     ) -> dict[rpcbind.Mapping, str]:
        """What rpcbind should map for every open RPC listener (or those of ``only``),
        each mapping with its service's name."""
        wanted: dict[rpcbind.Mapping, str] = {}
        for rt in self.runtimes:
            rpc = rt.service.rpc
            if rpc is None:
                continue
            for lst in rt.listeners:
                if lst.sock.fileno() < 0 or (only is not None and lst.sock not in only):
                    continue
                bound = lst.bound
                for m in rpcbind.mappings(rpc.number, rpc.versions, rpc.netids,
                                          bound.family, bound.address, bound.port):
                    wanted[m] = rt.name
        return wanted

    def sync_rpc(self) -> None:
        """Register what the open RPC listeners serve; unset what a closed one served
        (a reload removed or changed its service, a stop, a listener that failed)."""
        if self.registrar is not None:
            self.registrar.sync(self.rpc_mappings())

    def _tcpmux_names(self) -> dict[str, bool]:
        """tcpmux sub-services by lower-cased name -> whether it is '+' (the reader's view)."""
        return {name: rt.service.tcpmux_plus for name, rt in self.tcpmux_routes.items()}

    def live(self) -> list[ServiceRuntime]:
        """The generations that take new connections (not retired)."""
        return [rt for rt in self.runtimes if not rt.retired]

    def retire(self, rt: ServiceRuntime) -> None:
        """``rt`` takes nothing new; what it serves finishes on its own."""
        rt.retired = True
        if not rt.engine_served:
            self.dispatcher.retire(rt)
        self.dirty.add(rt)

    def set_polled(self, lst: Listener, want: bool) -> None:
        if want == lst.polled:
            return
        if want:
            self.sel.register(lst.sock, selectors.EVENT_READ,
                              lambda _mask: self.on_listener(lst))
        else:
            self.sel.unregister(lst.sock)
        lst.polled = want

    def check_returned(self, lst: Listener) -> None:
        """A lent socket came back: if its holder poisoned it for its successors (a
        locked drop-all filter, a connected datagram socket), serve on a fresh one."""
        why = listeners.tampered(lst.sock)
        if not why:
            return
        rt = lst.rt
        failed = self.reopen(lst)
        if failed:
            rt.last_error = f"lent socket tampered with ({why}), cannot reopen: {failed}"
            log.error("lent_socket_tampered", service=rt.name, reason=why, action="closed",
                      error=failed)
        else:
            log.warning("lent_socket_tampered", service=rt.name, reason=why,
                        action="reopened", address=str(lst.bound))

    def reopen(self, lst: Listener) -> str:
        """Replace ``lst``'s socket by a fresh one on the same address (a holder tampered
        with it); "" if done, else why not (the listener is then gone)."""
        rt = lst.rt
        endpoint = rt.service.key.endpoints[rt.listeners.index(lst)]
        if endpoint.port == 0:  # "any free port": keep the one clients were told
            endpoint = dataclasses.replace(endpoint, port=lst.bound.port)
        self.set_polled(lst, False)
        listeners.close_listener(lst.sock, self.dispose)
        try:
            lst.sock = listeners.open_endpoint(rt.service, endpoint)
        except listeners.ListenError as exc:
            rt.listeners.remove(lst)
            self.sync_rpc()  # its port is gone: so are its rpcbind mappings
            return str(exc)
        self.dirty.add(rt)
        return ""

    def close_listeners(self, rt: ServiceRuntime) -> None:
        for lst in rt.listeners:
            self.set_polled(lst, False)
            listeners.close_listener(lst.sock, self.dispose)
        rt.listeners = []

    def close_all(self) -> None:
        for rt in self.runtimes:
            self.close_listeners(rt)
        self.sync_rpc()

    def wake_all(self) -> None:
        """Every generation re-decides its polling (a global cap freed, caps changed)."""
        self.dirty.update(self.runtimes)

    def wake_successors(self, rt: ServiceRuntime) -> None:
        """An instance of ``rt`` ended: it and every newer generation (whose max_child
        counted it too) re-decide."""
        self.dirty.add(rt)
        successor = rt.successor
        while successor is not None:
            self.dirty.add(successor)
            successor = successor.successor

    def collect_garbage(self) -> None:
        """Forget retired generations that serve nothing any more."""
        self.runtimes = [rt for rt in self.runtimes if not rt.retired or rt.instances
                         or rt.listeners or (not rt.engine_served and self.dispatcher.holds(rt))]
        for rt in self.runtimes:
            rt.predecessors = [p for p in rt.predecessors if p.instances]
