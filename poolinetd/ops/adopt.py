"""Sockets passed at start (systemd socket activation, or the old master in an upgrade).

Touches the OS: adopts passed fds as socket objects, closes the unused ones.
``Passed.take(service)`` hands the listener of each endpoint that a passed
socket matches (by what getsockname/SO_TYPE/SO_ACCEPTCONN say, never by its
name: activation.match); endpoints left over are bound by the caller as
usual. An endpoint asking for port 0 ("any free port") is matched by name
only when the sockets come from our own previous master (an upgrade), which
names each one ``SERVICE#INDEX``: it is the only way to find the port the
old master was given, and that master is trusted (it started us).

A few names are poolinetd's own, not listeners: ``poolinetd-ready`` (the
pipe the old master waits on for our ready line), ``poolinetd-control``
and ``poolinetd-metrics`` (the control and metrics sockets, taken over
as they are).

fd ownership: every passed fd is owned by ``Passed`` until taken; what no
service takes is closed by ``close_unused`` after a warning naming it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Collection, MutableMapping

from poolinetd.config.spec import Endpoint, Service
from poolinetd.observe import log
from poolinetd.ops import activation, handoff

READY_NAME = "poolinetd-ready"
CONTROL_NAME = "poolinetd-control"
METRICS_NAME = "poolinetd-metrics"
UPGRADE_ENV = "POOLINETD_UPGRADE_FROM"  # set by the old master to its pid
_OWN = (READY_NAME, CONTROL_NAME, METRICS_NAME)


def endpoint_name(service: Service, index: int) -> str:
    """The LISTEN_FDNAMES entry an old master gives endpoint ``index`` of ``service``
    (made safe for the protocol: no ':' and printable ASCII only)."""
    return handoff.clean_name(f"{service.name}#{index}")


class Passed:
    """The sockets passed to this process, waiting for the services that match them."""

    def __init__(self, passed: list[activation.PassedSocket], from_master: int = 0,
                 problem: str = "") -> None:
        self.from_master = from_master  # pid of the old master that passed them (0: systemd)
        self.problem = problem  # why LISTEN_FDS was refused ("" if it was not)
        self.own: dict[str, activation.PassedSocket] = {}
        self.free: list[activation.PassedSocket] = []
        for item in passed:
            if from_master and item.name in _OWN and item.name not in self.own:
                self.own[item.name] = item
            else:
                self.free.append(item)

    @classmethod
    def from_env(cls, environ: MutableMapping[str, str], reserved: Collection[int] = ()
                 ) -> Passed:
        """Read (and remove) LISTEN_* and the upgrade marker from ``environ``.

        Call it before opening any fd of our own (the log): an fd in the passed
        range is then one that was passed. ``reserved`` are fds inherited for
        another purpose (``--ready-fd``). A count reaching an fd that is not
        open or is reserved gives no socket and a ``problem`` saying why; the
        caller refuses to start (no fd was touched).
        """
        upgrade = environ.pop(UPGRADE_ENV, "")
        from_master = int(upgrade) if upgrade.isdigit() and int(upgrade) == os.getppid() else 0
        try:
            return cls(activation.listen_fds(environ, reserved=reserved), from_master)
        except activation.ListenFdsError as exc:
            return cls([], from_master, str(exc))

    def take(self, service: Service) -> dict[int, socket.socket]:
        """Passed listeners for ``service``'s endpoints, by endpoint index (may be partial)."""
        if not self.free:
            return {}
        stype = activation.SOCKET_TYPES.get(service.socket_type.value, -1)
        endpoints = service.key.endpoints
        wanted = [_wanted(i, ep, stype) for i, ep in enumerate(endpoints)]
        assignment, rest = activation.match(self.free, wanted)
        if self.from_master:
            for i, ep in enumerate(endpoints):
                if i in assignment or ep.port != 0:
                    continue
                for item in rest:
                    if (item.name == endpoint_name(service, i) and item.family == ep.family
                            and item.socket_type == stype and not item.problem):
                        assignment[i] = item
                        rest.remove(item)
                        break
        self.free = rest
        out = {}
        for i, item in assignment.items():
            sock = socket.socket(fileno=item.fd)
            sock.setblocking(False)
            out[i] = sock
        return out

    def own_fd(self, name: str) -> int | None:
        """The fd of one of poolinetd's own passed sockets (the caller owns it), if passed."""
        item = self.own.pop(name, None)
        return None if item is None else item.fd

    def close_unused(self) -> None:
        """Warn about and close every passed socket no service took."""
        for item in self.free:
            log.warning("passed_socket_unused", socket=item.describe(),
                        hint="no service in the config listens there")
        activation.close_unmatched(self.free)
        activation.close_unmatched(list(self.own.values()))
        self.free = []
        self.own = {}


def _wanted(index: int, ep: Endpoint, stype: int) -> activation.WantedSocket[int]:
    return activation.WantedSocket(index, ep.family, stype, ep.address, ep.port, ep.v6only)
