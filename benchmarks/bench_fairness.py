"""One worker, an echo blaster and an interactive client: is the client still served promptly?

    python benchmarks/bench_fairness.py [--trips N] [--blasters B] [--pythonpath DIR] [--label L]

Starts a real poolinetd (pool mode, one echo service, --pool-max 1 so every
connection lands on the same worker), then measures the round-trip time of
N small echoes from an interactive client: first alone, then while B
blaster processes each send and read back 1 MiB chunks as fast as they can
on the same worker. Prints a table and writes
benchmarks/results/fairness[-LABEL].json. ``--pythonpath`` runs the server
from another checkout (e.g. an older commit exported with ``git archive``)
to compare. A benchmark, not a test: numbers vary by machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"

# Sends 1 MiB chunks until its stdin closes, reading the echo back in a thread;
# then half-closes, drains, and prints "sent received ok seconds".
BLASTER = r"""
import socket, sys, threading, time
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)  # keep the server's input full
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # and its output flowing
sock.connect(("127.0.0.1", int(sys.argv[1])))
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
got = [0, True]
def recv():
    while data := sock.recv(1 << 20):
        got[0] += len(data)
        got[1] = got[1] and data.count(b"b") == len(data)
reader = threading.Thread(target=recv)
reader.start()
sys.stdout.write("started\n"); sys.stdout.flush()
chunk, sent, start = b"b" * (1 << 20), 0, time.monotonic()
while not stop.is_set():
    sock.sendall(chunk)
    sent += len(chunk)
sock.shutdown(socket.SHUT_WR)
reader.join()
print(sent, got[0], got[1], time.monotonic() - start)
"""


def start_server(conf: Path, workdir: Path,
                 pythonpath: str | None) -> tuple[subprocess.Popen[bytes], int]:
    rfd, wfd = os.pipe()
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    cmd = [sys.executable, "-m", "poolinetd", "run", "-c", str(conf), "--mode", "pool",
           "--pool-max", "1", "--pool-min", "1", "--ready-fd", str(wfd),
           "--control", str(workdir / "ctl.sock")]
    with open(workdir / "log", "wb") as logf:
        proc = subprocess.Popen(cmd, pass_fds=(wfd,), stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=subprocess.STDOUT, cwd=pythonpath or REPO, env=env)
    os.close(wfd)
    data = b""
    deadline = time.monotonic() + 30
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([rfd], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(rfd, 65536) if ready else b""
        if not chunk:
            proc.kill()
            raise SystemExit(f"server not ready:\n{(workdir / 'log').read_text()}")
        data += chunk
    os.close(rfd)
    port = orjson.loads(data)["listeners"][0]["port"]
    return proc, int(port)


def round_trips(port: int, trips: int) -> list[float]:
    """Seconds per 64-byte echo round trip on one connection."""
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(trips):
            msg = b"%063d" % i + b"\n"
            start = time.perf_counter()
            sock.sendall(msg)
            got = b""
            while len(got) < len(msg):
                data = sock.recv(64)
                if not data:
                    raise SystemExit("echo connection closed")
                got += data
            out.append(time.perf_counter() - start)
            assert got == msg
    return out


def summary(times: list[float]) -> dict[str, float]:
    ms = sorted(t * 1000 for t in times)
    return {"p50_ms": round(statistics.median(ms), 3),
            "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 3),
            "max_ms": round(ms[-1], 3), "total_s": round(sum(ms) / 1000, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--trips", type=int, default=200)
    ap.add_argument("--blasters", type=int, default=1)
    ap.add_argument("--pythonpath", help="run the server from this tree")
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    user = "nobody" if os.geteuid() == 0 else __import__("pwd").getpwuid(os.getuid()).pw_name
    with tempfile.TemporaryDirectory(prefix="bench-fairness-") as tmp:
        workdir = Path(tmp)
        conf = workdir / "inetd.conf"
        conf.write_text(f"127.0.0.1:0 stream tcp nowait {user} internal echo\n")
        proc, port = start_server(conf, workdir, args.pythonpath)
        try:
            round_trips(port, 10)  # warm up
            alone = round_trips(port, args.trips)
            blasters = [subprocess.Popen([sys.executable, "-c", BLASTER, str(port)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                        for _ in range(args.blasters)]
            for b in blasters:
                assert b.stdout is not None and b.stdout.readline() == b"started\n"
            time.sleep(0.5)  # let them reach full speed
            start = time.monotonic()
            loaded = round_trips(port, args.trips)
            elapsed = time.monotonic() - start
            rate = 0.0
            for b in blasters:
                out, _ = b.communicate(b"", timeout=120)
                sent, received, ok, seconds = out.split()
                assert ok == b"True" and sent == received, out
                rate += int(sent) / (1 << 20) / float(seconds)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    result = {
        "label": args.label or "current", "trips": args.trips, "blasters": args.blasters,
        "alone": summary(alone), "with_blaster": summary(loaded),
        "loaded_elapsed_s": round(elapsed, 3),
        "blaster_mib_per_s": round(rate, 1),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "kernel": platform.release()},
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"{'client':<14}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}{'total s':>10}")
    for name in ("alone", "with_blaster"):
        s = result[name]
        assert isinstance(s, dict)
        print(f"{name:<14}{s['p50_ms']:>10}{s['p99_ms']:>10}{s['max_ms']:>10}{s['total_s']:>10}")
    print(f"echo throughput of the blasters: {result['blaster_mib_per_s']} MiB/s")
    RESULTS.mkdir(exist_ok=True)
    name = f"fairness-{args.label}.json" if args.label else "fairness.json"
    (RESULTS / name).write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
