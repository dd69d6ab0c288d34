"""The documents the engine answers with: status, the metrics, the ready report, STATUS=.

Pure functions of the engine's state (they read it, change nothing but
forgetting retired generations): ``poolinetd status``, ``/metrics`` and
``poolinetd metrics``, the ``--ready-fd`` listener list, systemd's STATUS line.
The same shapes in both modes.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from poolinetd.engine.runtime import ServiceRuntime
from poolinetd.observe import metrics

if TYPE_CHECKING:
    from poolinetd.engine.loop import Engine


def summary(engine: Engine) -> str:
    """One line for systemd's STATUS=: what is served and how busy it is."""
    live = [rt for rt in engine.runtimes if not rt.retired]
    active = sum(rt.instances for rt in engine.runtimes)
    return (f"{engine.dispatcher.mode} mode: {len(live)} services, {active} active, "
            f"{sum(rt.stats.accepted for rt in live)} accepted, {engine.reloads} reloads")



def listener_report(engine: Engine) -> list[dict[str, object]]:
    """What is listened on, in config order (for --ready-fd, startup log, status)."""
    return [{"service": rt.name, "family": lst.bound.family, "address": lst.bound.address,
             "port": lst.bound.port, "socket_type": rt.service.socket_type.value,
             "source": f"{rt.service.spec.source}:{rt.service.spec.lineno}"}
            for rt in engine.runtimes if not rt.retired for lst in rt.listeners]


def status(engine: Engine) -> dict[str, object]:
    """The live state, as ``poolinetd status --json`` prints it (the same in both modes)."""
    now = engine.system.clock()
    engine.collect_garbage()
    services = []
    for rt in engine.runtimes:
        part = report(engine, rt, now)
        state = ("retiring" if rt.retired else "failing" if (
            not rt.engine_served and engine.dispatcher.failing(rt))
                 else "paused" if rt.resting_until > now else "serving")
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
        })
    return {"pid": os.getpid(), "mode": engine.dispatcher.mode,
            "uptime": round(time.time() - engine.started, 3), "reloads": engine.reloads,
            "stopping": engine.stopping,
            "upgrading": engine.upgrading.pid if engine.upgrading is not None else 0,
            "services": services}


def report(engine: Engine, rt: ServiceRuntime, now: float) -> dict[str, object]:
    """The dispatcher's part of ``rt``'s status (workers, pool sizes, failures)."""
    if rt.engine_served:  # served by the engine itself: no workers, no children
        return {"workers": {"booting": 0, "idle": 0, "busy": 0, "draining": 0,
                            "stalled": 0}, "pool_min": 0, "pool_max": 0, "restarts": 0,
                "boot_failures": 0, "retry_in": 0.0}
    return engine.dispatcher.report(rt, now)

def render_metrics(engine: Engine) -> bytes:
    return metrics.render(metrics_document(engine))

def metrics_document(engine: Engine) -> metrics.MetricsDocument:
    """Every counter for ``render`` (the /metrics endpoint, ``poolinetd metrics``)."""
    now = engine.system.clock()
    services: list[metrics.ServiceMetrics] = []
    seen: dict[int, metrics.ServiceMetrics] = {}
    for rt in engine.runtimes:  # generations of one service share their stats
        part = report(engine, rt, now)
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
    return {"engine": {"loop_turn_seconds": engine.loop_turn.snapshot(), "open_fds": open_fds},
            "services": services}
