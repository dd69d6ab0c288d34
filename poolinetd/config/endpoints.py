"""Where a service listens: its port, and the endpoints (family, address, port) it binds.

Touches the OS only through ``Lookups`` (/etc/services, host names).
``service_port`` is the one port lookup; ``endpoints`` reports each address
it cannot use to the ``SpecReport`` and leaves it out.
"""

from __future__ import annotations

import ipaddress
import os
import socket

from poolinetd.config.lookups import Lookups, attempt
from poolinetd.config.report import SpecReport
from poolinetd.config.spec import Endpoint, Protocol, ServiceSpec

_SUN_PATH_MAX = 107  # sizeof(sun_path) - 1 on Linux
# Plain ints: Endpoint stays free of the socket module's IntEnum (and compares/prints as numbers).
_AF_INET, _AF_INET6, _AF_UNIX = int(socket.AF_INET), int(socket.AF_INET6), int(socket.AF_UNIX)


def transport(spec: ServiceSpec) -> str:
    """The /etc/services protocol name of ``spec``: "udp" or "tcp"."""
    return "udp" if spec.protocol.is_udp else "tcp"


def service_port(spec: ServiceSpec, lookups: Lookups) -> int | None:
    """The port ``spec`` names: 0 for a unix socket or an RPC service, the number written,
    or its service's port in /etc/services for its protocol; None when that name is unknown
    (not reported: the caller says what an unknown name means to it)."""
    if spec.protocol.is_unix or spec.rpc is not None:
        return 0  # an RPC service binds any free port and tells rpcbind which
    if spec.service.isascii() and spec.service.isdigit():
        return int(spec.service)  # the parser checked the range
    return attempt(lookups.getservbyname, spec.service, transport(spec))


def endpoints(
    spec: ServiceSpec, port: int, lookups: Lookups, out: SpecReport
) -> tuple[Endpoint, ...]:
    """The sockets ``spec`` binds on ``port``, duplicates dropped, in the order written.

    No addresses = the protocol's wildcard; a host name becomes each of its
    addresses of the protocol's family; an address of the wrong family is reported.
    """
    proto = spec.protocol
    if proto.is_unix:
        return _unix_endpoint(spec, out)
    dual = proto in (Protocol.TCP46, Protocol.UDP46)
    six = proto in (Protocol.TCP6, Protocol.UDP6) or dual
    strict_four = proto in (Protocol.TCP4, Protocol.UDP4)
    if not spec.addresses:
        wildcard = "::" if six else "0.0.0.0"
        return (Endpoint(_AF_INET6 if six else _AF_INET, wildcard, port, not dual),)
    found: list[Endpoint] = []
    for addr in spec.addresses:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            family = _AF_INET6 if six else _AF_INET
            hosts = attempt(lookups.getaddrinfo, addr, family)
            if not hosts:
                out.report(
                    "service",
                    f"cannot resolve host {addr!r}",
                    "write a numeric address or fix the name",
                )
                continue
            found.extend(Endpoint(family, a, port, not dual) for a in hosts)
            continue
        if ip.version == 4:
            if six:
                out.report(
                    "protocol",
                    f"{addr} is IPv4 but {proto.value} listens on IPv6",
                    "use tcp/udp (or tcp4/udp4) for IPv4 addresses",
                )
                continue
            found.append(Endpoint(_AF_INET, str(ip), port))
        else:
            if strict_four:
                out.report(
                    "protocol",
                    f"{addr} is IPv6 but {proto.value} is IPv4-only",
                    "use tcp6/udp6 for IPv6 addresses",
                )
                continue
            found.append(Endpoint(_AF_INET6, str(ip), port, not dual))
    return tuple(dict.fromkeys(found))


def _unix_endpoint(spec: ServiceSpec, out: SpecReport) -> tuple[Endpoint, ...]:
    """The socket path as an endpoint; a path the kernel cannot hold is reported."""
    try:
        size = len(os.fsencode(spec.service))
    except UnicodeError:
        out.report("service", "socket path is not valid text", "rename it")
        return ()
    if size > _SUN_PATH_MAX:
        out.report(
            "service",
            f"socket path too long ({size} bytes)",
            f"at most {_SUN_PATH_MAX} bytes",
        )
    return (Endpoint(_AF_UNIX, spec.service, 0),)
