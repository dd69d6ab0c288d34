#!/usr/bin/env python3
"""A tftpd-style ``dgram udp wait`` program for benchmarks/dgram.py: the bound socket is
on fd 0 (inetd's contract); answer the first datagram with itself and exit, so every
request costs the inetd a whole wait cycle (launch, lend, reap, poll again).
Gives up after 5 s without a datagram."""

import socket

sock = socket.socket(fileno=0)
sock.settimeout(5.0)
try:
    data, peer = sock.recvfrom(2048)
    sock.sendto(data, peer)
except TimeoutError:
    pass
sock.detach()
