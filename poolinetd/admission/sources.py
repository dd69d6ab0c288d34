"""Per-source state of one service: concurrency, rate, temporary blocks; bounded memory.

Pure: no I/O, no clock (``now`` is passed in; pass ``time.monotonic()``).
Keys are whatever ``netmatch.source_key`` gives (the source's network at the
service's prefix length); the tracker only hashes them.

The protocol, per connection (or per program start of a ``wait`` service)::

    reason = tracker.check(key, now, limits)   # "" = admitted
    if not reason:
        tracker.started(key)                   # once really handed over
        ...
        tracker.ended(key)                     # when it ends (same key!)

Counting never depends on the limits: ``started``/``ended`` keep an exact
concurrent count for every source whatever ``limits`` say, so a reload that
adds ``max_child_per_ip`` while connections run sees them, and one that
removes it cannot leave a count behind. Only ``check`` looks at limits, and
only a limit that is set can refuse.

Rate (``max_cpm_per_ip = N``) is a leaky bucket in GCRA form: one float per
source, its "theoretical arrival time" ``tat``. Every admitted connection
costs ``60/N`` seconds of it; a connection is admitted if ``tat`` would stay
within 60 s ahead of now. So a source gets a burst of N, then one every 60/N
s: never refused while it had fewer than N admitted connections in the last
60 s, and never more than 2N admitted in any 60 s. A deque of timestamps per
source would be exact but costs up to N floats per source; this costs one.
Refused connections do not fill the bucket. The rate is only metered while a
rate limit is set (the bucket needs N); a reload that changes N keeps ``tat``,
i.e. the share of its minute the source has used (a source whose bucket was
full under the old N waits at most one new 60/N interval).

A source that goes over its rate is refused ("max_cpm_per_ip") and, if
``block_time`` is set, refused ("blocked") until ``now + block_time``; then
it starts with an empty bucket (judged afresh). A block lasts until it
expires, whatever a reload does to the limits (a blocked source stays blocked).

Memory: sources with running connections ("busy") are kept apart from the
others ("idle", which only remember a rate or a block) and are never evicted,
so their counts stay exact. Idle sources live in least-recently-seen order
and the oldest go when ``len(tracker) > cap``; so ``len(tracker) <=
max(cap, busy sources)``. Idle sources whose bucket has drained and whose
block has expired are also dropped as new sources arrive. Every operation is
O(1) (amortised). While busy sources alone fill the cap, a new source's rate
state is dropped at once (its concurrency is still exact).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

DEFAULT_CAP = 100_000
RATE_WINDOW = 60.0  # seconds: max_cpm_per_ip is per minute
_SLACK = 1e-3  # of one connection's share: float rounding must not refuse the Nth of a burst

# Refusal reasons: stable strings the status document counts by.
MAX_CHILD_PER_IP = "max_child_per_ip"
MAX_CPM_PER_IP = "max_cpm_per_ip"
BLOCKED = "blocked"
REASONS = (MAX_CHILD_PER_IP, MAX_CPM_PER_IP, BLOCKED)

_EXPIRE_PER_NEW = 2  # idle entries examined for expiry per new source: O(1), and > 1 drains


@dataclass(frozen=True, slots=True)
class SourceLimits:
    """The per-source limits of one service. None = no limit; 0 = nothing allowed.

    ``max_child_per_ip``: concurrent connections (or programs) per source.
    ``max_cpm_per_ip``: admissions per minute per source (leaky bucket, above).
    ``block_time``: seconds a source over its rate is refused; 0 = only the
    connections over the rate are refused.
    """

    max_child_per_ip: int | None = None
    max_cpm_per_ip: int | None = None
    block_time: float = 0.0


NO_LIMITS = SourceLimits()


class _Source:
    """One source. ``count``: running connections (exact). ``tat``: leaky-bucket
    theoretical arrival time (<= now means an empty bucket). ``until``: refused
    until this time (0.0 = not blocked; the shared constant costs no memory)."""

    __slots__ = ("count", "tat", "until")

    def __init__(self) -> None:
        self.count = 0
        self.tat = 0.0
        self.until = 0.0


class Tracker:
    """Bounded per-source state for one service; see the module docstring.

    ``cap`` bounds the sources kept without running connections (>= 0).
    """

    __slots__ = ("_busy", "_idle", "cap")

    def __init__(self, cap: int = DEFAULT_CAP) -> None:
        if cap < 0:
            raise ValueError(f"cap must be >= 0, not {cap}")
        self.cap = cap
        self._busy: dict[Hashable, _Source] = {}
        self._idle: OrderedDict[Hashable, _Source] = OrderedDict()

    def __len__(self) -> int:
        return len(self._busy) + len(self._idle)

    @property
    def busy_sources(self) -> int:
        """Sources with at least one running connection (never evicted)."""
        return len(self._busy)

    def running(self, key: Hashable) -> int:
        """Running connections counted for ``key``."""
        src = self._busy.get(key)
        return src.count if src is not None else 0

    def blocked_until(self, key: Hashable) -> float:
        """When ``key``'s block ends (0.0 if it was never blocked or is forgotten).
        A value <= now means not blocked any more."""
        src = self._busy.get(key) or self._idle.get(key)
        return src.until if src is not None else 0.0

    def blocked_sources(self, now: float) -> int:
        """How many tracked sources are blocked at ``now``. O(n): for status, not per connection."""
        return sum(1 for d in (self._busy, self._idle) for src in d.values() if src.until > now)

    def update_cap(self, cap: int) -> None:
        """A new cap (reload); shrinking evicts the least recently seen idle sources now."""
        if cap < 0:
            raise ValueError(f"cap must be >= 0, not {cap}")
        self.cap = cap
        self._evict()

    def check(self, key: Hashable, now: float, limits: SourceLimits) -> str:
        """Why a connection from ``key`` is refused now (a REASONS string), or "".

        An admitted connection has been metered (its share of the rate is
        spent); call ``started(key)`` once it is really handed over, or
        nothing if it is not. Marks ``key`` as recently seen.
        """
        idle = self._idle
        src = self._busy.get(key)
        if src is None:
            src = idle.get(key)
            if src is not None:
                idle.move_to_end(key)
        if src is not None and src.until:
            if now < src.until:
                return BLOCKED
            src.until = 0.0  # over; the bucket was emptied when the block began
        max_child = limits.max_child_per_ip
        if max_child is not None and (src.count if src is not None else 0) >= max_child:
            return MAX_CHILD_PER_IP
        max_cpm = limits.max_cpm_per_ip
        if max_cpm is None:
            return ""
        if max_cpm <= 0:
            return MAX_CPM_PER_IP  # nothing allowed: no state needed
        interval = RATE_WINDOW / max_cpm
        if src is None:  # a new source: the only way memory grows
            if idle:
                self._expire(now)
            src = _Source()
            idle[key] = src
            if len(self._busy) + len(idle) > self.cap:
                self._evict()
        tat = src.tat if src.tat > now else now
        if tat + interval - now > RATE_WINDOW + interval * _SLACK:
            if limits.block_time > 0:
                src.until = now + limits.block_time
                src.tat = 0.0
            return MAX_CPM_PER_IP
        src.tat = tat + interval
        return ""

    def started(self, key: Hashable) -> None:
        """A connection from ``key`` now runs. Always counted, whatever the limits."""
        src = self._busy.get(key)
        if src is None:
            src = self._idle.pop(key, None)
            if src is None:
                src = _Source()
                self._busy[key] = src
                if len(self._busy) + len(self._idle) > self.cap:
                    self._evict()  # keep len <= max(cap, busy sources)
            else:
                self._busy[key] = src
        src.count += 1

    def ended(self, key: Hashable) -> bool:
        """A connection from ``key`` ended. False (and no change) if none was running:
        a caller bug to log, never a negative count."""
        src = self._busy.get(key)
        if src is None:
            return False
        src.count -= 1
        if src.count == 0:
            del self._busy[key]
            if src.tat or src.until:  # it remembers a rate or a block: keep it a while
                self._idle[key] = src
                if len(self._busy) + len(self._idle) > self.cap:
                    self._evict()
        return True

    def _evict(self) -> None:
        idle = self._idle
        over = len(self._busy) + len(idle) - self.cap
        while over > 0 and idle:
            idle.popitem(last=False)
            over -= 1

    def _expire(self, now: float) -> None:
        """Drop up to _EXPIRE_PER_NEW of the least recently seen idle sources if
        they remember nothing any more (bucket drained, block over): each new
        source pays for the expiry of up to that many old ones."""
        idle = self._idle
        for _ in range(_EXPIRE_PER_NEW):
            if not idle:
                return
            key, src = next(iter(idle.items()))
            if src.tat > now or src.until > now:
                return
            del idle[key]
