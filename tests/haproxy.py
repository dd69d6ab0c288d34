"""Test helper (not a test file): run a real HAProxy on loopback in front of test servers.

``start(workdir, routes)`` writes ``workdir/haproxy.cfg`` from ``Route``/``Server``
descriptions and runs ``haproxy -f cfg -db`` (foreground, no daemon, never the system
service) as our child; ``start_file(workdir, cfg, env, ports)`` runs a given config
(e.g. conf/haproxy.cfg, whose addresses come from the environment) the same way.
Both return a ``HAProxy`` with the frontend ports, the log (HAProxy logs to stderr,
captured in ``workdir/haproxy.log``), the servers' health states from the admin
socket, and ``stop()``; it is also a context manager.

HAProxy cannot bind port 0 and report it, so frontend ports are picked by binding
port 0 on 127.0.0.1 and closing (a small race with other processes, accepted).
Readiness is the admin socket answering ``show info``: HAProxy binds every listener
before it enters its loop, so by then the frontends accept. The probe never touches a
frontend, so the servers behind it see only the test's connections (and health
checks). A test that needs a distinct client source binds its client socket to
127.0.x.y itself; HAProxy forwards that address in the PROXY header.

The admin socket lives in a short private directory under /tmp (AF_UNIX paths are
limited to 108 bytes and pytest's tmp paths can be longer), removed by ``stop()``.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal

LOG_LIMIT = 4 << 20  # bytes of log read back at most
_STAT_LIMIT = 1 << 20


def haproxy_binary() -> str | None:
    """The haproxy executable (Debian puts it in /usr/sbin, often not on PATH), or None."""
    found = shutil.which("haproxy")
    if found:
        return found
    return "/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (bind port 0, read it, close)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class Server:
    """One ``server`` line. ``send_proxy``: the PROXY header HAProxy prefixes to each
    forwarded connection. ``check``: health checks every ``inter``; with
    ``check_send_proxy`` they carry a PROXY header too (v2: the LOCAL command)."""

    name: str
    port: int
    host: str = "127.0.0.1"
    send_proxy: Literal["v1", "v2"] | None = None
    check: bool = False
    check_send_proxy: bool = False
    inter: str = "500ms"
    proxy_v2_options: str | None = None  # e.g. "crc32c" (adds a TLV)

    def line(self) -> str:
        words = [f"server {self.name} {hostport(self.host, self.port)}"]
        if self.send_proxy == "v1":
            words.append("send-proxy")
        elif self.send_proxy == "v2":
            words.append("send-proxy-v2")
        if self.proxy_v2_options:
            words.append(f"proxy-v2-options {self.proxy_v2_options}")
        if self.check:
            words.append(f"check inter {self.inter} fall 2 rise 1")
        if self.check_send_proxy:
            words.append("check-send-proxy")
        return " ".join(words)


@dataclass(frozen=True)
class Route:
    """A ``listen`` section: one frontend port (picked at start), its servers in
    round-robin. ``check_echo``: health checks send it and expect it back (for echo
    backends); otherwise a check is a plain connect (``option tcp-check``)."""

    name: str
    servers: tuple[Server, ...]
    check_echo: str | None = None
    bind_host: str = "127.0.0.1"  # "::1" for an IPv6 frontend (TCP6 / AF_INET6 headers)


def hostport(host: str, port: int) -> str:
    """HAProxy's address:port spelling (IPv6 in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def render_config(routes: Sequence[Route], ports: Mapping[str, int], admin_sock: Path) -> str:
    """The haproxy.cfg text for ``routes``; ``ports[route.name]`` is its frontend port."""
    out = [
        "global",
        "    log stderr format raw local0 info",
        f"    stats socket {admin_sock} mode 600 level admin",
        "    maxconn 1024",
        "",
        "defaults",
        "    mode tcp",
        "    log global",
        "    option tcplog",
        "    timeout connect 5s",
        "    timeout client 30s",
        "    timeout server 30s",
        "    timeout check 5s",
    ]
    for route in routes:
        out += ["", f"listen {route.name}"]
        out.append(f"    bind {hostport(route.bind_host, ports[route.name])}")
        out.append("    balance roundrobin")
        if any(s.check for s in route.servers):
            out.append("    option tcp-check")
            if route.check_echo is not None:
                out.append(f"    tcp-check send {route.check_echo}\\r\\n")
                out.append(f"    tcp-check expect string {route.check_echo}")
        out += [f"    {s.line()}" for s in route.servers]
    return "\n".join(out) + "\n"


@dataclass
class HAProxy:
    """A running ``haproxy -db`` child. ``ports``: frontend name -> port."""

    proc: subprocess.Popen[bytes]
    workdir: Path
    cfg: Path
    ports: dict[str, int]
    admin_sock: Path
    log_path: Path
    _sock_dir: Path | None = field(default=None, repr=False)

    @property
    def port(self) -> int:
        """The frontend port when there is exactly one frontend."""
        (only,) = self.ports.values()
        return only

    def log(self) -> str:
        """What HAProxy wrote to stdout/stderr so far (connection logs, state changes)."""
        try:
            with self.log_path.open("rb") as f:
                return f.read(LOG_LIMIT).decode("utf-8", "replace")
        except OSError:
            return ""

    def command(self, line: str, timeout: float = 5.0) -> str:
        """One admin-socket command (e.g. ``show info``); the reply text, read to EOF."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.admin_sock))
            sock.sendall(line.encode() + b"\n")
            chunks: list[bytes] = []
            total = 0
            while total < _STAT_LIMIT:
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
                total += len(data)
        return b"".join(chunks).decode("utf-8", "replace")

    def stats(self) -> list[dict[str, str]]:
        """``show stat`` as rows keyed by HAProxy's CSV column names (pxname, svname,
        status, check_status, ...)."""
        text = self.command("show stat")
        if text.startswith("# "):
            text = text[2:]
        return list(csv.DictReader(io.StringIO(text)))

    def server_status(self, backend: str, server: str) -> str | None:
        """The server's status column (``UP``, ``DOWN``, ``UP 1/2``, ...), None if absent."""
        for row in self.stats():
            if row.get("pxname") == backend and row.get("svname") == server:
                return row.get("status")
        return None

    def wait_server(
        self, backend: str, server: str, status: str = "UP", timeout: float = 30.0
    ) -> None:
        """Wait until a server's health state is exactly ``status``; AssertionError
        (with the log) if it is not within ``timeout``."""
        deadline = time.monotonic() + timeout
        seen: str | None = None
        while time.monotonic() < deadline:
            self._assert_running()
            seen = self.server_status(backend, server)
            if seen == status:
                return
            time.sleep(0.05)
        raise AssertionError(f"{backend}/{server} is {seen!r}, not {status!r}:\n{self.log()}")

    def stop(self) -> None:
        """Stop HAProxy (SIGTERM, then SIGKILL after 10 s) and remove the socket dir."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._sock_dir is not None:
            shutil.rmtree(self._sock_dir, ignore_errors=True)
            self._sock_dir = None

    def _assert_running(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"haproxy exited with {self.proc.returncode}:\n{self.log()}")

    def __enter__(self) -> HAProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start(workdir: Path, routes: Sequence[Route], timeout: float = 30.0) -> HAProxy:
    """Write ``workdir/haproxy.cfg`` for ``routes`` and run HAProxy on it (module doc)."""
    ports = {route.name: free_port(route.bind_host) for route in routes}
    sock_dir = Path(tempfile.mkdtemp(prefix="hx", dir="/tmp"))
    admin = sock_dir / "admin.sock"
    cfg = workdir / "haproxy.cfg"
    cfg.write_text(render_config(routes, ports, admin))
    return _launch(workdir, cfg, {}, ports, admin, sock_dir, timeout)


def start_file(
    workdir: Path,
    cfg: Path,
    env: Mapping[str, str],
    ports: Mapping[str, int],
    timeout: float = 30.0,
) -> HAProxy:
    """Run HAProxy on an existing ``cfg`` whose addresses come from ``env`` (as in
    conf/haproxy.cfg). The config must log to ``"${HAPROXY_LOG}"`` and put its admin
    socket at ``"${HAPROXY_SOCK}"``: both are set here. ``ports`` names the frontend
    ports the caller put in ``env`` (for ``HAProxy.ports``)."""
    sock_dir = Path(tempfile.mkdtemp(prefix="hx", dir="/tmp"))
    admin = sock_dir / "admin.sock"
    full = {**env, "HAPROXY_LOG": "stderr", "HAPROXY_SOCK": str(admin)}
    return _launch(workdir, cfg, full, dict(ports), admin, sock_dir, timeout)


def _launch(
    workdir: Path,
    cfg: Path,
    env: Mapping[str, str],
    ports: dict[str, int],
    admin: Path,
    sock_dir: Path,
    timeout: float,
) -> HAProxy:
    binary = haproxy_binary()
    if binary is None:
        shutil.rmtree(sock_dir, ignore_errors=True)
        raise FileNotFoundError("haproxy is not installed (.ci/install-distro-programs)")
    log_path = workdir / "haproxy.log"
    with log_path.open("wb") as log:  # the child keeps its own copy of the fd
        proc = subprocess.Popen(
            [binary, "-f", str(cfg), "-db"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            cwd=workdir,
            start_new_session=True,  # a ^C in the terminal is ours to handle, not its
        )
    hx = HAProxy(proc, workdir, cfg, ports, admin, log_path, sock_dir)
    deadline = time.monotonic() + timeout
    while True:
        try:
            hx._assert_running()
            if "Name: HAProxy" in hx.command("show info"):
                return hx
        except OSError:
            pass
        except AssertionError:
            hx.stop()
            raise
        if time.monotonic() > deadline:
            hx.stop()
            raise AssertionError(f"haproxy not ready after {timeout}s:\n{hx.log()}")
        time.sleep(0.02)


__all__ = [
    "HAProxy",
    "Route",
    "Server",
    "free_port",
    "haproxy_binary",
    "hostport",
    "render_config",
    "start",
    "start_file",
]
