"""What serves a service's connections: a program (path and argv) or a built-in, and the name
logs give the service.

Touches the OS only through ``Lookups`` (is the program executable, which
service name is a port's). Problems go to the ``SpecReport``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from poolinetd.config.endpoints import transport
from poolinetd.config.lookups import Lookups, attempt
from poolinetd.config.report import SpecReport
from poolinetd.config.spec import BUILTIN_NAMES, TCPMUX, Protocol, ServiceSpec, SocketType

# Built-ins other inetds have and poolinetd does not, for a clearer message.
_FOREIGN_BUILTINS = ("auth", "ident")
# What ``internal NAME`` may name: the table's built-ins and the tcpmux listener.
_BUILTIN_NAMES = (*BUILTIN_NAMES, TCPMUX)
TCP_PROTOCOLS = frozenset({Protocol.TCP, Protocol.TCP4, Protocol.TCP6, Protocol.TCP46})


@dataclass(frozen=True, slots=True)
class Server:
    """A resolved server: exactly one of ``internal`` and ``program`` is set, unless the
    entry failed (both None, reported)."""

    internal: str | None  # the built-in's name
    program: str | None  # the program's absolute path
    argv: tuple[str, ...] = ()  # the program's argv (a built-in takes none)


_NONE = Server(None, None)


def choose_server(
    spec: ServiceSpec, port: int | None, lookups: Lookups, out: SpecReport
) -> Server:
    """The program or built-in ``spec`` names (``port``: its port, None when unknown)."""
    if spec.rpc is not None and spec.is_internal:
        out.report("server", "an RPC service runs a program: poolinetd has no RPC built-ins",
                   "write the program's path and argv[0]")
        return _NONE
    if not spec.is_internal:
        if not spec.argv:
            base = spec.server.rsplit("/", 1)[-1] or "name"
            out.report(
                "server",
                "argv[0] is missing",
                f"write the program name after the path: {spec.server} {base}",
            )
        if not attempt(lookups.is_executable, spec.server):
            out.report(
                "server",
                f"program {spec.server} not found or not executable",
                "install it or fix the path",
            )
        return Server(None, spec.server, spec.argv)
    name = builtin_name(spec, port, lookups, out)
    if name is None:
        return _NONE
    where = "argv" if spec.argv else "service"
    if name in _FOREIGN_BUILTINS:
        out.report(
            where,
            f"built-in {name!r} is not supported by poolinetd",
            "built-ins: " + ", ".join(_BUILTIN_NAMES),
        )
        return _NONE
    if name not in _BUILTIN_NAMES:
        out.report(
            where,
            f"no built-in service {name!r}",
            "built-ins: " + ", ".join(_BUILTIN_NAMES) + "; name one with 'internal NAME'",
        )
        return _NONE
    _check_builtin(spec, name, where, out)
    return Server(name, None)


def _check_builtin(spec: ServiceSpec, name: str, where: str, out: SpecReport) -> None:
    """Report what the built-in ``name`` cannot do for ``spec`` (tcpmux rules, arguments)."""
    if name == TCPMUX:
        if spec.tcpmux is not None:
            out.report(where, "a tcpmux sub-service cannot be the tcpmux listener",
                       "name another built-in, or a program")
        elif spec.socket_type is not SocketType.STREAM or spec.protocol not in TCP_PROTOCOLS:
            out.report("protocol" if spec.socket_type is SocketType.STREAM
                       else "socket_type", "the tcpmux built-in is stream tcp only",
                       "write tcpmux stream tcp nowait root internal")
    elif spec.tcpmux is not None and not spec.tcpmux_plus:
        out.report("service", f"built-in {name} cannot send tcpmux's '+' reply itself",
                   f"write tcpmux/+{spec.tcpmux}: poolinetd then sends it")
    if len(spec.argv) > 1:
        out.report("argv", f"built-in {name} takes no arguments", f"write internal {name}")


def builtin_name(
    spec: ServiceSpec, port: int | None, lookups: Lookups, out: SpecReport
) -> str | None:
    """The built-in an ``internal`` entry means (see docs/configuration.md).

    ``port`` is the entry's port (None: unknown, already reported by the caller).
    """
    # GNU inetd writes "internal internal"; it names nothing.
    if spec.argv and spec.argv != ("internal",):
        return spec.argv[0]
    if spec.tcpmux is not None:
        # A sub-service has no port to look up: its name may be the built-in's.
        lower = spec.tcpmux.lower()
        if lower in BUILTIN_NAMES:
            return lower
        out.report("server", f"no built-in named {spec.tcpmux!r}",
                   f"name the built-in: internal {BUILTIN_NAMES[0]}")
        return None
    if spec.protocol.is_unix:
        return spec.service.rsplit("/", 1)[-1]  # FreeBSD: the last path component
    if spec.service in _BUILTIN_NAMES or spec.service in _FOREIGN_BUILTINS:
        return spec.service
    # An alias ("sink") or a number ("7"): ask for the official name of its port.
    if port is None:
        return None
    official = attempt(lookups.getservbyport, port, transport(spec))
    if official is not None:
        return official
    out.report(
        "service",
        f"no built-in for port {spec.service}",
        f"name the built-in: internal {BUILTIN_NAMES[0]}",
    )
    return None


def display_name(spec: ServiceSpec, internal: str | None, argv: tuple[str, ...]) -> str:
    """How logs, titles and status name a service: ``echo/tcp``, ``echo:7007/tcp``.

    A numeric port says nothing to an operator, so it is prefixed with the
    built-in's name or the program's argv[0] (``cat:0/tcp``).
    """
    proto = spec.protocol.value
    if spec.rpc is not None:  # as fields 1 and 3 say it: rstatd/1-5/rpc/udp
        low, high = spec.rpc.low, spec.rpc.high
        versions = str(low) if low == high else f"{low}-{high}"
        return f"{spec.service}/{versions}/rpc/{proto}"
    if spec.tcpmux is not None:
        return f"tcpmux/{spec.tcpmux.lower()}"  # also its reload identity (ServiceKey.label)
    if spec.service.isdigit():
        what = internal or os.path.basename(argv[0] if argv else spec.server)
        return f"{what}:{spec.service}/{proto}"
    return f"{spec.service}/{proto}"
