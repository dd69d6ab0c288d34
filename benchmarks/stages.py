"""Where a connection's time goes, stage by stage, in pool mode (touches the OS).

``python -m benchmarks.stages [--scenario cat] [--concurrency 64,256] [--duration 3]``

Starts poolinetd (pool mode) with ``POOLINETD_TRACE_STAGES`` pointing at a
file in a temporary directory (see ``poolinetd/observe/stagetrace.py``), loads
it with the C load generator (``--python-client``: ``loadgen.run_load`` in
this process), which records each client connection's start and end with its
source address and port, stops it (SIGTERM:
every process flushes its trace) and joins the three views: client records
by peer address to the master's ``accepted`` record, and that by instance
id to every other stage. One server start per concurrency; ``--reps`` starts
more and pools the connections.

Stages (ms), for each completed connection of the measured window:

* ``backlog``: client ``socket()`` to the master's accept (SYN, handshake,
  time in the listen queue, plus the client's own loop),
* ``master``: accept to sendmsg done (admission, pick, hand-off),
* ``channel``: sendmsg done to the worker reading the CONN,
* ``spawn`` (programs): the worker's read to ``posix_spawn`` returning,
* ``reply``: program start (or the worker's read, for built-ins) to the
  client's close: exec, the program's echo, the client reading it,
* ``total``: the client's latency (what the benchmark reports);

and, outside the client's latency but holding the worker's capacity:
``run`` (spawned to reaped), ``report`` (reaped or finished to the master
reading DONE). For the slowest 1 % of connections the mean of each stage
says which one makes the tail. Printed as a table; everything goes to
``benchmarks/results/stages.json``.

Bounds: each cell runs ``warmup + duration`` s plus a 5 s drain; the trace
file is read once, in size bounded by what the run produced.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from array import array
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.client import BUSY_LEGEND, LoadRunner, add_client_flag, busy_mark, pick_runner
from benchmarks.machine import machine_facts, write_results
from benchmarks.run import SCENARIOS, SLEEP_SCRIPT
from benchmarks.servers import python_cmd, start_poolinetd

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ENV = "POOLINETD_TRACE_STAGES"
CLIENT_STAGES = ("backlog", "master", "channel", "spawn", "reply", "total")
WORKER_STAGES = ("run", "report")
MAX_TRACE_BYTES = 512 * 1024 * 1024


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs)) - 1))]


def parse_trace(text: str) -> tuple[dict[int, dict[str, float]], dict[int, dict[str, str]]]:
    """Stage times and extra fields per instance id."""
    times: dict[int, dict[str, float]] = {}
    extras: dict[int, dict[str, str]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        iid = int(parts[1])
        times.setdefault(iid, {})[parts[2]] = float(parts[3])
        ex = extras.setdefault(iid, {})
        for kv in parts[4:]:
            k, _, v = kv.partition("=")
            ex[f"{parts[2]}.{k}"] = v
    return times, extras


def join(client: array[int], times: dict[int, dict[str, float]],
         extras: dict[int, dict[str, str]], builtin: bool) -> list[dict[str, float]]:
    """One row of stage durations (ms) per client connection found in the trace."""
    by_peer: dict[str, list[int]] = {}
    for iid, ex in extras.items():
        peer = ex.get("accepted.peer")
        if peer:
            by_peer.setdefault(peer, []).append(iid)
    rows = []
    for i in range(0, len(client), 3):
        t0, t1, tag = client[i] / 1e9, client[i + 1] / 1e9, client[i + 2]
        peer = f"127.0.1.{tag >> 16}:{tag & 0xFFFF}" if tag >> 16 else f"127.0.0.1:{tag & 0xFFFF}"
        match = [iid for iid in by_peer.get(peer, ())
                 if t0 <= times[iid].get("accepted", -1.0) <= t1]
        if len(match) != 1:
            continue
        st = times[match[0]]
        if not {"accepted", "handed", "received"} <= st.keys():
            continue
        start_of_reply = st["received"] if builtin else st.get("spawned")
        if start_of_reply is None:
            continue
        row = {
            "backlog": st["accepted"] - t0,
            "master": st["handed"] - st["accepted"],
            "channel": st["received"] - st["handed"],
            "spawn": 0.0 if builtin else start_of_reply - st["received"],
            "reply": t1 - start_of_reply,
            "total": t1 - t0,
        }
        end = st.get("finished" if builtin else "exited")
        if end is not None and not builtin:
            row["run"] = end - start_of_reply
        if end is not None and "closed" in st:
            row["report"] = st["closed"] - end
        rows.append({k: v * 1000 for k, v in row.items()})
    return rows


def summarize(rows: list[dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {"connections": len(rows), "stages": {}}
    if not rows:
        return out
    totals = sorted(r["total"] for r in rows)
    cut = _pct(totals, 99)
    tail = [r for r in rows if r["total"] >= cut]
    for stage in (*CLIENT_STAGES, *WORKER_STAGES):
        xs = [r[stage] for r in rows if stage in r]
        if not xs:
            continue
        tail_xs = [r[stage] for r in tail if stage in r]
        out["stages"][stage] = {
            "p50": _pct(xs, 50), "p90": _pct(xs, 90), "p99": _pct(xs, 99), "max": max(xs),
            "mean": statistics.fmean(xs),
            "tail_mean": statistics.fmean(tail_xs) if tail_xs else 0.0,
        }
    return out


def worker_facts(times: dict[int, dict[str, float]], extras: dict[int, dict[str, str]],
                 t_from: float, t_to: float) -> dict[str, Any]:
    """How connections spread over workers, the worker's load at hand-off, batches."""
    per_worker: Counter[str] = Counter()
    loads: list[float] = []
    sends: list[float] = []
    batches: list[float] = []
    for iid, ex in extras.items():
        t = times[iid].get("accepted")
        if t is None or not t_from <= t <= t_to:
            continue
        if "handed.to" in ex:
            per_worker[ex["handed.to"]] += 1
            loads.append(float(ex["handed.load"]))
            sends.append(float(ex.get("handed.batch", "1")))
        if "received.batch" in ex:
            batches.append(float(ex["received.batch"]))
    return {
        "per_worker": dict(per_worker.most_common()),
        "load_at_handoff": {"p50": _pct(loads, 50), "p99": _pct(loads, 99),
                            "max": max(loads, default=0)},
        "conns_per_message": {"p50": _pct(sends, 50), "p99": _pct(sends, 99),
                              "max": max(sends, default=0)},
        "read_batch_index": {"p50": _pct(batches, 50), "p99": _pct(batches, 99),
                             "max": max(batches, default=0)},
    }


def run_cell(runner: LoadRunner, scenario: str, c: int, args: argparse.Namespace, tmp: Path,
             tag: str) -> dict[str, Any]:
    s = SCENARIOS[scenario]
    trace = tmp / f"trace-{tag}.txt"
    old = os.environ.get(ENV)
    os.environ[ENV] = str(trace)
    try:
        cmd = shlex.split(args.server_cmd) if args.server_cmd else python_cmd()
        server = start_poolinetd("pool", [s], tmp, cmd, args.conf_line,
                                 shlex.split(args.server_args))
    finally:
        if old is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = old
    log_ = array("q")
    try:
        time.sleep(0.5)
        t_from = time.monotonic()
        r = runner("127.0.0.1", server.ports[s.name], c, args.duration, s.payload,
                     expect=s.expect, until_close=s.until_close, warmup=args.warmup,
                     processes=1, fork=False, conn_log=log_)
        t_to = time.monotonic()
    finally:
        server.stop()
    if trace.stat().st_size > MAX_TRACE_BYTES:
        raise SystemExit(f"{trace}: trace larger than {MAX_TRACE_BYTES} bytes")
    times, extras = parse_trace(trace.read_text())
    rows = join(log_, times, extras, s.builtin is not None)
    return {"result": r.to_dict(), "rows": rows,
            "workers": worker_facts(times, extras, t_from + args.warmup, t_to)}


def table(scenario: str, c: int, summary: dict[str, Any], result: dict[str, Any],
          workers: dict[str, Any]) -> str:
    mark = busy_mark(bool(result.get("client_saturated")))
    lines = [f"{scenario} c={c}: {result['conn_per_s']:,.0f}{mark} conn/s, client p50 "
             f"{result['p50_ms']:.2f} p99 {result['p99_ms']:.2f} ms, "
             f"{summary['connections']} connections joined of {result['completed']:.0f}"
             " (all reps)",
             "| stage | p50 | p90 | p99 | max | mean | mean in slowest 1% |",
             "|---|---|---|---|---|---|---|"]
    for stage, d in summary["stages"].items():
        lines.append(f"| {stage} | {d['p50']:.2f} | {d['p90']:.2f} | {d['p99']:.2f} | "
                     f"{d['max']:.1f} | {d['mean']:.2f} | {d['tail_mean']:.2f} |")
    lines.append(f"connections per worker: {workers['per_worker']}; worker load at hand-off "
                 f"{workers['load_at_handoff']}; connections per CONN message "
                 f"{workers['conns_per_message']}; read batch index "
                 f"{workers['read_batch_index']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stages", description=__doc__)
    p.add_argument("--scenario", default="cat", choices=sorted(SCENARIOS))
    p.add_argument("--concurrency", default="64,256")
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--reps", type=int, default=1, help="server starts per cell (rows pooled)")
    p.add_argument("--conf-line", action="append", default=[])
    p.add_argument("--server-cmd", default="")
    p.add_argument("--server-args", default="--no-control")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "stages.json")
    p.add_argument("--label", default="", help="a name for this run in the JSON")
    add_client_flag(p)
    args = p.parse_args(argv)
    runner = pick_runner(args.python_client)
    doc: dict[str, Any] = {"machine": machine_facts(), "label": args.label,
                           "scenario": args.scenario, "conf_lines": args.conf_line,
                           "duration_s": args.duration, "cells": []}
    with tempfile.TemporaryDirectory(prefix="poolinetd-stages-") as tmpname:
        tmp = Path(tmpname)
        os.chmod(tmp, 0o755)
        (tmp / "sleep100.sh").write_text(SLEEP_SCRIPT)
        (tmp / "sleep100.sh").chmod(0o755)
        for c in [int(x) for x in args.concurrency.split(",")]:
            rows: list[dict[str, float]] = []
            results = []
            workers: dict[str, Any] = {}
            for rep in range(args.reps):
                cell = run_cell(runner, args.scenario, c, args, tmp, f"{c}-{rep}")
                rows += cell["rows"]
                results.append(cell["result"])
                workers = cell["workers"]
            summary = summarize(rows)
            med = {k: statistics.median(r[k] for r in results)
                   for k in ("conn_per_s", "p50_ms", "p99_ms")}
            med["completed"] = sum(r["completed"] for r in results)  # rows pool every rep
            med["client_saturated"] = any(r["client_saturated"] for r in results)
            print(table(args.scenario, c, summary, med, workers), flush=True)
            if med["client_saturated"]:
                print(BUSY_LEGEND)
            doc["cells"].append({"concurrency": c, "client": results, "summary": summary,
                                 "workers_last_rep": workers})
    write_results(args.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
