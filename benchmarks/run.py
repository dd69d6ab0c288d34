"""Benchmark runner: poolinetd pool vs classic (and peers) on the same scenarios (touches the OS).

``python -m benchmarks [--quick] [--duration S] [--reps N] [--scenarios a,b]
[--concurrency 1,16] [--peers/--no-peers]`` runs, for each repetition, every
server in turn -- pool, classic, then the installed peers (xinetd,
openbsd-inetd) -- so the modes alternate and drift hits all of them alike.
Each server is started once per repetition with one listener per scenario,
measured idle (RSS/PSS and CPU of master and workers, ``procstat``), loaded
with every scenario x concurrency cell (the C load generator
``tools/loadgen.c`` through ``benchmarks.client``; ``--python-client`` or no
``cc``: ``loadgen.run_load``), measured
again, and stopped. Medians over the repetitions go into a table printed on
stdout and written to ``benchmarks/results/latest.md``; every single
measurement plus machine facts go to ``latest.json`` (orjson); with
matplotlib importable (the ``bench`` extra) a plot goes to ``latest.png``.

Scenarios: ``echo`` (built-in, 64-byte payload, client closes after the
echo), ``cat`` (launched ``/bin/cat`` as an echo server, same payload),
``daytime`` (built-in, no payload, read until the server closes) and
``sleep100`` (a launched ``/bin/sh`` script that sleeps 0.1 s then prints
``ok``: a connection holds a process for 100 ms, which shows pool growth).

Exit status: 0 when every server ran, 1 when a poolinetd mode failed to start
(the other columns are still written), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from benchmarks import growth
from benchmarks.client import (
    BUSY_LEGEND,
    BUSY_MARK,
    LoadRunner,
    add_client_flag,
    busy_mark,
    client_name,
    pick_runner,
)
from benchmarks.loadgen import LoadResult, pattern_payload
from benchmarks.machine import machine_facts
from benchmarks.procstat import TreeStat, snapshot
from benchmarks.servers import (
    C_REFERENCE,
    C_SPAWN,
    C_SPAWN_SCENARIO,
    Scenario,
    Server,
    ServerError,
    build_c_reference,
    build_tool,
    find_openbsd_inetd,
    find_xinetd,
    python_cmd,
    start_c_reference,
    start_c_spawn,
    start_openbsd_inetd,
    start_poolinetd,
    start_xinetd,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ECHO_PAYLOAD = pattern_payload(64)
SLEEP_SCRIPT = "#!/bin/sh\n# benchmark: a launched program that lives 100 ms\nsleep 0.1\necho ok\n"

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("echo", "built-in echo, 64 B", "echo", (), ECHO_PAYLOAD, ECHO_PAYLOAD, False),
        Scenario("cat", "launched /bin/cat, 64 B", None, ("/bin/cat",), ECHO_PAYLOAD,
                 ECHO_PAYLOAD, False),
        Scenario("daytime", "built-in daytime", "daytime", (), b"", None, True),
        Scenario("sleep100", "launched sh: sleep 0.1; echo ok", None,
                 ("/bin/sh", "{tmp}/sleep100.sh"), b"", b"ok\n", True),
    )
}  # fmt: skip

POOL_MODES = ("pool", "classic")
# Cells where the client connects from 127.0.0.1 only instead of spreading
# over 127.0.1.x sources (see loadgen). xinetd 2.3.15's internal stream echo
# stalls (the forked child never reads) after a few dozen connections from
# many distinct source addresses; from one source it works.
SINGLE_SOURCE = {("xinetd", "echo")}
PEERS = ("xinetd", "openbsd-inetd", C_REFERENCE, C_SPAWN)


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        return [kind(x) for x in text.split(",") if x.strip()]

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="poolinetd pool vs classic mode (and xinetd/openbsd-inetd) on loopback.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 s windows, concurrency 1,64, 1 repetition",
    )
    p.add_argument("--duration", type=float, default=None, help="measured seconds per cell (3)")
    p.add_argument("--warmup", type=float, default=None, help="unmeasured seconds per cell (0.5)")
    p.add_argument("--reps", type=int, default=None, help="repetitions, medians taken (3)")
    p.add_argument(
        "--scenarios",
        type=_csv(str),
        default=list(SCENARIOS),
        help=f"comma list from {','.join(SCENARIOS)}, plus 'growth' for the pool growth "
        "burst (benchmarks/growth.py: 64 and 128 held connections, echo and cat)",
    )
    p.add_argument("--concurrency", type=_csv(int), default=None, help="comma list (1,16,64,256)")
    p.add_argument(
        "--peers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run installed xinetd / openbsd-inetd, and the C reference (needs cc)",
    )
    p.add_argument(
        "--modes",
        type=_csv(str),
        default=list(POOL_MODES),
        help="poolinetd modes to run (pool,classic)",
    )
    p.add_argument("--processes", type=int, default=None,
                   help="load generator threads (C) or processes (Python)")
    add_client_flag(p)
    p.add_argument(
        "--server-cmd",
        default=None,
        help="command that starts poolinetd (default: this python -m poolinetd)",
    )
    p.add_argument(
        "--server-args",
        default="--no-control",
        help="extra poolinetd arguments (default: --no-control, so a benchmark "
        "never takes the system control socket)",
    )
    p.add_argument(
        "--conf-line",
        action="append",
        default=[],
        help="extra line at the top of the poolinetd config, e.g. "
        "'defaults on pool_min=4, pool_max=16;' (repeatable)",
    )
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    p.add_argument("--no-plot", action="store_true")
    return p  # fmt: skip


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def _start(mode: str, scenarios: list[Scenario], tmp: Path, args: argparse.Namespace) -> Server:
    if mode in POOL_MODES:
        cmd = shlex.split(args.server_cmd) if args.server_cmd else python_cmd()
        extra_args = shlex.split(args.server_args)
        return start_poolinetd(mode, scenarios, tmp, cmd, args.conf_line, extra_args)
    if mode == C_REFERENCE:
        binary = build_c_reference(tmp)
        assert binary is not None
        return start_c_reference(binary, scenarios, tmp)
    if mode == C_SPAWN:
        binary = build_tool("cspawn", tmp)
        assert binary is not None
        return start_c_spawn(binary, scenarios, tmp)
    if mode == "xinetd":
        binary = find_xinetd()
        assert binary is not None
        return start_xinetd(binary, scenarios, tmp)
    binary = find_openbsd_inetd()
    assert binary is not None
    return start_openbsd_inetd(binary, scenarios, tmp)


def _settle(pid: int, limit: float = 5.0) -> None:
    """Give a server time to reap children and refill pools (bounded) before a snapshot."""
    deadline = time.monotonic() + limit
    prev = -1
    while time.monotonic() < deadline:
        n = len(snapshot(pid).workers)
        if n == prev:
            return
        prev = n
        time.sleep(0.3)


def run(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """Run every repetition, mode, scenario and concurrency; return the results document."""
    scenarios = [SCENARIOS[n] for n in args.scenarios]
    modes = list(args.modes)
    skipped_modes: dict[str, str] = {}
    cells: list[dict[str, Any]] = []
    servers: list[dict[str, Any]] = []
    failed_pool_mode = False
    runner = pick_runner(args.python_client, log)
    with tempfile.TemporaryDirectory(prefix="poolinetd-bench-") as tmpname:
        tmp = Path(tmpname)
        if args.peers:
            for peer, finder in (("xinetd", find_xinetd), ("openbsd-inetd", find_openbsd_inetd)):
                if finder() is not None:
                    modes.append(peer)
                else:
                    skipped_modes[peer] = "not installed"
            if any(s.builtin in ("echo", "daytime") for s in scenarios):
                if build_c_reference(tmp) is not None:
                    modes.append(C_REFERENCE)
                else:
                    skipped_modes[C_REFERENCE] = "no C compiler (cc) to build tools/cecho.c"
            if any(s.name == C_SPAWN_SCENARIO for s in scenarios):
                if build_tool("cspawn", tmp) is not None:
                    modes.append(C_SPAWN)
                else:
                    skipped_modes[C_SPAWN] = "no C compiler (cc) to build tools/cspawn.c"
        # Launched programs run as nobody: they must be able to reach the script.
        os.chmod(tmp, 0o755)
        script = tmp / "sleep100.sh"
        script.write_text(SLEEP_SCRIPT)
        script.chmod(0o755)
        for rep in range(args.reps):
            for mode in modes:
                log(f"rep {rep + 1}/{args.reps} {mode}: starting")
                try:
                    server = _start(mode, scenarios, tmp, args)
                except (ServerError, OSError) as exc:
                    log(f"  {mode} failed to start: {exc}")
                    skipped_modes[mode] = str(exc)
                    failed_pool_mode |= mode in POOL_MODES
                    continue
                try:
                    _settle(server.pid)
                    idle = snapshot(server.pid)
                    for s in scenarios:
                        if s.name not in server.ports:
                            continue
                        for c in args.concurrency:
                            r = _cell(runner, server, s, c, args)
                            cells.append(
                                {"rep": rep, "mode": mode, "scenario": s.name, **r.to_dict()}
                            )
                            sat = f" client busy {BUSY_MARK}" if r.client_saturated else ""
                            log(
                                f"  {s.name:8} c={c:<4} {r.conn_per_s:9,.0f}/s "
                                f"p50 {r.p50_ms:7.2f} p99 {r.p99_ms:8.2f} ms "
                                f"err {r.error_total} cli {r.client_cpu_pct:.0f}%{sat}"
                            )
                    _settle(server.pid)
                    after = snapshot(server.pid)
                finally:
                    status = server.stop()
                record = _server_record(rep, server, idle, after, status)
                if any(c["mode"] == mode and c["rep"] == rep and not c["completed"]
                       for c in cells):
                    # A cell served nothing: keep what the server said (the temporary
                    # directory with its log goes away with the run).
                    with contextlib.suppress(OSError):
                        record["log_tail"] = server.log_path.read_text(errors="replace")[-8000:]
                servers.append(record)
    return {
        "machine": machine_facts(),
        "settings": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "reps": args.reps,
            "concurrency": args.concurrency,
            "scenarios": {s.name: s.title for s in scenarios},
            "modes": modes,
            "skipped_modes": skipped_modes,
            "conf_lines": args.conf_line,
            "server_args": args.server_args,
            "loadgen_processes": args.processes,
            "client": client_name(runner),
        },
        "cells": cells,
        "servers": servers,
        "summary": summarize(cells, servers),
        "failed_pool_mode": failed_pool_mode,
    }


def _cell(
    runner: LoadRunner, server: Server, s: Scenario, c: int, args: argparse.Namespace
) -> LoadResult:
    return runner(
        "127.0.0.1",
        server.ports[s.name],
        c,
        args.duration,
        s.payload,
        expect=s.expect,
        until_close=s.until_close,
        warmup=args.warmup,
        processes=args.processes,
        source_addresses=0 if (server.mode, s.name) in SINGLE_SOURCE else 64,
    )


def _server_record(
    rep: int, server: Server, idle: TreeStat, after: TreeStat, status: int | None
) -> dict[str, Any]:
    def cpu(t: TreeStat) -> tuple[float, float, float]:
        m = t.master
        return (m.cpu_s if m else 0.0, m.children_cpu_s if m else 0.0, t.workers_cpu_s)

    (m0, mc0, w0), (m1, mc1, w1) = cpu(idle), cpu(after)
    return {
        "rep": rep,
        "mode": server.mode,
        "pid": server.pid,
        "exit_status": status,
        "skipped_scenarios": server.skipped,
        "idle": idle.to_dict(),
        "after_load": after.to_dict(),
        # CPU spent under load: master itself, its reaped children (classic
        # forks, exited workers) and live workers.
        "load_cpu_s": {
            "master": m1 - m0,
            "master_reaped_children": mc1 - mc0,
            "workers_live": max(0.0, w1 - w0),
        },
    }


def summarize(cells: list[dict[str, Any]], servers: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per (scenario, concurrency, mode) and per-mode memory medians."""
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for cell in cells:
        groups.setdefault((cell["scenario"], cell["concurrency"], cell["mode"]), []).append(cell)
    rows = []
    for (scen, c, mode), g in sorted(groups.items()):
        errors: dict[str, int] = {}
        for cell in g:
            for k, v in cell["errors"].items():
                errors[k] = errors.get(k, 0) + v
        rows.append(
            {
                "scenario": scen,
                "concurrency": c,
                "mode": mode,
                "reps": len(g),
                "conn_per_s": _median([x["conn_per_s"] for x in g]),
                "p50_ms": _median([x["p50_ms"] for x in g]),
                "p99_ms": _median([x["p99_ms"] for x in g]),
                "max_ms": max(x["max_ms"] for x in g),
                "errors": errors,
                "client_saturated": any(x["client_saturated"] for x in g),
                "client_cpu_pct": _median([x["client_cpu_pct"] for x in g]),
            }
        )
    memory: dict[str, dict[str, float]] = {}
    for mode in dict.fromkeys(s["mode"] for s in servers):
        ss = [s for s in servers if s["mode"] == mode]

        def med(phase: str, key: str, ss: list[dict[str, Any]] = ss) -> float:
            # rss_kb/pss_kb are the master's; the other keys are tree totals.
            vals = []
            for s in ss:
                d = s[phase]
                src = d["master"] if key in ("rss_kb", "pss_kb") else d
                vals.append(float(src.get(key, 0)) if src else 0.0)
            return _median(vals)

        memory[mode] = {
            "master_rss_kb_idle": med("idle", "rss_kb"),
            "master_pss_kb_idle": med("idle", "pss_kb"),
            "workers_idle": med("idle", "workers_count"),
            "pss_per_idle_worker_kb": med("idle", "pss_per_worker_kb"),
            "workers_pss_kb_idle": med("idle", "workers_pss_kb"),
            "master_rss_kb_after": med("after_load", "rss_kb"),
            "workers_after": med("after_load", "workers_count"),
            "workers_pss_kb_after": med("after_load", "workers_pss_kb"),
            "master_cpu_s_load": _median([s["load_cpu_s"]["master"] for s in ss]),
            "reaped_children_cpu_s_load": _median(
                [s["load_cpu_s"]["master_reaped_children"] for s in ss]
            ),
            "workers_cpu_s_load": _median([s["load_cpu_s"]["workers_live"] for s in ss]),
        }
    return {"rows": rows, "memory": memory}


_CLIENTS = {"c": "C (tools/loadgen.c)", "python": "Python (loadgen.py)"}


def _fmt_rate(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _fmt_ms(x: float | None) -> str:
    return "-" if x is None else (f"{x:.2f}" if x < 100 else f"{x:.0f}")


def markdown(doc: dict[str, Any]) -> str:
    """The results table (medians), memory table and machine line as Markdown."""
    rows = doc["summary"]["rows"]
    by = {(r["scenario"], r["concurrency"], r["mode"]): r for r in rows}
    modes = [m for m in doc["settings"]["modes"] if any(r["mode"] == m for r in rows)]
    peers = [m for m in modes if m not in POOL_MODES]
    m = doc["machine"]
    st = doc["settings"]
    out = [
        f"Run {m['date']} on {m['cpu_model']}, {m['nproc']} cores, Linux {m['kernel']}, "
        f"Python {m['python']}; {st['reps']} rep(s), {st['duration_s']:g} s window after "
        f"{st['warmup_s']:g} s warmup; medians; load generator: "
        f"{_CLIENTS.get(st.get('client', 'python'), st.get('client'))}. conn/s = completed "
        "connections per second, p50/p99 = connection latency (connect to close) in ms.",
        "",
    ]
    head = ["scenario", "c", "pool conn/s", "pool p50", "pool p99", "classic conn/s",
            "classic p50", "classic p99", "pool/classic"]  # fmt: skip
    for peer in peers:
        head += [f"{peer} conn/s", f"{peer} p50", f"{peer} p99", f"pool/{peer}"]
    head.append("errors")
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "|".join("---" for _ in head) + "|")
    for scen in st["scenarios"]:
        for c in st["concurrency"]:
            cells = {mode: by.get((scen, c, mode)) for mode in modes}
            if not any(cells.values()):
                continue

            def g(mode: str, key: str, cells: dict[str, Any] = cells) -> float | None:
                r = cells.get(mode)
                return None if r is None else float(r[key])

            pool_rate = g("pool", "conn_per_s")

            def ratio(other: str, pool_rate: float | None = pool_rate) -> str:
                o = g(other, "conn_per_s")
                return "-" if pool_rate is None or not o else f"{pool_rate / o:.2f}x"

            def rate(mode: str, cells: dict[str, Any] = cells) -> str:
                r = cells.get(mode)
                mark = busy_mark(bool(r and r["client_saturated"]))
                return _fmt_rate(g(mode, "conn_per_s")) + mark

            line = [scen, str(c)]
            for mode in POOL_MODES:
                line += [rate(mode), _fmt_ms(g(mode, "p50_ms")), _fmt_ms(g(mode, "p99_ms"))]
            line.append(ratio("classic"))
            for peer in peers:
                line += [rate(peer), _fmt_ms(g(peer, "p50_ms")), _fmt_ms(g(peer, "p99_ms")),
                         ratio(peer)]  # fmt: skip
            errs = []
            for mode, r in cells.items():
                if r and r["errors"]:
                    errs.append(f"{mode}: " + ", ".join(f"{k}={v}" for k, v in r["errors"].items()))
            line.append("; ".join(errs) or "0")
            out.append("| " + " | ".join(line) + " |")
    if any(r["client_saturated"] for r in rows):
        out += ["", BUSY_LEGEND]
    out += ["", "Memory (kB, medians) and server CPU under load (s, all cells of one rep):", ""]
    mh = ["mode", "master RSS idle", "master PSS idle", "workers idle", "PSS/idle worker",
          "master RSS after", "workers after", "workers PSS after", "master CPU",
          "reaped children CPU", "live workers CPU"]  # fmt: skip
    out.append("| " + " | ".join(mh) + " |")
    out.append("|" + "|".join("---" for _ in mh) + "|")
    for mode, mem in doc["summary"]["memory"].items():
        vals = [mem["master_rss_kb_idle"], mem["master_pss_kb_idle"], mem["workers_idle"],
                mem["pss_per_idle_worker_kb"], mem["master_rss_kb_after"], mem["workers_after"],
                mem["workers_pss_kb_after"]]  # fmt: skip
        cpu = [mem["master_cpu_s_load"], mem["reaped_children_cpu_s_load"],
               mem["workers_cpu_s_load"]]  # fmt: skip
        out.append(
            "| "
            + " | ".join([mode, *(f"{v:,.0f}" for v in vals), *(f"{v:.2f}" for v in cpu)])
            + " |"
        )
    if st["skipped_modes"]:
        out += ["", "Not run: " + "; ".join(f"{k}: {v}" for k, v in st["skipped_modes"].items())]
    # A peer skips a built-in when its well-known port is busy: say so, never a silent "-".
    skipped = sorted(
        {(srv["mode"], scen, why) for srv in doc["servers"]
         for scen, why in srv["skipped_scenarios"].items()}
    )  # fmt: skip
    if skipped:
        out += ["", "Skipped cells: " + "; ".join(f"{m} {sc}: {w}" for m, sc, w in skipped)]
    return "\n".join(out) + "\n"


def plot(doc: dict[str, Any], path: Path) -> bool:
    """Throughput and p99 against concurrency per scenario; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = doc["summary"]["rows"]
    scens = [s for s in doc["settings"]["scenarios"] if any(r["scenario"] == s for r in rows)]
    if not scens:
        return False
    fig, axes = plt.subplots(2, len(scens), figsize=(4.2 * len(scens), 7), squeeze=False)
    for j, scen in enumerate(scens):
        for mode in doc["settings"]["modes"]:
            pts = sorted(
                (r["concurrency"], r["conn_per_s"], r["p99_ms"])
                for r in rows
                if r["scenario"] == scen and r["mode"] == mode
            )
            if not pts:
                continue
            xs = [p[0] for p in pts]
            axes[0][j].plot(xs, [p[1] for p in pts], marker="o", label=mode)
            axes[1][j].plot(xs, [p[2] for p in pts], marker="o", label=mode)
        axes[0][j].set_title(doc["settings"]["scenarios"][scen], fontsize=9)
        axes[0][j].set_ylabel("connections/s")
        axes[1][j].set_ylabel("p99 latency, ms")
        for i in (0, 1):
            axes[i][j].set_xscale("log", base=2)
            axes[i][j].set_xlabel("concurrency")
            axes[i][j].grid(True, alpha=0.3)
        axes[1][j].set_yscale("log")
        axes[0][j].legend(fontsize=7)
    m = doc["machine"]
    fig.suptitle(
        f"poolinetd benchmarks {m['date']} - {m['cpu_model']}, {m['nproc']} cores", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (see the module docstring for the exit status)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    want_growth = "growth" in args.scenarios
    args.scenarios = [s for s in args.scenarios if s != "growth"]
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}")
    bad_modes = [m for m in args.modes if m not in POOL_MODES]
    if bad_modes:
        parser.error(f"unknown mode(s) {bad_modes}")
    if args.duration is None:
        args.duration = 1.0 if args.quick else 3.0
    if args.warmup is None:
        args.warmup = 0.3 if args.quick else 0.5
    if args.reps is None:
        args.reps = 1 if args.quick else 3
    if args.concurrency is None:
        args.concurrency = [1, 64] if args.quick else [1, 16, 64, 256]
    if args.reps < 1 or args.duration <= 0 or not args.concurrency:
        parser.error("need --reps >= 1, --duration > 0 and at least one concurrency")
    if not args.scenarios and not want_growth:
        parser.error("no scenario to run")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    status = 0
    if args.scenarios:
        status = _main_scenarios(args, log)
    if want_growth:
        gargs = growth.build_parser().parse_args(
            ["--reps", str(args.reps), "--out", str(args.out)]
            + (["--server-cmd", args.server_cmd] if args.server_cmd else [])
        )
        gdoc = growth.run(gargs, log)
        print(growth.write(gdoc, args.out))
        log(f"growth results: {args.out / 'growth.json'}, {args.out / 'growth.md'}")
        status = max(status, 1 if gdoc["failures"] else 0)
    return status


def _main_scenarios(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    doc = run(args, log)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_bytes(
        orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)
    )
    md = markdown(doc)
    (args.out / "latest.md").write_text(md)
    print(md)
    if not args.no_plot and plot(doc, args.out / "latest.png"):
        log(f"plot: {args.out / 'latest.png'}")
    log(f"results: {args.out / 'latest.json'}, {args.out / 'latest.md'}")
    return 1 if doc["failed_pool_mode"] else 0


if __name__ == "__main__":
    sys.exit(main())
