"""tcp_wrappers' spawn, twist, setenv and severity, and datagram wait services judged,
against a running poolinetd on loopback, both modes (rules in a test directory via
``--tcp-wrappers-dir``, clients from distinct 127.0.0.x sources).

The commands write what they saw (uid, fds, environment) into a directory
every user can write, and the tests read it back: a spawned or twisted
command runs as the service's user (``nobody`` when the tests run as root),
never as the root master.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import IS_ROOT, TEST_USER, Server, children_of, udp_exchange, wait_until
from test_tcpwrappers_e2e import exchange_from, refused_by, rules

U = TEST_USER
UID = pwd.getpwnam(U).pw_uid
MODES = ["pool", "classic"]
TFTPD = "/usr/sbin/in.tftpd"
TFTP = "/usr/bin/tftp"


@pytest.fixture
def drop_dir(public_dir: Path) -> Path:
    """A directory the service's user may write into (the commands' reports)."""
    out = public_dir / "out"
    out.mkdir()
    out.chmod(0o777)
    return out


def read_when_there(path: Path, what: str) -> str:
    """A command's report, once it is complete (written to a temporary name, then moved)."""
    wait_until(path.exists, 30, what)
    return path.read_text()


@pytest.mark.process
@pytest.mark.parametrize("mode", MODES)
def test_spawn_runs_as_the_service_user_on_dev_null(serve, tmp_path: Path, drop_dir: Path,
                                                    mode: str) -> None:
    report = "id -u > {d}/{n}.t; readlink /proc/self/fd/0 /proc/self/fd/2 >> {d}/{n}.t; " \
             "echo $REMOTE_ADDR >> {d}/{n}.t; mv {d}/{n}.t {d}/{n}"
    allow = report.format(d=drop_dir, n="allow-%a-%d")
    deny = report.format(d=drop_dir, n="deny-%a-%d")
    rules(tmp_path, f"echo: 127.0.0.2: spawn {allow}\n", f"ALL: ALL: spawn {deny}\n")
    server: Server = serve(f"127.0.0.1:0 stream tcp nowait {U} internal echo\n",
                           "--tcp-wrappers", "--tcp-wrappers-dir", str(tmp_path), mode=mode)
    port = server.port()
    assert exchange_from("127.0.0.2", port) == b"ping"  # served, and the command ran
    assert exchange_from("127.0.0.3", port) == b""  # refused, and the command ran
    for name, addr in (("allow-127.0.0.2-echo", "127.0.0.2"), ("deny-127.0.0.3-echo",
                                                                 "127.0.0.3")):
        lines = read_when_there(drop_dir / name, name).split()
        assert lines == [str(UID), "/dev/null", "/dev/null", addr], (lines, server.log())
    assert refused_by(server, server.listeners[0]["service"]) == {"tcp_wrappers": 1}
    wait_until(lambda: not [p for p in children_of(server.pid) if _is_shell(p)], 30,
               "the spawned commands reaped")
    assert "wrappers_command" not in server.log()  # exit 0, connections not logged


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _is_shell(pid: int) -> bool:
    return _comm(pid) in ("sh", "sleep")


@pytest.mark.process
@pytest.mark.parametrize("mode", MODES)
def test_twist_serves_the_client_instead_of_the_program(serve, tmp_path: Path,
                                                        mode: str) -> None:
    rules(tmp_path, "echo: 127.0.0.4: twist echo twisted %a %d; id -u; "
          "readlink /proc/self/fd/0 /proc/self/fd/2 | sed s/.[0-9]*.$//\n",
          "ALL: 127.0.0.5: twist echo go away %a\nALL: ALL\n")
    server: Server = serve(f"127.0.0.1:0 stream tcp nowait {U} internal echo\n"
                           f"127.0.0.1:0 stream tcp nowait {U} /bin/cat cat\n",
                           "--tcp-wrappers", "--tcp-wrappers-dir", str(tmp_path), mode=mode)
    echo, cat = server.port(0), server.port(1)
    # (no payload: the command reads none, and unread data would reset the connection)
    got = exchange_from("127.0.0.4", echo, b"").decode()
    assert got.split("\n") == ["twisted 127.0.0.4 echo", str(UID), "socket:", "socket:", ""], (
        got, server.log())
    # a twist in hosts.deny answers the client, and counts as a refusal
    assert exchange_from("127.0.0.5", cat, b"") == b"go away 127.0.0.5\n"
    assert exchange_from("127.0.0.6", cat) == b""
    assert refused_by(server, server.listeners[1]["service"]) == {"tcp_wrappers": 2}
    assert server.service_status(server.listeners[0]["service"])["accepted"] == 1


@pytest.mark.process
@pytest.mark.parametrize("mode", MODES)
def test_setenv_reaches_the_program(serve, tmp_path: Path, mode: str) -> None:
    rules(tmp_path, "cat: 127.0.0.2: setenv WRAPPED from %a by %d: setenv LANG C\n"
          "env: 127.0.0.3: setenv ONLY_TWIST yes: twist env\n", "")
    server: Server = serve(f"127.0.0.1:0 stream tcp nowait {U} /usr/bin/env env\n"
                           "127.0.0.1:0 on socktype=stream, wait=no, user={U}, "
                           "exec=/usr/bin/env, args=cat, env=\"LANG=en_US\";\n".format(U=U),
                           "--tcp-wrappers", "--tcp-wrappers-dir", str(tmp_path), mode=mode)
    plain, cat = server.port(0), server.port(1)
    got = exchange_from("127.0.0.2", cat, b"").decode().splitlines()
    assert "WRAPPED=from 127.0.0.2 by cat" in got and "LANG=C" in got, (got, server.log())
    assert "REMOTE_ADDR=127.0.0.2" in got
    got = exchange_from("127.0.0.2", plain, b"").decode().splitlines()  # no setenv
    assert not [line for line in got if line.startswith("WRAPPED=")], got
    got = exchange_from("127.0.0.3", plain, b"").decode().splitlines()
    assert "ONLY_TWIST=yes" in got and f"USER={U}" in got, got
    # the twist command knows where the client connected, as a program would
    assert "TCPLOCALIP=127.0.0.1" in got and f"TCPLOCALPORT={plain}" in got, got


@pytest.mark.process
@pytest.mark.parametrize("mode", MODES)
def test_severity_sets_the_lines_level_and_syslog_priority(serve, tmp_path: Path,
                                                           mode: str) -> None:
    sink = tmp_path / "log.sock"
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(sink))
    sink.chmod(0o666)
    rx.settimeout(30)
    try:
        rules(tmp_path, "echo: 127.0.0.2: severity local3.notice\n"
              "echo: 127.0.0.3: severity auth.crit: deny\n", "ALL: 127.0.0.4: severity debug\n")
        server: Server = serve(f"127.0.0.1:0 stream tcp nowait {U} internal echo\n",
                               "--tcp-wrappers", "--tcp-wrappers-dir", str(tmp_path),
                               "--syslog", "--syslog-socket", str(sink), "--log-level",
                               "debug", mode=mode)
        port = server.port()
        assert exchange_from("127.0.0.2", port) == b"ping"
        assert exchange_from("127.0.0.3", port) == b""
        assert exchange_from("127.0.0.4", port) == b""
        seen: list[tuple[str, int, str]] = []  # (event, PRI, peer)
        while len(seen) < 3:
            data = rx.recv(65536).decode()
            m = re.match(r"<(\d+)>.*?poolinetd\[\d+\]: \S+ (\S+) .*peer=(\S+)", data)
            if m and m.group(2) in ("wrappers_connect", "conn_refused"):
                seen.append((m.group(2), int(m.group(1)), m.group(3)))
        assert sorted(seen) == [("conn_refused", 3 * 8 + 7, "127.0.0.4"),  # daemon.debug
                                ("conn_refused", 4 * 8 + 2, "127.0.0.3"),  # auth.crit
                                ("wrappers_connect", 19 * 8 + 5, "127.0.0.2")], seen
        log = server.log()
        assert re.search(r"error conn_refused .*peer=127\.0\.0\.3", log), log
        assert re.search(r"debug conn_refused .*peer=127\.0\.0\.4", log), log
        assert re.search(r"info wrappers_connect .*peer=127\.0\.0\.2", log), log
    finally:
        rx.close()


# -- datagram wait services -------------------------------------------------------------
def rrq(port: int, source: str, name: str, timeout: float = 3.0) -> bytes | None:
    """A TFTP read request from ``source``; the first reply's payload, or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.bind((source, 0))
        sock.sendto(struct.pack("!H", 1) + name.encode() + b"\0octet\0", ("127.0.0.1", port))
        try:
            data, _ = sock.recvfrom(65536)
        except TimeoutError:
            return None
        return data


@pytest.mark.process
@pytest.mark.parametrize("mode", MODES)
def test_tftpd_dgram_wait_judged(serve, tmp_path: Path, public_dir: Path, drop_dir: Path,
                                 mode: str) -> None:
    if not (os.access(TFTPD, os.X_OK) and os.access(TFTP, os.X_OK)):
        pytest.skip("tftpd-hpa or tftp is not installed")
    if not IS_ROOT:
        pytest.skip("in.tftpd -s must start as root: it chroots, then drops to -u itself")
    root = public_dir / "tftp"
    root.mkdir()
    root.chmod(0o755)
    (root / "hello.txt").write_text("hello over tftp\n")
    (root / "hello.txt").chmod(0o644)
    rules(tmp_path, f"in.tftpd: localhost: spawn echo %a > {drop_dir}/spawned\n"
          "in.tftpd: 127.0.0.2\n", "in.tftpd: ALL\n")
    # as tftpd-hpa's package writes it (root: -s chroots), through tcpd: judged natively
    server: Server = serve(f"127.0.0.1:0 dgram udp wait root /usr/sbin/tcpd "
                           f"{TFTPD} -s {root} -u {U} -t 1\n",
                           "--tcp-wrappers-dir", str(tmp_path), "--log-connections", mode=mode)
    port = server.port()
    name = server.listeners[0]["service"]
    assert isinstance(name, str)
    dest = tmp_path / "got.txt"
    # the real client, from 127.0.0.1 (localhost: the rule needs its name)
    out = subprocess.run([TFTP, "127.0.0.1", str(port), "-c", "get", "hello.txt", str(dest)],
                         capture_output=True, timeout=60, cwd=tmp_path)
    assert dest.exists() and dest.read_text() == "hello over tftp\n", (out, server.log())
    assert read_when_there(drop_dir / "spawned", "the spawn") == "127.0.0.1\n"
    # tftpd leaves after 1 s idle; until then it reads the socket itself (as under tcpd)
    wait_until(lambda: _exits(server, name) >= 1, 30, "tftpd exits")
    # refused: the datagram is dropped, unanswered, and the socket re-armed
    assert rrq(port, "127.0.0.3", "hello.txt") is None
    wait_until(lambda: refused_by(server, name) == {"tcp_wrappers": 1}, 30, "the refusal")
    got = wait_until(lambda: rrq(port, "127.0.0.2", "hello.txt"), 60, "served again")
    assert isinstance(got, bytes) and got[:2] == b"\0\3" and b"hello over tftp" in got
    assert re.search(r"conn_refused .*peer=127\.0\.0\.3 .*reason=tcp_wrappers", server.log())
    assert _exits(server, name) <= 2  # nothing was started for the refused datagram


def _exits(server: Server, service: str) -> int:
    return sum(1 for line in server.log().splitlines()
               if " program_exit " in line and f"service={service} " in line)


UDP_ENV = """#!/usr/bin/python3
import os, socket
sock = socket.socket(fileno=0)
sock.settimeout(0.5)
while True:
    try:
        data, peer = sock.recvfrom(2048)
    except TimeoutError:
        break
    sock.sendto(os.environ.get("WRAPPED", "-").encode(), peer)
sock.detach()
"""


@pytest.mark.process
@pytest.mark.parametrize("mode", MODES)
def test_setenv_reaches_a_datagram_wait_program(serve, tmp_path: Path, public_dir: Path,
                                                mode: str) -> None:
    prog = public_dir / "udpenv.py"
    prog.write_text(UDP_ENV)
    prog.chmod(0o755)
    rules(tmp_path, "udpenv: 127.0.0.2: setenv WRAPPED by %d for %a\n", "udpenv: 127.0.0.3\n")
    server: Server = serve(f"127.0.0.1:0 dgram udp wait {U} {prog} udpenv\n",
                           "--tcp-wrappers", "--tcp-wrappers-dir", str(tmp_path),
                           "--log-connections", mode=mode)
    port = server.port()
    name = server.listeners[0]["service"]
    assert isinstance(name, str)
    assert udp_exchange(port, b"x", source="127.0.0.2", timeout=30) == \
        b"by udpenv for 127.0.0.2"
    wait_until(lambda: _exits(server, name) >= 1, 30, "the program exits")
    assert udp_exchange(port, b"x", source="127.0.0.3") is None  # denied: dropped
    wait_until(lambda: refused_by(server, name) == {"tcp_wrappers": 1}, 30, "the refusal")
    assert udp_exchange(port, b"x", source="127.0.0.4", timeout=30) == b"-"  # no setenv


# -- hostile input ---------------------------------------------------------------------
HOSTILE = "evil;touch${IFS}PWN`touch${IFS}PWN`$(touch${IFS}PWN)|touch&PWN"


def _ns_python(tmp_path: Path, hosts: Path) -> Path:
    """An interpreter wrapper that runs poolinetd in a mount namespace of its own where
    /etc/hosts is ``hosts`` (so 127.0.0.9's name is hostile), nothing else changed."""
    wrapper = tmp_path / "nspython"
    wrapper.write_text(
        "#!/bin/sh\nexec unshare --mount --propagation private /bin/sh -c "
        f"'mount --bind {hosts} /etc/hosts && exec \"$0\" \"$@\"' {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    return wrapper


@pytest.mark.process
@pytest.mark.parametrize("mode", MODES)
def test_hostile_names_do_not_inject_and_spawn_floods_are_capped(
        serve, tmp_path: Path, drop_dir: Path, monkeypatch: pytest.MonkeyPatch,
        mode: str) -> None:
    if not IS_ROOT or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare (a mount namespace for /etc/hosts)")
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n127.0.0.9 {HOSTILE}\n")
    # KNOWN: the rule needs the client's name (a rule by address would expand %h to the
    # address: poolinetd expands only a name the walk looked up)
    rules(tmp_path, f"echo: KNOWN: spawn echo %h %n %c > {drop_dir}/name\n"
          "discard: ALL: spawn sleep 60\n", "")
    monkeypatch.setattr(sys, "executable", str(_ns_python(tmp_path, hosts)))
    server: Server = serve(f"127.0.0.1:0 stream tcp nowait {U} internal echo\n"
                           f"127.0.0.1:0 stream tcp nowait {U} internal discard\n",
                           "--tcp-wrappers", "--tcp-wrappers-dir", str(tmp_path), mode=mode)
    monkeypatch.undo()
    echo, discard = server.port(0), server.port(1)
    assert exchange_from("127.0.0.9", echo) == b"ping"  # spawn: served by echo
    safe = HOSTILE.translate(str.maketrans({c: "_" for c in ";${}`()|&"}))
    assert read_when_there(drop_dir / "name", "the spawn") == f"{safe} {safe} {safe}\n"
    rules(tmp_path, "echo: KNOWN: twist echo %h\ndiscard: ALL: spawn sleep 60\n", "")
    wait_until(lambda: exchange_from("127.0.0.9", echo, b"") == f"{safe}\n".encode(), 30,
               "the twist with the hostile name")
    assert not list(Path(server.conf.parent).glob("*PWN*"))
    assert not list(Path("/").glob("PWN")) and not list(drop_dir.glob("*PWN*"))
    # a flood of clients whose rule spawns a command that never ends: capped
    from poolinetd.engine.wrappers_commands import MAX_PER_SERVICE
    for n in range(MAX_PER_SERVICE + 8):  # from distinct sources (one holds 4 at most)
        exchange_from(f"127.0.3.{n + 1}", discard, b"")
    wait_until(lambda: "wrappers_command_refused" in server.log(), 30, "the cap's line")
    # exactly the cap runs (each a sleep, below its sh, below its watcher)
    wait_until(lambda: len([p for p in _all_descendants(server.pid) if _comm(p) == "sleep"])
               == MAX_PER_SERVICE, 30, "the capped commands")
    assert re.search(rf"wrappers_command_refused .*kind=spawn .*limit={MAX_PER_SERVICE}",
                     server.log())
    for pid in [p for p in _all_descendants(server.pid) if _is_shell(p)]:
        os.kill(pid, 9)  # the test's own cleanup: the master leaves commands running
    wait_until(lambda: not [p for p in _all_descendants(server.pid) if _is_shell(p)], 30,
               "the killed commands reaped")
    assert "wrappers_command_exit" in server.log()  # killed: status -9, logged


def _all_descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for child in children_of(todo.pop()):
            out.append(child)
            todo.append(child)
    return out
