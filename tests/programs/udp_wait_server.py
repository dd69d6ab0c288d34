#!/usr/bin/env python3
"""A tftpd-like ``dgram udp wait`` server for tests.

inetd's contract: the bound UDP socket is on fd 0. Answer every datagram
with "PID UID DATA" until no datagram arrives for IDLE seconds (argv[1],
default 0.5), then exit, as tftpd does.
"""

import os
import socket
import sys

idle = float(sys.argv[1]) if len(sys.argv) > 1 else 0.5
sock = socket.socket(fileno=0)
sock.settimeout(idle)
while True:
    try:
        data, peer = sock.recvfrom(2048)
    except TimeoutError:
        break
    sock.sendto(f"{os.getpid()} {os.getuid()} ".encode() + data, peer)
sock.detach()
