"""``poolinetd check``: load a config, print every error and warning, optionally JSON.

Touches the OS: reads the config (through resolve.load_file) and the name
services. Entry points: ``run_check`` (the CLI calls it) and
``service_to_dict`` (status and dump reuse it).
"""

from __future__ import annotations

import os
import socket
from typing import TextIO

import orjson

from poolinetd.config.resolve import load_file
from poolinetd.config.spec import (
    RLIM_UNLIMITED,
    RLIMIT_KEYS,
    AtLimit,
    Diagnostic,
    Endpoint,
    Options,
    Service,
)
from poolinetd.config.values import UNLIMITED
from poolinetd.net.netmatch import AddressList

__all__ = ["diagnostic_to_dict", "run_check", "service_to_dict"]

_FAMILIES = {
    int(socket.AF_INET): "inet",
    int(socket.AF_INET6): "inet6",
    int(socket.AF_UNIX): "unix",
}
_NO_OPTIONS = Options()  # frozen, so one shared default is safe


def _text(value: str) -> str:
    """``value`` printable as UTF-8: lone surrogates (undecodable bytes) become escapes."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def _endpoint(ep: Endpoint) -> dict[str, object]:
    return {
        "family": _FAMILIES.get(ep.family, str(ep.family)),
        "address": _text(ep.address),
        "port": ep.port,
        "v6only": ep.v6only,
    }


def _networks(networks: AddressList) -> list[str]:
    return [str(n) for n in networks.networks]


def _rpc(service: Service) -> dict[str, object]:
    """An RPC service's program, versions and rpcbind netids (nothing for other services,
    so the documents of configs without RPC keep their shape)."""
    rpc = service.rpc
    if rpc is None:
        return {}
    return {"rpc": {"program": rpc.number, "versions": [rpc.low, rpc.high],
                    "netids": list(rpc.netids)}}


def _cps(service: Service) -> dict[str, object]:
    """An xinetd service's own settings: its rate window and rest (``cps N M``), what a
    connection past max_child meets (``at_limit``: "refuse", xinetd's instances) and the
    size of each banner it sends (nothing for other services: max_spawn_per_min then
    counts per minute with the 60 s rest, and max_child leaves connections in the
    backlog)."""
    spec = service.spec
    got: dict[str, object] = {}
    if spec.spawn_window is not None:
        got.update(spawn_window=spec.spawn_window, spawn_pause=spec.spawn_pause)
    if spec.at_limit is AtLimit.REFUSE:
        got["at_limit"] = spec.at_limit.value
    sizes = {name: len(data) for name, data in (
        ("banner", spec.banner), ("banner_success", spec.banner_success),
        ("banner_fail", spec.banner_fail)) if data}
    if sizes:
        got["banner_bytes"] = sizes
    return got


def service_to_dict(service: Service) -> dict[str, object]:
    """Every field of ``service`` as JSON-ready values (strings safe for orjson)."""
    spec = service.spec
    lim = service.limits
    owner = service.socket_owner
    return {
        "name": _text(service.name),
        "source": _text(spec.source),
        "line": spec.lineno,
        "service": _text(spec.service),
        "socket_type": spec.socket_type.value,
        "protocol": spec.protocol.value,
        "wait": service.wait,
        "addresses": [_text(a) for a in spec.addresses],
        "endpoints": [_endpoint(ep) for ep in service.key.endpoints],
        "user": _text(service.user_name),
        "uid": service.uid,
        "gid": service.gid,
        "groups": list(service.groups),
        "home": _text(service.home),
        "login_class": None if spec.login_class is None else _text(spec.login_class),
        "internal": service.internal,
        "program": None if service.program is None else _text(service.program),
        "argv": [_text(a) for a in service.argv],
        **_rpc(service),
        **_cps(service),
        "pool": {
            "pool_min": service.pool.pool_min,
            "pool_max": service.pool.pool_max,
            "worker_connections": service.pool.worker_connections,
            "max_requests": service.pool.max_requests,
            "idle_timeout": service.pool.idle_timeout,
        },
        "conn_timeout": service.conn_timeout,
        "stderr": service.stderr.value,
        "env": {_text(k): _text(v) for k, v in service.env},
        "limits": {
            "max_child": lim.max_child,
            "max_cpm_per_ip": lim.max_cpm_per_ip,
            "max_child_per_ip": lim.max_child_per_ip,
            "max_spawn_per_min": lim.max_spawn_per_min,
            "unlimited": sorted(lim.unlimited),
        },

        "only_from": _networks(service.only_from),
        "no_access": _networks(service.no_access),
        "source_v4_prefix": service.source_v4_prefix,
        "source_v6_prefix": service.source_v6_prefix,
        "block_time": service.block_time,
        "reuseport": service.reuseport,
        "proxy_protocol": service.proxy_protocol,
        "proxy_from": _networks(service.proxy_from),
        "tcp_wrappers": service.tcp_wrappers,  # the daemon name judged under, or None
        "tcpmux_name": service.tcpmux_name,
        "tcpmux_plus": service.tcpmux_plus,
        "socket_owner": None
        if owner is None
        else {"uid": owner.uid, "gid": owner.gid, "mode": owner.mode},
        "process": _process(service),
        "preload": _preload(service),
        "sockopts": _sockopts(service),
    }


def _preload(service: Service) -> dict[str, object] | None:
    """preload=python: the script, the interpreter (None: the script's #! line names it,
    read by the worker), its options, the script's sys.argv and the extra modules."""
    got = service.preload
    if got is None:
        return None
    return {"kind": "python", "script": _text(got.script),
            "interpreter": None if got.interpreter is None else _text(got.interpreter),
            "options": [_text(o) for o in got.options], "argv": [_text(a) for a in got.argv],
            "modules": list(got.modules)}


def _process(service: Service) -> dict[str, object]:
    """The program's process controls: every rlimit_* key (None = inherited, "unlimited"),
    nice and umask (octal text, as written; None = inherited)."""
    got = dict(service.process.rlimits)
    out: dict[str, object] = {
        key: (UNLIMITED if got[key] == RLIM_UNLIMITED else got[key]) if key in got else None
        for key, _ in RLIMIT_KEYS
    }
    out["nice"] = service.process.nice
    umask = service.process.umask
    out["umask"] = None if umask is None else f"{umask:03o}"
    return out


def _sockopts(service: Service) -> dict[str, object]:
    """The listeners' socket options (None buffers = the kernel's default)."""
    opts = service.sockopts
    return {"backlog": opts.backlog, "rcvbuf": opts.rcvbuf, "sndbuf": opts.sndbuf,
            "keepalive": opts.keepalive, "nodelay": opts.nodelay,
            "defer_accept": opts.defer_accept}


def diagnostic_to_dict(diag: Diagnostic) -> dict[str, object]:
    """One diagnostic as JSON-ready values."""
    return {
        "severity": diag.severity.value,
        "source": _text(diag.source),
        "line": diag.lineno,
        "field": diag.field,
        "token": _text(diag.token),
        "message": _text(diag.message),
        "hint": _text(diag.hint),
    }


def run_check(
    path: str, as_json: bool, out: TextIO, err: TextIO, cli_defaults: Options = _NO_OPTIONS
) -> int:
    """Check the config at ``path``; return the exit status (0, or 78 = EX_CONFIG on any error).

    Every error and warning goes to ``err`` as ``FILE:LINE: field N 'TOKEN': message (hint)``,
    then a one-line summary. With ``as_json``, ``out`` gets one JSON object:
    ``{"source", "max_connections", "max_programs", "services": [...], "diagnostics": [...]}``
    (services that resolved; limits are effective values: None = no limit, 0 = nothing
    allowed; a cap of None = no cap).
    """
    loaded = load_file(path, cli_defaults)
    for diag in loaded.diagnostics:
        err.write(_text(str(diag)) + "\n")
    n_err, n_warn = len(loaded.errors), len(loaded.warnings)
    verdict = "FAILED" if n_err else "OK"
    err.write(
        f"{_text(path)}: {verdict}: {len(loaded.services)} service(s), "
        f"{n_err} error(s), {n_warn} warning(s)\n"
    )
    if as_json:
        doc = {
            "source": _text(path),
            "max_connections": loaded.max_connections,
            "max_programs": loaded.max_programs,
            "services": [service_to_dict(s) for s in loaded.services],
            "diagnostics": [diagnostic_to_dict(d) for d in loaded.diagnostics],
        }
        out.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    return os.EX_CONFIG if n_err else 0
