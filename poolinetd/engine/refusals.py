"""Refusals: how a refused connection is counted and logged, the same on every path.

No I/O but the log. Every refusal is counted under its reason in the
service's stats (status, /metrics); a ``conn_refused`` line is logged at most
once per source and reason every REFUSAL_LOG_INTERVAL seconds, so a hostile
source cannot turn the master into a log writer. A refusal by the spawn-rate
rule (``max_spawn_per_min``) puts the service to rest and logs
``service_looping`` instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from poolinetd.admission.policy import LOOPING_PAUSE
from poolinetd.admission.tcpwrappers_options import Severity
from poolinetd.engine.dispatch import Dispatcher
from poolinetd.engine.runtime import ServiceRuntime
from poolinetd.observe import log, throttle

REFUSAL_LOG_INTERVAL = 10.0  # at most one conn_refused line per source and reason this often
NO_ROOM = "no_room"  # accepted, then nowhere to go (a worker died, a reload retired it)
INSTANCES = "instances"  # xinetd's instances: at max_child, refused at once


class Refusals:
    """Counts and logs refusals; ``wake_at(when)`` is told when a looping rest ends."""

    def __init__(self, dispatcher: Dispatcher, wake_at: Callable[[float], None]) -> None:
        self.dispatcher = dispatcher
        self.wake_at = wake_at
        self.log_throttle = throttle.Throttle(REFUSAL_LOG_INTERVAL)

    @staticmethod
    def count(rt: ServiceRuntime, why: str) -> None:
        """Count a refusal under ``why`` without logging it (no_room, preamble failures)."""
        stats = rt.stats
        stats.refused += 1
        stats.refused_by[why] = stats.refused_by.get(why, 0) + 1

    def refused(self, rt: ServiceRuntime, ip: str, why: str, now: float,
                severity: Severity | None = None) -> None:
        """A connection from ``ip`` was refused for ``why``: count it, log it (throttled);
        ``severity``: the line's level and syslog priority (tcp_wrappers' option)."""
        self.count(rt, why)
        if rt.admission.looping:
            self.wake_at(rt.admission.paused_until)
            limit = rt.service.limits.max_spawn_per_min
            rt.last_error = f"more than {limit} connections a minute"
            log.error("service_looping", service=rt.name, limit=limit, pause=LOOPING_PAUSE)
            return
        held = self.log_throttle.allow((rt.name, ip, why), now)
        if held is None:
            return
        fields = {"service": rt.name, "peer": ip, "reason": why,
                  "refused_total": rt.stats.refused, "held_back": held}
        if severity is None:
            log.warning("conn_refused", **fields)
        else:
            log.event_pri(severity.log_level, "conn_refused",
                          (severity.facility, severity.level), **fields)

    def dgram_refused(self, rt: ServiceRuntime, addr: object, why: str, now: float) -> None:
        """A datagram for a built-in dropped here (classic): the same event as a worker's."""
        self.count(rt, why)
        held = self.dispatcher.dgram_log_due(rt, now)  # one throttle with the children's
        if held is not None:
            peer = f"{addr[0]} {addr[1]}" if isinstance(addr, tuple) else str(addr)
            log.warning("dgram_refused", service=rt.name, pid=os.getpid(), peer=peer,
                        reason=why, refused_since_last=held + 1)
