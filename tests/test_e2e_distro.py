"""poolinetd run as an operator would: real Debian inetd programs, their real clients.

Each test starts poolinetd (pool and classic mode) with an inetd.conf line of the
kind Debian's packages write, on loopback with port 0, and drives the program
with its own client:

- tftpd-hpa (``in.tftpd``, ``dgram udp wait``, the tftpd wait contract) with the
  tftp-hpa client ``tftp``;
- ``rsync --daemon`` in inetd mode (the socket on stdin) with the rsync client;
- micro-httpd with curl;
- fingerd (``in.fingerd``, which runs ``finger`` itself) over a plain socket,
  since the finger client cannot be pointed at another port than 79.

A test skips (with the reason) when its program or client is not installed;
``.ci/install-distro-programs`` installs them. Served files live in a directory
under /tmp that ``nobody`` can traverse (pytest's tmp_path is under a 0700
directory), removed after the test.
"""

from __future__ import annotations

import filecmp
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import IS_ROOT, TEST_USER, Server, tcp_exchange, wait_until

MODES = ["pool", "classic"]
CLIENT_TIMEOUT = 15.0  # every client command is bounded by this (seconds)
BIG_SIZE = 100_000  # more than one TFTP block (512 bytes): 196 blocks

TFTPD = "/usr/sbin/in.tftpd"
FINGERD = "/usr/sbin/in.fingerd"
# micro-httpd's maintainer scripts edit /etc/inetd.conf and enable a systemd
# socket, so .ci/install-distro-programs unpacks it here instead of installing it.
MICRO_HTTPD_CACHE = "/var/cache/poolinetd-ci/micro-httpd/usr/sbin/micro-httpd"

# Log lines look like "2026-01-01T00:00:00 poolinetd[42] info event key=value".
BAD_LOG_LINE = re.compile(r"^\S+ poolinetd\[\d+\] (warning|error|critical) .*$", re.M)


def _executable(path: str | None) -> str | None:
    return path if path and os.access(path, os.X_OK) else None


def _tftp_hpa_client() -> str | None:
    """The tftp-hpa client (other ``tftp`` clients take other options)."""
    tftp = shutil.which("tftp")
    if not tftp:
        return None
    try:
        out = subprocess.run([tftp, "-V"], capture_output=True, timeout=5, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return tftp if b"tftp-hpa" in out.stdout + out.stderr else None


def _micro_httpd() -> str | None:
    return _executable("/usr/sbin/micro-httpd") or _executable(MICRO_HTTPD_CACHE)


def _have_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


HAVE_IPV6 = _have_ipv6()


def need(**programs: str | None) -> dict[str, str]:
    """Skip the test unless every named program was found."""
    missing = [name for name, path in programs.items() if not path]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (run .ci/install-distro-programs)")
    return {name: path for name, path in programs.items() if path}


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
    """A client command, always bounded in time, never reading our stdin."""
    return subprocess.run(cmd, capture_output=True, timeout=CLIENT_TIMEOUT,  # type: ignore[call-overload,no-any-return]
                          stdin=subprocess.DEVNULL, **kw)


def log_errors(server: Server) -> list[str]:
    return [m.group(0) for m in BAD_LOG_LINE.finditer(server.log())]


def program_exits(server: Server, service: str) -> list[str]:
    return [line for line in server.log().splitlines()
            if " program_exit " in line and f"service={service} " in line]


@pytest.fixture
def served() -> Iterator[Path]:
    """A directory ``nobody`` can traverse and read, with the files the programs serve.

    small.txt, big.bin (100 KB random), tree/ (nested dirs, a symlink, an
    empty file) for rsync, incoming/ writable by the test user only.
    """
    root = Path(tempfile.mkdtemp(prefix="poolinetd-distro-", dir="/tmp"))
    try:
        root.chmod(0o755)
        (root / "small.txt").write_text("hello from poolinetd\n")
        (root / "big.bin").write_bytes(os.urandom(BIG_SIZE))
        tree = root / "tree"
        (tree / "sub" / "deeper").mkdir(parents=True)
        (tree / "a.txt").write_text("alpha\n")
        (tree / "sub" / "b.bin").write_bytes(os.urandom(300_000))
        (tree / "sub" / "deeper" / "empty").write_bytes(b"")
        (tree / "link").symlink_to("a.txt")
        incoming = root / "incoming"
        incoming.mkdir()
        for path in [root, *root.rglob("*")]:
            if not path.is_symlink():
                path.chmod(0o755 if path.is_dir() else 0o644)
        user = pwd.getpwnam(TEST_USER)
        os.chown(incoming, user.pw_uid, user.pw_gid)
        incoming.chmod(0o700)
        (root / "rsyncd.conf").write_text(
            "use chroot = no\n"  # chroot needs root; the daemon runs as the service's user
            "max connections = 0\n"
            "[data]\n"
            f"  path = {tree}\n"
            "  comment = poolinetd test tree\n"
            "  read only = yes\n"
            "[incoming]\n"
            f"  path = {incoming}\n"
            "  read only = no\n")
        (root / "rsyncd.conf").chmod(0o644)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- tftpd-hpa


def tftp_get(tftp: str, host: str, port: int, remote: str, local: Path) -> str:
    cmd = [tftp, *(["-6"] if ":" in host else ["-4"]), "-m", "binary", host, str(port),
           "-c", "get", remote, str(local)]
    out = run(cmd)
    # tftp-hpa exits 0 even when the transfer failed: the caller checks content.
    return (out.stdout + out.stderr).decode(errors="replace")


@pytest.mark.parametrize("mode", MODES)
def test_tftpd_hpa_wait_service(serve, served: Path, tmp_path: Path, mode: str) -> None:
    """in.tftpd as Debian runs it (``dgram udp wait root ... -s DIR``) serves files
    byte for byte, over IPv4 and IPv6; one tftpd serves every request while it
    runs (the master does not poll a lent socket), and after it exits on its own
    (``-t 1``: idle timeout) the next request starts a new one."""
    progs = need(**{"in.tftpd (tftpd-hpa)": _executable(TFTPD),
                    "tftp (tftp-hpa)": _tftp_hpa_client()})
    tftp = progs["tftp (tftp-hpa)"]
    if not IS_ROOT:
        pytest.skip("in.tftpd -s must start as root: it chroots, then drops to -u itself")
    line = f"dgram udp wait root {TFTPD} in.tftpd -s {served} -u {TEST_USER} -t 1\n"
    conf = f"127.0.0.1:0 {line}" + (f"[::1]:0 {line}" if HAVE_IPV6 else "")
    server = serve(conf, "--log-connections", mode=mode)
    port4 = server.port(0)

    got = tmp_path / "small.txt"
    tftp_get(tftp, "127.0.0.1", port4, "small.txt", got)
    assert got.read_text() == "hello from poolinetd\n"
    big = tmp_path / "big.bin"
    tftp_get(tftp, "127.0.0.1", port4, "big.bin", big)
    assert big.read_bytes() == (served / "big.bin").read_bytes()
    missing = tftp_get(tftp, "127.0.0.1", port4, "no-such-file", tmp_path / "missing")
    assert "File not found" in missing
    # chrooted to DIR (-s): no way out.
    passwd = tmp_path / "passwd"
    tftp_get(tftp, "127.0.0.1", port4, "../../etc/passwd", passwd)
    assert not passwd.exists() or "root:" not in passwd.read_text()
    instances = 1
    if HAVE_IPV6:
        got6 = tmp_path / "big6.bin"
        tftp_get(tftp, "::1", server.port(1), "big.bin", got6)
        assert got6.read_bytes() == (served / "big.bin").read_bytes()
        instances += 1

    # Each tftpd served all of its requests and leaves after 1 s idle.
    service = server.listeners[0]["service"]
    assert isinstance(service, str)
    wait_until(lambda: len(program_exits(server, service)) >= instances, 10, "tftpd exits")
    assert len(program_exits(server, service)) == instances, server.log()
    assert all(" status=0 " in line for line in program_exits(server, service)), server.log()
    # The master polls the socket again: a new request starts a new tftpd (with
    # no one reading the socket, tftp would time out and fetch nothing).
    again = tmp_path / "again.txt"
    tftp_get(tftp, "127.0.0.1", port4, "small.txt", again)
    assert again.read_text() == "hello from poolinetd\n", server.log()
    status = server.status()["services"]
    assert isinstance(status, list)
    assert status[0]["accepted"] == 2, status
    assert not log_errors(server), server.log()


# --------------------------------------------------------------------------- rsync


def rsync_url(host: str, port: int, path: str) -> str:
    return f"rsync://{'[' + host + ']' if ':' in host else host}:{port}/{path}"


@pytest.mark.parametrize("mode", MODES)
def test_rsync_daemon_inetd_mode(serve, served: Path, tmp_path: Path, mode: str) -> None:
    """``rsync --daemon`` reading the connection on stdin: the client lists the
    modules, copies a directory tree (nested dirs, a symlink, 300 KB binary)
    identical to the source over IPv4 and IPv6, is refused an upload to a
    read-only module, and an upload to a writable one lands owned by the
    service's user (the privilege drop, seen by a real program)."""
    rsync = need(rsync=shutil.which("rsync"))["rsync"]
    conf = "".join(f"{addr}:0 stream tcp nowait {TEST_USER} {rsync} rsync --daemon "
                   f"--config={served / 'rsyncd.conf'}\n"
                   for addr in ["127.0.0.1", *(["[::1]"] if HAVE_IPV6 else [])])
    server = serve(conf, mode=mode)
    opts = ["--timeout=10", "--contimeout=10"]

    listing = run([rsync, *opts, rsync_url("127.0.0.1", server.port(0), "")])
    assert re.search(rb"^data\s+poolinetd test tree$", listing.stdout, re.M), listing

    hosts = [("127.0.0.1", server.port(0))] + ([("::1", server.port(1))] if HAVE_IPV6 else [])
    for host, port in hosts:
        dest = tmp_path / f"copy-{port}"
        out = run([rsync, "-a", *opts, rsync_url(host, port, "data/"), f"{dest}/"])
        assert out.returncode == 0, out
        assert_same_tree(served / "tree", dest)

    upload = tmp_path / "upload.txt"
    upload.write_text("pushed\n")
    refused = run([rsync, *opts, str(upload), rsync_url("127.0.0.1", server.port(0), "data/")])
    assert refused.returncode != 0
    assert b"read only" in refused.stderr, refused
    assert not (served / "tree" / "upload.txt").exists()

    pushed = run([rsync, *opts, str(upload), rsync_url("127.0.0.1", server.port(0), "incoming/")])
    assert pushed.returncode == 0, pushed
    landed = served / "incoming" / "upload.txt"
    assert landed.read_text() == "pushed\n"
    assert landed.stat().st_uid == pwd.getpwnam(TEST_USER).pw_uid


def assert_same_tree(src: Path, dst: Path) -> None:
    cmp = filecmp.dircmp(src, dst)
    stack = [cmp]
    while stack:
        c = stack.pop()
        assert not (c.left_only or c.right_only or c.funny_files), (c.left, c.right)
        _, mismatch, errors = filecmp.cmpfiles(c.left, c.right, c.common_files, shallow=False)
        assert not mismatch and not errors, (c.left, mismatch, errors)
        stack.extend(c.subdirs.values())
    assert os.readlink(dst / "link") == "a.txt"
    assert (dst / "sub" / "b.bin").stat().st_size == 300_000


# --------------------------------------------------------------------------- micro-httpd


def curl(url: str, out: Path | None = None, *extra: str) -> subprocess.CompletedProcess[bytes]:
    cmd = ["curl", "-sS", "-g", "--max-time", "10", "-o", str(out) if out else "/dev/null",
           "-w", "%{http_code} %{content_type} %{size_download}", *extra, url]
    return run(cmd)


def http_url(host: str, port: int, path: str) -> str:
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/{path}"


@pytest.mark.parametrize("mode", MODES)
def test_micro_httpd_with_curl(serve, served: Path, tmp_path: Path, mode: str) -> None:
    """micro-httpd (an inetd-only HTTP server) answers curl: a text page with
    its content type, a 100 KB binary byte for byte, a directory index, 404 for
    a missing file, over IPv4 and IPv6."""
    progs = need(**{"micro-httpd": _micro_httpd(), "curl": shutil.which("curl")})
    httpd = progs["micro-httpd"]
    conf = "".join(f"{addr}:0 stream tcp nowait {TEST_USER} {httpd} micro-httpd {served}\n"
                   for addr in ["127.0.0.1", *(["[::1]"] if HAVE_IPV6 else [])])
    server = serve(conf, mode=mode)
    hosts = [("127.0.0.1", server.port(0))] + ([("::1", server.port(1))] if HAVE_IPV6 else [])
    for host, port in hosts:
        page = tmp_path / f"small-{port}.txt"
        out = curl(http_url(host, port, "small.txt"), page)
        assert out.stdout.decode().startswith("200 text/plain"), out
        assert page.read_text() == "hello from poolinetd\n"

        big = tmp_path / f"big-{port}.bin"
        out = curl(http_url(host, port, "big.bin"), big)
        code, *_, size = out.stdout.decode().split()
        assert (code, size) == ("200", str(BIG_SIZE)), out
        assert big.read_bytes() == (served / "big.bin").read_bytes()

        index = tmp_path / f"index-{port}.html"
        out = curl(http_url(host, port, "tree/"), index)
        assert out.stdout.startswith(b"200 text/html"), out
        assert 'href="a.txt"' in index.read_text() and 'href="sub"' in index.read_text()

        out = curl(http_url(host, port, "no-such-file"))
        assert out.stdout.startswith(b"404 "), out


# --------------------------------------------------------------------------- fingerd


TCPD = "/usr/sbin/tcpd"


@pytest.mark.parametrize("mode", MODES)
def test_fingerd(serve, mode: str) -> None:
    """in.fingerd answers a finger query (it runs the real ``finger`` for it)
    about a user, and the empty query, over IPv4 and IPv6; and the line exactly
    as the fingerd package writes it into /etc/inetd.conf (through tcpd, the
    TCP wrapper, which looks at the peer of fd 0 and execs argv[0]) works too."""
    need(**{"in.fingerd (fingerd)": _executable(FINGERD), "finger": shutil.which("finger")})
    conf = "".join(f"{addr}:0 stream tcp nowait {TEST_USER} {FINGERD} in.fingerd\n"
                   for addr in ["127.0.0.1", *(["[::1]"] if HAVE_IPV6 else [])])
    servers = [serve(conf, mode=mode)]
    if _executable(TCPD):
        # Debian's: finger stream tcp nowait nobody /usr/sbin/tcpd /usr/sbin/in.fingerd
        # (a server of its own: with the same display name and address, two port-0
        # lines could not be told apart on a reload, so poolinetd rejects them).
        servers.append(serve(f"127.0.0.1:0 stream tcp nowait {TEST_USER} {TCPD} {FINGERD}\n",
                             mode=mode))
    for server in servers:
        for lst in server.listeners:
            host, port = ("::1" if lst["family"] == "inet6" else "127.0.0.1"), lst["port"]
            assert isinstance(port, int)
            reply = tcp_exchange(port, b"nobody\r\n", host=host, timeout=CLIENT_TIMEOUT).decode()
            assert re.search(r"^Login: nobody\s+Name: nobody", reply, re.M), (lst, reply)
            assert "Shell: /usr/sbin/nologin" in reply, reply
            everyone = tcp_exchange(port, b"\r\n", host=host, timeout=CLIENT_TIMEOUT)
            assert everyone, "empty reply to the empty finger query"
        assert not log_errors(server), server.log()


# --------------------------------------------------------------------------- load


CLIENTS = 20


def test_real_clients_under_load_pool(serve, served: Path, tmp_path: Path) -> None:
    """Pool mode under real clients at once: 20 curl (100 KB each), 20 rsync
    (the tree) and, as root, 20 tftp (100 KB each) run concurrently; all
    succeed byte for byte, every program exits 0 and the master logs no
    warning or error."""
    progs = need(**{"micro-httpd": _micro_httpd(), "curl": shutil.which("curl"),
                    "rsync": shutil.which("rsync")})
    tftp = _tftp_hpa_client() if IS_ROOT and _executable(TFTPD) else None
    conf = (f"127.0.0.1:0 stream tcp nowait {TEST_USER} {progs['micro-httpd']} micro-httpd "
            f"{served}\n"
            f"127.0.0.1:0 stream tcp nowait {TEST_USER} {progs['rsync']} rsync --daemon "
            f"--config={served / 'rsyncd.conf'}\n")
    if tftp:
        conf += (f"127.0.0.1:0 dgram udp wait root {TFTPD} in.tftpd -s {served} "
                 f"-u {TEST_USER} -t 1\n")
    server = serve(conf, "--log-connections", "--pool-max", "4", mode="pool")
    http_port, rsync_port = server.port(0), server.port(1)

    procs: list[tuple[str, Path, subprocess.Popen[bytes]]] = []
    try:
        for i in range(CLIENTS):
            out = tmp_path / f"curl-{i}.bin"
            procs.append(("curl", out, subprocess.Popen(
                ["curl", "-sS", "--max-time", "20", "-o", str(out),
                 http_url("127.0.0.1", http_port, "big.bin")],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
            dest = tmp_path / f"rsync-{i}"
            procs.append(("rsync", dest, subprocess.Popen(
                [progs["rsync"], "-a", "--timeout=20", "--contimeout=20",
                 rsync_url("127.0.0.1", rsync_port, "data/"), f"{dest}/"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
            if tftp:
                got = tmp_path / f"tftp-{i}.bin"
                procs.append(("tftp", got, subprocess.Popen(
                    [tftp, "-4", "-m", "binary", "127.0.0.1", str(server.port(2)),
                     "-c", "get", "big.bin", str(got)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
        for kind, path, proc in procs:
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, (kind, path, err)
            if kind == "rsync":
                assert_same_tree(served / "tree", path)
            else:
                assert path.read_bytes() == (served / "big.bin").read_bytes(), (kind, path, err)
    finally:
        for _, _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    for name, count in [("micro-httpd:0/tcp", CLIENTS), ("rsync:0/tcp", CLIENTS)]:
        wait_until(lambda name=name, count=count: len(program_exits(server, name)) >= count,
                   10, f"{count} program_exit lines for {name}")
        exits = program_exits(server, name)
        assert len(exits) == count, exits
        assert all(" status=0 " in line for line in exits), exits
    for name in ("micro-httpd:0/tcp", "rsync:0/tcp"):
        status = server.service_status(name)
        assert status["accepted"] == CLIENTS, status
    assert not log_errors(server), server.log()


# --------------------------------------------------------------------------- found bugs


@pytest.mark.parametrize("mode", MODES)
def test_status_shows_ipv6_listener_bracketed(serve, served: Path, mode: str) -> None:
    """An operator serving rsync on 127.0.0.1 and ::1 (two services, both named
    ``rsync:0/tcp``) tells them apart in ``poolinetd status`` by LISTEN only;
    ``::1:PORT`` there is ambiguous (it is itself a valid IPv6 address) and is
    not how the config writes it (``[::1]:PORT``)."""
    rsync = need(rsync=shutil.which("rsync"))["rsync"]
    if not HAVE_IPV6:
        pytest.skip("no IPv6 loopback")
    server = serve(f"[::1]:0 stream tcp nowait {TEST_USER} {rsync} rsync --daemon "
                   f"--config={served / 'rsyncd.conf'}\n", mode=mode)
    services = server.status()["services"]
    assert isinstance(services, list)
    assert services[0]["listeners"] == [f"[::1]:{server.port(0)}"], services
