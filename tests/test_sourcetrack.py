"""sourcetrack.Tracker: per-source concurrency, rate and blocks, bounded; driven by a fake clock.

Unit tests, then Hypothesis properties and a stateful machine (profiles: hypothesis_profiles.py).
"""

from __future__ import annotations

import hypothesis_profiles  # noqa: F401  (registers and loads the profile)
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from poolinetd.admission.sources import (
    BLOCKED,
    MAX_CHILD_PER_IP,
    MAX_CPM_PER_IP,
    NO_LIMITS,
    RATE_WINDOW,
    REASONS,
    SourceLimits,
    Tracker,
)

A, B = "192.0.2.0/24", "198.51.100.0/24"  # keys are opaque hashables to the tracker


def test_reasons_are_stable_strings() -> None:
    assert REASONS == ("max_child_per_ip", "max_cpm_per_ip", "blocked")


def test_no_limits_admits_everything_and_remembers_nothing() -> None:
    tr = Tracker(cap=10)
    for i in range(1000):
        assert tr.check(i, float(i), NO_LIMITS) == ""
        tr.started(i)
        assert tr.ended(i)
    assert len(tr) == 0


def test_concurrency_per_source() -> None:
    tr, lim = Tracker(), SourceLimits(max_child_per_ip=2)
    for _ in range(2):
        assert tr.check(A, 0, lim) == ""
        tr.started(A)
    assert tr.check(A, 0, lim) == MAX_CHILD_PER_IP
    assert tr.check(B, 0, lim) == ""  # another source is not affected
    assert tr.ended(A)
    assert tr.check(A, 0, lim) == ""
    assert tr.ended(A)
    assert not tr.ended(A)  # nothing running: reported, no negative count
    assert tr.running(A) == 0 and len(tr) == 0
    tr.started(A)
    assert tr.running(A) == 1  # a spurious ended() did not leave a debt


def test_counting_does_not_depend_on_limits() -> None:
    """Issue 13 item 10: a limit added by reload sees running connections; one removed
    and added back does not lock the source out."""
    tr, lim = Tracker(), SourceLimits(max_child_per_ip=2)
    tr.started(A)
    tr.started(A)  # admitted while no limit was set
    assert tr.check(A, 0, lim) == MAX_CHILD_PER_IP
    assert tr.ended(A) and tr.ended(A)  # ended while no limit is set
    assert tr.check(A, 1, lim) == ""


def test_zero_means_nothing_allowed_and_keeps_no_state() -> None:
    tr = Tracker()
    assert tr.check(A, 0, SourceLimits(max_child_per_ip=0)) == MAX_CHILD_PER_IP
    assert tr.check(A, 0, SourceLimits(max_cpm_per_ip=0)) == MAX_CPM_PER_IP
    assert len(tr) == 0


def test_rate_burst_then_steady() -> None:
    tr, lim = Tracker(), SourceLimits(max_cpm_per_ip=3)
    assert [tr.check(A, t, lim) for t in (0, 1, 2, 3)] == ["", "", "", MAX_CPM_PER_IP]
    assert tr.check(B, 3, lim) == ""  # per source
    assert tr.check(A, 19.5, lim) == MAX_CPM_PER_IP  # one share (60/3 s) not yet drained
    assert tr.check(A, 20.5, lim) == ""  # it has
    assert tr.check(A, 20.5, lim) == MAX_CPM_PER_IP
    assert [tr.check(A, 200, lim) for _ in range(4)] == ["", "", "", MAX_CPM_PER_IP]


@pytest.mark.parametrize("now", [0.0, 12345.678, 1e6 + 0.1])
def test_a_burst_is_exactly_n_despite_float_rounding(now: float) -> None:
    for n in range(1, 200):
        tr, lim = Tracker(), SourceLimits(max_cpm_per_ip=n)
        assert [tr.check(A, now, lim) for _ in range(n + 1)] == [""] * n + [MAX_CPM_PER_IP], n


def test_refused_connections_do_not_fill_the_bucket() -> None:
    tr, lim = Tracker(), SourceLimits(max_cpm_per_ip=1)
    assert tr.check(A, 0, lim) == ""
    for t in range(1, 60):
        assert tr.check(A, t, lim) == MAX_CPM_PER_IP
    assert tr.check(A, 60, lim) == ""


def test_rate_refusal_before_rate_metering_for_concurrency() -> None:
    """A connection refused for concurrency does not spend rate."""
    tr, lim = Tracker(), SourceLimits(max_child_per_ip=1, max_cpm_per_ip=2)
    assert tr.check(A, 0, lim) == ""
    tr.started(A)
    assert [tr.check(A, 0, lim) for _ in range(5)] == [MAX_CHILD_PER_IP] * 5
    assert tr.ended(A)
    assert tr.check(A, 0, lim) == ""  # the second share of the burst is still there


def test_block_time_refuses_then_judges_afresh() -> None:
    tr, lim = Tracker(), SourceLimits(max_cpm_per_ip=2, block_time=30)
    assert [tr.check(A, 0, lim) for _ in range(3)] == ["", "", MAX_CPM_PER_IP]
    assert tr.blocked_until(A) == 30
    assert tr.blocked_sources(10) == 1 and tr.blocked_sources(30) == 0
    assert tr.check(A, 29.9, lim) == BLOCKED
    assert tr.check(B, 29.9, lim) == ""
    # afresh: a whole burst, although without the block only one share would have drained
    assert [tr.check(A, 30, lim) for _ in range(3)] == ["", "", MAX_CPM_PER_IP]


def test_block_outlives_a_reload_that_removes_the_limits() -> None:
    tr = Tracker()
    lim = SourceLimits(max_cpm_per_ip=1, block_time=100)
    assert tr.check(A, 0, lim) == ""
    assert tr.check(A, 1, lim) == MAX_CPM_PER_IP
    assert tr.check(A, 50, NO_LIMITS) == BLOCKED
    assert tr.check(A, 101, NO_LIMITS) == ""


def test_blocked_source_with_running_connections_keeps_its_count() -> None:
    tr, lim = Tracker(cap=1), SourceLimits(max_cpm_per_ip=1, block_time=10)
    assert tr.check(A, 0, lim) == ""
    tr.started(A)
    assert tr.check(A, 0, lim) == MAX_CPM_PER_IP
    tr.update_cap(0)
    assert tr.check(A, 5, lim) == BLOCKED  # busy sources are never evicted, even at cap 0
    assert tr.ended(A)
    assert len(tr) == 0  # at cap 0 the idle source goes at once


def test_cap_evicts_least_recently_seen() -> None:
    tr, lim = Tracker(cap=3), SourceLimits(max_cpm_per_ip=1)
    for key in "abc":
        assert tr.check(key, 0, lim) == ""
    assert tr.check("a", 1, lim) == MAX_CPM_PER_IP  # seen again: now the most recent
    assert tr.check("d", 1, lim) == ""  # evicts b, the least recently seen
    assert len(tr) == 3
    assert tr.check("a", 2, lim) == MAX_CPM_PER_IP  # a was kept
    assert tr.check("b", 2, lim) == ""  # b was forgotten, so its bucket is empty again


def test_busy_sources_are_never_evicted() -> None:
    tr, lim = Tracker(cap=5), SourceLimits(max_child_per_ip=3, max_cpm_per_ip=1000)
    for _ in range(3):
        assert tr.check(A, 0, lim) == ""
        tr.started(A)
    for i in range(1000):  # a flood of one-off sources
        assert tr.check(i, 0, lim) == ""
        assert len(tr) <= 5
    assert tr.running(A) == 3
    assert tr.check(A, 0, lim) == MAX_CHILD_PER_IP  # still exact: not a fresh source
    assert all(tr.ended(A) for _ in range(3))
    assert not tr.ended(A)


def test_busy_sources_beyond_the_cap_are_all_kept() -> None:
    tr = Tracker(cap=2)
    for i in range(10):
        tr.started(i)
    assert len(tr) == 10 and tr.busy_sources == 10
    assert all(tr.ended(i) for i in range(10))
    assert len(tr) == 0


def test_update_cap_shrinks_now() -> None:
    tr, lim = Tracker(cap=100), SourceLimits(max_cpm_per_ip=5)
    for i in range(50):
        tr.check(i, 0, lim)
    tr.started("busy")
    tr.update_cap(10)
    assert len(tr) == 10 and tr.running("busy") == 1
    tr.update_cap(0)
    assert len(tr) == 1
    with pytest.raises(ValueError):
        tr.update_cap(-1)
    with pytest.raises(ValueError):
        Tracker(-1)


def test_drained_sources_expire_as_new_ones_arrive() -> None:
    tr, lim = Tracker(cap=1000), SourceLimits(max_cpm_per_ip=10)
    for i in range(100):
        tr.check(i, 0, lim)
    assert len(tr) == 100
    for j in range(60):  # new clients, later; each expires up to two old ones
        tr.check(1000 + j, 100.0, lim)
    assert len(tr) == 60  # the 100 drained ones are gone, two per new source


# --- properties ---

TIME = st.integers(0, 4 * 64).map(lambda n: n / 4)  # quarter seconds: exact floats


@given(
    n=st.integers(1, 8),
    gaps=st.lists(st.integers(0, 4 * 40).map(lambda x: x / 4), min_size=1, max_size=120),
)
def test_rate_never_refuses_under_the_limit_and_bounds_a_minute(n: int, gaps: list[float]) -> None:
    """Fewer than N admitted in the last 60 s => admitted; never more than 2N in any 60 s."""
    tr, lim = Tracker(), SourceLimits(max_cpm_per_ip=n)
    now, admitted = 0.0, list[float]()
    for gap in gaps:
        now += gap
        recent = sum(1 for a in admitted if now - a < RATE_WINDOW)
        reason = tr.check(A, now, lim)
        if recent < n:
            assert reason == ""
        if reason == "":
            admitted.append(now)
        assert reason in ("", MAX_CPM_PER_IP)
    for start in admitted:
        assert sum(1 for a in admitted if start <= a < start + RATE_WINDOW) <= 2 * n


@given(cap=st.integers(0, 20), keys=st.lists(st.integers(0, 100), max_size=300))
def test_size_never_exceeds_cap_plus_busy(cap: int, keys: list[int]) -> None:
    tr, lim = Tracker(cap), SourceLimits(max_cpm_per_ip=3, block_time=5)
    running: list[int] = []
    for i, key in enumerate(keys):
        if tr.check(key, i / 8, lim) == "" and key % 3 == 0:
            tr.started(key)
            running.append(key)
        if key % 7 == 0 and running:
            assert tr.ended(running.pop(0))
        assert len(tr) <= max(cap, len(set(running)))
        assert tr.busy_sources == len(set(running))


class TrackerMachine(RuleBasedStateMachine):
    """check/started/ended/update_cap/reload interleavings against an exact model.

    Checked: counts are exact and never negative; len <= max(cap, busy); every
    refusal is justified by the model (so a source under every limit is never
    refused); every admission respects the concurrency limit. max_cpm_per_ip
    stays fixed within one run (a reload changing it is documented to keep the
    fraction of the minute used, not the count).
    """

    def __init__(self) -> None:
        super().__init__()
        self.tr = Tracker()
        self.lim = NO_LIMITS
        self.now = 0.0
        self.count: dict[int, int] = {}
        self.admitted: dict[int, list[float]] = {}
        self.until: dict[int, float] = {}

    @initialize(
        cap=st.integers(0, 8),
        max_child=st.none() | st.integers(0, 3),
        max_cpm=st.none() | st.integers(0, 4),
        block=st.sampled_from([0.0, 5.0, 90.0]),
    )
    def setup(self, cap: int, max_child: int | None, max_cpm: int | None, block: float) -> None:
        self.tr = Tracker(cap)
        self.lim = SourceLimits(max_child, max_cpm, block)

    def _check(self, key: int, dt: float) -> str:
        self.now += dt
        now, lim = self.now, self.lim
        reason = self.tr.check(key, now, lim)
        running = self.count.get(key, 0)
        recent = sum(1 for a in self.admitted.get(key, ()) if now - a < RATE_WINDOW)
        if reason == BLOCKED:
            assert self.until.get(key, 0.0) > now
        elif reason == MAX_CHILD_PER_IP:
            assert lim.max_child_per_ip is not None and running >= lim.max_child_per_ip
        elif reason == MAX_CPM_PER_IP:
            assert lim.max_cpm_per_ip is not None and recent >= lim.max_cpm_per_ip
            if lim.block_time > 0 and lim.max_cpm_per_ip > 0:
                self.until[key] = now + lim.block_time
        else:
            assert reason == ""
            assert lim.max_child_per_ip is None or running < lim.max_child_per_ip
            self.admitted.setdefault(key, []).append(now)
        return reason

    @rule(key=st.integers(0, 11), dt=TIME.map(lambda t: t / 4))
    def check_and_start(self, key: int, dt: float) -> None:
        if self._check(key, dt) == "":
            self.tr.started(key)
            self.count[key] = self.count.get(key, 0) + 1

    @rule(key=st.integers(0, 11), dt=TIME.map(lambda t: t / 4))
    def check_only(self, key: int, dt: float) -> None:
        """Admitted but never handed over (e.g. the fd pass failed): allowed."""
        self._check(key, dt)

    @rule(key=st.integers(0, 11))
    def start_unchecked(self, key: int) -> None:
        """started() without check(): connections carried over from elsewhere still count."""
        self.tr.started(key)
        self.count[key] = self.count.get(key, 0) + 1

    @precondition(lambda self: any(self.count.values()))
    @rule(data=st.data())
    def end_running(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(k for k, c in self.count.items() if c)))
        assert self.tr.ended(key)
        self.count[key] -= 1

    @rule(key=st.integers(0, 11))
    def end_spurious(self, key: int) -> None:
        if not self.count.get(key):
            assert not self.tr.ended(key)

    @rule(cap=st.integers(0, 8))
    def update_cap(self, cap: int) -> None:
        self.tr.update_cap(cap)

    @rule(max_child=st.none() | st.integers(0, 3), block=st.sampled_from([0.0, 5.0, 90.0]))
    def reload(self, max_child: int | None, block: float) -> None:
        self.lim = SourceLimits(max_child, self.lim.max_cpm_per_ip, block)

    @invariant()
    def counts_are_exact_and_size_bounded(self) -> None:
        busy = sum(1 for c in self.count.values() if c)
        assert self.tr.busy_sources == busy
        assert len(self.tr) <= max(self.tr.cap, busy)
        for key in range(12):
            assert self.tr.running(key) == self.count.get(key, 0) >= 0


TestTrackerMachine = TrackerMachine.TestCase
# Shorter runs than the profile's default 50 steps: the invariants are checked
# after every step, and 12 keys against small caps reach eviction within 25.
TestTrackerMachine.settings = settings(settings.default, stateful_step_count=25)
