"""A local client passes descriptors on a unix-socket service's connection (issue 21, item 2).

A descriptor sent with SCM_RIGHTS and never read sits in the receiving
connection's queue; whoever closes that connection last releases it. If it
is a TCP socket with SO_LINGER set and unsent data, that release waits out
the linger time. The master closes some unix connections itself (an
engine-answered daytime, a refused client, a failed preamble): it must hand
them to the closer instead, so no other service waits. Each test fails on
the code before the fix (measured: 20.1-21.9 s gaps in both modes).
"""

from __future__ import annotations

import array
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import lingering_tcp, tcp_exchange

LINGER = 20  # seconds the poisoned socket would hold up whoever closes it last


@pytest.fixture
def lingering() -> Iterator[Callable[[], socket.socket]]:
    """Makes TCP sockets whose close waits LINGER s: the send queue is full of data the
    peer (a listener that never accepts, with a tiny receive buffer) will not take."""
    listeners: list[socket.socket] = []

    def make() -> socket.socket:
        return lingering_tcp(listeners, LINGER)

    yield make
    for listener in listeners:  # resets what is left, so nothing lingers after the test
        listener.close()


def _pass_and_leave(path: str, passed: socket.socket, payload: bytes) -> None:
    """Connect to ``path``, send ``payload`` with ``passed`` attached, and go away: the
    descriptor in flight is then the last reference to ``passed``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(path)
        client.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                    array.array("i", [passed.fileno()]))])
    passed.close()


def _echo_delay(port: int) -> float:
    began = time.monotonic()
    assert tcp_exchange(port, b"ping", timeout=LINGER + 10) == b"ping"
    return time.monotonic() - began


@pytest.mark.parametrize("mode", ["pool", "classic"])
@pytest.mark.parametrize("path_kind", ["answered", "refused"])
def test_a_passed_lingering_socket_never_stalls_the_master(serve, tmp_path: Path,
                                                           lingering: Callable[[], socket.socket],
                                                           mode: str, path_kind: str) -> None:
    unix = str(tmp_path / "svc.sock")
    if path_kind == "answered":  # daytime is answered (and closed) by the master itself
        line = f"{unix} stream unix nowait root internal daytime\n"
        payload = b"x"
    else:  # a malformed PROXY header: refused and closed in the preamble stage
        line = (f"{unix} on socktype=stream, protocol=unix, user=root, args=echo, "
                "proxy_protocol=yes;\n")
        payload = b"GARBAGE\r\n"
    server = serve(line + "127.0.0.1:0 stream tcp nowait nobody internal echo\n", mode=mode)
    echo = server.port(1)  # the TCP echo, listed after the unix service
    delays = []
    for _ in range(3):
        _pass_and_leave(unix, lingering(), payload)
        delays.append(_echo_delay(echo))
    assert max(delays) < 5.0, delays  # before the fix: about LINGER s on the first
