"""ONC RPC services end to end: the real rpcbind, Debian's rpc.rstatd and rpc.rusersd with
their real clients (``rup``, ``rusers``, ``rpcinfo``), and an rpc/tcp fixture of our own
(tests/programs/rpc_tcp_server.py), in pool and classic mode.

poolinetd binds each RPC service on a free port, registers every version
with rpcbind, lends the socket to the program on fd 0 (``wait``, as for
tftpd) and unsets the mappings when the service closes: at stop, on a
reload that removes or changes it; an upgrade hands them over without a gap.

There is one rpcbind per host (port 111, /run/rpcbind.sock). When one runs,
the tests use it; otherwise they start ``rpcbind -f`` in the foreground and
stop it at the end (a test that stops rpcbind on purpose runs only then).
Everything talks over loopback. Root only (rpcbind and the programs are
system daemons); skipped with the reason when a program is missing
(``.ci/install-distro-programs`` installs them).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import IS_ROOT, Server, alive, have_ipv6_loopback, wait_until

from poolinetd.ops import control, rpcbind

MODES = ["pool", "classic"]
CLIENT_TIMEOUT = 15.0
RPCBIND = shutil.which("rpcbind") or "/usr/sbin/rpcbind"
RPCINFO = shutil.which("rpcinfo") or "/usr/sbin/rpcinfo"
RSTATD, RUSERSD, TCPD = "/usr/sbin/rpc.rstatd", "/usr/sbin/rpc.rusersd", "/usr/sbin/tcpd"
RSTAT, RUSERS = 100001, 100002
FIXTURE_PROG = 0x2000_0099  # in the range RFC 5531 leaves to users (0x20000000-0x3fffffff)

# The lines exactly as Debian's rstatd and rusersd packages write them (through tcpd).
DEBIAN_RSTATD = "rstatd/1-5\tdgram\trpc/udp\twait\tnobody\t/usr/sbin/tcpd\t/usr/sbin/rpc.rstatd\n"
DEBIAN_RUSERSD = ("rusersd/2-3\tdgram\trpc/udp\twait\tnobody\t/usr/sbin/tcpd\t"
                  "/usr/sbin/rpc.rusersd\n")
DIRECT_RSTATD = "rstatd/1-5\tdgram\trpc/udp\twait\tnobody\t/usr/sbin/rpc.rstatd\trpc.rstatd\n"
DIRECT_RUSERSD = "rusersd/2-3\tdgram\trpc/udp\twait\tnobody\t/usr/sbin/rpc.rusersd\trpc.rusersd\n"
RSTATD_NAME, RUSERSD_NAME = "rstatd/1-5/rpc/udp", "rusersd/2-3/rpc/udp"

pytestmark = [
    pytest.mark.process,
    pytest.mark.skipif(not IS_ROOT, reason="rpcbind and the RPC daemons need root"),
]


def _missing(*paths: str | None) -> list[str]:
    return [p or "?" for p in paths if not (p and os.access(p, os.X_OK))]


def need(*paths: str | None) -> None:
    missing = _missing(*paths)
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (run .ci/install-distro-programs)")


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    """A client command, bounded in time, never reading our stdin."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=CLIENT_TIMEOUT,
                          stdin=subprocess.DEVNULL, check=False)


# -- rpcbind ------------------------------------------------------------------------------


def rpcbind_answers() -> bool:
    """Whether an rpcbind listens on its local socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(rpcbind.SOCKET_PATH)
        except OSError:
            return False
    return True


class Rpcbind:
    """The host's rpcbind: the running one, or one this module started (``owned``)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def owned(self) -> bool:
        return self.proc is not None

    def ensure(self) -> None:
        if rpcbind_answers():
            return
        # -f: foreground, so this process is rpcbind and stopping it ends it. No -w: a
        # warm start would bring back the mappings of whatever ran before.
        self.proc = subprocess.Popen([RPCBIND, "-f"], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(rpcbind_answers, 20, "rpcbind to answer on its socket")

    def stop(self) -> None:
        """Stop the rpcbind this module started (never the host's own)."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(20)
            self.proc = None
            wait_until(lambda: not rpcbind_answers(), 20, "rpcbind to be gone")


@pytest.fixture(scope="module")
def host_rpcbind() -> Iterator[Rpcbind]:
    need(RPCBIND, RPCINFO)
    rpcb = Rpcbind()
    rpcb.ensure()
    yield rpcb
    rpcb.stop()


def portmap() -> set[tuple[int, int, str, int]]:
    """(program, version, proto, port) as ``rpcinfo -p 127.0.0.1`` lists them."""
    out = run([RPCINFO, "-p", "127.0.0.1"])
    assert out.returncode == 0, out.stderr
    rows = set()
    for line in out.stdout.splitlines()[1:]:
        words = line.split()
        if len(words) >= 4 and words[0].isdigit():
            rows.add((int(words[0]), int(words[1]), words[2], int(words[3])))
    return rows


def versions_at(prog: int, port: int, proto: str = "udp") -> set[int]:
    """The versions of ``prog`` rpcbind maps to ``port``."""
    return {v for p, v, pr, po in portmap() if (p, pr, po) == (prog, proto, port)}


def fast_dump() -> dict[tuple[int, int, str], str]:
    """rpcbind's whole table over its local socket (RPCB DUMP), in a few hundred us: for
    watching a mapping through an upgrade, where forking rpcinfo would miss a short gap."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(rpcbind.SOCKET_PATH)
        sock.sendall(rpcbind.record(rpcbind.call_message(1, 100000, 3, rpcbind.DUMP, b"")))
        records = rpcbind.Records()
        while not (got := records.feed(sock.recv(65536))):
            pass
    rd = rpcbind.Reader(rpcbind.reply_result(got[0], 1))
    table = {}
    while rd.uint():
        prog, vers, netid, uaddr = rd.uint(), rd.uint(), rd.string(), rd.string()
        rd.string()
        table[(prog, vers, netid)] = uaddr
    return table


def rpc_port(server: Server, name: str, socket_type: str = "dgram") -> int:
    return server.port_of(name, socket_type)


def call_fixture(port: int, vers: int = 1) -> str:
    """Procedure 1 of the rpc/tcp fixture: its greeting."""
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as sock:
        msg = rpcbind.call_message(77, FIXTURE_PROG, vers, 1, b"")
        sock.sendall(rpcbind.record(msg))
        records = rpcbind.Records()
        while not (got := records.feed(sock.recv(65536))):
            pass
    return rpcbind.Reader(rpcbind.reply_result(got[0], 77)).string()


# -- Debian's daemons ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("through", ["tcpd", "direct"])
def test_rstatd_and_rusersd_with_rup_rusers_and_rpcinfo(serve, host_rpcbind: Rpcbind,
                                                         mode: str, through: str) -> None:
    """The lines as Debian writes them (through /usr/sbin/tcpd) and without tcpd: every
    version is registered on the port poolinetd bound, the real clients get answers from
    the real daemons (each started on the lent socket), and a stop unsets it all."""
    need(RSTATD, RUSERSD, shutil.which("rup"), shutil.which("rusers"))
    if through == "tcpd":
        need(TCPD)
    conf = DEBIAN_RSTATD + DEBIAN_RUSERSD if through == "tcpd" else (
        DIRECT_RSTATD + DIRECT_RUSERSD)
    server: Server = serve(conf, mode=mode)
    rstat_port, rusers_port = rpc_port(server, RSTATD_NAME), rpc_port(server, RUSERSD_NAME)
    wait_until(lambda: versions_at(RSTAT, rstat_port) == {1, 2, 3, 4, 5}, 20, "rstatd mapped")
    wait_until(lambda: versions_at(RUSERS, rusers_port) == {2, 3}, 20, "rusersd mapped")
    status = server.service_status(RSTATD_NAME)
    assert status["state"] == "serving" and status["last_error"] == ""
    assert status["rpc"] == {"program": RSTAT, "versions": [1, 5], "netids": ["udp"],
                             "registered": True}

    # rstatd itself answers version 4 with a version mismatch: the call reached it. (It
    # then stays for its idle time; the next real answer ends it.)
    got = run([RPCINFO, "-u", "127.0.0.1", "rstatd", "4"])
    assert "mismatch" in got.stdout + got.stderr, got
    for vers in (1, 2, 3, 5):
        got = run([RPCINFO, "-u", "127.0.0.1", "rstatd", str(vers)])
        assert f"program {RSTAT} version {vers} ready and waiting" in got.stdout, got
    rup = run(["rup", "127.0.0.1"])
    assert rup.returncode == 0 and re.search(r"\bup\b", rup.stdout), rup
    for vers in (2, 3):
        got = run([RPCINFO, "-u", "127.0.0.1", "rusersd", str(vers)])
        assert f"program {RUSERS} version {vers} ready and waiting" in got.stdout, got
    assert run(["rusers", "-l", "127.0.0.1"]).returncode == 0
    assert server.service_status(RSTATD_NAME)["accepted"] >= 5  # a program start per call
    for name in (RSTATD_NAME, RUSERSD_NAME):  # each exits after its answer
        wait_until(lambda n=name: server.service_status(n)["active"] == 0, 30, f"{name} idle")

    assert server.stop() == 0
    assert versions_at(RSTAT, rstat_port) == set() == versions_at(RUSERS, rusers_port)
    log = server.log()
    assert f"rpc_unregistered service={RSTATD_NAME}" in log
    assert " error " not in log and " warning " not in log, log


@pytest.mark.parametrize("mode", MODES)
def test_a_reload_unsets_a_removed_or_changed_service(serve, host_rpcbind: Rpcbind,
                                                      mode: str) -> None:
    need(RSTATD, RUSERSD, shutil.which("rup"))
    server: Server = serve(DIRECT_RSTATD + DIRECT_RUSERSD, mode=mode)
    rstat_port, rusers_port = rpc_port(server, RSTATD_NAME), rpc_port(server, RUSERSD_NAME)
    wait_until(lambda: versions_at(RUSERS, rusers_port) == {2, 3}, 20, "rusersd mapped")
    wait_until(lambda: versions_at(RSTAT, rstat_port) == {1, 2, 3, 4, 5}, 20, "rstatd mapped")

    server.conf.write_text(DIRECT_RSTATD)  # rusersd removed
    server.send_signal(signal.SIGHUP)
    wait_until(lambda: versions_at(RUSERS, rusers_port) == set(), 20, "rusersd unset")
    assert versions_at(RSTAT, rstat_port) == {1, 2, 3, 4, 5}  # untouched
    assert run([RPCINFO, "-u", "127.0.0.1", "rstatd", "1"]).returncode == 0

    # Changed versions: another service (its identity is program, versions, transport):
    # version 3 goes, version 2 moves to the new service's port.
    server.conf.write_text(DIRECT_RSTATD + DIRECT_RUSERSD.replace("2-3", "2"))
    server.send_signal(signal.SIGHUP)
    wait_until(lambda: any(lst["service"] == "rusersd/2/rpc/udp"
                           for lst in control.request(str(server.control), "status")[
                               "services"]), 20, "the reload")
    status = server.service_status("rusersd/2/rpc/udp")
    new_port = int(str(status["listeners"][0]).rsplit(":", 1)[1])
    wait_until(lambda: versions_at(RUSERS, new_port) == {2}, 20, "rusersd/2 mapped")
    assert {v for p, v, _, _ in portmap() if p == RUSERS} == {2}
    assert run([RPCINFO, "-u", "127.0.0.1", "rusersd", "2"]).returncode == 0
    assert server.stop() == 0
    assert {p for p, _, _, port in portmap() if port in (rstat_port, new_port)} == set()


# -- rpc/tcp ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_rpc_tcp_wait_fixture(serve, host_rpcbind: Rpcbind, staged_programs: Path,
                              mode: str) -> None:
    """A stream rpc/tcp wait service: the program gets the listening socket on fd 0,
    answers while clients come, exits when idle, and the next client starts it again."""
    prog = staged_programs / "rpc_tcp_server.py"
    server: Server = serve(f"{FIXTURE_PROG}/1-2 stream rpc/tcp wait nobody {prog} "
                           f"rpc_tcp_server.py {FIXTURE_PROG} 1-2 0.5\n", mode=mode)
    name = f"{FIXTURE_PROG}/1-2/rpc/tcp"
    port = rpc_port(server, name, "stream")
    wait_until(lambda: versions_at(FIXTURE_PROG, port, "tcp") == {1, 2}, 20, "fixture mapped")
    for vers in (1, 2):
        got = run([RPCINFO, "-t", "127.0.0.1", str(FIXTURE_PROG), str(vers)])
        assert f"program {FIXTURE_PROG} version {vers} ready and waiting" in got.stdout, got
    got = run([RPCINFO, "-t", "127.0.0.1", str(FIXTURE_PROG), "3"])
    assert "mismatch" in got.stdout + got.stderr, got
    first = call_fixture(port)
    assert first.startswith("hello from rpc/tcp pid ")
    wait_until(lambda: server.service_status(name)["active"] == 0, 20, "the program's exit")
    second = call_fixture(port, 2)  # the socket was polled again: a new program
    assert second.startswith("hello from rpc/tcp pid ") and second != first
    assert server.stop() == 0
    assert versions_at(FIXTURE_PROG, port, "tcp") == set()


# -- upgrade ------------------------------------------------------------------------------


class Watch:
    """Reads rpcbind's table in a loop and notes every moment a mapping was not ``want``."""

    def __init__(self, key: tuple[int, int, str], want: str) -> None:
        self.key, self.want = key, want
        self.reads = 0
        self.gaps: list[str] = []
        self.done = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done:
            got = fast_dump().get(self.key, "")
            self.reads += 1
            if got != self.want:
                self.gaps.append(got or "(none)")
            time.sleep(0.001)

    def finish(self) -> None:
        self.done = True
        self.thread.join(30)


def _new_master_pid(server: Server) -> int:
    match = re.search(r"upgrade_ready new_pid=(\d+)", server.log())
    return int(match.group(1)) if match else 0


@pytest.mark.parametrize("mode", MODES)
def test_an_upgrade_hands_the_registrations_over_without_a_gap(
        serve, host_rpcbind: Rpcbind, mode: str) -> None:
    """The new master adopts the socket with its port and keeps the mapping it finds; the
    old one does not unset it at its exit: rpcbind maps the program all along."""
    need(RSTATD, shutil.which("rup"))
    server: Server = serve(DIRECT_RSTATD, mode=mode)
    port = rpc_port(server, RSTATD_NAME)
    wait_until(lambda: versions_at(RSTAT, port) == {1, 2, 3, 4, 5}, 20, "rstatd mapped")
    uaddr = f"0.0.0.0.{port >> 8}.{port & 0xFF}"
    watch = Watch((RSTAT, 1, "udp"), uaddr)
    new_pid = 0
    try:
        wait_until(lambda: watch.reads > 10, 20, "the watcher's first reads")
        assert control.request(str(server.control), "upgrade") == {"ok": True}
        new_pid = wait_until(lambda: _new_master_pid(server), 60, "the new master ready")
        assert isinstance(new_pid, int)
        assert server.proc.wait(30) == 0  # the old master drained and exited
        reads = watch.reads
        wait_until(lambda: watch.reads > reads + 10, 20, "reads after the old master's exit")
        watch.finish()
        assert watch.gaps == []
        assert versions_at(RSTAT, port) == {1, 2, 3, 4, 5}
        rup = run(["rup", "127.0.0.1"])  # served by the new master's program now
        assert rup.returncode == 0 and re.search(r"\bup\b", rup.stdout), rup
        doc = control.request(str(server.control), "status")
        assert doc["pid"] == new_pid
        svc = next(s for s in doc["services"] if s["service"] == RSTATD_NAME)
        assert svc["state"] == "serving" and svc["rpc"]["registered"] is True
        os.kill(new_pid, signal.SIGTERM)
        wait_until(lambda: not alive(new_pid), 30, "the new master to stop")
        assert versions_at(RSTAT, port) == set()  # the new master unset it at its stop
    finally:
        watch.finish()
        if new_pid and alive(new_pid):
            os.kill(new_pid, signal.SIGKILL)


# -- rpcbind down -------------------------------------------------------------------------


def test_rpcbind_down_then_back(serve, host_rpcbind: Rpcbind) -> None:
    """Without rpcbind the service is up but clients cannot find it: status says so, one
    warning is logged, and registration follows as soon as rpcbind is back."""
    need(RSTATD, shutil.which("rup"))
    if not host_rpcbind.owned:
        pytest.skip("the host's own rpcbind runs: this test stops rpcbind, so it runs only "
                    "with one it started itself")
    host_rpcbind.stop()
    try:
        server: Server = serve(DIRECT_RSTATD)
        port = rpc_port(server, RSTATD_NAME)
        status = wait_until(lambda: (s := server.service_status(RSTATD_NAME))["state"]
                            == "unregistered" and s["last_error"] and s, 20, "unregistered")
        assert isinstance(status, dict)
        assert str(status["last_error"]).startswith("rpcbind unavailable: /run/rpcbind.sock")
        assert status["rpc"]["registered"] is False
        wait_until(lambda: "rpcbind_unavailable" in server.log(), 10, "the warning")
    finally:
        host_rpcbind.ensure()
    wait_until(lambda: versions_at(RSTAT, port) == {1, 2, 3, 4, 5}, 60, "rstatd mapped")
    wait_until(lambda: server.service_status(RSTATD_NAME)["state"] == "serving", 20,
               "serving")
    assert server.service_status(RSTATD_NAME)["last_error"] == ""
    assert "rpcbind_available" in server.log()
    assert server.log().count("rpcbind_unavailable") == 1  # once per outage
    rup = run(["rup", "127.0.0.1"])
    assert rup.returncode == 0 and re.search(r"\bup\b", rup.stdout), rup
    assert server.stop() == 0
    assert versions_at(RSTAT, port) == set()


def test_fast_dump_agrees_with_rpcinfo(host_rpcbind: Rpcbind) -> None:
    """The test's own DUMP reader sees what rpcinfo sees (it watches the upgrade)."""
    table = fast_dump()
    assert (100000, 3, "udp") in table
    assert {(p, v) for p, v, _ in table} >= {(p, v) for p, v, _, _ in portmap()}
    assert struct.calcsize(">I") == 4


def null_call(port: int, prog: int, vers: int, timeout: float = 2.0) -> bool:
    """Whether an RPC NULL call over UDP to ``port`` is answered within ``timeout``."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(rpcbind.call_message(5, prog, vers, 0, b""), ("127.0.0.1", port))
        try:
            return rpcbind.reply_result(sock.recv(65536), 5) == b""
        except TimeoutError:
            return False


@pytest.mark.parametrize("mode", MODES)
def test_admission_applies_as_for_other_wait_services(serve, host_rpcbind: Rpcbind,
                                                      mode: str) -> None:
    """A refused source's datagram starts nothing and gets no answer; the service stays
    registered and answers everyone else."""
    need(RSTATD)
    server: Server = serve(
        "rstatd/1-5 on protocol=rpc/udp, wait=yes, user=nobody, exec=/usr/sbin/rpc.rstatd, "
        "args=rpc.rstatd, no_access=127.0.0.1;\n", mode=mode)
    port = rpc_port(server, RSTATD_NAME)
    wait_until(lambda: versions_at(RSTAT, port) == {1, 2, 3, 4, 5}, 20, "rstatd mapped")
    assert not null_call(port, RSTAT, 2)
    status = server.service_status(RSTATD_NAME)
    assert status["refused_by"].get("no_access", 0) >= 1 and status["accepted"] == 0
    # The same datagram from another loopback address is served.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.2", 0))
        sock.settimeout(CLIENT_TIMEOUT)
        sock.sendto(rpcbind.call_message(6, RSTAT, 2, 0, b""), ("127.0.0.1", port))
        assert rpcbind.reply_result(sock.recv(65536), 6) == b""
    assert server.service_status(RSTATD_NAME)["accepted"] == 1
    wait_until(lambda: server.service_status(RSTATD_NAME)["active"] == 0, 30, "rstatd idle")
    assert server.stop() == 0


def test_a_reload_that_changes_only_the_program_keeps_the_mappings(
        serve, host_rpcbind: Rpcbind) -> None:
    """Same program, versions and transport: the socket moves to the new generation and
    rpcbind is not touched (no unset, no set)."""
    need(RSTATD, TCPD)
    server: Server = serve(DIRECT_RSTATD)
    port = rpc_port(server, RSTATD_NAME)
    wait_until(lambda: versions_at(RSTAT, port) == {1, 2, 3, 4, 5}, 20, "rstatd mapped")
    server.conf.write_text(DEBIAN_RSTATD)  # now through tcpd
    server.send_signal(signal.SIGHUP)
    wait_until(lambda: " reloaded " in server.log(), 20, "the reload")
    assert "changed=1" in server.log()
    assert versions_at(RSTAT, port) == {1, 2, 3, 4, 5}
    assert "rpc_unregistered" not in server.log()
    assert server.log().count("rpc_registered") == 1
    assert null_call(port, RSTAT, 3, CLIENT_TIMEOUT)
    wait_until(lambda: server.service_status(RSTATD_NAME)["active"] == 0, 30, "rstatd idle")
    assert server.stop() == 0
    assert versions_at(RSTAT, port) == set()


def test_an_rpcbind_restart_is_noticed_and_mended(serve, host_rpcbind: Rpcbind) -> None:
    """rpcbind restarted without -w forgets every mapping; the master's periodic check
    (one DUMP every AUDIT_INTERVAL) registers them again."""
    need(RSTATD)
    if not host_rpcbind.owned:
        pytest.skip("restarts rpcbind: runs only with one this module started")
    server: Server = serve(DIRECT_RSTATD)
    port = rpc_port(server, RSTATD_NAME)
    wait_until(lambda: versions_at(RSTAT, port) == {1, 2, 3, 4, 5}, 20, "rstatd mapped")
    host_rpcbind.stop()
    host_rpcbind.ensure()
    assert versions_at(RSTAT, port) == set()  # the new rpcbind knows nothing
    wait_until(lambda: versions_at(RSTAT, port) == {1, 2, 3, 4, 5},
               3 * rpcbind.AUDIT_INTERVAL + 15, "rstatd mapped again")
    assert null_call(port, RSTAT, 2, CLIENT_TIMEOUT)
    wait_until(lambda: server.service_status(RSTATD_NAME)["active"] == 0, 30, "rstatd idle")
    assert server.stop() == 0
    assert versions_at(RSTAT, port) == set()


@pytest.mark.skipif(not have_ipv6_loopback(), reason="no IPv6 loopback")
def test_rpc_star_registers_both_netids_of_one_dual_stack_socket(
        serve, host_rpcbind: Rpcbind, staged_programs: Path) -> None:
    """BSD's rpc/*: one socket taking IPv4 and IPv6, mapped as tcp and tcp6; a client
    reaches it both ways."""
    prog = staged_programs / "rpc_tcp_server.py"
    server: Server = serve(f"{FIXTURE_PROG}/1 stream rpc/* wait nobody {prog} "
                           f"rpc_tcp_server.py {FIXTURE_PROG} 1 0.5\n")
    port = rpc_port(server, f"{FIXTURE_PROG}/1/rpc/tcp46", "stream")
    want = {(FIXTURE_PROG, 1, "tcp"): f"0.0.0.0.{port >> 8}.{port & 0xFF}",
            (FIXTURE_PROG, 1, "tcp6"): f"::.{port >> 8}.{port & 0xFF}"}
    wait_until(lambda: {k: v for k, v in fast_dump().items() if k[0] == FIXTURE_PROG}
               == want, 20, "tcp and tcp6 mapped")
    got = run([RPCINFO, "-T", "tcp6", "::1", str(FIXTURE_PROG), "1"])
    assert f"program {FIXTURE_PROG} version 1 ready and waiting" in got.stdout, got
    assert call_fixture(port).startswith("hello from rpc/tcp pid ")
    with socket.create_connection(("::1", port), timeout=CLIENT_TIMEOUT) as sock:
        sock.sendall(rpcbind.record(rpcbind.call_message(78, FIXTURE_PROG, 1, 1, b"")))
        records = rpcbind.Records()
        while not (answer := records.feed(sock.recv(65536))):
            pass
    assert rpcbind.Reader(rpcbind.reply_result(answer[0], 78)).string().startswith("hello")
    assert server.stop() == 0
    assert not any(k[0] == FIXTURE_PROG for k in fast_dump())


# Run as nobody: RPCB v3 SET of rstatd version 1 over udp naming port 7, over rpcbind's
# local socket (rpcbind records nobody's uid as the owner). Prints rpcbind's answer.
SQUAT = r"""
import socket, struct
def s(x):
    b = x.encode()
    return struct.pack(">I", len(b)) + b + b"\0" * (-len(b) % 4)
args = struct.pack(">II", 100001, 1) + s("udp") + s("0.0.0.0.0.7") + s("")
call = struct.pack(">10I", 9, 0, 2, 100000, 3, 1, 0, 0, 0, 0) + args
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(5)
sock.connect("/run/rpcbind.sock")
sock.sendall(struct.pack(">I", 0x80000000 | len(call)) + call)
print(struct.unpack(">I", sock.recv(100)[-4:])[0])
"""


def test_a_mapping_another_user_squats_is_taken_back(serve, host_rpcbind: Rpcbind) -> None:
    """A local user who registered rstatd first (pointing clients at a port of theirs)
    loses it to the service: root may unset any mapping, and the user cannot unset root's."""
    need(RSTATD, "/usr/sbin/runuser", "/usr/bin/python3")
    squat = ["/usr/sbin/runuser", "-u", "nobody", "--", "/usr/bin/python3", "-c", SQUAT]
    assert run(squat).stdout.strip() == "1"
    try:
        assert versions_at(RSTAT, 7) == {1}
        server: Server = serve(DIRECT_RSTATD)
        port = rpc_port(server, RSTATD_NAME)
        wait_until(lambda: versions_at(RSTAT, port) == {1, 2, 3, 4, 5}, 20, "rstatd mapped")
        assert versions_at(RSTAT, 7) == set()
        assert run(squat).stdout.strip() == "0"  # refused: the mapping exists, root's
        unset = run(["/usr/sbin/runuser", "-u", "nobody", "--", RPCINFO, "-d", "rstatd", "1"])
        assert unset.returncode != 0, unset
        assert versions_at(RSTAT, port) == {1, 2, 3, 4, 5}
        assert server.stop() == 0
    finally:
        if any(row[:2] == (RSTAT, 1) and row[3] == 7 for row in portmap()):
            run([RPCINFO, "-d", "rstatd", "1"])  # as root: the squat, if the test failed
