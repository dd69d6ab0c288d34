"""pyhandoff: poolinetd's shape in the least Python that can do it (a benchmark reference).

Usage: python pyhandoff.py  -- binds 127.0.0.1 on a free port, prints the port, serves
echo until killed (or 600 s).

Two processes joined by a SOCK_SEQPACKET socketpair, as tools/handoff.c but in
Python: the first accepts (up to 64 per wakeup) and passes what one wakeup gave
it, up to 16 connections per SCM_RIGHTS message, then closes its copies; the
second echoes every connection in its own epoll loop and closes it at the
client's EOF. No admission, no accounting, no DONE messages, no timeouts, no
privilege drop. It answers "how fast can Python go in this shape on this
machine": poolinetd's pool against it is what poolinetd's own work per
connection costs, and it against c-handoff is what Python costs.
"""

import array
import os
import select
import signal
import socket
import sys
import time

BATCH = 16  # as poolinetd's wire.MAX_CONN_BATCH
LIFETIME_S = 600


def worker(channel: socket.socket) -> None:
    poller = select.epoll()
    chan_fd = channel.fileno()
    poller.register(chan_fd, select.EPOLLIN)
    space = socket.CMSG_SPACE(BATCH * array.array("i").itemsize)
    while True:
        for fd, _ in poller.poll():
            if fd == chan_fd:
                _, ancdata, _, _ = channel.recvmsg(16, space)
                if not ancdata:
                    return  # the other process is gone
                for _, _, data in ancdata:
                    fds = array.array("i")
                    fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
                    for conn in fds:
                        poller.register(conn, select.EPOLLIN)
                continue
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                try:
                    os.write(fd, data)  # 64-byte requests: always fits an empty send buffer
                    continue
                except OSError:
                    pass
            poller.unregister(fd)
            os.close(fd)


def main() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    listener.setblocking(False)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    if os.fork() == 0:
        listener.close()
        ours.close()
        signal.alarm(LIFETIME_S)
        worker(theirs)
        os._exit(0)
    theirs.close()
    print(listener.getsockname()[1], flush=True)
    poller = select.epoll()
    poller.register(listener.fileno(), select.EPOLLIN)
    accept = listener._accept  # the bare fd: no socket object per connection
    stop_at = time.monotonic() + LIFETIME_S
    while time.monotonic() < stop_at:
        if not poller.poll(1.0):
            continue
        batch: list[int] = []
        for _ in range(64):
            try:
                fd, _ = accept()
            except BlockingIOError:
                break
            batch.append(fd)
            if len(batch) == BATCH:
                send(ours, batch)
        if batch:
            send(ours, batch)


def send(channel: socket.socket, fds: list[int]) -> None:
    """One SCM_RIGHTS message for ``fds``, then close our copies (and empty the list)."""
    channel.sendmsg([b"C"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    for fd in fds:
        os.close(fd)
    fds.clear()


if __name__ == "__main__":
    main()
    sys.exit(0)
