"""The engine and both dispatchers driven with a fake OS seam (no real children), in ms.

Real: listening sockets on loopback, the channel socketpairs, the selector.
Fake (tests/engine_fakes.FakeSystem): clock, fork, waitpid, kill, the unread
count of a channel. A fake worker is the test holding the worker's end of
its channel and of its upward pipe; a fake classic child is a pid whose exit the test queues.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import struct
from collections.abc import Iterator

import pytest
from engine_fakes import FakeWorker, Rig, make_rig

from poolinetd.classic.dispatcher import ForkDispatcher
from poolinetd.net import preamble
from poolinetd.pool import wire
from poolinetd.pool.dispatcher import STALL_KILL, STALL_TIMEOUT, PoolDispatcher

ECHO = "127.0.0.1:0 stream tcp nowait {user} internal echo\n"
ECHO_KV = "127.0.0.1:0 on socktype=stream, user={user}, args=echo, {extra};\n"


@pytest.fixture
def rigs() -> Iterator[list[Rig]]:
    made: list[Rig] = []
    yield made
    for rig in reversed(made):  # each engine restores the signal setup it found
        rig.close()


def pool_rig(rigs: list[Rig], conf: str, **kw: object) -> Rig:
    rig = make_rig(conf, PoolDispatcher, **kw)
    rigs.append(rig)
    return rig


def fork_rig(rigs: list[Rig], conf: str, **kw: object) -> Rig:
    rig = make_rig(conf, ForkDispatcher, **kw)
    rigs.append(rig)
    return rig


def test_pool_hand_off_and_done(rigs: list[Rig]) -> None:
    rig = pool_rig(rigs, ECHO)
    worker = rig.boot_worker()
    lst = rig.listener()
    assert lst.polled
    client = rig.connect()
    rig.turn()
    msg, fd = worker.receive()
    assert msg.kind == wire.CONN and fd is not None
    os.close(fd)
    rt = lst.rt
    assert rt.instances == 1 and rt.stats.accepted == 1
    worker.send(wire.encode_done([msg.ident])[0])
    rig.turn()
    assert rt.instances == 0
    assert rig.engine.status()["services"][0]["active"] == 0  # type: ignore[index]
    client.close()


def one_full_worker(rigs: list[Rig], waiting: int = 0
                    ) -> tuple[Rig, FakeWorker, wire.Message, list[socket.socket]]:
    """A pool of one worker with room for one connection, holding it: (rig, worker, that
    CONN, the clients). ``waiting`` more clients wait in the kernel's backlog."""
    rig = pool_rig(rigs, ECHO_KV.format(user="{user}", extra="pool_max=1, worker_connections=1"))
    worker = rig.boot_worker()
    clients = [rig.connect() for _ in range(1 + waiting)]
    rig.turn()
    msg = take(worker)
    assert not rig.listener().polled  # the only worker is full: nothing more is accepted
    return rig, worker, msg, clients


def take(worker: FakeWorker, timeout: float = 5.0) -> wire.Message:
    """The next connection the worker was handed (its fd closed, as a worker would)."""
    msg, fd = worker.receive(timeout=timeout)
    assert msg.kind == wire.CONN and fd is not None
    os.close(fd)
    return msg


def test_pool_backpressure_waits_in_the_backlog(rigs: list[Rig]) -> None:
    rig, worker, msg, clients = one_full_worker(rigs, waiting=1)
    rig.turn()
    assert worker.receive_nowait() is None  # the second client waits in the kernel
    worker.send(wire.encode_done([msg.ident])[0])
    rig.turn()
    rig.turn()
    take(worker)
    for c in clients:
        c.close()


def test_room_coming_back_takes_the_waiting_client_in_the_same_turn(rigs: list[Rig]) -> None:
    """When a DONE (or SPAWNED) frees room, the master accepts what waits in the backlog
    in that same turn, without polling the listener first (a turn and two epoll_ctl per
    launched program under load); with nothing waiting, the listener is polled again."""
    rig, worker, msg, clients = one_full_worker(rigs, waiting=1)
    lst = rig.listener()
    worker.send(wire.encode_done([msg.ident])[0])
    rig.turn()  # one turn: the DONE, and the second client accepted and handed
    msg2 = take(worker, timeout=0.5)
    assert msg2.ident != msg.ident
    assert not lst.polled  # full again: the listener was never registered in between
    worker.send(wire.encode_done([msg2.ident])[0])
    rig.turn()  # room, and an empty backlog: polled again
    assert lst.polled and worker.receive_nowait() is None
    clients.append(rig.connect())
    rig.turn()
    take(worker)
    for c in clients:
        c.close()


def test_pool_stop_sends_stop_then_kills_after_the_deadline(rigs: list[Rig]) -> None:
    rig = pool_rig(rigs, ECHO)
    worker = rig.boot_worker()
    rig.engine.begin_stop(5.0, "test")
    assert rig.engine.runtimes[0].listeners == []
    msg, _ = worker.receive()
    assert msg.kind == wire.STOP
    assert rig.engine.dispatcher.busy()
    rig.system.now += 6.0
    rig.turn()
    assert (worker.pid, signal.SIGKILL) in rig.system.killed
    rig.system.exit(worker.pid, 0)
    rig.signal_child()
    assert not rig.engine.dispatcher.busy()


def test_pool_worker_that_stops_reading_is_replaced_then_killed(rigs: list[Rig]) -> None:
    rig = pool_rig(rigs, ECHO_KV.format(user="{user}", extra="pool_min=1, pool_max=4"))
    worker = rig.boot_worker()
    client = rig.connect()
    rig.turn()
    rig.system.unread_bytes = 768  # it never reads what it was sent
    for _ in range(int(STALL_TIMEOUT) + 2):
        rig.system.now += 1.0
        rig.turn()
    status = rig.engine.status()["services"][0]  # type: ignore[index]
    assert status["workers"]["stalled"] == 1
    assert len(rig.system.forked) == 2  # a replacement was started
    pool = rig.engine.dispatcher.pools[rig.engine.runtimes[0]]  # type: ignore[attr-defined]
    assert pool.pick() is None or pool.pick() != worker.pid
    for _ in range(int(STALL_KILL) + 2):
        rig.system.now += 1.0
        rig.turn()
    assert (worker.pid, signal.SIGKILL) in rig.system.killed
    client.close()


def test_pool_busy_worker_that_keeps_reading_is_not_stalled(rigs: list[Rig]) -> None:
    rig = pool_rig(rigs, ECHO)
    worker = rig.boot_worker()
    rig.connect().close()
    rig.turn()
    rig.system.unread_bytes = 768
    for _ in range(int(STALL_TIMEOUT) * 3):
        rig.system.now += 1.0
        worker.send(wire.encode_done([999_999])[0])  # it keeps talking: alive
        rig.turn()
    assert rig.system.killed == []
    assert rig.engine.status()["services"][0]["workers"]["stalled"] == 0  # type: ignore[index]


def test_fork_reaps_every_child_of_one_sigchld(rigs: list[Rig]) -> None:
    rig = fork_rig(rigs, ECHO)
    clients = [rig.connect() for _ in range(3)]
    rig.turn()
    assert len(rig.system.forked) == 3
    rt = rig.engine.runtimes[0]
    assert rt.instances == 3
    for pid, _ in rig.system.forked:
        rig.system.exit(pid, 0)
    rig.system.exit(424242, 0)  # not ours: logged, ignored
    rig.signal_child()
    assert rt.instances == 0
    for c in clients:
        c.close()


def test_fork_max_child_spans_a_reload(rigs: list[Rig]) -> None:
    conf = ECHO_KV.format(user="{user}", extra="max_child=1")
    rig = fork_rig(rigs, conf)
    c1 = rig.connect()
    rig.turn()
    (pid, _), = rig.system.forked
    assert not rig.listener().polled
    rig.reload(conf.replace("max_child=1", "max_child=1, conn_timeout=5"))
    assert len(rig.engine.runtimes) == 2
    new = rig.listener()
    assert new.rt is not rig.engine.runtimes[-1]  # the listener moved to the new generation
    rig.turn()
    assert not new.polled  # the old generation's instance still counts
    rig.system.exit(pid, 0)
    rig.signal_child()
    rig.turn()
    assert new.polled
    c1.close()


def test_per_source_counts_survive_reloads_that_drop_the_limit(rigs: list[Rig]) -> None:
    limited = ECHO_KV.format(user="{user}", extra="max_child_per_ip=2")
    rig = fork_rig(rigs, limited)
    clients = [rig.connect(), rig.connect()]
    rig.turn()
    pids = [pid for pid, _ in rig.system.forked]
    rig.reload(ECHO_KV.format(user="{user}", extra="conn_timeout=7"))
    for pid in pids:
        rig.system.exit(pid, 0)
    rig.signal_child()
    rig.reload(limited)
    late = rig.connect()
    rig.turn(2)
    rt = rig.listener().rt
    assert rt.stats.refused_by == {}, rt.admission.per_ip
    assert len(rig.system.forked) == 3  # served: the old connections were uncounted
    for c in [*clients, late]:
        c.close()


def test_an_exception_in_one_event_is_logged_not_fatal(rigs: list[Rig],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    rig = fork_rig(rigs, ECHO)
    calls = {"n": 0}
    real = rig.engine.dispatcher.hand_off

    def flaky(*args: object) -> bool:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real(*args)  # type: ignore[arg-type]

    rig.engine.dispatcher.hand_off = flaky  # type: ignore[method-assign]
    a = rig.connect()
    rig.turn()
    b = rig.connect()
    rig.turn()
    assert "internal_error" in [r.msg for r in caplog.records]
    assert len(rig.system.forked) == 1
    a.close()
    b.close()


def test_an_exception_while_catching_up_is_logged_and_the_listener_still_polled(
        rigs: list[Rig], caplog: pytest.LogCaptureFixture) -> None:
    """catch_up accepts outside a readiness event (in the turn's refresh): a bug there
    is contained as it is in an event, and the service is still re-decided."""
    rig, worker, msg, clients = one_full_worker(rigs)
    real = rig.engine.accept.accept_batch

    def broken(_lst: object) -> None:
        raise RuntimeError("boom")

    rig.engine.accept.accept_batch = broken  # type: ignore[method-assign,assignment]
    worker.send(wire.encode_done([msg.ident])[0])
    rig.turn()
    assert "internal_error" in [r.msg for r in caplog.records]
    assert rig.listener().polled  # re-decided in the same turn: the next client is seen
    rig.engine.accept.accept_batch = real  # type: ignore[method-assign]
    clients.append(rig.connect())
    rig.turn()
    take(worker)
    for c in clients:
        c.close()


class _Hello:
    """A preamble reader wanting the line ``HELLO\\n``."""

    limit = 16

    def feed(self, data: bytes, eof: bool) -> preamble.Result:
        if data.startswith(b"HELLO\n"):
            return preamble.Proceed(6, peer=("192.0.2.7", 4242))
        if b"HELLO\n".startswith(data) and not eof:
            return preamble.NeedMore()
        return preamble.Refuse("bad_hello")


@pytest.mark.parametrize("dispatcher", ["pool", "fork"])
def test_preamble_is_consumed_exactly_and_gives_the_peer(rigs: list[Rig], dispatcher: str) -> None:
    make = pool_rig if dispatcher == "pool" else fork_rig
    rig = make(rigs, ECHO, preambles=lambda service: _Hello)
    worker = rig.boot_worker() if dispatcher == "pool" else None
    client = rig.connect()
    client.sendall(b"HEL")
    rig.turn()
    assert rig.engine.runtimes[0].pending == 1
    client.sendall(b"LO\nrest of the data")
    rig.turn()
    if worker is not None:
        msg, fd = worker.receive()
        assert msg.conns[0].peer == "192.0.2.7 4242"
    else:
        fd = os.dup(rig.system.forked[0][1])
    assert fd is not None
    with socket.socket(fileno=fd) as conn:
        conn.settimeout(5)
        assert conn.recv(100) == b"rest of the data"
    inst = rig.engine.instances[next(iter(rig.engine.instances))]
    assert inst.source == inst.rt.admission.source("192.0.2.7")  # counted as the real client
    client.close()


def test_preamble_refusals_and_the_deadline(rigs: list[Rig]) -> None:
    rig = fork_rig(rigs, ECHO, preambles=lambda service: _Hello)
    bad = rig.connect()
    bad.sendall(b"GET / HTTP/1.0\r\n")
    silent = rig.connect()
    rig.turn()
    rt = rig.engine.runtimes[0]
    assert rt.stats.refused_by.get("bad_hello") == 1
    assert rt.pending == 1
    rig.system.now += preamble.DEADLINE + 1
    rig.turn()
    assert rt.stats.refused_by.get("preamble_timeout") == 1
    assert rt.pending == 0 and rig.system.forked == []
    bad.close()
    silent.close()


def test_status_has_the_same_shape_in_both_modes(rigs: list[Rig]) -> None:
    pool = pool_rig(rigs, ECHO).engine.status()
    fork = fork_rig(rigs, ECHO).engine.status()
    assert pool["mode"] == "pool" and fork["mode"] == "classic"
    assert set(pool["services"][0]) == set(fork["services"][0])  # type: ignore[index]


def test_a_limit_added_by_reload_sees_the_running_connections(rigs: list[Rig]) -> None:
    rig = fork_rig(rigs, ECHO_KV.format(user="{user}", extra="conn_timeout=7"))
    clients = [rig.connect(), rig.connect()]
    rig.turn()
    assert len(rig.system.forked) == 2
    rig.reload(ECHO_KV.format(user="{user}", extra="max_child_per_ip=2"))
    third = rig.connect()
    rig.turn(2)
    assert len(rig.system.forked) == 2
    assert rig.listener().rt.stats.refused_by == {"max_child_per_ip": 1}
    for c in [*clients, third]:
        c.close()


def test_a_worker_cannot_make_the_master_signal_a_process_that_is_not_its_program(
        rigs: list[Rig]) -> None:
    """A worker runs as the service's user: what it says must not steer root's kill()."""
    rig = pool_rig(rigs, ECHO)
    worker = rig.boot_worker()
    clients = [rig.connect(), rig.connect()]
    rig.turn()
    first, fd1 = worker.receive()
    second, fd2 = worker.receive()
    for fd in (fd1, fd2):
        assert fd is not None
        os.close(fd)
    rig.system.identities[4242] = (1, 77)  # a process of someone else's (parent: init)
    rig.system.identities[5151] = (worker.pid, 99)  # the worker's real program
    worker.send(wire.encode_spawned(first.ident, 4242))
    worker.send(wire.encode_spawned(second.ident, 5151))
    worker.send(wire.encode_done([999_999])[0])  # an id that is not its own: ignored
    rig.turn(2)
    rt = rig.engine.runtimes[0]
    # Counted as said (its own instances only); /proc is read when the master would act.
    assert rt.programs == 2 and rt.instances == 2
    rig.engine.begin_stop(0.0, "test")
    rig.system.now += 1.0
    rig.turn()
    killed = {pid for pid, sig in rig.system.killed if sig == signal.SIGKILL}
    assert 5151 in killed and 4242 not in killed
    rig.system.identities[5151] = (1, 100)  # the pid now belongs to a later process
    rig.system.killed.clear()
    rig.system.now += 1.0
    rig.turn()
    assert 5151 not in {pid for pid, _ in rig.system.killed}
    for c in clients:
        c.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("kind", ["conn", "lend", "logfd"])
def test_a_worker_cannot_send_the_master_any_fd(rigs: list[Rig], kind: str) -> None:
    """A taken-over worker tries to send fds with messages of kinds that carry them: the
    master's end of the channel is shut for reading, so the send fails (EPIPE) and no
    fd ever reaches the root master (whose last close of one could block it)."""
    rig = pool_rig(rigs, ECHO_KV.format(user="{user}", extra="pool_max=1"))
    worker = rig.boot_worker()
    before = open_fds()
    for _ in range(3):
        r, w = os.pipe()
        if kind == "conn":
            fds = [r] * wire.MAX_CONN_BATCH
            payload = wire.encode_conns([wire.ConnInfo(i, socket.AF_INET, "")
                                           for i in range(wire.MAX_CONN_BATCH)])
        else:
            fds = [r]
            payload = wire.encode_lend(1) if kind == "lend" else wire.encode_logfd()
        with pytest.raises(BrokenPipeError):
            wire.send_fds(worker.channel, payload, fds)
        os.close(r)
        os.close(w)
        rig.turn()
    assert open_fds() - before == 0
    assert rig.engine.dispatcher.workers[worker.pid].open  # type: ignore[attr-defined]


def test_connections_lost_inside_a_hand_off_leave_no_per_source_count(rigs: list[Rig]) -> None:
    """The 16th hand-off of a batch sends the outbox; its worker is gone and no other can
    take them: all 16 are lost, the one being handed off included, and every count
    (instances, the per-source tracker) returns to zero."""
    rig = pool_rig(rigs, ECHO_KV.format(user="{user}",
                                        extra="pool_max=1, max_child_per_ip=100"))
    worker = rig.boot_worker()
    lst = rig.listener()
    rt = lst.rt
    clients = [rig.connect() for _ in range(wire.MAX_CONN_BATCH)]
    rig.wait_backlog(lst, len(clients))
    worker.close()  # it died (or a hostile one closed its ends)
    rig.engine.accept.accept_batch(lst)
    rig.workers.remove(worker)
    rig.turn(3)
    assert rt.instances == 0
    assert rt.admission.tracker.running(rt.admission.source("127.0.0.1")) == 0
    assert rt.stats.refused_by.get("no_room") == wire.MAX_CONN_BATCH


def test_a_batch_for_a_dead_worker_goes_to_the_other(rigs: list[Rig]) -> None:
    rig = pool_rig(rigs, ECHO_KV.format(user="{user}", extra="pool_min=2, pool_max=2"))
    a, b = rig.boot_worker(), rig.boot_worker()
    lst = rig.listener()
    clients = [rig.connect() for _ in range(20)]
    rig.wait_backlog(lst, len(clients))
    before = open_fds()
    first = rig.engine.dispatcher.pools[lst.rt].pick()  # type: ignore[attr-defined]
    dead, alive = (a, b) if first == a.pid else (b, a)
    dead.close()
    rig.engine.accept.accept_batch(lst)
    got = []
    while (m := alive.receive_nowait()) is not None:
        assert m[1] is not None
        got.append(m[0].ident)
        os.close(m[1])
    assert len(got) == 20 and lst.rt.instances == 20
    # The dead worker's two ends (channel, pipe) and the master's; no connection fd kept.
    assert open_fds() - before == -4
    rig.workers.remove(dead)


def test_stop_at_max_requests_comes_after_the_batch(rigs: list[Rig]) -> None:
    rig = pool_rig(rigs, ECHO_KV.format(user="{user}", extra="pool_max=2, max_requests=2"))
    worker = rig.boot_worker()
    lst = rig.listener()
    clients = [rig.connect() for _ in range(3)]
    rig.wait_backlog(lst, len(clients))
    rig.engine.accept.accept_batch(lst)
    kinds = []
    while (m := worker.receive_nowait()) is not None:
        kinds.append(m[0].kind)
        if m[1] is not None:
            os.close(m[1])
    assert kinds == [wire.CONN, wire.CONN, wire.STOP]


@pytest.mark.parametrize("make", [pool_rig, fork_rig], ids=["pool", "classic"])
def test_global_caps_change_only_with_a_reload_that_applies(rigs: list[Rig], make) -> None:
    """The caps are part of the plan: a reload that loads but cannot open a new listener
    changes nothing, the caps included; one that applies changes them."""
    rig = make(rigs, "defaults on max_connections=50;\n" + ECHO)
    assert rig.engine.ledger.caps.max_connections == 50
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    rig.conf[0] = ("defaults on max_connections=1, max_programs=1;\n" + ECHO
                   + f"127.0.0.1:{port} stream tcp nowait {{user}} internal discard\n")
    try:
        assert not rig.engine.reload()  # the added listener's port is taken
        assert rig.engine.ledger.caps.max_connections == 50
        assert rig.engine.ledger.caps.max_programs is None
        assert rig.engine.reloads == 0
    finally:
        busy.close()
    assert rig.engine.reload()
    assert rig.engine.ledger.caps.max_connections == 1
    assert rig.engine.ledger.caps.max_programs == 1


def test_a_full_preamble_stage_still_admits_a_new_source(rigs: list[Rig],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 21: four sources at a quarter each filled the stage and a legitimate client
    waited out the deadline. Now a newcomer from a lighter source takes the place of the
    heaviest source's oldest connection; the heaviest source itself gets no more."""
    monkeypatch.setattr(preamble, "MAX_PENDING", 8)
    monkeypatch.setattr(preamble, "MAX_PENDING_PER_SOURCE", 2)
    rig = fork_rig(rigs, ECHO, preambles=lambda service: _Hello)
    port = rig.listener().bound.port
    silent = []
    for i in range(4):  # four sources, two silent connections each: the stage is full
        for _ in range(2):
            sock = socket.socket()
            sock.bind((f"127.0.0.{i + 2}", 0))
            sock.connect(("127.0.0.1", port))
            silent.append(sock)
    rig.turn(3)
    rt = rig.engine.runtimes[0]
    assert rt.pending == 8
    legit = socket.socket()
    legit.bind(("127.0.0.9", 0))
    legit.connect(("127.0.0.1", port))
    legit.sendall(b"HELLO\nhi")
    rig.turn(3)
    assert rt.stats.refused_by.get("preamble_evicted") == 1
    assert len(rig.system.forked) == 1  # the newcomer was served
    assert rt.pending == 7
    for sock in [*silent, legit]:
        sock.close()


def test_classic_mode_caps_one_source_at_what_it_forks_quickly(rigs: list[Rig]) -> None:
    """Issue 21: under the safe default one source could make the classic master fork up
    to 1,024 children (a quarter of the pool's capacity) before anyone else was served.
    Classic mode caps that share at CLASSIC_SOURCE_SHARE; a written limit still holds."""
    from poolinetd.classic.dispatcher import CLASSIC_SOURCE_SHARE

    pool = pool_rig(rigs, ECHO).engine.runtimes[0]
    assert pool.service.limits.safe_default
    assert pool.admission.source_limits.max_child_per_ip == pool.service.limits.max_child_per_ip
    assert pool.service.limits.max_child_per_ip > CLASSIC_SOURCE_SHARE
    rig = fork_rig(rigs, ECHO)
    rt = rig.engine.runtimes[0]
    assert rt.admission.source_limits.max_child_per_ip == CLASSIC_SOURCE_SHARE
    clients = [rig.connect() for _ in range(CLASSIC_SOURCE_SHARE + 3)]
    rig.turn(5)
    assert len(rig.system.forked) == CLASSIC_SOURCE_SHARE
    assert rt.stats.refused_by.get("max_child_per_ip") == 3
    other = socket.socket()
    other.bind(("127.0.0.2", 0))
    other.connect(("127.0.0.1", rig.listener().bound.port))
    rig.turn(2)
    assert len(rig.system.forked) == CLASSIC_SOURCE_SHARE + 1  # another source is served
    written = fork_rig(rigs, ECHO_KV.format(user="{user}", extra="max_child_per_ip=500"))
    assert written.engine.runtimes[0].admission.source_limits.max_child_per_ip == 500
    for sock in [*clients, other]:
        sock.close()


def _drop_all_and_lock(sock: socket.socket) -> None:
    """What a taken-over worker did: a locked drop-all filter on the socket it holds."""
    insn = struct.pack("HBBI", 0x06, 0, 0, 0)  # BPF_RET | BPF_K, accept 0 bytes
    program = ctypes.create_string_buffer(insn, len(insn))
    sock.setsockopt(socket.SOL_SOCKET, 26, struct.pack("HL", 1, ctypes.addressof(program)))
    sock.setsockopt(socket.SOL_SOCKET, 44, 1)  # SO_LOCK_FILTER: not even root detaches it


@pytest.mark.parametrize("poison", ["filter", "connect"])
def test_a_lent_socket_poisoned_by_its_worker_is_replaced(rigs: list[Rig], poison: str) -> None:
    """Issue 21: a taken-over datagram worker locked a drop-all filter on its lent socket
    and died: the service answered nothing until a restart, status said serving. The
    master now checks a socket that comes back and serves on a fresh one."""
    rig = pool_rig(rigs, "127.0.0.1:0 dgram udp wait {user} internal echo\n")
    worker = rig.boot_worker()
    lst = rig.listener()
    port = lst.bound.port
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.sendto(b"wake", ("127.0.0.1", port))
        rig.turn(2)
        msg, fd = worker.receive()
        assert msg.kind == wire.LEND and fd is not None
        with socket.socket(fileno=fd) as lent:
            if poison == "filter":
                _drop_all_and_lock(lent)
            else:
                lent.connect(("127.0.0.1", 9))
        worker.send(wire.encode_done([msg.ident])[0])  # the loan is over
        rig.turn(2)
        assert lst.sock.getsockopt(socket.SOL_SOCKET, 26, 1024) == b""
        assert lst.bound.port == port and lst.sock.getsockname()[1] == port
        client.sendto(b"again", ("127.0.0.1", port))
        assert lst.sock.recv(100, socket.MSG_PEEK) in (b"wake", b"again")  # it receives


def test_text_from_a_worker_never_reaches_roots_terminal_raw(rigs: list[Rig]) -> None:
    """Issue 21, item 7: a BOOT_FAILED reason with OSC/CSI escapes, BEL and CR reached
    `poolinetd status` raw. The master keeps it escaped (and bounded); the table escapes
    every cell again, whatever the master sent."""
    from poolinetd.cli import format_status
    from poolinetd.pool.dispatcher import BOOT_ERROR_MAX

    rig = pool_rig(rigs, ECHO)
    hostile = "\x1b]0;owned\x07\x1b[2J\rroot# " + "x" * 2000
    worker = rig.boot_worker()
    worker.send(wire.encode_boot_failed(hostile))
    rig.turn(2)
    handle = rig.engine.dispatcher.workers[worker.pid]  # type: ignore[attr-defined]
    assert handle.boot_error.startswith("\\x1b]0;owned\\x07\\x1b[2J\\x0droot# ")
    assert len(handle.boot_error) <= BOOT_ERROR_MAX + 40
    assert not any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in handle.boot_error)
    doc = {"pid": 1, "uptime": 1, "reloads": 0, "services": [{
        "service": "echo\x1b[31m", "state": "serving", "listeners": ["127.0.0.1:7"],
        "workers": {"idle": 0, "busy": 0, "booting": 0, "draining": 0},
        "accepted": 0, "refused": 0, "active": 0, "programs": 0, "restarts": 0,
        "last_error": hostile}]}
    table = format_status(doc)
    assert "\x1b" not in table and "\x07" not in table and "\r" not in table
    assert "\\x1b]0;owned\\x07" in table
