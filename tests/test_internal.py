"""The built-ins' bytes, exactly as the RFCs say, and the datagram loop guard."""

from __future__ import annotations

import random
import socket
import struct
import threading

from poolinetd.builtins import internal


def test_chargen_lines_rotate_through_95_printables() -> None:
    first = internal.chargen_line(0)
    assert len(first) == 74 and first.endswith(b"\r\n")
    assert first[:72] == bytes(range(32, 104))
    assert internal.chargen_line(1)[:72] == bytes(range(33, 105))
    assert internal.chargen_line(95) == first  # the pattern repeats every 95 lines
    assert all(32 <= c < 127 for c in internal.chargen_line(60)[:72])


def test_time_is_seconds_since_1900_big_endian() -> None:
    assert internal.time_bytes(0) == struct.pack("!I", 2208988800)
    # RFC 868's own examples: 2,398,291,200 is 1 Jan 1976 00:00 GMT
    assert struct.unpack("!I", internal.time_bytes(189302400))[0] == 2398291200


def test_daytime_is_ctime_with_crlf() -> None:
    text = internal.daytime_text(0).decode()
    assert text.endswith("\r\n") and len(text) == 26


def test_udp_answers() -> None:
    assert internal.answer("echo", b"abc", 0) == b"abc"
    assert internal.answer("discard", b"abc", 0) is None
    assert internal.answer("time", b"", 0) == internal.time_bytes(0)
    sizes = {len(internal.answer("chargen", b"", 0, random.Random(i)) or b"") for i in range(50)}
    assert max(sizes) <= 512 and len(sizes) > 10


def test_loop_guard() -> None:
    ports = frozenset({7, 9, 13, 19, 37, 40007})
    assert internal.loop_guard(50000, ports) is None
    assert internal.loop_guard(7, ports) is not None  # another echo: a loop
    assert internal.loop_guard(1023, ports) is not None  # privileged: spoofed or a service
    assert internal.loop_guard(40007, ports) is not None  # one of our own built-ins


def test_serve_blocking_echo_over_a_real_socket() -> None:
    a, b = socket.socketpair()
    result: list[tuple[int, int]] = []

    def serve() -> None:
        with b:  # the caller of serve_blocking owns the socket and closes it
            result.append(internal.serve_blocking(b, "echo", 5))

    with a:
        t = threading.Thread(target=serve)
        t.start()
        payload = b"x" * 300_000  # more than one buffer: exercises the write path
        a.sendall(payload)
        a.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            data = a.recv(65536)
            if not data:
                break
            got += data
        t.join(5)
        assert got == payload and result == [(300_000, 300_000)]
