"""Built-in echo against one-process references, alternating (touches the OS).

``python -m benchmarks.ceiling [--pairs 5] [--duration 4] [--concurrency 64]``

Runs, ``--pairs`` times in turn: poolinetd pool mode (built-in echo: the
master accepts, a worker echoes), ``tools/pyecho.py`` (one Python process
that accepts and echoes by itself, nothing else), ``tools/pyhandoff.py``
(``py-handoff``: the pool's shape in the least Python that can do it, two
processes and SCM_RIGHTS batches, the bound for a Python pool), and with a C compiler
``tools/handoff.c`` (``c-handoff``: poolinetd's shape in C, one process
accepts and passes batches of up to 16 fds over SCM_RIGHTS to a second that
echoes: the bound for the pool's shape) and the C reference
(``tools/cecho.c``, ``c-epoll``: one process), each freshly started and
loaded once with the closed-loop load generator (64-byte echo; the C one
unless ``--python-client``). Prints each run, then per server the median
rate and p99 and its ratio to the C server's median; a rate marked ``*``
was measured with the client over 80 % of a core. It separates the costs
of the pool's per-connection path: the second process itself (c-handoff
against c-epoll), Python in that shape (py-handoff against c-handoff) and
poolinetd's own work per connection (pool against py-handoff). JSON:
``benchmarks/results/ceiling.json``. Bounded: each server is ready within
20 s and loaded for warmup + duration + 5 s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.client import BUSY_LEGEND, add_client_flag, busy_mark, client_name, pick_runner
from benchmarks.machine import machine_facts, write_results
from benchmarks.run import SCENARIOS
from benchmarks.servers import (
    Server,
    build_c_reference,
    build_tool,
    python_cmd,
    start_c_reference,
    start_handoff,
    start_poolinetd,
    start_pyecho,
    start_pyhandoff,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ceiling", description=__doc__)
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "ceiling.json")
    add_client_flag(p)
    args = p.parse_args(argv)
    echo = SCENARIOS["echo"]
    runner = pick_runner(args.python_client)
    runs: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="poolinetd-ceiling-") as tmp_name:
        tmp = Path(tmp_name)
        cref, handoff = build_c_reference(tmp), build_tool("handoff", tmp)
        starters: dict[str, Callable[[], Server]] = {
            "pool": lambda: start_poolinetd("pool", [echo], tmp, python_cmd(), []),
            "pyecho": lambda: start_pyecho(tmp),
            "py-handoff": lambda: start_pyhandoff(tmp)}  # fmt: skip
        if handoff:
            starters["c-handoff"] = lambda: start_handoff(handoff, tmp)
        if cref:
            starters["c-epoll"] = lambda: start_c_reference(cref, [echo], tmp)
        for n in range(args.pairs):
            for label, start in starters.items():
                server = start()
                try:
                    time.sleep(0.5)  # settle (the pool's workers are ready already)
                    r = runner("127.0.0.1", server.ports["echo"], args.concurrency,
                               args.duration, echo.payload, expect=echo.expect,
                               warmup=args.warmup)
                finally:
                    server.stop()
                runs.setdefault(label, []).append(
                    {"conn_per_s": r.conn_per_s, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms,
                     "errors": r.error_total, "client_cpu_pct": r.client_max_proc_cpu_pct,
                     "client_saturated": r.client_saturated})  # fmt: skip
                rate = f"{r.conn_per_s:,.0f}{busy_mark(r.client_saturated)}"
                print(f"run {n + 1} {label:9} {rate:>10} conn/s p50 {r.p50_ms:6.2f} "
                      f"p99 {r.p99_ms:6.2f} ms errors {r.error_total} client "
                      f"{r.client_max_proc_cpu_pct:3.0f}%", flush=True)
    medians: dict[str, dict[str, Any]] = {}
    for label, cells in runs.items():
        medians[label] = {"conn_per_s": statistics.median(c["conn_per_s"] for c in cells),
                          "p99_ms": statistics.median(c["p99_ms"] for c in cells),
                          "client_saturated": any(c["client_saturated"] for c in cells)}
    ref = medians.get("c-epoll", {}).get("conn_per_s")
    bound = medians.get("c-handoff", {}).get("conn_per_s")
    py_bound = medians.get("py-handoff", {}).get("conn_per_s")
    for label, m in medians.items():
        ratio = f", {m['conn_per_s'] / ref:.2f}x c-epoll" if ref else ""
        ratio += f", {m['conn_per_s'] / bound:.2f}x c-handoff" if bound else ""
        ratio += f", {m['conn_per_s'] / py_bound:.2f}x py-handoff" if py_bound else ""
        rate = f"{m['conn_per_s']:,.0f}{busy_mark(m['client_saturated'])}"
        print(f"median {label:9} {rate:>10} conn/s p99 {m['p99_ms']:6.2f} ms{ratio}")
    if any(m["client_saturated"] for m in medians.values()):
        print(BUSY_LEGEND)
    doc: dict[str, Any] = {"machine": machine_facts(), "concurrency": args.concurrency,
                           "duration_s": args.duration, "warmup_s": args.warmup,
                           "client": client_name(runner), "runs": runs, "medians": medians}
    write_results(args.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
