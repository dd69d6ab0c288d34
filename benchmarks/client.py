"""Which load generator runs a benchmark cell, and how a busy client is marked (touches the OS).

The benchmark scripts load servers with the C generator, ``tools/loadgen.c``,
by default: one Python process saturated in several cells and measured the
client as much as the servers (issue 18). ``benchmarks/loadgen.py`` stays as
the fallback, with ``--python-client`` or automatically when there is no C
compiler (said on stderr). Both take the same arguments and give the same
``LoadResult``; ``LoadResult.client`` says which one measured.

``run_load_c`` has ``loadgen.run_load``'s signature. The binary is built once
with ``cc -O2 -Wall -Wextra -Werror -pthread`` (``servers.build_tool``) into
a per-user cache directory keyed by a hash of the source and the flags, so
no built file lands in the tree and an edited source is rebuilt. The
generator runs as a child process, bounded by ``warmup + duration +
timeout`` plus a margin; a non-loopback host is refused here (ValueError)
and again by the C program before it opens any socket.

Marking: a cell whose client used more than ``CLIENT_BUSY_PCT`` (80 %) of a
core in one process or thread gets ``BUSY_MARK`` after its rate in every
table; ``BUSY_LEGEND`` is the sentence that says so under the table.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import subprocess
import sys
import tempfile
from array import array
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any, Protocol

import orjson

from benchmarks.loadgen import (
    CLIENT_BUSY_PCT,
    DEFAULT_MAX_CONNECTIONS,
    LoadResult,
    check_loopback,
    default_processes,
    run_load,
)
from benchmarks.servers import CFLAGS, TOOL_FLAGS, TOOLS_DIR, build_tool, find_cc

__all__ = [
    "BUSY_LEGEND",
    "BUSY_MARK",
    "LoadRunner",
    "add_client_flag",
    "busy_mark",
    "c_loadgen",
    "client_name",
    "pick_runner",
    "run_load_c",
]

BUSY_MARK = "*"
BUSY_LEGEND = (
    f"{BUSY_MARK} the load generator used more than {CLIENT_BUSY_PCT:.0f} % of a core "
    "(busiest process or thread): the client may have limited this cell, so its rate "
    "is a lower bound."
)
# Beyond warmup + duration + timeout, how long the child may take to start and report.
_MARGIN_S = 30.0


class LoadRunner(Protocol):
    """``loadgen.run_load``'s signature, which ``run_load_c`` shares."""

    def __call__(
        self,
        host: str,
        port: int,
        concurrency: int,
        duration: float,
        payload: bytes = b"",
        *,
        expect: bytes | None = None,
        until_close: bool = False,
        min_reply: int = 1,
        processes: int | None = None,
        warmup: float = 0.5,
        timeout: float = 5.0,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        fork: bool = True,
        source_addresses: int = 64,
        conn_log: array[int] | None = None,
    ) -> LoadResult: ...


def busy_mark(saturated: bool) -> str:
    """``BUSY_MARK`` for a cell whose client was busy, else nothing."""
    return BUSY_MARK if saturated else ""


def _cache_dir() -> Path:
    """A per-user directory for built tools, created 0700; a fresh temp dir if unusable."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    d = base / "poolinetd-bench"
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = d.stat()
        if st.st_uid == os.getuid() and not st.st_mode & 0o022:
            return d
    except OSError:
        pass
    # Not ours or not writable: never run a binary someone else could have put there.
    return Path(tempfile.mkdtemp(prefix="poolinetd-bench-tools-"))


@functools.cache
def c_loadgen() -> str | None:
    """Path of the built C generator, or None (no compiler, or it did not build)."""
    cc = find_cc()
    if cc is None:
        return None
    src = (TOOLS_DIR / "loadgen.c").read_bytes()
    key = hashlib.sha256(
        b"\0".join([src, os.path.realpath(cc).encode(), *(f.encode() for f in CFLAGS),
                    *(f.encode() for f in TOOL_FLAGS.get("loadgen", ()))])
    ).hexdigest()[:16]  # fmt: skip
    out = _cache_dir() / f"loadgen-{key}"
    out.mkdir(mode=0o700, exist_ok=True)
    return build_tool("loadgen", out)


def run_load_c(
    host: str,
    port: int,
    concurrency: int,
    duration: float,
    payload: bytes = b"",
    *,
    expect: bytes | None = None,
    until_close: bool = False,
    min_reply: int = 1,
    processes: int | None = None,
    warmup: float = 0.5,
    timeout: float = 5.0,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    fork: bool = True,
    source_addresses: int = 64,
    conn_log: array[int] | None = None,
) -> LoadResult:
    """``loadgen.run_load`` done by ``tools/loadgen.c``; ``processes`` are its threads.

    ``fork`` is accepted for the shared signature and changes nothing: the C
    generator always runs in a child process, and ``conn_log`` works with
    it either way (records come back through a file). Raises ValueError for
    bad arguments or a non-loopback host, RuntimeError when the generator
    is missing or fails (client-side connection failures are counted, never
    raised).
    """
    del fork  # the C generator is a process of its own either way
    check_loopback(host)
    if concurrency < 1 or duration <= 0 or warmup < 0 or timeout <= 0:
        raise ValueError("need concurrency >= 1, duration > 0, warmup >= 0, timeout > 0")
    binary = c_loadgen()
    if binary is None:
        raise RuntimeError("the C load generator (tools/loadgen.c) is not available")
    threads = processes if processes is not None else default_processes(concurrency)
    cmd = [binary, "--host", host, "--port", str(port), "-c", str(concurrency),
           "-d", repr(duration), "-w", repr(warmup), "--timeout", repr(timeout),
           "--threads", str(max(1, min(threads, concurrency, 64))),
           "--min-reply", str(min_reply), "--max-connections", str(max_connections),
           "--source-addresses", str(source_addresses)]  # fmt: skip
    if payload:
        cmd += ["--payload-hex", payload.hex()]
    if expect is not None:
        # An empty expectation means "send and close": --echo of an empty payload.
        cmd += ["--expect-hex", expect.hex()] if expect else ["--echo"]
    if until_close:
        cmd.append("--until-close")
    with tempfile.TemporaryDirectory(prefix="poolinetd-loadgen-") as tmp:
        log_path = Path(tmp) / "conns.bin"
        if conn_log is not None:
            cmd += ["--conn-log", str(log_path)]
        done = _run(cmd, warmup + duration + timeout + _MARGIN_S)
        if conn_log is not None and done.returncode in (0, 1):
            conn_log.frombytes(log_path.read_bytes())
    if done.returncode not in (0, 1):
        raise RuntimeError(
            f"C load generator exited {done.returncode}: "
            f"{done.stderr.decode(errors='replace').strip()[-600:]}"
        )
    doc: dict[str, Any] = orjson.loads(done.stdout)
    names = {f.name for f in fields(LoadResult)}
    kept = {k: v for k, v in doc.items() if k in names}
    # The window is what the caller asked for, exactly (the C side prints %g).
    kept.update(duration_s=duration, warmup_s=warmup, conn_per_s=doc["completed"] / duration)
    return LoadResult(**kept)


def _run(cmd: list[str], limit: float) -> subprocess.CompletedProcess[bytes]:
    """Run the generator; a child over its time limit is killed and reported."""
    try:
        return subprocess.run(cmd, capture_output=True, timeout=limit, check=False)
    except subprocess.TimeoutExpired as exc:  # subprocess.run has killed it
        raise RuntimeError(f"C load generator still running after {limit:.0f} s") from exc


def add_client_flag(parser: argparse.ArgumentParser) -> None:
    """``--python-client``: measure with benchmarks/loadgen.py instead of tools/loadgen.c."""
    parser.add_argument(
        "--python-client",
        action="store_true",
        help="load with the Python generator (benchmarks/loadgen.py) instead of the C one "
        "(tools/loadgen.c, the default; the Python one is used anyway without cc)",
    )


def pick_runner(python_client: bool, log: Callable[[str], None] | None = None) -> LoadRunner:
    """``run_load_c`` unless asked for Python or the C generator cannot be built (then say so)."""
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if python_client:
        say("load generator: Python (benchmarks/loadgen.py), as asked")
        return run_load
    if c_loadgen() is not None:
        say("load generator: C (benchmarks/tools/loadgen.c)")
        return run_load_c
    why = "no C compiler (cc)" if find_cc() is None else "tools/loadgen.c did not build"
    say(f"load generator: Python (benchmarks/loadgen.py): {why}")
    return run_load


def client_name(runner: LoadRunner) -> str:
    """``"c"`` or ``"python"``, for result documents."""
    return "c" if runner is run_load_c else "python"
