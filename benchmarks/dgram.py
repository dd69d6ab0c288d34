"""Datagram services: built-in echo/udp and a tftpd-style ``wait`` program (touches the OS).

``python -m benchmarks.dgram [--duration 3] [--reps 2] [--concurrency 1,8]``

Servers, alternating per repetition: poolinetd pool mode, openbsd-inetd and
xinetd (when installed, configured as in benchmarks/servers.py). Scenarios:

* ``echo/udp``: the built-in (peers: on 127.0.0.1:7, so skipped if busy);
* ``wait program``: ``dgram udp wait`` running ``tools/udp_once.c`` (built
  with cc), which answers one datagram and exits, so each request
  is one whole wait cycle: the inetd sees the socket readable, launches the
  program on it and stops polling it, the program answers and exits, the
  inetd reaps it and polls again (many transfers in a row, as tftpd gets).

Client: ``c`` UDP sockets in one epoll loop, closed loop: send 64 bytes,
wait for the echo (0.5 s, then counted lost and sent again). Reports
replies/s and round-trip p50/p99 (ms), medians over repetitions, into
``benchmarks/results/dgram.json``. Loopback only; every loop is bounded by
its duration and by a cap on datagrams sent.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.machine import machine_facts, write_results
from benchmarks.servers import (
    READY_TIMEOUT,
    Server,
    ServerError,
    build_tool,
    find_openbsd_inetd,
    find_xinetd,
    launch_poolinetd,
    port_free,
    python_cmd,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PAYLOAD = bytes(range(64))
LOSS_TIMEOUT = 0.5
MAX_SENT = 2_000_000
SCENARIOS = ("echo/udp", "wait program")


def udp_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def udp_bound(ports: list[int], deadline: float) -> bool:
    want = {f"0100007F:{p:04X}" for p in ports}
    while time.monotonic() < deadline:
        with open("/proc/net/udp") as f:
            have = {line.split()[1] for line in f.readlines()[1:]}
        if want <= have:
            return True
        time.sleep(0.05)
    return False


def udp_load(port: int, c: int, duration: float) -> dict[str, float]:
    """Closed-loop datagram echo against 127.0.0.1:port; never sends more than MAX_SENT."""
    ep = select.epoll()
    socks: dict[int, tuple[socket.socket, list[float]]] = {}
    rtts: list[float] = []
    lost = sent = 0
    try:
        for _ in range(c):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setblocking(False)
            s.bind(("127.0.0.1", 0))
            s.connect(("127.0.0.1", port))
            socks[s.fileno()] = (s, [0.0])
            ep.register(s.fileno(), select.EPOLLIN)
        start = time.monotonic()
        end = start + duration
        for s, t in socks.values():
            t[0] = time.monotonic()
            s.send(PAYLOAD)
            sent += 1
        while (now := time.monotonic()) < end and sent < MAX_SENT:
            for fd, _ in ep.poll(0.05):
                s, t = socks[fd]
                try:
                    data = s.recv(2048)
                except OSError:  # ECONNREFUSED from an ICMP port unreachable
                    continue
                now = time.monotonic()
                if data == PAYLOAD:
                    rtts.append(now - t[0])
                if now < end:
                    t[0] = now
                    s.send(PAYLOAD)
                    sent += 1
            now = time.monotonic()
            for s, t in socks.values():
                if now - t[0] > LOSS_TIMEOUT and now < end:
                    lost += 1
                    t[0] = now
                    s.send(PAYLOAD)
                    sent += 1
        elapsed = time.monotonic() - start
    finally:
        for s, _ in socks.values():
            s.close()
        ep.close()
    rtts.sort()

    def pct(q: float) -> float:
        return rtts[min(len(rtts) - 1, int(q / 100 * len(rtts)))] * 1000 if rtts else 0.0

    return {"replies_per_s": len(rtts) / elapsed, "p50_ms": pct(50), "p99_ms": pct(99),
            "lost": lost}


def _start_peer(mode: str, cmd: list[str], tmp: Path, ports: dict[str, int],
                skipped: dict[str, str]) -> Server:
    log_path = tmp / f"{mode}-dgram.out"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, cwd=tmp)
    server = Server(mode, proc, ports, proc.pid, log_path, skipped)
    if not udp_bound(list(ports.values()), time.monotonic() + READY_TIMEOUT):
        server.stop()
        raise ServerError(f"{mode} did not bind {sorted(ports.values())}")
    return server


def start(mode: str, tmp: Path, prog: str) -> Server:
    if mode == "pool":
        text = ("127.0.0.1:0 dgram udp wait nobody internal echo\n"
                f"127.0.0.1:0 dgram udp wait nobody {prog} udp_once\n")
        return launch_poolinetd("pool", text, list(SCENARIOS), tmp, python_cmd(),
                                ["--no-control"], tag="-dgram")
    ports: dict[str, int] = {"wait program": udp_free_port()}
    skipped: dict[str, str] = {}
    if port_free(7):
        ports["echo/udp"] = 7
    else:
        skipped["echo/udp"] = "127.0.0.1:7 busy"
    if mode == "openbsd-inetd":
        binary = find_openbsd_inetd()
        assert binary is not None
        lines = [f"127.0.0.1:{ports['wait program']} dgram udp wait nobody {prog} udp_once"]
        if "echo/udp" in ports:
            lines.append("127.0.0.1:echo dgram udp wait nobody internal")
        conf = tmp / "openbsd-inetd-dgram.conf"
        conf.write_text("\n".join(lines) + "\n")
        return _start_peer(mode, [binary, "-i", "-R", "100000000", str(conf)], tmp, ports,
                           skipped)
    binary = find_xinetd()
    assert binary is not None
    common = ("    socket_type = dgram\n    protocol = udp\n    wait = yes\n    user = nobody\n"
              "    bind = 127.0.0.1\n    flags = NOLIBWRAP\n")
    blocks = ["defaults\n{\n    instances = UNLIMITED\n    per_source = UNLIMITED\n"
              "    cps = 100000000 1\n    log_on_success =\n    log_on_failure =\n}\n",
              f"service bench-wait\n{{\n    type = UNLISTED\n{common}"
              f"    port = {ports['wait program']}\n    server = {prog}\n}}\n"]
    if "echo/udp" in ports:
        blocks.append(f"service echo\n{{\n    type = INTERNAL\n    id = echo-dgram\n{common}}}\n")
    conf = tmp / "xinetd-dgram.conf"
    conf.write_text("\n".join(blocks))
    return _start_peer(mode, [binary, "-dontfork", "-filelog", str(tmp / "xinetd-dgram.log"),
                              "-pidfile", str(tmp / "xinetd-dgram.pid"), "-f", str(conf)],
                       tmp, ports, skipped)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dgram", description=__doc__)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--concurrency", default="1,8")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "dgram.json")
    args = p.parse_args(argv)
    conc = [int(x) for x in args.concurrency.split(",")]
    modes = ["pool"]
    if find_openbsd_inetd():
        modes.append("openbsd-inetd")
    if find_xinetd():
        modes.append("xinetd")
    cells: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="poolinetd-dgram-") as tmpname:
        tmp = Path(tmpname)
        os.chmod(tmp, 0o755)
        prog = build_tool("udp_once", tmp)
        if prog is None:
            raise SystemExit("no C compiler (cc) to build tools/udp_once.c")
        for rep in range(args.reps):
            for mode in modes:
                try:
                    server = start(mode, tmp, prog)
                except (ServerError, OSError) as exc:
                    print(f"{mode}: {exc}", file=sys.stderr)
                    continue
                try:
                    time.sleep(0.5)
                    for scen in SCENARIOS:
                        if scen not in server.ports:
                            continue
                        for c in conc:
                            r = udp_load(server.ports[scen], c, args.duration)
                            cells.append({"rep": rep, "mode": mode, "scenario": scen,
                                          "concurrency": c, **r})
                            print(f"rep {rep + 1} {mode:14} {scen:13} c={c:<3} "
                                  f"{r['replies_per_s']:9,.0f}/s p50 {r['p50_ms']:6.2f} "
                                  f"p99 {r['p99_ms']:7.2f} ms lost {r['lost']}", flush=True)
                finally:
                    server.stop()
    rows = []
    for scen in SCENARIOS:
        for c in conc:
            row: dict[str, Any] = {"scenario": scen, "concurrency": c}
            for mode in modes:
                g = [x for x in cells if (x["mode"], x["scenario"], x["concurrency"]) ==
                     (mode, scen, c)]
                if g:
                    row[mode] = {k: statistics.median(x[k] for x in g)
                                 for k in ("replies_per_s", "p50_ms", "p99_ms", "lost")}
            rows.append(row)
    head = "| scenario | c | " + " | ".join(f"{m} replies/s | {m} p50 | {m} p99" for m in modes)
    lines = [head + " |", "|" + "---|" * (2 + 3 * len(modes))]
    for row in rows:
        vals = []
        for m in modes:
            d = row.get(m)
            vals += ([f"{d['replies_per_s']:,.0f}", f"{d['p50_ms']:.2f}", f"{d['p99_ms']:.2f}"]
                     if d else ["-", "-", "-"])
        lines.append(f"| {row['scenario']} | {row['concurrency']} | " + " | ".join(vals) + " |")
    print("\n".join(lines))
    write_results(args.out, {"machine": machine_facts(), "duration_s": args.duration,
                             "reps": args.reps, "cells": cells, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
