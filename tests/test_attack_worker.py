"""Attacks by a taken-over worker (issue 21 items 1, 3 and 8), each made for real.

The attacker is a process running as the service's user that holds what the
worker holds. The test becomes that process: as root it copies the worker's
own descriptors with ``pidfd_getfd`` (the worker's channel end, its upward
pipe), which is exactly what code running inside the worker could use.
Every test asserts the safe outcome and fails on the code before the fix.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import os
import re
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import IS_ROOT, TEST_USER, Server, lingering_tcp, tcp_exchange, wait_until

from poolinetd.pool import wire

needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (pidfd_getfd of a worker)")
_SYS_PIDFD_GETFD = 438  # x86_64 and aarch64 (the generic table) alike
_LIBC = ctypes.CDLL(None, use_errno=True)
LINGER_SECONDS = 20

TWO_SERVICES = (f"127.0.0.1:0 stream tcp nowait {TEST_USER} internal echo\n"
                f"127.0.0.1:0 stream tcp nowait {TEST_USER} internal discard\n")


def steal_fd(pid: int, fd: int) -> int:
    """A copy of ``pid``'s ``fd`` in this process (what the process itself could use)."""
    pidfd = os.pidfd_open(pid)
    try:
        got = _LIBC.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
        if got < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return int(got)
    finally:
        os.close(pidfd)


def worker_of(server: Server, service: str) -> int:
    """The pid of a ready worker of ``service`` (found by its process title)."""
    def find() -> int | None:
        for pid in server.workers():
            with contextlib.suppress(OSError):
                title = Path(f"/proc/{pid}/cmdline").read_bytes()
                if title.startswith(f"poolinetd: {service}".encode()) and b"idle" in title:
                    return pid
        return None
    found = wait_until(find, 10, f"a ready {service} worker")
    assert isinstance(found, int)
    return found


def worker_fds(pid: int) -> dict[int, str]:
    """fd -> what it points at, in ``pid``."""
    out = {}
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            out[int(entry.name)] = os.readlink(entry)
    return out


def steal_channel(pid: int) -> socket.socket:
    """The worker's end of its SOCK_SEQPACKET channel."""
    for fd, target in worker_fds(pid).items():
        if not target.startswith("socket:"):
            continue
        sock = socket.socket(fileno=steal_fd(pid, fd))
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) == socket.SOCK_SEQPACKET:
            return sock
        sock.close()
    raise AssertionError(f"worker {pid} holds no SEQPACKET channel")


def steal_upward(pid: int) -> int:
    """The write end of the worker's upward pipe (the only pipe it writes to)."""
    writable = []
    for fd, target in worker_fds(pid).items():
        if target.startswith("pipe:"):
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
            flags = int(info.split("flags:")[1].split()[0], 8)
            if flags & os.O_ACCMODE == os.O_WRONLY:
                writable.append(fd)
    assert len(writable) == 1, worker_fds(pid)
    return steal_fd(pid, writable[0])


def metrics(server: Server) -> str:
    from poolinetd.ops import control

    text = control.request(str(server.control), "metrics")["text"]
    assert isinstance(text, str)
    return text


@contextlib.contextmanager
def lingering_socket() -> Iterator[socket.socket]:
    """A loopback TCP socket with SO_LINGER 20 s and data its peer never reads: the
    last close of it blocks up to 20 s. Closed at the end without lingering."""
    listeners: list[socket.socket] = []
    sock = lingering_tcp(listeners, LINGER_SECONDS)
    try:
        yield sock
    finally:
        with contextlib.suppress(OSError):  # (only if we still hold it)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        for listener in listeners:
            listener.close()


def answers_quickly(port: int, within: float = 2.0) -> float:
    """Seconds the discard service took to answer a connection (fails past ``within``)."""
    start = time.monotonic()
    assert tcp_exchange(port, b"still there", timeout=within) == b""
    return time.monotonic() - start


# -- item 1: an fd with a lingering close sent up to the master --------------------------------


@pytest.mark.root
@needs_root
def test_a_worker_cannot_make_the_master_close_a_lingering_socket(serve) -> None:
    """The worker attaches a lingering TCP socket to a message on its channel. Before the
    fix the master received it, closed it as the last holder and froze ~21 s (every
    service with it). Now the master's end is shut for reading: the send fails."""
    server = serve(TWO_SERVICES)
    other = server.port(1)
    answers_quickly(other)
    pid = worker_of(server, "echo")
    channel = steal_channel(pid)
    with channel, lingering_socket() as sock:
        fds = array.array("i", [sock.fileno()] * 4)
        payload = wire.encode_done([1])[0]
        try:
            channel.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        except OSError as exc:
            refused = exc.errno
        else:  # (before the fix) the message now holds the last reference: the master's
            refused = 0
            os.close(sock.detach())
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            assert answers_quickly(other) < 2.0
        assert refused == errno.EPIPE
    assert tcp_exchange(server.port(0), b"echo", timeout=2.0) == b"echo"  # serves on
    assert "internal_error" not in server.log()


@pytest.mark.root
@needs_root
def test_a_malformed_frame_on_the_upward_pipe_kills_only_that_worker(serve) -> None:
    """The worker's upward pipe carries no fds; a frame it garbles (an oversized length)
    is a protocol error: that worker is killed and replaced, the master never waits."""
    server = serve(TWO_SERVICES)
    pid = worker_of(server, "echo")
    up = steal_upward(pid)
    try:
        os.write(up, struct.pack("!H", 0xFFFF) + b"\x00" * 16)
    finally:
        os.close(up)
    wait_until(lambda: "worker_killed" in server.log(), 5, "the worker killed")
    assert "protocol error" in server.log()
    wait_until(lambda: not Path(f"/proc/{pid}").exists() or
               Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z", 5)
    assert answers_quickly(server.port(1)) < 2.0
    assert tcp_exchange(server.port(0), b"replaced") == b"replaced"


# -- item 3: exit codes no program can have ------------------------------------------------


@pytest.mark.root
@needs_root
def test_exit_codes_a_worker_reports_are_bounded(serve) -> None:
    """Every exit code a worker reports becomes a /metrics label. Before the fix, 508,500
    made-up codes took the master from 21 to 67 MB and /metrics to 35.5 MB. Now a
    built-in's worker (it runs no programs) is not believed at all, and a code that no
    program can have (not 0..255 or -1..-64) is a protocol error that kills the worker."""
    server = serve(f"127.0.0.1:0 stream tcp nowait {TEST_USER} internal echo\n"
                   f"127.0.0.1:0 stream tcp nowait {TEST_USER} /bin/true true\n")
    echo, prog = worker_of(server, "echo"), worker_of(server, "true")
    # A built-in's worker: every real code, and a few thousand more.
    up = steal_upward(echo)
    try:
        for frame_ in wire.encode_stats(0, 0, [(code, 1) for code in range(-64, 256)] * 10):
            os.write(up, wire.frame(frame_))
    finally:
        os.close(up)
    assert tcp_exchange(server.port(0), b"x", timeout=2.0) == b"x"
    # A program service's worker: the real codes count, then one made-up code kills it.
    up = steal_upward(prog)
    try:
        os.write(up, wire.frame(wire.encode_stats(0, 0, [(-9, 1), (255, 1)])[0]))
        os.write(up, wire.frame(wire.encode_stats(0, 0, [(2**31 - 1, 1)])[0]))
    finally:
        os.close(up)
    wait_until(lambda: "worker_killed" in server.log(), 5, "the lying worker killed")
    assert "exit code 2147483647" in server.log()
    text = metrics(server)
    exits = [line for line in text.splitlines()
             if line.startswith("poolinetd_program_exits_total{")]
    assert len(exits) == 2, exits  # SIGKILL and 255, of the program service only
    assert "2147483647" not in text
    assert tcp_exchange(server.port(1), timeout=5.0) == b""  # a replacement serves


# -- item 8: the log file is held only by workers of stderr=log services ---------------------


def _same_file(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def holds(pid: int, target: tuple[int, int]) -> list[int]:
    """The fds of ``pid`` open on the file ``target`` (device, inode)."""
    out = []
    for fd in worker_fds(pid):
        with contextlib.suppress(OSError):
            if _same_file(Path(f"/proc/{pid}/fd/{fd}")) == target:
                out.append(fd)
    return out


@pytest.mark.root
@needs_root
@pytest.mark.parametrize("log_file", [False, True], ids=["stderr", "log-file"])
def test_only_stderr_log_workers_hold_the_log_and_the_others_lines_still_arrive(
        serve, tmp_path: Path, public_dir: Path, log_file: bool) -> None:
    """Before the fix every worker held the log (its fd 2, or the --log-file fd): a
    process running as nobody truncated it and forged a "stopped" line. Now only the
    worker of the stderr=log service holds it (as fd 2, for its programs); the others'
    lines travel up their pipes and the master writes them, as the worker, made safe."""
    script = public_dir / "err.sh"
    script.write_text("#!/bin/sh\necho 'err line' >&2\nexit 3\n")
    script.chmod(0o755)
    log_path = tmp_path / "poolinetd-file.log"
    server = serve(f"127.0.0.1:0 stream tcp nowait {TEST_USER} internal echo\n"
                   f"127.0.0.1:0 on socktype=stream, wait=no, user={TEST_USER}, exec={script},"
                   f" args=err, stderr=log;\n", "--log-connections",
                   *(["--log-file", str(log_path)] if log_file else []))
    path = log_path if log_file else server.log_path
    echo, prog = worker_of(server, "echo"), worker_of(server, "err")
    target = _same_file(path)
    assert holds(echo, target) == []
    assert os.readlink(f"/proc/{echo}/fd/2") == "/dev/null"
    assert holds(prog, target) == [2]
    assert tcp_exchange(server.port(0), b"hi") == b"hi"
    wait_until(lambda: f"poolinetd[{echo}] info conn_end service=echo:0/tcp pid={echo}"
               in path.read_text(), 5, "the worker's conn_end line, written by the master")
    assert tcp_exchange(server.port(1)) == b""
    wait_until(lambda: "err line" in path.read_text(), 5, "the program's stderr in the log")
    found = wait_until(lambda: re.search(r"poolinetd\[(\d+)\] warning program_exit "
                                         r"service=err:0/tcp pid=(\d+) ", path.read_text()), 5,
                       "program_exit, written by the master as the worker")
    assert isinstance(found, re.Match)
    assert int(found[1]) in server.workers() and int(found[2]) not in server.workers()
    # A taken-over worker: a forged master line is dropped; its own lines stay one line,
    # its pid, its service, no terminal escapes.
    up = steal_upward(echo)
    try:
        os.write(up, wire.frame(wire.encode_log(20, "stopped", {"pid": server.pid})))
        os.write(up, wire.frame(wire.encode_log(20, "conn_end", {
            "service": "other", "pid": 1, "peer": "x\n2026-01-01T00:00:00 poolinetd[1] info "
            "stopped pid=1\x1b]0;owned\x07"})))
    finally:
        os.close(up)
    wait_until(lambda: "owned" in path.read_text(), 5, "the crafted line")
    lines = path.read_text().splitlines()
    crafted = [line for line in lines if "owned" in line]
    assert len(crafted) == 1 and "\x1b" not in crafted[0] and "\x07" not in crafted[0]
    assert f"poolinetd[{echo}] info conn_end service=echo:0/tcp pid={echo} " in crafted[0]
    assert not any(" stopped" in line.split("peer=")[0] for line in lines)


@pytest.mark.root
@needs_root
def test_a_worker_flooding_log_lines_gets_its_budget_and_a_count(serve) -> None:
    """5,000 lines in a burst: the master writes at most a second's budget of them
    (handles.LOG_RATE) and says how many it dropped, and keeps serving meanwhile."""
    from poolinetd.pool.handles import LOG_RATE

    server = serve(TWO_SERVICES)
    pid = worker_of(server, "echo")
    up = steal_upward(pid)
    try:
        line = wire.frame(wire.encode_log(20, "conn_end", {"peer": "flood"}))
        for _ in range(5000):
            os.write(up, line)
    finally:
        os.close(up)
    assert answers_quickly(server.port(1)) < 2.0
    wait_until(lambda: server.log().count("peer=flood") >= LOG_RATE, 5, "the budget written")
    written = server.log().count("peer=flood")
    assert LOG_RATE <= written < 5000 * 0.5, written
    # What was dropped is counted: told at the first drop, then at most every 10 s, and
    # what is left untold once the worker is gone.
    os.kill(pid, 9)

    def accounted() -> bool:
        text = server.log()
        told = re.findall(rf"worker_log_dropped service=echo:0/tcp pid={pid} lines=(\d+)", text)
        return sum(map(int, told)) + text.count("peer=flood") == 5000
    wait_until(accounted, 5, "every line written or counted as dropped")
