"""Built-ins on a running server: fairness under a blaster, whole messages on unix sockets.

Each attack of issue 13 (items 8 and 11) against a real poolinetd on
loopback, in both modes where the mode serves the socket type.
"""

from __future__ import annotations

import select
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TEST_USER, wait_until

pytestmark = pytest.mark.process
U = TEST_USER
MODES = ["pool", "classic"]

# A full-duplex client: sends 1 MiB chunks until its stdin closes while a thread
# reads the echo back; then prints "sent received all-bytes-right".
BLASTER = r"""
import socket, sys, threading
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
sock.connect(("127.0.0.1", int(sys.argv[1])))
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
got = [0, True]
def recv():
    while data := sock.recv(1 << 20):
        got[0] += len(data)
        got[1] = got[1] and data.count(b"b") == len(data)
reader = threading.Thread(target=recv)
reader.start()
chunk, sent = b"b" * (1 << 20), 0
while not stop.is_set():
    sock.sendall(chunk)
    sent += len(chunk)
    if sent == 64 << 20:
        sys.stdout.write("blasting\n"); sys.stdout.flush()
sock.shutdown(socket.SHUT_WR)
reader.join()
print(sent, got[0], got[1])
"""


def _recv(sock: socket.socket, size: int = 1 << 20, timeout: float = 30.0) -> bytes:
    """One read (one message on seqpacket), or fail after ``timeout`` seconds."""
    ready, _, _ = select.select([sock], [], [], timeout)
    assert ready, f"nothing to read within {timeout}s"
    return sock.recv(size)


def test_an_echo_blaster_does_not_starve_the_other_clients_of_its_worker(serve) -> None:
    # pool_max 1: the blaster and the interactive client share the one worker.
    server = serve(f"127.0.0.1:0 stream tcp nowait {U} internal echo\n", "--pool-max", "1")
    port = server.port()
    blaster = subprocess.Popen([sys.executable, "-c", BLASTER, str(port)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert blaster.stdout is not None
        assert blaster.stdout.readline() == b"blasting\n"  # 64 MiB in: at full speed
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            for i in range(100):
                msg = b"round trip %d\n" % i
                sock.sendall(msg)
                got = b""
                while len(got) < len(msg):
                    data = _recv(sock, 64)
                    assert data, "the echo connection closed"
                    got += data
                assert got == msg
        assert blaster.poll() is None  # the 100 round trips happened while it blasted
        out, _ = blaster.communicate(b"", timeout=60)
    finally:
        if blaster.poll() is None:
            blaster.kill()
            blaster.communicate()
    sent, received, right = out.split()
    assert int(sent) >= 64 << 20 and sent == received and right == b"True"
    assert len(server.workers()) == 1


@pytest.mark.parametrize("mode", MODES)
def test_seqpacket_echo_keeps_big_and_empty_messages_whole(serve, public_dir: Path,
                                                           mode: str) -> None:
    path = public_dir / "echo.seq"
    server = serve(f"{path} seqpacket unix nowait {U} internal echo\n", mode=mode)
    big = bytes(range(256)) * 400  # 102,400 bytes: the old code cut it to 64 KiB
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        for msg in (b"first", b"", big, b"", b"last"):
            sock.send(msg)
            assert _recv(sock) == msg  # the empty one came back; it did not reset anything
        for msg in (b"a", b"bb", b"ccc"):
            sock.send(msg)
        assert [_recv(sock) for _ in range(3)] == [b"a", b"bb", b"ccc"]  # boundaries kept
        sock.send(b"")
        sock.shutdown(socket.SHUT_WR)
        assert _recv(sock) == b""  # the echo of the empty message...
        assert _recv(sock) == b""  # ...then EOF
    assert server.proc.poll() is None
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("mode", MODES)
def test_an_empty_seqpacket_message_does_not_end_chargen(serve, public_dir: Path,
                                                         mode: str) -> None:
    path = public_dir / "chargen.seq"
    serve(f"{path} seqpacket unix nowait {U} internal chargen\n", mode=mode)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        assert _recv(sock)
        sock.send(b"")  # the old code took this for EOF and closed the connection
        for _ in range(200):  # more than the socket buffers held when it was sent
            assert len(_recv(sock)) == 32 * 74


@pytest.mark.parametrize("mode", MODES)
def test_unix_datagram_echo_answers_whole_or_not_at_all(serve, public_dir: Path,
                                                        mode: str) -> None:
    path = public_dir / "echo.dg"
    server = serve(f"{path} dgram unix wait {U} internal echo\n", mode=mode)
    path.chmod(0o666)
    client_path = public_dir / "client.dg"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
        client.bind(str(client_path))
        client_path.chmod(0o666)  # the reply comes from the service's user
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 << 20)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2 << 20)
        client.settimeout(30)
        big = b"d" * 150_000  # over 64 KiB: the old code answered its first 65,536 bytes
        client.sendto(big, str(path))
        assert _recv(client, 1 << 21) == big
        huge = b"h" * 1_000_000  # more than the server's socket could send back in one piece
        client.sendto(huge, str(path))
        client.sendto(b"after", str(path))
        assert _recv(client, 1 << 21) == b"after"  # the huge one was dropped, not cut
        client.sendto(b"", str(path))
        assert _recv(client) == b""
    wait_until(lambda: "datagram longer than" in server.log(), 10, "the refusal in the log")


def test_a_seqpacket_message_too_long_to_echo_ends_the_connection_and_says_why(
        serve, public_dir: Path) -> None:
    path = public_dir / "echo.seq"
    server = serve(f"{path} seqpacket unix nowait {U} internal echo\n", "--log-connections")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        sock.settimeout(30)
        sock.connect(str(path))
        sock.send(b"fine")
        assert _recv(sock) == b"fine"
        sock.send(b"H" * (2 << 20))  # more than the worker's socket can send back at once
        try:  # the connection ends (EOF, or a reset if input was left unread)...
            rest = _recv(sock)
        except ConnectionResetError:
            rest = b""
        assert rest == b""  # ...instead of a reply cut to 64 KiB, as before
    wait_until(lambda: "status=message_too_big" in server.log(), 10, "the conn_end line")
