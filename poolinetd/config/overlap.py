"""Which services want the same socket address: duplicates are dropped with an error.

Pure. ``find_duplicates(services)`` keeps each service that overlaps no
earlier kept one. It runs in time linear in the number of endpoints: every
endpoint is looked up in a few dicts (its exact address, the wildcard of
its IP version, any address of its IP version) instead of being compared
with every other endpoint on its port.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections.abc import Iterable

from poolinetd.config.spec import Diagnostic, Endpoint, Service, ServiceKey

__all__ = ["coverage", "find_duplicates", "overlap"]

_AF_INET = int(socket.AF_INET)
_WILDCARDS = ("0.0.0.0", "::")

_Holder = tuple[int, Service, Endpoint]  # (order kept, service, its endpoint)


@functools.lru_cache(maxsize=4096)
def _canonical(address: str, version: int) -> tuple[str, str | None]:
    """(canonical text, the IPv4 address it maps) of a numeric address; as written otherwise."""
    try:
        ip = ipaddress.IPv4Address(address) if version == 4 else ipaddress.IPv6Address(address)
    except ValueError:
        return address, None
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return str(ip), None if mapped is None else str(mapped)


def coverage(ep: Endpoint) -> list[tuple[int, str]]:
    """(IP version, address) pairs an endpoint takes, in canonical form.

    A non-v6only '::' also takes IPv4's 0.0.0.0, and a non-v6only
    ``::ffff:a.b.c.d`` (however it is written) takes a.b.c.d.
    """
    if ep.family == _AF_INET:
        return [(4, _canonical(ep.address, 4)[0])]
    text, mapped = _canonical(ep.address, 6)
    out = [(6, text)]
    if not ep.v6only:
        if text == "::":
            out.append((4, "0.0.0.0"))
        elif mapped is not None:
            out.append((4, mapped))
    return out


def overlap(a: Endpoint, b: Endpoint) -> bool:
    """Whether two IP endpoints on the same port and transport cannot both be bound."""
    for va, aa in coverage(a):
        for vb, ab in coverage(b):
            if va == vb and (aa == ab or aa in _WILDCARDS or ab in _WILDCARDS):
                return True
    return False


class _Index:
    """The addresses taken so far, by (transport, port, IP version)."""

    def __init__(self) -> None:
        self.exact: dict[tuple[str, int, int, str], _Holder] = {}
        self.wild: dict[tuple[str, int, int], _Holder] = {}  # first wildcard holder
        self.first: dict[tuple[str, int, int], _Holder] = {}  # first holder of any address
        self.paths: dict[str, _Holder] = {}
        self.count = 0

    def clash(self, transport: str, ep: Endpoint) -> _Holder | None:
        """The earliest kept endpoint ``ep`` overlaps, if any."""
        if transport == "unix":
            return self.paths.get(ep.address)
        found: list[_Holder] = []
        for version, addr in coverage(ep):
            group = (transport, ep.port, version)
            if addr in _WILDCARDS:
                holder = self.first.get(group)
                if holder is not None:
                    found.append(holder)
                continue
            for holder in (self.exact.get((*group, addr)), self.wild.get(group)):
                if holder is not None:
                    found.append(holder)
        return min(found, key=lambda h: h[0], default=None)

    def add(self, transport: str, service: Service, ep: Endpoint) -> None:
        """Record that ``service`` holds ``ep`` (the first holder of a place keeps it)."""
        holder = (self.count, service, ep)
        self.count += 1
        if transport == "unix":
            self.paths.setdefault(ep.address, holder)
            return
        for version, addr in coverage(ep):
            group = (transport, ep.port, version)
            self.first.setdefault(group, holder)
            if addr in _WILDCARDS:
                self.wild.setdefault(group, holder)
            else:
                self.exact.setdefault((*group, addr), holder)


def _transport(service: Service) -> str:
    proto = service.spec.protocol
    return "unix" if proto.is_unix else ("udp" if proto.is_udp else "tcp")


def find_duplicates(services: Iterable[Service]) -> tuple[list[Service], list[Diagnostic]]:
    """Drop every service that overlaps an earlier one; one error per drop naming both lines.

    Port 0 ("any free port") never overlaps, but two such entries with the same
    name and address could not be told apart on a reload: that is an error too.
    Services without endpoints (tcpmux sub-services) are kept and never compared.
    """
    kept: list[Service] = []
    diags: list[Diagnostic] = []
    labelled: dict[ServiceKey, Service] = {}
    index = _Index()
    for svc in services:
        if not svc.key.endpoints:
            # A tcpmux sub-service has no socket: nothing to overlap (resolve.py checks
            # its name against the other sub-services).
            kept.append(svc)
            continue
        transport = _transport(svc)
        clash: tuple[Service, Endpoint] | None = None
        for ep in svc.key.endpoints:
            if transport != "unix" and ep.port == 0:
                continue  # "any free port" never clashes
            holder = index.clash(transport, ep)
            if holder is not None:
                clash = (holder[1], ep)
                break
        where = svc.spec.loc("service")
        if clash is None and svc.key.label:
            twin = labelled.setdefault(svc.key, svc)
            if twin is not svc:
                diags.append(Diagnostic(
                    svc.spec.source, where.lineno, where.field, where.token,
                    f"duplicate service: {svc.name} has the same name and address as the "
                    f"port-0 entry at {twin.spec.source}:{twin.spec.lineno}, so a reload could "
                    "not tell them apart",
                    "give one a fixed port, another address, or another argv[0]"))
                continue
        if clash is None:
            kept.append(svc)
            for ep in svc.key.endpoints:
                if transport == "unix" or ep.port != 0:
                    index.add(transport, svc, ep)
            continue
        other, ep = clash
        at = ep.address if transport == "unix" else f"{transport} {ep.address} port {ep.port}"
        diags.append(Diagnostic(
            svc.spec.source, where.lineno, where.field, where.token,
            f"duplicate service: {svc.name} overlaps {other.name} "
            f"at {other.spec.source}:{other.spec.lineno} ({at})",
            "remove one, or give them different addresses or ports"))
    return kept, diags
