"""pyecho: the smallest one-process Python epoll echo server (a benchmark reference only).

Usage: python pyecho.py  -- binds 127.0.0.1 on a free port, prints the port, serves
echo until killed (or 600 s). No limits, no privilege drop, no timeouts: it
answers "how fast is one Python process that accepts and echoes by itself on
this machine", against the C server (cecho.c) and poolinetd's master + worker.
"""

import select
import socket
import sys
import time

listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(4096)
listener.setblocking(False)
print(listener.getsockname()[1], flush=True)
poller = select.epoll()
poller.register(listener.fileno(), select.EPOLLIN)
conns: dict[int, socket.socket] = {}
stop_at = time.monotonic() + 600
while time.monotonic() < stop_at:
    for fd, _ in poller.poll(1.0):
        if fd == listener.fileno():
            for _ in range(64):
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    break
                conn.setblocking(False)
                conns[conn.fileno()] = conn
                poller.register(conn.fileno(), select.EPOLLIN)
            continue
        conn = conns[fd]
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            continue
        except OSError:
            data = b""
        if data:
            try:
                conn.send(data)  # 64-byte requests: always fits an empty send buffer
            except OSError:
                data = b""
        if not data:
            poller.unregister(fd)
            del conns[fd]
            conn.close()
sys.exit(0)
