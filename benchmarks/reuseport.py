"""Several masters on one port (``reuseport=yes``): what a second master gives over one.

``python -m benchmarks.reuseport [--masters 1,2] [--concurrency 64] [--duration 4] [--reps 3]``

For each repetition and each master count N (alternating, so drift of the
machine spreads over all), N poolinetd masters (pool mode) are started on
one fixed loopback port with ``reuseport=yes`` on a built-in echo, and the
closed-loop load generator (tools/loadgen.c, or benchmarks/loadgen.py with
``--python-client``; 64 loopback source addresses so the kernel's
SO_REUSEPORT hash spreads them) runs against the port. Printed: a table of
medians (connections/s, p50, p99) per N and the ratio to one master, a rate
marked ``*`` when the client used over 80 % of a core in it; written:
``benchmarks/results/reuseport.json``.

On a 2-core machine the load generator shares the cores with the masters,
so the ratio shown is a floor: a second master earns its keep where the
master's core, not the workers', is the limit. Bounded: every run has a
duration, every start a deadline, loopback only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.client import BUSY_LEGEND, add_client_flag, busy_mark, pick_runner
from benchmarks.machine import machine_facts, write_results
from benchmarks.servers import Server, free_port, launch_poolinetd, python_cmd

RESULTS = Path(__file__).resolve().parent / "results"


def _start(masters: int, port: int, tmp: Path) -> list[Server]:
    conf = (f"127.0.0.1:{port} on socktype=stream, user=nobody, args=echo, reuseport=yes, "
            "max_child_per_ip=unlimited;\n")
    started: list[Server] = []
    try:
        for i in range(masters):
            started.append(launch_poolinetd("pool", conf, ["echo"], tmp, python_cmd(),
                                            ["--no-control"], tag=f"-{masters}-{i}"))
    except Exception:
        for server in started:
            server.stop()
        raise
    return started


def run(args: argparse.Namespace) -> dict[str, Any]:
    cells: list[dict[str, Any]] = []
    runner = pick_runner(args.python_client)
    with tempfile.TemporaryDirectory(prefix="poolinetd-reuseport-") as tmpdir:
        tmp = Path(tmpdir)
        for rep in range(args.reps):
            for masters in args.masters:
                port = free_port()
                servers = _start(masters, port, tmp)
                try:
                    time.sleep(0.5)  # let every pool finish booting
                    result = runner("127.0.0.1", port, args.concurrency, args.duration,
                                    b"ping", expect=b"ping", warmup=0.5)
                finally:
                    for server in servers:
                        server.stop()
                cells.append({"rep": rep, "masters": masters, "conn_per_s": result.conn_per_s,
                              "p50_ms": result.p50_ms, "p99_ms": result.p99_ms,
                              "errors": result.error_total,
                              "client_saturated": result.client_saturated})
                mark = busy_mark(result.client_saturated)
                print(f"rep {rep} masters {masters}: {result.conn_per_s:,.0f}{mark} conn/s "
                      f"p99 {result.p99_ms:.2f} ms errors {result.error_total}", flush=True)
    medians = {}
    for masters in args.masters:
        mine = [c for c in cells if c["masters"] == masters]
        medians[masters] = {k: statistics.median(c[k] for c in mine)
                            for k in ("conn_per_s", "p50_ms", "p99_ms")}
        medians[masters]["client_saturated"] = any(c["client_saturated"] for c in mine)
    return {"machine": machine_facts(), "concurrency": args.concurrency,
            "duration_s": args.duration, "cells": cells, "medians": medians}


def table(doc: dict[str, Any]) -> str:
    medians = doc["medians"]
    base = medians[min(medians)]["conn_per_s"] or 1.0
    rows = ["| masters | conn/s | p50 ms | p99 ms | vs one |", "|---|---|---|---|---|"]
    for masters, m in sorted(medians.items()):
        rows.append(f"| {masters} | {m['conn_per_s']:,.0f}{busy_mark(m['client_saturated'])} | "
                    f"{m['p50_ms']:.2f} | {m['p99_ms']:.2f} | {m['conn_per_s'] / base:.2f}x |")
    if any(m["client_saturated"] for m in medians.values()):
        rows += ["", BUSY_LEGEND]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--masters", default="1,2", help="comma list of master counts (1,2)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS / "reuseport.json")
    add_client_flag(p)
    args = p.parse_args(argv)
    args.masters = [int(x) for x in args.masters.split(",") if x]
    if not args.masters or min(args.masters) < 1 or max(args.masters) > 8:
        p.error("--masters: counts from 1 to 8")
    doc = run(args)
    print(table(doc))
    write_results(args.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
