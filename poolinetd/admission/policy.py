"""Admission: whether a connection from a source may be served, decided before hand-off.

Pure: no I/O, no clock of its own (``now`` is passed in). One ``Admission``
per service, kept across reload generations (a blocked source stays
blocked; running connections stay counted). The stages, in order:

    access lists    no_access (wins), then only_from        "no_access", "only_from"
    service rate    max_spawn_per_min (OpenBSD .N, NetBSD   "max_spawn_per_min"
                    :N/service_max): over it the service
                    "loops" and rests LOOPING_PAUSE, as inetd does
                    (xinetd's cps N M: N per second, rest M s)
    per source      max_child_per_ip, max_cpm_per_ip,       sources.REASONS
                    block_time, counted by network
                    (source_v4_prefix / source_v6_prefix)

Each limit: None = no limit, 0 = nothing allowed (spec.Limits). ``max_child``
and the global caps are backpressure, not refusal: the listener is simply
not polled (engine/loop.py, has_room).

Protocol: ``key = source(ip)``; ``why = check(key, ip, now)``; on "" hand
over, then ``started(key)``; ``ended(key)`` when the instance ends, with the
same key (a reload may change the prefix lengths meanwhile).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable

from poolinetd.admission import sources
from poolinetd.config.spec import Limits, Service
from poolinetd.net import netmatch
from poolinetd.net.netmatch import AddressList

RATE_WINDOW = 60.0
LOOPING_PAUSE = 60.0  # seconds a service rests after exceeding max_spawn_per_min
MAX_SPAWN_PER_MIN = "max_spawn_per_min"
NO_SOURCE = ""  # unix peers, or a datagram loan with no known source
_KEY_CACHE = 4096
_NO_LISTS = "\0no lists"  # check() without the access lists (a start with no peer yet)


class Admission:
    """The admission state of one service (across its reload generations)."""

    def __init__(self, service: Service, cap: int = sources.DEFAULT_CAP,
                 share_cap: int | None = None) -> None:
        """``share_cap``: the most instances one source may hold where ``max_child_per_ip``
        is the safe default rather than written (the mode's, kept across updates)."""
        self.share_cap = share_cap
        self.tracker = sources.Tracker(cap)
        self.spawn_history: deque[float] = deque()
        self.paused_until = 0.0
        self.looping = False  # True right after a check tripped max_spawn_per_min
        self.update(service)

    def update(self, service: Service) -> None:
        """New settings (a reload changed the service); counts, rates and blocks carry over."""
        limits: Limits = service.limits
        self.limits = limits
        self.only_from: AddressList = service.only_from
        self.no_access: AddressList = service.no_access
        self.v4_prefix = service.source_v4_prefix
        self.v6_prefix = service.source_v6_prefix
        self._keys: dict[str, Hashable] = {}
        per_ip = limits.max_child_per_ip
        if limits.safe_default and per_ip is not None and self.share_cap is not None:
            per_ip = min(per_ip, self.share_cap)
        self.source_limits = sources.SourceLimits(per_ip, limits.max_cpm_per_ip,
                                                  service.block_time)
        self.per_source = (limits.max_child_per_ip is not None
                           or limits.max_cpm_per_ip is not None)
        self.lists = bool(self.only_from or self.no_access)
        # The service rate's window and rest: a minute and LOOPING_PAUSE, or xinetd's cps.
        spec = service.spec
        self.spawn_window = RATE_WINDOW if spec.spawn_window is None else spec.spawn_window
        self.spawn_pause = LOOPING_PAUSE if spec.spawn_pause is None else spec.spawn_pause

    def groups_like(self, other: Admission) -> bool:
        """Whether ``other`` keys sources as this does (the same prefix lengths), so a
        key computed by one holds for the other."""
        return (self.v4_prefix, self.v6_prefix) == (other.v4_prefix, other.v6_prefix)

    def source(self, ip: str) -> Hashable:
        """The tracking key of ``ip``: its network at the service's prefix length.

        Memoised (a bounded dict, emptied when full or when the prefixes change):
        most connections come from addresses seen a moment ago.
        """
        key = self._keys.get(ip)
        if key is None:
            if not ip:
                return NO_SOURCE
            if len(self._keys) >= _KEY_CACHE:
                self._keys.clear()
            key = self._keys[ip] = netmatch.source_key(ip, self.v4_prefix, self.v6_prefix)
        return key

    def check(self, key: Hashable, ip: str, now: float) -> str:
        """Why a connection from ``ip`` (tracking key ``key``) is refused now, or "".

        An admitted connection has been counted in the rate windows; call
        ``started(key)`` once it is really handed over. A "max_spawn_per_min"
        refusal also sets ``paused_until`` and ``looping`` (the service rests).
        """
        self.looping = False
        if self.lists and ip is not _NO_LISTS:
            why = netmatch.peer_access_reason(self.only_from, self.no_access, ip)
            if why:
                return why
        limit = self.limits.max_spawn_per_min
        if limit is not None and now < self.paused_until:
            return MAX_SPAWN_PER_MIN  # still resting: not a new trip, the rest is not extended
        if limit is not None:
            hist = self.spawn_history
            while hist and hist[0] <= now - self.spawn_window:
                hist.popleft()
            if len(hist) >= limit:
                self.paused_until = now + self.spawn_pause
                self.looping = True
                return MAX_SPAWN_PER_MIN
        if self.per_source and key != NO_SOURCE:
            why = self.tracker.check(key, now, self.source_limits)
            if why:
                return why
        if limit is not None:
            self.spawn_history.append(now)
        return ""

    def check_lists(self, ip: str) -> str:
        """The access lists alone ("" if ``ip`` may be served)."""
        if not self.lists:
            return ""
        return netmatch.peer_access_reason(self.only_from, self.no_access, ip)

    def check_start(self, now: float) -> str:
        """The service-wide rate only, for a start with no known source (stream wait)."""
        return self.check(NO_SOURCE, _NO_LISTS, now)

    def started(self, key: Hashable) -> None:
        """Count a running instance from ``key``, whatever the limits are: a reload may
        add max_child_per_ip while it runs, and must then see it."""
        if key != NO_SOURCE:
            self.tracker.started(key)

    def ended(self, key: Hashable) -> None:
        if key != NO_SOURCE:
            self.tracker.ended(key)
