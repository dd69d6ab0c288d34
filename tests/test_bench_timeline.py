"""benchmarks/timeline.py's analysis: dips and when the slowest connections ended (pure)."""

from __future__ import annotations

from array import array

from benchmarks.timeline import BIN_S, analyse, bins_of

MS = 1_000_000  # ns


def _log(records: list[tuple[int, int]]) -> array[int]:
    out: array[int] = array("q")
    for start, end in records:
        out.extend((start, end, 0))
    return out


def test_a_dip_and_the_slowest_connections_are_found() -> None:
    records = []
    bin_ns = int(BIN_S * 1e9)
    for b in range(40):  # 40 bins of 20 connections of 2 ms; bin 25: 8 of 90 ms
        if b == 25:
            records += [(b * bin_ns + 10 * MS - 90 * MS, b * bin_ns + 10 * MS)] * 8
            continue
        records += [(b * bin_ns + i * MS, b * bin_ns + i * MS + 2 * MS) for i in range(20)]
    got = analyse(_log(records), 0)
    assert got["median_per_bin"] == 20
    assert [d["at_s"] for d in got["dips"]] == [round(25 * BIN_S, 2)]
    assert got["dips"][0]["completed"] == 8 and got["dips"][0]["slowest_ms"] == 90.0
    assert got["slowest_1pct_at"] == [round((25 * bin_ns + 10 * MS) / 1e9, 1)]  # all 90 ms ones


def test_connections_before_the_window_are_left_out() -> None:
    records = [(0, 5 * MS), (100 * MS, 105 * MS)]
    assert sum(n for n, _ in bins_of(_log(records), 50 * MS).values()) == 1
    assert analyse(_log([]), 0) == {"dips": [], "slowest_1pct_at": []}
