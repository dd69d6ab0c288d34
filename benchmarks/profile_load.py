"""Where the time goes under load, and what an idle worker costs (touches the OS).

``python -m benchmarks.profile_load [--scenarios echo,cat] [-c 64] [--seconds 5]``
starts poolinetd (pool mode, the benchmark config for the scenario),
loads it with the C load generator (``tools/loadgen.c``; ``--python-client``
or no ``cc``: ``benchmarks.loadgen``) at concurrency ``c`` in a separate
process, and after a warmup runs ``py-spy record --idle --nonblocking -f raw``
on the master and on the busiest worker at the same time. The raw stacks are
aggregated into own (leaf) and inclusive (anywhere on the stack) frame
percentages. The load generator's own CPU comes from its JSON report.

``--memory`` instead measures idle workers: poolinetd with one built-in echo
service at ``pool_min=1`` and ``pool_min=4``; per idle worker Rss, Pss and
USS (``Private_Clean + Private_Dirty``) from ``/proc/PID/smaps_rollup``, and
the master's.

Writes ``benchmarks/results/profile.json`` / ``memory.json`` and prints a
summary. Bounded: every child process has a deadline; loopback only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from benchmarks.client import add_client_flag, c_loadgen
from benchmarks.procstat import children_of, proc_stat
from benchmarks.run import SCENARIOS, SLEEP_SCRIPT
from benchmarks.servers import _repo_env, launch_poolinetd, python_cmd, start_poolinetd

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LOADGEN_KEYS = ("conn_per_s", "p50_ms", "p99_ms", "errors", "client_user_s", "client_sys_s",
                "client_cpu_pct", "client_saturated")  # fmt: skip


def aggregate_raw(text: str, top: int = 15) -> dict[str, Any]:
    """py-spy ``-f raw`` (``frame;frame;... count`` per line, root first) to frame shares."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n

    def pct(c: Counter[str]) -> list[tuple[str, float]]:
        return [(f, round(100.0 * v / total, 1)) for f, v in c.most_common(top)] if total else []

    return {"samples": total, "own": pct(own), "inclusive": pct(incl)}


def smaps_rollup(pid: int) -> dict[str, int]:
    """The kB fields of ``/proc/PID/smaps_rollup`` plus ``Uss`` (private clean + dirty)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[2] == "kB":
                    out[parts[0].rstrip(":")] = int(parts[1])
    except OSError:
        return {}
    out["Uss"] = out.get("Private_Clean", 0) + out.get("Private_Dirty", 0)
    return out


def _record(pid: int, seconds: float, out: Path, rate: int) -> subprocess.Popen[bytes]:
    pyspy = shutil.which("py-spy") or "py-spy"
    return subprocess.Popen(
        [pyspy, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", str(rate),
         "-f", "raw", "-o", str(out), "--idle", "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def profile(scenario: str, c: int, seconds: float, rate: int, tmp: Path, client: str | None
            ) -> dict[str, Any]:
    """Profile master and busiest worker under a ``c``-concurrency load of ``scenario``;
    ``client`` is the C load generator's path, or None for benchmarks.loadgen."""
    s = SCENARIOS[scenario]
    server = start_poolinetd("pool", [s], tmp, python_cmd(), [], ["--no-control"])
    try:
        time.sleep(0.5)
        load_s = seconds + 4
        # Both generators take these options; the C one always prints JSON.
        opts = ["--port", str(server.ports[s.name]), "-c", str(c), "-d", str(load_s),
                "-w", "0.5", "--payload-size", "64", "--echo"]  # fmt: skip
        cmd = [client, *opts] if client else [sys.executable, "-m", "benchmarks.loadgen",
                                              *opts, "--json"]  # fmt: skip
        load = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                env=_repo_env())
        time.sleep(1.5)
        kids = children_of(server.pid)
        cpu0 = {k: st.cpu_s for k in kids if (st := proc_stat(k)) is not None}
        time.sleep(0.5)

        def used(k: int) -> float:
            st = proc_stat(k)
            return (st.cpu_s if st is not None else 0.0) - cpu0.get(k, 0.0)

        busy = max(kids, key=used, default=None)
        m_out, w_out = tmp / f"{scenario}-master.raw", tmp / f"{scenario}-worker.raw"
        t0 = {p: proc_stat(p) for p in (server.pid, busy) if p is not None}
        recs = [_record(server.pid, seconds, m_out, rate)]
        if busy is not None:
            recs.append(_record(busy, seconds, w_out, rate))
        for r in recs:
            r.wait(seconds + 30)
        t1 = {p: proc_stat(p) for p in t0}
        out, _ = load.communicate(timeout=load_s + 30)
        lg = orjson.loads(out)
    finally:
        server.stop()

    def cpu_pct(pid: int | None) -> float | None:
        a, b = t0.get(pid) if pid else None, t1.get(pid) if pid else None
        if a is None or b is None:
            return None
        return round(100.0 * (b.cpu_s - a.cpu_s) / seconds, 1)

    def agg(p: Path) -> dict[str, Any]:
        return aggregate_raw(p.read_text()) if p.exists() else {"samples": 0}

    return {
        "scenario": scenario,
        "concurrency": c,
        "seconds": seconds,
        "rate_hz": rate,
        "workers": len(kids),
        "master": {"pid": server.pid, "cpu_pct": cpu_pct(server.pid), **agg(m_out)},
        "worker": {"pid": busy, "cpu_pct": cpu_pct(busy), **agg(w_out)},
        "loadgen": {"client": "c" if client else "python", **{k: lg[k] for k in LOADGEN_KEYS}},
    }


def memory(tmp: Path, pool_mins: tuple[int, ...] = (1, 4)) -> list[dict[str, Any]]:
    """Idle-worker Rss/Pss/Uss with a built-in echo service at each ``pool_min``."""
    out = []
    for n in pool_mins:
        conf = (
            f"127.0.0.1:0 on socktype=stream, wait=no, user=nobody, args=echo, "
            f"pool_min={n}, pool_max=16;\n"
        )
        server = launch_poolinetd(
            "pool", conf, ["echo"], tmp, python_cmd(), ["--no-control"], tag=f"-mem{n}"
        )
        try:
            deadline = time.monotonic() + 10
            while len(children_of(server.pid)) < n and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(2.0)  # settle: boot-time garbage, page faults done
            workers = [smaps_rollup(k) | {"pid": k} for k in children_of(server.pid)]
            master = smaps_rollup(server.pid)
        finally:
            server.stop()
        keys = ("Rss", "Pss", "Uss", "Shared_Clean", "Shared_Dirty", "Private_Clean",
                "Private_Dirty", "Anonymous")  # fmt: skip
        out.append({
            "pool_min": n,
            "workers": [{k: w.get(k, 0) for k in ("pid", *keys)} for w in workers],
            "master": {k: master.get(k, 0) for k in keys},
            "worker_pss_kb_mean": round(sum(w.get("Pss", 0) for w in workers) / len(workers), 1)
            if workers else None,
            "worker_uss_kb_mean": round(sum(w.get("Uss", 0) for w in workers) / len(workers), 1)
            if workers else None,
        })  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_load")
    p.add_argument("--scenarios", default="echo,cat")
    p.add_argument("-c", "--concurrency", type=int, default=64)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rate", type=int, default=200)
    p.add_argument("--memory", action="store_true", help="idle-worker memory instead")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    add_client_flag(p)
    a = p.parse_args(argv)
    client = None if a.python_client or a.memory else c_loadgen()
    if not a.python_client and not a.memory and client is None:
        print("load generator: Python (benchmarks/loadgen.py): no C build", file=sys.stderr)
    a.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="poolinetd-prof-") as tmpname:
        tmp = Path(tmpname)
        os.chmod(tmp, 0o755)
        (tmp / "sleep100.sh").write_text(SLEEP_SCRIPT)
        (tmp / "sleep100.sh").chmod(0o755)
        if a.memory:
            doc: Any = memory(tmp)
            (a.out / "memory.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
        else:
            doc = [
                profile(s, a.concurrency, a.seconds, a.rate, tmp, client)
                for s in a.scenarios.split(",")
                if s
            ]
            (a.out / "profile.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
