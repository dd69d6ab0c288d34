"""DgramResponder on real sockets: bounded batches that say whether they drained, the guard."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from config_fakes import fake_lookups

from poolinetd.builtins import dgram
from poolinetd.config import resolve
from poolinetd.config.spec import Service
from poolinetd.pool import worker


def _service(name: str = "echo") -> Service:
    loaded = resolve.load_text(f"127.0.0.1:0 dgram udp wait nobody internal {name}\n", "<t>",
                               lookups=fake_lookups())
    assert not loaded.errors
    return loaded.services[0]


@pytest.fixture
def udp() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(client, server): the server bound and non-blocking, as a worker gets it lent."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as srv, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as cli:
        srv.bind(("127.0.0.1", 0))
        srv.setblocking(False)
        cli.bind(("127.0.0.1", 0))
        cli.settimeout(5)
        cli.connect(srv.getsockname())
        yield cli, srv


def test_the_worker_still_exports_the_responder() -> None:
    assert worker.DgramResponder is dgram.DgramResponder


def test_on_readable_says_whether_it_drained_the_socket(udp) -> None:
    cli, srv = udp
    responder = dgram.DgramResponder(srv, _service(), frozenset())
    for i in range(dgram.DGRAM_BATCH + 5):
        cli.send(b"%d" % i)
    assert responder.on_readable() is False  # stopped at its bound, 5 still queued
    assert responder.on_readable() is True
    replies = [cli.recv(100) for _ in range(dgram.DGRAM_BATCH + 5)]
    assert replies == [b"%d" % i for i in range(dgram.DGRAM_BATCH + 5)]
    assert responder.on_readable() is True  # nothing queued


def test_the_loop_guard_refuses_builtin_ports_and_logs_once(udp) -> None:
    cli, srv = udp
    own = frozenset({cli.getsockname()[1]})  # pretend the client's port is a built-in's
    times = iter([100.0, 101.0, 102.0])
    responder = dgram.DgramResponder(srv, _service(), own, clock=lambda: next(times))
    cli.send(b"loop?")
    cli.send(b"loop?")
    assert responder.on_readable() is True
    assert responder.refused == 1  # the first was logged (count reset), the second counted
    cli.settimeout(0.2)
    with pytest.raises(TimeoutError):
        cli.recv(100)


def test_a_datagram_too_long_to_answer_whole_is_dropped_and_counted(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as cli:
        srv.bind(str(tmp_path / "srv"))
        srv.setblocking(False)
        cli.bind(str(tmp_path / "cli"))
        cli.settimeout(5)
        cli.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 << 20)
        responder = dgram.DgramResponder(srv, _service(), frozenset())
        for _ in range(2):
            cli.sendto(b"L" * (responder.limit + 1), str(tmp_path / "srv"))
        cli.sendto(b"ok", str(tmp_path / "srv"))
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as anon:
            anon.sendto(b"no return address", str(tmp_path / "srv"))
        assert responder.on_readable() is True
        assert cli.recv(1 << 21) == b"ok"
        assert responder.refused == 1  # the first was logged (count restarts), the second counted
        cli.settimeout(0.2)
        with pytest.raises(TimeoutError):
            cli.recv(1 << 21)
