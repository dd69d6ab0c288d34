"""Pool bookkeeping: examples plus a Hypothesis state machine over every operation."""

from __future__ import annotations

import random

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from poolinetd.config.spec import PoolSettings
from poolinetd.pool.bookkeeping import BACKOFF_MAX, Pool, WorkerState


def settings_(pool_min: int = 1, pool_max: int = 4, cap: int = 2, max_requests: int = 0,
              idle: float = 10.0) -> PoolSettings:
    return PoolSettings(pool_min, pool_max, cap, max_requests, idle)


def test_starts_pool_min_then_grows_on_demand() -> None:
    pool = Pool(settings_(pool_min=2, pool_max=3, cap=1))
    assert pool.spawns_needed(0.0) == 2
    pool.add_booting(10, 0.0)
    pool.add_booting(11, 0.0)
    assert pool.spawns_needed(0.0) == 0  # two booting: demand is covered until they report
    pool.mark_ready(10, 0.1)
    pool.mark_ready(11, 0.1)
    assert pool.pick() is not None
    pool.assign(pool.pick() or 0)
    pool.assign(pool.pick() or 0)
    assert pool.pick() is None
    assert pool.spawns_needed(0.2) == 1  # all full: grow, up to pool_max
    pool.add_booting(12, 0.2)
    pool.mark_ready(12, 0.3)
    pool.assign(12)
    assert pool.spawns_needed(0.3) == 0  # at pool_max


def test_pick_is_lifo_below_the_cap() -> None:
    pool = Pool(settings_(pool_min=2, cap=2))
    for pid in (1, 2):
        pool.add_booting(pid, 0)
        pool.mark_ready(pid, 0)
    first = pool.pick()
    assert first is not None
    pool.assign(first)
    assert pool.pick() == first  # most recently used, still below its cap
    pool.assign(first)
    other = pool.pick()
    assert other is not None and other != first
    pool.assign(other)
    pool.release(first, 2, 1.0)
    assert pool.pick() == other  # LIFO: the last one used goes first


def test_boot_failures_back_off_exponentially_and_recover() -> None:
    pool = Pool(settings_(pool_min=1))
    delays = []
    now = 0.0
    for pid in range(1, 12):
        assert pool.spawns_needed(now) == 1
        pool.add_booting(pid, now)
        assert pool.spawns_needed(now) == 0  # one probe at a time: never a fork storm
        pool.remove(pid, now, "setuid refused")
        delays.append(pool.backoff_until - now)
        assert pool.spawns_needed(now) == 0
        now = pool.backoff_until
    assert delays[:4] == [0.5, 1.0, 2.0, 4.0]
    assert max(delays) == BACKOFF_MAX
    assert pool.failing
    pool.add_booting(99, now)
    assert pool.mark_ready(99, now)
    assert not pool.failing and pool.backoff_until == 0.0


def test_max_requests_drains_with_jitter() -> None:
    pool = Pool(settings_(max_requests=10, cap=100), rng=random.Random(1))
    pool.add_booting(1, 0)
    pool.mark_ready(1, 0)
    limit = pool.workers[1].request_limit
    assert 10 <= limit <= 11
    results = [pool.assign(1) for _ in range(limit)]
    assert results[-1] is True and not any(results[:-1])
    assert pool.workers[1].state is WorkerState.DRAINING
    assert pool.pick() is None


def test_max_requests_jitter_is_at_most_ten_percent() -> None:
    """The README's promise: a worker recycles after N to N + 10 % connections."""
    rng = random.Random(7)
    seen: dict[int, set[int]] = {}
    for limit in (1, 2, 4, 9, 10, 19, 20, 100, 1000):
        for pid in range(200):
            pool = Pool(settings_(max_requests=limit), rng=rng)
            pool.add_booting(pid, 0)
            seen.setdefault(limit, set()).add(pool.workers[pid].request_limit - limit)
    for limit, jitters in seen.items():
        assert min(jitters) >= 0 and max(jitters) <= limit // 10, (limit, sorted(jitters))
    assert seen[1] == seen[4] == seen[9] == {0}  # 10 % rounds to 0: exactly N
    assert seen[10] == seen[19] == {0, 1}
    assert len(seen[100]) == 11  # every value 0..10 occurs: the spread is real


def test_surplus_idle_workers_retire_down_to_min() -> None:
    pool = Pool(settings_(pool_min=1, pool_max=4, idle=5.0))
    for pid in (1, 2, 3):
        pool.add_booting(pid, 0)
        pool.mark_ready(pid, 0)
    assert pool.surplus(4.0) == []
    assert sorted(pool.surplus(5.0)) == [1, 2] or len(pool.surplus(5.0)) == 2
    assert pool.next_deadline(1.0) == 5.0


class PoolMachine(RuleBasedStateMachine):
    """Random sequences of events never break the pool's invariants."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = Pool(settings_(pool_min=1, pool_max=5, cap=3, max_requests=7),
                         rng=random.Random(0))
        self.now = 0.0
        self.next_pid = 1
        self.load: dict[int, int] = {}

    @rule(dt=st.floats(0, 100))
    def tick(self, dt: float) -> None:
        self.now += dt

    @rule()
    def spawn(self) -> None:
        for _ in range(self.pool.spawns_needed(self.now)):
            self.pool.add_booting(self.next_pid, self.now)
            self.load[self.next_pid] = 0
            self.next_pid += 1

    @precondition(lambda self: any(s.state is WorkerState.BOOTING
                                   for s in self.pool.workers.values()))
    @rule(data=st.data())
    def ready(self, data: st.DataObject) -> None:
        booting = sorted(p for p, s in self.pool.workers.items() if s.state is WorkerState.BOOTING)
        assert self.pool.mark_ready(data.draw(st.sampled_from(booting)), self.now)

    @rule()
    def dispatch(self) -> None:
        pid = self.pool.pick()
        if pid is None:
            return
        slot = self.pool.workers[pid]
        assert slot.state is WorkerState.READY
        assert slot.load < self.pool.settings.worker_connections
        self.pool.assign(pid)
        self.load[pid] += 1

    @precondition(lambda self: any(v > 0 for v in self.load.values()))
    @rule(data=st.data())
    def done(self, data: st.DataObject) -> None:
        pid = data.draw(st.sampled_from(sorted(p for p, v in self.load.items() if v > 0)))
        self.pool.release(pid, 1, self.now)
        self.load[pid] -= 1

    @precondition(lambda self: bool(self.pool.workers))
    @rule(data=st.data())
    def die(self, data: st.DataObject) -> None:
        pid = data.draw(st.sampled_from(sorted(self.pool.workers)))
        before = self.pool.backoff_until
        was_booting = self.pool.workers[pid].state is WorkerState.BOOTING
        self.pool.remove(pid, self.now, "test")
        del self.load[pid]
        if was_booting:
            assert self.pool.backoff_until > self.now
        else:
            assert self.pool.backoff_until == before

    @rule()
    def retire_idle(self) -> None:
        for pid in self.pool.surplus(self.now):
            assert self.pool.workers[pid].load == 0
            self.pool.drain(pid)

    @invariant()
    def consistent(self) -> None:
        counts = self.pool.counts()
        assert sum(counts.values()) == len(self.pool.workers)
        for pid, slot in self.pool.workers.items():
            assert slot.load == self.load[pid] >= 0
        live = counts["booting"] + counts["idle"] + counts["busy"]
        assert live <= self.pool.settings.pool_max
        if self.now < self.pool.backoff_until:
            assert self.pool.spawns_needed(self.now) == 0


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_spread_pick_takes_the_least_loaded_worker() -> None:
    pool = Pool(PoolSettings(2, 4, 8, 0, 10.0, spread=True))
    for pid in (1, 2):
        pool.add_booting(pid, 0)
        pool.mark_ready(pid, 0)
    picks = []
    for _ in range(6):
        pid = pool.pick()
        assert pid is not None
        pool.assign(pid)
        picks.append(pid)
    assert picks.count(1) == picks.count(2) == 3  # launches alternate between the workers


def test_launch_depth_holds_connections_until_the_worker_launched() -> None:
    # Programs: a worker busy in posix_spawn must not collect a queue of
    # connections while another is free; past launch_depth nobody is picked
    # (the connection waits in the kernel's FIFO backlog) and no worker is started.
    pool = Pool(PoolSettings(2, 4, 8, 0, 10.0, spread=True, launch_depth=1))
    for pid in (1, 2):
        pool.add_booting(pid, 0)
        pool.mark_ready(pid, 0)
    first = pool.pick()
    assert first is not None
    pool.assign(first, launch_id=101)
    second = pool.pick()
    assert second is not None and second != first
    pool.assign(second, launch_id=102)
    assert pool.pick() is None  # both launching
    assert pool.has_room()
    assert pool.spawns_needed(1.0) == 0  # busy launching is not a reason to grow
    pool.launched(second, 102)
    assert pool.pick() == second  # the one that finished its launch takes the next
    pool.launched(second, 102)  # a stray report never goes below zero
    assert pool.workers[second].launching == 0


def test_a_pool_busy_launching_grows_one_at_a_time_up_to_launch_workers() -> None:
    # Each posix_spawn blocks its worker until the child has exec'd: with every worker
    # at launch_depth, launches (not connections) are short, so one more worker starts,
    # and the next only once that one is READY, up to launch_workers (cores + 1).
    pool = Pool(PoolSettings(2, 16, 8, 0, 10.0, spread=True, launch_depth=2,
                             launch_workers=3))
    for pid in (1, 2):
        pool.add_booting(pid, 0)
        pool.mark_ready(pid, 0)
    pool.assign(1, launch_id=11)
    pool.assign(1, launch_id=12)
    pool.assign(2, launch_id=21)
    assert pool.spawns_needed(1.0) == 0  # worker 2 can take one more launch
    pool.assign(2, launch_id=22)
    assert pool.pick() is None and pool.has_room()
    assert pool.spawns_needed(1.0) == 1
    pool.add_booting(3, 1.0)
    assert pool.spawns_needed(1.0) == 0  # one booting: wait for it
    pool.mark_ready(3, 1.0)
    pool.assign(3, launch_id=31)
    pool.assign(3, launch_id=32)
    assert pool.pick() is None
    assert pool.spawns_needed(2.0) == 0  # at launch_workers: more only queue for the cores
    pool.launched(1, 11)
    assert pool.pick() == 1


def test_without_launch_depth_assign_counts_no_launches() -> None:
    pool = Pool(PoolSettings(1, 2, 3, 0, 10.0, spread=True))
    pool.add_booting(1, 0)
    pool.mark_ready(1, 0)
    for iid in range(3):
        assert pool.pick() == 1
        pool.assign(1, launch_id=iid)
    assert pool.pick() is None and not pool.has_room()  # only the cap limits it
    assert pool.spawns_needed(1.0) == 1
