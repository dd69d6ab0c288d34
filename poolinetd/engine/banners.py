"""xinetd's banners (``banner``, ``banner_success``, ``banner_fail``) sent to a client.

Touches the OS: one non-blocking send on a connection the engine holds. The
bytes were read at load (config/xinetd_banner.py); the fd stays the caller's.
"""

from __future__ import annotations

import socket


def send_banner(fd: int, family: int, banner: bytes) -> None:
    """An xinetd banner (banner, banner_success, banner_fail; at most BANNER_MAX bytes):
    one non-blocking send into the send buffer, so the master never waits on a client
    (what does not fit is dropped, a reset ignored); ``fd`` stays open."""
    sock = socket.socket(family, socket.SOCK_STREAM, 0, fileno=fd)
    try:
        sock.send(banner, socket.MSG_DONTWAIT)
    except OSError:
        pass
    finally:
        sock.detach()
