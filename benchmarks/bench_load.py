"""Config load time against config size, for the shapes that used to be quadratic or worse.

    python benchmarks/bench_load.py [--scale 1.0] [--runs 3]

Shapes (issue 13 item 7): entries on distinct ports; entries on one port
with different addresses (overlap detection); one entry with many ``env=``
values; a defaults env shared by many entries; include fan-out (each file
includes the next ten times); many small include files. Each shape is
loaded at growing sizes through ``resolve.load_file`` (real files, fake
name lookups so NSS and DNS are not measured); the table shows seconds and
microseconds per unit, which stay flat when growth is linear. Writes
benchmarks/results/load.json. A benchmark, not a test: numbers vary by machine.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_parse import lookups
from poolinetd.config.resolve import load_file
from poolinetd.config.spec import Options

RESULTS = Path(__file__).resolve().parent / "results" / "load.json"
Writer = Callable[[Path, int], Path]


def distinct_ports(d: Path, n: int) -> Path:
    f = d / "main.conf"
    f.write_text("".join(f"{10_000 + i} stream tcp nowait nobody internal echo\n"
                         for i in range(n)))
    return f


def one_port_many_addresses(d: Path, n: int) -> Path:
    f = d / "main.conf"
    f.write_text("".join(
        f"127.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}:7000 stream tcp nowait nobody "
        "internal echo\n" for i in range(1, n + 1)))
    return f


def env_values(d: Path, n: int) -> Path:
    f = d / "main.conf"
    env = " ".join(f"V{i}=x" for i in range(n))
    f.write_text(f"7000 on protocol=tcp, wait=no, user=nobody, exec=/bin/cat, args=cat, "
                 f"env={env};\n")
    return f


def shared_defaults_env(d: Path, n: int) -> Path:
    f = d / "main.conf"
    env = " ".join(f"D{i}=x" for i in range(100))
    f.write_text(f"defaults on env={env};\n" + "".join(
        f"{10_000 + i} stream tcp nowait nobody internal echo\n" for i in range(n)))
    return f


def include_fan_out(d: Path, depth: int) -> Path:
    for level in range(depth):
        lines = [f"{7000 + level} stream tcp nowait nobody internal echo"]
        if level + 1 < depth:
            lines += [f".include f{level + 1}.conf"] * 10
        (d / f"f{level}.conf").write_text("\n".join(lines) + "\n")
    return d / "f0.conf"


def many_include_files(d: Path, n: int) -> Path:
    (d / "inc").mkdir()
    for i in range(n):
        (d / "inc" / f"{i:05d}.conf").write_text(
            f"{10_000 + i} stream tcp nowait nobody internal echo\n")
    f = d / "main.conf"
    f.write_text('.include "inc/*.conf"\n')
    return f


SHAPES: list[tuple[str, str, Writer, list[int]]] = [
    ("distinct ports", "entries", distinct_ports, [2_500, 5_000, 10_000, 20_000]),
    ("one port, many addresses", "entries", one_port_many_addresses,
     [2_500, 5_000, 10_000, 20_000]),
    ("env= values in one entry", "values", env_values, [12_500, 25_000, 50_000, 100_000]),
    ("100-var defaults env", "entries", shared_defaults_env, [2_500, 5_000, 10_000, 20_000]),
    ("include fan-out x10", "depth", include_fan_out, [3, 4, 5, 6]),
    ("include files", "files", many_include_files, [128, 256, 512, 1_000]),
]


def measure(writer: Writer, size: int, runs: int) -> tuple[float, int, int]:
    """Median seconds of ``runs`` loads, the services and the diagnostics of one."""
    lk = lookups()
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        path = writer(Path(tmp), size)
        times = []
        loaded = None
        for _ in range(runs):
            start = time.perf_counter()
            loaded = load_file(str(path), Options(), lk)
            times.append(time.perf_counter() - start)
        assert loaded is not None
        return statistics.median(times), len(loaded.services), len(loaded.diagnostics)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every size (not depth)")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    rows = []
    print(f"{'shape':<28} {'unit':<8} {'size':>8} {'seconds':>9} {'us/unit':>9} "
          f"{'services':>9} {'diags':>6}")
    for name, unit, writer, sizes in SHAPES:
        for size in sizes:
            n = size if unit == "depth" else max(1, int(size * args.scale))
            seconds, services, diags = measure(writer, n, args.runs)
            per = seconds / n * 1e6
            print(f"{name:<28} {unit:<8} {n:>8} {seconds:>9.3f} {per:>9.1f} {services:>9} "
                  f"{diags:>6}")
            rows.append({"shape": name, "unit": unit, "size": n, "seconds": seconds,
                         "us_per_unit": per, "services": services, "diagnostics": diags})
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    doc = {"python": platform.python_version(), "machine": platform.machine(),
           "runs": args.runs, "rows": rows}
    RESULTS.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
