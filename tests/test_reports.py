"""The status and metrics documents: pure functions of the generations and a dispatcher."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from engine_fakes import services_from

from poolinetd.config.spec import Service
from poolinetd.engine import reports
from poolinetd.engine.runtime import Listener, ServiceRuntime
from poolinetd.observe import metrics
from poolinetd.ops import listeners

ECHO = "127.0.0.1:0 stream tcp nowait {user} internal echo\n"
DAYTIME = "127.0.0.1:0 stream tcp nowait {user} internal daytime\n"
WORKERS = {"booting": 0, "idle": 2, "busy": 1, "draining": 0, "stalled": 0}


class StubDispatcher:
    """A dispatcher's answers for the documents (the rest of the protocol is unused)."""

    mode = "pool"

    def __init__(self, failing: bool = False) -> None:
        self.is_failing = failing

    def report(self, rt: ServiceRuntime, now: float) -> dict[str, object]:
        return {"workers": dict(WORKERS), "pool_min": 1, "pool_max": 4, "restarts": 2,
                "boot_failures": 1, "retry_in": 0.0, "last_error": "worker said no"}

    def failing(self, rt: ServiceRuntime) -> bool:
        return self.is_failing


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """The listeners the runtimes hold (the documents read their bound addresses)."""
    made: list[socket.socket] = []
    yield made
    for sock in made:
        sock.close()


def runtime(service: Service, sockets: list[socket.socket]) -> ServiceRuntime:
    rt = ServiceRuntime(service)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sockets.append(sock)
    rt.listeners.append(Listener(sock, rt, listeners.bound_address(sock)))
    return rt


def test_status_lists_every_generation_with_its_state_and_counters(
        sockets: list[socket.socket]) -> None:
    echo, daytime = (runtime(s, sockets) for s in services_from(ECHO + DAYTIME))
    daytime.engine_served = True
    echo.instances, echo.programs, echo.pending = 3, 0, 1
    echo.stats.accepted, echo.stats.refused = 10, 2
    echo.stats.refused_by["only_from"] = 2
    old = ServiceRuntime(echo.service)
    old.retired = True
    doc = reports.status([echo, daytime, old], StubDispatcher(), 100.0, started=0.0,
                         reloads=4, stopping=False, upgrading=0)  # type: ignore[arg-type]
    assert doc["mode"] == "pool" and doc["reloads"] == 4 and doc["upgrading"] == 0
    first, second, third = doc["services"]  # type: ignore[misc]
    assert first["state"] == "serving" and first["active"] == 3
    assert first["accepted"] == 10 and first["refused_by"] == {"only_from": 2}
    assert first["preamble"] == 1 and first["workers"] == WORKERS
    assert first["last_error"] == "worker said no"  # the dispatcher's, when ours is empty
    assert first["source"] == "<test>:1"
    assert second["workers"]["idle"] == 0  # engine-served: no workers to report
    assert third["state"] == "retiring" and third["listeners"] == []


def test_status_says_failing_and_paused(sockets: list[socket.socket]) -> None:
    (echo,) = (runtime(s, sockets) for s in services_from(ECHO))
    doc = reports.status([echo], StubDispatcher(failing=True), 100.0, started=0.0,
                         reloads=0, stopping=True, upgrading=77)  # type: ignore[arg-type]
    assert doc["services"][0]["state"] == "failing"  # type: ignore[index]
    assert doc["stopping"] is True and doc["upgrading"] == 77
    echo.paused_until = 200.0
    echo.last_error = "accept: Too many open files"
    doc = reports.status([echo], StubDispatcher(), 100.0, started=0.0, reloads=0,
                         stopping=False, upgrading=0)  # type: ignore[arg-type]
    (entry,) = doc["services"]  # type: ignore[misc]
    assert entry["state"] == "paused" and entry["last_error"].startswith("accept:")


def test_metrics_sum_generations_that_share_their_stats(sockets: list[socket.socket]) -> None:
    """A reload's new generation shares the old one's stats: one series, summed counts."""
    (echo,) = (runtime(s, sockets) for s in services_from(ECHO))
    new = ServiceRuntime(echo.service)
    new.stats = echo.stats
    echo.retired = True
    echo.instances, new.instances = 2, 5
    echo.stats.accepted = 7
    doc = reports.metrics_document([new, echo], StubDispatcher(), 1.0,  # type: ignore[arg-type]
                                   metrics.Histogram(metrics.LOOP_TURN_BUCKETS))
    (entry,) = doc["services"]
    assert entry["accepted"] == 7 and entry["active_connections"] == 7
    assert entry["workers"]["idle"] == 4 and entry["restarts"] == 4
    text = metrics.render(doc).decode()
    assert "poolinetd_" in text and text.endswith("\n")


def test_listener_report_and_summary_skip_retired_generations(sockets: list[socket.socket]) -> None:
    echo, daytime = (runtime(s, sockets) for s in services_from(ECHO + DAYTIME))
    daytime.retired = True
    daytime.instances = 1
    report = reports.listener_report([echo, daytime])
    assert [r["service"] for r in report] == [echo.name]
    assert report[0]["port"] == echo.listeners[0].bound.port
    line = reports.summary([echo, daytime], "classic", 3)
    assert line == "classic mode: 1 services, 1 active, 0 accepted, 3 reloads"
