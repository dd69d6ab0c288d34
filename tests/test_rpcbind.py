"""The rpcbind client (ops/rpcbind.py): XDR and record marking, and the registrar driven
turn by turn against a fake rpcbind on a unix socket of the test's own, with a fake clock.

The fake speaks what the registrar uses of RPCB version 3 (SET, UNSET, DUMP)
the way Debian's rpcbind answers: a SET of a mapping that exists is refused.
tests/test_rpc_e2e.py runs the real rpcbind.
"""

from __future__ import annotations

import selectors
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from log_events import events, named  # noqa: F401  (the fixture)

from poolinetd.ops import rpcbind
from poolinetd.ops.rpcbind import Mapping, Reader, Records, Registrar, RpcError


def reply(xid: int, result: bytes, *, accept: int = 0, denied: bool = False) -> bytes:
    if denied:
        return struct.pack(">6I", xid, 1, 1, 0, 2, 2)
    return struct.pack(">6I", xid, 1, 0, 0, 0, accept) + result


# -- XDR and records ---------------------------------------------------------------------


def test_call_message_and_strings() -> None:
    msg = rpcbind.call_message(7, 100000, 3, 1, rpcbind.xdr_string("udp"))
    assert struct.unpack_from(">10I", msg) == (7, 0, 2, 100000, 3, 1, 0, 0, 0, 0)
    assert msg[40:] == b"\0\0\0\3udp\0"
    assert rpcbind.xdr_string("") == b"\0\0\0\0"
    assert rpcbind.xdr_string("tcp6") == b"\0\0\0\4tcp6"
    rd = Reader(rpcbind.xdr_string("0.0.0.0.3.1") + b"\0\0\0\1")
    assert (rd.string(), rd.uint()) == ("0.0.0.0.3.1", 1)
    with pytest.raises(RpcError):
        rd.uint()  # past its end
    with pytest.raises(RpcError):
        Reader(b"\0\0\x10\0abc").string()  # a length past the data


def test_records_reassemble_fragments_fed_in_pieces() -> None:
    records = Records()
    data = struct.pack(">I", 3) + b"abc" + struct.pack(">I", 0x8000_0002) + b"de"
    data += rpcbind.record(b"second")
    got: list[bytes] = []
    for i in range(len(data)):
        got += records.feed(data[i : i + 1])
    assert got == [b"abcde", b"second"]
    with pytest.raises(RpcError):
        Records().feed(struct.pack(">I", 0x8000_0000 | (rpcbind.MAX_RECORD + 1)))


def test_reply_result() -> None:
    assert rpcbind.reply_result(reply(9, b"\0\0\0\1"), 9) == b"\0\0\0\1"
    for bad, why in [(reply(8, b""), "another call"), (reply(9, b"", denied=True), "denied"),
                     (reply(9, b"", accept=1), "not accepted"), (b"\0\0\0\x09", "cut short")]:
        with pytest.raises(RpcError, match=why):
            rpcbind.reply_result(bad, 9)


def test_mappings_and_universal_addresses() -> None:
    v4 = rpcbind.mappings(100001, range(1, 3), ("udp",), "inet", "0.0.0.0", 0x0301)
    assert [m.uaddr for m in v4] == ["0.0.0.0.3.1", "0.0.0.0.3.1"]
    assert [m.vers for m in v4] == [1, 2]
    dual = rpcbind.mappings(7, [1], ("tcp", "tcp6"), "inet6", "::", 40000)
    assert [(m.netid, m.uaddr) for m in dual] == [("tcp", "0.0.0.0.156.64"),
                                                  ("tcp6", "::.156.64")]
    assert rpcbind.uaddr_port("::.156.64") == 40000
    assert rpcbind.uaddr_port("") == rpcbind.uaddr_port("1.2.x.4") == -1


def test_held_by_finds_a_shared_socket() -> None:
    import os

    a, b = socket.socketpair()
    try:
        assert rpcbind.held_by(os.getpid(), [a]) == {a}
        assert rpcbind.held_by(2**22 + 1, [a]) == set()  # no such process
    finally:
        a.close()
        b.close()


# -- a fake rpcbind --------------------------------------------------------------------------


class FakeRpcbind:
    """rpcbind's local socket, answered from the test's selector (RPCB v3 SET, UNSET, DUMP)."""

    def __init__(self, sel: selectors.BaseSelector, path: Path) -> None:
        self.sel = sel
        self.path = path
        self.table: dict[tuple[int, int, str], str] = {}  # -> uaddr
        self.calls: list[tuple[int, int, int, str]] = []  # (proc, prog, vers, netid)
        self.silent = False  # accept, read, never answer
        self.server: socket.socket | None = None
        self.conns: list[socket.socket] = []

    def start(self) -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(self.path))
        self.server.listen(8)
        self.server.setblocking(False)
        self.sel.register(self.server, selectors.EVENT_READ, self._accept)

    def stop(self) -> None:
        for sock in [*self.conns, *([self.server] if self.server else [])]:
            self.sel.unregister(sock)
            sock.close()
        self.conns, self.server = [], None
        self.path.unlink(missing_ok=True)

    def _accept(self, _mask: int) -> None:
        assert self.server is not None
        conn, _ = self.server.accept()
        conn.setblocking(False)
        records = Records()
        self.conns.append(conn)
        self.sel.register(conn, selectors.EVENT_READ, lambda _m: self._read(conn, records))

    def _read(self, conn: socket.socket, records: Records) -> None:
        data = conn.recv(65536)
        if not data:
            self.sel.unregister(conn)
            self.conns.remove(conn)
            conn.close()
            return
        for msg in records.feed(data):
            if not self.silent:
                conn.sendall(rpcbind.record(self._answer(msg)))

    def _answer(self, msg: bytes) -> bytes:
        rd = Reader(msg)
        xid, _, _, prog, vers, proc = (rd.uint() for _ in range(6))
        rd.uint(), rd.opaque(), rd.uint(), rd.opaque()  # credentials, verifier
        assert (prog, vers) == (100000, 3)
        if proc == rpcbind.DUMP:
            self.calls.append((proc, 0, 0, ""))
            out = b""
            for (p, v, n), uaddr in self.table.items():
                out += struct.pack(">III", 1, p, v) + rpcbind.xdr_string(n)
                out += rpcbind.xdr_string(uaddr) + rpcbind.xdr_string("superuser")
            return reply(xid, out + b"\0\0\0\0")
        key = (rd.uint(), rd.uint(), rd.string())
        uaddr = rd.string()
        self.calls.append((proc, *key))
        if proc == rpcbind.SET:
            ok = key not in self.table
            if ok:
                self.table[key] = uaddr
        else:
            ok = self.table.pop(key, None) is not None
        return reply(xid, struct.pack(">I", int(ok)))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[selectors.BaseSelector, FakeRpcbind, Registrar,
                                             Clock]]:
    sel = selectors.DefaultSelector()
    fake = FakeRpcbind(sel, tmp_path / "rpcbind.sock")
    clock = Clock()
    reg = Registrar(sel, clock, str(fake.path))
    yield sel, fake, reg, clock
    reg.close()
    fake.stop()
    sel.close()


def turn(sel: selectors.BaseSelector, reg: Registrar, clock: Clock, turns: int = 50) -> None:
    """Run the selector (and the registrar's timers at ``clock``) until nothing is ready."""
    for _ in range(turns):
        ready = sel.select(0.2)
        for key, mask in ready:
            key.data(mask)
        reg.expire(clock.now)
        if not ready:
            return


def later(sel: selectors.BaseSelector, reg: Registrar, clock: Clock, seconds: float) -> None:
    """``seconds`` pass: the registrar's timers fire, then the selector runs."""
    clock.now += seconds
    reg.expire(clock.now)
    turn(sel, reg, clock)


def maps(port: int, versions: range = range(1, 4), prog: int = 100001) -> dict[Mapping, str]:
    return dict.fromkeys(rpcbind.mappings(prog, versions, ("udp",), "inet", "0.0.0.0", port),
                         "rstatd/1-3/rpc/udp")


def test_register_then_unset_on_sync(world, events) -> None:  # noqa: F811
    sel, fake, reg, clock = world
    fake.start()
    reg.sync(maps(0x0301))
    assert reg.state("rstatd/1-3/rpc/udp") == (False, "registering with rpcbind")
    turn(sel, reg, clock)
    assert fake.table == {(100001, v, "udp"): "0.0.0.0.3.1" for v in (1, 2, 3)}
    assert reg.state("rstatd/1-3/rpc/udp") == (True, "")
    assert named(events, "rpc_registered") == [{
        "service": "rstatd/1-3/rpc/udp", "program": 100001, "versions": "1-3", "netids": "udp",
        "port": 0x0301}]
    assert reg.sock is None  # nothing left to do: the connection is closed
    reg.sync({})
    assert reg.busy()
    turn(sel, reg, clock)
    assert fake.table == {} and not reg.busy()
    assert [f["service"] for f in named(events, "rpc_unregistered")] == ["rstatd/1-3/rpc/udp"]


def test_a_stale_mapping_is_replaced_and_the_same_port_is_adopted(world) -> None:
    sel, fake, reg, clock = world
    fake.start()
    fake.table[(100001, 1, "udp")] = "0.0.0.0.9.9"  # a master that was killed
    fake.table[(100001, 2, "udp")] = "0.0.0.0.3.1"  # the old master of an upgrade: our port
    reg.sync(maps(0x0301))
    turn(sel, reg, clock)
    assert fake.table == {(100001, v, "udp"): "0.0.0.0.3.1" for v in (1, 2, 3)}
    unsets = [c for c in fake.calls if c[0] == rpcbind.UNSET]
    assert unsets == [(rpcbind.UNSET, 100001, 1, "udp")]  # never version 2: no gap


def test_an_unset_leaves_a_newer_owners_mapping(world) -> None:
    sel, fake, reg, clock = world
    fake.start()
    reg.sync(maps(0x0301, range(1, 2)))
    turn(sel, reg, clock)
    fake.table[(100001, 1, "udp")] = "0.0.0.0.7.7"  # someone registered it anew since
    reg.sync({})
    turn(sel, reg, clock)
    assert fake.table == {(100001, 1, "udp"): "0.0.0.0.7.7"} and not reg.busy()


def test_disowned_mappings_are_never_unset(world) -> None:
    sel, fake, reg, clock = world
    fake.start()
    wanted = maps(0x0301)
    reg.sync(wanted)
    turn(sel, reg, clock)
    reg.disown(list(wanted)[:2])  # an upgrade's new master holds that socket now
    reg.stop()
    reg.sync({})
    turn(sel, reg, clock)
    assert set(fake.table) == {(100001, 1, "udp"), (100001, 2, "udp")}


def test_rpcbind_down_is_retried_with_backoff(world, events) -> None:  # noqa: F811
    sel, fake, reg, clock = world
    reg.sync(maps(0x0301))  # no rpcbind socket yet
    registered, why = reg.state("rstatd/1-3/rpc/udp")
    assert not registered and why.startswith("rpcbind unavailable: ")
    assert "retrying in 0.5 s" in why
    assert reg.next_deadline() == clock.now + 0.5
    clock.now += 0.5
    reg.expire(clock.now)  # still down: the wait doubles, and nothing more is logged
    assert reg.next_deadline() == clock.now + 1.0
    assert len(named(events, "rpcbind_unavailable")) == 1
    fake.start()
    reg.expire(clock.now + 0.5)  # not yet due: nothing tried
    assert reg.sock is None
    later(sel, reg, clock, 1.0)
    assert reg.state("rstatd/1-3/rpc/udp") == (True, "")
    assert len(fake.table) == 3
    assert [f["path"] for f in named(events, "rpcbind_available")] == [str(fake.path)]


def test_an_rpcbind_that_never_answers_costs_one_timeout(world, events) -> None:  # noqa: F811
    sel, fake, reg, clock = world
    fake.start()
    fake.silent = True
    reg.sync(maps(0x0301))
    turn(sel, reg, clock)
    assert reg.next_deadline() == clock.now + rpcbind.CALL_TIMEOUT
    clock.now += rpcbind.CALL_TIMEOUT
    reg.expire(clock.now)
    assert reg.sock is None
    assert named(events, "rpcbind_unavailable")[0]["error"] == "no answer within 2 s"
    fake.silent = False
    later(sel, reg, clock, 0.5)
    assert reg.state("rstatd/1-3/rpc/udp") == (True, "")


def test_a_refused_set_is_an_error_and_retried(world, events) -> None:  # noqa: F811
    sel, fake, reg, clock = world
    fake.start()
    original = fake._answer

    def refuse_sets(msg: bytes) -> bytes:
        answer = original(msg)
        if fake.calls[-1][0] == rpcbind.SET:
            fake.table.pop(fake.calls[-1][1:], None)
            return answer[:-4] + b"\0\0\0\0"
        return answer

    fake._answer = refuse_sets  # type: ignore[method-assign]
    reg.sync(maps(0x0301, range(1, 2)))
    turn(sel, reg, clock)
    registered, why = reg.state("rstatd/1-3/rpc/udp")
    assert not registered and "rpcbind refused program 100001 version 1 over udp" in why
    assert len(named(events, "rpc_register_failed")) == 1
    fake._answer = original  # type: ignore[method-assign]
    later(sel, reg, clock, 0.5)
    assert reg.state("rstatd/1-3/rpc/udp") == (True, "")


def test_a_stop_with_rpcbind_gone_gives_up_at_once(world, events) -> None:  # noqa: F811
    sel, fake, reg, clock = world
    fake.start()
    reg.sync(maps(0x0301))
    turn(sel, reg, clock)
    fake.stop()
    reg.stop()
    reg.sync({})
    assert not reg.busy()  # nothing to wait for: a stop is not held up
    assert named(events, "rpcbind_unavailable")[-1]["action"] == (
        "3 mappings left registered: stopping")


def test_mappings_rpcbind_forgot_are_registered_again(world, events) -> None:  # noqa: F811
    sel, fake, reg, clock = world
    fake.start()
    reg.sync(maps(0x0301))
    turn(sel, reg, clock)
    assert reg.next_deadline() == clock.now + rpcbind.AUDIT_INTERVAL
    later(sel, reg, clock, rpcbind.AUDIT_INTERVAL)  # all there: nothing to do
    assert named(events, "rpc_mapping_lost") == [] and len(fake.table) == 3
    del fake.table[(100001, 2, "udp")]  # rpcbind restarted (without -w) and forgot
    fake.table[(100001, 3, "udp")] = "0.0.0.0.9.9"  # or someone else took a version
    later(sel, reg, clock, rpcbind.AUDIT_INTERVAL)
    assert named(events, "rpc_mapping_lost") == [{
        "service": "rstatd/1-3/rpc/udp", "program": 100001, "mappings": 2, "port": 0x0301,
        "action": "registered again (was rpcbind restarted?)"}]
    assert fake.table == {(100001, v, "udp"): "0.0.0.0.3.1" for v in (1, 2, 3)}
    assert reg.state("rstatd/1-3/rpc/udp") == (True, "")
