"""Admission: access lists, the service rate, per-source limits by network; a fake clock."""

from __future__ import annotations

from dataclasses import replace

from engine_fakes import services_from

from poolinetd.admission.policy import LOOPING_PAUSE, Admission
from poolinetd.config.spec import Service

BASE = "127.0.0.1:0 on socktype=stream, user={user}, args=echo"


def service(extra: str = "") -> Service:
    (svc,) = services_from(f"{BASE}{', ' + extra if extra else ''};\n")
    return svc


def admit(adm: Admission, ip: str, now: float = 0.0) -> str:
    key = adm.source(ip)
    why = adm.check(key, ip, now)
    if not why:
        adm.started(key)
    return why


def test_lifted_limits_admit_everything() -> None:
    adm = Admission(service("max_child_per_ip=unlimited"))
    assert all(admit(adm, "192.0.2.1", t) == "" for t in range(1000))


def test_the_safe_default_keeps_one_source_from_taking_the_service() -> None:
    svc = service("pool_max=2, worker_connections=8")  # capacity 16: a source gets 4
    assert svc.limits.max_child_per_ip == 4
    adm = Admission(svc)
    assert [admit(adm, "192.0.2.1") for _ in range(5)] == ["", "", "", "", "max_child_per_ip"]
    assert admit(adm, "192.0.2.2") == ""  # another source is served


def test_one_ipv6_host_is_one_source_by_default() -> None:
    """Issue 21: four addresses of one /64 held all 8 slots of a max_child=8 service when
    each IPv6 address counted as a source of its own. By default a /64 is one source."""
    svc = service("max_child=8")
    assert svc.source_v6_prefix == 64 and svc.limits.max_child_per_ip == 2
    adm = Admission(svc)
    host = [f"2001:db8:1:2::{i:x}" for i in range(1, 5)]
    assert [admit(adm, ip) for ip in host] == ["", "", "max_child_per_ip", "max_child_per_ip"]
    assert admit(adm, "2001:db8:1:3::1") == ""  # the next /64 is another source


def test_concurrency_counts_by_network_prefix() -> None:
    adm = Admission(service("max_child_per_ip=2, source_v4_prefix=24"))
    assert admit(adm, "198.51.100.1") == "" and admit(adm, "198.51.100.2") == ""
    assert admit(adm, "198.51.100.3") == "max_child_per_ip"  # the same /24
    assert admit(adm, "198.51.101.1") == ""  # another /24
    adm.ended(adm.source("198.51.100.2"))
    assert admit(adm, "198.51.100.200") == ""


def test_rate_with_block_time_blocks_then_judges_afresh() -> None:
    adm = Admission(service("max_cpm_per_ip=2, block_time=30"))
    assert [admit(adm, "203.0.113.9", t) for t in (0, 1)] == ["", ""]
    assert admit(adm, "203.0.113.9", 2) == "max_cpm_per_ip"
    assert admit(adm, "203.0.113.9", 20) == "blocked"
    assert admit(adm, "203.0.113.9", 33) == ""  # the block expired: a fresh bucket


def test_access_lists_no_access_wins_and_mapped_v4_matches() -> None:
    adm = Admission(service("only_from=192.0.2.0/24 2001:db8::/32, no_access=192.0.2.66"))
    assert admit(adm, "192.0.2.1") == ""
    assert admit(adm, "::ffff:192.0.2.2") == ""  # a tcp46 listener's view of an IPv4 client
    assert admit(adm, "192.0.2.66") == "no_access"
    assert admit(adm, "198.51.100.1") == "only_from"
    assert admit(adm, "2001:db8::5") == "" and admit(adm, "2001:db9::5") == "only_from"


def test_nothing_allowed_is_zero_and_the_service_rate_loops() -> None:
    adm = Admission(service("ip_max=0"))  # NetBSD: 0 = nothing allowed
    assert admit(adm, "192.0.2.1") == "max_cpm_per_ip"
    adm = Admission(service("max_spawn_per_min=2"))
    assert admit(adm, "", 0) == "" and admit(adm, "", 1) == ""
    assert admit(adm, "", 2) == "max_spawn_per_min" and adm.looping
    assert adm.paused_until == 2 + LOOPING_PAUSE
    assert admit(adm, "", adm.paused_until) == ""  # it comes back by itself
    assert adm.check_start(adm.paused_until + 1) == ""


def test_update_keeps_counts_and_blocks() -> None:
    svc = service("max_cpm_per_ip=1, block_time=60")
    adm = Admission(svc)
    assert admit(adm, "192.0.2.1", 0) == "" and admit(adm, "192.0.2.1", 1) == "max_cpm_per_ip"
    adm.update(replace(svc, limits=replace(svc.limits, max_cpm_per_ip=None)))
    assert admit(adm, "192.0.2.1", 2) == "blocked"  # a blocked source stays blocked
