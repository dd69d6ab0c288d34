"""Hostile review, round six (issue 18's speed-ups): each attack made for real, on loopback.

Attacks on: SPAWNED recorded as said and checked against /proc only when the master
acts on it (``Instances._descends``); accepting in the turn that frees room
(``AcceptStage.catch_up``); a worker's turn reports in one write (``UpWriter.send_all``);
a launching pool growing up to cores + 1 (``Pool._launch_bound``). The worker attacks
become a taken-over worker as tests/test_attack_worker.py does (``pidfd_getfd`` of
the worker's own descriptors). A test that fails shows a defect still there.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from conftest import (
    IS_ROOT,
    TEST_USER,
    Server,
    alive,
    children_of,
    tcp_exchange,
    wait_until,
)
from test_attack_worker import steal_channel, steal_upward, worker_of

from poolinetd.pool import wire

needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (pidfd_getfd of a worker)")

CAT = ("127.0.0.1:0 on socktype=stream, wait=no, user={user}, exec=/bin/cat, args=cat, "
       "pool_min=1, max_child_per_ip=unlimited{extra};\n")


def _conn_ids(channel: socket.socket, count: int) -> list[int]:
    """The ids of the next ``count`` connections the master queues on a stolen channel
    (their fds closed: the attacker only wants the ids)."""
    ids: list[int] = []
    channel.settimeout(30)  # CI's machine is busy: the master may take a while to send
    while len(ids) < count:
        data, fds = wire.recv(channel)
        for fd in fds:
            os.close(fd)
        ids.extend(info.conn_id for info in wire.decode(data).conns)
    return ids


def _take_over(pid: int) -> tuple[socket.socket, int]:
    """Stop worker ``pid`` (what it is sent, the attacker reads) and steal its channel
    and upward pipe."""
    os.kill(pid, signal.SIGSTOP)
    return steal_channel(pid), steal_upward(pid)


def _log_value(server: Server, event: str, key: str) -> int:
    for line in server.log().splitlines():
        if f" {event} " in f" {line} " and f"{key}=" in line:
            return int(line.split(f"{key}=")[1].split()[0])
    return 0


def _stop_stray(pid: int) -> None:
    """SIGTERM a master this test did not start itself (an upgrade's), wait until gone."""
    if pid > 0 and alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


# -- item 1: SPAWNED names a process of the master's own -----------------------------------------


@pytest.mark.root
@needs_root
def test_a_worker_cannot_make_the_old_master_kill_the_new_one_in_an_upgrade(serve) -> None:
    """``_descends`` accepts a pid whose parent (or grandparent) is the *master*, whether
    or not the worker is gone: every worker, every program of every service and, during
    a binary upgrade, the new master itself (the old master's child) pass. A taken-over
    worker (user nobody) names the new master in a SPAWNED for one of its connections
    and dies: the old master adopts the new master as an orphan of the cat service,
    waits for it through the whole hand-over, and at its stop deadline SIGKILLs it
    (``kill_programs``). Every service goes down with the new master."""
    server = serve(CAT.format(user=TEST_USER, extra=", pool_max=1"), "--graceful-timeout", "3")
    worker = worker_of(server, "cat")
    channel, up = _take_over(worker)
    new_master = 0
    try:
        client = socket.create_connection(("127.0.0.1", server.port(0)), timeout=30)
        (iid,) = _conn_ids(channel, 1)
        server.send_signal(signal.SIGUSR2)  # a binary upgrade: a new master, the old's child
        found = wait_until(lambda: _log_value(server, "upgrade_started", "new_pid"), 30,
                           "the new master started")
        assert isinstance(found, int)
        new_master = found
        os.write(up, wire.frame(wire.encode_spawned(iid, new_master)))
        time.sleep(0.5)  # the master reads it
        os.kill(worker, signal.SIGKILL)
        client.close()
        assert server.proc.wait(60) == 0, server.log()  # the old master handed over, exited
        assert "upgrade_ready" in server.log(), server.log()
        time.sleep(0.5)
        assert alive(new_master), ("the old master killed the new one\n" + server.log())
        assert tcp_exchange(server.port(0), b"still served", timeout=20) == b"still served"
        assert "program_orphaned" not in server.log(), server.log()
    finally:
        os.close(up)
        channel.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)
        _stop_stray(new_master)


def _commands_sleeping(marker: str) -> list[int]:
    """Pids of the master's tcp_wrappers command children whose shell runs ``marker``
    (the command's /bin/sh is the child of the master's waiter child)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            if cmdline.split(b"\0")[1:2] == [b"-c"] and marker.encode() in cmdline:
                stat = Path(f"/proc/{entry}/stat").read_text()
                out.append(int(stat[stat.rindex(")") + 2 :].split()[1]))
    return sorted(out)


@pytest.mark.root
@needs_root
def test_a_worker_cannot_steal_the_reaping_of_the_masters_tcp_wrappers_commands(
        serve, tmp_path: Path) -> None:
    """A root service's tcp_wrappers ``spawn`` command runs in a child of the master (a
    waiter, as the service's user: root here). A taken-over cat worker (user nobody)
    names four such waiters in SPAWNED for four of its connections, and dies:
    ``_descends`` accepts them (their parent is the master), so the master adopts
    them as orphans of cat. When they exit, ``child_exited`` gives their pids to the
    orphans first and the commands' own ledger never hears of them: the four stay
    counted for ever against MAX_PER_SOURCE (4 per client address and service), so
    127.0.0.1's connections to that root service never run their spawn command again
    (``wrappers_command_refused reason=source``) until a restart. (At a stop deadline
    the master would also SIGKILL those root commands, which a stop never kills.)"""
    marks = tmp_path / "marks"
    marker = f"ran-{time.monotonic_ns()}"
    (tmp_path / "hosts.allow").write_text(
        f"echo: ALL: spawn sleep 6 ; echo {marker} >> {marks}\n")
    (tmp_path / "hosts.deny").write_text("")
    root_echo = "127.0.0.1:0 stream tcp nowait root internal echo\n"
    server = serve(CAT.format(user=TEST_USER, extra=", pool_max=1") + root_echo,
                   "--tcp-wrappers", "--tcp-wrappers-dir", str(tmp_path))
    cat, echo = server.port(0), server.port(1)
    worker = worker_of(server, "cat")
    channel, up = _take_over(worker)
    clients: list[socket.socket] = []
    try:
        for _ in range(4):
            assert tcp_exchange(echo, b"ping", timeout=20) == b"ping"
        waiters = wait_until(lambda: (lambda p: p if len(p) == 4 else None)(
            _commands_sleeping(marker)), 20, "four spawn commands running")
        assert isinstance(waiters, list)
        assert set(waiters) <= set(children_of(server.pid))  # the master's own children
        for waiter in waiters:
            clients.append(socket.create_connection(("127.0.0.1", cat), timeout=30))
            (iid,) = _conn_ids(channel, 1)
            os.write(up, wire.frame(wire.encode_spawned(iid, waiter)))
        time.sleep(0.5)  # the master reads them
        os.kill(worker, signal.SIGKILL)
        wait_until(lambda: not any(alive(w) for w in waiters), 30, "the commands ended")
        wait_until(lambda: marks.exists() and marks.read_text().count(marker) == 4, 20,
                   "the four commands' marks")
        time.sleep(1.5)  # (the master reaps them; the orphans' prune runs once a second)
        assert tcp_exchange(echo, b"again", timeout=20) == b"again"
        wait_until(lambda: marks.read_text().count(marker) == 5
                   or "wrappers_command_refused" in server.log(), 20, "the fifth command")
        assert marks.read_text().count(marker) == 5, (
            "the fifth spawn command never ran\n" + server.log())
    finally:
        for sock in clients:
            sock.close()
        os.close(up)
        channel.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)


# -- item 4: a worker that never says SPAWNED makes the pool grow -----------------------------


def _pool_workers(server: Server, name: str) -> list[int]:
    """The master's children that are workers of service ``name`` (by process title)."""
    out = []
    for pid in server.workers():
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(
                    f"poolinetd: {name}".encode()):
                out.append(pid)
    return out


@pytest.mark.root
@needs_root
def test_a_worker_hoarding_its_launches_grows_the_pool_only_to_cores_plus_one(serve) -> None:
    """A taken-over program worker reads what it is sent (so it never looks stalled) and
    never says SPAWNED or DONE: it sits at launch_depth for ever, so every READY worker
    is "busy launching" as soon as the other one is too. The pool grows one worker at
    a time and never past launch_workers (cores + 1), however many clients come, and
    the others are served by the honest workers."""
    from poolinetd.config.spec import PROGRAM_LAUNCH_DEPTH, PROGRAM_LAUNCH_WORKERS

    server = serve(CAT.format(user=TEST_USER, extra=", pool_max=16"))
    name = "cat"
    worker = worker_of(server, name)
    channel, up = _take_over(worker)
    hoarded: list[socket.socket] = []
    served: list[socket.socket] = []
    most = 0
    try:
        for _ in range(PROGRAM_LAUNCH_DEPTH):
            hoarded.append(socket.create_connection(("127.0.0.1", server.port(0)), timeout=30))
        assert len(_conn_ids(channel, PROGRAM_LAUNCH_DEPTH)) == PROGRAM_LAUNCH_DEPTH
        for i in range(24):
            sock = socket.create_connection(("127.0.0.1", server.port(0)), timeout=30)
            sock.sendall(b"x%d\n" % i)
            served.append(sock)
            most = max(most, len(_pool_workers(server, name)))
        for i, sock in enumerate(served):
            assert recv_line(sock) == b"x%d\n" % i  # cat echoes: each one was launched
            most = max(most, len(_pool_workers(server, name)))
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            most = max(most, len(_pool_workers(server, name)))
            time.sleep(0.05)
        assert 2 <= most <= PROGRAM_LAUNCH_WORKERS, most
    finally:
        for sock in hoarded + served:
            sock.close()
        os.close(up)
        channel.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)


def recv_line(sock: socket.socket) -> bytes:
    sock.settimeout(30)
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(100)
        if not chunk:
            break
        data += chunk
    return data


# -- item 2: accepting in the turn that frees room -------------------------------------------


@pytest.mark.process
def test_room_coming_back_takes_one_waiting_client_never_more_than_max_child(serve) -> None:
    """max_child=1: the listener is unpolled while one cat runs and four clients wait in
    the backlog. Each time the running client leaves, the DONE frees one slot and
    ``catch_up`` accepts in that turn: exactly one (the next, in backlog order), never
    two, and the service is never seen with more than one program."""
    server = serve(CAT.format(user=TEST_USER, extra=", pool_max=1, max_child=1"))
    name = server.listeners[0]["service"]
    assert isinstance(name, str)
    socks = []
    for i in range(5):
        sock = socket.create_connection(("127.0.0.1", server.port(0)), timeout=30)
        sock.sendall(b"c%d\n" % i)
        socks.append(sock)
        time.sleep(0.05)  # backlog order
    try:
        for i, sock in enumerate(socks):
            assert recv_line(sock) == b"c%d\n" % i
            status = server.service_status(name)
            assert status["active"] == 1, status
            for later in socks[i + 1:]:  # still in the backlog: not accepted, nothing read
                later.setblocking(False)
                with pytest.raises(BlockingIOError):
                    later.recv(10)
                later.setblocking(True)
            sock.close()
        wait_until(lambda: server.service_status(name)["active"] == 0, 20, "all ended")
    finally:
        for sock in socks:
            sock.close()


# -- item 3: a turn's SPAWNED, DONE and STATS in one write ------------------------------------


@pytest.mark.process
def test_programs_that_end_in_the_turn_they_start_leave_nothing_counted(serve) -> None:
    """/bin/true ends at once, often in the very turn its worker launched it: its
    SPAWNED and DONE go up in the same write, SPAWNED first. Under 60 concurrent
    clients every instance ends in the master's books (active 0, no program left),
    and no frame is ever refused as a protocol error."""
    server = serve(f"127.0.0.1:0 on socktype=stream, wait=no, user={TEST_USER}, "
                   "exec=/bin/true, args=true, max_child_per_ip=unlimited;\n")
    name = server.listeners[0]["service"]
    assert isinstance(name, str)
    socks = [socket.create_connection(("127.0.0.1", server.port(0)), timeout=30)
             for _ in range(60)]
    try:
        for sock in socks:
            assert recv_line(sock) == b""  # true says nothing and exits: EOF
    finally:
        for sock in socks:
            sock.close()
    wait_until(lambda: server.service_status(name)["active"] == 0, 20, "every instance ended")
    log = server.log()
    assert "wire_error" not in log and "internal_error" not in log, log
