"""ServiceSpecs back to xinetd.conf(5) text, for what xinetd can say: ``format_service``.

Pure. For every spec it returns text for, reading that text back gives the
same spec (tests/test_xinetd_props.py); it returns None for a spec xinetd
cannot express (a unix socket, seqpacket, tcp4, an argument with a blank, a
per-source rate, a service rate that is not a whole number per second, ...).
"""

from __future__ import annotations

import os

from poolinetd.config.spec import AtLimit, Protocol, ServiceSpec, SocketType

__all__ = ["format_service"]

_FAMILIES = {
    Protocol.TCP: ("tcp", ""), Protocol.UDP: ("udp", ""),
    Protocol.TCP6: ("tcp", "yes"), Protocol.UDP6: ("udp", "yes"),
    Protocol.TCP46: ("tcp", "no"), Protocol.UDP46: ("udp", "no"),
}


def _plain(words: tuple[str, ...] | list[str]) -> bool:
    """Whether each word survives xinetd's split on blanks (and is not empty)."""
    return all(w and not any(c.isspace() for c in w) and w.isprintable() for w in words)


def format_service(spec: ServiceSpec, name: str = "") -> str | None:
    """``spec`` as a ``service NAME { }`` block, or None if xinetd cannot say it.

    ``name`` is the block's name for a service written by port (default ``svcPORT``).
    """
    family = _FAMILIES.get(spec.protocol)
    if family is None or spec.socket_type not in (SocketType.STREAM, SocketType.DGRAM):
        return None
    if spec.unix_perms is not None or spec.login_class is not None:
        return None
    # A banner is bytes here, not the path xinetd names; a max_child that leaves
    # connections in the backlog (inetd's) is not what xinetd's instances does.
    if spec.banner or spec.banner_success or spec.banner_fail or (
            spec.limits.max_child is not None and spec.at_limit is AtLimit.BACKLOG):
        return None
    if not _expressible(spec):
        return None
    lim, opts = spec.limits, spec.options
    cps = lim.max_spawn_per_min is not None or spec.spawn_window is not None
    # xinetd judges a stream nowait service by tcp_wrappers unless flags say NOLIBWRAP.
    wrapped_kind = spec.socket_type is SocketType.STREAM and not spec.wait
    types: list[str] = []
    flags: list[str] = ["NOLIBWRAP"] if wrapped_kind and not opts.tcp_wrappers else []
    lines: list[str] = []
    block = spec.service
    if spec.tcpmux is not None:
        types.append("TCPMUXPLUS" if spec.tcpmux_plus else "TCPMUX")
        block = spec.tcpmux
        if spec.service != "tcpmux":
            return None
    elif spec.service.isdigit():
        types.append("UNLISTED")
        lines.append(f"port = {spec.service}")
        block = name or f"svc{spec.service}"
    if spec.is_internal:
        if len(spec.argv) != 1:
            return None
        types.insert(0, "INTERNAL")
        if spec.tcpmux is None and not spec.service.isdigit() and spec.service != spec.argv[0]:
            return None
        block = spec.argv[0] if spec.tcpmux is None else block
    else:
        if not spec.argv or not _plain([spec.server, *spec.argv]):
            return None
        lines.append(f"server = {spec.server}")
        if spec.argv[0] == (os.path.basename(spec.server) or spec.server):
            if len(spec.argv) > 1:
                lines.append("server_args = " + " ".join(spec.argv[1:]))
        else:
            flags.append("NAMEINARGS")
            lines.append("server_args = " + " ".join(spec.argv))
    if not _plain([block, spec.user, *(spec.group or "x",), *spec.addresses]):
        return None
    proto, v6only = family
    out = [f"service {block}", "{"]
    if types:
        out.append("type = " + " ".join(types))
    out += [f"socket_type = {spec.socket_type.value}", f"protocol = {proto}"]
    six_bind = any(":" in a for a in spec.addresses)
    if v6only:
        if not six_bind:
            flags.append("IPv6")  # else the IPv6 bind address says it
        out.append(f"v6only = {v6only}")
    elif six_bind:
        return None  # an IPv6 address always makes an IPv6 service
    if flags:
        out.append("flags = " + " ".join(flags))
    out += [f"wait = {'yes' if spec.wait else 'no'}", f"user = {spec.user}"]
    if spec.group is not None:
        out.append(f"group = {spec.group}")
    out += lines
    if spec.addresses:
        out.append(f"bind = {spec.addresses[0]}")
    limits = _limit_lines(spec, cps)
    if limits is None:
        return None
    out += limits
    if opts.env:
        out.append("env = " + " ".join(f"{k}={v}" for k, v in opts.env))
    if not spec.enabled:
        out.append("disable = yes")
    out.append("}")
    return "\n".join(out) + "\n"


def _expressible(spec: ServiceSpec) -> bool:
    """Whether xinetd has attributes for everything ``spec`` says (limits, keys, env)."""
    lim = spec.limits
    if lim.max_cpm_per_ip is not None or "max_cpm_per_ip" in lim.unlimited:
        return False
    # A service rate is xinetd's cps N M only: N per 1 s window, a whole-second rest.
    cps = lim.max_spawn_per_min is not None or spec.spawn_window is not None
    if "max_spawn_per_min" in lim.unlimited or (cps and not (
            lim.max_spawn_per_min and spec.spawn_window == 1.0
            and spec.spawn_pause is not None and spec.spawn_pause.is_integer()
            and spec.spawn_pause >= 0)):
        return False
    opts = spec.options
    if opts != type(opts)(env=opts.env, only_from=opts.only_from, no_access=opts.no_access,
                          tcp_wrappers=opts.tcp_wrappers):
        return False  # poolinetd's own keys have no xinetd attribute
    wrapped_kind = spec.socket_type is SocketType.STREAM and not spec.wait
    if opts.tcp_wrappers is False or (opts.tcp_wrappers and not wrapped_kind):
        return False
    return _plain([f"{k}={v}" for k, v in opts.env]) and len(spec.addresses) <= 1


def _limit_lines(spec: ServiceSpec, cps: bool) -> list[str] | None:
    """instances, per_source, cps, only_from and no_access; None if xinetd cannot say them."""
    lim, opts = spec.limits, spec.options
    out: list[str] = []
    for key, attr in (("max_child", "instances"), ("max_child_per_ip", "per_source")):
        value = getattr(lim, key)
        if key in lim.unlimited:
            out.append(f"{attr} = UNLIMITED")
        elif value is not None:
            if key == "max_child" and value == 0:
                return None
            out.append(f"{attr} = {value}")
    if cps and spec.spawn_pause is not None:
        out.append(f"cps = {lim.max_spawn_per_min} {int(spec.spawn_pause)}")
    elif not cps:
        out.append("cps = 0 0")  # no rate: without it, xinetd's implicit cps = 50 10
    for attr, nets in (("only_from", opts.only_from), ("no_access", opts.no_access)):
        if nets is not None:
            if not nets or any(n.scope for n in nets.networks):
                return None
            out.append(f"{attr} = " + " ".join(str(n) for n in nets.networks))
    return out
