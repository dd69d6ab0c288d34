"""Hostile review, round five: tcp_wrappers' spawn/twist run natively, xinetd banners and
instances. Each attack made for real, on loopback (rules in a test directory via
``--tcp-wrappers-dir``, clients from distinct 127.x sources).

Each test reproduced a defect, now fixed: backgrounded spawn commands escaping the
caps, a backtracking wildcard match blocking the master on a client-chosen name, a
burst of new datagram sources locking a judged service, command starts unbounded over
all services, one source holding every twist slot.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from conftest import TEST_USER, Server, wait_until

from poolinetd.engine.wrappers_commands import (
    MAX_PER_SERVICE,
    MAX_STARTS_PER_SECOND,
    MAX_STARTS_PER_SECOND_TOTAL,
)

U = TEST_USER
MODES = ["pool", "classic"]


def _rules(directory: Path, allow: str, deny: str) -> None:
    for name, text in (("hosts.allow", allow), ("hosts.deny", deny)):
        tmp = directory / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, directory / name)


def _with_arg(marker: bytes) -> list[int]:
    """Pids of the processes whose command line holds ``marker``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            if marker in Path(f"/proc/{entry}/cmdline").read_bytes():
                out.append(int(entry))
    return out


# -- a spawn command that backgrounds itself escapes the command caps ------------------------


@pytest.mark.process
@pytest.mark.parametrize("mode", MODES)
def test_backgrounded_spawn_commands_stay_within_the_cap(serve, tmp_path: Path,
                                                         mode: str) -> None:
    """docs/security.md: "a flood of clients whose rule spawns a command that never ends
    holds 32 processes, not one per client". The canonical rule ends in ``&`` (the
    booby trap of hosts_access(5): ``spawn (safe_finger -l @%h | mail root) &``): the
    shell the master forked exits at once and is reaped, the command lives on in its
    session, and the master's count is back to 0."""
    marker = f"{30 + os.getpid() % 1000 / 1000:.3f}"  # sleep's argument: finds our sleeps
    _rules(tmp_path, f"discard: ALL: spawn (sleep {marker}) &\n", "")
    server: Server = serve(f"127.0.0.1:0 stream tcp nowait {U} internal discard\n",
                           "--tcp-wrappers", "--tcp-wrappers-dir", str(tmp_path), mode=mode)
    port = server.port()
    clients = 3 * MAX_PER_SERVICE
    try:
        for i in range(clients):
            with socket.socket() as sock:
                sock.bind((f"127.0.1.{1 + i}", 0))
                sock.connect(("127.0.0.1", port))
            time.sleep(2.0 / MAX_STARTS_PER_SECOND)  # under the start rate: none refused
        wait_until(lambda: len(_with_arg(f"sleep\0{marker}".encode())) >= MAX_PER_SERVICE
                   or "wrappers_command_refused" in server.log(), 30, "the commands")
        time.sleep(1.0)
        running = _with_arg(f"sleep\0{marker}".encode())
        assert len(running) <= MAX_PER_SERVICE, (
            f"{len(running)} spawned commands alive for one service (cap {MAX_PER_SERVICE})")
    finally:
        for pid in _with_arg(f"sleep\0{marker}".encode()) + _with_arg(marker.encode()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# -- the command start rate is per service: over services, the root master forks without bound


@pytest.mark.process
def test_command_starts_are_bounded_over_all_services(serve, tmp_path: Path,
                                                      public_dir: Path) -> None:
    services = 8
    count = public_dir / "count"
    count.write_text("")
    count.chmod(0o666)
    _rules(tmp_path, "", f"ALL: ALL: spawn echo >> {count}\n")
    conf = "".join(f"127.0.9.{k + 1}:0 on socktype=stream, wait=no, user={U}, exec=/bin/cat, "
                   f"args=svc{k};\n" for k in range(services))
    server: Server = serve(conf, "--tcp-wrappers", "--tcp-wrappers-dir", str(tmp_path))
    targets = [(f"127.0.9.{k + 1}", server.port(k)) for k in range(services)]
    seconds = 4.0
    began = time.monotonic()
    i = 0
    while time.monotonic() - began < seconds:
        for target in targets:  # about 100 a second per service
            with socket.socket() as sock, contextlib.suppress(OSError):
                sock.bind((f"127.0.2.{1 + i % 250}", 0))
                sock.connect(target)
            i += 1
        time.sleep(0.01)
    elapsed = time.monotonic() - began
    time.sleep(1.0)  # the last commands finish
    started = len(count.read_text())
    assert started <= MAX_STARTS_PER_SECOND_TOTAL * (elapsed + 1), (
        f"{started} commands in {elapsed:.1f} s over {services} services: "
        f"{started / elapsed:.0f} forks of the root master a second")


# -- twisted connections are not instances: one source takes every slot ---------------------


@pytest.mark.process
@pytest.mark.parametrize("mode", MODES)
def test_one_source_cannot_hold_every_twist_slot(serve, tmp_path: Path, mode: str) -> None:
    _rules(tmp_path, "cat: ALL: twist /bin/cat\n", "")
    server: Server = serve(f"127.0.0.1:0 on socktype=stream, wait=no, user={U}, exec=/bin/cat, "
                           "args=cat, max_child=4, max_child_per_ip=2;\n",
                           "--tcp-wrappers", "--tcp-wrappers-dir", str(tmp_path), mode=mode)
    port = server.port()
    held: list[socket.socket] = []
    try:
        for _ in range(MAX_PER_SERVICE + 8):
            sock = socket.socket()
            sock.settimeout(5)
            sock.bind(("127.0.0.66", 0))
            sock.connect(("127.0.0.1", port))
            held.append(sock)
        time.sleep(1.0)
        with socket.socket() as other:
            other.settimeout(10)
            other.bind(("127.0.0.77", 0))
            other.connect(("127.0.0.1", port))
            other.sendall(b"legit")
            other.shutdown(socket.SHUT_WR)
            got = b""
            with contextlib.suppress(OSError):
                while chunk := other.recv(100):
                    got += chunk
        assert got == b"legit", "another client is refused: one source holds every slot"
    finally:
        for sock in held:
            sock.close()


# -- a judged datagram service drains one source every DGRAM_NAME_RETRY --------------------



@pytest.mark.process
@pytest.mark.root
def test_a_burst_of_new_datagram_sources_does_not_lock_out_a_known_client(
        serve, tmp_path: Path, staged_programs: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    import sys
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare (a mount namespace for /etc/resolv.conf)")
    prog = staged_programs / "udp_wait_server.py"  # answers until 0.3 s without a datagram
    # A DNS server that refuses at once (nothing on 127.0.0.54:53): a lookup of an
    # address /etc/hosts lacks fails in milliseconds, whatever the machine's resolver.
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.54\noptions timeout:1 attempts:1\n")
    wrapper = tmp_path / "nspython"
    wrapper.write_text(
        "#!/bin/sh\nexec unshare --mount --propagation private /bin/sh -c "
        f"'mount --bind {resolv} /etc/resolv.conf && exec \"$0\" \"$@\"' {sys.executable} "
        "\"$@\"\n")
    wrapper.chmod(0o755)
    _rules(tmp_path, "udpok: LOCAL\n", "udpok: ALL\n")  # LOCAL: the rule needs a name
    monkeypatch.setattr(sys, "executable", str(wrapper))
    server: Server = serve(f"127.0.0.1:0 dgram udp wait {U} {prog} udpok 0.3\n",
                           "--tcp-wrappers", "--tcp-wrappers-dir", str(tmp_path))
    monkeypatch.undo()
    port = server.port()

    def served_in(timeout: float) -> float | None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            sock.settimeout(timeout)
            began = time.monotonic()
            sock.sendto(b"q", ("127.0.0.1", port))
            try:
                sock.recvfrom(100)
            except TimeoutError:
                return None
            return time.monotonic() - began

    assert served_in(30) is not None  # localhost's name is now cached
    time.sleep(0.6)  # the program has left
    # Before the fix each new source cost at least 50 ms (100: 5 s, measured 5.1 s); now
    # its name's answer wakes the service. (More sources would overflow the socket's
    # receive buffer, and the kernel would drop localhost's datagram.)
    sources = 100
    for i in range(sources):  # one datagram each from 100 new sources
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((f"127.6.{i // 250}.{1 + i % 250}", 0))
            sock.sendto(b"f", ("127.0.0.1", port))
    took = served_in(60)
    assert took is not None and took < 4.0, (
        f"localhost served {took} s after {sources} datagrams from new sources")


# -- a client's host name against a multi-star pattern: backtracking in the root master -------


def test_wildcard_match_is_linear_in_a_hostile_name() -> None:
    from poolinetd.admission import tcpwrappers as tw

    name = "a." * 125 + "zz"  # 252 bytes of host-name characters, many dots, no match
    began = time.perf_counter()
    # Six stars: a backtracking match needs minutes on this name (five took 2.4 s);
    # a linear one well under a millisecond. The bound leaves a slow machine room.
    assert not tw._wildcard(name, "*.*.*.*.*.*.example.com")
    assert tw._wildcard("x.y.z.w.v.u.example.com", "*.*.*.*.*.*.example.com")
    took = time.perf_counter() - began
    assert took < 1.0, f"{took * 1000:.0f} ms for one match in the master's loop"
