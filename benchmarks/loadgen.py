"""Closed-loop TCP load generator for loopback benchmarks (touches the OS: sockets, fork).

Contract
--------
``run_load(host, port, concurrency, duration, payload, expect=...)`` keeps exactly
``concurrency`` client connections in flight for ``warmup + duration`` seconds.
Each client connection:

1. is created non-blocking and connected (latency clock starts just before
   ``socket()``);
2. sends ``payload`` (may be empty, e.g. for daytime);
3. reads the reply: with ``expect`` given and ``until_close`` false, until
   ``len(expect)`` bytes arrived (then the client closes first, as an echo
   client does); otherwise until the server closes;
4. is closed (latency clock stops after ``close()``), checked and replaced by
   a new connection at once.

Only connections that *end* inside the measurement window (after the warmup)
count as completed and contribute latencies; errors are counted over the whole
run (warmup, window and drain), because an error anywhere is worth seeing.
After the window no new connection starts; the ones in flight get up to
``timeout`` seconds to finish (the drain) and are then counted as timeouts.

Bounds: every run ends after ``warmup + duration + timeout`` seconds plus
process start-up, and starts at most ``max_connections`` connections in total.
Only loopback addresses are accepted (``ValueError`` otherwise), so a typo
cannot turn a benchmark into traffic on a real network.

The client load is spread over ``processes`` forked processes, each with its
own epoll loop; each child's CPU time comes from ``os.wait4`` so the report
shows whether the client itself was saturated (``LoadResult.client_saturated``,
over 80 % of a core). The benchmark scripts use the C generator
(``tools/loadgen.c``, same contract, through ``benchmarks.client``) by default
and this one with ``--python-client`` or when there is no C compiler.
With ``processes=1`` and ``fork=False`` the loop runs in the calling thread
(CPU from ``RUSAGE_THREAD``), which is what in-process tests use.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import marshal
import math
import os
import resource
import select
import socket
import sys
import time
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any

__all__ = [
    "CLIENT_BUSY_PCT",
    "LoadResult",
    "check_loopback",
    "default_processes",
    "format_result",
    "main",
    "run_load",
]

# Error kinds that have their own name in the report; any other errno is
# reported by its symbolic name (e.g. "EADDRNOTAVAIL" when ports run out).
ERR_REFUSED = "ECONNREFUSED"
ERR_RESET = "ECONNRESET"
ERR_TIMEOUT = "timeout"
ERR_SHORT = "short_reply"
ERR_WRONG = "wrong_reply"

_RECV_SIZE = 65536
# Linux IP_BIND_ADDRESS_NO_PORT (not exported by the socket module).
_IP_BIND_ADDRESS_NO_PORT = 24
# How often the loop looks for connections older than the timeout. A scan is
# O(concurrency), so doing it per event would cost more than the events.
_SCAN_INTERVAL_NS = 100_000_000
# Default hard cap on connections started by one run; far above what loopback
# reaches in a benchmark-sized run, but it bounds a spinning error loop.
DEFAULT_MAX_CONNECTIONS = 5_000_000
# A client process (or thread) above this share of one core may be what limits
# the cell: ``client_saturated`` is set and the tables mark the cell. The C
# generator (tools/loadgen.c) uses the same threshold.
CLIENT_BUSY_PCT = 80.0


@dataclass(frozen=True)
class LoadResult:
    """Outcome of one run. Latencies are milliseconds, CPU times seconds.

    ``conn_per_s`` is ``completed / duration`` (the measurement window only).
    ``client_cpu_pct`` is client CPU time over the whole run's wall time, in
    percent of one core, summed over client processes; ``client_saturated``
    is true when any client process (or thread of the C generator) used more
    than ``CLIENT_BUSY_PCT`` (80 %) of a core, i.e. the client may have been
    the bottleneck and the numbers are a lower bound. ``client`` says which
    generator measured: ``"python"`` (this module) or ``"c"``
    (``tools/loadgen.c`` through ``benchmarks.client``).
    """

    host: str
    port: int
    concurrency: int
    processes: int
    duration_s: float
    warmup_s: float
    payload_bytes: int
    completed: int
    conn_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    errors: dict[str, int]
    error_total: int
    started: int
    wall_s: float
    client_user_s: float
    client_sys_s: float
    client_cpu_pct: float
    client_max_proc_cpu_pct: float
    client_saturated: bool
    per_process_completed: list[int] = field(default_factory=list)
    source_addresses: int = 0
    client: str = "python"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON output."""
        return asdict(self)


def default_processes(concurrency: int) -> int:
    """How many client processes to use when the caller does not say.

    The server under test shares the machine, so the client must not take
    every core: half of them (at least one), never more than ``concurrency``.
    On the 2-core reference machine this is one process, which measured at
    about twice the rate of the fastest server under test (see README).
    """
    ncpu = os.cpu_count() or 1
    return max(1, min(concurrency, ncpu // 2, 8))


def check_loopback(host: str) -> int:
    """Return the address family of ``host`` or raise ValueError if not loopback."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError as exc:
        raise ValueError(f"host must be a literal loopback address, got {host!r}") from exc
    if not ip.is_loopback:
        raise ValueError(f"refusing non-loopback address {host!r}: benchmarks stay on loopback")
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


class _Conn:
    """One client connection in flight."""

    __slots__ = ("buf", "connecting", "sent", "sock", "t0", "tag")

    def __init__(self, sock: socket.socket, t0: int) -> None:
        self.sock = sock
        self.t0 = t0
        self.tag = 0
        self.sent = 0
        self.connecting = True
        self.buf = bytearray()


@dataclass
class _Partial:
    """What one client loop hands back to the coordinator."""

    latencies_ns: array[int]
    errors: dict[str, int]
    started: int
    completed: int


def _errname(code: int) -> str:
    return errno.errorcode.get(code, f"errno{code}")


def _client_loop(
    family: int,
    addr: tuple[str, int],
    concurrency: int,
    payload: bytes,
    expect: bytes | None,
    until_close: bool,
    min_reply: int,
    t_start_ns: int,
    t_measure_ns: int,
    t_end_ns: int,
    timeout_ns: int,
    max_connections: int,
    sources: list[tuple[str, int]],
    conn_log: array[int] | None = None,
) -> _Partial:
    """Run ``concurrency`` closed-loop clients between the given instants.

    Times are ``time.perf_counter_ns()`` values, which on Linux are
    CLOCK_MONOTONIC and therefore comparable across forked processes.
    ``conn_log``, if given, gets three ints per completed connection: start
    and end (ns) and ``source_index << 16 | local_port`` (source_index is
    1-based into ``sources``, 0 without them), so a server-side trace can be
    joined by peer address.
    """
    ep = select.epoll()
    conns: dict[int, _Conn] = {}
    lat = array("q")
    errors: Counter[str] = Counter()
    started = 0
    completed = 0
    need = concurrency  # free client slots waiting for a new connection
    elen = len(expect) if expect is not None else 0
    # An expected reply of zero bytes with close-first semantics means "send
    # and close" (e.g. discard): no read at all.
    close_after_send = expect is not None and elen == 0 and not until_close
    plen = len(payload)
    clock = time.perf_counter_ns
    EPOLLIN = select.EPOLLIN
    EPOLLOUT = select.EPOLLOUT

    def finish(c: _Conn, fd: int, err: str | None) -> None:
        nonlocal completed, need
        c.sock.close()  # also removes fd from the epoll set
        del conns[fd]
        now = clock()
        need += 1
        if err is not None:
            errors[err] += 1
        elif t_measure_ns <= now < t_end_ns:
            completed += 1
            lat.append(now - c.t0)
            if conn_log is not None:
                conn_log.extend((c.t0, now, c.tag))

    def check_eof(c: _Conn) -> str | None:
        buf = c.buf
        if expect is None:
            return ERR_SHORT if len(buf) < min_reply else None
        if len(buf) < elen:
            return ERR_SHORT if expect.startswith(buf) else ERR_WRONG
        return None if buf == expect else ERR_WRONG

    def after_send(c: _Conn, fd: int, registered: bool) -> None:
        if close_after_send:
            finish(c, fd, None)
        elif registered:
            ep.modify(fd, EPOLLIN)
        else:
            ep.register(fd, EPOLLIN)

    def do_send(c: _Conn, fd: int, registered: bool) -> None:
        if c.sent < plen:
            try:
                c.sent += c.sock.send(payload[c.sent :] if c.sent else payload)
            except BlockingIOError:
                pass
            except OSError as exc:
                finish(c, fd, _errname(exc.errno or 0))
                return
            if c.sent < plen:
                if registered:
                    ep.modify(fd, EPOLLOUT)
                else:
                    ep.register(fd, EPOLLOUT)
                return
        after_send(c, fd, registered)

    def start() -> None:
        nonlocal started, need
        need -= 1
        started += 1
        t0 = clock()
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:  # EMFILE and friends: count, do not crash the run
            errors[_errname(exc.errno or 0)] += 1
            need += 1
            return
        s.setblocking(False)
        if sources:
            # Spread the 4-tuples over many loopback source addresses: with
            # one source the kernel's ephemeral-port search walks thousands
            # of TIME_WAIT entries per connect() (measured: half the client's
            # CPU). NO_PORT defers the port choice to connect(), which then
            # picks a port free for the full 4-tuple.
            s.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
            s.bind(sources[started % len(sources)])
        fd = s.fileno()
        c = _Conn(s, t0)
        conns[fd] = c
        rc = s.connect_ex(addr)
        if conn_log is not None:
            with contextlib.suppress(OSError):
                src = (started % len(sources)) + 1 if sources else 0
                c.tag = src << 16 | s.getsockname()[1]
        if rc == 0:
            c.connecting = False
            do_send(c, fd, False)
        elif rc == errno.EINPROGRESS:
            ep.register(fd, EPOLLOUT)
        else:
            finish(c, fd, _errname(rc))

    next_scan = t_start_ns + _SCAN_INTERVAL_NS
    # Wait for the common start instant so all processes begin together.
    delay = (t_start_ns - clock()) / 1e9
    if delay > 0:
        time.sleep(delay)
    drain_deadline = t_end_ns + timeout_ns
    while True:
        now = clock()
        if now < t_end_ns:
            # Start at most the slots free now: a connection that fails at
            # once frees its slot again, and would otherwise spin here.
            for _ in range(min(need, max_connections - started)):
                start()
        elif not conns or now >= drain_deadline:
            break
        if now >= next_scan:
            next_scan = now + _SCAN_INTERVAL_NS
            limit = now - timeout_ns
            for fd, c in [(fd, c) for fd, c in conns.items() if c.t0 < limit]:
                finish(c, fd, ERR_TIMEOUT)
            if started >= max_connections and not conns:
                break
        # Short poll timeout so the time checks above stay accurate; when
        # slots wait for a restart (fast failures) do not block at all.
        events = ep.poll(0 if need and now < t_end_ns else 0.02)
        for fd, _ev in events:
            got = conns.get(fd)
            if got is None:  # finished earlier in this batch
                continue
            c = got
            if c.connecting:
                c.connecting = False
                err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    finish(c, fd, _errname(err))
                else:
                    do_send(c, fd, True)
                continue
            if c.sent < plen:
                do_send(c, fd, True)
                continue
            try:
                data = c.sock.recv(_RECV_SIZE)
            except BlockingIOError:
                continue
            except OSError as exc:
                finish(c, fd, _errname(exc.errno or 0))
                continue
            if not data:
                finish(c, fd, check_eof(c))
                continue
            c.buf += data
            if expect is not None and not until_close and len(c.buf) >= elen:
                finish(c, fd, None if c.buf == expect else ERR_WRONG)
    # Anything left after the drain deadline never finished.
    for fd, c in list(conns.items()):
        finish(c, fd, ERR_TIMEOUT)
    ep.close()
    return _Partial(lat, dict(errors), started, completed)


def _percentile(sorted_ns: list[int], q: float) -> float:
    """Nearest-rank percentile in milliseconds (0.0 for no samples)."""
    if not sorted_ns:
        return 0.0
    k = max(0, min(len(sorted_ns) - 1, math.ceil(q / 100.0 * len(sorted_ns)) - 1))
    return sorted_ns[k] / 1e6


def run_load(
    host: str,
    port: int,
    concurrency: int,
    duration: float,
    payload: bytes = b"",
    *,
    expect: bytes | None = None,
    until_close: bool = False,
    min_reply: int = 1,
    processes: int | None = None,
    warmup: float = 0.5,
    timeout: float = 5.0,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    fork: bool = True,
    source_addresses: int = 64,
    conn_log: array[int] | None = None,
) -> LoadResult:
    """Run a closed-loop load against ``host:port`` and return the measurements.

    ``expect``: the exact reply; with ``until_close`` false the client closes
    as soon as ``len(expect)`` bytes arrived (echo), otherwise it reads until
    the server closes and compares the whole reply. With ``expect=None`` any
    reply of at least ``min_reply`` bytes that ends with the server closing is
    accepted (daytime). ``fork=False`` (only with one process) runs the loop
    in the calling thread. Raises ValueError for bad arguments or a
    non-loopback host; client-side failures are counted, never raised.
    ``source_addresses``: for IPv4, bind clients round-robin to this many
    source addresses 127.0.1.1, 127.0.1.2, ... (0 = let the kernel choose
    127.0.0.1); IPv6 has one loopback address, so it is ignored there.
    ``conn_log`` (only with ``fork=False``): per-connection records, see
    ``_client_loop``.
    """
    family = check_loopback(host)
    if concurrency < 1 or duration <= 0 or warmup < 0 or timeout <= 0:
        raise ValueError("need concurrency >= 1, duration > 0, warmup >= 0, timeout > 0")
    nproc = processes if processes is not None else default_processes(concurrency)
    nproc = max(1, min(nproc, concurrency))
    if not fork and nproc != 1:
        raise ValueError("fork=False needs processes=1")
    if conn_log is not None and fork:
        raise ValueError("conn_log needs fork=False")
    shares = [concurrency // nproc + (1 if i < concurrency % nproc else 0) for i in range(nproc)]
    per_proc_max = max(1, max_connections // nproc)
    # Leave the children time to start before the common start instant.
    t_start = time.perf_counter_ns() + (0 if not fork else 50_000_000)
    t_measure = t_start + int(warmup * 1e9)
    t_end = t_measure + int(duration * 1e9)
    timeout_ns = int(timeout * 1e9)
    args = (payload, expect, until_close, min_reply, t_start, t_measure, t_end, timeout_ns)
    addr = (host, port)
    sources: list[tuple[str, int]] = []
    if family == socket.AF_INET and source_addresses > 0:
        n_src = min(source_addresses, 250)
        sources = [(f"127.0.1.{i + 1}", 0) for i in range(n_src)]

    partials: list[_Partial] = []
    user = system = 0.0
    per_cpu: list[float] = []
    wall0 = time.perf_counter_ns()
    if not fork:
        r0 = resource.getrusage(resource.RUSAGE_THREAD)
        partials.append(
            _client_loop(family, addr, shares[0], *args, per_proc_max, sources, conn_log)
        )
        r1 = resource.getrusage(resource.RUSAGE_THREAD)
        user, system = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
        per_cpu.append(user + system)
    else:
        children: list[tuple[int, int]] = []
        try:
            for share in shares:
                rfd, wfd = os.pipe()
                pid = os.fork()
                if pid == 0:  # child: run, report over the pipe, never return
                    code = 1
                    try:
                        os.close(rfd)
                        p = _client_loop(family, addr, share, *args, per_proc_max, sources)
                        blob = marshal.dumps(
                            (p.latencies_ns.tobytes(), p.errors, p.started, p.completed)
                        )
                        with os.fdopen(wfd, "wb") as w:
                            w.write(blob)
                        code = 0
                    finally:
                        os._exit(code)
                os.close(wfd)
                children.append((pid, rfd))
        finally:
            for pid, rfd in children:
                with os.fdopen(rfd, "rb") as r:
                    blob = r.read()
                _, status, ru = os.wait4(pid, 0)
                user += ru.ru_utime
                system += ru.ru_stime
                per_cpu.append(ru.ru_utime + ru.ru_stime)
                if status != 0 or not blob:
                    raise RuntimeError(f"load generator child {pid} failed (status {status})")
                lat_b, errs, started, completed = marshal.loads(blob)
                lat = array("q")
                lat.frombytes(lat_b)
                partials.append(_Partial(lat, errs, started, completed))
    wall = max((time.perf_counter_ns() - wall0) / 1e9, 1e-9)
    # The client processes only work from t_start on; use that span for CPU %.
    busy_wall = max((time.perf_counter_ns() - t_start) / 1e9, 1e-9)
    result = _aggregate(
        host,
        port,
        concurrency,
        nproc,
        duration,
        warmup,
        len(payload),
        partials,
        wall,
        busy_wall,
        user,
        system,
        per_cpu,
    )
    return replace(result, source_addresses=len(sources))


def _aggregate(
    host: str,
    port: int,
    concurrency: int,
    nproc: int,
    duration: float,
    warmup: float,
    payload_bytes: int,
    partials: list[_Partial],
    wall: float,
    busy_wall: float,
    user: float,
    system: float,
    per_cpu: list[float],
) -> LoadResult:
    lat_all: list[int] = []
    errors: Counter[str] = Counter()
    started = completed = 0
    for p in partials:
        lat_all.extend(p.latencies_ns)
        errors.update(p.errors)
        started += p.started
        completed += p.completed
    lat_all.sort()
    mean = (sum(lat_all) / len(lat_all) / 1e6) if lat_all else 0.0
    max_proc_pct = max(per_cpu, default=0.0) / busy_wall * 100.0
    return LoadResult(
        host=host,
        port=port,
        concurrency=concurrency,
        processes=nproc,
        duration_s=duration,
        warmup_s=warmup,
        payload_bytes=payload_bytes,
        completed=completed,
        conn_per_s=completed / duration,
        p50_ms=_percentile(lat_all, 50),
        p90_ms=_percentile(lat_all, 90),
        p99_ms=_percentile(lat_all, 99),
        max_ms=lat_all[-1] / 1e6 if lat_all else 0.0,
        mean_ms=mean,
        errors=dict(sorted(errors.items())),
        error_total=sum(errors.values()),
        started=started,
        wall_s=wall,
        client_user_s=user,
        client_sys_s=system,
        client_cpu_pct=(user + system) / busy_wall * 100.0,
        client_max_proc_cpu_pct=max_proc_pct,
        client_saturated=max_proc_pct > CLIENT_BUSY_PCT,
        per_process_completed=[p.completed for p in partials],
    )


def format_result(r: LoadResult) -> str:
    """Human-readable multi-line summary of one result."""
    errs = ", ".join(f"{k}={v}" for k, v in r.errors.items()) or "none"
    sat = "  (CLIENT BUSY > 80 %: numbers may be a lower bound)" if r.client_saturated else ""
    return (
        f"{r.host}:{r.port} c={r.concurrency} procs={r.processes} client={r.client} "
        f"window={r.duration_s:g}s warmup={r.warmup_s:g}s payload={r.payload_bytes}B\n"
        f"  completed {r.completed}  {r.conn_per_s:,.0f} conn/s\n"
        f"  latency ms p50 {r.p50_ms:.3f}  p90 {r.p90_ms:.3f}  p99 {r.p99_ms:.3f}  "
        f"max {r.max_ms:.3f}  mean {r.mean_ms:.3f}\n"
        f"  errors {r.error_total}: {errs}\n"
        f"  client cpu user {r.client_user_s:.2f}s sys {r.client_sys_s:.2f}s = "
        f"{r.client_cpu_pct:.0f}% of one core (busiest process "
        f"{r.client_max_proc_cpu_pct:.0f}%){sat}"
    )


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.loadgen",
        description="Closed-loop TCP connection load generator (loopback only).",
    )
    p.add_argument("--host", default="127.0.0.1", help="loopback address (default 127.0.0.1)")
    p.add_argument("--port", "-p", type=int, required=True)
    p.add_argument("-c", "--concurrency", type=int, default=64)
    p.add_argument("-d", "--duration", type=float, default=5.0, help="measured seconds")
    p.add_argument("-w", "--warmup", type=float, default=0.5, help="unmeasured seconds first")
    p.add_argument("-P", "--processes", type=int, default=None, help="client processes")
    p.add_argument("--timeout", type=float, default=5.0, help="per-connection timeout, s")
    p.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS)
    p.add_argument(
        "--source-addresses",
        type=int,
        default=64,
        help="IPv4: spread clients over this many 127.0.1.x sources (0 = kernel's choice)",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--payload", default=None, help="payload text to send")
    g.add_argument("--payload-size", type=int, default=None, help="send N pattern bytes")
    p.add_argument(
        "--echo", action="store_true", help="expect the payload back (close after it arrived)"
    )
    p.add_argument("--expect", default=None, help="expect exactly this reply text")
    p.add_argument(
        "--until-close", action="store_true", help="read until the server closes, then compare"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def pattern_payload(size: int) -> bytes:
    """Deterministic printable payload of ``size`` bytes ending in a newline."""
    if size <= 0:
        return b""
    line = b"poolinetd-bench-0123456789abcdefghijklmnopqrstuvwxyz"
    body = (line * (size // len(line) + 1))[: size - 1]
    return body + b"\n"


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (1 if any connection failed)."""
    a = _build_parser().parse_args(argv)
    if a.payload is not None:
        payload = a.payload.encode()
    elif a.payload_size is not None:
        payload = pattern_payload(a.payload_size)
    else:
        payload = b""
    expect: bytes | None = payload if a.echo else None
    if a.expect is not None:
        expect = a.expect.encode()
    r = run_load(
        a.host,
        a.port,
        a.concurrency,
        a.duration,
        payload,
        expect=expect,
        until_close=a.until_close,
        processes=a.processes,
        warmup=a.warmup,
        timeout=a.timeout,
        max_connections=a.max_connections,
        source_addresses=a.source_addresses,
    )
    if a.json:
        import orjson

        sys.stdout.write(orjson.dumps(r.to_dict(), option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(format_result(r))
    return 1 if r.error_total else 0


if __name__ == "__main__":
    sys.exit(main())
