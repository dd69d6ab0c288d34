"""Bookkeeping for one service's pool of workers: who is booting, ready, busy, draining.

Pure: no syscalls, no clock, no randomness of its own (time and a Random
are passed in). The master asks it questions (which worker takes this
connection? how many workers to start? which to retire?) and carries out the
answers. Invariants (checked by the Hypothesis state machine in tests):
every worker is in exactly one state; load never goes negative; a DRAINING
worker is never picked; nothing is started during backoff.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field

from poolinetd.config.spec import PoolSettings

BACKOFF_FIRST = 0.5  # seconds after the first boot failure
BACKOFF_MAX = 60.0  # never wait longer than this to retry (no permanent failure state)


class WorkerState(enum.Enum):
    BOOTING = "booting"  # forked, has not said READY
    READY = "ready"  # takes connections (idle when load == 0)
    DRAINING = "draining"  # told to stop: finishes its connections, takes no new ones


@dataclass(slots=True)
class WorkerSlot:
    pid: int
    state: WorkerState
    started_at: float
    load: int = 0  # connections and loans it is serving now
    served: int = 0  # connections it has been given in its life
    last_used: int = 0  # pick order: the most recently used worker goes first (LIFO)
    idle_since: float = 0.0
    request_limit: int = 0  # recycle after this many (0 = never); jittered per worker
    # Instances whose program it has not launched yet (no SPAWNED or DONE back): the
    # one ledger of pending launches (the dispatcher asks, it keeps no copy).
    launches: set[int] = field(default_factory=set)

    @property
    def launching(self) -> int:
        """How many programs it has still to launch (what ``launch_depth`` limits)."""
        return len(self.launches)


class Pool:
    """The pool of one service. ``settings`` may be replaced (reload keeps the pool)."""

    def __init__(self, settings: PoolSettings, rng: random.Random | None = None) -> None:
        self.settings = settings
        self.workers: dict[int, WorkerSlot] = {}
        self.boot_failures = 0  # consecutive; reset by a READY
        self.backoff_until = 0.0
        self.last_failure = ""
        self.restarts = 0  # workers replaced after dying while READY
        self._rng = rng or random.Random()
        self._clock = 0  # pick sequence
        self._current: WorkerSlot | None = None
        self._draining = 0  # how many workers are DRAINING (kept so sizing is O(1) when idle)

    # -- lifecycle -------------------------------------------------------
    def add_booting(self, pid: int, now: float) -> None:
        limit = self.settings.max_requests
        if limit:
            # gunicorn's jitter: workers started together do not all recycle together.
            # At most 10 % of the limit, so none below 10 (a small limit is meant exactly).
            limit += self._rng.randint(0, limit // 10)
        self.workers[pid] = WorkerSlot(pid, WorkerState.BOOTING, now, idle_since=now,
                                       request_limit=limit)

    def mark_ready(self, pid: int, now: float) -> bool:
        """A worker said READY. False if unknown or not booting (a protocol slip)."""
        slot = self.workers.get(pid)
        if slot is None or slot.state is not WorkerState.BOOTING:
            return False
        slot.state = WorkerState.READY
        slot.idle_since = now
        self.boot_failures = 0
        self.backoff_until = 0.0
        return True

    def remove(self, pid: int, now: float, reason: str = "") -> WorkerSlot | None:
        """A worker is gone. One that never got READY counts as a boot failure (backoff)."""
        slot = self.workers.pop(pid, None)
        if slot is None:
            return None
        if self._current is slot:
            self._current = None
        if slot.state is WorkerState.DRAINING:
            self._draining -= 1
        if slot.state is WorkerState.BOOTING:
            self.boot_failures += 1
            self.last_failure = reason or "worker exited before it was ready"
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self.boot_failures - 1))
            self.backoff_until = now + delay
        elif slot.state is WorkerState.READY:
            self.restarts += 1
            if reason:
                self.last_failure = reason
        return slot

    def drain(self, pid: int) -> bool:
        """Stop giving ``pid`` work. True if it changed state (the master then sends STOP)."""
        slot = self.workers.get(pid)
        if slot is None or slot.state is WorkerState.DRAINING:
            return False
        slot.state = WorkerState.DRAINING
        self._draining += 1
        if self._current is slot:
            self._current = None
        return True

    # -- dispatch --------------------------------------------------------
    def pick(self) -> int | None:
        """The READY worker that takes the next connection, or None if all are full.

        The most recently used worker below the cap (``worker_connections``)
        wins: it is warm, and idle workers stay idle long enough to be retired.
        With ``settings.spread`` (programs) the one with the fewest launches
        pending, then the least loaded, wins instead; with ``launch_depth`` a
        worker that has that many launches pending is not picked at all.
        """
        cap = self.settings.worker_connections
        cur = self._current
        if self.settings.spread:
            depth = self.settings.launch_depth or cap
            best = None
            for slot in self.workers.values():
                if slot.state is WorkerState.READY and slot.load < cap and (
                    slot.launching < depth) and (
                    best is None or (slot.launching, slot.load) < (best.launching, best.load)
                ):
                    best = slot
            return None if best is None else best.pid
        if cur is not None and cur.load < cap:
            return cur.pid
        best = None
        for slot in self.workers.values():
            if slot.state is WorkerState.READY and slot.load < cap and (
                best is None or slot.last_used > best.last_used
            ):
                best = slot
        if best is None:
            return None
        self._current = best
        return best.pid

    def assign(self, pid: int, launch_id: int | None = None) -> bool:
        """Count one more connection on ``pid``; True when it just reached its request limit.

        ``launch_id``: the instance's id when it is a program still to be
        launched (pending until ``launched(pid, launch_id)``). On True the
        worker has been moved to DRAINING: the master sends STOP (it finishes
        what it serves) and the pool starts a replacement.
        """
        slot = self.workers[pid]
        slot.load += 1
        if launch_id is not None:
            slot.launches.add(launch_id)
        slot.served += 1
        self._clock += 1
        slot.last_used = self._clock
        if slot.request_limit and slot.served >= slot.request_limit:
            return self.drain(pid)
        return False

    def launched(self, pid: int, launch_id: int) -> None:
        """``pid`` launched (or gave up on, or never got) the program of ``launch_id``.

        Safe to call for any instance, any number of times: only a pending
        launch is taken off (so the dispatcher says it on every SPAWNED, DONE
        and re-route without asking first).
        """
        slot = self.workers.get(pid)
        if slot is not None:
            slot.launches.discard(launch_id)

    def has_room(self) -> bool:
        """Whether a READY worker is below ``worker_connections`` (pending launches aside).

        What growth asks: a pool whose workers are only busy launching needs no
        more of them (more launches in flight than cores is what makes the tail).
        """
        cap = self.settings.worker_connections
        if self._current is not None and self._current.load < cap and (
                self._current.state is WorkerState.READY):
            return True
        return any(s.state is WorkerState.READY and s.load < cap for s in self.workers.values())

    def release(self, pid: int, count: int, now: float) -> None:
        slot = self.workers.get(pid)
        if slot is None:
            return
        slot.load = max(0, slot.load - count)
        if slot.load == 0:
            slot.idle_since = now

    # -- sizing ----------------------------------------------------------
    def spawns_needed(self, now: float) -> int:
        """How many workers to start now: up to pool_min, plus spare capacity on demand.

        When no READY worker has room, start more (a few in parallel, growing
        with the pool, like Apache's doubling spawn rate) up to pool_max.
        Nothing during backoff.
        """
        if now < self.backoff_until:
            return 0
        if (not self.boot_failures and len(self.workers) - self._draining >= self.settings.pool_min
                and self.has_room() and not self._launch_bound()):
            return 0  # the common case, decided (mostly) without walking the workers
        booting = sum(1 for s in self.workers.values() if s.state is WorkerState.BOOTING)
        ready = sum(1 for s in self.workers.values() if s.state is WorkerState.READY)
        live = booting + ready
        room = self.settings.pool_max - live
        if room <= 0:
            return 0
        need = max(0, self.settings.pool_min - live)
        if self.boot_failures:
            # While failing, probe with one worker at a time: never a fork storm.
            return min(1, room) if booting == 0 and (need or not self.has_room()) else 0
        if not self.has_room():
            parallel = 1 + ready // 4
            need = max(need, parallel - booting)
        elif self._launch_bound() and not booting:
            need = max(need, 1)  # one at a time: the next grows once this one is READY
        return max(0, min(need, room))

    def _launch_bound(self) -> bool:
        """Whether every READY worker is at ``launch_depth`` while the pool is below
        ``launch_workers``: launches, not connections, are what it lacks."""
        depth = self.settings.launch_depth
        if not depth or len(self.workers) - self._draining >= self.settings.launch_workers:
            return False
        ready = [s for s in self.workers.values() if s.state is WorkerState.READY]
        return bool(ready) and all(s.launching >= depth for s in ready)

    def surplus(self, now: float) -> list[int]:
        """Idle READY workers past ``idle_timeout`` beyond pool_min: the master retires them."""
        ready = [s for s in self.workers.values() if s.state is WorkerState.READY]
        extra = len(ready) - self.settings.pool_min
        if extra <= 0:
            return []
        idle = sorted(
            (s for s in ready if s.load == 0 and now - s.idle_since >= self.settings.idle_timeout),
            key=lambda s: s.last_used,
        )
        return [s.pid for s in idle[:extra]]

    def next_deadline(self, now: float) -> float | None:
        """When the pool next needs attention (backoff end, idle retirement), if ever."""
        times: list[float] = []
        if self.backoff_until > now:
            times.append(self.backoff_until)
        ready = [s for s in self.workers.values() if s.state is WorkerState.READY]
        if len(ready) > self.settings.pool_min:
            times.extend(s.idle_since + self.settings.idle_timeout for s in ready if s.load == 0)
        return min(times) if times else None

    def counts(self) -> dict[str, int]:
        out = {"booting": 0, "idle": 0, "busy": 0, "draining": 0}
        for slot in self.workers.values():
            if slot.state is WorkerState.BOOTING:
                out["booting"] += 1
            elif slot.state is WorkerState.DRAINING:
                out["draining"] += 1
            elif slot.load:
                out["busy"] += 1
            else:
                out["idle"] += 1
        return out

    @property
    def failing(self) -> bool:
        return self.boot_failures > 0


def report(pool: Pool | None, stalled: int, now: float) -> dict[str, object]:
    """A service's part of the status document: its workers by state (``stalled``:
    how many stopped reading, which the dispatcher knows), sizes, restarts, failures."""
    if pool is None:
        return {"workers": {"booting": 0, "idle": 0, "busy": 0, "draining": 0,
                            "stalled": 0}, "pool_min": 0, "pool_max": 0, "restarts": 0,
                "boot_failures": 0, "retry_in": 0.0}
    return {"workers": {**pool.counts(), "stalled": stalled},
            "pool_min": pool.settings.pool_min, "pool_max": pool.settings.pool_max,
            "restarts": pool.restarts, "boot_failures": pool.boot_failures,
            "retry_in": round(max(0.0, pool.backoff_until - now), 3),
            "last_error": pool.last_failure}
