"""sd_notify against a real AF_UNIX datagram socket that the test reads (path and abstract)."""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO

from poolinetd.ops import sdnotify
from poolinetd.ops.sdnotify import Notifier

_UCRED = struct.Struct("iII")  # pid, uid, gid


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A bound datagram socket playing systemd, and the NOTIFY_SOCKET value naming it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    if request.param == "path":
        value = str(tmp_path / "notify")
        sock.bind(value)
    else:
        name = f"poolinetd-test-{os.getpid()}-{time.monotonic_ns()}"
        sock.bind(b"\0" + name.encode())
        value = "@" + name
    sock.settimeout(10)
    with sock:
        yield value, sock


def receive(sock: socket.socket) -> tuple[bytes, int]:
    """One datagram and the sender's pid (SCM_CREDENTIALS, filled in by the kernel)."""
    data, ancdata, _flags, _addr = sock.recvmsg(8192, socket.CMSG_SPACE(_UCRED.size))
    pids = [_UCRED.unpack(cdata[: _UCRED.size])[0] for level, kind, cdata in ancdata
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS]
    assert len(pids) == 1
    return data, pids[0]


def test_every_message_arrives_exactly(listener: tuple[str, socket.socket]) -> None:
    value, sock = listener
    notifier = Notifier.from_env({"NOTIFY_SOCKET": value})
    assert notifier is not None
    with notifier:
        assert notifier.address == value
        assert notifier.ready()
        assert receive(sock) == (b"READY=1\n", os.getpid())
        assert notifier.ready("serving 3 services")
        assert receive(sock)[0] == b"READY=1\nSTATUS=serving 3 services\n"
        assert notifier.reloading(123456789)
        assert receive(sock)[0] == b"RELOADING=1\nMONOTONIC_USEC=123456789\n"
        assert notifier.stopping()
        assert receive(sock)[0] == b"STOPPING=1\n"
        assert notifier.status("line one\nline two\ttab")
        assert receive(sock)[0] == b"STATUS=line one line two tab\n"
        assert notifier.watchdog()
        assert receive(sock)[0] == b"WATCHDOG=1\n"
        assert notifier.mainpid(4242)
        assert receive(sock)[0] == b"MAINPID=4242\n"
        assert notifier.mainpid(4243, ready=True)
        assert receive(sock)[0] == b"MAINPID=4243\nREADY=1\n"
        assert notifier.send(STATUS="x", ERRNO=2)
        assert receive(sock)[0] == b"STATUS=x\nERRNO=2\n"


def test_reloading_stamps_the_monotonic_clock_now(listener: tuple[str, socket.socket]) -> None:
    value, sock = listener
    notifier = Notifier.from_env({"NOTIFY_SOCKET": value})
    assert notifier is not None
    with notifier:
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert notifier.reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    data = receive(sock)[0]
    lines = data.decode().splitlines()
    assert lines[0] == "RELOADING=1"
    name, _, stamp = lines[1].partition("=")
    assert name == "MONOTONIC_USEC"
    assert before <= int(stamp) <= after


def test_framing_breakers_are_refused_not_sent(listener: tuple[str, socket.socket]) -> None:
    value, sock = listener
    notifier = Notifier.from_env({"NOTIFY_SOCKET": value})
    assert notifier is not None
    with notifier:
        assert not notifier.send(STATUS="a\nREADY=1")
        assert not notifier.send(lower=1)
        assert not notifier.send()
        assert not notifier.send(STATUS="x" * sdnotify.MAX_DATAGRAM)
        assert notifier.status("y" * 5000)  # status() truncates to fit
        assert notifier.send(READY=1)
    # Only the two good ones arrived, in order.
    assert receive(sock)[0] == b"STATUS=" + b"y" * 1024 + b"\n"
    assert receive(sock)[0] == b"READY=1\n"


def test_the_socket_is_opened_once_nonblocking_and_close_on_exec(
        listener: tuple[str, socket.socket]) -> None:
    value, _sock = listener
    notifier = Notifier.from_env({"NOTIFY_SOCKET": value})
    assert notifier is not None
    with notifier:
        fd = notifier._sock.fileno()
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
        for _ in range(3):
            assert notifier.watchdog()
        assert notifier._sock.fileno() == fd
    assert not notifier.ready()  # closed: False, no exception


def test_no_manager_listening_is_false_not_an_exception(tmp_path: Path) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "nobody-here")})
    assert notifier is not None
    with notifier:
        assert not notifier.ready()
    abstract = Notifier.from_env({"NOTIFY_SOCKET": f"@poolinetd-absent-{time.monotonic_ns()}"})
    assert abstract is not None
    with abstract:
        assert not abstract.ready()


def test_a_full_receiver_makes_send_return_false_instead_of_blocking(tmp_path: Path) -> None:
    # In a child with a deadline, so that a blocking send fails the test instead of hanging it.
    path = tmp_path / "full"
    code = (
        "import socket, sys\n"
        "from poolinetd.ops.sdnotify import Notifier\n"
        f"r = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); r.bind({str(path)!r})\n"
        f"n = Notifier.from_env({{'NOTIFY_SOCKET': {str(path)!r}}})\n"
        "results = [n.watchdog() for _ in range(100000)]\n"
        "print(results.count(True), results.count(False))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    sent, refused = map(int, result.stdout.split())
    assert sent > 0
    assert refused > 0


@pytest.mark.parametrize("value", ["", "relative/path", "@", "vsock:2:1234"])
def test_unset_or_unsupported_addresses_give_no_notifier(value: str) -> None:
    assert Notifier.from_env({"NOTIFY_SOCKET": value}) is None
    assert Notifier.from_env({}) is None


def test_socket_address_forms() -> None:
    assert sdnotify.socket_address("/run/systemd/notify") == b"/run/systemd/notify"
    assert sdnotify.socket_address("@abc") == b"\0abc"
    assert sdnotify.socket_address("abc") is None


def test_forget_environment_removes_exactly_the_notify_variables() -> None:
    environ = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "2", "PATH": "/bin"}
    sdnotify.forget_environment(environ)
    assert environ == {"PATH": "/bin"}
    sdnotify.forget_environment(environ)  # idempotent
    assert environ == {"PATH": "/bin"}


def test_forget_environment_reaches_children() -> None:
    code = (
        "import os, subprocess, sys\n"
        "from poolinetd.ops import sdnotify\n"
        "sdnotify.forget_environment(os.environ)\n"
        "print(subprocess.run(['env'], capture_output=True, text=True).stdout)\n"
    )
    env = dict(os.environ, NOTIFY_SOCKET="/run/x", WATCHDOG_USEC="5000000", WATCHDOG_PID="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr
    assert "NOTIFY_SOCKET" not in result.stdout
    assert "WATCHDOG_" not in result.stdout
    assert "PATH=" in result.stdout


def test_watchdog_interval() -> None:
    assert sdnotify.watchdog_interval({}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "20000000"}, pid=7) == 10.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "7"},
                                      pid=7) == 10.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "8"},
                                      pid=7) is None
    assert sdnotify.watchdog_interval(
        {"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}) == 1.5
    for bad in ("0", "-5", "abc", "", " 5", "\u00b2"):
        assert sdnotify.watchdog_interval({"WATCHDOG_USEC": bad}, pid=7) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "100", "WATCHDOG_PID": "x"},
                                      pid=7) is None
