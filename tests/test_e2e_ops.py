"""Operations against a running server: reload, stop, self-sizing pools, status, signals.

Tests parametrized over ``mode`` run in pool and classic mode (the README and
the commit messages promise both); assertions about workers are pool-only.
The rest are about pool mode's workers.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from conftest import (
    REPO,
    TEST_USER,
    alive,
    children_of,
    descendants,
    recv_exact,
    tcp_exchange,
    wait_until,
)

pytestmark = pytest.mark.process
U = TEST_USER
MODES = ["pool", "classic"]


def listener_port(server, service_prefix: str) -> int:
    for svc in server.status()["services"]:
        if svc["service"].startswith(service_prefix) and svc["state"] != "retiring":
            return int(svc["listeners"][0].rsplit(":", 1)[1])  # "127.0.0.1:PORT"
    raise KeyError(service_prefix)


RELOAD_BEFORE = f"""
127.0.0.1:0 on socktype=stream, user={U}, args=echo, conn_timeout=60;
127.0.0.1:0 stream tcp nowait {U} internal chargen
127.0.0.1:0 stream tcp nowait {U} internal discard
"""
RELOAD_AFTER = f"""
127.0.0.1:0 on socktype=stream, user={U}, args=echo, conn_timeout=61;
127.0.0.1:0 stream tcp nowait {U} internal chargen
127.0.0.1:0 stream tcp nowait {U} internal time
"""


@pytest.mark.parametrize("mode", MODES)
def test_reload_adds_changes_removes_without_cutting_50_connections(serve, mode: str) -> None:
    server = serve(RELOAD_BEFORE, mode=mode)
    pool = mode == "pool"
    echo, chargen, discard = server.port(0), server.port(1), server.port(2)
    old_workers = set(server.workers()) if pool else set()
    # (The unchanged service is chargen: the engine answers daytime and time itself.)
    chargen_worker = _workers_titled(server, b"chargen") if pool else set()
    if pool:
        assert len(old_workers) == 3 and len(chargen_worker) == 1
    clients = [socket.create_connection(("127.0.0.1", echo), timeout=10) for _ in range(50)]
    sinks = [socket.create_connection(("127.0.0.1", discard), timeout=10) for _ in range(3)]
    try:
        for i, sock in enumerate(clients):
            msg = f"before {i}\n".encode()
            sock.sendall(msg)
            assert recv_exact(sock, len(msg)) == msg
        server.conf.write_text(RELOAD_AFTER)
        server.send_signal(signal.SIGHUP)
        wait_until(lambda: "reloaded" in server.log(), 10, "the reload")
        assert re.search(r"reloaded added=1 changed=1 removed=1 unchanged=1", server.log())
        # Connections accepted before the reload are served to the end by the old workers.
        for i, sock in enumerate(clients):
            msg = f"after {i}\n".encode()
            sock.sendall(msg)
            assert recv_exact(sock, len(msg)) == msg
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(10) == b""  # a clean EOF, not a reset
        for sock in sinks:
            sock.sendall(b"x" * 1000)
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(10) == b""
    finally:
        for sock in clients + sinks:
            sock.close()
    # The changed service keeps its port, with new workers; unchanged and added serve.
    assert tcp_exchange(echo, b"new worker") == b"new worker"
    assert len(tcp_exchange(chargen, shut=False, limit=74)) >= 74
    assert len(tcp_exchange(listener_port(server, "time"))) == 4
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", discard), timeout=5).close()
    if pool:
        # Old workers of the changed and removed services exit once their clients are done;
        # the unchanged service keeps its worker.
        retiring = old_workers - chargen_worker
        wait_until(lambda: not retiring & set(server.workers()), 10, "old workers to exit")
        assert chargen_worker <= set(server.workers())
    else:
        # Every per-connection child of the old generation exits with its client.
        wait_until(lambda: not server.workers(), 10, "the old connections' children to exit")
    wait_until(lambda: all(s["state"] != "retiring" for s in server.status()["services"]), 10,
               "retired generations to be forgotten")


def _workers_titled(server, word: bytes) -> set[int]:
    return {p for p in server.workers() if word in Path(f"/proc/{p}/cmdline").read_bytes()}


@pytest.mark.parametrize("mode", MODES)
def test_reload_with_a_broken_file_keeps_the_running_config(serve, mode: str) -> None:
    server = serve(f"127.0.0.1:0 stream tcp nowait {U} internal echo\n", mode=mode)
    workers = server.workers()  # (classic: none while idle)
    server.conf.write_text(f"127.0.0.1:0 stream tcp nowait {U} internal echo\n"
                           f"127.0.0.1:0 stream bogus nowait {U} internal echo\n"
                           f"127.0.0.1:0 stream tcp nowait no-such-user-xyz internal daytime\n")
    result = subprocess.run([sys.executable, "-m", "poolinetd", "reload", "--control",
                             str(server.control)], capture_output=True, text=True, timeout=30,
                            cwd=REPO)
    assert result.returncode == 78, result
    assert "kept" in result.stdout
    text = server.log()
    assert re.search(rf"{re.escape(str(server.conf))}:2: field 3 'bogus'", text), text
    assert "no-such-user-xyz" in text
    assert "reload_failed" in text
    assert tcp_exchange(server.port(), b"still the old config") == b"still the old config"
    # (classic: that connection's child may still be exiting)
    wait_until(lambda: server.workers() == workers, 10, "the same workers as before")
    server.send_signal(signal.SIGHUP)  # the same through the signal
    wait_until(lambda: server.log().count("reload_failed") >= 2, 10)
    assert tcp_exchange(server.port(), b"ok") == b"ok"


@pytest.mark.parametrize("mode", MODES)
def test_sigterm_lets_a_slow_client_finish(serve, mode: str) -> None:
    server = serve(f"127.0.0.1:0 stream tcp nowait {U} internal echo\n", mode=mode)
    port = server.port()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
        slow.sendall(b"first half ")
        assert recv_exact(slow, 11) == b"first half "
        server.send_signal(signal.SIGTERM)
        wait_until(lambda: "stopping" in server.log(), 5)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        time.sleep(0.3)  # the client is slow on purpose: the server must wait for it
        assert server.proc.poll() is None
        slow.sendall(b"second half")
        assert recv_exact(slow, 11) == b"second half"
        slow.shutdown(socket.SHUT_WR)
        assert slow.recv(10) == b""
    assert server.proc.wait(10) == 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_leaves_no_zombies_and_no_orphans(serve, sig: int, mode: str) -> None:
    server = serve(f"127.0.0.1:0 stream tcp nowait {U} /bin/cat cat\n"
                   f"127.0.0.1:0 stream tcp nowait {U} internal echo\n",
                   "--graceful-timeout", "1", mode=mode)
    held = [socket.create_connection(("127.0.0.1", server.port(0)), timeout=5) for _ in range(3)]
    try:
        for sock in held:
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"
        tree = descendants(server.pid)
        # pool: two workers and three cats; classic: the three cats
        assert len(tree) >= (5 if mode == "pool" else 3), tree
        start = time.monotonic()
        assert server.stop(sig) == 0
        assert time.monotonic() - start < 8
        assert not [p for p in tree if alive(p)], "processes survived the stop"
    finally:
        for sock in held:
            sock.close()


@pytest.mark.parametrize("mode", MODES)
def test_status_counts_match_the_traffic(serve, mode: str) -> None:
    server = serve(f"127.0.0.1:0 on socktype=stream, user={U}, args=echo, pool_min=2;\n"
                   f"127.0.0.1:0 stream tcp nowait/10/0/1 {U} /bin/cat cat\n", mode=mode)
    echo_name = server.listeners[0]["service"]
    cat_name = server.listeners[1]["service"]
    for i in range(10):
        assert tcp_exchange(server.port(0), b"%d" % i) == b"%d" % i
    held = [socket.create_connection(("127.0.0.1", server.port(0)), timeout=5) for _ in range(3)]
    cat1 = socket.create_connection(("127.0.0.1", server.port(1)), timeout=5)
    try:
        for sock in held:
            sock.sendall(b"y")
            assert sock.recv(1) == b"y"
        cat1.sendall(b"z")
        assert cat1.recv(1) == b"z"
        # A second client from the same IP is over max_child_per_ip=1: refused.
        refused = socket.create_connection(("127.0.0.1", server.port(1)), timeout=5)
        with refused:
            assert refused.recv(10) == b""
        echo = wait_until(lambda: (s := server.service_status(echo_name))["active"] == 3 and s,
                          5, "three active echo connections")
        assert echo["accepted"] == 13 and echo["refused"] == 0 and echo["restarts"] == 0
        if mode == "pool":
            assert echo["workers"]["idle"] + echo["workers"]["busy"] == 2
            assert echo["workers"]["busy"] >= 1
        assert echo["state"] == "serving" and echo["last_error"] == ""
        # (SPAWNED may reach the master a moment after the status request.)
        wait_until(lambda: [server.service_status(cat_name)[k]
                            for k in ("accepted", "refused", "active", "programs")] == [1, 1, 1, 1],
                   5, "cat's counters")
        # The same through the command line, as an operator reads it.
        text = subprocess.run([sys.executable, "-m", "poolinetd", "status", "--control",
                               str(server.control)], capture_output=True, text=True,
                              timeout=30, cwd=REPO).stdout
        row = next(line for line in text.splitlines() if line.startswith(cat_name))
        assert row.split()[1:2] == ["serving"] and " 1 " in row
        doc = orjson.loads(subprocess.run(
            [sys.executable, "-m", "poolinetd", "status", "--json", "--control",
             str(server.control)], capture_output=True, timeout=30, cwd=REPO).stdout)
        assert [s["service"] for s in doc["services"]] == [echo_name, cat_name]
    finally:
        for sock in held:
            sock.close()
        cat1.close()


def test_max_requests_recycles_workers(serve, staged_programs: Path) -> None:
    server = serve(f"127.0.0.1:0 on socktype=stream, user={U}, exec={staged_programs}/report.sh, "
                   f"args=report.sh, wait=no, max_requests=4, pool_min=1;\n")
    parents = []
    for _ in range(20):
        out = tcp_exchange(server.port()).decode()
        parents.append(int(re.search(r"ppid: (\d+)", out).group(1)))  # type: ignore[union-attr]
    # 4 connections per worker: up to 10 % jitter rounds to none for so small a limit.
    assert len(set(parents)) >= 5
    for pid in set(parents):
        assert parents.count(pid) <= 4
    wait_until(lambda: len(server.workers()) == 1, 10, "retired workers to exit")


def test_pool_grows_under_load_and_shrinks_when_idle(serve) -> None:
    server = serve(f"127.0.0.1:0 on socktype=stream, user={U}, args=echo, pool_min=1, "
                   f"worker_connections=1, idle_timeout=1, max_child_per_ip=unlimited;\n")
    held = [socket.create_connection(("127.0.0.1", server.port()), timeout=10) for _ in range(6)]
    try:
        for sock in held:  # each is served by its own worker (one connection per worker)
            sock.sendall(b"p")
            assert sock.recv(1) == b"p"
        assert len(server.workers()) >= 6
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: len(server.workers()) == 1, 15, "surplus workers to retire")
    assert "reason=idle" in server.log()


def test_sigttin_sigttou_resize_the_pools(serve) -> None:
    server = serve(f"127.0.0.1:0 stream tcp nowait {U} internal echo\n")
    assert len(server.workers()) == 1
    server.send_signal(signal.SIGTTIN)
    wait_until(lambda: len(server.workers()) == 2, 10, "a second worker")
    server.send_signal(signal.SIGTTOU)
    wait_until(lambda: len(server.workers()) == 1, 10, "back to one worker")
    assert "pool_resized" in server.log()
    # Signals meant for the master do not kill workers when sent to the whole group.
    workers = server.workers()
    for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGTTIN, signal.SIGTTOU):
        os.kill(workers[0], sig)
    assert tcp_exchange(server.port(), b"alive") == b"alive"
    assert workers[0] in server.workers()


def _stopped(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] in "Tt"


@pytest.mark.parametrize("mode", MODES)
def test_sigttin_sigttou_never_stop_the_master(serve, mode: str) -> None:
    """The README's signal table holds in both modes: SIGTTIN and SIGTTOU are the
    master's (pool sizes), never the default action (stop the process)."""
    server = serve(f"127.0.0.1:0 stream tcp nowait {U} internal echo\n", mode=mode)
    try:
        for sig in (signal.SIGTTIN, signal.SIGTTOU, signal.SIGTTIN, signal.SIGTTOU):
            server.send_signal(sig)
            assert tcp_exchange(server.port(), b"still serving") == b"still serving"
        assert not _stopped(server.pid)
        assert server.proc.poll() is None
    finally:
        if _stopped(server.pid):
            server.send_signal(signal.SIGCONT)  # let the teardown stop it quickly


@pytest.mark.parametrize("mode", MODES)
def test_sigusr1_reopens_the_log(tmp_path: Path, serve, mode: str) -> None:
    logfile = tmp_path / "poolinetd.log"
    server = serve(f"127.0.0.1:0 stream tcp nowait {U} internal echo\n"
                   f"127.0.0.1:0 stream tcp nowait {U} /bin/cat cat\n",
                   "--log-file", str(logfile), "--log-connections", mode=mode)
    wait_until(lambda: "listening" in logfile.read_text(), 10, "the first log lines")
    os.rename(logfile, tmp_path / "poolinetd.log.1")
    server.send_signal(signal.SIGUSR1)
    wait_until(lambda: logfile.exists() and "log_reopened" in logfile.read_text(), 10,
               "log_reopened in the new file")
    assert "log_reopened" not in (tmp_path / "poolinetd.log.1").read_text()
    # Whoever logs a connection (workers running as the service user, or the
    # master) writes to the new file: the master hands workers its reopened fd.
    assert tcp_exchange(server.port(1), b"cat after rotation") == b"cat after rotation"
    wait_until(lambda: "program_exit" in logfile.read_text(), 5, "the program's line")
    assert tcp_exchange(server.port(0), b"after rotation") == b"after rotation"
    wait_until(lambda: "conn_end" in logfile.read_text(), 5, "the built-in's line in the new log")


@pytest.mark.parametrize("mode", MODES)
def test_json_logs(serve, mode: str) -> None:
    """--log-connections as the README states it, in both modes: ``program_exit``
    with status and duration for a program, ``conn_end`` with the byte counts for
    a built-in."""
    server = serve(f"127.0.0.1:0 stream tcp nowait {U} internal echo\n"
                   f"127.0.0.1:0 stream tcp nowait {U} /bin/cat cat\n",
                   "--log-format", "json", "--log-connections", mode=mode)

    def events() -> list[dict[str, object]]:
        return [orjson.loads(line) for line in server.log().splitlines()
                if line.startswith("{")]

    assert tcp_exchange(server.port(1), b"meow") == b"meow"
    wait_until(lambda: any(e["event"] == "program_exit" for e in events()), 5, "program_exit")
    prog = next(e for e in events() if e["event"] == "program_exit")
    assert prog["status"] == 0 and prog["service"] == server.listeners[1]["service"]
    assert {"ts", "level", "pid", "duration"} <= set(prog)
    assert tcp_exchange(server.port(0), b"hello") == b"hello"
    wait_until(lambda: any(e["event"] == "conn_end" for e in events()), 5, "conn_end")
    end = next(e for e in events() if e["event"] == "conn_end")
    assert end["bytes_in"] == 5 and end["bytes_out"] == 5
    assert isinstance(end["peer"], str) and end["peer"].startswith("127.0.0.1")
    assert {"ts", "level", "pid", "service", "duration"} <= set(end)


def test_program_outlives_its_crashed_worker_and_is_reaped_by_the_master(serve) -> None:
    server = serve(f"127.0.0.1:0 stream tcp nowait/1 {U} /bin/cat cat\n")
    name = server.listeners[0]["service"]
    with socket.create_connection(("127.0.0.1", server.port()), timeout=10) as client:
        client.sendall(b"1")
        assert client.recv(1) == b"1"
        (worker,) = [w for w in server.workers() if children_of(w)]
        (cat,) = children_of(worker)
        os.kill(worker, signal.SIGKILL)
        wait_until(lambda: "program_orphaned" in server.log(), 10, "the orphan to be noticed")
        # The connection lives on with its program, still counted against max_child.
        client.sendall(b"2")
        assert client.recv(1) == b"2"
        assert cat in children_of(server.pid)  # the master is the subreaper
        status = server.service_status(name)
        assert (status["active"], status["programs"]) == (1, 1)
    wait_until(lambda: server.service_status(name)["active"] == 0, 10, "the orphan's exit")
    assert re.search(rf"program_exit .*pid={cat} .*orphan=True", server.log())
    assert not alive(cat)
    assert tcp_exchange(server.port(), b"next") == b"next"  # a new worker serves again


@pytest.mark.parametrize("mode", MODES)
def test_max_child_spans_a_reload_that_changes_the_service(serve, mode: str) -> None:
    before = (f"127.0.0.1:0 on socktype=stream, wait=no, user={U}, exec=/bin/cat, args=cat, "
              "max_child=1;\n")
    server = serve(before, mode=mode)
    name = server.listeners[0]["service"]
    with socket.create_connection(("127.0.0.1", server.port()), timeout=10) as first:
        first.sendall(b"a")
        assert first.recv(1) == b"a"
        server.conf.write_text(before.replace("args=cat,", "args=cat, pool_max=4,"))
        server.send_signal(signal.SIGHUP)
        wait_until(lambda: "reloaded added=0 changed=1" in server.log(), 10)
        # The old generation's cat still runs: the new one may not start a second.
        with socket.create_connection(("127.0.0.1", server.port()), timeout=10) as second:
            second.sendall(b"b")
            second.settimeout(0.5)
            with pytest.raises(TimeoutError):
                second.recv(1)
            first.close()  # the old instance ends: the waiting client is served
            second.settimeout(5)
            assert second.recv(1) == b"b"
    wait_until(lambda: server.service_status(name)["active"] == 0, 10)


def _unix_echo(path: Path, kind: int, payload: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, kind) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(payload)
        return sock.recv(100)


@pytest.mark.parametrize("mode", MODES)
def test_reload_hands_an_address_to_the_entry_that_replaces_it(serve, tmp_path: Path,
                                                                mode: str) -> None:
    path = tmp_path / "svc.sock"
    stream = f"{path} stream unix nowait {U} internal echo\n"
    server = serve(stream, mode=mode)
    assert _unix_echo(path, socket.SOCK_STREAM, b"as stream") == b"as stream"
    # A reload that fails after the hand-over puts the old socket back.
    server.conf.write_text(f"{path} seqpacket unix nowait {U} internal echo\n"
                           f"{tmp_path}/no/such/dir.sock stream unix nowait {U} internal echo\n")
    server.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload_failed" in server.log(), 10)
    assert _unix_echo(path, socket.SOCK_STREAM, b"restored") == b"restored"
    # The same change alone goes through: the removed entry lets go of the path first.
    server.conf.write_text(f"{path} seqpacket unix nowait {U} internal echo\n")
    server.send_signal(signal.SIGHUP)
    wait_until(lambda: "reloaded added=1 changed=0 removed=1" in server.log(), 10)
    assert _unix_echo(path, socket.SOCK_SEQPACKET, b"as seqpacket") == b"as seqpacket"


@pytest.mark.parametrize("mode", ["pool", "classic"])
def test_operator_signals_sent_to_the_whole_group_leave_children_alone(serve, mode: str) -> None:
    """`systemctl kill -s USR2` (every process of the unit) or `kill -HUP -PGID` reach the
    workers and children too: they ignore the master's operator signals instead of dying
    with their connections."""
    server = serve("127.0.0.1:0 stream tcp nowait nobody internal echo\n", mode=mode)
    port = server.port()
    held = socket.create_connection(("127.0.0.1", port), timeout=10)
    held.sendall(b"a")
    assert held.recv(1) == b"a"  # a worker (or a classic child) serves it now
    children = wait_until(server.workers, 20, "the children")
    assert isinstance(children, list)
    for pid in children:
        for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN,
                    signal.SIGTTOU):
            os.kill(pid, sig)
    held.sendall(b"b")
    assert held.recv(1) == b"b"  # the same process still serves it
    held.close()
    assert all(os.path.exists(f"/proc/{pid}") for pid in children)
