"""Writing specs back as inetd.conf text: ``format_spec`` (one entry), ``format_defaults``.

Pure. The output parses back to what was formatted: parse(format_spec(s)) == s
for every spec ``inetdconf.parse`` can return (tests/test_inetdconf_props.py).
Positional form when it can say everything, key-values form otherwise.
"""

from __future__ import annotations

from poolinetd.config.keys import GLOBAL_KEYS, LIMIT_KEYS, OPTION_KEYS
from poolinetd.config.spec import (
    RLIM_UNLIMITED,
    Limits,
    Options,
    PreloadKind,
    Protocol,
    ServiceSpec,
    StderrRoute,
)
from poolinetd.config.values import UNLIMITED
from poolinetd.net.netmatch import AddressList

_KV_SPECIAL = frozenset(" \t,;#\"'\\")  # a value holding any of these is written quoted


def _positional_arg(arg: str) -> str | None:
    """``arg`` as one positional argv word, or None when positional form cannot hold it."""
    if "\n" in arg or "\r" in arg:
        return None
    if arg and not any(c in arg for c in " \t") and arg[0] not in "\"'":
        return arg
    for quote in "\"'":
        if quote not in arg:
            return quote + arg + quote
    return None


def _kv_value(value: str) -> str:
    """A key-values value word, quoted with escapes when it needs it."""
    if value and not any(c in _KV_SPECIAL or ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        return value
    out = ['"']
    for c in value:
        if c in '\\"':
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif c == "\r":
            out.append("\\r")
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\x{ord(c):02x}")
        else:
            out.append(c)
    out.append('"')
    return "".join(out)


def _service_token(spec: ServiceSpec) -> str:
    """Field 1: the service with its address prefix, tcpmux name or unix socket prefix."""
    if spec.protocol is Protocol.UNIX:
        perms = spec.unix_perms
        if perms is None:
            return spec.service
        mode = "" if perms.mode is None else f"0{perms.mode:o}"
        return f":{perms.owner or ''}:{perms.group or ''}:{mode}:{spec.service}"
    name = spec.service
    if spec.tcpmux is not None:
        name = "tcpmux/" + ("+" if spec.tcpmux_plus else "") + spec.tcpmux
    elif spec.rpc is not None:
        low, high = spec.rpc.low, spec.rpc.high
        name = f"{name}/{low}" if low == high else f"{name}/{low}-{high}"
    if not spec.addresses:
        # "*:" keeps a service literally named like a directive from being read as one.
        return "*:" + name if name in ("defaults", ".include") else name
    addrs = ",".join(f"[{a}]" if ":" in a else a for a in spec.addresses)
    return f"{addrs}:{name}"


def _protocol_token(spec: ServiceSpec) -> str:
    """Field 3: the protocol; ``rpc/`` before it for an RPC entry (``rpc/*`` reads back
    as ``rpc/udp46`` or ``rpc/tcp46``, which say the same)."""
    return ("rpc/" if spec.rpc is not None else "") + spec.protocol.value


def _user_token(spec: ServiceSpec) -> str:
    """``user[:group][/login_class]``."""
    text = spec.user
    if spec.group is not None:
        text += ":" + spec.group
    if spec.login_class is not None:
        text += "/" + spec.login_class
    return text


def _wait_token(spec: ServiceSpec) -> str | None:
    """The positional wait field for ``spec``, or None when positional form cannot say it."""
    word = "wait" if spec.wait else "nowait"
    lim = spec.limits
    names = ("max_child", "max_cpm_per_ip", "max_child_per_ip")
    freebsd = [lim.given(n) for n in names]
    if lim.given("max_spawn_per_min"):
        if any(freebsd):
            return None
        if lim.max_spawn_per_min is None:
            return f"{word}.0"  # GNU/BusyBox: .0 = no limit
        return f"{word}:0" if lim.max_spawn_per_min == 0 else f"{word}.{lim.max_spawn_per_min}"
    count = sum(freebsd)
    # The FreeBSD form is positional: a later number needs every earlier one; 0 = no limit.
    if freebsd[:count] != [True] * count:
        return None
    parts: list[str] = []
    for name in names[:count]:
        value: int | None = getattr(lim, name)
        if value == 0:
            return None  # "nothing allowed" has no FreeBSD spelling
        parts.append(f"/{value or 0}")
    return word + "".join(parts)


def format_spec(spec: ServiceSpec) -> str:
    """One config line (no newline) that parses back to ``spec``.

    Positional form when it can say everything; key-values form otherwise
    (options, ``off``, limits positional form cannot combine, awkward argv).
    Guaranteed for every spec ``parse`` can return: parse(format_spec(s)) == s.
    """
    wait = _wait_token(spec)
    args = [_positional_arg(a) for a in spec.argv]
    positional_ok = (
        spec.enabled
        and spec.options == Options()
        and wait is not None
        and all(a is not None for a in args)
    )
    if positional_ok and wait is not None:
        fields_ = [
            _service_token(spec),
            spec.socket_type.value,
            _protocol_token(spec),
            wait,
            _user_token(spec),
            spec.server,
            *(a for a in args if a is not None),
        ]
        return "\t".join(fields_)
    return _format_kv(spec)


def _format_kv(spec: ServiceSpec) -> str:
    """``spec`` as a key-values definition (every field spelled out)."""
    opts = [
        f"socktype={spec.socket_type.value}",
        f"protocol={_protocol_token(spec)}",
        f"wait={'yes' if spec.wait else 'no'}",
        f"user={_kv_value(_user_token(spec))}",
    ]
    if not spec.is_internal:
        opts.append(f"exec={_kv_value(spec.server)}")
    if spec.argv:
        opts.append("args=" + " ".join(_kv_value(a) for a in spec.argv))
    opts.extend(_format_limits(spec.limits))
    opts.extend(_format_options(spec.options))
    state = "on" if spec.enabled else "off"
    return f"{_service_token(spec)} {state} " + ", ".join(opts) + ";"


def _format_limits(limits: Limits) -> list[str]:
    """``key=value`` for each limit set (a lifted one as ``unlimited``)."""
    out: list[str] = []
    for name in LIMIT_KEYS:
        value = getattr(limits, name)
        if value is not None:
            out.append(f"{name}={value}")
        elif name in limits.unlimited:
            out.append(f"{name}={UNLIMITED}")
    return out


def _format_options(options: Options) -> list[str]:
    """``key=value`` for each option set, in the order docs list them."""
    out: list[str] = []
    for name in OPTION_KEYS:
        value = getattr(options, name)
        if name == "env":
            if value:
                out.append("env=" + " ".join(_kv_value(f"{k}={v}") for k, v in value))
        elif isinstance(value, AddressList):
            out.append(f"{name}=" + " ".join(str(n) for n in value.networks))
        elif isinstance(value, (StderrRoute, PreloadKind)):
            out.append(f"{name}={value.value}")
        elif name == "preload_modules":
            if value:
                out.append(f"{name}=" + " ".join(value))
        elif isinstance(value, bool):
            out.append(f"{name}={'yes' if value else 'no'}")
        elif ((name in GLOBAL_KEYS and value == 0)
              or (name.startswith("rlimit_") and value == RLIM_UNLIMITED)):
            out.append(f"{name}={UNLIMITED}")
        elif name == "umask" and value is not None:
            out.append(f"umask={value:03o}")
        elif isinstance(value, float):
            out.append(f"{name}={value!r}")
        elif value is not None:
            out.append(f"{name}={value}")
    return out


def format_defaults(options: Options) -> str:
    """A ``defaults on ...;`` line for ``options`` ("" when nothing is set)."""
    opts = _format_limits(options.limits) + _format_options(options)
    return "defaults on " + ", ".join(opts) + ";" if opts else ""
