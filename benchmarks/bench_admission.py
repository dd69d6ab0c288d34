"""Per-connection cost of admission (netmatch + sourcetrack) and the tracker's memory at its cap.

    python benchmarks/bench_admission.py [--sources N] [--runs R]

Measures, in ns per connection (median of R runs):
  * tracker: check + started + ended, with N distinct sources (cap N, and cap N/10 so
    every new source evicts one), with one hot source (admitted; blocked), no limits;
  * the whole path a listener runs: parse_ip + only_from/no_access + source_key + tracker;
  * parse_ip against ipaddress.ip_address; the matcher with 1, 100 and 10,000 entries of random
    prefix lengths (IPv4 and IPv6, hits and misses) against a linear scan of ipaddress networks;
and the tracker's memory (tracemalloc) at its cap, per source.

Writes benchmarks/results/bench_admission-<date>.json. A benchmark, not a test:
numbers vary by machine. Pure code only: no sockets, no processes.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import ipaddress
import platform
import random
import socket
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from poolinetd.admission.sources import NO_LIMITS, SourceLimits, Tracker
from poolinetd.net.netmatch import (
    AddressList,
    Network,
    access_reason,
    parse_cidr,
    parse_ip,
    source_key,
    source_key_addr,
)

Row = dict[str, Any]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
LIMITS = SourceLimits(max_child_per_ip=4, max_cpm_per_ip=60, block_time=60.0)
TICK = 1e-5  # fake clock step per connection: 100,000 connections per second


def v4_peers(n: int) -> list[str]:
    """n distinct IPv4 peers, 10.0.0.0/8 and up, in a shuffled order."""
    peers = [str(ipaddress.IPv4Address(0x0A000000 + i)) for i in range(n)]
    random.Random(1).shuffle(peers)
    return peers


def median_ns(fn: Callable[[], int], runs: int) -> float:
    """fn runs a loop and returns how many operations it did; median ns per operation."""
    times = []
    for _ in range(runs):
        gc.collect()
        start = time.perf_counter()
        ops = fn()
        times.append((time.perf_counter() - start) / ops * 1e9)
    return statistics.median(times)


def tracker_loop(tracker: Tracker, keys: list[object], limits: SourceLimits) -> Callable[[], int]:
    state = {"now": 1000.0}

    def run() -> int:
        now = state["now"]
        check, started, ended = tracker.check, tracker.started, tracker.ended
        for key in keys:
            now += TICK
            if not check(key, now, limits):
                started(key)
                ended(key)
        state["now"] = now + 3600.0  # the next run starts with drained buckets
        return len(keys)

    return run


def bench_tracker(n: int, runs: int) -> list[Row]:
    keys: list[object] = [source_key(p, 32, 128) for p in v4_peers(n)]
    hot: list[object] = [keys[0]] * n
    cases = [
        (f"{n:,} distinct sources, cap {n:,}", Tracker(n), keys, LIMITS),
        (f"{n:,} distinct sources, cap {n // 10:,} (evicting)", Tracker(n // 10), keys, LIMITS),
        (f"{n:,} distinct sources, no limits", Tracker(n), keys, NO_LIMITS),
        ("one hot source, max_child_per_ip only", Tracker(n), hot, SourceLimits(4)),
        ("one hot source, blocked", Tracker(n), hot, LIMITS),
    ]
    rows = []
    for name, tracker, ks, limits in cases:
        ns = median_ns(tracker_loop(tracker, ks, limits), runs)
        rows.append({"case": name, "ns_per_connection": ns, "tracked": len(tracker)})
    return rows


def bench_full_path(n: int, runs: int) -> list[Row]:
    """What a listener does per accepted connection, from the peer string on."""
    peers = v4_peers(n)
    only = AddressList(_net(t) for t in ("10.0.0.0/8", "192.0.2.0/24", "2001:db8::/32"))
    no = AddressList(_net(t) for t in ("10.66.0.0/16", "10.1.2.3"))
    rows = []
    for name, only_from, no_access in [
        ("no lists", AddressList(), AddressList()),
        ("only_from 3 + no_access 2", only, no),
    ]:
        tracker = Tracker(n)
        state = {"now": 1000.0}

        def run(only_from: AddressList = only_from, no_access: AddressList = no_access,
                tracker: Tracker = tracker, state: dict[str, float] = state) -> int:
            now = state["now"]
            for peer in peers:
                now += TICK
                addr = parse_ip(peer)
                if addr is None or access_reason(only_from, no_access, addr):
                    continue
                key = source_key_addr(addr, 24, 64)
                if not tracker.check(key, now, LIMITS):
                    tracker.started(key)
                    tracker.ended(key)
            state["now"] = now + 3600.0
            return len(peers)

        ns = median_ns(run, runs)
        rows.append({"case": f"{n:,} distinct peers, {name}", "ns_per_connection": ns})
    return rows


def _net(text: str) -> Network:
    parsed = parse_cidr(text)
    assert isinstance(parsed, Network), parsed
    return parsed


def random_networks(rng: random.Random, count: int, version: int) -> list[Network]:
    bits = 32 if version == 4 else 128
    low = 8 if version == 4 else 16
    nets = []
    for _ in range(count):
        prefix = rng.randint(low, bits)
        value = rng.getrandbits(bits) >> (bits - prefix) << (bits - prefix)
        nets.append(Network(version, value, prefix))
    return nets


def bench_matcher(runs: int) -> list[Row]:
    rng = random.Random(2)
    rows = []
    for version in (4, 6):
        bits = 32 if version == 4 else 128
        cls = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
        for count in (1, 100, 10_000):
            nets = random_networks(rng, count, version)
            lst = AddressList(nets)
            misses = [str(cls(rng.getrandbits(bits))) for _ in range(2000)]
            hits = [str(cls(n.value + rng.getrandbits(bits - n.prefix) if n.prefix < bits
                            else n.value)) for n in rng.choices(nets, k=2000)]
            assert all(map(lst.matches, hits))
            row: Row = {
                "family": f"IPv{version}",
                "entries": count,
                "ranges": lst.ranges,
                "miss_ns": median_ns(partial(_count, lst.matches, misses), runs),
                "hit_ns": median_ns(partial(_count, lst.matches, hits), runs),
            }
            if count <= 100:  # the linear scan of ipaddress objects this replaces
                objs = [ipaddress.ip_network(str(n)) for n in nets]

                def scan(ip: str, objs: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = objs,
                         ) -> bool:
                    a = ipaddress.ip_address(ip)
                    return any(a in o for o in objs)

                row["ipaddress_scan_miss_ns"] = median_ns(partial(_count, scan, misses), runs)
            rows.append(row)
    return rows


def _count(fn: Callable[[str], object], items: list[str]) -> int:
    for item in items:
        fn(item)
    return len(items)


def bench_parse_ip(runs: int) -> list[Row]:
    rows = []
    for spelling in ("192.0.2.1", "::ffff:192.0.2.1", "2001:db8::1"):
        items = [spelling] * 20_000
        rows.append({
            "peer": spelling,
            "parse_ip_ns": median_ns(partial(_count, parse_ip, items), runs),
            "ipaddress_ns": median_ns(partial(_count, ipaddress.ip_address, items), runs),
        })
    return rows


def bench_memory(n: int) -> list[Row]:
    """Bytes per tracked source at the cap (keys included), idle (rate state) and busy."""
    keys = [source_key(p, 32, 128) for p in v4_peers(n)]
    v6keys = [source_key(str(ipaddress.IPv6Address((0x20010DB8 << 96) + (i << 64) + 1)), 32, 64)
              for i in range(n)]
    rows = []
    for name, ks, busy in [("IPv4 sources with rate state", keys, False),
                           ("IPv6 /64 sources with rate state", v6keys, False),
                           ("IPv4 sources with a running connection", keys, True)]:
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        tracker = Tracker(n)
        now = 1000.0
        for k in ks:
            key = int(str(k))  # a fresh key object, counted as the tracker's
            now += TICK
            tracker.check(key, now, LIMITS)
            if busy:
                tracker.started(key)
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        assert len(tracker) == n
        rows.append({"case": f"{name}, cap {n:,}", "bytes": after - before,
                     "bytes_per_source": (after - before) / n})
        del tracker
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sources", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    tracker_rows = bench_tracker(args.sources, args.runs)
    full_rows = bench_full_path(args.sources, args.runs)
    parse_rows = bench_parse_ip(args.runs)
    matcher_rows = bench_matcher(args.runs)
    memory_rows = bench_memory(args.sources)

    print(f"admission per connection (check+started+ended), median of {args.runs} runs")
    print(f"{'case':<58}{'ns/conn':>10}{'tracked':>10}")
    for r in tracker_rows:
        print(f"{r['case']:<58}{r['ns_per_connection']:>10.0f}{r['tracked']:>10,}")
    print("\nwhole path (parse_ip + lists + source_key /24 + tracker)")
    for r in full_rows:
        print(f"{r['case']:<58}{r['ns_per_connection']:>10.0f}")
    print(f"\n{'peer':<22}{'parse_ip ns':>12}{'ipaddress ns':>14}")
    for r in parse_rows:
        print(f"{r['peer']:<22}{r['parse_ip_ns']:>12.0f}{r['ipaddress_ns']:>14.0f}")
    print(f"\n{'matcher':<8}{'entries':>8}{'ranges':>9}{'miss ns':>9}{'hit ns':>9}"
          f"{'ipaddress scan miss ns':>24}")
    for r in matcher_rows:
        scan = r.get("ipaddress_scan_miss_ns")
        print(f"{r['family']:<8}{r['entries']:>8,}{r['ranges']:>9}{r['miss_ns']:>9.0f}"
              f"{r['hit_ns']:>9.0f}{f'{scan:.0f}' if scan is not None else '-':>24}")
    print(f"\n{'tracker memory':<58}{'MB':>8}{'B/source':>10}")
    for r in memory_rows:
        print(f"{r['case']:<58}{r['bytes'] / 1e6:>8.1f}{r['bytes_per_source']:>10.0f}")

    out = RESULTS_DIR / f"bench_admission-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(
        orjson.dumps(
            {
                "sources": args.sources,
                "runs": args.runs,
                "limits": {"max_child_per_ip": LIMITS.max_child_per_ip,
                           "max_cpm_per_ip": LIMITS.max_cpm_per_ip,
                           "block_time": LIMITS.block_time},
                "python": platform.python_version(),
                "machine": platform.machine(),
                "host": socket.gethostname(),
                "tracker": tracker_rows,
                "full_path": full_rows,
                "parse_ip": parse_rows,
                "matcher": matcher_rows,
                "memory": memory_rows,
            },
            option=orjson.OPT_INDENT_2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
