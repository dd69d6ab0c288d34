"""When the slowest connections happen: completions per time bin, per server (touches the OS).

``python -m benchmarks.timeline [--scenario cat] [--concurrency 64] [--duration 4]``

Starts each server in turn (poolinetd pool mode, openbsd-inetd and xinetd
if installed, and for built-ins the C reference), loads it once with the C
load generator (``--python-client``: ``loadgen.run_load`` in this process),
which records every connection's start and end, and cuts the window into
50 ms bins: connections completed in each bin and the slowest of them. It
prints, per server, the rate (marked ``*`` when the client used over 80 % of
a core), p50/p99, the bins where completions fell below half the median bin
("dips": when they were and how slow), and at what times the slowest 1 % of
connections ended.

What it is for: a p99 set by moments when every connection slows at once
(the machine, the kernel or the client) looks the same for every server in
such a table, where a tail made by the server under test shows as dips of
its own. JSON: ``benchmarks/results/timeline.json``. Bounded: one load of
``warmup + duration`` s (plus a 5 s drain) per server; loopback only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from array import array
from pathlib import Path
from typing import Any

from benchmarks.client import BUSY_LEGEND, LoadRunner, add_client_flag, busy_mark, pick_runner
from benchmarks.machine import machine_facts, write_results
from benchmarks.run import SCENARIOS
from benchmarks.servers import (
    Server,
    build_c_reference,
    find_openbsd_inetd,
    find_xinetd,
    python_cmd,
    start_c_reference,
    start_openbsd_inetd,
    start_poolinetd,
    start_xinetd,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BIN_S = 0.05


def bins_of(log: array[int], t_start: int) -> dict[int, tuple[int, float]]:
    """(completions, slowest ms) per BIN_S bin of end time, from a loadgen conn_log."""
    out: dict[int, tuple[int, float]] = {}
    for i in range(0, len(log), 3):
        start, end = log[i], log[i + 1]
        if end < t_start:
            continue
        b = int((end - t_start) / (BIN_S * 1e9))
        n, worst = out.get(b, (0, 0.0))
        out[b] = (n + 1, max(worst, (end - start) / 1e6))
    return out


def analyse(log: array[int], t_start: int) -> dict[str, Any]:
    """Dips (bins below half the median bin) and when the slowest 1 % ended, in seconds."""
    bins = bins_of(log, t_start)
    if not bins:
        return {"dips": [], "slowest_1pct_at": []}
    last = max(bins)
    counts = [bins.get(b, (0, 0.0))[0] for b in range(last)]  # the last bin is partial
    median = statistics.median(counts) if counts else 0
    dips = [{"at_s": round(b * BIN_S, 2), "completed": bins.get(b, (0, 0.0))[0],
             "slowest_ms": round(bins.get(b, (0, 0.0))[1], 1)}
            for b in range(last) if bins.get(b, (0, 0.0))[0] < median / 2]
    recs = [(log[i + 1] - log[i], log[i + 1]) for i in range(0, len(log), 3)
            if log[i + 1] >= t_start]
    recs.sort()
    tail = recs[len(recs) - max(1, len(recs) // 100):]
    return {"median_per_bin": median, "dips": dips,
            "slowest_1pct_at": sorted({round((end - t_start) / 1e9, 1) for _, end in tail})}


def measure(runner: LoadRunner, server: Server, name: str, c: int, args: argparse.Namespace
            ) -> dict[str, Any]:
    s = SCENARIOS[name]
    log: array[int] = array("q")
    result = runner("127.0.0.1", server.ports[name], c, args.duration, s.payload,
                      expect=s.expect, until_close=s.until_close, fork=False, processes=1,
                      warmup=args.warmup, conn_log=log)
    first_end = min((log[i + 1] for i in range(0, len(log), 3)), default=0)
    window_start = first_end + int(args.warmup * 1e9)
    return {"conn_per_s": result.conn_per_s, "p50_ms": result.p50_ms, "p99_ms": result.p99_ms,
            "max_ms": result.max_ms, "client_saturated": result.client_saturated,
            **analyse(log, window_start)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.timeline", description=__doc__)
    p.add_argument("--scenario", default="cat", choices=sorted(SCENARIOS))
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "timeline.json")
    add_client_flag(p)
    args = p.parse_args(argv)
    runner = pick_runner(args.python_client)
    scenarios = [SCENARIOS[args.scenario]]
    doc: dict[str, Any] = {"machine": machine_facts(), "scenario": args.scenario,
                           "concurrency": args.concurrency, "bin_s": BIN_S, "servers": {}}
    with tempfile.TemporaryDirectory(prefix="poolinetd-timeline-") as tmp_name:
        tmp = Path(tmp_name)
        starters: list[tuple[str, Any]] = [
            ("pool", lambda: start_poolinetd("pool", scenarios, tmp, python_cmd(), []))]
        binary = find_openbsd_inetd()
        if binary:
            starters.append(("openbsd-inetd",
                             lambda: start_openbsd_inetd(binary, scenarios, tmp)))
        xinetd = find_xinetd()
        if xinetd:
            starters.append(("xinetd", lambda: start_xinetd(xinetd, scenarios, tmp)))
        cref = build_c_reference(tmp) if scenarios[0].builtin else None
        if cref:
            starters.append(("c-epoll", lambda: start_c_reference(cref, scenarios, tmp)))
        for label, start in starters:
            server = start()
            try:
                if args.scenario in server.skipped or args.scenario not in server.ports:
                    continue
                cell = measure(runner, server, args.scenario, args.concurrency, args)
            finally:
                server.stop()
            doc["servers"][label] = cell
            dips = ", ".join(f"{d['at_s']:.2f}s ({d['completed']} done, slowest "
                             f"{d['slowest_ms']:.0f} ms)" for d in cell["dips"]) or "none"
            rate = f"{cell['conn_per_s']:,.0f}{busy_mark(cell['client_saturated'])}"
            print(f"{label:14} {rate:>9} conn/s p50 {cell['p50_ms']:7.2f} "
                  f"p99 {cell['p99_ms']:7.2f} ms; dips: {dips}; slowest 1 % ended at "
                  f"{cell['slowest_1pct_at']} s")
    if any(cell["client_saturated"] for cell in doc["servers"].values()):
        print(BUSY_LEGEND)
    write_results(args.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
