"""Scale figures of the master (touches the OS): CPU per connection, loop turns, memory.

``python -m benchmarks.scale [--duration 3] [--passes 3]`` measures, on loopback:

* **master CPU per connection**: utime+stime of the master (``/proc/PID/stat``)
  over a closed-loop run at c=64, divided by the connections completed in
  the same span, for pool echo (a hand-off per connection) and daytime
  (answered by the engine itself); ``1e6 / us`` is the projected ceiling of
  one master core (connections/s it could take if it had a core to itself);
* **loop turn with 1,000 services**: echo under load beside 999 daytime
  services (which need no workers), against echo alone: the master's CPU
  per connection and its mean loop turn (``poolinetd_loop_turn_seconds``
  sum/count from ``--metrics``; the time from select's return to the end of
  the turn);
* **master RSS with 10,000 entries**: 10,000 daytime entries on ports
  20000-29999 (no workers: ``VmRSS`` of the master after ready, and the
  time until ready), against one entry.

Medians of ``--passes``; every run is bounded (``duration + 6 s`` per pass,
20 s to start). The load comes from the C generator (``tools/loadgen.c``;
``--python-client``: ``benchmarks/loadgen.py``); a rate printed with ``*``
was measured with the client over 80 % of a core. Writes
``benchmarks/results/scale.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.client import LoadRunner, add_client_flag, busy_mark, client_name, pick_runner
from benchmarks.loadgen import CLIENT_BUSY_PCT, pattern_payload
from benchmarks.machine import machine_facts, write_results
from benchmarks.servers import Server, free_port, launch_poolinetd, python_cmd

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PAYLOAD = pattern_payload(64)
ECHO = "127.0.0.1:0 stream tcp nowait nobody internal echo"


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _loop_turns(port: int) -> tuple[float, float]:
    """(sum seconds, count) of the master's loop turns, from its metrics endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read(4 << 20).decode()
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("poolinetd_loop_turn_seconds_sum"):
            total = float(line.split()[-1])
        elif line.startswith("poolinetd_loop_turn_seconds_count"):
            count = float(line.split()[-1])
    return total, count


def _start(tmp: Path, lines: list[str], names: list[str], metrics_port: int) -> Server:
    return launch_poolinetd("pool", "\n".join(lines) + "\n", names, tmp, python_cmd(),
                            ["--no-control", "--metrics", f"127.0.0.1:{metrics_port}"])


def master_cost(runner: LoadRunner, server: Server, name: str, until_close: bool,
                duration: float, metrics_port: int) -> dict[str, float]:
    """One loaded run at c=64: master us per connection, its ceiling, the mean loop turn."""
    time.sleep(0.5)
    turns0 = _loop_turns(metrics_port)
    c0 = _cpu(server.pid)
    if until_close:
        r = runner("127.0.0.1", server.ports[name], 64, duration, b"", until_close=True,
                   warmup=0.0)
    else:
        r = runner("127.0.0.1", server.ports[name], 64, duration, PAYLOAD, expect=PAYLOAD,
                   warmup=0.0)
    c1 = _cpu(server.pid)
    turns1 = _loop_turns(metrics_port)
    # Connections of the whole run (warmup 0; the drain adds at most 64).
    n = max(1, r.completed)
    us = (c1 - c0) / n * 1e6
    nturns = max(1.0, turns1[1] - turns0[1])
    return {"conn_per_s": r.conn_per_s, "p99_ms": r.p99_ms, "master_us_per_conn": us,
            "ceiling_conn_per_s": 1e6 / us if us else 0.0,
            "loop_turn_us": (turns1[0] - turns0[0]) / nturns * 1e6,
            "conns_per_turn": n / nturns, "client_cpu_pct": r.client_cpu_pct,
            "client_max_proc_cpu_pct": r.client_max_proc_cpu_pct}


def _median_dicts(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--entries", type=int, default=10_000, help="entries of the memory cell")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "scale.json")
    add_client_flag(p)
    args = p.parse_args(argv)
    runner = pick_runner(args.python_client)
    doc: dict[str, Any] = {"machine": machine_facts(), "passes": args.passes,
                           "duration_s": args.duration, "client": client_name(runner)}
    with tempfile.TemporaryDirectory(prefix="poolinetd-scale-") as tmpname:
        tmp = Path(tmpname)
        os.chmod(tmp, 0o755)
        # 1. master CPU per connection (echo: hand-off; daytime: engine answers).
        for label, extra in (("1 service", 0), ("1,000 services", 999)):
            lines = [ECHO, "127.0.0.1:0 stream tcp nowait nobody internal daytime"]
            names = ["echo", "daytime"]
            lines += [f"127.0.0.1:{20000 + i} stream tcp nowait nobody internal daytime"
                      for i in range(extra)]
            names += [f"d{i}" for i in range(extra)]
            echo_runs, day_runs = [], []
            for _ in range(args.passes):
                mport = free_port()
                server = _start(tmp, lines, names, mport)
                try:
                    echo_runs.append(master_cost(runner, server, "echo", False, args.duration,
                                                 mport))
                    day_runs.append(master_cost(runner, server, "daytime", True, args.duration,
                                                mport))
                finally:
                    server.stop()
            doc[label] = {"echo": _median_dicts(echo_runs), "daytime": _median_dicts(day_runs),
                          "runs": {"echo": echo_runs, "daytime": day_runs}}
            for kind in ("echo", "daytime"):
                d = doc[label][kind]
                busy = d["client_max_proc_cpu_pct"] > CLIENT_BUSY_PCT
                rate = f"{d['conn_per_s']:,.0f}{busy_mark(busy)}"
                print(f"{label:15} {kind:8} {rate:>10} conn/s  master "
                      f"{d['master_us_per_conn']:5.1f} us/conn (one-core ceiling "
                      f"{d['ceiling_conn_per_s']:,.0f}/s)  loop turn {d['loop_turn_us']:6.1f} us "
                      f"for {d['conns_per_turn']:.1f} conns", flush=True)
        # 2. master RSS with many entries (daytime: no workers).
        mem = {}
        for n in (1, args.entries):
            lines = [f"127.0.0.1:{20000 + i} stream tcp nowait nobody internal daytime"
                     for i in range(n)]
            t0 = time.monotonic()
            server = launch_poolinetd("pool", "\n".join(lines) + "\n",
                                      [f"d{i}" for i in range(n)], tmp, python_cmd(),
                                      ["--no-control"])
            ready = time.monotonic() - t0
            try:
                time.sleep(0.5)
                mem[n] = {"master_rss_kb": _rss_kb(server.pid), "ready_s": ready}
            finally:
                server.stop()
            print(f"{n:6} entries: master RSS {mem[n]['master_rss_kb']:,} kB, ready in "
                  f"{ready:.2f} s", flush=True)
        doc["memory"] = mem
    write_results(args.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
