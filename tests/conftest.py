"""Fixtures: start a real poolinetd on loopback and learn its ports from --ready-fd."""

from __future__ import annotations

import contextlib
import errno
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest

REPO = Path(__file__).resolve().parents[1]
IS_ROOT = os.geteuid() == 0
# Services in test configs run as this user: nobody when the tests run as root
# (privileges really drop), else ourselves.
TEST_USER = "nobody" if IS_ROOT else __import__("pwd").getpwuid(os.getuid()).pw_name


# Fixtures that start real processes: a test using one (directly or through
# another fixture) is a "process" test, whatever its module says, so
# ``pytest -m "not process"`` is the quick run of the pure and unit tests.
PROCESS_FIXTURES = frozenset({"serve", "nobody_python", "staged_programs"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if PROCESS_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.process)


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "") -> object:
    """Poll ``predicate`` until it is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def lingering_tcp(listeners: list[socket.socket], seconds: int) -> socket.socket:
    """A loopback TCP socket whose last close waits up to ``seconds``: its send queue is
    full of data the peer (a listener, appended to ``listeners``, that never accepts,
    with a tiny receive buffer) will not take, and SO_LINGER is set. Closing the
    listener resets the connection, so nothing lingers after the test."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (the peer inherits it)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listeners.append(listener)
    tcp = socket.socket()
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    tcp.connect(listener.getsockname())
    tcp.setblocking(False)
    while True:  # until the kernel takes nothing more: the peer's window stays shut
        sent = 0
        with contextlib.suppress(BlockingIOError):
            while True:
                sent += tcp.send(b"x" * 65536)
        if not sent:
            break
        time.sleep(0.05)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, seconds))
    return tcp


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    info: dict[str, object]
    conf: Path
    control: Path
    log_path: Path
    args: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def listeners(self) -> list[dict[str, object]]:
        value = self.info["listeners"]
        assert isinstance(value, list)
        return value

    def port(self, index: int = 0) -> int:
        port = self.listeners[index]["port"]
        assert isinstance(port, int)
        return port

    def port_of(self, service: str, socket_type: str = "stream") -> int:
        for lst in self.listeners:
            if lst["service"] == service and lst["socket_type"] == socket_type:
                port = lst["port"]
                assert isinstance(port, int)
                return port
        raise KeyError(service)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def send_signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"poolinetd did not stop within {timeout}s after {sig}\n{self.log()}")

    def status(self) -> dict[str, object]:
        from poolinetd.ops import control

        return control.request(str(self.control), "status")

    def service_status(self, name: str) -> dict[str, object]:
        services = self.status()["services"]
        assert isinstance(services, list)
        for svc in services:
            if svc["service"] == name and svc["state"] != "retiring":
                return dict(svc)
        raise KeyError(name)

    def workers(self) -> list[int]:
        """Pids of the master's direct children (its workers)."""
        return children_of(self.pid)


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry))
    return out


def start_server(tmp_path: Path, conf_text: str, *args: str, mode: str = "pool",
                 timeout: float = 20.0, expect_ready: bool = True) -> Server:
    conf = tmp_path / f"inetd-{time.monotonic_ns()}.conf"
    conf.write_text(conf_text)
    control = tmp_path / f"ctl-{time.monotonic_ns()}.sock"
    log_path = tmp_path / f"poolinetd-{time.monotonic_ns()}.log"
    rfd, wfd = os.pipe()
    cmd = [sys.executable, "-m", "poolinetd", "run", "-c", str(conf), "--mode", mode,
           "--ready-fd", str(wfd), "--control", str(control), "--graceful-timeout", "10", *args]
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, pass_fds=(wfd,), stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=subprocess.STDOUT, cwd=REPO)
    os.close(wfd)
    server = Server(proc, {}, conf, control, log_path, cmd)
    try:
        if not expect_ready:
            return server
        data = b""
        deadline = time.monotonic() + timeout
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            ready, _, _ = select.select([rfd], [], [], max(0.0, left))
            if not ready:
                proc.kill()
                proc.wait()
                pytest.fail(f"poolinetd not ready in {timeout}s\n{log_path.read_text()}")
            chunk = os.read(rfd, 65536)
            if not chunk:
                proc.wait(5)
                pytest.fail(f"poolinetd exited ({proc.returncode}) before ready\n"
                            f"{log_path.read_text()}")
            data += chunk
        server.info = orjson.loads(data)
        return server
    finally:
        os.close(rfd)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every user can traverse (pytest's tmp_path is under a 0700 dir),
    for programs and files that services running as ``nobody`` must reach."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="poolinetd-test-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


PROGRAMS_SRC = REPO / "tests" / "programs"


@pytest.fixture(scope="session")
def staged_programs() -> Iterator[Path]:
    """tests/programs/ copied into a fresh 0755 directory under /tmp, for the session.

    Services run these as ``nobody``, who cannot reach them inside a checkout
    under a 0700 directory (root's home): use ``staged_programs / "report.sh"``
    in configs, never a path inside the repository. The Python programs start
    with ``#!/usr/bin/env python3`` and import only the standard library, so
    they run under the system interpreter found on the launch PATH (a venv
    under /root would not be reachable by ``nobody`` either). The directory is
    created by ``mkdtemp`` (ours alone, so nobody can swap it) and removed at
    the end of the session.
    """
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="poolinetd-programs-", dir="/tmp"))
    try:
        path.chmod(0o755)
        for src in sorted(PROGRAMS_SRC.iterdir()):
            if src.is_file() and not src.is_symlink():
                dst = path / src.name
                shutil.copyfile(src, dst)
                dst.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def refused(port: int, host: str = "127.0.0.1") -> bool:
    """True if the server closes (or resets) a fresh connection without a byte."""
    try:
        return tcp_exchange(port, b"", host) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:  # reset before our half-close
            return True
        raise


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """``serve(conf_text, *args, mode=...)`` starts poolinetd; every one is stopped at teardown."""
    started: list[Server] = []

    def _serve(conf_text: str, *args: str, **kw: object) -> Server:
        server = start_server(tmp_path, conf_text, *args, **kw)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield _serve
    for server in started:
        if server.proc.poll() is None:
            server.stop(signal.SIGINT)


def tcp_exchange(port: int, payload: bytes = b"", host: str = "127.0.0.1",
                 timeout: float = 5.0, shut: bool = True, limit: int = 1 << 20) -> bytes:
    """Connect, send ``payload``, half-close, read until EOF (or ``limit`` bytes)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        if payload:
            sock.sendall(payload)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        total = 0
        while total < limit:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
            total += len(data)
        return b"".join(chunks)


def udp_exchange(port: int, payload: bytes, host: str = "127.0.0.1", timeout: float = 3.0,
                 src_port: int = 0, source: str | None = None) -> bytes | None:
    """Send one datagram from ``source`` (default ``host``) and wait for one reply (None)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.bind((source or host, src_port))
        sock.sendto(payload, (host, port))
        try:
            return sock.recvfrom(65536)[0]
        except TimeoutError:
            return None


def fd_targets(pid: int) -> list[str]:
    """What each open fd of ``pid`` points at (sockets, pipes, files)."""
    out = []
    base = Path(f"/proc/{pid}/fd")
    for entry in sorted(base.iterdir(), key=lambda p: int(p.name)):
        with contextlib.suppress(OSError):
            out.append(f"{entry.name}:{os.readlink(entry)}")
    return out


def descendants(pid: int) -> list[int]:
    out = []
    for child in children_of(pid):
        out.append(child)
        out.extend(descendants(child))
    return out


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture(scope="session")
def nobody_python() -> Iterator[tuple[str, Path]]:
    """(interpreter, directory): a Python ``nobody`` can run (the system's) and a fresh
    0755 directory holding poolinetd, its compiled dependencies and
    listen_fds_report.py, for tests that run poolinetd's code as ``nobody``: a
    venv or a clone under a 0700 directory (root's home) is out of its reach.
    Use ``PYTHONPATH=<directory>``; skipped where it cannot work."""
    if not IS_ROOT or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run poolinetd as nobody")
    import orjson
    import setproctitle

    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"needs {SYSTEM_PYTHON}")
    version = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    if version != str(sys.version_info[:2]):
        pytest.skip(f"{SYSTEM_PYTHON} is {version}, the test interpreter {sys.version_info[:2]}: "
                    "the compiled dependencies would not load")
    import tempfile

    stage = Path(tempfile.mkdtemp(prefix="poolinetd-nobody-", dir="/tmp"))
    try:
        stage.chmod(0o755)
        shutil.copytree(REPO / "poolinetd", stage / "poolinetd",
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(PROGRAMS_SRC / "listen_fds_report.py", stage / "listen_fds_report.py")
        for module in (orjson, setproctitle):
            src = Path(module.__file__ or "")
            if src.parent.name == module.__name__:  # a package directory
                shutil.copytree(src.parent, stage / module.__name__,
                                ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(src, stage / src.name)
        for path in stage.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield SYSTEM_PYTHON, stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def have_ipv6_loopback() -> bool:
    """Whether ::1 can be bound here (containers without IPv6 have none)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True
