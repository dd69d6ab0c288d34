"""What a reload changes: the diff of running services against a new config, by identity.

``plan`` is pure. ``prepare`` (shared by pool and classic mode) runs the
loader and socket opener it is given and logs; it changes nothing that runs.
A service's identity is its ServiceKey (socket type and endpoints):
same key and equal Service = unchanged (listener and workers untouched);
same key, different Service = changed (keeps its listener, new workers);
key only in the new config = added; key only in the running one = removed.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from poolinetd.config.spec import Diagnostic, Service, ServiceKey, Severity
from poolinetd.engine.ledger import NO_CAPS, Caps
from poolinetd.observe import log
from poolinetd.ops import listeners

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ReloadPlan(Generic[T]):
    """``T`` is whatever the caller keeps per running service (its runtime record)."""

    added: tuple[Service, ...]
    removed: tuple[T, ...]
    changed: tuple[tuple[T, Service], ...]
    unchanged: int


def plan(running: Mapping[ServiceKey, tuple[T, Service]], wanted: Sequence[Service]
         ) -> ReloadPlan[T]:
    """Diff ``running`` (key -> (record, service)) against the ``wanted`` services."""
    by_key = {s.key: s for s in wanted}
    added = tuple(s for k, s in by_key.items() if k not in running)
    removed = tuple(rec for k, (rec, _) in running.items() if k not in by_key)
    changed = tuple((running[k][0], s) for k, s in by_key.items()
                    if k in running and running[k][1] != s)
    unchanged = len(by_key) - len(added) - len(changed)
    return ReloadPlan(added, removed, changed, unchanged)


@dataclass(frozen=True, slots=True)
class NewConfig:
    """What a reload reads: the services to serve, what the loader said, the global caps.

    With any error among ``diagnostics`` nothing of it is applied.
    """

    services: tuple[Service, ...]
    diagnostics: tuple[Diagnostic, ...]
    caps: Caps = NO_CAPS


LoadConfig = Callable[[], NewConfig]
Opened = list[tuple[Service, list[socket.socket]]]


@dataclass(slots=True)
class Prepared(Generic[T]):
    """A reload ready to apply: nothing running has been touched (but see ``prepare``).

    ``opened`` are the added services' new sockets: the caller owns them.
    """

    plan: ReloadPlan[T]
    services: tuple[Service, ...]  # the new config's, in config order
    opened: Opened
    caps: Caps


def log_diagnostics(diagnostics: Sequence[Diagnostic]) -> None:
    """One ``config_diagnostic`` line each: errors as errors, the rest as warnings."""
    for diag in diagnostics:
        log.event(log.ERROR if diag.severity is Severity.ERROR else log.WARNING,
                  "config_diagnostic", message=str(diag))


def _same_address(a: Service, b: Service) -> bool:
    """Whether two services want the same socket address (so one must let go first)."""
    def addresses(s: Service) -> set[tuple[str, int, bool]]:
        return {(e.address, e.port, s.spec.protocol.is_udp) for e in s.key.endpoints}
    return bool(addresses(a) & addresses(b))


def prepare(load_config: LoadConfig, running: Mapping[ServiceKey, tuple[T, Service]],
            open_sockets: Callable[[Service], list[socket.socket]],
            release: Callable[[T], Callable[[], None]] | None = None,
            dispose: Callable[[int], None] | None = None) -> Prepared[T] | None:
    """Load the new config, diff it, and open every listener it adds.

    Returns what to apply, or None, after logging every reason, when
    the reload must change nothing: a config error, or an added listener that
    cannot be opened (those opened so far are closed again). Nothing running
    is touched here, so the caller applies the plan all or nothing; with one
    exception: when an added service wants the address of a removed one (a unix
    socket changing type, a port moving from tcp to tcp46), ``release(record)``
    closes the removed one's listeners early and returns how to reopen them,
    which is done if the reload fails after all.
    """
    new = load_config()
    services = new.services
    errors = [d for d in new.diagnostics if d.severity is Severity.ERROR]
    log_diagnostics(new.diagnostics)
    if errors:
        log.error("reload_failed", errors=len(errors), action="kept the running config")
        return None
    diff = plan(running, services)
    opened: Opened = []
    restores: list[Callable[[], None]] = []
    removed = {id(rec): (rec, svc) for rec, svc in running.values() if rec in diff.removed}
    for service in diff.added:
        try:
            try:
                opened.append((service, open_sockets(service)))
            except listeners.ListenError:
                holders = [rec for rec, svc in removed.values() if _same_address(svc, service)]
                if release is None or not holders:
                    raise
                for rec in holders:  # hand the address over, then try once more
                    restores.append(release(rec))
                    del removed[id(rec)]
                opened.append((service, open_sockets(service)))
        except listeners.ListenError as exc:
            for _, socks in opened:
                for sock in socks:
                    # A unix listener just bound may already hold a client's
                    # connection (and what it passed): closed by the closer.
                    listeners.close_listener(sock, dispose)
            for restore in restores:
                restore()
            log.error("reload_failed", error=str(exc), action="kept the running config")
            return None
    return Prepared(diff, services, opened, new.caps)
