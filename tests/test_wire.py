"""The wire: header codec, real SCM_RIGHTS over SOCK_SEQPACKET, and its failure checks."""

from __future__ import annotations

import array
import contextlib
import os
import socket
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolinetd.pool import wire

_ADDR_TEXT = st.text(max_size=25)  # up to 100 bytes of UTF-8, as long as any address text
_CONN_INFO = st.builds(wire.ConnInfo, st.integers(0, 2**64 - 1), st.integers(0, 255),
                       _ADDR_TEXT, _ADDR_TEXT)


@given(st.lists(_CONN_INFO, min_size=1, max_size=wire.MAX_CONN_BATCH))
def test_conn_batch_round_trip(conns: list[wire.ConnInfo]) -> None:
    payload = wire.encode_conns(conns)
    assert len(payload) <= wire.MAX_MESSAGE
    msg = wire.decode(payload)
    assert msg.kind == wire.CONN and list(msg.conns) == conns
    assert wire.fds_expected(msg) == len(conns)


def test_conn_batch_bounds() -> None:
    one = wire.ConnInfo(1, socket.AF_INET, "192.0.2.1 5")
    with pytest.raises(ValueError):
        wire.encode_conns([])
    with pytest.raises(ValueError):
        wire.encode_conns([one] * (wire.MAX_CONN_BATCH + 1))
    with pytest.raises(ValueError):
        wire.encode_conns([wire.ConnInfo(1, socket.AF_INET, "x" * 101)])
    # The longest real texts: an IPv6 address with a scope id and a port, both ways.
    widest = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255%interface0 65535"
    full = wire.encode_conns([wire.ConnInfo(2**64 - 1, 255, widest, widest)]
                               * wire.MAX_CONN_BATCH)
    assert len(full) <= wire.MAX_MESSAGE


@given(st.lists(_CONN_INFO, min_size=1, max_size=4), st.data())
def test_a_cut_conn_batch_is_refused(conns: list[wire.ConnInfo], data: st.DataObject) -> None:
    payload = wire.encode_conns(conns)
    cut = data.draw(st.integers(0, len(payload) - 1))
    with pytest.raises(wire.ProtocolError):
        wire.decode(payload[:cut])
    with pytest.raises(wire.ProtocolError):
        wire.decode(payload + b"x")  # trailing bytes are not ignored either


@given(st.lists(st.integers(0, 2**64 - 1), max_size=2000))
def test_done_batches_round_trip(ids: list[int]) -> None:
    got: list[int] = []
    for payload in wire.encode_done(ids):
        assert len(payload) <= wire.MAX_MESSAGE
        got.extend(wire.decode(payload).ids)
    assert got == ids


@given(st.binary(max_size=64))
def test_decode_never_crashes_on_garbage(data: bytes) -> None:
    with contextlib.suppress(wire.ProtocolError):
        wire.decode(data)


def test_fd_travels_and_stays_close_on_exec() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    with a, b:
        wire.send(a, wire.encode_lend(7), r)
        os.close(r)
        data, fds = wire.recv(b)
        assert len(fds) == 1 and wire.decode(data).ident == 7
        fd = fds[0]
        assert not os.get_inheritable(fd)
        os.write(w, b"x")
        assert os.read(fd, 1) == b"x"
        os.close(fd)
        os.close(w)
        a.close()
        assert wire.recv(b) == (b"", [])  # EOF: the peer is gone


def test_a_batch_travels_in_order() -> None:
    """One sendmsg, n connections: each fd arrives at its record's position."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pipes = [os.pipe() for _ in range(wire.MAX_CONN_BATCH)]
    with a, b:
        infos = [wire.ConnInfo(i, socket.AF_INET, f"192.0.2.{i} {1000 + i}")
                 for i in range(len(pipes))]
        wire.send_fds(a, wire.encode_conns(infos), [w for _, w in pipes])
        for _, w in pipes:
            os.close(w)
        b.setblocking(False)
        got = wire.receive(b)
        assert got is not None
        msg, fds = got
        assert list(msg.conns) == infos and len(fds) == len(pipes)
        for i, (fd, (r, _)) in enumerate(zip(fds, pipes, strict=True)):
            os.write(fd, bytes([i]))
            assert os.read(r, 1) == bytes([i])
            os.close(fd)
            os.close(r)


@pytest.mark.parametrize("count", [0, 2, 3])
def test_fds_other_than_the_kind_says_are_refused_and_closed(count: int) -> None:
    """A CONN for two connections with 0 or 3 fds, a LEND with 2: all closed, ids kept."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pipes = [os.pipe() for _ in range(count)]
    with a, b:
        b.setblocking(False)
        conns = [wire.ConnInfo(5, socket.AF_INET, "192.0.2.1 1"),
                 wire.ConnInfo(6, socket.AF_INET, "192.0.2.1 2")]
        payload = wire.encode_conns(conns) if count != 2 else wire.encode_lend(9)
        a.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                               array.array("i", [r for r, _ in pipes]))] if pipes else [])
        before = set(os.listdir("/proc/self/fd"))
        with pytest.raises(wire.ProtocolError, match="fds with a message") as info:
            wire.receive(b)
        assert set(os.listdir("/proc/self/fd")) <= before
        lost = info.value.message
        assert lost is not None
        if count == 2:
            assert lost.kind == wire.LEND and lost.ident == 9
        else:
            assert [c.conn_id for c in lost.conns] == [5, 6]
    for r, w in pipes:
        os.close(r)
        os.close(w)


def test_ctrunc_when_the_receiver_has_no_fd_to_spare() -> None:
    """RLIMIT_NOFILE full in the receiver: the kernel drops the fd and sets MSG_CTRUNC."""
    code = textwrap.dedent("""
        import os, resource, socket, sys
        from poolinetd.pool import wire
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        r, w = os.pipe()
        wire.send(a, wire.encode_lend(1), r)
        top = max(int(x) for x in os.listdir('/proc/self/fd'))
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1, hard))
        # fill every free fd below the limit
        held = []
        while True:
            try:
                held.append(os.dup(0))
            except OSError:
                break
        try:
            wire.recv(b)
        except wire.ProtocolError as exc:
            print('refused:', exc)
            sys.exit(0)
        sys.exit(1)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "MSG_CTRUNC" in out.stdout


def test_a_conn_whose_fd_was_dropped_is_still_identified() -> None:
    """MSG_CTRUNC: the header survives, so the worker can report the connection DONE."""
    code = textwrap.dedent("""
        import os, resource, socket, sys
        from poolinetd.pool import wire
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        b.setblocking(False)
        r, w = os.pipe()
        wire.send(a, wire.encode_conns([wire.ConnInfo(77, socket.AF_INET, "192.0.2.1 5")]), r)
        top = max(int(x) for x in os.listdir('/proc/self/fd'))
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1, hard))
        while True:
            try:
                os.dup(0)
            except OSError:
                break
        try:
            wire.receive(b)
        except wire.ProtocolError as exc:
            assert exc.message is not None and exc.message.conns[0].conn_id == 77, exc.message
            print('identified')
            sys.exit(0)
        sys.exit(1)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "identified" in out.stdout


def test_stats_round_trip_and_split() -> None:
    exits = [(i % 256 - 9, i * 1000) for i in range(1000)]
    payloads = wire.encode_stats(15, 30, exits)
    assert len(payloads) > 1 and all(len(p) <= wire.MAX_MESSAGE for p in payloads)
    msgs = [wire.decode(p) for p in payloads]
    assert sum(m.bytes_in for m in msgs) == 15 and sum(m.bytes_out for m in msgs) == 30
    assert [e for m in msgs for e in m.exits] == exits
    assert wire.decode(wire.encode_stats(1, 2, [])[0]).exits == ()


def test_stats_with_an_exit_code_no_program_can_have_is_refused() -> None:
    """Exit codes become metrics labels: only 0..255 and -1..-64 (signals) exist."""
    for code in (0, 255, -1, -64):
        assert wire.decode(wire.encode_stats(0, 0, [(code, 1)])[0]).exits == ((code, 1),)
    for code in (256, -65, 2**31 - 1, -(2**31)):
        with pytest.raises(wire.ProtocolError, match="exit code"):
            wire.decode(wire.encode_stats(0, 0, [(code, 1)])[0])


# -- the upward pipe ---------------------------------------------------------------------------


def test_the_workers_end_of_a_read_shut_channel_cannot_send() -> None:
    """What the master does before forking: SHUT_RD on its end. On Linux the peer's sends
    then fail with EPIPE, with or without fds, while the master's sends still arrive."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.shutdown(socket.SHUT_RD)
    r, w = os.pipe()
    with ours, theirs:
        with pytest.raises(BrokenPipeError):
            wire.send(theirs, wire.encode_ready(1), r)
        with pytest.raises(BrokenPipeError):
            theirs.send(b"x")
        wire.send(ours, wire.encode_lend(3), r)
        data, fds = wire.recv(theirs)
        assert wire.decode(data).ident == 3 and len(fds) == 1
        os.close(fds[0])
        ours.setblocking(False)
        assert ours.recvmsg(10, 1024) == (b"", [], 0, None)  # nothing queued to it: EOF
    os.close(r)
    os.close(w)


def up_pair() -> tuple[wire.UpReader, wire.UpWriter]:
    r, w = wire.upward_pipe()
    return wire.UpReader(r), wire.UpWriter(w)


def read_all(reader: wire.UpReader) -> list[wire.Message]:
    """Every message the pipe holds now (none of them a protocol error)."""
    got: list[wire.Message] = []
    while True:
        msgs, error = reader.read()
        assert not error
        if not msgs:
            return got
        got.extend(msgs)


def test_upward_frames_round_trip_and_a_pipe_cannot_carry_fds() -> None:
    reader, writer = up_pair()
    try:
        assert reader.read() == ([], "")  # non-blocking: nothing yet
        writer.send(wire.encode_ready(7))
        for payload in wire.encode_done(list(range(1500))):  # several full frames
            writer.send(payload)
        writer.send(wire.encode_spawned(3, 99))
        got = read_all(reader)
        assert got[0] == wire.Message(wire.READY, pid=7)
        assert [i for m in got[1:-1] for i in m.ids] == list(range(1500))
        assert got[-1] == wire.Message(wire.SPAWNED, 3, pid=99)
        assert os.fstat(reader.fileno()).st_mode & 0o170000 == 0o010000  # a FIFO
    finally:
        writer.close()
    assert reader.read() == ([wire.Message(wire.EOF)], "")
    reader.close()


def test_send_all_writes_whole_frames_at_most_pipe_buf_at_a_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A turn's reports go up in as few writes as atomicity allows: every write is
    whole frames and at most PIPE_BUF bytes (or one frame), and they arrive in order."""
    reader, writer = up_pair()
    writes: list[int] = []
    real_write = os.write

    def counting_write(fd: int, data: bytes) -> int:
        writes.append(len(data))
        return real_write(fd, data)

    payloads = ([wire.encode_spawned(i, 1000 + i) for i in range(40)]
                + wire.encode_done(list(range(1500)))
                + wire.encode_stats(10, 20, [(0, 5)] * 3))
    try:
        monkeypatch.setattr(wire.os, "write", counting_write)
        writer.send_all(payloads)
        writer.send_all([])  # nothing to say: no write at all
        monkeypatch.undo()
        got = read_all(reader)
    finally:
        writer.close()
        reader.close()
    assert got == [wire.decode(p) for p in payloads]
    assert all(size <= wire.PIPE_BUF for size in writes)
    total = sum(len(wire.frame(p)) for p in payloads)
    assert sum(writes) == total and len(writes) < len(payloads)
    assert len(writes) <= total // (wire.PIPE_BUF // 2) + 1  # no write is needlessly small


@pytest.mark.parametrize("garbage", [
    b"\xff\xff" + b"\0" * 8,  # a length past PIPE_BUF
    b"\x00\x00",  # an empty frame
    b"\x00\x03\x0b\x03\x00",  # DONE with a cut id
    b"\x00\x02\x63\x03",  # kind 99
])
def test_a_malformed_frame_is_a_protocol_error_without_blocking(garbage: bytes) -> None:
    reader, writer = up_pair()
    try:
        writer.send(wire.encode_ready(1))
        os.write(writer.fileno(), garbage)
        msgs, error = reader.read()
        assert msgs == [wire.Message(wire.READY, pid=1)] and error
    finally:
        writer.close()
        reader.close()


def test_a_frame_cut_by_eof_is_an_error_and_a_split_frame_waits() -> None:
    reader, writer = up_pair()
    frame = wire.frame(wire.encode_ready(5))
    os.write(writer.fileno(), frame[:3])
    assert reader.read() == ([], "")
    os.write(writer.fileno(), frame[3:])
    assert reader.read() == ([wire.Message(wire.READY, pid=5)], "")
    os.write(writer.fileno(), frame[:3])
    writer.close()
    assert reader.read() == ([], "")
    msgs, error = reader.read()
    assert msgs == [wire.Message(wire.EOF)] and "cut short" in error
    reader.close()


def test_the_largest_upward_messages_fit_one_atomic_write() -> None:
    for payload in (wire.encode_done(list(range(5000)))
                    + wire.encode_stats(1, 2, [(1, 2)] * 2000)
                    + [wire.encode_boot_failed("x" * 10_000),
                       wire.encode_log(40, "exec_failed", {f"k{i}": "v" * 5000
                                                          for i in range(40)})]):
        assert len(wire.frame(payload)) <= wire.PIPE_BUF == 4096


_LOG_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
                       st.floats(allow_nan=False), st.text(max_size=50))


@given(st.sampled_from(sorted(wire.LOG_LEVELS)),
       st.dictionaries(st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True), _LOG_VALUE,
                       max_size=wire.MAX_LOG_FIELDS))
def test_log_round_trip(level: int, fields: dict[str, object]) -> None:
    msg = wire.decode(wire.encode_log(level, "conn_end", fields))
    assert (msg.kind, msg.level, msg.text) == (wire.LOG, level, "conn_end")
    assert dict(msg.fields) == {k: v.encode("utf-8", "backslashreplace").decode("utf-8")
                                if isinstance(v, str) else v for k, v in fields.items()}


def test_log_encoding_is_total_and_decoding_strict() -> None:
    msg = wire.decode(wire.encode_log(20, "conn_end", {
        "big": 2**70, "obj": object, "Bad Key": 1, "text": "\udc80\x1b[2J"}))
    assert dict(msg.fields)["big"] == str(2**70) and "Bad Key" not in dict(msg.fields)
    head = bytes([wire.LOG, wire.VERSION])
    for body in (bytes([20, 4]) + b"STOP" + b"\0",  # not a plain name
                 bytes([21, 4]) + b"stop" + b"\0",  # no such level
                 bytes([20, 4]) + b"stop" + b"\x11",  # 17 fields
                 bytes([20, 4]) + b"stop" + b"\x01\x01az\x01",  # a bad value tag
                 bytes([20, 4]) + b"stop" + b"\x01\x01as\xff\xff",  # text past the end
                 bytes([20, 4]) + b"stop" + b"\0" + b"x"):  # bytes after the fields
        with pytest.raises(wire.ProtocolError):
            wire.decode(head + body)


@given(st.binary(max_size=200))
def test_log_decoding_never_crashes_on_garbage(body: bytes) -> None:
    with contextlib.suppress(wire.ProtocolError):
        wire.decode(bytes([wire.LOG, wire.VERSION]) + body)
