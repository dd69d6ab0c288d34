"""A running server on loopback, pool and classic mode: built-ins, programs, privileges, faults.

Tests taking ``served`` run in both modes (classic mode must pass the same
end-to-end tests); tests taking ``serve`` are about pool mode's workers.
Programs the services run come from ``staged_programs`` (a copy of
tests/programs/ that ``nobody`` can reach wherever the checkout sits).
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    IS_ROOT,
    TEST_USER,
    children_of,
    descendants,
    fd_targets,
    recv_exact,
    refused,
    tcp_exchange,
    udp_exchange,
    wait_until,
)

from poolinetd.builtins import internal

pytestmark = pytest.mark.process
U = TEST_USER


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture(params=["pool", "classic"])
def served(request: pytest.FixtureRequest, serve):
    """Like ``serve`` but once per mode."""
    return lambda conf, *args: serve(conf, *args, mode=request.param)


BUILTINS_CONF = f"""
127.0.0.1:0 stream tcp nowait {U} internal echo
127.0.0.1:0 stream tcp nowait {U} internal discard
127.0.0.1:0 stream tcp nowait {U} internal chargen
127.0.0.1:0 stream tcp nowait {U} internal daytime
127.0.0.1:0 stream tcp nowait {U} internal time
127.0.0.1:0 dgram  udp wait   {U} internal echo
127.0.0.1:0 dgram  udp wait   {U} internal discard
127.0.0.1:0 dgram  udp wait   {U} internal chargen
127.0.0.1:0 dgram  udp wait   {U} internal daytime
127.0.0.1:0 dgram  udp wait   {U} internal time
"""


def _check_builtins(server, host: str) -> None:
    echo, discard, chargen, daytime, tm = (server.port(i) for i in range(5))
    payload = os.urandom(100_000)
    assert tcp_exchange(echo, payload, host) == payload
    assert tcp_exchange(discard, b"into the void" * 1000, host) == b""
    lines = tcp_exchange(chargen, host=host, shut=False, limit=74 * 200)
    assert lines[: 74 * 3] == b"".join(internal.chargen_line(i) for i in range(3))
    text = tcp_exchange(daytime, host=host).decode()
    assert re.fullmatch(r"\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}\r\n", text), text
    (secs,) = struct.unpack("!I", tcp_exchange(tm, host=host))
    assert abs(secs - internal.RFC868_OFFSET - time.time()) < 5
    uecho, udiscard, uchargen, udaytime, utime = (server.port(i) for i in range(5, 10))
    assert udp_exchange(uecho, b"ping", host) == b"ping"
    assert udp_exchange(udiscard, b"ping", host, timeout=0.3) is None
    reply = udp_exchange(uchargen, b"", host)
    assert reply is not None and len(reply) <= 512
    assert (udp_exchange(udaytime, b"", host) or b"").endswith(b"\r\n")
    (usecs,) = struct.unpack("!I", udp_exchange(utime, b"", host) or b"")
    assert abs(usecs - internal.RFC868_OFFSET - time.time()) < 5


def test_every_builtin_over_tcp_and_udp_ipv4(served) -> None:
    server = served(BUILTINS_CONF)
    _check_builtins(server, "127.0.0.1")
    # The operator's sign that startup is over, in both modes (README: always logged).
    wait_until(lambda: re.search(r" info ready ", server.log()), 5, "the 'ready' log line")


@pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback here")
def test_every_builtin_over_tcp_and_udp_ipv6(served) -> None:
    conf = BUILTINS_CONF.replace("127.0.0.1:0", "[::1]:0").replace(" tcp ", " tcp6 ")
    server = served(conf.replace(" udp ", " udp6 "))
    _check_builtins(server, "::1")


def test_udp_loop_guard_refuses_privileged_and_builtin_ports(served) -> None:
    server = served(f"127.0.0.1:0 dgram udp wait {U} internal echo\n")
    port = server.port()
    assert udp_exchange(port, b"ok") == b"ok"
    if IS_ROOT:  # binding a privileged source port needs root
        assert udp_exchange(port, b"loop?", src_port=19, timeout=0.5) is None
        wait_until(lambda: "dgram_refused" in server.log(), 5, "the guard's log line")
        assert udp_exchange(port, b"again?", src_port=19, timeout=0.5) is None
    assert udp_exchange(port, b"still fine") == b"still fine"  # (read after the refused ones)
    if IS_ROOT:
        # Logged once a minute, not once per datagram: a loop must not flood the log.
        assert server.log().count("dgram_refused") == 1, server.log()


def test_launched_program_gets_socket_env_and_only_stdio(served, staged_programs: Path) -> None:
    server = served(f"127.0.0.1:0 stream tcp nowait {U} {staged_programs}/report.sh report.sh\n")
    with socket.create_connection(("127.0.0.1", server.port()), timeout=5) as sock:
        local_port = sock.getsockname()[1]
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    text = out.decode()
    env = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and ":" not in
               line.split("=", 1)[0])
    assert env["PROTO"] == "TCP"
    assert env["TCPREMOTEIP"] == env["REMOTE_ADDR"] == "127.0.0.1"
    assert env["TCPREMOTEPORT"] == env["REMOTE_PORT"] == str(local_port)
    assert env["TCPLOCALIP"] == "127.0.0.1"
    assert env["TCPLOCALPORT"] == str(server.port())
    assert "PYTHONPATH" not in env and env.get("PWD", "/") == "/"  # clean env, started in /
    pid = re.search(r"pid: (\d+) sid: (\d+)", text)
    assert pid and pid.group(1) == pid.group(2)  # setsid: leads its own session
    if IS_ROOT:
        assert re.search(r"Uid:\s+65534\s+65534\s+65534\s+65534", text), text
        assert re.search(r"Groups:\s+65534\s*$", text, re.M), text


def test_launched_program_holds_exactly_fds_0_1_2(served) -> None:
    server = served(f"127.0.0.1:0 stream tcp nowait {U} /bin/cat cat\n")
    with socket.create_connection(("127.0.0.1", server.port()), timeout=5) as sock:
        (cat,) = wait_until(lambda: [p for p in descendants(server.pid)
                                     if os.readlink(f"/proc/{p}/exe").endswith("/cat")], 5,
                            "cat to start")
        # Between clone and exec the child still shows the worker's fd table.
        wait_until(lambda: os.readlink(f"/proc/{cat}/exe").endswith("/cat"), 5, "cat's exec")
        fds = fd_targets(cat)
        assert [f.split(":", 1)[0] for f in fds] == ["0", "1", "2"], fds
        assert len({f.split(":", 1)[1] for f in fds}) == 1  # all three are the connection
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"


def test_wait_dgram_program_holds_the_socket_until_it_exits(served,
                                                            staged_programs: Path) -> None:
    server = served(f"127.0.0.1:0 dgram udp wait {U} {staged_programs}/udp_wait_server.py "
                    "srv 0.5\n")
    port = server.port()
    first = (udp_exchange(port, b"one") or b"").split()
    second = (udp_exchange(port, b"two") or b"").split()
    assert first[2] == b"one" and second[2] == b"two"
    assert first[0] == second[0]  # the same server answered both: inetd's wait contract
    if IS_ROOT:
        assert first[1] == b"65534"
    wait_until(lambda: server.service_status(server.listeners[0]["service"])["active"] == 0, 10,
               "the wait server to exit")
    third = (udp_exchange(port, b"three") or b"").split()
    assert third[2] == b"three" and third[0] != first[0]  # a fresh server after the exit


def test_unix_stream_services(served, tmp_path: Path, staged_programs: Path) -> None:
    path = tmp_path / "echo.sock"
    prog = tmp_path / "prog.sock"
    server = served(f"{path} stream unix nowait {U} internal echo\n"
                    f"{prog} stream unix nowait {U} {staged_programs}/report.sh report.sh\n")
    for target, payload, check in ((path, b"unix hello", lambda b: b == b"unix hello"),
                                   (prog, b"", lambda b: b"PROTO=UNIX" in b)):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(target))
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            out = b""
            while chunk := sock.recv(65536):
                out += chunk
        assert check(out), out
    assert oct(os.stat(prog).st_mode & 0o777) == "0o600"
    server.stop()
    assert not path.exists() and not prog.exists()  # unlinked on stop


@pytest.mark.skipif(not IS_ROOT, reason="privilege drop needs root")
def test_workers_run_as_the_service_user(serve) -> None:
    server = serve("127.0.0.1:0 stream tcp nowait nobody internal echo\n")
    (worker,) = server.workers()
    status = Path(f"/proc/{worker}/status").read_text()
    assert re.search(r"^Uid:\s+65534\s+65534\s+65534\s+65534$", status, re.M)
    assert re.search(r"^Gid:\s+65534\s+65534\s+65534\s+65534$", status, re.M)
    assert re.search(r"^Groups:\s+65534\s*$", status, re.M)
    assert Path(f"/proc/{worker}/cmdline").read_bytes().startswith(b"poolinetd: ")


def _socket_inodes(pid: int) -> set[str]:
    return {t.split(":", 1)[1] for t in fd_targets(pid) if "socket:" in t}


def test_worker_inherits_no_fd_of_the_master(serve) -> None:
    server = serve(f"127.0.0.1:0 stream tcp nowait {U} internal echo\n"
                   f"127.0.0.1:0 stream tcp nowait {U} internal discard\n")
    workers = server.workers()
    assert len(workers) == 2
    master = _socket_inodes(server.pid)
    for pid in workers:
        mine = _socket_inodes(pid)
        assert not (mine & master), "a worker holds a master socket (listener or channel)"
        # channel + its own SIGTERM wakeup pair; epoll is not a socket
        assert len(mine) == 3, fd_targets(pid)
        others = [t for t in fd_targets(pid) if int(t.split(":")[0]) > 2 and "socket:" not in t]
        # its epoll, and the write end of its upward pipe (what it says to the master)
        assert sorted(t.split(":", 1)[1].split(":")[0] for t in others) == [
            "anon_inode", "pipe"] and any("eventpoll" in t for t in others), others


def test_master_fd_count_returns_to_baseline_after_a_burst(served) -> None:
    server = served(f"127.0.0.1:0 stream tcp nowait {U} internal echo\n"
                   f"127.0.0.1:0 stream tcp nowait {U} /bin/cat cat\n")
    name = server.listeners[1]["service"]
    server.status()  # one loop turn after READY: the ready fd is closed by now
    baseline = fd_targets(server.pid)
    for _ in range(300):
        assert tcp_exchange(server.port(0), b"x" * 64) == b"x" * 64
    for _ in range(30):
        assert tcp_exchange(server.port(1), b"y" * 64) == b"y" * 64
    wait_until(lambda: server.service_status(name)["active"] == 0, 10)
    assert fd_targets(server.pid) == baseline


def test_max_child_backpressure_queues_then_serves(served) -> None:
    # /2/0/0: max_child 2, and no per-source limit (FreeBSD's 0), which lifts the safe
    # default share (one source may hold both slots here, as the test needs).
    server = served(f"127.0.0.1:0 stream tcp nowait/2/0/0 {U} /bin/cat cat\n")
    port = server.port()
    name = server.listeners[0]["service"]
    first = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
    try:
        for sock in first:
            sock.sendall(b"hi")
            assert sock.recv(10) == b"hi"
        wait_until(lambda: server.service_status(name)["active"] == 2, 5)
        third = socket.create_connection(("127.0.0.1", port), timeout=5)  # kernel backlog
        with third:
            third.sendall(b"third")
            third.settimeout(0.5)
            with pytest.raises(TimeoutError):
                third.recv(10)  # not served while two instances run
            assert server.service_status(name)["accepted"] == 2
            first[0].close()
            third.settimeout(5)
            assert third.recv(10) == b"third"  # served once one ended
    finally:
        for sock in first:
            sock.close()


def test_crashed_worker_is_replaced(serve) -> None:
    server = serve(f"127.0.0.1:0 stream tcp nowait {U} internal echo\n")
    (worker,) = server.workers()
    os.kill(worker, signal.SIGKILL)
    new = wait_until(lambda: [p for p in server.workers() if p != worker], 10, "a new worker")
    assert new
    assert tcp_exchange(server.port(), b"again") == b"again"
    svc = server.service_status(server.listeners[0]["service"])
    assert svc["restarts"] == 1


@pytest.mark.skipif(not IS_ROOT, reason="needs root (runs the master without CAP_SETUID)")
def test_boot_failure_backs_off_and_other_services_keep_serving(tmp_path: Path) -> None:
    if not Path("/usr/bin/setpriv").exists():
        pytest.skip("setpriv (util-linux) not installed")
    conf = ("127.0.0.1:0 stream tcp nowait nobody internal echo\n"
            "127.0.0.1:0 stream tcp nowait root internal daytime\n")
    # Root without CAP_SETUID: the nobody workers fail to drop; root's workers boot fine.
    env_cmd = ["/usr/bin/setpriv", "--bounding-set", "-setuid", "--inh-caps", "-setuid"]
    import sys

    rfd, wfd = os.pipe()
    ctl = tmp_path / "ctl2.sock"
    path = tmp_path / "c.conf"
    path.write_text(conf)
    logp = tmp_path / "log2"
    with open(logp, "wb") as logf:
        proc = subprocess.Popen([*env_cmd, sys.executable, "-m", "poolinetd", "-c", str(path),
                                 "--ready-fd", str(wfd), "--control", str(ctl)], pass_fds=(wfd,),
                                stdout=logf, stderr=subprocess.STDOUT)
    os.close(wfd)
    try:
        import orjson

        with os.fdopen(rfd, "rb") as ready:
            info = orjson.loads(ready.readline())
        from poolinetd.ops import control

        def echo_state() -> dict:
            doc = control.request(str(ctl), "status")
            return next(s for s in doc["services"] if s["source"].endswith(":1"))

        wait_until(lambda: echo_state()["boot_failures"] >= 3, 15, "repeated boot failures")
        state = echo_state()
        assert state["state"] == "failing" and state["retry_in"] > 0
        assert "drop" in state["last_error"] or "status 3" in state["last_error"]
        # Backoff, not a fork storm: a handful of attempts in seconds, not hundreds.
        assert state["boot_failures"] < 10
        assert tcp_exchange(info["listeners"][1]["port"]).endswith(b"\r\n")
        text = logp.read_text()
        assert "worker_boot_failed" in text and "retry_in" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_200_concurrent_echo_clients_all_served(served) -> None:
    server = served(f"127.0.0.1:0 stream tcp nowait {U} internal echo\n")
    port = server.port()
    sel = selectors.DefaultSelector()
    socks = []
    for _ in range(200):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        socks.append(sock)
    try:
        want = {}
        for i, sock in enumerate(socks):
            msg = f"client {i} ".encode() * 50
            sock.sendall(msg)
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
            want[sock.fileno()] = (msg, bytearray())
            sel.register(sock, selectors.EVENT_READ, sock)
        open_count = len(socks)
        deadline = time.monotonic() + 20
        while open_count and time.monotonic() < deadline:
            for key, _ in sel.select(1):
                sock = key.data
                data = sock.recv(65536)
                if data:
                    want[sock.fileno()][1].extend(data)
                else:
                    sel.unregister(sock)
                    open_count -= 1
        assert open_count == 0
        assert all(bytes(got) == msg for msg, got in want.values())
    finally:
        sel.close()
        for sock in socks:
            sock.close()


def test_hostile_clients_do_not_hurt_anyone_else(served) -> None:
    server = served(f"127.0.0.1:0 stream tcp nowait {U} internal echo\n"
                   f"127.0.0.1:0 stream tcp nowait {U} internal chargen\n"
                   f"127.0.0.1:0 stream tcp nowait {U} /bin/cat cat\n")
    echo, chargen, cat = server.port(0), server.port(1), server.port(2)
    workers = set(server.workers()) if "pool" in server.args else set()
    bystander = socket.create_connection(("127.0.0.1", echo), timeout=5)
    with bystander:
        for port in (echo, chargen, cat):
            for _ in range(20):
                # Reset with data in flight (SO_LINGER 0 => RST on close).
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                s.sendall(os.urandom(5000))
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
                # Connect and vanish without a byte.
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
        # A chargen reader that never reads: the worker must not block on it.
        stuck = socket.create_connection(("127.0.0.1", chargen), timeout=5)
        with stuck:
            bystander.sendall(b"still here")
            assert bystander.recv(100) == b"still here"
            assert tcp_exchange(echo, b"fresh client") == b"fresh client"
            assert tcp_exchange(cat, b"cat ok") == b"cat ok"
    assert set(server.workers()) >= workers  # nobody crashed
    assert server.proc.poll() is None


def test_silent_client_is_timed_out(served) -> None:
    server = served("defaults on conn_timeout=1;\n"
                    f"127.0.0.1:0 stream tcp nowait {U} internal echo\n")
    with socket.create_connection(("127.0.0.1", server.port()), timeout=10) as sock:
        start = time.monotonic()
        assert sock.recv(10) == b""  # closed by the server
        assert 0.5 < time.monotonic() - start < 5


def test_a_timed_out_last_connection_is_counted_as_ended(served) -> None:
    """The timeout closes a worker's only connection and then nothing wakes the worker:
    its DONE must still go out, or with max_child=1 the service stays shut for good."""
    server = served("defaults on conn_timeout=1;\n"
                    f"127.0.0.1:0 on socktype=stream, user={U}, args=echo, max_child=1;\n")
    with socket.create_connection(("127.0.0.1", server.port()), timeout=30) as sock:
        assert sock.recv(10) == b""  # timed out and closed by the server
    wait_until(lambda: server.status()["services"][0]["active"] == 0, 30,  # type: ignore[index]
               "the timed-out connection ended")
    assert tcp_exchange(server.port(), b"hello", timeout=30) == b"hello"


def test_program_that_cannot_exec_is_logged_and_worker_survives(served, public_dir: Path) -> None:
    bad = public_dir / "bad.sh"
    bad.write_text("#!/nonexistent/interpreter\n")  # executable, but exec fails (ENOENT)
    bad.chmod(0o755)
    server = served(f"127.0.0.1:0 stream tcp nowait {U} {bad} bad\n"
                   f"127.0.0.1:0 stream tcp nowait {U} internal echo\n")
    workers = server.workers() if "pool" in server.args else []
    assert tcp_exchange(server.port(0)) == b""
    wait_until(lambda: "exec_failed" in server.log(), 5)
    assert re.search(r"exec_failed .*errno=E[A-Z]+", server.log())
    assert tcp_exchange(server.port(0)) == b""
    if workers:
        assert sorted(server.workers()) == sorted(workers)  # no crash, no replacement


def test_process_titles(serve) -> None:
    server = serve(f"127.0.0.1:0 stream tcp nowait {U} internal echo\n")
    (worker,) = server.workers()
    title = Path(f"/proc/{worker}/cmdline").read_bytes().rstrip(b"\0")
    assert title.startswith(b"poolinetd: ") and title.endswith(b" worker idle"), title
    master = Path(f"/proc/{server.pid}/cmdline").read_bytes().rstrip(b"\0")
    assert master.startswith(b"poolinetd: master -c "), master
    with socket.create_connection(("127.0.0.1", server.port()), timeout=5) as sock:
        port = sock.getsockname()[1]
        wait_until(lambda: f"127.0.0.1:{port}".encode()
                   in Path(f"/proc/{worker}/cmdline").read_bytes(), 5, "title with the peer")
    assert children_of(server.pid) == [worker]


def test_program_options_env_and_stderr_to_log(served, public_dir: Path) -> None:
    script = public_dir / "both.sh"
    script.write_text("#!/bin/sh\necho \"out $GREETING\"\necho 'err line' >&2\n")
    script.chmod(0o755)
    server = served(
        f"127.0.0.1:0 on socktype=stream, wait=no, user={U}, exec={script}, args=both,\n"
        f"    env=\"GREETING=hello world\", stderr=log;\n"
        f"127.0.0.1:0 on socktype=stream, wait=no, user={U}, exec={script}, args=both2;\n")
    assert tcp_exchange(server.port(0)) == b"out hello world\n"  # stderr went to the log
    wait_until(lambda: "err line" in server.log(), 5, "the program's stderr in the log")
    assert tcp_exchange(server.port(1)) == b"out \nerr line\n"  # inetd's contract: fd 2 = socket


def test_per_ip_rate_limit_refuses_and_logs(served) -> None:
    server = served(f"127.0.0.1:0 stream tcp nowait/0/3 {U} internal echo\n")
    assert [tcp_exchange(server.port(), b"r") for _ in range(3)] == [b"r"] * 3
    assert refused(server.port()) and refused(server.port())  # over 3 a minute from this IP
    wait_until(lambda: "max_cpm_per_ip" in server.log(), 5, "the refusal log line")
    assert server.service_status(server.listeners[0]["service"])["refused"] == 2
    # Refusals are counted every time but logged at most every 10 s: a flood of
    # refused clients must not flood the log.
    assert server.log().count("conn_refused") == 1, server.log()


def test_spawn_rate_rests_a_looping_service(served) -> None:
    server = served(f"127.0.0.1:0 stream tcp nowait.3 {U} internal echo\n"
                   f"127.0.0.1:0 stream tcp nowait {U} internal daytime\n")
    for _ in range(3):
        assert tcp_exchange(server.port(0), b"x") == b"x"
    assert refused(server.port(0))  # the 4th in a minute trips it
    wait_until(lambda: "service_looping" in server.log(), 5)
    status = server.service_status(server.listeners[0]["service"])
    assert status["state"] == "paused"
    assert tcp_exchange(server.port(1)).endswith(b"\r\n")  # other services unaffected


def test_unix_socket_owner_and_mode_prefix(served, tmp_path: Path) -> None:
    path = tmp_path / "perm.sock"
    server = served(f":{U}::0660:{path} stream unix nowait {U} internal echo\n")
    st = os.stat(path)
    assert oct(st.st_mode & 0o777) == "0o660"
    if IS_ROOT:
        assert st.st_uid == 65534
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(b"perm")
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(10) == b"perm"
    server.stop()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_out_of_fds_pauses_the_listener_then_recovers(served) -> None:
    server = served(f"127.0.0.1:0 stream tcp nowait {U} internal echo\n")
    assert tcp_exchange(server.port(), b"warm") == b"warm"
    server.status()  # one loop turn after ready: the ready fd is closed (both modes)
    # The kernel hands out the lowest free fd and refuses one at or above the soft
    # limit: a limit at the lowest free number makes the next accept fail (EMFILE),
    # whatever holes the master's fd table has.
    taken = {int(t.split(":", 1)[0]) for t in fd_targets(server.pid)}
    used = min(set(range(len(taken) + 1)) - taken)
    limit = ["prlimit", "--pid", str(server.pid)]
    soft = int(Path(f"/proc/{server.pid}/limits").read_text().split("Max open files")[1].split()[0])
    # Only the soft limit moves: raising a hard limit back needs CAP_SYS_RESOURCE.
    subprocess.run([*limit, f"--nofile={used}:"], check=True, timeout=10)
    try:
        with socket.create_connection(("127.0.0.1", server.port()), timeout=10) as sock:
            sock.sendall(b"waiting")
            wait_until(lambda: "accept_failed" in server.log(), 5, "the EMFILE log line")
            cpu = _cpu_seconds(server.pid)
            time.sleep(1.0)  # over this second a spinning master would burn a whole core
            assert _cpu_seconds(server.pid) - cpu < 0.3
            assert server.proc.poll() is None
            subprocess.run([*limit, f"--nofile={soft}:"], check=True, timeout=10)
            assert recv_exact(sock, 7) == b"waiting"  # served once fds are available again
    finally:
        subprocess.run([*limit, f"--nofile={soft}:"], check=False, timeout=10)


@pytest.mark.skipif(not IS_ROOT, reason="needs a program the service user cannot reach")
def test_unreachable_program_fails_boot_then_recovers_when_fixed(serve, public_dir: Path) -> None:
    hidden = public_dir / "hidden"
    hidden.mkdir(mode=0o700)  # nobody cannot search it
    prog = hidden / "hello.sh"
    prog.write_text("#!/bin/sh\necho hello\n")
    prog.chmod(0o755)
    server = serve(f"127.0.0.1:0 stream tcp nowait nobody {prog} hello\n"
                   f"127.0.0.1:0 stream tcp nowait nobody internal echo\n")
    name = server.listeners[0]["service"]
    state = wait_until(lambda: (s := server.service_status(name))["boot_failures"] >= 2 and s,
                       10, "boot failures")
    assert state["state"] == "failing"
    assert state["last_error"] == f"{prog} is not executable by nobody"
    assert "worker_boot_failed" in server.log()
    assert tcp_exchange(server.port(1), b"others serve") == b"others serve"
    hidden.chmod(0o755)  # the operator fixes it; no restart, no reload
    wait_until(lambda: server.service_status(name)["state"] == "serving", 20, "recovery")
    assert tcp_exchange(server.port(0)) == b"hello\n"


def test_stream_wait_program_gets_the_listener(served, staged_programs: Path) -> None:
    server = served(f"127.0.0.1:0 stream tcp wait {U} {staged_programs}/accept_once.py accept\n")
    first = tcp_exchange(server.port(), b"one").split()
    second = tcp_exchange(server.port(), b"two").split()
    assert first[1] == b"one" and second[1] == b"two"
    assert first[0] != second[0]  # a fresh server per connection, each accept()ing itself


def test_stop_while_a_wait_program_holds_the_listener(served) -> None:
    server = served(f"127.0.0.1:0 stream tcp wait {U} /bin/sleep sleep 1\n")
    with socket.create_connection(("127.0.0.1", server.port()), timeout=5):
        wait_until(lambda: server.service_status(server.listeners[0]["service"])["active"] == 1,
                   5, "the program to hold the listener")
        assert server.stop() == 0  # the listener is closed while lent; no crash when it returns
    assert "Traceback" not in server.log() and "internal_error" not in server.log()


def test_unix_datagram_builtin_answers_bound_clients_only(served, public_dir: Path) -> None:
    # (public_dir: the worker answers as the service user, who must reach the client's path)
    path = public_dir / "dg.sock"
    server = served(f"{path} dgram unix wait {U} internal echo\n")
    os.chmod(path, 0o666)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as anon:
        anon.sendto(b"no return address", str(path))  # must not crash anything
    client_path = public_dir / "client.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
        client.bind(str(client_path))
        os.chmod(client_path, 0o666)
        client.settimeout(5)
        client.sendto(b"hello unix", str(path))
        assert client.recv(100) == b"hello unix"
    assert server.proc.poll() is None
    assert "Traceback" not in server.log() and "worker_exit" not in server.log()


def test_max_requests_recycles_workers_of_a_wait_service(serve, staged_programs: Path) -> None:
    server = serve(f"127.0.0.1:0 on socktype=stream, wait=yes, user={U}, "
                   f"exec={staged_programs}/accept_once.py, args=accept, max_requests=1, "
                   "pool_min=1;\n")
    name = server.listeners[0]["service"]
    for i in range(6):
        assert tcp_exchange(server.port(), b"r%d" % i).endswith(b"r%d" % i)
    # Each worker is retired after its loan; none lingers, the pool does not grow.
    wait_until(lambda: server.service_status(name)["workers"]["draining"] == 0, 10,
               "retired workers to exit")
    assert len(server.workers()) <= 2
