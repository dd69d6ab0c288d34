"""Socket controls (rcvbuf, sndbuf, keepalive, nodelay, backlog, defer_accept; NetBSD's
``tcp,sndbuf=N``): parsing, check --json, and the real listener and accepted connection of
a running server in both modes."""

from __future__ import annotations

import ctypes
import io
import json
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import orjson
import pytest
from conftest import TEST_USER, tcp_exchange, wait_until

from poolinetd.check import run_check
from poolinetd.config.inetdconf import parse

U = TEST_USER
SYSTEM_PYTHON = "/usr/bin/python3"
# A program that reads the client's line, then reports the options of the connection it
# was given on fd 0.
_FD0_REPORT = (
    "import json, socket; s = socket.socket(fileno=0); s.recv(100); o = socket.SOL_SOCKET; "
    "t = socket.IPPROTO_TCP; print(json.dumps({'keepalive': s.getsockopt(o, "
    "socket.SO_KEEPALIVE), 'nodelay': s.getsockopt(t, socket.TCP_NODELAY), "
    "'rcvbuf': s.getsockopt(o, socket.SO_RCVBUF), 'sndbuf': s.getsockopt(o, "
    "socket.SO_SNDBUF)}), flush=True)"
)


def errors(text: str) -> list[str]:
    return [str(d) for d in parse(text, "t.conf").errors]


def warnings(text: str) -> list[str]:
    return [str(d) for d in parse(text, "t.conf").warnings]


def test_values_parse() -> None:
    spec = parse(f"x on protocol=tcp, user={U}, rcvbuf=256K, sndbuf=1M, keepalive=yes, "
                 "nodelay=yes, backlog=4096, defer_accept=5;", "t.conf").specs[0]
    o = spec.options
    assert (o.rcvbuf, o.sndbuf, o.keepalive, o.nodelay, o.backlog, o.defer_accept) == (
        256 << 10, 1 << 20, True, True, 4096, 5)


def test_netbsd_protocol_suffix_is_honoured() -> None:
    spec = parse(f"echo stream tcp,rcvbuf=64k,sndbuf=1m nowait {U} internal\n",
                 "t.conf").specs[0]
    assert (spec.options.rcvbuf, spec.options.sndbuf) == (64 << 10, 1 << 20)
    assert "rcvbuf given twice" in errors(
        f"echo stream tcp,rcvbuf=1k,rcvbuf=2k nowait {U} internal\n")[0]


@pytest.mark.parametrize(("opt", "message"), [
    ("rcvbuf=0", "rcvbuf must be a size from 1 to 2G-1 (N, NK, NM), not '0'"),
    ("sndbuf=3G", "sndbuf must be a size from 1 to 2G-1 (N, NK, NM), not '3G'"),
    ("keepalive=on", "keepalive must be yes or no, not 'on'"),
    ("nodelay=1", "nodelay must be yes or no, not '1'"),
    ("backlog=0", "backlog must be an integer from 1 to 65535, not '0'"),
    ("backlog=70000", "backlog must be an integer from 1 to 65535"),
    ("defer_accept=1.5", "defer_accept must be a number of whole seconds >= 0, not '1.5'"),
])
def test_bad_values_are_errors_at_the_field(opt: str, message: str) -> None:
    got = errors(f"x on protocol=tcp, user={U}, {opt};")
    assert len(got) == 1 and got[0].startswith(f"t.conf:1: field 5 '{opt}': {message}"), got


def test_options_that_cannot_apply_warn_at_their_field(tmp_path: Path) -> None:
    conf = tmp_path / "w.conf"
    conf.write_text(f"127.0.0.1:0 on protocol=udp, user={U}, args=echo, nodelay=yes, "
                    "backlog=10;\n"
                    "defaults on keepalive=yes;\n")  # defaults serve every kind: silent
    err = io.StringIO()
    out = io.StringIO()
    assert run_check(str(conf), True, out, err) == 0
    text = err.getvalue()
    assert "field 6 'nodelay=yes': warning: nodelay ignored: it applies to stream tcp" in text
    assert "field 7 'backlog=10': warning: backlog ignored" in text
    assert "keepalive" not in text
    opts = orjson.loads(out.getvalue())["services"][0]["sockopts"]
    assert opts == {"backlog": 1024, "rcvbuf": None, "sndbuf": None, "keepalive": False,
                    "nodelay": False, "defer_accept": 0}


def test_check_json_shows_them(tmp_path: Path) -> None:
    conf = tmp_path / "s.conf"
    conf.write_text("defaults on backlog=64;\n"
                    f"127.0.0.1:0 stream tcp,sndbuf=32k nowait {U} internal echo\n"
                    f"127.0.0.2:0 on protocol=tcp, user={U}, args=echo, keepalive=yes, "
                    "nodelay=yes, defer_accept=3, rcvbuf=128k;\n")
    out = io.StringIO()
    assert run_check(str(conf), True, out, io.StringIO()) == 0
    first, second = (s["sockopts"] for s in orjson.loads(out.getvalue())["services"])
    assert first == {"backlog": 64, "rcvbuf": None, "sndbuf": 32 << 10, "keepalive": False,
                     "nodelay": False, "defer_accept": 0}
    assert second == {"backlog": 64, "rcvbuf": 128 << 10, "sndbuf": None, "keepalive": True,
                      "nodelay": True, "defer_accept": 3}


# -- a running server ----------------------------------------------------------------------


def _kernel_value(level: int, opt: int, value: int) -> int:
    """What getsockopt answers after setsockopt(value) (Linux doubles buffer sizes and
    rounds TCP_DEFER_ACCEPT to its retransmission schedule)."""
    with socket.socket() as probe:
        probe.setsockopt(level, opt, value)
        return probe.getsockopt(level, opt)


def _steal(pid: int, port: int) -> socket.socket:
    """A duplicate of ``pid``'s TCP listener on 127.0.0.1:``port`` (pidfd_getfd; root)."""
    inode = ""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        if cols[1] == f"0100007F:{port:04X}" and cols[3] == "0A":
            inode = cols[9]
    assert inode, f"no listener on port {port}"
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with_target = os.readlink(f"/proc/{pid}/fd/{fd}")
        if with_target == f"socket:[{inode}]":
            pidfd = os.pidfd_open(pid)
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                got = libc.syscall(438, pidfd, int(fd), 0)  # SYS_pidfd_getfd on x86-64
                if got < 0:
                    pytest.skip(f"pidfd_getfd: {os.strerror(ctypes.get_errno())}")
                return socket.socket(fileno=got)
            finally:
                os.close(pidfd)
    raise AssertionError(f"pid {pid} holds no socket:[{inode}]")


def _backlog(port: int) -> int:
    """The listen backlog of the listener on ``port``, as ss reports it (Send-Q)."""
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True,
                         timeout=30, check=True).stdout.split()
    return int(out[2])


@pytest.fixture(params=["pool", "classic"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_listener_and_connection_get_the_options(serve, mode: str) -> None:
    if os.geteuid() != 0 or shutil.which("ss") is None or not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip("needs root (pidfd_getfd), ss and the system python3")
    conf = (
        f"127.0.0.1:0 on protocol=tcp, user={U}, wait=no, exec={SYSTEM_PYTHON}, "
        f'args=python3 -c "{_FD0_REPORT}", keepalive=yes, nodelay=yes, rcvbuf=200K, '
        "sndbuf=300K, backlog=77, defer_accept=5;\n"
        f"127.0.0.1:0 stream tcp,sndbuf=100k nowait {U} {SYSTEM_PYTHON} plain -c "
        f'"{_FD0_REPORT}"\n'
    )
    server = serve(conf, mode=mode)
    tuned, plain = server.port(0), server.port(1)
    sol, tcp = socket.SOL_SOCKET, socket.IPPROTO_TCP
    with _steal(server.pid, tuned) as lst:
        assert lst.getsockopt(sol, socket.SO_KEEPALIVE) == 1
        assert lst.getsockopt(tcp, socket.TCP_NODELAY) == 1
        assert lst.getsockopt(sol, socket.SO_RCVBUF) == _kernel_value(sol, socket.SO_RCVBUF,
                                                                      200 << 10)
        assert lst.getsockopt(sol, socket.SO_SNDBUF) == _kernel_value(sol, socket.SO_SNDBUF,
                                                                      300 << 10)
        assert lst.getsockopt(tcp, socket.TCP_DEFER_ACCEPT) == _kernel_value(
            tcp, socket.TCP_DEFER_ACCEPT, 5)
    assert _backlog(tuned) == 77
    assert _backlog(plain) == 1024
    # The accepted connection, seen by the program on its fd 0: Linux copied the
    # listener's options to it. defer_accept: the client speaks first.
    got = json.loads(tcp_exchange(tuned, b"hello\n", shut=False))
    assert got == {"keepalive": 1, "nodelay": 1,
                   "rcvbuf": _kernel_value(sol, socket.SO_RCVBUF, 200 << 10),
                   "sndbuf": _kernel_value(sol, socket.SO_SNDBUF, 300 << 10)}
    got = json.loads(tcp_exchange(plain, b"hello\n", shut=False))
    assert got["keepalive"] == 0 and got["nodelay"] == 0
    assert got["sndbuf"] == _kernel_value(sol, socket.SO_SNDBUF, 100 << 10)


def test_reload_changes_the_options_of_a_kept_listener(serve) -> None:
    if os.geteuid() != 0 or shutil.which("ss") is None:
        pytest.skip("needs root (pidfd_getfd) and ss")
    with socket.socket() as probe:  # a fixed port: the reload must keep the same service
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = serve(f"127.0.0.1:{port} on protocol=tcp, user={U}, args=echo, backlog=50;\n")
    assert _backlog(port) == 50
    server.conf.write_text(f"127.0.0.1:{port} on protocol=tcp, user={U}, args=echo, "
                           "backlog=60, nodelay=yes, keepalive=yes;\n")
    server.send_signal(signal.SIGHUP)
    wait_until(lambda: _backlog(port) == 60, 20, "the new backlog")
    with _steal(server.pid, port) as lst:
        assert lst.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert lst.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert tcp_exchange(port, b"still here") == b"still here"
