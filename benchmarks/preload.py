"""A Python program under every server: preload=python against exec (touches the OS).

``python -m benchmarks.preload [--reps 3] [--duration 4] [--concurrency 64,256]``

The program is ``pycat.py``, a script of the usual kind (``#!/usr/bin/python3``,
a few stdlib imports: argparse, json, logging, re, email.utils) that echoes
what it reads. Each repetition starts, in turn: poolinetd pool mode with
``preload=python`` (``pool-preload``), pool mode exec'ing it (``pool``),
classic mode (``classic``, which execs it too), and openbsd-inetd and xinetd
when installed; each is loaded with the closed-loop C load generator (64-byte
echo, the client closes) at every concurrency, then stopped. Prints every
cell, then medians per server and concurrency with the rate's ratio to
openbsd-inetd's, and the memory of ``pool-preload``'s preloaders
(RSS and PSS, summed over the service's preloaders, and per preloader)
sampled under load. A rate marked ``*`` was measured with the client over
80 % of a core. JSON: ``benchmarks/results/preload.json``. Bounded: each
server is ready within 20 s and loaded for warmup + duration + 5 s a cell.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.client import BUSY_LEGEND, add_client_flag, busy_mark, client_name, pick_runner
from benchmarks.loadgen import pattern_payload
from benchmarks.machine import machine_facts, write_results
from benchmarks.procstat import children_of, proc_stat
from benchmarks.servers import (
    Scenario,
    Server,
    find_openbsd_inetd,
    find_xinetd,
    python_cmd,
    start_openbsd_inetd,
    start_poolinetd,
    start_xinetd,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PAYLOAD = pattern_payload(64)
PYCAT = """#!/usr/bin/python3
# benchmark: a Python inetd program of the usual kind, a few stdlib imports, echoes its input
import argparse
import email.utils
import json
import logging
import os
import re
import sys

log = logging.getLogger("pycat")
while True:
    data = os.read(0, 65536)
    if not data:
        break
    os.write(1, data)
"""
SCENARIO = Scenario("pycat", "launched Python cat (stdlib imports), 64 B", None,
                    ("{tmp}/pycat.py",), PAYLOAD, PAYLOAD, False)
POOL_CONF = ["defaults on pool_min=2, pool_max=8;"]


def _preloaders(master: int) -> list[int]:
    """The preloaders: children of the master's workers that run the script's Python."""
    found = []
    for worker in children_of(master):
        for pid in children_of(worker):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"poolinetd preloader" in cmdline:
                found.append(pid)
    return found


class MemorySampler:
    """Samples the preloaders' RSS/PSS every 0.5 s in a thread while a cell runs."""

    def __init__(self, master: int) -> None:
        self.master = master
        self.samples: list[tuple[int, int, int]] = []  # (count, rss kB, pss kB) summed
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            stats = [s for s in (proc_stat(p) for p in _preloaders(self.master)) if s]
            if stats:
                self.samples.append((len(stats), sum(s.rss_kb for s in stats),
                                     sum(s.pss_kb for s in stats)))

    def __enter__(self) -> MemorySampler:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.preload", description=__doc__)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--concurrency", default="64,256",
                   type=lambda t: [int(x) for x in t.split(",") if x])
    p.add_argument("--no-peers", dest="peers", action="store_false")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "preload.json")
    add_client_flag(p)
    args = p.parse_args(argv)
    runner = pick_runner(args.python_client)
    cells: list[dict[str, Any]] = []
    memory: list[dict[str, int]] = []
    with tempfile.TemporaryDirectory(prefix="poolinetd-preload-") as tmp_name:
        tmp = Path(tmp_name)
        os.chmod(tmp, 0o755)  # the services run as nobody
        script = tmp / "pycat.py"
        script.write_text(PYCAT)
        script.chmod(0o755)
        scen = [SCENARIO]
        starters: dict[str, Callable[[], Server]] = {
            "pool-preload": lambda: start_poolinetd(
                "pool", scen, tmp, python_cmd(), [*POOL_CONF, "defaults on preload=python;"]),
            "pool": lambda: start_poolinetd("pool", scen, tmp, python_cmd(), POOL_CONF),
            "classic": lambda: start_poolinetd("classic", scen, tmp, python_cmd(), []),
        }
        if args.peers and (obsd := find_openbsd_inetd()):
            starters["openbsd-inetd"] = lambda: start_openbsd_inetd(obsd, scen, tmp)
        if args.peers and (xin := find_xinetd()):
            starters["xinetd"] = lambda: start_xinetd(xin, scen, tmp)
        for rep in range(args.reps):
            for label, start in starters.items():
                server = start()
                try:
                    time.sleep(1.0)  # settle: workers and preloaders ready
                    for c in args.concurrency:
                        with MemorySampler(server.pid) as mem:
                            r = runner("127.0.0.1", server.ports["pycat"], c, args.duration,
                                       PAYLOAD, expect=PAYLOAD, warmup=args.warmup,
                                       timeout=10.0)
                        cell = {"rep": rep + 1, "server": label, "concurrency": c,
                                "conn_per_s": r.conn_per_s, "p50_ms": r.p50_ms,
                                "p99_ms": r.p99_ms, "errors": r.error_total,
                                "client_cpu_pct": r.client_max_proc_cpu_pct,
                                "client_saturated": r.client_saturated}
                        cells.append(cell)
                        if label == "pool-preload" and mem.samples:
                            count, rss, pss = max(mem.samples, key=lambda s: s[2])
                            memory.append({"concurrency": c, "preloaders": count,
                                           "rss_kb": rss, "pss_kb": pss})
                        print(f"rep {rep + 1} {label:13} c={c:<4} "
                              f"{r.conn_per_s:9,.0f}{busy_mark(r.client_saturated)} conn/s "
                              f"p50 {r.p50_ms:7.2f} p99 {r.p99_ms:8.2f} ms "
                              f"errors {r.error_total}", flush=True)
                finally:
                    server.stop()
    medians = _medians(cells)
    _print(medians, memory)
    write_results(args.out, {
        "machine": machine_facts(), "duration_s": args.duration, "warmup_s": args.warmup,
        "client": client_name(runner), "script": PYCAT, "cells": cells,
        "medians": medians, "preloader_memory": memory})
    return 0


def _medians(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for cell in cells:
        groups.setdefault((cell["server"], cell["concurrency"]), []).append(cell)
    out = []
    for (label, c), group in groups.items():
        out.append({"server": label, "concurrency": c,
                    "conn_per_s": statistics.median(g["conn_per_s"] for g in group),
                    "p50_ms": statistics.median(g["p50_ms"] for g in group),
                    "p99_ms": statistics.median(g["p99_ms"] for g in group),
                    "errors": sum(g["errors"] for g in group),
                    "client_saturated": any(g["client_saturated"] for g in group)})
    return out


def _print(medians: list[dict[str, Any]], memory: list[dict[str, int]]) -> None:
    base = {m["concurrency"]: m["conn_per_s"] for m in medians if m["server"] == "openbsd-inetd"}
    print("\n| server | c | conn/s | p50 ms | p99 ms | x openbsd-inetd |")
    print("|---|---|---|---|---|---|")
    for m in sorted(medians, key=lambda m: (m["concurrency"], -m["conn_per_s"])):
        ref = base.get(m["concurrency"])
        ratio = f"{m['conn_per_s'] / ref:.1f}x" if ref else "-"
        print(f"| {m['server']} | {m['concurrency']} | {m['conn_per_s']:,.0f}"
              f"{busy_mark(m['client_saturated'])} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} "
              f"| {ratio} |")
    if any(m["client_saturated"] for m in medians):
        print(BUSY_LEGEND)
    if memory:
        pss = statistics.median(m["pss_kb"] for m in memory)
        rss = statistics.median(m["rss_kb"] for m in memory)
        count = statistics.median(m["preloaders"] for m in memory)
        print(f"\npreloaders under load: {count:.0f} per service, together RSS "
              f"{rss / 1024:.1f} MiB, PSS {pss / 1024:.1f} MiB "
              f"({pss / 1024 / max(count, 1):.1f} MiB PSS each)")


if __name__ == "__main__":
    sys.exit(main())
