"""Answering a datagram built-in on one bound socket, behind the loop guard.

Touches the OS (recvmsg/sendto on the socket it is given). Used by workers
on a lent socket and by classic mode in a privilege-dropped child: whoever
calls it answers with its own credentials, so it must already run as the
service's user.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from socket import socket

from poolinetd.builtins import internal, records
from poolinetd.config.spec import Service
from poolinetd.net import netmatch
from poolinetd.observe import log

DGRAM_BATCH = 64  # datagrams per on_readable(): a flood cannot starve the rest of a loop
_GUARD_LOG_INTERVAL = 60.0


class DgramResponder:
    """Answers built-in ``service.internal`` on non-blocking datagram socket ``sock``.

    Does not own ``sock``. A request is answered whole or not at all: a
    datagram longer than the socket's SO_SNDBUF (the largest reply it could
    send; only unix datagram clients can send one, UDP's limit is 64 KiB) is
    dropped unanswered, never echoed cut. Refusals (loop guard, oversize) are
    logged at most once per interval, with a count.
    """

    def __init__(self, sock: socket, service: Service, internal_ports: frozenset[int],
                 clock: Callable[[], float] = time.monotonic) -> None:
        assert service.internal is not None
        self.sock = sock
        self.service = service
        self.internal_ports = internal_ports
        self.clock = clock
        self.refused = 0
        self.last_guard_log = -_GUARD_LOG_INTERVAL
        self.limit = records.send_limit(sock)
        self.lists = bool(service.only_from or service.no_access)

    def on_readable(self) -> bool:
        """Answer up to DGRAM_BATCH datagrams: True if the socket is drained (EAGAIN),
        False if the batch bound stopped it with datagrams possibly still queued
        (a level-triggered selector reports the socket again)."""
        name = self.service.internal
        assert name is not None
        for _ in range(DGRAM_BATCH):
            got = records.recv_datagram(self.sock, self.limit)
            if got is records.Status.AGAIN:
                return True
            if isinstance(got, records.Status):
                continue  # an error queued on the socket (e.g. ICMP unreachable), now cleared
            data, addr = got
            if isinstance(addr, tuple):
                why = internal.loop_guard(addr[1], self.internal_ports)
                if why is None and self.lists:  # the access lists, per datagram
                    why = netmatch.peer_access_reason(self.service.only_from,
                                                      self.service.no_access, addr[0]) or None
                if why is not None:
                    self._refused(f"{addr[0]} {addr[1]}", why)
                    continue
            elif not addr:
                continue  # a unix client with no bound address cannot be answered
            if data is None:
                self._refused(_peer(addr), f"datagram longer than {self.limit} bytes")
                continue
            reply = internal.answer(name, data, time.time())
            if reply is not None:
                try:
                    self.sock.sendto(reply, addr)
                except OSError:
                    continue
        return False

    def _refused(self, peer: str, why: str) -> None:
        self.refused += 1
        now = self.clock()
        if now - self.last_guard_log >= _GUARD_LOG_INTERVAL:
            log.warning("dgram_refused", service=self.service.name, pid=os.getpid(),
                        peer=peer, reason=why, refused_since_last=self.refused)
            self.refused = 0
            self.last_guard_log = now


def _peer(addr: records.Address) -> str:
    if isinstance(addr, tuple):
        return f"{addr[0]} {addr[1]}"
    return str(addr)
