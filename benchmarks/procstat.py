"""CPU time and memory of a server's master and its direct children, from /proc (reads the OS).

``snapshot(pid)`` returns a ``TreeStat``: the master's RSS/PSS (kB, from
``/proc/PID/smaps_rollup``) and CPU (seconds; own ``utime+stime`` and reaped
children's ``cutime+cstime``), and the same for every live direct child
(workers; found by ppid in ``/proc/*/stat``). Processes that vanish while
being read are skipped, never raised.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcStat:
    """One process: memory in kB, CPU in seconds."""

    pid: int
    comm: str
    rss_kb: int
    pss_kb: int
    cpu_s: float
    children_cpu_s: float


@dataclass(frozen=True)
class TreeStat:
    """Master plus its live direct children (workers, or in-flight forks in classic mode)."""

    master: ProcStat | None
    workers: list[ProcStat] = field(default_factory=list)

    @property
    def workers_pss_kb(self) -> int:
        return sum(w.pss_kb for w in self.workers)

    @property
    def workers_rss_kb(self) -> int:
        return sum(w.rss_kb for w in self.workers)

    @property
    def workers_cpu_s(self) -> float:
        return sum(w.cpu_s + w.children_cpu_s for w in self.workers)

    @property
    def pss_per_worker_kb(self) -> float:
        return self.workers_pss_kb / len(self.workers) if self.workers else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            workers_count=len(self.workers),
            workers_pss_kb=self.workers_pss_kb,
            workers_rss_kb=self.workers_rss_kb,
            workers_cpu_s=self.workers_cpu_s,
            pss_per_worker_kb=self.pss_per_worker_kb,
        )
        return d


def _stat_fields(pid: int) -> tuple[str, list[str]] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split at the last ')'.
    lpar, rpar = raw.find("("), raw.rfind(")")
    return raw[lpar + 1 : rpar], raw[rpar + 2 :].split()


def _smaps(pid: int) -> tuple[int, int]:
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def proc_stat(pid: int) -> ProcStat | None:
    """Stat one process, or None if it is gone."""
    got = _stat_fields(pid)
    if got is None:
        return None
    comm, rest = got
    # After "(comm) ": state ppid ... utime(12) stime(13) cutime(14) cstime(15), 0-based in rest.
    utime, stime, cutime, cstime = (int(x) for x in rest[11:15])
    rss, pss = _smaps(pid)
    return ProcStat(pid, comm, rss, pss, (utime + stime) / _TICK, (cutime + cstime) / _TICK)


def children_of(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (scans /proc/*/stat)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        got = _stat_fields(int(name))
        if got is not None and got[1][1] == str(pid):
            out.append(int(name))
    return sorted(out)


def snapshot(pid: int) -> TreeStat:
    """Master ``pid`` and its live direct children."""
    master = proc_stat(pid)
    workers = [s for c in children_of(pid) if (s := proc_stat(c)) is not None]
    return TreeStat(master, workers)
