"""The one table of built-ins: every other list of built-in names or ports derives from it."""

from __future__ import annotations

import socket

import pytest
from config_fakes import fake_lookups

from poolinetd import cli
from poolinetd.builtins import internal
from poolinetd.config import resolve
from poolinetd.config.spec import SocketType


def test_the_table_lists_the_five_rfc_builtins_with_their_ports() -> None:
    assert internal.NAMES == ("echo", "discard", "chargen", "daytime", "time")
    assert {b.name: b.well_known_port for b in internal.TABLE} == {
        "echo": 7, "discard": 9, "chargen": 19, "daytime": 13, "time": 37}
    assert frozenset({7, 9, 13, 19, 37}) == internal.BUILTIN_PORTS
    assert [b.name for b in internal.TABLE if b.one_shot] == ["daytime", "time"]
    for b in internal.TABLE:
        assert b.socket_types == {SocketType.STREAM, SocketType.SEQPACKET, SocketType.DGRAM}
        assert 1024 <= b.default_port < 65536  # the default config needs no root


def test_find_is_keyed_by_name_and_socket_type() -> None:
    echo = internal.find("echo", SocketType.SEQPACKET)
    assert echo is not None and echo is internal.BY_NAME["echo"]
    assert echo.handler(SocketType.SEQPACKET) is internal.MessageEcho
    assert echo.handler(SocketType.STREAM) is internal.Echo
    assert echo.handler(SocketType.DGRAM) is None
    assert internal.find("echo", SocketType.RAW) is None
    assert internal.find("tcpmux", SocketType.STREAM) is None
    assert internal.STREAM["echo"] is internal.Echo
    assert set(internal.STREAM) == set(internal.SEQPACKET) == set(internal.NAMES)


def test_new_handler_picks_by_the_sockets_type() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b, c, d:
        assert type(internal.new_handler("echo", a)) is internal.MessageEcho
        assert type(internal.new_handler("echo", c)) is internal.Echo
        assert type(internal.new_handler("daytime", c)) is internal.OneShot
        with pytest.raises(KeyError):
            internal.new_handler("tcpmux", c)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, pytest.raises(KeyError):
        internal.new_handler("echo", u)


def test_answer_goes_through_the_table() -> None:
    assert internal.answer("echo", b"x", 0) == b"x"
    assert internal.answer("discard", b"x", 0) is None
    assert internal.answer("daytime", b"", 0) == internal.daytime_text(0)
    assert internal.answer("tcpmux", b"x", 0) is None  # not a built-in here


def test_default_config_ports_come_from_the_table_and_resolve() -> None:
    assert {b.name: b.default_port for b in internal.TABLE} == cli.DEFAULT_PORTS
    text = cli.default_config_text("nobody")
    loaded = resolve.load_text(text, "<default>", lookups=fake_lookups())
    assert not loaded.errors, loaded.errors
    served = {(s.internal, s.socket_type, s.spec.protocol.is_udp) for s in loaded.services}
    assert served == {(b.name, t, t is SocketType.DGRAM) for b in internal.TABLE
                      for t in (SocketType.STREAM, SocketType.DGRAM)}
    ports = {s.key.endpoints[0].port for s in loaded.services}
    assert ports == set(cli.DEFAULT_PORTS.values())


def test_the_table_implements_exactly_the_names_the_config_accepts() -> None:
    """config/spec.py owns the vocabulary (so config never imports builtins); the table
    must serve every name it lists, in its order, and nothing else."""
    from poolinetd.builtins import internal
    from poolinetd.config.spec import BUILTIN_NAMES

    assert internal.NAMES == BUILTIN_NAMES
