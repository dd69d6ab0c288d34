"""A log throttle: at most one line per key per interval, and a bounded budget overall.

Pure (``now`` is passed in). Keys are (service, source, reason): a source
refused a thousand times gives one line per interval, and a flood from many
sources cannot flood the log either (``budget`` lines per interval in all).
What was held back is counted and reported with the next line of that key.
Memory is bounded by ``cap`` keys (least recently logged go first).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


class Throttle:
    def __init__(self, interval: float = 10.0, budget: int = 100, cap: int = 4096) -> None:
        self.interval = interval
        self.budget = budget
        self.cap = cap
        self._last: OrderedDict[Hashable, tuple[float, int]] = OrderedDict()  # key -> (when, held)
        self._window = float("-inf")
        self._spent = 0

    def allow(self, key: Hashable, now: float) -> int | None:
        """None to hold this line back; else log it, with the count held back before it."""
        entry = self._last.get(key)
        if entry is not None and now - entry[0] < self.interval:
            self._last[key] = (entry[0], entry[1] + 1)
            return None
        if now - self._window >= self.interval:
            self._window, self._spent = now, 0
        if self._spent >= self.budget:
            if entry is not None:
                self._last[key] = (entry[0], entry[1] + 1)
            return None
        self._spent += 1
        held = entry[1] if entry is not None else 0
        self._last[key] = (now, 0)
        self._last.move_to_end(key)
        while len(self._last) > self.cap:
            self._last.popitem(last=False)
        return held
