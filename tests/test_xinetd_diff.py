"""The same xinetd.conf under the real xinetd (Debian's, started here in the foreground) and
under poolinetd, both modes: for a set of clients bound to distinct 127.0.x.y sources, who is
served and who is refused must be the same. Loopback only; skipped without /usr/sbin/xinetd
(.ci/install-distro-programs installs it) or without root (xinetd binds as root)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import IS_ROOT, start_server, wait_until

XINETD = shutil.which("xinetd") or "/usr/sbin/xinetd"
pytestmark = [
    pytest.mark.skipif(not os.path.exists(XINETD), reason="xinetd is not installed"),
    pytest.mark.skipif(not IS_ROOT, reason="xinetd needs root to run its services"),
    pytest.mark.process,
]
SERVED, REFUSED = "served", "refused"
ANSWER_TIMEOUT = 10.0  # a served client's echo, on two busy shared cores
HELD_TIMEOUT = 2.0  # how long a client past a limit must stay unanswered to count as refused


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now (bound and released at once: both daemons then bind
    them in turn, and SO_REUSEADDR covers the TIME_WAIT of the first one's connections)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def echo_service(name: str, port: int, extra: str = "") -> str:
    """An INTERNAL echo (xinetd picks the built-in by the service name; ``name`` is its id)
    on 127.0.0.1:``port``, without tcp_wrappers, so only the file decides."""
    return (f"service echo\n{{\n\ttype = INTERNAL UNLISTED\n\tid = {name}\n"
            f"\tsocket_type = stream\n\tprotocol = tcp\n\twait = no\n\tuser = root\n"
            f"\tport = {port}\n\tbind = 127.0.0.1\n\tflags = REUSE NOLIBWRAP\n{extra}}}\n")


def connect(source: str, port: int) -> socket.socket | None:
    """A connection from ``source``; None when nothing listens on ``port``."""
    sock = socket.socket()
    sock.settimeout(ANSWER_TIMEOUT)
    sock.bind((source, 0))
    try:
        sock.connect(("127.0.0.1", port))
    except ConnectionRefusedError:
        sock.close()
        return None
    return sock


def outcome(sock: socket.socket | None, wait: float = ANSWER_TIMEOUT) -> str:
    """SERVED if the echo answers within ``wait`` seconds, else REFUSED (closed, reset,
    never answered, or nothing listening). The socket stays open (the caller closes it)."""
    if sock is None:
        return REFUSED
    sock.settimeout(wait)
    try:
        sock.sendall(b"x")
        return SERVED if sock.recv(1) == b"x" else REFUSED
    except (TimeoutError, ConnectionError):
        return REFUSED


@contextlib.contextmanager
def running_xinetd(tmp_path: Path, conf: Path, probe_port: int) -> Iterator[None]:
    """xinetd in the foreground on ``conf``, ready once ``probe_port`` answers."""
    log = tmp_path / "xinetd.log"
    # A session of its own: the servers it forked go with it (one still exiting could
    # hold a listening socket when poolinetd binds the same port next).
    proc = subprocess.Popen(
        [XINETD, "-dontfork", "-stayalive", "-f", str(conf), "-pidfile",
         str(tmp_path / "xinetd.pid"), "-filelog", str(log)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        def ready() -> bool:
            assert proc.poll() is None, log.read_text(errors="replace")
            sock = connect("127.0.0.1", probe_port)
            with contextlib.closing(sock) if sock is not None else contextlib.nullcontext():
                return sock is not None and outcome(sock) == SERVED

        wait_until(ready, 30.0, "xinetd to serve its probe service")
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(ProcessLookupError):  # its servers still running, if any
            os.killpg(proc.pid, signal.SIGKILL)


Scenario = Callable[[], dict[str, str]]


def compare(tmp_path: Path, text: str, probe: int, scenario: Scenario, mode: str,
            expected: dict[str, str]) -> str:
    """Run ``scenario`` under xinetd, then under poolinetd (``mode``) on the same file;
    poolinetd's log."""
    conf = tmp_path / "xinetd.conf"
    conf.write_text(text)
    with running_xinetd(tmp_path, conf, probe):
        under_xinetd = scenario()
    server = start_server(tmp_path, text, mode=mode)
    try:
        under_poolinetd = scenario()
    finally:
        server.stop(signal.SIGINT)
    assert under_xinetd == expected, ("xinetd", under_xinetd)
    assert under_poolinetd == under_xinetd, (mode, under_poolinetd, server.log())
    return server.log()


MODES = ["pool", "classic"]


@pytest.mark.parametrize("mode", MODES)
def test_access_lists(tmp_path: Path, mode: str) -> None:
    """only_from/no_access: CIDR, xinetd's trailing-zero wildcards, factorized addresses,
    an address in both lists (refused whatever the masks, as xinetd 2.3.15 does)."""
    probe, lists, both, factor, zeros, inherit = free_ports(6)
    text = ("defaults\n{\n\tno_access = 127.0.9.9\n}\n"
            + echo_service("probe", probe)
            + echo_service("lists", lists, "\tonly_from = 127.0.0.0/24\n"
                                           "\tno_access = 127.0.0.5\n")
            + echo_service("both", both, "\tonly_from = 127.0.0.6\n"
                                         "\tno_access = 127.0.0.0/24\n")
            + echo_service("factor", factor, "\tonly_from = 127.0.{3,4}\n")
            + echo_service("zeros", zeros, "\tonly_from = 127.0.0.0\n")
            + echo_service("inherit", inherit, "\tno_access += 127.0.0.7\n"))
    clients = [("lists", lists, "127.0.0.2"), ("lists", lists, "127.0.0.5"),
               ("lists", lists, "127.0.1.1"), ("both", both, "127.0.0.6"),
               ("both", both, "127.0.1.6"), ("factor", factor, "127.0.3.1"),
               ("factor", factor, "127.0.4.200"), ("factor", factor, "127.0.5.1"),
               ("zeros", zeros, "127.200.1.1"), ("inherit", inherit, "127.0.0.7"),
               ("inherit", inherit, "127.0.9.9"), ("inherit", inherit, "127.0.0.8")]

    def scenario() -> dict[str, str]:
        got = {}
        for name, port, source in clients:
            sock = connect(source, port)
            got[f"{name} {source}"] = outcome(sock)
            if sock is not None:
                sock.close()
        return got

    expected = {
        "lists 127.0.0.2": SERVED, "lists 127.0.0.5": REFUSED, "lists 127.0.1.1": REFUSED,
        "both 127.0.0.6": REFUSED, "both 127.0.1.6": REFUSED,
        "factor 127.0.3.1": SERVED, "factor 127.0.4.200": SERVED,
        "factor 127.0.5.1": REFUSED, "zeros 127.200.1.1": SERVED,
        "inherit 127.0.0.7": REFUSED, "inherit 127.0.9.9": REFUSED,
        "inherit 127.0.0.8": SERVED,
    }
    compare(tmp_path, text, probe, scenario, mode, expected)


@pytest.mark.parametrize("mode", MODES)
def test_per_source_instances_and_disable(tmp_path: Path, mode: str) -> None:
    """per_source (max_child_per_ip), instances (max_child: xinetd refuses past it,
    poolinetd leaves the client in the backlog: neither answers it while the others
    run) and disable = yes (nothing listens)."""
    probe, per, inst, off = free_ports(4)
    text = (echo_service("probe", probe)
            + echo_service("per", per, "\tper_source = 1\n")
            + echo_service("inst", inst, "\tinstances = 2\n")
            + echo_service("off", off, "\tdisable = yes\n"))

    def scenario() -> dict[str, str]:
        got: dict[str, str] = {}
        held: list[socket.socket] = []
        try:
            first = connect("127.0.0.2", per)
            assert first is not None
            held.append(first)
            got["per first 127.0.0.2"] = outcome(first)
            second = connect("127.0.0.2", per)
            if second is not None:
                held.append(second)
            got["per second 127.0.0.2"] = outcome(second, HELD_TIMEOUT)
            other = connect("127.0.0.3", per)
            if other is not None:
                held.append(other)
            got["per other 127.0.0.3"] = outcome(other)
            for source in ("127.0.1.1", "127.0.1.2"):
                sock = connect(source, inst)
                assert sock is not None
                held.append(sock)
                got[f"inst {source}"] = outcome(sock)
            third = connect("127.0.1.3", inst)
            if third is not None:
                held.append(third)
            got["inst third 127.0.1.3"] = outcome(third, HELD_TIMEOUT)
            got["off 127.0.0.2"] = outcome(connect("127.0.0.2", off))
        finally:
            for sock in held:
                sock.close()
        # Once the held instances end, a new client is served again (both daemons).
        deadline = time.monotonic() + 30

        def served_again() -> bool:
            sock = connect("127.0.1.4", inst)
            with contextlib.closing(sock) if sock is not None else contextlib.nullcontext():
                return outcome(sock, HELD_TIMEOUT) == SERVED or time.monotonic() > deadline

        wait_until(served_again, 40.0, "instances to free up")
        got["inst after 127.0.1.4"] = SERVED if time.monotonic() <= deadline else REFUSED
        return got

    expected = {
        "per first 127.0.0.2": SERVED, "per second 127.0.0.2": REFUSED,
        "per other 127.0.0.3": SERVED, "inst 127.0.1.1": SERVED, "inst 127.0.1.2": SERVED,
        "inst third 127.0.1.3": REFUSED, "off 127.0.0.2": REFUSED,
        "inst after 127.0.1.4": SERVED,
    }
    compare(tmp_path, text, probe, scenario, mode, expected)


def read_all(source: str, port: int) -> bytes:
    """What a client from ``source`` that sends nothing receives before the server closes
    (the refused client of a banner_fail service: the banner, then EOF)."""
    sock = connect(source, port)
    assert sock is not None
    got = b""
    with sock:
        try:
            while chunk := sock.recv(4096):
                got += chunk
        except (TimeoutError, ConnectionError):
            pass
    return got


@pytest.mark.parametrize("mode", MODES)
def test_banner_fail_is_sent_to_a_refused_client(tmp_path: Path, mode: str) -> None:
    probe, guarded = free_ports(2)
    banner = tmp_path / "banner"
    banner.write_bytes(b"access denied\r\n")
    text = (echo_service("probe", probe)
            + echo_service("guarded", guarded, f"\tonly_from = 127.0.0.2\n"
                                               f"\tbanner_fail = {banner}\n"))

    def scenario() -> dict[str, str]:
        sock = connect("127.0.0.2", guarded)
        with contextlib.closing(sock) if sock is not None else contextlib.nullcontext():
            allowed = outcome(sock)
        return {"allowed 127.0.0.2": allowed,
                "refused 127.0.0.3": read_all("127.0.0.3", guarded).decode()}

    compare(tmp_path, text, probe, scenario, mode,
            {"allowed 127.0.0.2": SERVED, "refused 127.0.0.3": "access denied\r\n"})


@pytest.mark.parametrize("mode", MODES)
def test_cps_rate_and_rest(tmp_path: Path, mode: str) -> None:
    """cps = 2 5: a third connection within the second is refused and the service rests
    5 s (xinetd closes its listener: connections are refused; poolinetd stops polling it:
    they wait unanswered), then serves again."""
    probe, limited = free_ports(2)
    text = echo_service("probe", probe) + echo_service("limited", limited, "\tcps = 2 5\n")

    def scenario() -> dict[str, str]:
        got = {}
        for index in range(3):
            sock = connect(f"127.0.2.{index + 1}", limited)
            with contextlib.closing(sock) if sock is not None else contextlib.nullcontext():
                got[f"burst {index + 1}"] = outcome(sock, HELD_TIMEOUT)
        rested = time.monotonic()
        sock = connect("127.0.2.9", limited)
        with contextlib.closing(sock) if sock is not None else contextlib.nullcontext():
            got["resting"] = outcome(sock, 1.0)

        # xinetd refuses connections while its listener is closed; poolinetd queues one
        # and answers it when the rest ends. One connection that lands waits for that
        # (more would each count against the rate when the service resumes).
        sock = wait_until(lambda: connect("127.0.2.10", limited), 40.0,
                          "a connection after the rest")
        assert isinstance(sock, socket.socket)
        with sock:
            assert outcome(sock, 30.0) == SERVED
        # Not before the rest is over (4 s: a second's slack for the clocks' granularity).
        got["back after the rest"] = SERVED if time.monotonic() - rested >= 4.0 else "early"
        return got

    compare(tmp_path, text, probe, scenario, mode,
            {"burst 1": SERVED, "burst 2": SERVED, "burst 3": REFUSED, "resting": REFUSED,
             "back after the rest": SERVED})


def how_refused(source: str, port: int) -> str:
    """What a client from ``source`` that sends nothing meets: "closed: BYTES" if the
    server closes within ANSWER_TIMEOUT (what it sent before), "held" if it does not,
    "no listener" if nothing accepts."""
    sock = connect(source, port)
    if sock is None:
        return "no listener"
    got = b""
    with sock:
        sock.settimeout(ANSWER_TIMEOUT)
        try:
            while chunk := sock.recv(4096):
                got += chunk
        except TimeoutError:
            return "held"
        except ConnectionError:
            pass
    return f"closed: {got.decode(errors='replace')}"


@pytest.mark.parametrize("mode", MODES)
def test_instances_at_the_limit_are_refused_at_once_with_banner_fail(
        tmp_path: Path, mode: str) -> None:
    """xinetd accepts a connection past ``instances`` and refuses it at once (its
    banner_fail, then the close); poolinetd does the same for an xinetd file (inetd.conf's
    max_child leaves it in the backlog), counts it and logs conn_refused reason=instances."""
    probe, inst = free_ports(2)
    banner = tmp_path / "busy"
    banner.write_bytes(b"too many\r\n")
    text = echo_service("probe", probe) + echo_service(
        "inst", inst, f"\tinstances = 1\n\tbanner_fail = {banner}\n")

    def scenario() -> dict[str, str]:
        first = connect("127.0.4.1", inst)
        assert first is not None
        with first:
            got = {"first": outcome(first)}
            got["second"] = how_refused("127.0.4.2", inst)
            got["first still"] = outcome(first)
        return got

    log = compare(tmp_path, text, probe, scenario, mode,
                  {"first": SERVED, "second": "closed: too many\r\n", "first still": SERVED})
    assert "conn_refused" in log and "reason=instances" in log, log


@pytest.mark.parametrize("mode", MODES)
def test_implicit_cps_50_10(tmp_path: Path, mode: str) -> None:
    """A service without cps gets xinetd's cps = 50 10: a burst of 80 connections trips
    it, and a client during the 10 s rest is not served (xinetd: nothing listens;
    poolinetd: it waits in the backlog), then one is served again."""
    probe, busy = free_ports(2)
    text = echo_service("probe", probe) + echo_service("busy", busy)

    def scenario() -> dict[str, str]:
        burst = []
        try:
            for index in range(80):  # as fast as possible: well within one second
                sock = connect(f"127.0.5.{index + 1}", busy)
                if sock is not None:
                    burst.append(sock)
        finally:
            for sock in burst:
                sock.close()
        tripped = time.monotonic()
        sock = connect("127.0.6.1", busy)
        with contextlib.closing(sock) if sock is not None else contextlib.nullcontext():
            got = {"resting": outcome(sock, 1.0)}
        later = wait_until(lambda: connect("127.0.6.2", busy), 60.0, "the rest to end")
        assert isinstance(later, socket.socket)
        with later:
            assert outcome(later, 40.0) == SERVED
        # Not before the rest is over (8 s: slack for the clocks' granularity).
        got["back after the rest"] = SERVED if time.monotonic() - tripped >= 8.0 else "early"
        return got

    compare(tmp_path, text, probe, scenario, mode,
            {"resting": REFUSED, "back after the rest": SERVED})


def read_exactly(sock: socket.socket, size: int) -> bytes:
    """``size`` bytes from ``sock`` (fewer if it closes or ANSWER_TIMEOUT passes)."""
    got = b""
    sock.settimeout(ANSWER_TIMEOUT)
    with contextlib.suppress(TimeoutError, ConnectionError):
        while len(got) < size and (chunk := sock.recv(size - len(got))):
            got += chunk
    return got


@pytest.mark.parametrize("mode", MODES)
def test_banner_and_banner_success(tmp_path: Path, mode: str) -> None:
    """banner goes to every client as soon as it is accepted, banner_success to a served
    one before its server answers, banner_fail (after banner) to a refused one."""
    probe, port = free_ports(2)
    files = {"hello": b"hello\r\n", "granted": b"granted\r\n", "denied": b"denied\r\n"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    text = echo_service("probe", probe) + echo_service(
        "bannered", port, f"\tonly_from = 127.0.7.1\n\tbanner = {tmp_path / 'hello'}\n"
                          f"\tbanner_success = {tmp_path / 'granted'}\n"
                          f"\tbanner_fail = {tmp_path / 'denied'}\n")

    def scenario() -> dict[str, str]:
        sock = connect("127.0.7.1", port)
        assert sock is not None
        with sock:
            first = read_exactly(sock, len(b"hello\r\ngranted\r\n")).decode()
            served = outcome(sock)
        return {"served gets": first, "then": served,
                "refused gets": how_refused("127.0.7.2", port)}

    compare(tmp_path, text, probe, scenario, mode,
            {"served gets": "hello\r\ngranted\r\n", "then": SERVED,
             "refused gets": "closed: hello\r\ndenied\r\n"})
