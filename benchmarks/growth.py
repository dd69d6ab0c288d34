"""Pool growth under a burst (issue 5): how many connections queue while a pool grows.

``python -m benchmarks.growth [--clients 64,128] [--services echo,cat] [--reps 3]``
starts poolinetd (pool mode, control socket in the run's temporary
directory) once per repetition, service and burst size, with one service:

* ``echo``: built-in echo with ``worker_connections=1, pool_min=1,
  pool_max=64``: each held connection occupies a whole worker, so serving 64
  clients at once needs the pool to grow from 1 to 64 workers;
* ``cat``: launched ``/bin/cat`` with ``pool_min=1, pool_max=64`` and the
  engine's default ``worker_connections`` (a worker launches many programs).

Then ``N`` clients connect at once (one epoll loop, all ``connect()`` calls
issued back to back), each sends one byte as soon as it is connected, waits
for the echo and *keeps the connection open*. Measured:

* ``served_s``: from the burst's first ``connect()`` to the echo of the last
  client that can be served at once (``min(N, capacity)``; capacity is
  ``pool_max * worker_connections``, 64 for ``echo``);
* ``pool_full_s``: until the pool has 64 workers: first sample with 64 live
  children of the master in ``/proc`` (``children_s``) and with 64 READY
  workers in ``status`` (``ready_s``); empty when it never got there;
* ``max_waiting``: the largest number of clients connected (handshake done,
  so in the kernel's accept queue or handed to a worker) but not yet echoed,
  computed exactly from the clients' timestamps; ``max_accept_queue``: the
  largest accept queue of the listener sampled from ``/proc/net/tcp`` (every
  ~5 ms by a separate sampler process, which also counts children and asks
  ``status`` every ~25 ms);
* time to first byte per client (``connect()`` to echo): p50, p99, max.

When ``N`` exceeds the capacity (128 clients against 64 one-connection
workers), the first wave is held ``--hold`` seconds after it was served and
then closed, so the rest get served; ``all_served_s`` is when the last of
all ``N`` got its echo. TTFB percentiles cover the first wave only (the
second wave's wait is the hold, which is chosen, not measured).

Bounded: every phase has a deadline (``--timeout``, default 30 s), at most
``--clients`` connections per burst, loopback only. Results:
``benchmarks/results/growth.json`` (orjson, every run with its samples) and
``growth.md`` (medians).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import marshal
import math
import os
import select
import shlex
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from benchmarks.machine import machine_facts
from benchmarks.procstat import children_of
from benchmarks.servers import Server, ServerError, launch_poolinetd, python_cmd

RESULTS_DIR = Path(__file__).resolve().parent / "results"
POOL_MAX = 64
SAMPLE_INTERVAL_S = 0.005
STATUS_INTERVAL_S = 0.025


@dataclass(frozen=True)
class GrowthService:
    """One service line and how many held connections it can serve at once."""

    name: str
    title: str
    conf: str
    capacity: int | None  # None: more than any burst here (program launches)


SERVICES: dict[str, GrowthService] = {
    s.name: s
    for s in (
        GrowthService(
            "echo",
            "built-in echo, worker_connections=1, pool_min=1, pool_max=64",
            "127.0.0.1:0 on socktype=stream, wait=no, user=nobody, args=echo, pool_min=1, "
            f"pool_max={POOL_MAX}, worker_connections=1, idle_timeout=60;",
            POOL_MAX,
        ),
        GrowthService(
            "cat",
            "launched /bin/cat, default worker_connections, pool_min=1, pool_max=64",
            "127.0.0.1:0 on socktype=stream, wait=no, user=nobody, exec=/bin/cat, args=cat, "
            f"pool_min=1, pool_max={POOL_MAX}, idle_timeout=60;",
            None,
        ),
    )
}


# -- sampler (a forked process, so sampling does not delay the clients) ------------------


def accept_queue(port: int) -> int | None:
    """The accept queue length of the 127.0.0.1:``port`` listener (``/proc/net/tcp``)."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split(maxsplit=5)
            # For a LISTEN socket (st 0A) rx_queue is sk_ack_backlog: the accept queue.
            if parts[1] == want and parts[3] == "0A":
                return int(parts[4].split(":")[1], 16)
    return None


def control_status(path: str, timeout: float = 1.0) -> dict[str, Any] | None:
    """``poolinetd status --json`` over the control socket, or None if it did not answer."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(b"status\n")
            chunks = []
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
        doc = orjson.loads(b"".join(chunks))
    except (OSError, orjson.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def _pool_counts(doc: dict[str, Any] | None) -> tuple[int, int, int]:
    """(ready = idle + busy, booting, busy) summed over the services of a status document."""
    if doc is None:
        return (-1, -1, -1)
    ready = booting = busy = 0
    for svc in doc.get("services", []):
        w = svc.get("workers", {})
        ready += int(w.get("idle", 0)) + int(w.get("busy", 0))
        booting += int(w.get("booting", 0))
        busy += int(w.get("busy", 0))
    return (ready, booting, busy)


Sample = tuple[int, int, int, int, int, int]  # t_ns, accept_q, children, ready, booting, busy


def _sampler(port: int, master: int, ctl: str, stop_fd: int, deadline_ns: int) -> list[Sample]:
    samples: list[Sample] = []
    last = (-1, -1, -1)
    next_status = 0
    clock = time.perf_counter_ns
    while clock() < deadline_ns:
        now = clock()
        if now >= next_status:
            next_status = now + int(STATUS_INTERVAL_S * 1e9)
            last = _pool_counts(control_status(ctl))
        q = accept_queue(port)
        kids = len(children_of(master))
        samples.append((now, -1 if q is None else q, kids, *last))
        r, _, _ = select.select([stop_fd], [], [], SAMPLE_INTERVAL_S)
        if r:
            break
    return samples


class Sampler:
    """A forked process that samples until ``stop()`` (or its own deadline)."""

    def __init__(self, port: int, master: int, ctl: str, limit_s: float) -> None:
        self._stop_r, self._stop_w = os.pipe()
        self._out_r, out_w = os.pipe()
        deadline = time.perf_counter_ns() + int(limit_s * 1e9)
        pid = os.fork()
        if pid == 0:  # child: sample, report over the pipe, never return
            code = 1
            try:
                os.close(self._stop_w)
                os.close(self._out_r)
                samples = _sampler(port, master, ctl, self._stop_r, deadline)
                with os.fdopen(out_w, "wb") as w:
                    w.write(marshal.dumps(samples))
                code = 0
            finally:
                os._exit(code)
        os.close(self._stop_r)
        os.close(out_w)
        self.pid = pid

    def stop(self) -> list[Sample]:
        os.close(self._stop_w)
        with os.fdopen(self._out_r, "rb") as r:
            blob = r.read()
        os.waitpid(self.pid, 0)
        got = marshal.loads(blob) if blob else []
        return [(s[0], s[1], s[2], s[3], s[4], s[5]) for s in got]


# -- the burst ----------------------------------------------------------------------------


@dataclass
class _Client:
    sock: socket.socket
    t0: int
    t_conn: int = 0
    t_echo: int = 0
    t_close: int = 0
    wave: int = 1
    error: str = ""


def _pct(sorted_ms: list[float], q: float) -> float:
    if not sorted_ms:
        return 0.0
    k = max(0, min(len(sorted_ms) - 1, math.ceil(q / 100.0 * len(sorted_ms)) - 1))
    return sorted_ms[k]


def burst(
    port: int, n: int, capacity: int, hold: float, timeout: float
) -> tuple[list[_Client], int]:
    """Open ``n`` held connections at once; returns the clients and the burst's start (ns).

    Ends when all ``n`` were echoed, or at the deadlines. When ``n`` >
    ``capacity``, the clients echoed first are closed ``hold`` s after the
    ``capacity``-th echo (that frees the workers for the rest).
    """
    ep = select.epoll()
    clock = time.perf_counter_ns
    clients: dict[int, _Client] = {}
    t_start = clock()
    deadline = t_start + int(timeout * 1e9)
    for _ in range(n):
        t0 = clock()
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        c = _Client(s, t0)
        rc = s.connect_ex(("127.0.0.1", port))
        if rc not in (0, errno.EINPROGRESS):
            c.error = errno.errorcode.get(rc, str(rc))
            s.close()
            clients[-len(clients) - 1] = c
            continue
        clients[s.fileno()] = c
        ep.register(s.fileno(), select.EPOLLOUT)
    echoed = 0
    done = sum(1 for c in clients.values() if c.error)
    release_at: int | None = None
    first_wave = min(n, capacity)
    while done < n and clock() < deadline:
        if release_at is not None and clock() >= release_at:
            # Close the first wave: its workers take the clients still queued.
            release_at = None
            deadline = clock() + int(timeout * 1e9)
            for fd, c in clients.items():
                if fd >= 0 and c.t_echo and not c.t_close:
                    c.sock.close()  # echoed clients are no longer in the epoll set
                    c.t_close = clock()
            for c in clients.values():
                if not c.t_echo and not c.error:
                    c.wave = 2
        for fd, _ev in ep.poll(0.01):
            c = clients[fd]
            now = clock()
            if not c.t_conn:
                err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    c.error = errno.errorcode.get(err, str(err))
                    ep.unregister(fd)
                    done += 1
                    continue
                c.t_conn = now
                try:
                    c.sock.send(b"x")
                except OSError as exc:
                    c.error = errno.errorcode.get(exc.errno or 0, "send")
                    ep.unregister(fd)
                    done += 1
                    continue
                ep.modify(fd, select.EPOLLIN)
                continue
            try:
                data = c.sock.recv(16)
            except BlockingIOError:
                continue
            except OSError as exc:
                data, c.error = b"", errno.errorcode.get(exc.errno or 0, "recv")
            ep.unregister(fd)  # echoed (or failed): held open, no more events wanted
            done += 1
            if data == b"x":
                c.t_echo = now
                echoed += 1
                if echoed == first_wave and n > first_wave:
                    release_at = now + int(hold * 1e9)
            elif not c.error:
                c.error = "closed" if not data else "wrong_reply"
    for c in clients.values():
        if not c.t_echo and not c.error:
            c.error = "timeout"
    ep.close()
    return list(clients.values()), t_start


def _max_waiting(clients: list[_Client]) -> int:
    """Most clients at once connected but not yet echoed (exact, from timestamps)."""
    events: list[tuple[int, int]] = []
    for c in clients:
        if c.t_conn:
            events.append((c.t_conn, 1))
            end = c.t_echo or c.t_close
            if end:
                events.append((end, -1))
    events.sort(key=lambda e: (e[0], e[1]))
    cur = best = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


def analyse(
    clients: list[_Client], t_start: int, samples: list[Sample], n: int, capacity: int
) -> dict[str, Any]:
    """The numbers of one burst (times in seconds from the first connect, TTFB in ms)."""

    def rel(t: int) -> float:
        return round((t - t_start) / 1e9, 4)

    echoes = sorted(c.t_echo for c in clients if c.t_echo)
    first_wave = min(n, capacity)
    wave1 = sorted((c.t_echo - c.t0) / 1e6 for c in clients if c.t_echo and c.wave == 1)
    errors: dict[str, int] = {}
    for c in clients:
        if c.error:
            errors[c.error] = errors.get(c.error, 0) + 1
    children_s = next((rel(s[0]) for s in samples if s[2] >= POOL_MAX), None)
    ready_s = next((rel(s[0]) for s in samples if s[3] >= POOL_MAX), None)
    return {
        "clients": n,
        "capacity": capacity,
        "echoed": len(echoes),
        "served_s": rel(echoes[first_wave - 1]) if len(echoes) >= first_wave else None,
        "all_served_s": rel(echoes[-1]) if len(echoes) == n else None,
        "children_s": children_s,
        "ready_s": ready_s,
        "max_waiting": _max_waiting(clients),
        "max_accept_queue": max((s[1] for s in samples), default=-1),
        "max_children": max((s[2] for s in samples), default=-1),
        "max_ready": max((s[3] for s in samples), default=-1),
        "ttfb_ms": {
            "n": len(wave1),
            "p50": round(_pct(wave1, 50), 3),
            "p99": round(_pct(wave1, 99), 3),
            "max": round(wave1[-1], 3) if wave1 else 0.0,
        },
        "connect_ms_max": round(
            max(((c.t_conn - c.t0) / 1e6 for c in clients if c.t_conn), default=0.0), 3
        ),
        "errors": errors,
        "samples": len(samples),
        # Compact timeline: [t_s, accept_queue, children, ready, booting, busy].
        "timeline": [[rel(s[0]), *s[1:]] for s in samples],
    }


def run_one(
    svc: GrowthService, n: int, tmp: Path, cmd: list[str], hold: float, timeout: float, tag: str
) -> dict[str, Any]:
    """Start poolinetd with ``svc``, wait until idle at pool_min, burst ``n`` clients, stop."""
    ctl = str(tmp / f"ctl{tag}.sock")
    server: Server = launch_poolinetd(
        "pool", f"# benchmarks/growth.py\n{svc.conf}\n", [svc.name], tmp, cmd,
        ["--control", ctl], tag=tag,
    )  # fmt: skip
    try:
        _wait_idle(server.pid, ctl, 5.0)
        port = server.ports[svc.name]
        capacity = svc.capacity if svc.capacity is not None else n
        sampler = Sampler(port, server.pid, ctl, limit_s=3 * timeout + hold + 5)
        try:
            time.sleep(0.05)  # the sampler's first samples are the idle baseline
            clients, t_start = burst(port, n, capacity, hold, timeout)
            time.sleep(0.2)  # a little tail: the pool may finish booting after the last echo
        finally:
            samples = sampler.stop()
        result = analyse(clients, t_start, samples, n, capacity)
        for c in clients:
            with contextlib.suppress(OSError):
                c.sock.close()
        result["status_after"] = control_status(ctl)
    finally:
        result_status = server.stop()
    result["service"] = svc.name
    result["exit_status"] = result_status
    return result


def _wait_idle(pid: int, ctl: str, limit: float) -> None:
    """Until the pool has settled at pool_min (status answers, children stable), bounded."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        ready, booting, _ = _pool_counts(control_status(ctl))
        if ready >= 1 and booting == 0 and len(children_of(pid)) == ready:
            return
        time.sleep(0.05)


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians per (service, clients); a time that never happened counts as missing."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["service"], r["clients"]), []).append(r)
    rows = []
    for (svc, n), g in groups.items():

        def med(key: str, g: list[dict[str, Any]] = g) -> float | None:
            return _median([float(r[key]) for r in g if r[key] is not None])

        def tt(key: str, g: list[dict[str, Any]] = g) -> float | None:
            return _median([float(r["ttfb_ms"][key]) for r in g])

        errors: dict[str, int] = {}
        for r in g:
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
        rows.append({
            "service": svc, "clients": n, "reps": len(g), "capacity": g[0]["capacity"],
            "served_s": med("served_s"), "all_served_s": med("all_served_s"),
            "children_s": med("children_s"), "ready_s": med("ready_s"),
            "pool_full_reps": sum(1 for r in g if r["ready_s"] is not None),
            "max_waiting": med("max_waiting"), "max_accept_queue": med("max_accept_queue"),
            "max_children": med("max_children"),
            "ttfb_p50_ms": tt("p50"), "ttfb_p99_ms": tt("p99"), "ttfb_max_ms": tt("max"),
            "errors": errors,
        })  # fmt: skip
    return rows


def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def markdown(doc: dict[str, Any]) -> str:
    """The growth table (medians) as Markdown."""
    m = doc["machine"]
    st = doc["settings"]
    out = [
        f"Pool growth under a burst, {m['date']} on {m['cpu_model']}, {m['nproc']} cores, "
        f"Linux {m['kernel']}; {st['reps']} rep(s), medians. N clients connect at once, each "
        "sends 1 byte, waits for the echo and holds the connection. Times in s from the "
        "first connect(); TTFB in ms (connect() to echo, first wave).",
        "",
    ]
    head = ["service", "N", "served (min(N,cap))", "all N served", "64 children",
            "64 ready", "max waiting", "max accept queue", "max children", "TTFB p50",
            "TTFB p99", "TTFB max", "errors"]  # fmt: skip
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "|".join("---" for _ in head) + "|")
    for r in doc["summary"]:
        full = f" ({r['pool_full_reps']}/{r['reps']})" if r["pool_full_reps"] < r["reps"] else ""
        out.append("| " + " | ".join([
            r["service"], str(r["clients"]), _f(r["served_s"], "{:.3f}"),
            _f(r["all_served_s"], "{:.3f}"), _f(r["children_s"], "{:.3f}"),
            _f(r["ready_s"], "{:.3f}") + full, _f(r["max_waiting"], "{:.0f}"),
            _f(r["max_accept_queue"], "{:.0f}"), _f(r["max_children"], "{:.0f}"),
            _f(r["ttfb_p50_ms"], "{:.1f}"), _f(r["ttfb_p99_ms"], "{:.1f}"),
            _f(r["ttfb_max_ms"], "{:.1f}"),
            ", ".join(f"{k}={v}" for k, v in r["errors"].items()) or "0",
        ]) + " |")  # fmt: skip
    out += ["", "Services:"]
    for name, conf in st["services"].items():
        out.append(f"- `{name}`: `{conf}`")
    out.append(
        f"\n128 > capacity 64 for `echo`: the first wave is held {st['hold_s']:g} s after "
        "it was served, then closed; `all N served` includes that hold."
    )
    return "\n".join(out) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.growth", description="poolinetd pool growth under a burst."
    )
    p.add_argument("--clients", default="64,128", help="comma list of burst sizes (64,128)")
    p.add_argument("--services", default="echo,cat", help=f"comma list from {','.join(SERVICES)}")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--hold", type=float, default=0.5, help="first-wave hold when N > capacity")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline per phase, s")
    p.add_argument("--server-cmd", default=None, help="command that starts poolinetd")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    return p


def run(args: argparse.Namespace, log: Any = None) -> dict[str, Any]:
    """Every repetition x service x burst size; the results document."""
    def say(msg: str) -> None:
        if log is not None:
            log(msg)

    sizes = [int(x) for x in str(args.clients).split(",") if x.strip()]
    names = [x.strip() for x in str(args.services).split(",") if x.strip()]
    cmd = shlex.split(args.server_cmd) if args.server_cmd else python_cmd()
    runs: list[dict[str, Any]] = []
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="poolinetd-growth-") as tmpname:
        tmp = Path(tmpname)
        os.chmod(tmp, 0o755)
        for rep in range(args.reps):
            for name in names:
                for n in sizes:
                    tag = f"-{name}-{n}-{rep}"
                    try:
                        r = run_one(SERVICES[name], n, tmp, cmd, args.hold, args.timeout, tag)
                    except (ServerError, OSError) as exc:
                        failures.append(f"{tag}: {exc}")
                        say(f"growth {tag}: failed: {exc}")
                        continue
                    r["rep"] = rep
                    runs.append(r)
                    served = _f(r["served_s"], "{:.3f}")
                    ready = _f(r["ready_s"], "{:.3f}")
                    t = r["ttfb_ms"]
                    say(
                        f"growth rep {rep + 1} {name:4} N={n:<4} served {served} s, "
                        f"64 ready {ready} s, max waiting {r['max_waiting']}, "
                        f"accept q {r['max_accept_queue']}, TTFB p50/p99/max "
                        f"{t['p50']:.1f}/{t['p99']:.1f}/{t['max']:.1f} ms, "
                        f"errors {r['errors'] or 0}"
                    )
    return {
        "machine": machine_facts(),
        "settings": {
            "reps": args.reps,
            "clients": sizes,
            "services": {n: SERVICES[n].conf for n in names},
            "hold_s": args.hold,
            "timeout_s": args.timeout,
            "sample_interval_s": SAMPLE_INTERVAL_S,
            "status_interval_s": STATUS_INTERVAL_S,
        },
        "runs": runs,
        "failures": failures,
        "summary": summarize(runs),
    }


def write(doc: dict[str, Any], out: Path) -> str:
    """Write growth.json and growth.md under ``out``; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "growth.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    md = markdown(doc)
    (out / "growth.md").write_text(md)
    return md


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: 0 when every run worked, 1 otherwise."""
    parser = build_parser()
    args = parser.parse_args(argv)
    unknown = [s for s in str(args.services).split(",") if s.strip() and s.strip() not in SERVICES]
    if unknown or args.reps < 1 or args.timeout <= 0 or args.hold < 0:
        parser.error(f"bad --services {unknown} or --reps/--timeout/--hold")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    doc = run(args, log)
    print(write(doc, args.out))
    return 1 if doc["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
