#!/usr/bin/env python3
"""A ``stream tcp wait`` server for tests: accept one connection on the listening
socket it gets as fd 0, echo one message with its pid, and exit."""

import os
import socket

listener = socket.socket(fileno=0)
conn, _ = listener.accept()
data = conn.recv(1024)
conn.sendall(f"{os.getpid()} ".encode() + data)
conn.close()
listener.detach()
