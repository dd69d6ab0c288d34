"""Start-to-start spread of pool echo (touches the OS).

``python -m benchmarks.starts [--starts 5] [--duration 3] [--concurrency 64]``
starts poolinetd (pool mode, one built-in echo) ``--starts`` times, loads
each start once (closed loop, 64-byte echo, after a 0.5 s settle and 0.5 s
warmup) and stops it; prints each start's rate, p50/p99, client CPU and how
many workers the master had at the end, then the median and the spread
((max - min) / median). The load comes from the C generator
(``tools/loadgen.c``; ``--python-client``: ``benchmarks/loadgen.py``); a
rate marked ``*`` was measured with the client over 80 % of a core. JSON:
``benchmarks/results/starts.json``. Bounded:
each start is ready within 20 s and loaded for warmup + duration + 5 s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.client import BUSY_LEGEND, add_client_flag, busy_mark, client_name, pick_runner
from benchmarks.loadgen import pattern_payload
from benchmarks.machine import machine_facts, write_results
from benchmarks.procstat import snapshot
from benchmarks.servers import launch_poolinetd, python_cmd

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PAYLOAD = pattern_payload(64)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.starts", description=__doc__)
    p.add_argument("--starts", type=int, default=5)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--conf-line", action="append", default=[])
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "starts.json")
    add_client_flag(p)
    args = p.parse_args(argv)
    runner = pick_runner(args.python_client)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="poolinetd-starts-") as tmpname:
        tmp = Path(tmpname)
        conf = "\n".join([*args.conf_line, "127.0.0.1:0 stream tcp nowait nobody internal echo"])
        for i in range(args.starts):
            server = launch_poolinetd("pool", conf + "\n", ["echo"], tmp, python_cmd(),
                                      ["--no-control"], tag=f"-{i}")
            try:
                time.sleep(0.5)
                r = runner("127.0.0.1", server.ports["echo"], args.concurrency, args.duration,
                           PAYLOAD, expect=PAYLOAD, warmup=0.5)
                workers = len(snapshot(server.pid).workers)
            finally:
                server.stop()
            runs.append({"conn_per_s": r.conn_per_s, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms,
                         "client_cpu_pct": r.client_cpu_pct, "workers": workers,
                         "client_saturated": r.client_saturated})
            rate = f"{r.conn_per_s:,.0f}{busy_mark(r.client_saturated)}"
            print(f"start {i + 1}: {rate:>10} conn/s p50 {r.p50_ms:5.2f} p99 "
                  f"{r.p99_ms:6.2f} ms client {r.client_cpu_pct:3.0f}% workers {workers}",
                  flush=True)
    rates = [x["conn_per_s"] for x in runs]
    med = statistics.median(rates)
    spread = (max(rates) - min(rates)) / med if med else 0.0
    print(f"median {med:,.0f} conn/s, min {min(rates):,.0f}, max {max(rates):,.0f}, "
          f"spread {spread * 100:.0f}%")
    if any(x["client_saturated"] for x in runs):
        print(BUSY_LEGEND)
    write_results(args.out, {"machine": machine_facts(), "runs": runs, "median": med,
                             "spread": spread, "client": client_name(runner)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
