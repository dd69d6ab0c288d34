"""Socket activation: match() on fake records; listen_fds() for real (fork + dup2 + exec, the
real systemd-socket-activate, and setpriv as nobody on a privileged port); the upgrade
hand-off (spawn_with_fds) into a child that listen_fds() accepts."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import IS_ROOT, REPO, wait_until

from poolinetd.ops import activation, handoff
from poolinetd.ops.activation import PassedSocket, WantedSocket

REPORT = REPO / "tests" / "programs" / "listen_fds_report.py"
ACTIVATE = shutil.which("systemd-socket-activate") or "/usr/bin/systemd-socket-activate"
SETPRIV = shutil.which("setpriv")
INET, INET6, UNIX = socket.AF_INET, socket.AF_INET6, socket.AF_UNIX
STREAM, DGRAM, SEQPACKET = socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET


def passed(fd: int = 3, family: int = INET, kind: int = STREAM, address: str = "0.0.0.0",
           port: int = 7, listening: bool = True, v6only: bool = True, name: str = "x",
           problem: str = "") -> PassedSocket:
    return PassedSocket(fd=fd, name=name, family=family, socket_type=kind, listening=listening,
                        address=address, port=port, v6only=v6only, problem=problem)


def wanted(key: str, family: int = INET, kind: int = STREAM, address: str = "0.0.0.0",
           port: int = 7, v6only: bool = True) -> WantedSocket[str]:
    return WantedSocket(key=key, family=family, socket_type=kind, address=address, port=port,
                        v6only=v6only)


# ---------------------------------------------------------------- match (pure)

def test_match_by_address_port_and_type_not_by_name() -> None:
    tcp = passed(fd=3, name="udp-echo")  # the name lies: it is a tcp listener
    udp = passed(fd=4, kind=DGRAM, listening=False, name="tcp-echo")
    assignment, unmatched = activation.match(
        [tcp, udp], [wanted("echo/udp", kind=DGRAM), wanted("echo/tcp")])
    assert assignment == {"echo/tcp": tcp, "echo/udp": udp}
    assert unmatched == []


def test_wildcard_matches_only_wildcard() -> None:
    wild = passed(fd=3, address="0.0.0.0")
    local = passed(fd=4, address="127.0.0.1")
    assignment, unmatched = activation.match([wild, local], [wanted("lo", address="127.0.0.1")])
    assert assignment == {"lo": local}
    assert unmatched == [wild]
    assignment, unmatched = activation.match([local], [wanted("any", address="0.0.0.0")])
    assert assignment == {}
    assert unmatched == [local]


def test_addresses_compare_as_ip_addresses() -> None:
    six = passed(family=INET6, address="::", v6only=True)
    assignment, _ = activation.match([six], [wanted("k", family=INET6, address="0:0::0")])
    assert assignment == {"k": six}


def test_port_family_type_and_v6only_must_agree() -> None:
    cases = [
        (passed(port=8), wanted("k", port=7)),
        (passed(family=INET6, address="::"), wanted("k", address="::")),  # family differs
        (passed(kind=SEQPACKET), wanted("k")),
        (passed(family=INET6, address="::", v6only=True),
         wanted("k", family=INET6, address="::", v6only=False)),
        (passed(family=INET6, address="::", v6only=False),
         wanted("k", family=INET6, address="::", v6only=True)),
        (passed(listening=False), wanted("k")),           # a bound stream socket not listening
        (passed(port=0), wanted("k", port=0)),            # "any free port" is never a match
        (passed(problem="not a socket", family=0, kind=0), wanted("k")),
    ]
    for got, want in cases:
        assert activation.match([got], [want]) == ({}, [got]), (got, want)


def test_dual_stack_listener_matches_a_tcp46_endpoint() -> None:
    both = passed(family=INET6, address="::", v6only=False)
    assignment, _ = activation.match([both], [wanted("k", family=INET6, address="::",
                                                     v6only=False)])
    assert assignment == {"k": both}


def test_unix_sockets_match_on_path() -> None:
    a = passed(fd=3, family=UNIX, address="/run/a.sock", port=0)
    b = passed(fd=4, family=UNIX, kind=SEQPACKET, address="/run/b.sock", port=0)
    unbound = passed(fd=5, family=UNIX, address="", port=0)
    assignment, unmatched = activation.match(
        [a, b, unbound],
        [wanted("b", family=UNIX, kind=SEQPACKET, address="/run//b.sock", port=0),
         wanted("a", family=UNIX, address="/run/a.sock", port=0),
         wanted("other", family=UNIX, address="/run/c.sock", port=0)])
    assert assignment == {"a": a, "b": b}
    assert unmatched == [unbound]
    # Same path, wrong type: no.
    assert activation.match([a], [wanted("a", family=UNIX, kind=DGRAM, address="/run/a.sock",
                                         port=0)]) == ({}, [a])


def test_each_socket_and_each_endpoint_is_used_once() -> None:
    first = passed(fd=3)
    second = passed(fd=4)
    assignment, unmatched = activation.match([first, second], [wanted("a"), wanted("b")])
    assert assignment == {"a": first, "b": second}
    assignment, unmatched = activation.match([first, second], [wanted("a")])
    assert assignment == {"a": first}
    assert unmatched == [second]


def test_describe_names_the_socket() -> None:
    assert passed(fd=4, name="web", port=80).describe() == "fd 4 'web' (stream 0.0.0.0:80)"
    assert passed(fd=5, family=INET6, address="::1", port=7, kind=DGRAM).describe() == \
        "fd 5 'x' (dgram [::1]:7)"
    assert passed(fd=6, listening=False).describe() == "fd 6 'x' (stream 0.0.0.0:7, not listening)"
    assert passed(fd=7, problem="not a socket: Socket operation on non-socket").describe() == \
        "fd 7 'x' (not a socket: Socket operation on non-socket)"
    assert passed(fd=3, family=UNIX, address="@abs", port=0).describe() == \
        "fd 3 'x' (unix stream @abs)"


def test_listen_fds_for_another_pid_or_garbage_touches_nothing() -> None:
    for env in ({"LISTEN_PID": "1", "LISTEN_FDS": "2"},
                {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "two"},
                {"LISTEN_PID": "", "LISTEN_FDS": "2"},
                {"LISTEN_FDS": "2"},
                {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": str(activation.MAX_FDS + 1)}):
        environ = dict(env, LISTEN_FDNAMES="a:b", HOME="/root")
        assert activation.listen_fds(environ, pid=os.getpid()) == []
        assert environ == {"HOME": "/root"}
    environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}
    assert activation.listen_fds(environ) == []
    assert environ == {}


def test_inspect_a_closed_fd_and_close_unmatched_skips_it() -> None:
    r, w = os.pipe()
    os.close(w)
    gone = activation.inspect(w, "gone")
    assert gone.problem.startswith("not open")
    assert not gone.is_open
    pipe = activation.inspect(r, "pipe")
    assert pipe.problem.startswith("not a socket")
    activation.close_unmatched([pipe, gone])
    with pytest.raises(OSError):
        os.fstat(r)


# ---------------------------------------------------------------- listen_fds for real

def _report(proc_stdout: str) -> dict[str, Any]:
    line = proc_stdout.splitlines()[0]
    value = json.loads(line)
    assert isinstance(value, dict)
    return value


def run_with_fds(fds: list[int], names: str | None, pid_offset: int = 0,
                 extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """fork, dup2 ``fds`` onto 3.., set LISTEN_* (LISTEN_PID = child pid + offset), exec REPORT."""
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]  # no collision with 3..
    r, w = os.pipe()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    env["POOLINETD_SRC"] = str(REPO)
    argv = [sys.executable, str(REPORT), *extra]
    pid = os.fork()
    if pid == 0:  # child: only async-signal-safe-ish calls, then exec
        try:
            os.dup2(w, 1)
            for i, fd in enumerate(high):
                os.dup2(fd, 3 + i)  # dup2 leaves the target inheritable
            env["LISTEN_PID"] = str(os.getpid() + pid_offset)
            env["LISTEN_FDS"] = str(len(high))
            if names is not None:
                env["LISTEN_FDNAMES"] = names
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    os.close(w)
    for fd in high:
        os.close(fd)
    with os.fdopen(r) as out:
        text = out.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    report = _report(text)
    assert report["pid"] == pid
    return report


@pytest.fixture
def assorted(tmp_path: Path) -> Iterator[list[socket.socket]]:
    """tcp listener, udp, unix stream listener, tcp6 v6only listener, a bound-only tcp socket."""
    tcp = socket.create_server(("127.0.0.1", 0))
    udp = socket.socket(INET, DGRAM)
    udp.bind(("127.0.0.1", 0))
    unix = socket.socket(UNIX, STREAM)
    unix.bind(str(tmp_path / "u.sock"))
    unix.listen()
    six = socket.socket(INET6, STREAM)
    six.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    six.bind(("::1", 0))
    six.listen()
    idle = socket.socket(INET, STREAM)
    idle.bind(("127.0.0.1", 0))
    socks = [tcp, udp, unix, six, idle]
    yield socks
    for s in socks:
        s.close()


def test_listen_fds_in_a_real_child(assorted: list[socket.socket], tmp_path: Path) -> None:
    r, w = os.pipe()  # a passed fd that is not a socket
    try:
        report = run_with_fds([s.fileno() for s in assorted] + [r],
                              "web:dns:local:six:idle:pipe")
    finally:
        os.close(r)
        os.close(w)
    assert report["env"] == {}  # every LISTEN_* variable unset
    got = report["sockets"]
    assert [s["fd"] for s in got] == [3, 4, 5, 6, 7, 8]
    assert [s["name"] for s in got] == ["web", "dns", "local", "six", "idle", "pipe"]
    tcp, udp, unix, six, idle, pipe = got
    assert (tcp["family"], tcp["socket_type"], tcp["listening"]) == (INET, STREAM, True)
    assert (tcp["address"], tcp["port"]) == ("127.0.0.1", assorted[0].getsockname()[1])
    assert (udp["family"], udp["socket_type"], udp["listening"]) == (INET, DGRAM, False)
    assert udp["port"] == assorted[1].getsockname()[1]
    assert (unix["family"], unix["socket_type"], unix["listening"]) == (UNIX, STREAM, True)
    assert (unix["address"], unix["port"]) == (str(tmp_path / "u.sock"), 0)
    assert (six["family"], six["address"], six["v6only"]) == (INET6, "::1", True)
    assert six["port"] == assorted[3].getsockname()[1]
    assert (idle["listening"], idle["problem"]) == (False, "")
    assert pipe["problem"].startswith("not a socket")
    assert all(s["problem"] == "" for s in got[:5])
    assert report["cloexec"] == [True] * 6


def test_listen_fds_for_another_pid_in_a_real_child(assorted: list[socket.socket]) -> None:
    report = run_with_fds([assorted[0].fileno()], "web", pid_offset=1)
    assert report["sockets"] == []
    assert report["env"] == {}
    assert 3 in report["open_fds"]  # not ours: left alone, not closed


def test_names_that_do_not_add_up_are_unknown(assorted: list[socket.socket]) -> None:
    report = run_with_fds([assorted[0].fileno(), assorted[1].fileno()], "only-one")
    assert [s["name"] for s in report["sockets"]] == ["unknown", "unknown"]
    report = run_with_fds([assorted[0].fileno()], None)
    assert [s["name"] for s in report["sockets"]] == ["unknown"]


def test_abstract_unix_socket_is_reported_with_at(tmp_path: Path) -> None:
    sock = socket.socket(UNIX, SEQPACKET)
    name = f"poolinetd-act-{os.getpid()}"
    with sock:
        sock.bind(b"\0" + name.encode())
        sock.listen()
        report = run_with_fds([sock.fileno()], "abs")
    (got,) = report["sockets"]
    assert (got["address"], got["socket_type"], got["listening"]) == ("@" + name, SEQPACKET, True)


# ---------------------------------------------------------------- the real systemd-socket-activate

def free_port(kind: int = STREAM) -> int:
    with socket.socket(INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Activated:
    """systemd-socket-activate running REPORT --serve; stderr and stdout go to files."""

    def __init__(self, tmp_path: Path, args: list[str], prefix: tuple[str, ...] = (),
                 python: str = sys.executable, report: Path = REPORT,
                 src: Path = REPO) -> None:
        self.out = tmp_path / "out"
        self.err = tmp_path / "err"
        env = dict(os.environ, POOLINETD_SRC=str(src))
        # systemd-socket-activate passes the child only what -E names.
        args = [*args, "-E", f"POOLINETD_SRC={src}"]
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.proc = subprocess.Popen(
                [ACTIVATE, *args, *prefix, python, str(report), "--serve"],
                stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=str(tmp_path))

    def wait_listening(self, count: int) -> None:
        wait_until(lambda: self.err.read_text().count("Listening on") >= count
                   or self.proc.poll() is not None, 20, "systemd-socket-activate listening")
        assert self.proc.poll() is None, self.err.read_text()

    def report(self) -> dict[str, Any]:
        wait_until(lambda: self.out.read_text().strip() or self.proc.poll() is not None, 30,
                   "the activated child's report")
        return _report(self.out.read_text())

    def finish(self) -> None:
        try:
            assert self.proc.wait(timeout=30) == 0, self.err.read_text()
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


needs_activate = pytest.mark.skipif(not os.access(ACTIVATE, os.X_OK),
                                    reason="systemd-socket-activate not installed")


def ask_stream(address: Any, family: int, data: bytes) -> bytes:
    with socket.socket(family, STREAM) as sock:
        sock.settimeout(30)
        sock.connect(address)
        sock.sendall(data)
        return sock.recv(1024)


@needs_activate
@pytest.mark.process
def test_systemd_socket_activate_stream_and_unix(tmp_path: Path) -> None:
    port = free_port()
    path = tmp_path / "act.sock"
    run = Activated(tmp_path, ["-l", f"127.0.0.1:{port}", "-l", str(path),
                               "--fdname=web:local"])
    try:
        run.wait_listening(2)
        # systemd-socket-activate starts the child on the first connection.
        assert ask_stream(("127.0.0.1", port), INET, b"hi") == b"web hi"
        report = run.report()
        assert ask_stream(str(path), UNIX, b"yo") == b"local yo"
    finally:
        run.finish()
    assert report["env"] == {}
    web, local = report["sockets"]
    assert web == {"fd": 3, "name": "web", "family": INET, "socket_type": STREAM,
                   "listening": True, "address": "127.0.0.1", "port": port, "v6only": True,
                   "problem": "", "is_open": True}
    assert (local["fd"], local["name"], local["family"], local["address"], local["listening"]) \
        == (4, "local", UNIX, str(path), True)
    assert report["cloexec"] == [True, True]
    wants = [WantedSocket(key="web", family=INET, socket_type=STREAM, address="127.0.0.1",
                          port=port),
             WantedSocket(key="local", family=UNIX, socket_type=STREAM, address=str(path),
                          port=0)]
    records = [PassedSocket(**s) for s in report["sockets"]]
    assert activation.match(records, wants) == ({"web": records[0], "local": records[1]}, [])


@needs_activate
@pytest.mark.process
def test_systemd_socket_activate_datagram(tmp_path: Path) -> None:
    port = free_port(DGRAM)
    run = Activated(tmp_path, ["--datagram", "-l", f"127.0.0.1:{port}", "--fdname=dns"])
    try:
        run.wait_listening(1)
        with socket.socket(INET, DGRAM) as sock:
            sock.settimeout(30)
            sock.sendto(b"q", ("127.0.0.1", port))
            assert sock.recv(1024) == b"dns q"
        report = run.report()
    finally:
        run.finish()
    (dns,) = report["sockets"]
    assert (dns["fd"], dns["name"], dns["family"], dns["socket_type"], dns["listening"],
            dns["address"], dns["port"]) == (3, "dns", INET, DGRAM, False, "127.0.0.1", port)


def privileged_free_port() -> int:
    for port in range(990, 900, -1):
        with contextlib.suppress(OSError), socket.socket(INET, STREAM) as probe:
            probe.bind(("127.0.0.1", port))
            return port
    pytest.skip("no free port below 1024")


@needs_activate
@pytest.mark.process
@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT or SETPRIV is None, reason="needs root and setpriv")
def test_an_unprivileged_child_serves_a_privileged_port_passed_to_it(
        tmp_path: Path, nobody_python: tuple[str, Path]) -> None:
    python, stage = nobody_python  # reachable by nobody wherever the clone sits
    port = privileged_free_port()
    run = Activated(tmp_path, ["-l", f"127.0.0.1:{port}", "--fdname=low"],
                    prefix=(str(SETPRIV), "--reuid=nobody", "--regid=nogroup",
                            "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"),
                    python=python, report=stage / "listen_fds_report.py", src=stage)
    try:
        run.wait_listening(1)
        assert ask_stream(("127.0.0.1", port), INET, b"x") == b"low x"
        report = run.report()
    finally:
        run.finish()
    assert report["uid"] != 0
    assert [(s["name"], s["port"], s["listening"]) for s in report["sockets"]] == \
        [("low", port, True)]


# ---------------------------------------------------------------- the upgrade hand-off

def test_spawn_with_fds_passes_sockets_listen_fds_accepts(
        assorted: list[socket.socket], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tcp, udp, unix, _six, _idle = assorted
    out = tmp_path / "out"
    with out.open("wb") as stdout:
        # extra_env reaches the child; a stale LISTEN_PID in it is replaced.
        monkeypatch.setenv("LISTEN_FDNAMES", "stale")  # inherited values must not leak through
        proc = handoff.spawn_with_fds(
            [sys.executable, str(REPORT), "--serve"],
            [(tcp.fileno(), "echo/tcp"), (udp.fileno(), "echo:udp"), (unix.fileno(), "local")],
            {"POOLINETD_SRC": str(REPO), "LISTEN_PID": "1"}, cwd=str(tmp_path), stdout=stdout)
    try:
        wait_until(lambda: out.read_text().strip() or proc.poll() is not None, 30, "report")
        report = _report(out.read_text())
        assert ask_stream(tcp.getsockname(), INET, b"a") == b"echo/tcp a"
        with socket.socket(INET, DGRAM) as client:
            client.settimeout(30)
            client.sendto(b"b", udp.getsockname())
            assert client.recv(1024) == b"echo_udp b"
        assert ask_stream(unix.getsockname(), UNIX, b"c") == b"local c"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert report["pid"] == proc.pid  # exec kept the pid: LISTEN_PID was the child's own
    assert report["env"] == {}
    got = report["sockets"]
    assert [(s["fd"], s["name"]) for s in got] == [(3, "echo/tcp"), (4, "echo_udp"), (5, "local")]
    assert [(s["family"], s["socket_type"], s["port"]) for s in got] == [
        (INET, STREAM, tcp.getsockname()[1]), (INET, DGRAM, udp.getsockname()[1]),
        (UNIX, STREAM, 0)]
    # Nothing else leaked into the child: stdio, the three sockets, and listdir's own fd.
    assert report["open_fds"][:6] == [0, 1, 2, 3, 4, 5]
    assert len(report["open_fds"]) == 7
    # The parent's sockets still work and are still its own.
    assert tcp.getsockname()[1] == got[0]["port"]


def test_spawn_with_fds_moves_fds_that_sit_in_the_target_range(tmp_path: Path) -> None:
    # In a fresh interpreter the first sockets get fds 3, 4, 5: hand them over in reverse order
    # so each target number is taken by another source.
    code = f"""
import json, os, socket, sys
sys.path.insert(0, {str(REPO)!r})
from poolinetd.ops import handoff
socks = [socket.create_server(("127.0.0.1", 0)) for _ in range(3)]
assert sorted(s.fileno() for s in socks) == [3, 4, 5], [s.fileno() for s in socks]
pairs = [(s.fileno(), "n%d" % s.fileno()) for s in reversed(socks)]
proc = handoff.spawn_with_fds([sys.executable, {str(REPORT)!r}], pairs,
                              {{"POOLINETD_SRC": {str(REPO)!r}}})
assert proc.wait() == 0
print(json.dumps([[s.fileno(), s.getsockname()[1]] for s in reversed(socks)]), flush=True)
"""
    result = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                            timeout=60, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    child_line, parent_line = result.stdout.splitlines()
    report = json.loads(child_line)
    order = json.loads(parent_line)  # [[fd, port], ...] in the order handed over
    assert [(s["fd"], s["name"], s["port"]) for s in report["sockets"]] == [
        (3 + i, f"n{fd}", port) for i, (fd, port) in enumerate(order)]


def test_spawn_with_fds_sets_extra_pid_variables(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with out.open("wb") as stdout:
        proc = handoff.spawn_with_fds(
            ["/bin/sh", "-c", 'echo "$$ $LISTEN_PID $WATCHDOG_PID $LISTEN_FDS $WATCHDOG_USEC"'],
            [], {"WATCHDOG_USEC": "5000000"}, pid_variables=("LISTEN_PID", "WATCHDOG_PID"),
            stdout=stdout)
    assert proc.wait(timeout=30) == 0
    pid, listen_pid, watchdog_pid, count, usec = out.read_text().split()
    assert pid == listen_pid == watchdog_pid == str(proc.pid)
    assert (count, usec) == ("0", "5000000")


def test_a_command_that_cannot_run_exits_127(tmp_path: Path) -> None:
    proc = handoff.spawn_with_fds([str(tmp_path / "missing")], [], {},
                                  stderr=subprocess.DEVNULL)
    assert proc.wait(timeout=30) == 127


def test_names_are_made_safe_for_the_protocol() -> None:
    assert handoff.clean_name("127.0.0.1:echo/tcp") == "127.0.0.1_echo/tcp"
    assert handoff.clean_name("") == "unknown"
    assert handoff.clean_name("é\n") == "__"
    assert len(handoff.clean_name("x" * 1000)) == handoff.MAX_NAME
    assert handoff.listen_environment(["a", "b:c"]) == {"LISTEN_FDS": "2",
                                                       "LISTEN_FDNAMES": "a:b_c"}


def test_trampoline_refuses_sources_in_the_target_range() -> None:
    with pytest.raises(ValueError):
        handoff.trampoline_argv([3, 10], ["true"])


# ---------------------------------------------------------------- a LISTEN_FDS that lies

def _first_closed_fd() -> int:
    fd = activation.LISTEN_FDS_START
    while True:
        try:
            fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            return fd
        fd += 1


def test_a_count_reaching_a_closed_or_reserved_fd_is_refused_touching_nothing() -> None:
    closed = _first_closed_fd()
    count = closed - activation.LISTEN_FDS_START + 1  # the last fd it names is not open
    environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": str(count)}
    with pytest.raises(activation.ListenFdsError, match=f"fd {closed} is not open"):
        activation.listen_fds(environ)
    assert environ == {}
    r, w = os.pipe()  # an fd of our own inside the range: never the protocol's
    try:
        os.set_inheritable(r, True)
        high = max(r, w)
        environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": str(high - 2)}
        with pytest.raises(activation.ListenFdsError):
            activation.listen_fds(environ, reserved=(r,))
        assert os.get_inheritable(r)  # untouched: not even close-on-exec
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.process
@pytest.mark.parametrize("count", [4, activation.MAX_FDS])
def test_an_oversized_listen_fds_is_refused_and_the_log_kept(tmp_path: Path, count: int) -> None:
    """Finding 14: LISTEN_FDS=4 with one socket passed. poolinetd opened its log file at
    fd 4, took it for a passed fd that is not a socket, closed it, and went on logging into
    whatever reused fd 4. Now the count is checked against what is open, before the log is
    opened, and poolinetd refuses to start, saying why, in its log."""
    listener = socket.create_server(("127.0.0.1", 0))
    log_path = tmp_path / "poolinetd.log"
    conf = tmp_path / "inetd.conf"
    user = "nobody" if IS_ROOT else __import__("pwd").getpwuid(os.getuid()).pw_name
    conf.write_text(f"127.0.0.1:{listener.getsockname()[1]} stream tcp nowait {user} "
                    "internal echo\n")
    high = fcntl.fcntl(listener.fileno(), fcntl.F_DUPFD_CLOEXEC, 100)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    env["LISTEN_FDS"] = str(count)  # the trampoline sets LISTEN_PID to poolinetd's pid
    argv = handoff.trampoline_argv([high], [
        sys.executable, "-m", "poolinetd", "run", "-c", str(conf), "--no-control",
        "--log-file", str(log_path), "--log-connections"])
    try:
        proc = subprocess.Popen(argv, env=env, pass_fds=(high,), cwd=REPO,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    finally:
        os.close(high)
    try:
        def logged() -> str:
            return log_path.read_text() if log_path.exists() else ""

        wait_until(lambda: proc.poll() is not None or " ready " in logged(), 30,
                   "poolinetd to refuse or to serve")
        text = logged()
        assert proc.wait(30) == 71, text
        assert "listen_failed" in text and f"LISTEN_FDS={count}" in text, text
        assert "fd 4 is not open" in text and "listening" not in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        listener.close()
