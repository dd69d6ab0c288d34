#!/usr/bin/env python3
"""For activation tests: call activation.listen_fds, print one JSON line describing what it
got, then (with --serve) answer one client on every passed socket with its name and exit.

The line: {"pid", "uid", "env" (LISTEN_* left over), "sockets" (PassedSocket fields),
"cloexec" (per fd), "open_fds" (all fds open after listen_fds)}.
"""

import dataclasses
import fcntl
import json
import os
import socket
import sys

sys.path.insert(0, os.environ.get("POOLINETD_SRC", "."))
from poolinetd.ops import activation

passed = activation.listen_fds(os.environ)
report = {
    "pid": os.getpid(),
    "uid": os.getuid(),
    "env": {k: v for k, v in os.environ.items() if k.startswith("LISTEN_")},
    "sockets": [dataclasses.asdict(p) for p in passed],
    "cloexec": [bool(fcntl.fcntl(p.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC) for p in passed
                if p.is_open],
    "open_fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),
}
print(json.dumps(report), flush=True)

if "--serve" in sys.argv:
    for p in passed:
        sock = socket.socket(fileno=p.fd)
        if p.socket_type == socket.SOCK_DGRAM:
            data, peer = sock.recvfrom(1024)
            sock.sendto(p.name.encode() + b" " + data, peer)
        else:
            conn, _ = sock.accept()
            with conn:
                conn.sendall(p.name.encode() + b" " + conn.recv(1024))
        sock.close()
