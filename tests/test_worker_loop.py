"""The worker loop (pool.worker.Worker) in this process, turn by turn, through its seams.

Real: the channel (a SOCK_SEQPACKET socketpair; the test holds the
master's end, shut for reading as the master has it) and the upward pipe
(the test reads its frames as the master does), speaking the real wire;
loopback sockets, the programs (/bin/true, /bin/sh, reaped through their
pidfds). Injected: the clock (so timeouts need no waiting) and the title
setter (the test process keeps its own). No privilege drop and no signal
handlers: ``Worker.run`` would add those (``take_signals``); the tests call
``start``, ``turn`` and ``close``.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections.abc import Iterator

import pytest
from engine_fakes import services_from
from log_events import Event, named
from log_events import events as events  # the fixture

from poolinetd.config.spec import Service
from poolinetd.pool import wire
from poolinetd.pool.worker import STOP_GRACE_ON_MASTER_LOSS, Worker

ECHO = "127.0.0.1:0 on socktype=stream, user={user}, args=echo, conn_timeout=5;\n"
EXIT_3 = '127.0.0.1:0 stream tcp nowait {user} /bin/sh sh -c "exit 3"\n'
TRUE = "127.0.0.1:0 stream tcp nowait {user} /bin/true true\n"
DGRAM_ECHO = "127.0.0.1:0 dgram udp wait {user} internal echo\n"
WAIT_TRUE = "127.0.0.1:0 dgram udp wait {user} /bin/true true\n"
ECHO_300 = "127.0.0.1:0 stream tcp nowait {user} internal echo\n"  # conn_timeout 300 s


def service(line: str) -> Service:
    return services_from(line)[0]


class Rig:
    """A Worker, the master's end of its channel (non-blocking and shut for reading, as the
    master has it) and the read end of its upward pipe."""

    def __init__(self, svc: Service, log_connections: bool = False) -> None:
        self.master, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.master.shutdown(socket.SHUT_RD)
        self.master.setblocking(False)
        up_read, up_write = wire.upward_pipe()
        self.upward = wire.UpReader(up_read)
        self.heard: list[wire.Message] = []
        self.now = 1000.0
        self.titles: list[str] = []
        self.worker = Worker(theirs, wire.UpWriter(up_write), svc, frozenset(), log_connections,
                             clock=lambda: self.now, set_title=self.titles.append)
        self.closed = False

    def start(self) -> wire.Message:
        self.worker.start()
        return self.expect(wire.READY)

    def send_conn(self, conn_id: int, sock: socket.socket, peer: str = "127.0.0.1 40000") -> None:
        """CONN for ``sock``; the test's copy is closed right after, as the master does."""
        wire.send_fds(self.master, wire.encode_conns(
            [wire.ConnInfo(conn_id, sock.family, peer)]), [sock.fileno()])
        sock.close()

    def receive(self) -> wire.Message | None:
        """The next message the worker sent up, if any (as the master reads it)."""
        if not self.heard:
            msgs, error = self.upward.read()
            assert not error, error
            self.heard.extend(msgs)
        return self.heard.pop(0) if self.heard else None

    def next_message(self, timeout: float = 10.0) -> wire.Message:
        """Turn the worker until it says something; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self.receive()
            if msg is not None:
                return msg
            assert time.monotonic() < deadline, "the worker said nothing"
            self.worker.turn(max_wait=0.05)

    def expect(self, kind: int) -> wire.Message:
        msg = self.next_message()
        assert msg.kind == kind, msg
        return msg

    def silent(self) -> bool:
        """Whether the worker has nothing more to say right now (after one turn)."""
        self.worker.turn(max_wait=0.0)
        return self.receive() is None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for conn in list(self.worker.conns.values()):  # (a test that failed mid-way)
            conn.sock.close()
        self.worker.conns.clear()
        self.worker.close()
        self.master.close()
        self.upward.close()


@pytest.fixture
def rigs() -> Iterator[list[Rig]]:
    made: list[Rig] = []
    yield made
    for rig in made:
        rig.close()


def make(rigs: list[Rig], line: str, log_connections: bool = False) -> Rig:
    rig = Rig(service(line), log_connections)
    rigs.append(rig)
    return rig


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(client, server) of a real loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as lst:
        client = socket.create_connection(lst.getsockname(), timeout=5)
        server, _ = lst.accept()
    return client, server


def test_ready_names_the_worker_and_the_title_says_idle(rigs: list[Rig]) -> None:
    rig = make(rigs, ECHO)
    assert rig.start().pid == os.getpid()
    assert rig.titles == ["poolinetd: echo:0/tcp worker idle"]
    assert rig.worker.serving and rig.silent()


def test_a_builtin_connection_is_served_then_done_and_counted(
        rigs: list[Rig], events: list[Event]) -> None:
    rig = make(rigs, ECHO, log_connections=True)
    rig.start()
    client, server = tcp_pair()
    client.sendall(b"hello")  # already there when the fd arrives: served eagerly
    rig.send_conn(7, server)
    rig.worker.turn(max_wait=1.0)
    assert client.recv(100) == b"hello"
    assert len(rig.worker.conns) == 1  # waits for more, registered
    client.close()
    assert rig.expect(wire.DONE).ids == (7,)
    stats = rig.expect(wire.STATS)  # idle again: STATS at once
    assert (stats.bytes_in, stats.bytes_out, stats.exits) == (5, 5, ())
    assert not rig.worker.conns
    ends = named(events, "conn_end")
    assert len(ends) == 1 and ends[0]["status"] != "timeout" and ends[0]["bytes_in"] == 5


@pytest.mark.parametrize("line,code,logged", [(EXIT_3, 3, True), (TRUE, 0, False)],
                         ids=["exit-3", "true"])
def test_a_program_connection_says_spawned_then_done_and_its_exit_code(
        rigs: list[Rig], events: list[Event], line: str, code: int, logged: bool) -> None:
    rig = make(rigs, line)
    rig.start()
    client, server = tcp_pair()
    rig.send_conn(11, server)
    spawned = rig.expect(wire.SPAWNED)
    assert spawned.ident == 11 and spawned.pid > 0
    assert client.recv(10) == b""  # the program exited: its copy was the last one
    client.close()
    assert rig.expect(wire.DONE).ids == (11,)
    stats = rig.expect(wire.STATS)
    assert [got for got, _micros in stats.exits] == [code]
    assert not rig.worker.children
    # a failure is always logged, a success only with log_connections (off here)
    expected = [(code, spawned.pid)] if logged else []
    assert [(f["status"], f["pid"]) for f in named(events, "program_exit")] == expected


def test_a_program_that_cannot_be_executed_is_done_without_spawned(
        rigs: list[Rig], events: list[Event]) -> None:
    rig = Rig(dataclasses.replace(service(TRUE), program="/nonexistent/program"))
    rigs.append(rig)
    rig.start()
    client, server = tcp_pair()
    rig.send_conn(13, server)
    assert rig.expect(wire.DONE).ids == (13,)  # no SPAWNED came first
    failed = named(events, "exec_failed")
    assert len(failed) == 1 and failed[0]["errno"] == "ENOENT"
    assert client.recv(10) == b""  # the worker's copy is closed on that path too
    client.close()


def test_a_silent_connection_times_out_and_is_reported(
        rigs: list[Rig], events: list[Event]) -> None:
    rig = make(rigs, ECHO, log_connections=True)
    rig.start()
    client, server = tcp_pair()
    rig.send_conn(21, server)
    rig.worker.turn(max_wait=1.0)
    assert len(rig.worker.conns) == 1
    rig.now += 4.0
    assert rig.silent() and len(rig.worker.conns) == 1  # conn_timeout is 5 s
    rig.now += 2.0
    assert rig.expect(wire.DONE).ids == (21,)
    assert client.recv(10) == b""
    client.close()
    assert [f["status"] for f in named(events, "conn_end")] == ["timeout"]


def test_lend_of_a_datagram_builtin_answers_until_stop_then_returns_it(rigs: list[Rig]) -> None:
    rig = make(rigs, DGRAM_ECHO)
    rig.start()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as bound, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        bound.bind(("127.0.0.1", 0))
        wire.send(rig.master, wire.encode_lend(31), bound.fileno())  # the master keeps its copy
        client.settimeout(5)
        client.connect(bound.getsockname())
        rig.worker.turn(max_wait=1.0)  # takes the loan
        client.send(b"ping")
        rig.worker.turn(max_wait=1.0)
        assert client.recv(100) == b"ping"
        wire.send(rig.master, wire.encode_stop())
        assert rig.expect(wire.DONE).ids == (31,)  # the loan ends with the worker's stop
    assert not rig.worker.serving


def test_lend_for_a_wait_program_launches_it_on_the_listener(rigs: list[Rig]) -> None:
    rig = make(rigs, WAIT_TRUE)
    rig.start()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as bound:
        bound.bind(("127.0.0.1", 0))
        wire.send(rig.master, wire.encode_lend(32), bound.fileno())
        assert rig.expect(wire.SPAWNED).ident == 32
        assert rig.expect(wire.DONE).ids == (32,)


def test_stop_drains_what_is_served_then_the_worker_closes_its_channel(rigs: list[Rig]) -> None:
    rig = make(rigs, ECHO)
    rig.start()
    client, server = tcp_pair()
    rig.send_conn(41, server)
    wire.send(rig.master, wire.encode_stop())
    rig.worker.turn(max_wait=1.0)
    rig.worker.turn(max_wait=0.1)
    assert rig.worker.stopping and rig.worker.serving  # still serving its connection
    client.sendall(b"more")
    rig.worker.turn(max_wait=1.0)
    assert client.recv(100) == b"more"
    client.close()
    assert rig.expect(wire.DONE).ids == (41,)
    assert not rig.worker.serving  # nothing left: run() would now close and exit


def test_stop_ends_with_eof_on_the_upward_pipe(rigs: list[Rig]) -> None:
    rig = make(rigs, ECHO)
    rig.start()
    wire.send(rig.master, wire.encode_stop())
    rig.worker.turn(max_wait=1.0)
    assert not rig.worker.serving
    rig.closed = True  # closes only the worker's side here
    rig.worker.close()
    assert rig.upward.read() == ([wire.Message(wire.EOF)], "")
    rig.master.close()
    rig.upward.close()


def test_the_worker_cannot_send_on_its_channel(rigs: list[Rig]) -> None:
    """The master's end is shut for reading: a send from the worker's end (a taken-over
    worker trying to hand the master an fd) fails with EPIPE."""
    rig = make(rigs, ECHO)
    rig.start()
    r, w = os.pipe()
    try:
        with pytest.raises(BrokenPipeError):
            wire.send(rig.worker.channel, wire.encode_ready(1), r)
        with pytest.raises(BrokenPipeError):
            wire.send(rig.worker.channel, wire.encode_ready(1))
    finally:
        os.close(r)
        os.close(w)
    assert rig.silent()


def test_master_eof_gives_built_ins_a_grace_period_then_closes_them(rigs: list[Rig]) -> None:
    rig = make(rigs, ECHO_300)
    rig.start()
    client, server = tcp_pair()
    rig.send_conn(51, server)
    rig.worker.turn(max_wait=1.0)
    rig.master.close()  # the master is gone
    rig.upward.close()
    rig.worker.turn(max_wait=1.0)
    assert rig.worker.stopping and rig.worker.serving
    rig.now += STOP_GRACE_ON_MASTER_LOSS - 1.0
    rig.worker.turn(max_wait=0.0)
    assert rig.worker.serving  # within the grace period
    rig.now += 2.0
    rig.worker.turn(max_wait=0.0)
    assert not rig.worker.serving and not rig.worker.conns
    assert client.recv(10) == b""
    client.close()
    rig.closed = True
    rig.worker.close()  # its last DONE finds no master: not an error


def test_a_malformed_message_is_logged_and_the_worker_reads_on(
        rigs: list[Rig], events: list[Event]) -> None:
    rig = make(rigs, ECHO)
    rig.start()
    rig.master.send(b"\x63\x02junk")  # kind 99: no such message
    rig.master.send(b"\x03\x01")  # STOP of another wire version
    assert rig.silent()
    assert len(named(events, "wire_error")) == 2
    assert rig.worker.serving and not rig.worker.stopping
    client, server = tcp_pair()
    client.sendall(b"still")
    rig.send_conn(61, server)
    rig.worker.turn(max_wait=1.0)
    assert client.recv(100) == b"still"
    client.close()
    assert rig.expect(wire.DONE).ids == (61,)


def test_a_conn_with_missing_fds_is_reported_done_so_the_master_stops_counting_it(
        rigs: list[Rig], events: list[Event]) -> None:
    rig = make(rigs, ECHO)
    rig.start()
    client, server = tcp_pair()
    infos = [wire.ConnInfo(71, socket.AF_INET, "127.0.0.1 1"),
             wire.ConnInfo(72, socket.AF_INET, "127.0.0.1 2")]
    wire.send_fds(rig.master, wire.encode_conns(infos), [server.fileno()])  # one fd for two
    server.close()
    assert rig.expect(wire.DONE).ids == (71, 72)
    assert named(events, "wire_error")
    assert client.recv(10) == b""  # the fd that did come was closed
    client.close()
