"""One-shot built-ins that read nothing (daytime, time on stream and seqpacket sockets)
are answered by the engine itself, as classic inetds do: no worker, no hand-off, the
same admission as every other connection."""

from __future__ import annotations

import socket
import struct
import time

import pytest
from conftest import TEST_USER, refused, tcp_exchange

from poolinetd.builtins import internal
from poolinetd.config.spec import SocketType

pytestmark = pytest.mark.process
U = TEST_USER


@pytest.fixture(params=["pool", "classic"])
def served(request: pytest.FixtureRequest, serve):
    return lambda conf, *args: serve(conf, *args, mode=request.param)


def test_engine_reply_only_for_one_shot_builtins_on_connected_sockets() -> None:
    assert internal.engine_reply("daytime", SocketType.STREAM) is not None
    assert internal.engine_reply("time", SocketType.SEQPACKET) is not None
    for name in ("echo", "discard", "chargen"):
        assert internal.engine_reply(name, SocketType.STREAM) is None  # they read the client
    assert internal.engine_reply("daytime", SocketType.DGRAM) is None  # a loan, as before


def test_the_reply_is_the_builtins_text_of_this_second() -> None:
    reply = internal.engine_reply("daytime", SocketType.STREAM)
    assert reply is not None
    before = time.time()
    text = reply()
    after = time.time()
    assert text in {internal.daytime_text(before), internal.daytime_text(after)}
    assert reply() is reply() or int(time.time()) != int(after)  # made once a second
    secs = internal.engine_reply("time", SocketType.STREAM)
    assert secs is not None
    value = struct.unpack("!I", secs())[0]
    assert abs(value - (int(time.time()) + internal.RFC868_OFFSET) % 2**32) <= 1


def test_pool_answers_daytime_and_time_without_workers(served) -> None:
    server = served(f"127.0.0.1:0 stream tcp nowait {U} internal daytime\n"
                    f"127.0.0.1:0 stream tcp nowait {U} internal time\n")
    for _ in range(5):
        assert tcp_exchange(server.port(0)).endswith(b"\r\n")
        assert len(tcp_exchange(server.port(1))) == 4
    assert server.workers() == []  # nothing was forked for them (either mode)
    status = server.service_status(server.listeners[0]["service"])
    assert status["accepted"] == 5 and status["active"] == 0


def test_engine_answers_still_pass_admission(served) -> None:
    server = served(f"127.0.0.1:0 stream tcp nowait/0/2 {U} internal daytime\n")
    assert tcp_exchange(server.port()).endswith(b"\r\n")
    assert tcp_exchange(server.port()).endswith(b"\r\n")
    assert refused(server.port())  # a third within the minute from this address
    assert server.service_status(server.listeners[0]["service"])["refused"] == 1


def test_a_client_that_never_reads_does_not_block_the_engine(served) -> None:
    server = served(f"127.0.0.1:0 stream tcp nowait {U} internal daytime\n"
                    f"127.0.0.1:0 stream tcp nowait {U} internal echo\n")
    idle = []
    try:
        for _ in range(50):  # connected, never read from, never closed
            sock = socket.create_connection(("127.0.0.1", server.port(0)), timeout=5)
            idle.append(sock)
        assert tcp_exchange(server.port(1), b"still here") == b"still here"
    finally:
        for sock in idle:
            sock.close()
