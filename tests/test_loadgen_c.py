"""The C load generator (benchmarks/tools/loadgen.c) against tiny servers on 127.0.0.1.

Real sockets and real processes, each test under a few seconds: it builds
warning-free, counts exactly what a counting server saw, prints a sane JSON
document, refuses a non-loopback address before it opens any socket, keeps
to --duration (and to --timeout against a server that never answers), and
stops cleanly on SIGINT. Skipped, saying why, only without a C compiler.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from array import array
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest

from benchmarks.client import c_loadgen, run_load_c
from benchmarks.loadgen import pattern_payload
from benchmarks.procstat import children_of
from benchmarks.servers import build_tool, find_cc, start_handoff, start_pyhandoff

# Each test builds a tool with cc and runs it, most under load for a second or so:
# process tests (not in the quick run, ``pytest -m "not process"``).
pytestmark = [pytest.mark.skipif(find_cc() is None, reason="no C compiler (cc) on PATH"),
              pytest.mark.process]

PAYLOAD = pattern_payload(64)
KEYS = {
    "client", "host", "port", "concurrency", "processes", "threads", "duration_s", "warmup_s",
    "payload_bytes", "completed", "conn_per_s", "p50_ms", "p90_ms", "p99_ms", "max_ms",
    "mean_ms", "errors", "error_total", "started", "wall_s", "client_user_s", "client_sys_s",
    "client_cpu_pct", "client_max_proc_cpu_pct", "client_saturated", "per_process_completed",
    "source_addresses", "interrupted",
}  # fmt: skip


@pytest.fixture(scope="module")
def binary() -> str:
    path = c_loadgen()
    assert path is not None, "tools/loadgen.c did not build with -Wall -Wextra -Werror"
    return path


class Counts:
    """What a test server saw, under a lock (the server runs in its own thread)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.accepted = 0
        self.received = 0


@contextmanager
def counting_server(answer: Callable[[bytes], tuple[bytes, bool] | None],
                    *, host: str = "127.0.0.1") -> Iterator[tuple[int, Counts]]:
    """A thread serving on ``host``:0; yields (port, counts), stops on exit.

    For each connection: ``answer(bytes so far)`` is None (wait for more) or
    (reply, close after it). A client's EOF closes the connection.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    ls = socket.socket(family, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((host, 0))
    ls.listen(1024)
    ls.settimeout(0.05)
    counts = Counts()
    stop = threading.Event()

    def serve(c: socket.socket) -> None:
        got = b""
        with c:
            c.settimeout(5)
            try:
                while True:
                    out = answer(got)
                    if out is not None:
                        reply, close = out
                        c.sendall(reply)
                        if close:
                            return
                        got = b""
                    data = c.recv(65536)
                    if not data:
                        return
                    with counts.lock:
                        counts.received += len(data)
                    got += data
            except OSError:
                return

    def loop() -> None:
        deadline = time.monotonic() + 30  # bounded even if a test hangs
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                c, _ = ls.accept()
            except TimeoutError:
                continue
            with counts.lock:
                counts.accepted += 1
            threading.Thread(target=serve, args=(c,), daemon=True).start()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield ls.getsockname()[1], counts
    finally:
        stop.set()
        t.join(5)
        ls.close()


def echo(data: bytes) -> tuple[bytes, bool] | None:
    return (data, False) if len(data) >= len(PAYLOAD) else None


def run(binary: str, *args: str, limit: float = 20) -> tuple[int, dict[str, Any], str]:
    done = subprocess.run([binary, *args], capture_output=True, timeout=limit, check=False)
    doc = orjson.loads(done.stdout) if done.stdout else {}
    return done.returncode, doc, done.stderr.decode()


def test_builds_warning_free_with_the_benchmark_flags(tmp_path: Path) -> None:
    # build_tool compiles with -Wall -Wextra -Werror; a warning would be None here.
    for tool in ("loadgen", "handoff", "cecho", "cspawn"):
        assert build_tool(tool, tmp_path) is not None, tool


def test_against_cspawn_exec_per_connection(binary: str, tmp_path: Path) -> None:
    """tools/cspawn.c (the c-spawn column) spawns /bin/cat per connection: the load
    generator's echo gets every byte back."""
    cspawn = build_tool("cspawn", tmp_path)
    assert cspawn is not None
    with subprocess.Popen([cspawn, "0", "/bin/cat"], stdout=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            assert proc.stdout is not None
            port = proc.stdout.readline().strip()
            rc, doc, err = run(binary, "--port", port, "--scenario", "echo", "-c", "4",
                               "-d", "0.5", "-w", "0")
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc == 0 and doc["error_total"] == 0, (err, doc["errors"])
    assert doc["completed"] > 5


def test_echo_counts_match_what_the_server_saw(binary: str) -> None:
    with counting_server(echo) as (port, counts):
        rc, doc, err = run(binary, "--port", str(port), "--scenario", "echo", "-c", "4",
                           "-d", "0.5", "-w", "0", "--timeout", "2")
        time.sleep(0.1)
        with counts.lock:
            accepted, received = counts.accepted, counts.received
    assert rc == 0, err
    assert set(doc) == KEYS
    assert doc["client"] == "c" and doc["error_total"] == 0 and doc["errors"] == {}
    assert doc["payload_bytes"] == 64
    # Every connection the client started was accepted and sent its 64 bytes, once.
    assert doc["started"] == accepted > 20
    assert received == 64 * doc["started"]
    # Only connections ending inside the window count; the drain's do not.
    assert 0 < doc["completed"] <= doc["started"]
    assert doc["conn_per_s"] == pytest.approx(doc["completed"] / 0.5)
    assert 0 < doc["p50_ms"] <= doc["p90_ms"] <= doc["p99_ms"] <= doc["max_ms"]
    assert doc["p50_ms"] <= doc["mean_ms"] * 10
    assert doc["client_user_s"] + doc["client_sys_s"] > 0
    assert 0 <= doc["client_max_proc_cpu_pct"] <= doc["client_cpu_pct"] + 1
    assert doc["client_saturated"] == (doc["client_max_proc_cpu_pct"] > 80)
    assert doc["per_process_completed"] == [doc["completed"]]
    assert doc["source_addresses"] == 64 and doc["interrupted"] is False


def test_against_cecho_with_threads(binary: str, tmp_path: Path) -> None:
    cecho = build_tool("cecho", tmp_path)
    assert cecho is not None
    with subprocess.Popen([cecho, "0", "0"], stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            echo_port, day_port = proc.stdout.readline().split()
            rc, doc, err = run(binary, "--port", echo_port, "--scenario", "echo", "-c", "16",
                               "--threads", "2", "-d", "0.5", "-w", "0.1")
            rc2, day, err2 = run(binary, "--port", day_port, "--scenario", "daytime",
                                 "-c", "8", "-d", "0.3", "-w", "0")
        finally:
            proc.kill()
    assert rc == 0 and doc["error_total"] == 0, (err, doc["errors"])
    assert doc["completed"] > 100 and doc["threads"] == 2
    assert len(doc["per_process_completed"]) == 2
    assert sum(doc["per_process_completed"]) == doc["completed"]
    assert rc2 == 0 and day["error_total"] == 0 and day["completed"] > 50, err2


def test_read_to_eof_scenarios_and_reply_errors(binary: str) -> None:
    line = b"Wed Nov 26 12:00:00 2025\r\n"
    with counting_server(lambda _d: (line, True)) as (port, _):
        _, day, _ = run(binary, "--port", str(port), "--scenario", "daytime", "-c", "2",
                        "-d", "0.3", "-w", "0")
        # sleep100 expects exactly "ok\n", then the close: this reply is wrong.
        _, wrong, _ = run(binary, "--port", str(port), "--scenario", "sleep100", "-c", "2",
                          "-d", "0.3", "-w", "0")
        # A strict prefix of the expected reply is short.
        _, short, _ = run(binary, "--port", str(port), "--until-close", "-c", "2", "-d", "0.3",
                          "-w", "0", "--expect-hex", (line + b"more").hex())
    assert day["error_total"] == 0 and day["completed"] > 10
    assert wrong["completed"] == 0 and set(wrong["errors"]) == {"wrong_reply"}
    assert short["completed"] == 0 and set(short["errors"]) == {"short_reply"}
    with counting_server(lambda _d: (b"ok\n", True)) as (port, _):
        _, ok, _ = run(binary, "--port", str(port), "--scenario", "sleep100", "-c", "2",
                       "-d", "0.3", "-w", "0")
    assert ok["error_total"] == 0 and ok["completed"] > 10


def test_refused_port_is_counted_and_bounded(binary: str) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    rc, doc, _ = run(binary, "--port", str(port), "-d", "0.2", "-w", "0",
                     "--max-connections", "300")
    assert rc == 1
    assert doc["completed"] == 0 and set(doc["errors"]) == {"ECONNREFUSED"}
    assert doc["started"] <= 300 and doc["error_total"] == doc["started"]


def _non_loopback_address() -> str | None:
    """An address of this machine outside 127/8 (a UDP connect sends nothing), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        try:
            u.connect(("192.0.2.1", 9))
        except OSError:
            return None
        addr: str = u.getsockname()[0]
    return None if addr.startswith("127.") or addr == "0.0.0.0" else addr


@pytest.mark.parametrize("host", ["192.0.2.1", "localhost", "0.0.0.0", "::", "::ffff:127.0.0.1",
                                  "128.0.0.1"])
def test_refuses_non_loopback_before_any_socket(binary: str, host: str) -> None:
    rc, doc, err = run(binary, "--host", host, "--port", "7", "-d", "0.2")
    assert rc == 2 and doc == {}
    assert "refusing" in err and "loopback" in err
    with pytest.raises(ValueError):
        run_load_c(host, 7, 1, 0.2)


def test_a_local_non_loopback_listener_sees_nothing(binary: str) -> None:
    addr = _non_loopback_address()
    if addr is None:
        pytest.skip("this machine has no non-loopback IPv4 address to try")
    with counting_server(echo, host="0.0.0.0") as (port, counts):
        rc, _, err = run(binary, "--host", addr, "--port", str(port), "--scenario", "echo",
                         "-d", "0.3", "-w", "0")
        time.sleep(0.2)
        with counts.lock:
            assert counts.accepted == 0 and counts.received == 0
    assert rc == 2 and "refusing" in err


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback here")
def test_ipv6_loopback(binary: str) -> None:
    with counting_server(echo, host="::1") as (port, _):
        rc, doc, err = run(binary, "--host", "::1", "--port", str(port), "--scenario", "echo",
                           "-c", "2", "-d", "0.3", "-w", "0")
    assert rc == 0 and doc["completed"] > 5 and doc["source_addresses"] == 0, err


def test_honours_duration(binary: str) -> None:
    with counting_server(echo) as (port, _):
        t0 = time.monotonic()
        rc, doc, err = run(binary, "--port", str(port), "--scenario", "echo", "-c", "4",
                           "-d", "0.6", "-w", "0.2")
        took = time.monotonic() - t0
    assert rc == 0, err
    assert 0.8 <= doc["wall_s"] <= 1.3
    assert 0.8 <= took <= 2.5


def test_drain_is_bounded_by_timeout(binary: str) -> None:
    # A listener that never accepts: the handshake completes in the backlog, no reply.
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(64)
    try:
        t0 = time.monotonic()
        rc, doc, _ = run(binary, "--port", str(ls.getsockname()[1]), "--scenario", "echo",
                         "-c", "4", "-d", "0.3", "-w", "0", "--timeout", "0.5")
        took = time.monotonic() - t0
    finally:
        ls.close()
    assert rc == 1 and doc["completed"] == 0
    assert doc["errors"] == {"timeout": doc["started"]} and doc["started"] >= 4
    assert took < 0.3 + 0.5 + 1.5


def test_sigint_stops_cleanly_with_a_report(binary: str) -> None:
    with counting_server(echo) as (port, _):
        proc = subprocess.Popen([binary, "--port", str(port), "--scenario", "echo", "-c", "4",
                                 "-d", "30", "-w", "0"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        time.sleep(0.5)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=5)
        took = time.monotonic() - t0
    assert proc.returncode == 130 and took < 1.0
    doc = orjson.loads(out)
    assert doc["interrupted"] is True and doc["completed"] > 0


def test_run_load_c_matches_run_load(binary: str) -> None:
    del binary  # built
    log: array[int] = array("q")
    with counting_server(echo) as (port, _):
        r = run_load_c("127.0.0.1", port, 4, 0.4, PAYLOAD, expect=PAYLOAD, warmup=0.1,
                       timeout=2, fork=False, processes=1, conn_log=log)
    assert r.client == "c" and r.error_total == 0 and r.completed > 10
    assert r.duration_s == 0.4 and r.conn_per_s == pytest.approx(r.completed / 0.4)
    # Three ints per completed connection: start, end (monotonic ns), source << 16 | port.
    assert len(log) == 3 * r.completed
    starts, ends, tags = log[0::3], log[1::3], log[2::3]
    assert all(s < e for s, e in zip(starts, ends, strict=True))
    assert abs(ends[-1] - time.monotonic_ns()) < 10e9
    assert all(1 <= t >> 16 <= 64 and t & 0xFFFF for t in tags)


@pytest.mark.parametrize("tool", ["c-handoff", "py-handoff"])
def test_handoff_references_echo_without_errors(binary: str, tmp_path: Path, tool: str) -> None:
    """The bounds of the pool's shape (benchmarks.ceiling): in C, and in Python."""
    if tool == "c-handoff":
        handoff = build_tool("handoff", tmp_path)
        assert handoff is not None
        server = start_handoff(handoff, tmp_path)
    else:
        server = start_pyhandoff(tmp_path)
    try:
        rc, doc, err = run(binary, "--port", str(server.ports["echo"]), "--scenario", "echo",
                           "-c", "32", "-d", "0.8", "-w", "0.1")
        worker_alive = bool(children_of(server.pid))
    finally:
        server.stop()
    assert rc == 0 and doc["error_total"] == 0 and doc["completed"] > 200, (err, doc["errors"])
    assert worker_alive
    assert (tmp_path / f"{tool}.out").read_text() == ""  # nothing went wrong on its side
