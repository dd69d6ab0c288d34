"""Built-in echo against one-process references, alternating (touches the OS).

``python -m benchmarks.ceiling [--pairs 5] [--duration 4] [--concurrency 64]``

Runs, ``--pairs`` times in turn: poolinetd pool mode (built-in echo: the
master accepts, a worker echoes), ``tools/pyecho.py`` (one Python process
that accepts and echoes by itself, nothing else) and the C reference
(``tools/cecho.c``, when there is a C compiler), each freshly started and
loaded once with the closed-loop load generator (64-byte echo). Prints each
run, then per server the median rate and p99 and its ratio to the C
server's median. It separates the two costs of the pool's per-connection
path: Python itself (pyecho against C) and the second process on the path
(pool against pyecho). JSON: ``benchmarks/results/ceiling.json``. Bounded:
each server is ready within 20 s and loaded for warmup + duration + 5 s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.loadgen import run_load
from benchmarks.machine import machine_facts, write_results
from benchmarks.run import SCENARIOS
from benchmarks.servers import (
    build_c_reference,
    python_cmd,
    start_c_reference,
    start_poolinetd,
    start_pyecho,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ceiling", description=__doc__)
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "ceiling.json")
    args = p.parse_args(argv)
    echo = SCENARIOS["echo"]
    runs: dict[str, list[dict[str, float]]] = {"pool": [], "pyecho": [], "c-epoll": []}
    with tempfile.TemporaryDirectory(prefix="poolinetd-ceiling-") as tmp_name:
        tmp = Path(tmp_name)
        cref = build_c_reference(tmp)
        starters = {"pool": lambda: start_poolinetd("pool", [echo], tmp, python_cmd(), []),
                    "pyecho": lambda: start_pyecho(tmp)}
        if cref:
            starters["c-epoll"] = lambda: start_c_reference(cref, [echo], tmp)
        for n in range(args.pairs):
            for label, start in starters.items():
                server = start()
                try:
                    time.sleep(0.5)  # settle (the pool's workers are ready already)
                    r = run_load("127.0.0.1", server.ports["echo"], args.concurrency,
                                 args.duration, echo.payload, expect=echo.expect)
                finally:
                    server.stop()
                runs[label].append({"conn_per_s": r.conn_per_s, "p50_ms": r.p50_ms,
                                    "p99_ms": r.p99_ms, "client_saturated": r.client_saturated})
                mark = " (client saturated)" if r.client_saturated else ""
                print(f"run {n + 1} {label:8} {r.conn_per_s:9,.0f} conn/s p50 {r.p50_ms:6.2f} "
                      f"p99 {r.p99_ms:6.2f} ms{mark}")
    medians: dict[str, dict[str, float]] = {}
    for label, cells in runs.items():
        if cells:
            medians[label] = {"conn_per_s": statistics.median(c["conn_per_s"] for c in cells),
                              "p99_ms": statistics.median(c["p99_ms"] for c in cells)}
    ref = medians.get("c-epoll", {}).get("conn_per_s")
    for label, m in medians.items():
        ratio = f", {m['conn_per_s'] / ref:.2f}x c-epoll" if ref else ""
        print(f"median {label:8} {m['conn_per_s']:9,.0f} conn/s p99 {m['p99_ms']:6.2f} ms{ratio}")
    doc: dict[str, Any] = {"machine": machine_facts(), "concurrency": args.concurrency,
                           "duration_s": args.duration, "runs": runs, "medians": medians}
    write_results(args.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
