"""Metrics: the exposition parses with the official Prometheus parser and every value survives;
Histogram counts; the HTTP request reader answers GET /metrics and refuses the rest."""

from __future__ import annotations

import math
import selectors
import socket
import threading
import urllib.request

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from poolinetd.observe import metrics
from poolinetd.observe.metrics import Histogram, HttpRequest, MetricsDocument, ServiceMetrics

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(data: bytes) -> tuple[dict[str, str], Samples]:
    """(family name -> type, (sample name, sorted labels) -> value) via the official parser."""
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(data.decode("utf-8")):
        types[family.name] = family.type
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = sample.value
    return types, samples


def service(label: str, base: int) -> ServiceMetrics:
    handoff = Histogram(metrics.HANDOFF_BUCKETS)
    for value in (0.00002, 0.0003, 0.0003, 0.002, 5.0):
        handoff.observe(value)
    run = Histogram(metrics.RUN_TIME_BUCKETS)
    run.observe(0.5)  # exactly on a bound: counted in that bucket (le is inclusive)
    return {
        "service": label, "accepted": base + 1, "refused": {"max_child": base + 2, "access": 3},
        "active_connections": base + 4, "running_programs": base + 5,
        "workers": {"idle": 2, "busy": base + 6, "booting": 0}, "restarts": base + 7,
        "boot_failures": base + 8, "builtin_bytes_in": 2**40 + base,
        "builtin_bytes_out": base + 9, "program_exits": {"0": base + 10, "SIGKILL": 1},
        "handoff_seconds": handoff.snapshot(), "program_run_seconds": run.snapshot(),
    }


def document() -> MetricsDocument:
    loop = Histogram(metrics.LOOP_TURN_BUCKETS)
    for value in (0.00001, 0.0002, 2.0):
        loop.observe(value)
    return {"engine": {"loop_turn_seconds": loop.snapshot(), "open_fds": 57},
            "services": [service("echo/tcp", 100),
                         service('we"ird\\na\nme', 200)]}


def test_every_value_survives_the_official_parser() -> None:
    types, samples = parse(metrics.render(document()))
    assert types == {
        "poolinetd_connections_accepted": "counter",
        "poolinetd_connections_refused": "counter",
        "poolinetd_connections_active": "gauge",
        "poolinetd_programs_running": "gauge",
        "poolinetd_workers": "gauge",
        "poolinetd_worker_restarts": "counter",
        "poolinetd_worker_boot_failures": "counter",
        "poolinetd_builtin_received_bytes": "counter",
        "poolinetd_builtin_sent_bytes": "counter",
        "poolinetd_program_exits": "counter",
        "poolinetd_handoff_seconds": "histogram",
        "poolinetd_program_run_seconds": "histogram",
        "poolinetd_loop_turn_seconds": "histogram",
        "poolinetd_open_fds": "gauge",
    }
    expected: Samples = {}
    for label, base in (("echo/tcp", 100), ('we"ird\\na\nme', 200)):
        svc = (("service", label),)

        def put(name: str, value: float, extra: tuple[tuple[str, str], ...] = (),
                labels: tuple[tuple[str, str], ...] = svc) -> None:
            expected[(name, tuple(sorted(labels + extra)))] = value

        put("poolinetd_connections_accepted_total", base + 1)
        put("poolinetd_connections_refused_total", base + 2, (("reason", "max_child"),))
        put("poolinetd_connections_refused_total", 3, (("reason", "access"),))
        put("poolinetd_connections_active", base + 4)
        put("poolinetd_programs_running", base + 5)
        put("poolinetd_workers", 2, (("state", "idle"),))
        put("poolinetd_workers", base + 6, (("state", "busy"),))
        put("poolinetd_workers", 0, (("state", "booting"),))
        put("poolinetd_worker_restarts_total", base + 7)
        put("poolinetd_worker_boot_failures_total", base + 8)
        put("poolinetd_builtin_received_bytes_total", 2**40 + base)
        put("poolinetd_builtin_sent_bytes_total", base + 9)
        put("poolinetd_program_exits_total", base + 10, (("status", "0"),))
        put("poolinetd_program_exits_total", 1, (("status", "SIGKILL"),))
        handoff = {0.00005: 1, 0.0001: 1, 0.00025: 1, 0.0005: 3, 0.001: 3, 0.0025: 4,
                   0.005: 4, 0.01: 4, 0.025: 4, 0.05: 4, 0.1: 4, 0.25: 4, 1.0: 4}
        for bound, count in handoff.items():
            put("poolinetd_handoff_seconds_bucket", count, (("le", repr(bound)),))
        put("poolinetd_handoff_seconds_bucket", 5, (("le", "+Inf"),))
        put("poolinetd_handoff_seconds_count", 5)
        put("poolinetd_handoff_seconds_sum", 0.00002 + 0.0003 + 0.0003 + 0.002 + 5.0)
        for bound in metrics.RUN_TIME_BUCKETS:
            put("poolinetd_program_run_seconds_bucket", 1 if bound >= 0.5 else 0,
                (("le", repr(bound)),))
        put("poolinetd_program_run_seconds_bucket", 1, (("le", "+Inf"),))
        put("poolinetd_program_run_seconds_count", 1)
        put("poolinetd_program_run_seconds_sum", 0.5)
    loop = {0.0001: 1, 0.0005: 2, 0.001: 2, 0.005: 2, 0.01: 2, 0.05: 2, 0.1: 2, 0.5: 2, 1.0: 2}
    for bound, count in loop.items():
        expected[("poolinetd_loop_turn_seconds_bucket", (("le", repr(bound)),))] = count
    expected[("poolinetd_loop_turn_seconds_bucket", (("le", "+Inf"),))] = 3
    expected[("poolinetd_loop_turn_seconds_count", ())] = 3
    expected[("poolinetd_loop_turn_seconds_sum", ())] = 0.00001 + 0.0002 + 2.0
    expected[("poolinetd_open_fds", ())] = 57
    assert set(samples) == set(expected)
    for key, value in expected.items():
        assert samples[key] == pytest.approx(value, rel=1e-12), key


def test_text_has_help_and_type_and_escapes_labels() -> None:
    text = metrics.render(document()).decode()
    for name in ("poolinetd_connections_accepted_total", "poolinetd_handoff_seconds",
                 "poolinetd_open_fds"):
        assert f"\n# HELP {name} " in "\n" + text
        assert f"\n# TYPE {name} " in text
    assert 'poolinetd_connections_accepted_total{service="we\\"ird\\\\na\\nme"} 201\n' in text
    assert text.endswith("poolinetd_open_fds 57\n")
    assert 'le="+Inf"' in text


def test_a_document_survives_json_and_renders_the_same() -> None:
    doc = document()
    again = orjson.loads(orjson.dumps(doc))
    assert metrics.render(again) == metrics.render(doc)


def test_no_services_and_repeated_labels() -> None:
    doc: MetricsDocument = {"engine": {"loop_turn_seconds":
                                       metrics.empty_snapshot(metrics.LOOP_TURN_BUCKETS),
                                       "open_fds": 4}, "services": []}
    types, samples = parse(metrics.render(doc))
    assert len(types) == 14  # every family announced even when empty
    assert samples[("poolinetd_loop_turn_seconds_count", ())] == 0
    doc["services"] = [service("a", 1), service("a", 50)]
    _, samples = parse(metrics.render(doc))  # parse() fails on a duplicate series
    assert samples[("poolinetd_connections_accepted_total", (("service", "a"),))] == 2


def test_escaping_rules() -> None:
    assert metrics.escape_label('a\\b"c\nd') == 'a\\\\b\\"c\\nd'
    assert metrics.escape_help('say "x"\\\n') == 'say "x"\\\\\\n'
    assert metrics.format_value(3) == "3"
    assert metrics.format_value(0.1) == "0.1"
    assert metrics.format_value(math.inf) == "+Inf"
    assert metrics.format_value(-math.inf) == "-Inf"
    assert metrics.format_value(math.nan) == "NaN"


@given(st.lists(st.floats(min_value=-1e6, max_value=1e6), max_size=50))
def test_histogram_counts_are_cumulative_and_consistent(values: list[float]) -> None:
    bounds = (0.001, 0.1, 1.0, 10.0)
    hist = Histogram(bounds)
    for value in values:
        hist.observe(value)
    snap = hist.snapshot()
    assert snap["cumulative"] == [sum(1 for v in values if v <= b) for b in bounds]
    assert snap["count"] == len(values)
    assert snap["sum"] == pytest.approx(sum(values), abs=1e-6)
    _, samples = parse(metrics.render({"engine": {"loop_turn_seconds": snap, "open_fds": 0},
                                       "services": []}))
    for bound, count in zip(bounds, snap["cumulative"], strict=True):
        assert samples[("poolinetd_loop_turn_seconds_bucket", (("le", repr(bound)),))] == count


def test_histogram_ignores_nan_and_refuses_bad_bounds() -> None:
    hist = Histogram((1.0,))
    hist.observe(math.nan)
    hist.observe(math.inf)
    assert (hist.count, hist.cumulative()) == (1, [0])
    for bad in ((), (1.0, 1.0), (2.0, 1.0), (1.0, math.inf)):
        with pytest.raises(ValueError):
            Histogram(bad)


# ---------------------------------------------------------------- HttpRequest

BODY = b"poolinetd_open_fds 3\n"


def split_response(data: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return lines[0], headers, body


def request() -> tuple[HttpRequest, list[int]]:
    calls: list[int] = []

    def render() -> bytes:
        calls.append(1)
        return BODY
    return HttpRequest(render), calls


def test_get_metrics_in_pieces() -> None:
    req, calls = request()
    raw = (b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:9100\r\n"
           b"Accept: application/openmetrics-text;version=1.0.0\r\n\r\n")
    for i in range(len(raw) - 1):
        assert req.feed(raw[i:i + 1]) is None
        assert req.status == 0
    response = req.feed(raw[-1:])
    assert response is not None
    status, headers, body = split_response(response)
    assert status == "HTTP/1.0 200 OK"
    assert headers["Content-Type"] == metrics.CONTENT_TYPE
    assert headers["Content-Length"] == str(len(BODY))
    assert headers["Connection"] == "close"
    assert body == BODY
    assert calls == [1]
    assert req.status == 200
    assert req.feed(b"more") == b""  # answered: nothing more, no second render
    assert calls == [1]


def test_head_query_string_and_bare_newlines() -> None:
    req, _ = request()
    response = req.feed(b"HEAD /metrics?x=1 HTTP/1.0\n\n")
    assert response is not None
    status, headers, body = split_response(response)
    assert (status, headers["Content-Length"], body) == ("HTTP/1.0 200 OK", str(len(BODY)), b"")


@pytest.mark.parametrize(("raw", "status"), [
    (b"GET / HTTP/1.0\r\n\r\n", 404),
    (b"GET /metricsx HTTP/1.0\r\n\r\n", 404),
    (b"POST /metrics HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc", 405),
    (b"GET /metrics HTTP/2.0\r\n\r\n", 505),
    (b"GET /metrics\r\n\r\n", 400),
    (b"GET  /metrics HTTP/1.0\r\n\r\n", 400),
    (b"GET metrics HTTP/1.0\r\n\r\n", 400),
    (b"GET /metrics FTP/1.0\r\n\r\n", 400),
    (b"\r\n\r\n", 400),
])
def test_everything_else_is_refused_without_rendering(raw: bytes, status: int) -> None:
    req, calls = request()
    response = req.feed(raw)
    assert response is not None
    assert split_response(response)[0].startswith(f"HTTP/1.0 {status} ")
    assert req.status == status
    assert calls == []
    if status == 405:
        assert split_response(response)[1]["Allow"] == "GET, HEAD"


def test_oversized_headers_get_431_and_eof_mid_request_gets_400() -> None:
    req, calls = request()
    assert req.feed(b"GET /metrics HTTP/1.0\r\n") is None
    response = None
    for _ in range(100):
        response = req.feed(b"X-Filler: " + b"y" * 200 + b"\r\n")
        if response is not None:
            break
    assert response is not None
    assert req.status == 431
    assert calls == []
    req, calls = request()
    assert req.feed(b"GET /metr") is None
    response = req.feed(b"")
    assert response is not None
    assert req.status == 400


def test_a_request_right_at_the_limit_is_served() -> None:
    line = b"GET /metrics HTTP/1.0\r\n"
    filler = b"X: " + b"y" * (metrics.MAX_REQUEST - len(line) - 3 - 2) + b"\r\n"
    raw = line + filler + b"\r\n"
    assert len(raw) == metrics.MAX_REQUEST + 2
    req, _ = request()
    assert req.feed(raw) is not None
    assert req.status == 200


@given(st.binary(max_size=300), st.integers(min_value=1, max_value=50))
def test_any_bytes_end_in_need_more_or_one_answer(data: bytes, chunk: int) -> None:
    req, calls = request()
    answers = []
    for i in range(0, len(data), chunk):
        result = req.feed(data[i:i + chunk])
        if result:
            answers.append(result)
    final = req.feed(b"")
    if final:
        answers.append(final)
    assert len(answers) == 1
    assert answers[0].startswith(b"HTTP/1.0 ")
    assert len(calls) <= 1


def test_a_real_http_client_on_loopback_gets_parseable_metrics() -> None:
    """A non-blocking selector loop like the engine's drives HttpRequest; urllib asks."""
    body = metrics.render(document())
    results: list[tuple[int, str, bytes]] = []

    def client(port: int) -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
            results.append((resp.status, resp.headers["Content-Type"], resp.read()))

    with socket.create_server(("127.0.0.1", 0)) as listener, \
            selectors.DefaultSelector() as selector:
        listener.setblocking(False)
        thread = threading.Thread(target=client, args=(listener.getsockname()[1],))
        thread.start()
        selector.register(listener, selectors.EVENT_READ)
        conn = None
        req = HttpRequest(lambda: body)
        answer: bytes | None = None
        while answer is None:
            for key, _ in selector.select(timeout=30):
                if key.fileobj is listener:
                    conn, _addr = listener.accept()
                    conn.setblocking(False)
                    selector.register(conn, selectors.EVENT_READ)
                else:
                    assert conn is not None
                    answer = req.feed(conn.recv(4096))
        assert conn is not None
        selector.unregister(conn)
        conn.setblocking(True)
        conn.sendall(answer)
        conn.close()
        thread.join(timeout=30)
    assert not thread.is_alive()
    ((status, content_type, got),) = results
    assert (status, content_type, got) == (200, metrics.CONTENT_TYPE, body)
    _, samples = parse(got)
    assert samples[("poolinetd_open_fds", ())] == 57
