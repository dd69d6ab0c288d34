"""Hostile review, round four (after issue 21): each attack made for real, on loopback.

Every test asserts the safe outcome and failed on the code before its fix. The
worker attacks become a taken-over worker the way tests/test_attack_worker.py
does (``pidfd_getfd`` of the worker's own descriptors).
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import time
from pathlib import Path

import orjson
import pytest
from conftest import (
    IS_ROOT,
    TEST_USER,
    children_of,
    lingering_tcp,
    tcp_exchange,
    udp_exchange,
    wait_until,
)
from test_attack_worker import steal_channel, steal_fd, steal_upward, worker_fds, worker_of

from poolinetd.pool import wire

needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (pidfd_getfd of a worker)")


# -- a worker's LOG line cannot rename or re-level itself in the JSON log -------------------


@pytest.mark.root
@needs_root
def test_a_worker_log_line_cannot_override_the_json_event_level_or_time(serve) -> None:
    """The JSON formatter spread a line's fields over its own keys, so a worker's LOG
    with fields ``event``, ``level`` and ``ts`` came out as the master's ``stopped``
    at level error with a time of the worker's choosing. Now those keys stay the
    formatter's and the worker's values are dropped."""
    server = serve(f"127.0.0.1:0 stream tcp nowait {TEST_USER} internal echo\n",
                   "--log-format", "json")
    pid = worker_of(server, "echo")
    up = steal_upward(pid)
    try:
        os.write(up, wire.frame(wire.encode_log(20, "conn_end", {
            "event": "stopped", "level": "error", "ts": 0.0, "peer": "forged"})))
    finally:
        os.close(up)
    wait_until(lambda: "forged" in server.log(), 20, "the worker's line")
    docs = [orjson.loads(line) for line in server.log().splitlines()
            if line.startswith("{") and "forged" in line]
    assert len(docs) == 1, docs
    doc = docs[0]
    assert (doc["event"], doc["level"], doc["pid"]) == ("conn_end", "info", pid), doc
    assert doc["ts"] > 1e9, doc
    assert doc["service"] == "echo:0/tcp"
    assert not any(orjson.loads(line).get("event") == "stopped"
                   for line in server.log().splitlines() if line.startswith("{"))


# -- a lent datagram socket left shared-bindable (SO_REUSEADDR) --------------------------------


@pytest.mark.root
@needs_root
def test_a_lent_datagram_socket_left_reusable_is_replaced(serve) -> None:
    """A taken-over datagram worker sets SO_REUSEADDR on its lent socket and dies. Any
    local user (any uid: only SO_REUSEPORT checks the owner) can then bind the same
    address with SO_REUSEADDR too, and the kernel gives it the service's datagrams.
    Before the fix the master lent the same socket on (the tamper check saw nothing)
    and the thief got the echo's datagrams; now it serves on a fresh socket, which the
    thief's bind cannot share."""
    server = serve(f"127.0.0.1:0 dgram udp wait {TEST_USER} internal echo\n")
    port = server.port(0)

    assert udp_exchange(port, b"one") == b"one"
    pid = wait_until(lambda: next(iter(server.workers()), None), 20, "the dgram worker")
    assert isinstance(pid, int)
    lent = None
    for fd, target in worker_fds(pid).items():
        if not target.startswith("socket:"):
            continue
        sock = socket.socket(fileno=steal_fd(pid, fd))
        if sock.type == socket.SOCK_DGRAM and sock.family == socket.AF_INET:
            lent = sock
            break
        sock.close()
    assert lent is not None
    with lent:
        lent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    os.kill(pid, 9)
    wait_until(lambda: pid not in server.workers(), 20, "the worker gone")
    # The loan ends when the master sees the worker go; the next datagram lends it again.
    wait_until(lambda: udp_exchange(port, b"probe", timeout=0.5) == b"probe", 10,
               "served again")
    thief = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with thief:
        thief.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            thief.bind(("127.0.0.1", port))
        except OSError:
            stolen = False  # the fresh socket cannot be shared: the attack fails here
        else:
            thief.settimeout(0.5)
            for _ in range(5):
                udp_exchange(port, b"mine?", timeout=0.3)
            try:
                thief.recvfrom(100)
                stolen = True
            except TimeoutError:
                stolen = False
        assert not stolen
    assert udp_exchange(port, b"two") == b"two"


# -- a wait program shuts its lent listener down -------------------------------------------


@pytest.mark.root
@needs_root
def test_a_lent_listener_shut_down_by_a_wait_program_is_replaced(serve, public_dir) -> None:
    """A ``wait`` program gets the service's very listener on fd 0. The first one run
    here shuts it down (``shutdown(SHUT_RD)`` on a listening TCP socket stops it
    listening: clients get a reset) and exits. Before the fix the master kept that
    dead socket (the tamper check looked only for filters and connected datagram
    sockets): the service refused every client while status said serving. Now the
    master sees it no longer listens and serves on a fresh socket."""
    marks = public_dir / "marks"
    marks.mkdir()
    marks.chmod(0o777)
    script = public_dir / "shut.py"
    script.write_text(
        "#!/usr/bin/python3\n"
        "import os, socket\n"
        "lst = socket.socket(fileno=0)\n"
        f"mark = {str(marks / 'done')!r}\n"
        "if not os.path.exists(mark):\n"
        "    open(mark, 'w').close()\n"
        "    lst.shutdown(socket.SHUT_RD)\n"
        "    raise SystemExit(0)\n"
        "conn, _ = lst.accept()\n"
        "conn.sendall(b'served\\n')\n"
        "conn.close()\n")
    script.chmod(0o755)
    server = serve(f"127.0.0.1:0 stream tcp wait {TEST_USER} {script} shut\n")
    port = server.port(0)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as first:
        first.settimeout(5)
        with contextlib.suppress(OSError):  # program 1 shuts the listener down: reset
            first.recv(10)
    wait_until(lambda: (marks / "done").exists(), 20, "the first program ran")

    def served() -> bool:
        try:
            return tcp_exchange(port, b"", timeout=2) == b"served\n"
        except OSError:
            return False
    wait_until(served, 10, "a client served after the listener was shut down")
    assert "lent_socket_tampered" in server.log()


# -- a local user wedges the closer, and with it every unix-socket service --------------------


def _nested_lingering(listeners: list[socket.socket]) -> socket.socket:
    """A unix socket whose receive queue holds the last reference to a TCP socket with a
    linger time of an hour and unsent data: whoever closes it last waits out that
    linger in close(). The closer resets the linger of what it is given, but cannot
    reach a descriptor nested in the queue of one it was given."""
    tcp = lingering_tcp(listeners, 3600)
    carrier, holder = socket.socketpair()
    carrier.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                              array.array("i", [tcp.fileno()]))])
    carrier.close()
    tcp.close()  # the message in holder's queue is its last reference now
    return holder


def _unix_echo(path: str, timeout: float) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(b"ping")
        sock.shutdown(socket.SHUT_WR)
        return sock.recv(10)


@pytest.mark.root
@needs_root
def test_a_wedged_closer_is_replaced_and_unix_services_keep_serving(serve, tmp_path) -> None:
    """A local user passes, on 80 connections to a unix service that refuses them, a unix
    socket whose queue holds a lingering TCP socket: each closer thread that closes
    one blocks for the linger time (an hour), the closer's 64 threads are all taken,
    it stops receiving, and what the master disposes of piles up. Before the fix,
    once 4,096 waited the master stopped accepting on every unix-socket service for
    as long as the attacker liked (an unrelated unix echo: no answer in 8 s), and
    even once the closer caught up the unix listeners stayed unpolled. Now a closer
    that takes nothing for closer.STALL_KILL seconds is killed (its blocked closes
    end with it) and replaced, and the unix services poll again."""
    daytime = str(tmp_path / "daytime.sock")
    proxied = str(tmp_path / "proxied.sock")
    echo = str(tmp_path / "echo.sock")
    server = serve(f"{daytime} stream unix nowait root internal daytime\n"
                   f"{proxied} on socktype=stream, protocol=unix, user={TEST_USER}, "
                   "args=echo, proxy_protocol=yes;\n"
                   f"{echo} stream unix nowait {TEST_USER} internal echo\n")
    assert _unix_echo(echo, 5) == b"ping"
    listeners: list[socket.socket] = []
    try:
        for _ in range(80):  # refused in the preamble stage: the master waits for the bytes
            holder = _nested_lingering(listeners)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.settimeout(10)
                client.connect(proxied)
                client.sendmsg([b"GARBAGE\r\n"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                   array.array("i", [holder.fileno()]))])
                holder.close()  # (no EOF comes back: the closer is wedged after 64 of them)
        began = time.monotonic()
        flood = 0
        while time.monotonic() - began < 20 and flood < 6000:  # what the master disposes of
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.settimeout(5)  # (a busy machine is slow, a backed-up master silent)
                try:
                    client.connect(daytime)
                    client.recv(100)
                except OSError:
                    break  # no longer accepted: the master is backed up
            flood += 1
        waited = time.monotonic()
        answer = b""
        with contextlib.suppress(OSError):
            answer = _unix_echo(echo, 8)
        assert answer == b"ping", (flood, round(time.monotonic() - waited, 1))
    finally:
        for listener in listeners:
            listener.close()
    wait_until(lambda: "closer_stalled" in server.log(), 30, "closer_stalled in the log")


# -- a local user freezes the master through the preamble stage's own reads -----------------


@pytest.mark.root
@needs_root
@pytest.mark.parametrize("header", [b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\nhello",
                                    b"PROXY TCP4 "], ids=["complete", "partial"])
def test_preamble_bytes_carrying_descriptors_never_freeze_the_master(
        serve, tmp_path, header: bytes) -> None:
    """The preamble stage reads (consumes) a unix client's PROXY header itself. The
    descriptors attached to those bytes (SCM_RIGHTS) are then detached in the reader:
    recv() without room for them releases them in the root master, and a TCP socket
    with a linger time makes that release wait it out. Before the fix one connection
    froze the master, and every service, for the linger time (20 s: a TCP echo took
    about 20 s); the refusal path (test_attack_unix_fds) never read the bytes. Now
    such bytes are read with room for the descriptors, which go to the closer, and the
    client is refused."""
    unix = str(tmp_path / "proxied.sock")
    server = serve(f"{unix} on socktype=stream, protocol=unix, user={TEST_USER}, "
                   "args=echo, proxy_protocol=yes;\n"
                   f"127.0.0.1:0 stream tcp nowait {TEST_USER} internal echo\n")
    echo = server.port(1)
    listeners: list[socket.socket] = []
    try:
        delays = []
        for _ in range(2):
            tcp = lingering_tcp(listeners, 20)
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.settimeout(10)
            client.connect(unix)
            client.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                       array.array("i", [tcp.fileno()]))])
            tcp.close()  # the message's reference is the last one
            time.sleep(0.3)  # the master reads the header
            began = time.monotonic()
            assert tcp_exchange(echo, b"ping", timeout=30) == b"ping"
            delays.append(time.monotonic() - began)
            client.close()
        assert max(delays) < 3.0, delays
    finally:
        for listener in listeners:
            listener.close()


@pytest.mark.root
@needs_root
def test_a_refused_unix_datagram_carrying_a_descriptor_never_freezes_the_master(
        serve, tmp_path) -> None:
    """The master judges the datagram that would start a datagram ``wait`` program and
    drops a refused one by reading it. On a unix datagram socket that read, without
    room for the descriptors the datagram carries, released them in the root master:
    a lingering TCP socket froze every service (before the fix a TCP echo took about
    20 s). The first datagram starts /bin/true, which leaves it unread; the next
    start is over max_spawn_per_min, so the master drops it."""
    unix = str(tmp_path / "dgram.sock")
    server = serve(f"{unix} dgram unix wait.1 {TEST_USER} /bin/true true\n"
                   f"127.0.0.1:0 stream tcp nowait {TEST_USER} internal echo\n")
    os.chmod(unix, 0o666)
    echo = server.port(1)
    listeners: list[socket.socket] = []
    try:
        tcp = lingering_tcp(listeners, 20)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
            client.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                     array.array("i", [tcp.fileno()]))], 0, unix)
        tcp.close()
        time.sleep(1.0)  # /bin/true runs and exits; the master judges the datagram again
        began = time.monotonic()
        assert tcp_exchange(echo, b"ping", timeout=30) == b"ping"
        assert time.monotonic() - began < 3.0
        wait_until(lambda: "service_looping" in server.log(), 20, "the datagram refused")
    finally:
        for listener in listeners:
            listener.close()


# -- a remote client makes preamble-stage eviction cost the master quadratic time ------------


def _master_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.root
@needs_root
def test_preamble_eviction_costs_the_master_little_per_connection(serve) -> None:
    """Four loopback addresses fill a PROXY service's preamble stage (4 x 256 silent
    connections); then 4,000 more addresses connect once each, silent (an IPv6 /48
    holds 65,536 sources at the default /64): each newcomer, from the lightest
    source, takes the place of the heaviest source's oldest. An
    evicted (or refused, or finished) connection stayed in the stage's deadline queue
    for its 10 s, and finding the oldest of a source scanned that queue from the front,
    so each eviction cost more than the last (before the fix: 0.21 ms of master CPU per
    connection over 4,000 of them, 0.37 ms over 12,000, growing with the rate; after:
    0.14 ms). Now each source's connections are found directly."""
    server = serve("127.0.0.1:0 on socktype=stream, protocol=tcp, user=nobody, args=echo, "
                   "proxy_protocol=yes, proxy_from=127.0.0.0/8;\n")
    port = server.port(0)
    held: list[socket.socket] = []

    def connect(source: str) -> None:
        sock = socket.socket()
        sock.bind((source, 0))
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            sock.connect(("127.0.0.1", port))
        held.append(sock)

    try:
        for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"):
            for _ in range(256):
                connect(source)
        time.sleep(1.0)  # the stage is full
        before = _master_cpu(server.pid)
        churn = 12000
        for i in range(churn):  # each from an address of its own: always the lightest
            connect(f"127.1.{i // 250}.{i % 250 + 1}")
            if len(held) > 3000:  # evicted ones are closed by the master: let ours go
                held.pop(0).close()
            if i % 200 == 0:
                time.sleep(0.05)  # stay within the backlog
        last = -1.0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until the master has caught up
            time.sleep(0.5)
            now = _master_cpu(server.pid)
            if now - last < 0.02:
                break
            last = now
        per_conn = (last - before) / churn
        assert per_conn < 0.00025, f"{per_conn * 1e3:.2f} ms of master CPU per connection"
    finally:
        for sock in held:
            sock.close()


# -- a worker claims one program for several connections -------------------------------------


@pytest.mark.root
@needs_root
def test_a_worker_naming_one_program_for_many_connections_leaks_no_slot(serve) -> None:
    """A taken-over worker says SPAWNED with the same real child for three of its
    connections, then dies. Each record became an orphan under that one pid, the last
    overwriting the others, so when the program was reaped one connection ended and
    the other two were counted forever: max_child=3 left one slot until a restart
    (before the fix: active stayed 2 with nothing running). Now a pid already claimed
    is not believed again."""
    server = serve("127.0.0.1:0 on socktype=stream, wait=no, user=nobody, exec=/bin/cat, "
                   "args=cat, max_child=3, max_child_per_ip=unlimited, pool_min=1, pool_max=1;\n")
    port = server.port(0)
    name = server.listeners[0]["service"]
    assert isinstance(name, str)
    pid = worker_of(server, "cat")
    first = socket.create_connection(("127.0.0.1", port), timeout=30)
    program = wait_until(lambda: next(iter(children_of(pid)), None), 30, "cat started")
    assert isinstance(program, int)
    os.kill(pid, 19)  # SIGSTOP: what it is sent now, the attacker reads
    channel = steal_channel(pid)
    up = steal_upward(pid)
    others = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(2)]
    ids: list[int] = []
    channel.settimeout(30)  # CI's machine is busy: the master may take a while to send
    while len(ids) < 2:
        data, fds = wire.recv(channel)
        for fd in fds:
            os.close(fd)
        ids.extend(info.conn_id for info in wire.decode(data).conns)
    try:
        for iid in ids:
            os.write(up, wire.frame(wire.encode_spawned(iid, program)))
    finally:
        os.close(up)
        channel.close()
    time.sleep(0.5)  # the master reads them
    os.kill(pid, 9)
    for sock in [first, *others]:
        sock.close()  # cat sees EOF and exits; the master reaps it (subreaper)
    wait_until(lambda: server.service_status(name)["active"] == 0, 30,
               "every connection of the dead worker ended")


# -- a local user freezes the master when it closes a unix listener -------------------------


@pytest.mark.root
@needs_root
def test_closing_a_unix_listener_with_a_poisoned_backlog_never_freezes_the_master(
        serve, tmp_path) -> None:
    """A connection still in a unix listener's backlog holds what its client sent, and
    closing the listener releases it, in whoever closes it last. The attacker waits
    until the service is full (max_child=1: the listener is not polled, its clients
    wait in the backlog), connects and sends a lingering TCP socket. A reload that
    removes the service then closed the listener in the root master: every service
    froze for the linger time (before the fix a TCP echo took about 20 s). Now the
    master's unix listeners are closed by the closer."""
    unix = str(tmp_path / "full.sock")
    tcp_line = f"127.0.0.1:0 stream tcp nowait {TEST_USER} internal echo\n"
    server = serve(f"{unix} on socktype=stream, protocol=unix, user={TEST_USER}, "
                   "args=echo, max_child=1;\n" + tcp_line)
    echo = server.port(1)
    listeners: list[socket.socket] = []
    holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    waiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        holder.settimeout(5)
        holder.connect(unix)
        holder.sendall(b"a")
        assert holder.recv(1) == b"a"  # the one slot is taken
        tcp = lingering_tcp(listeners, 20)
        waiting.connect(unix)  # in the backlog: not accepted while the service is full
        waiting.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                  array.array("i", [tcp.fileno()]))])
        tcp.close()
        waiting.close()  # its queue holds the last reference now
        server.conf.write_text(tcp_line)
        server.send_signal(1)  # SIGHUP: the unix service is removed, its listener closed
        time.sleep(0.5)
        began = time.monotonic()
        assert tcp_exchange(echo, b"ping", timeout=30) == b"ping"
        assert time.monotonic() - began < 3.0
        wait_until(lambda: "reloaded" in server.log(), 20, "the reload")
    finally:
        holder.close()
        waiting.close()
        for listener in listeners:
            listener.close()


# -- a worker floods its upward pipe with messages the master must decode --------------------


@pytest.mark.root
@needs_root
def test_a_worker_flooding_its_pipe_costs_the_master_a_bounded_share(serve) -> None:
    """A taken-over worker writes tiny LOG frames (an event no worker logs) as fast as
    the pipe takes them. The LOG budget bounds what is written, not what is decoded:
    the master read 16 KiB (2,000 frames) at every turn of its loop. Before the fix it
    spent about 90 % of a core on them for as long as the flood lasted (another
    service's median answer went from 0.3 to 24 ms; measured 3.77 s of CPU in 4 s).
    Now a service's workers are read for at most handles.READ_RATE messages a second;
    past that the one that flooded is not read for a while (its writes wait): 0.69 s
    in 4 s."""
    server = serve(f"127.0.0.1:0 stream tcp nowait {TEST_USER} internal echo\n"
                   f"127.0.0.1:0 stream tcp nowait {TEST_USER} internal discard\n")
    pid = worker_of(server, "echo")
    up = steal_upward(pid)
    frame = wire.frame(wire.encode_log(20, "zz", {}))
    chunk = frame * (wire.PIPE_BUF // len(frame))
    os.set_blocking(up, False)
    began = time.monotonic()
    before = _master_cpu(server.pid)
    try:
        while time.monotonic() - began < 4.0:
            try:
                os.write(up, chunk)
            except BlockingIOError:
                time.sleep(0.001)  # the pipe is full: the master is not reading it now
        spent = _master_cpu(server.pid) - before
        wall = time.monotonic() - began
    finally:
        os.close(up)
    assert spent / wall < 0.4, f"the master spent {spent:.2f} s of CPU in {wall:.2f} s"
    assert tcp_exchange(server.port(1), b"x", timeout=2) == b""  # serving
