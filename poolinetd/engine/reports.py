"""The documents the engine answers with: status, the metrics, the ready report, STATUS=.

Pure functions of what they are given (they read it and change nothing):
``poolinetd status``, ``/metrics`` and ``poolinetd metrics``, the
``--ready-fd`` listener list, systemd's STATUS line. The same shapes in both
modes. ``runtimes`` are the engine's generations in config order; the
dispatcher answers for its part of each (workers, pool sizes, failures).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

from poolinetd.engine.dispatch import Dispatcher
from poolinetd.engine.runtime import ServiceRuntime
from poolinetd.observe import metrics, syslog

Runtimes = Sequence[ServiceRuntime]
RpcState = Callable[[str], tuple[bool, str]]  # service name -> (registered, why not)


def summary(runtimes: Runtimes, mode: str, reloads: int) -> str:
    """One line for systemd's STATUS=: what is served and how busy it is."""
    live = [rt for rt in runtimes if not rt.retired]
    active = sum(rt.instances for rt in runtimes)
    return (f"{mode} mode: {len(live)} services, {active} active, "
            f"{sum(rt.stats.accepted for rt in live)} accepted, {reloads} reloads")


def listener_report(runtimes: Runtimes) -> list[dict[str, object]]:
    """What is listened on, in config order (for --ready-fd, startup log, status)."""
    return [{"service": rt.name, "family": lst.bound.family, "address": lst.bound.address,
             "port": lst.bound.port, "socket_type": rt.service.socket_type.value,
             "source": f"{rt.service.spec.source}:{rt.service.spec.lineno}"}
            for rt in runtimes if not rt.retired for lst in rt.listeners]


def status(runtimes: Runtimes, dispatcher: Dispatcher, now: float, *, started: float,
           reloads: int, stopping: bool, upgrading: int,
           rpc: RpcState | None = None) -> dict[str, object]:
    """The live state, as ``poolinetd status --json`` prints it (the same in both modes).

    ``started``: the master's start (wall clock); ``upgrading``: the new master's pid
    while an upgrade is under way, else 0; ``rpc(name)``: whether an RPC service's
    rpcbind mappings are all registered, and why not (``Registrar.state``). An RPC
    service not registered is ``unregistered``: clients asking rpcbind cannot find it.
    """
    services = []
    for rt in runtimes:
        part = report(dispatcher, rt, now)
        state = ("retiring" if rt.retired else "failing" if (
            not rt.engine_served and dispatcher.failing(rt))
                 else "paused" if rt.resting_until > now else "serving")
        extra: dict[str, object] = {}
        program = rt.service.rpc
        if program is not None and rpc is not None and not rt.retired:
            registered, why = rpc(rt.name)
            if not registered and state == "serving":
                state = "unregistered"
            extra = {"rpc": {"program": program.number, "versions": [program.low, program.high],
                             "netids": list(program.netids), "registered": registered},
                     "last_error": rt.last_error or why or part.get("last_error", "")}
        services.append({
            "service": rt.name,
            "source": f"{rt.service.spec.source}:{rt.service.spec.lineno}",
            "state": state,
            "listeners": [str(lst.bound) for lst in rt.listeners],
            "accepted": rt.stats.accepted,
            "refused": rt.stats.refused,
            "refused_by": dict(rt.stats.refused_by),
            "active": rt.instances,
            "programs": rt.programs,
            "preamble": rt.pending,
            **part,
            "last_error": rt.last_error or part.get("last_error", ""),
            **extra,
        })
    return {"pid": os.getpid(), "mode": dispatcher.mode,
            "uptime": round(time.time() - started, 3), "reloads": reloads,
            "stopping": stopping, "upgrading": upgrading, **syslog.status(),
            "services": services}


def report(dispatcher: Dispatcher, rt: ServiceRuntime, now: float) -> dict[str, object]:
    """The dispatcher's part of ``rt``'s status (workers, pool sizes, failures)."""
    if rt.engine_served:  # served by the engine itself: no workers, no children
        return {"workers": {"booting": 0, "idle": 0, "busy": 0, "draining": 0,
                            "stalled": 0}, "pool_min": 0, "pool_max": 0, "restarts": 0,
                "boot_failures": 0, "retry_in": 0.0}
    return dispatcher.report(rt, now)


def metrics_document(runtimes: Runtimes, dispatcher: Dispatcher, now: float,
                     loop_turn: metrics.Histogram) -> metrics.MetricsDocument:
    """Every counter for ``metrics.render`` (the /metrics endpoint, ``poolinetd metrics``)."""
    services: list[metrics.ServiceMetrics] = []
    seen: dict[int, metrics.ServiceMetrics] = {}
    for rt in runtimes:  # generations of one service share their stats
        part = report(dispatcher, rt, now)
        workers = part.get("workers", {})
        assert isinstance(workers, dict)
        entry = seen.get(id(rt.stats))
        if entry is None:
            stats = rt.stats
            entry = {
                "service": rt.name, "accepted": stats.accepted,
                "refused": dict(stats.refused_by), "active_connections": 0,
                "running_programs": 0, "workers": {k: 0 for k in workers},
                "restarts": 0, "boot_failures": 0,
                "builtin_bytes_in": stats.builtin_bytes_in,
                "builtin_bytes_out": stats.builtin_bytes_out,
                "program_exits": dict(stats.program_exits),
                "handoff_seconds": stats.handoff.snapshot(),
                "program_run_seconds": stats.program_run.snapshot()}
            seen[id(rt.stats)] = entry
            services.append(entry)
        entry["active_connections"] += rt.instances
        entry["running_programs"] += rt.programs
        for state, count in workers.items():
            entry["workers"][state] = entry["workers"].get(state, 0) + int(count)
        restarts, failures = part.get("restarts", 0), part.get("boot_failures", 0)
        assert isinstance(restarts, int) and isinstance(failures, int)
        entry["restarts"] += restarts
        entry["boot_failures"] += failures
    try:
        open_fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        open_fds = 0
    return {"engine": {"loop_turn_seconds": loop_turn.snapshot(), "open_fds": open_fds},
            "services": services}
