"""xinetd.conf's vocabulary: every attribute, type and flag, and how each is taken.

Pure tables and the address syntax of only_from/no_access, for ``xinetd_map``
(which applies them) and the tests (which check every attribute of
xinetd.conf(5) is in exactly one table: MAPPED, WARNED, REFUSED, DEFAULTS_ONLY).
"""

from __future__ import annotations

import ipaddress
import re

from poolinetd.net import netmatch

FACTOR = re.compile(r"((?:[0-9]{1,3}\.){0,3})\{([0-9,]+)\}")
UNLIMITED = "UNLIMITED"

# Attributes whose value is a set: they take "=", "+=" and "-=" and may repeat.
LIST_ATTRS = frozenset({"only_from", "no_access", "log_on_success", "log_on_failure",
                         "passenv", "env"})
# What a service inherits from defaults when it does not set the attribute.
INHERITED = frozenset({"bind", "interface", "per_source", "instances", "cps", "umask",
                        "groups", "banner", "banner_success", "banner_fail", "max_load",
                        "log_type", "v6only"})
DEFAULTS_ONLY = frozenset({"enabled", "disabled"})
# xinetd's rlimit_* -> poolinetd's keys of the same names (Options; resolve applies them
# to launched programs only, as xinetd does: a built-in runs no program).
RLIMITS = ("rlimit_as", "rlimit_cpu", "rlimit_data", "rlimit_rss", "rlimit_stack",
            "rlimit_files")
# Mapped onto poolinetd's model (see _Service.build).
MAPPED = frozenset({"id", "type", "flags", "socket_type", "protocol", "wait", "user",
                     "group", "server", "server_args", "port", "bind", "interface",
                     "only_from", "no_access", "per_source", "instances", "cps", "env",
                     "disable", "v6only", "groups", "nice", "umask", "banner_fail",
                     "banner", "banner_success", "passenv", "log_on_success",
                     "log_on_failure", *RLIMITS})
# xinetd's cps for a service that sets none, nor do defaults (xconfig.h: DEFAULT_LOOP_RATE
# and DEFAULT_LOOP_TIME, applied by confparse.c's service_fill).
DEFAULT_CPS = (50, 10)
# Read and not applied: what poolinetd does instead (the warning's hint).
WARNED: dict[str, str] = {
    "log_type": "poolinetd logs every service in its own log (--log-file, or syslog with "
                "--syslog and --syslog-facility for all services); no file or facility "
                "per service",
    "max_load": "poolinetd does not refuse by load average",
    "deny_time": "it only applies to SENSOR services, which poolinetd does not have",
    "libwrap": "poolinetd judges a service under its program's basename or its "
               "built-in's name only; this service is not judged by tcp_wrappers",
    "mdns": "poolinetd registers nothing with mDNS",
}
# Poolinetd would serve differently from xinetd: an error for an enabled service.
REFUSED: dict[str, str] = {
    "access_times": "poolinetd has no time-of-day access rule and would serve at all "
                    "hours; remove it or keep this service under xinetd",
    "redirect": "poolinetd does not forward connections; run a program that connects "
                "onwards (e.g. server = /usr/bin/socat)",
    "rpc_version": "RPC services are not supported",
    "rpc_number": "RPC services are not supported",
}
TYPES = frozenset({"INTERNAL", "UNLISTED", "RPC", "TCPMUX", "TCPMUXPLUS"})
# Flags: which poolinetd already does, which it cannot honour (warning), which it refuses.
FLAGS_DONE = {
    "REUSE": "",  # TCP listeners always get SO_REUSEADDR
    "NOLIBWRAP": "",  # the service is not judged by tcp_wrappers (see _Service.build)
    "IPv4": "",
    "IPv6": "",
    "NAMEINARGS": "",
    "NORETRY": "",  # poolinetd retries nothing either: a failed start is logged
}
# Flags that set a socket option: poolinetd's key of the same meaning.
FLAGS_SOCKOPTS = {"NODELAY": "nodelay", "KEEPALIVE": "keepalive"}
FLAGS_WARNED = {
    "INTERCEPT": "poolinetd checks every connection in the master before hand-off anyway",
    "IDONLY": "poolinetd asks no ident server: every client is served",
    "LABELED": "poolinetd sets no SELinux label on programs",
    "NOSOCKET": "the service gets a socket anyway",
}
FLAGS_REFUSED = {
    "SENSOR": "SENSOR (block every address that touches the port) is not supported",
    "DISABLE": "",  # handled: the service is disabled
}



def known(name: str) -> bool:
    return name in MAPPED or name in WARNED or name in REFUSED or name in DEFAULTS_ONLY


def joined(words: list[str]) -> list[str]:
    """Words with a factorized part split by blanks (``10.0.{1, 2}``) joined again."""
    out: list[str] = []
    for word in words:
        if out and "{" in out[-1] and "}" not in out[-1]:
            out[-1] += word
        else:
            out.append(word)
    return out


def xinetd_networks(word: str) -> list[netmatch.Network] | str:
    """What one only_from/no_access word matches, as xinetd 2.3.15 reads it.

    ``ADDR/LEN`` (IPv4 or IPv6); an IPv4 address whose trailing zero parts are
    wildcards (``10.0.0.0`` = 10.0.0.0/8, ``0.0.0.0`` = everyone); a factorized
    ``a.b.{c,d}`` (one network per value, as long as the parts written); an IPv6
    address. Returns "" for a host, domain or network name (poolinetd matches
    addresses only) and a message for anything else. Total.
    """
    found = FACTOR.fullmatch(word)
    if found is not None:
        head = [p for p in found[1].split(".") if p]
        nets: list[netmatch.Network] = []
        for part in found[2].split(","):
            parts = [*head, part]
            if not part or len(parts) > 4 or any(int(p) > 255 for p in parts if p):
                return f"bad factorized address {word!r}"
            value = 0
            for index, piece in enumerate(parts):
                value |= int(piece) << (24 - 8 * index)
            nets.append(netmatch.Network(4, value, 8 * len(parts)))
        return nets
    if "/" in word or ":" in word:
        got = netmatch.parse_cidr(word)
        if isinstance(got, str):
            return "" if hostlike(word) else got
        return [netmatch.Network(got.version, got.value, got.prefix, scope=got.scope)]
    try:
        addr = ipaddress.IPv4Address(word)
    except ValueError:
        if any(c in word for c in "{}"):
            return f"bad factorized address {word!r}"
        return "" if hostlike(word) else f"{word!r} is not an address"
    value = int(addr)
    zeros = 0
    while zeros < 4 and (value >> (8 * zeros)) & 0xFF == 0:
        zeros += 1
    return [netmatch.Network(4, value, 32 - 8 * zeros)]


def hostlike(word: str) -> bool:
    """A host, domain (``.example.com``) or /etc/networks name."""
    return re.fullmatch(r"\.?[A-Za-z0-9_][A-Za-z0-9_.-]*", word) is not None and not (
        word.replace(".", "").isdigit())
