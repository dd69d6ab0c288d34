"""Admission: the per-service limits a connection must pass before it is accepted for work.

Pure: no I/O, no clock of its own (``now`` is passed in). Shared by pool
and classic mode so both enforce the same inetd.conf numbers:

    max_child_per_ip   concurrent instances from one IP (FreeBSD 3rd /N)
    max_cpm_per_ip     connections per minute from one IP (FreeBSD 2nd /N)
    max_spawn_per_min  connections per minute for the whole service
                       (OpenBSD .N, NetBSD :N); over it the service "loops"
                       and rests (``paused_until``), as inetd does

(max_child, the concurrent cap, is backpressure, not refusal: the listener is
simply not polled; see engine.py.)
"""

from __future__ import annotations

from collections import deque

from poolinetd.spec import Limits

RATE_WINDOW = 60.0
LOOPING_PAUSE = 60.0  # seconds a service rests after exceeding max_spawn_per_min
_SWEEP_EVERY = 60.0


class Admission:
    """Counters for one service. ``check`` then ``started``; ``ended`` when the instance ends."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.active = False
        self.update(limits)
        self.per_ip: dict[str, int] = {}
        self.ip_history: dict[str, deque[float]] = {}
        self.spawn_history: deque[float] = deque()
        self.paused_until = 0.0
        self.looping = False  # True right after a check tripped max_spawn_per_min
        self._next_sweep = 0.0

    def update(self, limits: Limits) -> None:
        """New limits (a reload changed the service); counts and windows carry over."""
        self.limits = limits
        self.active = bool(limits.max_child_per_ip or limits.max_cpm_per_ip
                           or limits.max_spawn_per_min)

    def check(self, ip: str, now: float) -> str:
        """Why a connection from ``ip`` is refused now, or "" if it is admitted.

        An admitted connection has been counted in the rate windows; call
        ``started(ip)`` once it is really handed over. A "max_spawn_per_min"
        refusal also sets ``paused_until`` (the service rests).
        """
        limits = self.limits
        self.looping = False
        if now >= self._next_sweep:
            self._sweep(now)
        if limits.max_spawn_per_min:
            hist = self.spawn_history
            while hist and hist[0] <= now - RATE_WINDOW:
                hist.popleft()
            if len(hist) >= limits.max_spawn_per_min:
                self.paused_until = now + LOOPING_PAUSE
                self.looping = True
                return "max_spawn_per_min"
        if ip and limits.max_child_per_ip and self.per_ip.get(ip, 0) >= limits.max_child_per_ip:
            return "max_child_per_ip"
        if ip and limits.max_cpm_per_ip:
            iph = self.ip_history.setdefault(ip, deque())
            while iph and iph[0] <= now - RATE_WINDOW:
                iph.popleft()
            if len(iph) >= limits.max_cpm_per_ip:
                return "max_cpm_per_ip"
            iph.append(now)
        if limits.max_spawn_per_min:
            self.spawn_history.append(now)
        return ""

    def started(self, ip: str) -> None:
        """Count a running instance from ``ip``, whatever the limits are: a reload may
        add max_child_per_ip while it runs, and must then see it (and never the
        reverse: a limit removed and added again must not find a count that
        was never decremented)."""
        if ip:
            self.per_ip[ip] = self.per_ip.get(ip, 0) + 1

    def ended(self, ip: str) -> None:
        left = self.per_ip.get(ip, 0) - 1
        if left > 0:
            self.per_ip[ip] = left
        else:
            self.per_ip.pop(ip, None)

    def _sweep(self, now: float) -> None:
        """Forget IPs not seen for a whole window: many one-off clients cost no memory."""
        self._next_sweep = now + _SWEEP_EVERY
        stale = [ip for ip, h in self.ip_history.items() if not h or h[-1] <= now - RATE_WINDOW]
        for ip in stale:
            del self.ip_history[ip]
