"""Admission limits, driven by a fake clock."""

from __future__ import annotations

from poolinetd.admission import LOOPING_PAUSE, RATE_WINDOW, Admission
from poolinetd.spec import Limits


def test_no_limits_admits_everything() -> None:
    adm = Admission(Limits())
    assert not adm.active
    assert all(adm.check("192.0.2.1", t) == "" for t in range(1000))


def test_concurrent_per_ip() -> None:
    adm = Admission(Limits(max_child_per_ip=2))
    for _ in range(2):
        assert adm.check("192.0.2.1", 0) == ""
        adm.started("192.0.2.1")
    assert adm.check("192.0.2.1", 0) == "max_child_per_ip"
    assert adm.check("192.0.2.2", 0) == ""  # another IP is not affected
    adm.ended("192.0.2.1")
    assert adm.check("192.0.2.1", 0) == ""
    adm.ended("192.0.2.1")
    adm.ended("192.0.2.1")
    assert adm.per_ip == {}  # no negative counts, no leftover keys


def test_rate_per_ip_slides_and_forgets_old_clients() -> None:
    adm = Admission(Limits(max_cpm_per_ip=3))
    assert [adm.check("198.51.100.7", t) for t in (0, 1, 2, 3)] == ["", "", "", "max_cpm_per_ip"]
    assert adm.check("198.51.100.7", RATE_WINDOW + 0.5) == ""  # the first one left the window
    for i in range(500):
        adm.check(f"10.0.{i // 256}.{i % 256}", 100.0)
    adm.check("198.51.100.7", 100.0 + RATE_WINDOW * 3)
    assert len(adm.ip_history) <= 1  # one-off clients are swept


def test_spawn_rate_trips_the_looping_rest() -> None:
    adm = Admission(Limits(max_spawn_per_min=2))
    assert adm.check("", 0) == "" and adm.check("", 1) == ""
    assert adm.check("", 2) == "max_spawn_per_min" and adm.looping
    assert adm.paused_until == 2 + LOOPING_PAUSE
    assert adm.check("", adm.paused_until) == ""  # it comes back by itself
