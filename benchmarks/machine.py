"""Facts about the machine a benchmark ran on, and writing the result document they go in.

Shared by every benchmark script (its own module so that none has to import
another for it). ``machine_facts`` reads /proc only and never fails;
``write_results`` writes one JSON file.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
from pathlib import Path
from typing import Any

import orjson


def machine_facts() -> dict[str, Any]:
    """CPU model, core count, kernel, Python, date, and the TCP sysctls that matter here."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    sysctl: dict[str, str] = {}
    for key in ("tcp_tw_reuse", "ip_local_port_range", "tcp_max_tw_buckets"):
        with contextlib.suppress(OSError):
            sysctl[key] = Path(f"/proc/sys/net/ipv4/{key}").read_text().split("\n")[0]
    with contextlib.suppress(OSError):
        sysctl["somaxconn"] = Path("/proc/sys/net/core/somaxconn").read_text().strip()
    return {
        "cpu_model": cpu,
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "sysctl": sysctl,
    }


def write_results(path: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` to ``path`` as indented JSON (its directory created), and say so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    print(f"results: {path}")
