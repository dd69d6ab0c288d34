"""benchmarks/growth.py and benchmarks/profile_load.py: the pure parts (no server)."""

from __future__ import annotations

import socket

from benchmarks.growth import _Client, _max_waiting, _pool_counts, analyse, summarize
from benchmarks.profile_load import aggregate_raw

MS = 1_000_000


def _client(t0: int, conn: int, echo: int, close: int = 0, wave: int = 1) -> _Client:
    s = socket.socket()
    s.close()
    return _Client(s, t0, t_conn=conn, t_echo=echo, t_close=close, wave=wave)


def test_max_waiting_counts_connected_not_yet_echoed() -> None:
    cs = [_client(0, 1, 10), _client(0, 2, 5), _client(0, 3, 4), _client(0, 11, 12)]
    # At t=3 three are connected and none echoed; the fourth connects after two left.
    assert _max_waiting(cs) == 3


def test_max_waiting_echo_and_connect_at_same_instant_do_not_overlap() -> None:
    assert _max_waiting([_client(0, 1, 5), _client(0, 5, 6)]) == 1


def test_analyse_times_ttfb_and_pool_full() -> None:
    start = 1000 * MS
    cs = [_client(start, start + MS, start + (10 + i) * MS) for i in range(4)]
    samples = [
        (start + 5 * MS, 3, 2, 1, 1, 1),
        (start + 12 * MS, 0, 64, 60, 4, 60),
        (start + 20 * MS, 0, 64, 64, 0, 64),
    ]
    r = analyse(cs, start, samples, 4, 4)
    assert r["echoed"] == 4
    assert r["served_s"] == 0.013
    assert r["all_served_s"] == 0.013
    assert r["children_s"] == 0.012
    assert r["ready_s"] == 0.02
    assert r["max_accept_queue"] == 3
    assert r["ttfb_ms"] == {"n": 4, "p50": 11.0, "p99": 13.0, "max": 13.0}
    assert r["errors"] == {}


def test_analyse_second_wave_and_missing_times() -> None:
    start = 0
    cs = [_client(0, MS, 2 * MS), _client(0, MS, 50 * MS, wave=2), _client(0, MS, 0, wave=2)]
    cs[2].error = "timeout"
    r = analyse(cs, start, [], 3, 1)
    assert r["served_s"] == 0.002
    assert r["all_served_s"] is None  # one never got its echo
    assert r["children_s"] is None and r["ready_s"] is None
    assert r["ttfb_ms"]["n"] == 1  # the first wave only
    assert r["errors"] == {"timeout": 1}
    row = summarize([{**r, "service": "echo", "rep": 0}])[0]
    assert row["all_served_s"] is None and row["pool_full_reps"] == 0


def test_pool_counts_from_status() -> None:
    doc = {"services": [{"workers": {"idle": 2, "busy": 3, "booting": 1, "draining": 0}}]}
    assert _pool_counts(doc) == (5, 1, 3)
    assert _pool_counts(None) == (-1, -1, -1)


def test_aggregate_raw_own_and_inclusive() -> None:
    raw = "main (a.py:1);loop (a.py:5);select (s.py:9) 30\nmain (a.py:1);loop (a.py:5) 10\n"
    agg = aggregate_raw(raw)
    assert agg["samples"] == 40
    assert dict(agg["own"]) == {"select (s.py:9)": 75.0, "loop (a.py:5)": 25.0}
    assert dict(agg["inclusive"])["main (a.py:1)"] == 100.0
