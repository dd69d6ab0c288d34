"""Opening and closing the listening sockets of a service.

Touches the OS: socket, bind, listen, chmod/chown of unix socket paths.
Never forks, never parses. Every socket returned is non-blocking and
close-on-exec; the caller owns it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from dataclasses import dataclass

from poolinetd.spec import Endpoint, Service, SocketType

BACKLOG = 1024  # the kernel caps it at net.core.somaxconn

_SOCKTYPES = {
    SocketType.STREAM: socket.SOCK_STREAM,
    SocketType.DGRAM: socket.SOCK_DGRAM,
    SocketType.SEQPACKET: socket.SOCK_SEQPACKET,
}


class ListenError(Exception):
    """A listener could not be opened (address in use, permission, bad path)."""


@dataclass(frozen=True, slots=True)
class Bound:
    """Where a listener actually is: the port the kernel gave for port 0."""

    family: str  # "inet", "inet6", "unix"
    address: str
    port: int

    def __str__(self) -> str:
        """As an operator writes it: ``127.0.0.1:7``, ``[::1]:7``, or the unix path."""
        if self.family == "unix":
            return self.address
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"


def family_name(family: int) -> str:
    if family == socket.AF_INET:
        return "inet"
    return "inet6" if family == socket.AF_INET6 else "unix"


def open_endpoint(service: Service, endpoint: Endpoint) -> socket.socket:
    """Bind (and for connection types, listen on) one endpoint of ``service``.

    A stale unix socket path (a socket file nobody listens on) is replaced;
    any other existing file is an error, never deleted. Raises ListenError
    naming the service and address.
    """
    stype = _SOCKTYPES.get(service.socket_type)
    if stype is None:
        raise ListenError(f"{service.name}: socket type {service.socket_type.value} not supported")
    where = f"{endpoint.address}" if endpoint.family == socket.AF_UNIX else (
        f"[{endpoint.address}]:{endpoint.port}" if endpoint.family == socket.AF_INET6
        else f"{endpoint.address}:{endpoint.port}")
    sock = socket.socket(endpoint.family, stype)
    try:
        if endpoint.family == socket.AF_UNIX:
            _clear_stale_unix(endpoint.address)
            sock.bind(endpoint.address)
            _apply_unix_perms(service, endpoint.address)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if endpoint.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(endpoint.v6only))
            sock.bind((endpoint.address, endpoint.port))
        if stype != socket.SOCK_DGRAM:
            sock.listen(BACKLOG)
        sock.setblocking(False)
    except (OSError, ListenError) as exc:
        sock.close()
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ListenError(f"{service.name}: cannot listen on {where}: {detail}") from exc
    return sock


def bound_address(sock: socket.socket) -> Bound:
    """The address a listener is really bound to (reports the port chosen for port 0)."""
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return Bound("unix", name if isinstance(name, str) else name.decode(), 0)
    return Bound(family_name(sock.family), name[0], name[1])


def close_listener(sock: socket.socket) -> None:
    """Close a listener; a unix socket's path is unlinked (only if it is still ours).

    Closing an already closed listener does nothing.
    """
    if sock.fileno() < 0:
        return
    path = None
    if sock.family == socket.AF_UNIX:
        name = sock.getsockname()
        path = name if isinstance(name, str) else None
    sock.close()
    if path:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)


def _clear_stale_unix(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.EPROTOTYPE):
            os.unlink(path)  # nobody listens: a leftover from a previous run
            return
        raise ListenError(f"{path}: {exc.strerror}") from exc
    finally:
        probe.close()
    raise ListenError(f"{path} is in use by another process")


def _apply_unix_perms(service: Service, path: str) -> None:
    """FreeBSD's ``:owner:group:mode:`` prefix; without it, owner-only (0600) like FreeBSD."""
    owner = service.socket_owner
    mode = owner.mode if owner is not None and owner.mode is not None else 0o600
    os.chmod(path, mode)
    if owner is not None and (owner.uid != -1 or owner.gid != -1):
        os.chown(path, owner.uid, owner.gid)
