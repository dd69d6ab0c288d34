"""Prometheus text exposition (format 0.0.4) of poolinetd's counters, and a tiny HTTP/1.0 reader.

Pure: ``render`` turns a plain document (the TypedDicts below, which is also
what the control socket can carry as JSON) into bytes; ``Histogram`` counts
observations; ``HttpRequest`` reads one ``GET /metrics`` fed to it in pieces
and says what to answer. The engine owns the sockets and does the I/O.

Why not prometheus-client at run time (the tests do use its official parser to
check this output): we need only the text format of numbers the engine already
keeps, and the format is a few rules (HELP/TYPE lines, label escaping of
backslash, quote and newline, cumulative ``le`` buckets, ``+Inf``). The
library's model is a process-global registry of mutable metric objects, each
with a ``threading.Lock``, plus default process/platform/GC collectors and a
multiprocess mode switched on by an environment variable; its ``import``
loads 113 modules (http.server, wsgiref, ssl, email, ...) and takes 50-120 ms
(measured with 0.26.0), all of it inherited by every forked worker of a root
daemon that runs no thread. An own renderer of ~150 lines, checked against the
official parser in the tests, costs less than that dependency.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import TypedDict

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Bucket upper bounds, in seconds.
HANDOFF_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                   0.05, 0.1, 0.25, 1.0)
RUN_TIME_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 3600.0)
LOOP_TURN_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0)


class HistogramSnapshot(TypedDict):
    """A histogram's state: ``cumulative[i]`` observations were <= ``bounds[i]``.

    ``bounds`` are finite and strictly increasing; the ``+Inf`` bucket is
    ``count``. Plain lists, so the document survives a JSON round trip.
    """

    bounds: list[float]
    cumulative: list[int]
    count: int
    sum: float


class ServiceMetrics(TypedDict):
    """One service (one inetd.conf entry), labelled ``service="<label>"``.

    Counters only grow for the life of the master (``*_total``); the others are
    gauges read at render time. Dict keys become a second label: ``refused``
    by ``reason`` (e.g. ``"max_child"``, ``"per_source"``, ``"access"``,
    ``"rate"``, ``"no_worker"``), ``workers`` by ``state`` (e.g. ``"booting"``,
    ``"idle"``, ``"busy"``, ``"draining"``), ``program_exits`` by ``status``
    (``"0"``..``"255"`` for exit codes, a signal name such as ``"SIGKILL"``
    for a signal). ``builtin_bytes_in``/``_out`` count what built-in handlers
    (echo, chargen, ...) read and wrote.
    """

    service: str
    accepted: int
    refused: dict[str, int]
    active_connections: int
    running_programs: int
    workers: dict[str, int]
    restarts: int
    boot_failures: int
    builtin_bytes_in: int
    builtin_bytes_out: int
    program_exits: dict[str, int]
    handoff_seconds: HistogramSnapshot
    program_run_seconds: HistogramSnapshot


class EngineMetrics(TypedDict):
    """The master's own loop: time per loop turn, and fds it has open now."""

    loop_turn_seconds: HistogramSnapshot
    open_fds: int


class MetricsDocument(TypedDict):
    """What ``render`` takes. Service labels should be unique: a repeated one is skipped."""

    engine: EngineMetrics
    services: list[ServiceMetrics]


class Histogram:
    """Fixed-bucket histogram: ``observe`` values, ``snapshot`` for a document."""

    def __init__(self, bounds: Sequence[float]) -> None:
        if not bounds or any(not math.isfinite(b) for b in bounds) or any(
                a >= b for a, b in itertools.pairwise(bounds)):
            raise ValueError(f"bucket bounds must be finite and strictly increasing: {bounds}")
        self.bounds = tuple(float(b) for b in bounds)
        # Per bucket (not cumulative); the last one is (bounds[-1], +Inf).
        self._counts = [0] * (len(self.bounds) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count ``value`` in the first bucket whose bound is >= it (``le`` is inclusive).

        NaN is ignored: it would make ``sum`` NaN forever.
        """
        if math.isnan(value):
            return
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def cumulative(self) -> list[int]:
        """Observations <= each bound, in bound order (the ``+Inf`` one is ``count``)."""
        total = 0
        result = []
        for n in self._counts[:-1]:
            total += n
            result.append(total)
        return result

    def snapshot(self) -> HistogramSnapshot:
        return {"bounds": list(self.bounds), "cumulative": self.cumulative(),
                "count": self.count, "sum": self.sum}


def empty_snapshot(bounds: Sequence[float]) -> HistogramSnapshot:
    """A histogram with nothing observed (for a service that has no programs, say)."""
    return Histogram(bounds).snapshot()


# ---------------------------------------------------------------- rendering

Labels = tuple[tuple[str, str], ...]


def escape_label(value: str) -> str:
    """A label value per the exposition format: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """HELP text: backslash and newline escaped (quotes stay)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """Integers exactly, floats as Python's shortest repr, and the special values by name."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _sample(name: str, labels: Labels, value: float) -> str:
    if not labels:
        return f"{name} {format_value(value)}\n"
    inner = ",".join(f'{key}="{escape_label(val)}"' for key, val in labels)
    return f"{name}{{{inner}}} {format_value(value)}\n"


def _histogram(name: str, labels: Labels, snap: HistogramSnapshot) -> Iterator[str]:
    for bound, n in zip(snap["bounds"], snap["cumulative"], strict=False):
        yield _sample(f"{name}_bucket", (*labels, ("le", format_value(float(bound)))), n)
    yield _sample(f"{name}_bucket", (*labels, ("le", "+Inf")), snap["count"])
    yield _sample(f"{name}_sum", labels, float(snap["sum"]))
    yield _sample(f"{name}_count", labels, snap["count"])


ServiceSamples = Callable[[str, Labels, ServiceMetrics], Iterator[str]]


def _one(get: Callable[[ServiceMetrics], int]) -> ServiceSamples:
    def samples(name: str, labels: Labels, service: ServiceMetrics) -> Iterator[str]:
        yield _sample(name, labels, get(service))
    return samples


def _by(label: str, get: Callable[[ServiceMetrics], dict[str, int]]) -> ServiceSamples:
    def samples(name: str, labels: Labels, service: ServiceMetrics) -> Iterator[str]:
        counts = get(service)
        for key in sorted(counts):
            yield _sample(name, (*labels, (label, key)), counts[key])
    return samples


def _hist(get: Callable[[ServiceMetrics], HistogramSnapshot]) -> ServiceSamples:
    def samples(name: str, labels: Labels, service: ServiceMetrics) -> Iterator[str]:
        return _histogram(name, labels, get(service))
    return samples


# (metric name, type, help, samples of one service), in output order.
_SERVICE_FAMILIES: tuple[tuple[str, str, str, ServiceSamples], ...] = (
    ("poolinetd_connections_accepted_total", "counter",
     "Connections (or datagram loans) accepted and handed on.", _one(lambda s: s["accepted"])),
    ("poolinetd_connections_refused_total", "counter",
     "Connections refused, by reason.", _by("reason", lambda s: s["refused"])),
    ("poolinetd_connections_active", "gauge",
     "Connections being served now.", _one(lambda s: s["active_connections"])),
    ("poolinetd_programs_running", "gauge",
     "External program instances running now.", _one(lambda s: s["running_programs"])),
    ("poolinetd_workers", "gauge",
     "Workers of the service's pool, by state.", _by("state", lambda s: s["workers"])),
    ("poolinetd_worker_restarts_total", "counter",
     "Workers started to replace one that exited.", _one(lambda s: s["restarts"])),
    ("poolinetd_worker_boot_failures_total", "counter",
     "Workers that could not boot (privilege drop, setup).", _one(lambda s: s["boot_failures"])),
    ("poolinetd_builtin_received_bytes_total", "counter",
     "Bytes read from clients by built-in handlers.", _one(lambda s: s["builtin_bytes_in"])),
    ("poolinetd_builtin_sent_bytes_total", "counter",
     "Bytes written to clients by built-in handlers.", _one(lambda s: s["builtin_bytes_out"])),
    ("poolinetd_program_exits_total", "counter",
     "External program exits, by exit code or signal name.",
     _by("status", lambda s: s["program_exits"])),
    ("poolinetd_handoff_seconds", "histogram",
     "Time from accept to a worker holding the connection.",
     _hist(lambda s: s["handoff_seconds"])),
    ("poolinetd_program_run_seconds", "histogram",
     "Run time of external program instances.", _hist(lambda s: s["program_run_seconds"])),
)


def render(doc: MetricsDocument) -> bytes:
    """The whole exposition for ``doc``: every family with HELP and TYPE, even when empty."""
    out: list[str] = []
    services: list[ServiceMetrics] = []
    seen: set[str] = set()
    for service in doc["services"]:
        if service["service"] not in seen:
            seen.add(service["service"])
            services.append(service)
    for name, kind, help_text, samples in _SERVICE_FAMILIES:
        out.append(f"# HELP {name} {escape_help(help_text)}\n# TYPE {name} {kind}\n")
        for service in services:
            out.extend(samples(name, (("service", service["service"]),), service))
    engine = doc["engine"]
    out.append("# HELP poolinetd_loop_turn_seconds Time the master spent per loop turn.\n"
               "# TYPE poolinetd_loop_turn_seconds histogram\n")
    out.extend(_histogram("poolinetd_loop_turn_seconds", (), engine["loop_turn_seconds"]))
    out.append("# HELP poolinetd_open_fds File descriptors open in the master.\n"
               "# TYPE poolinetd_open_fds gauge\n")
    out.append(_sample("poolinetd_open_fds", (), engine["open_fds"]))
    return "".join(out).encode("utf-8")


# ---------------------------------------------------------------- HTTP/1.0 GET /metrics

MAX_REQUEST = 8192  # request line + headers; Prometheus sends a few hundred bytes
METRICS_PATH = b"/metrics"
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 505: "HTTP Version Not Supported"}


class HttpRequest:
    """One HTTP request on one connection, fed as it arrives; answers once, then close.

    ``feed(data)`` returns None while the request (line and headers, up to
    the blank line) is incomplete, else the complete response to write before
    closing the connection. ``feed(b"")`` means the peer closed its side: an
    incomplete request then gets a 400. ``render`` is called only for a good
    ``GET``/``HEAD`` of ``/metrics`` (a query string is ignored); anything
    else gets 404/405/505/400, and more than ``limit`` bytes without the end
    of the headers gets 431. ``status`` is 0 until the answer is decided.
    After the answer every feed returns b"" (a request body is never read).
    The engine bounds the time a connection may take (not this class).
    """

    def __init__(self, render: Callable[[], bytes], limit: int = MAX_REQUEST) -> None:
        self._render = render
        self._limit = limit
        self._buffer = bytearray()
        self.status = 0

    def feed(self, data: bytes) -> bytes | None:
        if self.status:
            return b""
        if not data:
            return self._answer(400)
        self._buffer += data
        head = self._head()
        if head is None:
            if len(self._buffer) > self._limit:
                return self._answer(431)
            return None
        return self._decide(head)

    def _head(self) -> bytes | None:
        window = bytes(self._buffer[: self._limit + 4])
        ends = [i for i in (window.find(b"\r\n\r\n"), window.find(b"\n\n")) if i >= 0]
        if not ends or min(ends) > self._limit:
            return None
        return window[: min(ends)]

    def _decide(self, head: bytes) -> bytes:
        line = head.split(b"\n", 1)[0].rstrip(b"\r")
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[0] or not parts[1].startswith(b"/"):
            return self._answer(400)
        method, target, version = parts
        if not version.startswith(b"HTTP/"):
            return self._answer(400)
        if version not in (b"HTTP/1.0", b"HTTP/1.1"):
            return self._answer(505)
        if method not in (b"GET", b"HEAD"):
            return self._answer(405)
        if target.split(b"?", 1)[0] != METRICS_PATH:
            return self._answer(404)
        body = self._render()
        return self._answer(200, body, head_only=method == b"HEAD")

    def _answer(self, status: int, body: bytes | None = None, head_only: bool = False) -> bytes:
        self.status = status
        content_type = CONTENT_TYPE
        if body is None:
            body = f"{status} {_REASONS[status]}\n".encode()
            content_type = "text/plain; charset=utf-8"
        headers = [f"HTTP/1.0 {status} {_REASONS[status]}", f"Content-Type: {content_type}",
                   f"Content-Length: {len(body)}", "Connection: close"]
        if status == 405:
            headers.append("Allow: GET, HEAD")
        head = ("\r\n".join(headers) + "\r\n\r\n").encode()
        return head if head_only else head + body
