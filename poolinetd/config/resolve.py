"""Resolve parsed specs into services: ports, endpoints, uid/gid/groups, built-ins, pool sizes.

Touches the OS only through a ``Lookups`` value (``system_lookups()`` by
default, fakes in tests) and, in ``load_file``/``load_text``, by reading the
config file and its ``.include`` files. Never raises on a bad config: every
problem is a Diagnostic. Entry points: ``resolve``, ``load_file``, ``load_text``.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from poolinetd.config import includes, overlap
from poolinetd.config.spec import (
    BUILTIN_NAMES,
    DEFAULT_CONN_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_REQUESTS,
    DEFAULT_POOL_MAX,
    DEFAULT_POOL_MIN,
    DEFAULT_POOL_MIN_PROGRAM,
    DEFAULT_SOURCE_V4_PREFIX,
    DEFAULT_SOURCE_V6_PREFIX,
    DEFAULT_WORKER_CONNECTIONS_INTERNAL,
    DEFAULT_WORKER_CONNECTIONS_PROGRAM,
    LIMIT_NAMES,
    PROGRAM_LAUNCH_DEPTH,
    SAFE_SHARE,
    TCPMUX,
    Diagnostic,
    Endpoint,
    Limits,
    Options,
    ParsedConfig,
    PoolSettings,
    Protocol,
    Service,
    ServiceKey,
    ServiceSpec,
    Severity,
    SocketOwner,
    SocketType,
    StderrRoute,
)
from poolinetd.net import netmatch, tcpmux
from poolinetd.net.netmatch import AddressList

__all__ = [
    "LoadedConfig",
    "Lookups",
    "UserEntry",
    "load_file",
    "load_text",
    "resolve",
    "system_lookups",
]

# What a failed lookup may raise: pwd/grp KeyError, socket OSError, and the
# ValueError/UnicodeError the C wrappers raise for NUL bytes or lone surrogates.
_LOOKUP_FAILURES = (LookupError, OSError, ValueError)
# Built-ins other inetds have and poolinetd does not, for a clearer message.
_FOREIGN_BUILTINS = ("auth", "ident")
# What ``internal NAME`` may name: the table's built-ins and the tcpmux listener.
_BUILTIN_NAMES = (*BUILTIN_NAMES, TCPMUX)
_TCP = frozenset({Protocol.TCP, Protocol.TCP4, Protocol.TCP6, Protocol.TCP46})
_PER_SOURCE = ("max_cpm_per_ip", "max_child_per_ip")
# Bound on the sum of every service's env variables in one load (each service carries its
# whole environment, so a big ``defaults env=`` times many entries would be quadratic).
MAX_ENV_TOTAL = 2_000_000
_SUN_PATH_MAX = 107  # sizeof(sun_path) - 1 on Linux
# Plain ints: Endpoint stays free of the socket module's IntEnum (and compares/prints as numbers).
_AF_INET, _AF_INET6, _AF_UNIX = int(socket.AF_INET), int(socket.AF_INET6), int(socket.AF_UNIX)
_NO_OPTIONS = Options()  # frozen, so one shared default is safe


@dataclass(frozen=True, slots=True)
class UserEntry:
    """What resolution needs from a passwd entry."""

    name: str
    uid: int
    gid: int
    home: str


@dataclass(frozen=True, slots=True)
class Lookups:
    """Name services, passed in so tests can fake them.

    Each callable raises ``LookupError`` or ``OSError`` when the name is unknown.
    ``getaddrinfo(host, family)`` returns the numeric addresses of ``host``
    for ``socket.AF_INET`` or ``AF_INET6``.
    """

    getservbyname: Callable[[str, str], int]
    getservbyport: Callable[[int, str], str]
    getpwnam: Callable[[str], UserEntry]
    getgrnam: Callable[[str], int]
    getgrouplist: Callable[[str, int], tuple[int, ...]]
    getaddrinfo: Callable[[str, int], tuple[str, ...]]
    is_executable: Callable[[str], bool]


def _sys_getpwnam(name: str) -> UserEntry:
    entry = pwd.getpwnam(name)
    return UserEntry(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


def _sys_getaddrinfo(host: str, family: int) -> tuple[str, ...]:
    infos = socket.getaddrinfo(host, None, family, socket.SOCK_STREAM)
    return tuple(dict.fromkeys(str(info[4][0]) for info in infos))


def _sys_is_executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def system_lookups() -> Lookups:
    """The real C library: /etc/services, NSS users and groups, DNS, the file system."""
    return Lookups(
        getservbyname=socket.getservbyname,
        getservbyport=socket.getservbyport,
        getpwnam=_sys_getpwnam,
        getgrnam=lambda name: grp.getgrnam(name).gr_gid,
        getgrouplist=lambda name, gid: tuple(os.getgrouplist(name, gid)),
        getaddrinfo=_sys_getaddrinfo,
        is_executable=_sys_is_executable,
    )


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """A config file read, parsed and resolved: the services and every diagnostic, in file order.

    ``max_connections``/``max_programs``: the global caps (command line over the
    file's ``defaults``); None = no cap.
    """

    services: tuple[Service, ...]
    diagnostics: tuple[Diagnostic, ...]
    max_connections: int | None = None
    max_programs: int | None = None

    @property
    def errors(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self.diagnostics if d.severity is Severity.ERROR)

    @property
    def warnings(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self.diagnostics if d.severity is Severity.WARNING)

    @property
    def ok(self) -> bool:
        return not self.errors


# -- one spec ----------------------------------------------------------------------------


class _SpecResolver:
    """Resolves one enabled spec; collects diagnostics instead of raising."""

    def __init__(self, spec: ServiceSpec, chain: tuple[Options, ...], lookups: Lookups,
                 base_env: tuple[tuple[str, str], ...] | None = None) -> None:
        self.spec = spec
        self.chain = chain  # entry options, file defaults, command line: first set wins
        self.lk = lookups
        # The env of everything but the entry, merged once per load (not once per entry).
        self.base_env = _merged_env(chain[1:]) if base_env is None else base_env
        self.diags: list[Diagnostic] = []
        self.failed = False

    def report(self, role: str, message: str, hint: str = "", *, warning: bool = False) -> None:
        where = self.spec.loc(role)
        severity = Severity.WARNING if warning else Severity.ERROR
        self.failed = self.failed or not warning
        self.diags.append(
            Diagnostic(
                self.spec.source, where.lineno, where.field, where.token, message, hint, severity
            )
        )

    def call(self, fn: Callable[..., object], *args: object) -> object | None:
        try:
            return fn(*args)
        except _LOOKUP_FAILURES:
            return None

    def run(self) -> Service | None:
        spec = self.spec
        self.check_kinds()
        mux = self.tcpmux_name()
        port = 0 if spec.tcpmux is not None else self.port()
        # A tcpmux sub-service has no socket: it is reached through a tcpmux listener.
        endpoints = self.endpoints(port) if port is not None and spec.tcpmux is None else ()
        internal, program, argv = self.server()
        user = self.user()
        owner = self.socket_owner()
        if spec.login_class is not None:
            self.report(
                "user",
                f"login class {spec.login_class!r} ignored",
                "login classes are a BSD feature; Linux has none",
                warning=True,
            )
        if internal is not None and spec.wait and spec.socket_type is SocketType.STREAM:
            # FreeBSD rule: a stream built-in always runs nowait.
            self.report("wait", "stream built-in served as nowait", "write nowait", warning=True)
            spec = replace(spec, wait=False)
        pool, conn_timeout, stderr, env = self.options(internal is not None)
        traffic = self.traffic(spec)
        limits = self.limits(spec, pool)
        if self.failed or user is None or port is None:
            return None
        pw, gid, groups = user
        name = display_name(spec, internal, argv)
        any_port = any(ep.port == 0 for ep in endpoints) and not spec.protocol.is_unix
        label = name if any_port or mux is not None else ""
        return Service(
            spec=spec,
            name=name,
            key=ServiceKey(spec.socket_type, spec.protocol.is_udp, endpoints, label),
            uid=pw.uid,
            gid=gid,
            groups=groups,
            user_name=pw.name,
            home=pw.home,
            internal=internal,
            program=program,
            argv=argv,
            pool=pool,
            conn_timeout=conn_timeout,
            stderr=stderr,
            env=env,
            limits=limits,
            socket_owner=owner,
            only_from=traffic.only_from,
            no_access=traffic.no_access,
            source_v4_prefix=traffic.source_v4_prefix,
            source_v6_prefix=traffic.source_v6_prefix,
            block_time=traffic.block_time,
            reuseport=traffic.reuseport,
            proxy_protocol=traffic.proxy_protocol,
            proxy_from=traffic.proxy_from,
            tcpmux_name=mux,
            tcpmux_plus=spec.tcpmux_plus if mux is not None else False,
        )

    def check_kinds(self) -> None:
        spec = self.spec
        st, proto = spec.socket_type, spec.protocol
        if st in (SocketType.RAW, SocketType.RDM):
            self.report(
                "socket_type",
                f"socket type {st.value} is not supported",
                "use stream, dgram or seqpacket",
            )
        elif st is SocketType.SEQPACKET and not proto.is_unix:
            self.report("socket_type", "seqpacket needs protocol unix", "write seqpacket unix")
        elif st is SocketType.STREAM and proto.is_udp:
            self.report("protocol", f"stream does not go with {proto.value}", "use tcp for stream")
        elif st is SocketType.DGRAM and not (proto.is_udp or proto.is_unix):
            self.report("protocol", f"dgram does not go with {proto.value}", "use udp for dgram")
        if spec.tcpmux is not None:
            if st is not SocketType.STREAM:
                self.report("socket_type", "a tcpmux sub-service is stream only",
                            "write tcpmux/NAME stream tcp nowait ...")
            elif proto not in _TCP:
                self.report("protocol", "a tcpmux sub-service is reached over TCP",
                            "write tcpmux/NAME stream tcp nowait ...")
            if spec.wait:
                self.report("wait", "a tcpmux sub-service is nowait: it has no socket to wait on",
                            "write nowait")
            if spec.addresses:
                self.report("service", "listen address ignored: a tcpmux sub-service is "
                            "reached through the tcpmux listener", "remove the address",
                            warning=True)

    def tcpmux_name(self) -> str | None:
        """The lower-cased name of a ``tcpmux/NAME`` sub-service (None for other entries)."""
        name = self.spec.tcpmux
        if name is None:
            return None
        if not (name.isascii() and name.isprintable()) or len(name) > tcpmux.MAX_NAME:
            self.report("service", "a tcpmux name is printable ASCII, at most "
                        f"{tcpmux.MAX_NAME} characters", "rename the sub-service")
            return None
        lower = name.lower()
        if lower == tcpmux.HELP:
            self.report("service", "HELP is tcpmux's own request (it lists the sub-services)",
                        "give the sub-service another name")
        return lower

    def port(self) -> int | None:
        spec = self.spec
        if spec.protocol.is_unix:
            return 0
        if spec.service.isascii() and spec.service.isdigit():
            return int(spec.service)  # the parser checked the range
        proto = "udp" if spec.protocol.is_udp else "tcp"
        port = self.call(self.lk.getservbyname, spec.service, proto)
        if not isinstance(port, int):
            self.report(
                "service",
                f"unknown service {spec.service!r} for {proto}",
                "add it to /etc/services or write the port number",
            )
            return None
        return port

    def endpoints(self, port: int) -> tuple[Endpoint, ...]:
        spec, proto = self.spec, self.spec.protocol
        if proto.is_unix:
            try:
                size = len(os.fsencode(spec.service))
            except UnicodeError:
                self.report("service", "socket path is not valid text", "rename it")
                return ()
            if size > _SUN_PATH_MAX:
                self.report(
                    "service",
                    f"socket path too long ({size} bytes)",
                    f"at most {_SUN_PATH_MAX} bytes",
                )
            return (Endpoint(_AF_UNIX, spec.service, 0),)
        dual = proto in (Protocol.TCP46, Protocol.UDP46)
        six = proto in (Protocol.TCP6, Protocol.UDP6) or dual
        strict_four = proto in (Protocol.TCP4, Protocol.UDP4)
        if not spec.addresses:
            wildcard = "::" if six else "0.0.0.0"
            return (Endpoint(_AF_INET6 if six else _AF_INET, wildcard, port, not dual),)
        out: list[Endpoint] = []
        for addr in spec.addresses:
            try:
                ip = ipaddress.ip_address(addr)
            except ValueError:
                family = _AF_INET6 if six else _AF_INET
                found = self.call(self.lk.getaddrinfo, addr, family)
                if not isinstance(found, tuple) or not found:
                    self.report(
                        "service",
                        f"cannot resolve host {addr!r}",
                        "write a numeric address or fix the name",
                    )
                    continue
                out.extend(Endpoint(family, a, port, not dual) for a in found)
                continue
            if ip.version == 4:
                if six:
                    self.report(
                        "protocol",
                        f"{addr} is IPv4 but {proto.value} listens on IPv6",
                        "use tcp/udp (or tcp4/udp4) for IPv4 addresses",
                    )
                    continue
                out.append(Endpoint(_AF_INET, str(ip), port))
            else:
                if strict_four:
                    self.report(
                        "protocol",
                        f"{addr} is IPv6 but {proto.value} is IPv4-only",
                        "use tcp6/udp6 for IPv6 addresses",
                    )
                    continue
                out.append(Endpoint(_AF_INET6, str(ip), port, not dual))
        return tuple(dict.fromkeys(out))

    def server(self) -> tuple[str | None, str | None, tuple[str, ...]]:
        spec = self.spec
        if not spec.is_internal:
            if not spec.argv:
                base = spec.server.rsplit("/", 1)[-1] or "name"
                self.report(
                    "server",
                    "argv[0] is missing",
                    f"write the program name after the path: {spec.server} {base}",
                )
            if not self.call(self.lk.is_executable, spec.server):
                self.report(
                    "server",
                    f"program {spec.server} not found or not executable",
                    "install it or fix the path",
                )
            return None, spec.server, spec.argv
        name = self.builtin_name()
        if name is None:
            return None, None, ()
        where = "argv" if spec.argv else "service"
        if name in _FOREIGN_BUILTINS:
            self.report(
                where,
                f"built-in {name!r} is not supported by poolinetd",
                "built-ins: " + ", ".join(_BUILTIN_NAMES),
            )
            return None, None, ()
        if name not in _BUILTIN_NAMES:
            self.report(
                where,
                f"no built-in service {name!r}",
                "built-ins: " + ", ".join(_BUILTIN_NAMES) + "; name one with 'internal NAME'",
            )
            return None, None, ()
        if name == TCPMUX:
            if spec.tcpmux is not None:
                self.report(where, "a tcpmux sub-service cannot be the tcpmux listener",
                            "name another built-in, or a program")
            elif spec.socket_type is not SocketType.STREAM or spec.protocol not in _TCP:
                self.report("protocol" if spec.socket_type is SocketType.STREAM
                            else "socket_type", "the tcpmux built-in is stream tcp only",
                            "write tcpmux stream tcp nowait root internal")
        elif spec.tcpmux is not None and not spec.tcpmux_plus:
            self.report("service", f"built-in {name} cannot send tcpmux's '+' reply itself",
                        f"write tcpmux/+{spec.tcpmux}: poolinetd then sends it")
        if len(spec.argv) > 1:
            self.report("argv", f"built-in {name} takes no arguments", f"write internal {name}")
        return name, None, ()

    def builtin_name(self) -> str | None:
        """The built-in an ``internal`` entry means (see docs/configuration.md)."""
        spec = self.spec
        # GNU inetd writes "internal internal"; it names nothing.
        if spec.argv and spec.argv != ("internal",):
            return spec.argv[0]
        if spec.tcpmux is not None:
            # A sub-service has no port to look up: its name may be the built-in's.
            lower = spec.tcpmux.lower()
            if lower in BUILTIN_NAMES:
                return lower
            self.report("server", f"no built-in named {spec.tcpmux!r}",
                        f"name the built-in: internal {BUILTIN_NAMES[0]}")
            return None
        if spec.protocol.is_unix:
            return spec.service.rsplit("/", 1)[-1]  # FreeBSD: the last path component
        if spec.service in _BUILTIN_NAMES or spec.service in _FOREIGN_BUILTINS:
            return spec.service
        # An alias ("sink") or a number ("7"): ask for the official name of its port.
        port = self.port_quiet()
        if port is None:
            return None  # port() already said the service is unknown
        proto = "udp" if spec.protocol.is_udp else "tcp"
        official = self.call(self.lk.getservbyport, port, proto)
        if isinstance(official, str):
            return official
        self.report(
            "service",
            f"no built-in for port {spec.service}",
            f"name the built-in: internal {BUILTIN_NAMES[0]}",
        )
        return None

    def port_quiet(self) -> int | None:
        spec = self.spec
        if spec.service.isascii() and spec.service.isdigit():
            return int(spec.service)
        proto = "udp" if spec.protocol.is_udp else "tcp"
        port = self.call(self.lk.getservbyname, spec.service, proto)
        return port if isinstance(port, int) else None

    def lookup_user(self, name: str) -> UserEntry | None:
        found = self.call(self.lk.getpwnam, name)
        return found if isinstance(found, UserEntry) else None

    def lookup_group(self, name: str) -> int | None:
        found = self.call(self.lk.getgrnam, name)
        return found if isinstance(found, int) else None

    def user(self) -> tuple[UserEntry, int, tuple[int, ...]] | None:
        spec = self.spec
        entry = self.lookup_user(spec.user)
        group = spec.group
        gid: int | None = None
        if entry is None and group is None and "." in spec.user:
            # "user.group" (OpenBSD, BusyBox): the whole token was not a user,
            # so try each dot, rightmost first, as the user/group separator.
            cut = len(spec.user)
            while (cut := spec.user.rfind(".", 0, cut)) > 0:
                name, group_name = spec.user[:cut], spec.user[cut + 1 :]
                candidate, group_id = self.lookup_user(name), self.lookup_group(group_name)
                if candidate is not None and group_id is not None and group_name:
                    entry, group, gid = candidate, group_name, group_id
                    break
        if entry is None:
            self.report("user", f"unknown user {spec.user!r}", "create the user or fix the name")
            return None
        if group is not None and gid is None:
            gid = self.lookup_group(group)
            if gid is None:
                self.report("user", f"unknown group {group!r}", "create the group or fix the name")
                return None
        gid = entry.gid if gid is None else gid
        groups = self.call(self.lk.getgrouplist, entry.name, gid)
        return entry, gid, groups if isinstance(groups, tuple) and groups else (gid,)

    def socket_owner(self) -> SocketOwner | None:
        perms = self.spec.unix_perms
        if perms is None:
            return None
        uid = gid = -1
        if perms.owner is not None:
            entry = self.lookup_user(perms.owner)
            if entry is None:
                self.report("service", f"unknown socket owner {perms.owner!r}", "fix the prefix")
            else:
                uid = entry.uid
        if perms.group is not None:
            found = self.lookup_group(perms.group)
            if found is None:
                self.report("service", f"unknown socket group {perms.group!r}", "fix the prefix")
            else:
                gid = found
        return SocketOwner(uid, gid, perms.mode)

    def pick(self, name: str) -> object | None:
        for options in self.chain:
            value: object = getattr(options, name)
            if value is not None:
                return value
        return None

    def options(
        self, is_internal: bool
    ) -> tuple[PoolSettings, float, StderrRoute, tuple[tuple[str, str], ...]]:
        def num(name: str, default: float) -> float:
            value = self.pick(name)
            return default if not isinstance(value, int | float) else value

        per_worker = (
            DEFAULT_WORKER_CONNECTIONS_INTERNAL
            if is_internal
            else DEFAULT_WORKER_CONNECTIONS_PROGRAM
        )
        pool_max = int(num("pool_max", DEFAULT_POOL_MAX))
        # The program default never exceeds an explicit pool_max.
        min_default = DEFAULT_POOL_MIN if is_internal else min(DEFAULT_POOL_MIN_PROGRAM, pool_max)
        pool = PoolSettings(
            pool_min=int(num("pool_min", min_default)),
            pool_max=pool_max,
            worker_connections=int(num("worker_connections", per_worker)),
            max_requests=int(num("max_requests", DEFAULT_MAX_REQUESTS)),
            idle_timeout=float(num("idle_timeout", DEFAULT_IDLE_TIMEOUT)),
            spread=not is_internal,
            launch_depth=0 if is_internal else PROGRAM_LAUNCH_DEPTH,
        )
        if pool.pool_min > pool.pool_max:
            role = "pool_min" if self.spec.options.pool_min is not None else "pool_max"
            self.report(
                role,
                f"pool_min {pool.pool_min} is larger than pool_max {pool.pool_max}",
                "raise pool_max or lower pool_min",
            )
        stderr = self.pick("stderr")
        env = self.base_env
        if self.spec.options.env:
            env = _merged_env((*self.chain[:1], Options(env=self.base_env)))
        return (
            pool,
            float(num("conn_timeout", DEFAULT_CONN_TIMEOUT)),
            stderr if isinstance(stderr, StderrRoute) else StderrRoute.SOCKET,
            env,
        )

    def address_list(self, name: str) -> AddressList | None:
        value = self.pick(name)
        return value if isinstance(value, AddressList) else None

    def traffic(self, spec: ServiceSpec) -> _Traffic:
        """Access lists, per-source keying, PROXY protocol and SO_REUSEPORT, defaults applied.

        ``spec`` is the entry after the built-in wait rule (a stream built-in is nowait).
        """
        own = spec.options
        only, deny = self.address_list("only_from"), self.address_list("no_access")
        if spec.protocol.is_unix:
            # Unix peers have no address: the socket file's mode decides who connects.
            for key in ("only_from", "no_access"):
                if getattr(own, key) is not None:
                    self.report(key, f"{key} needs an IP service: unix peers have no address",
                                "limit who may connect with the socket's :owner:group:mode:")
            only = deny = None
        elif only and deny and (own.only_from is None) != (own.no_access is None):
            # One list is the entry's, the other from defaults (the parser judged the
            # lists written together).
            self.contradiction(only, deny, "only_from" if own.only_from is not None
                               else "no_access")
        proxy_protocol = own.proxy_protocol is True
        proxy_from = self.address_list("proxy_from")
        if proxy_protocol:
            ok_kind = (spec.socket_type is SocketType.STREAM and not spec.wait
                       and (spec.protocol in _TCP or spec.protocol.is_unix))
            if spec.tcpmux is not None:
                self.report("proxy_protocol", "a tcpmux sub-service reads no PROXY header",
                            "set proxy_protocol=yes on the tcpmux listener")
            elif not ok_kind:
                self.report("proxy_protocol",
                            "proxy_protocol=yes needs a stream tcp or unix nowait service",
                            "a PROXY header starts a connection; datagram and wait services "
                            "have none")
            elif spec.protocol.is_unix:
                if own.proxy_from is not None:
                    self.report("proxy_from", "proxy_from needs an IP service: unix peers "
                                "have no address", "the socket's :owner:group:mode: decides "
                                "who may send the header")
                proxy_from = None
            elif not proxy_from:
                self.report("proxy_protocol",
                            "proxy_protocol=yes needs proxy_from=..., the proxies trusted to "
                            "send the header", "write e.g. proxy_from=10.0.0.5 10.0.0.6")
        else:
            if own.proxy_from is not None:
                self.report("proxy_from", "proxy_from without proxy_protocol=yes is ignored",
                            "add proxy_protocol=yes or remove proxy_from", warning=True)
            proxy_from = None
        reuseport = self.pick("reuseport") is True
        if spec.tcpmux is not None:
            if own.reuseport is not None:
                self.report("reuseport", "reuseport ignored: a tcpmux sub-service has no "
                            "socket of its own", "set it on the tcpmux listener", warning=True)
            reuseport = False
        v4, v6, block = (self.pick("source_v4_prefix"), self.pick("source_v6_prefix"),
                         self.pick("block_time"))
        return _Traffic(
            only_from=only or _EMPTY,
            no_access=deny or _EMPTY,
            source_v4_prefix=v4 if isinstance(v4, int) else DEFAULT_SOURCE_V4_PREFIX,
            source_v6_prefix=v6 if isinstance(v6, int) else DEFAULT_SOURCE_V6_PREFIX,
            block_time=float(block) if isinstance(block, int | float) else 0.0,
            reuseport=reuseport,
            proxy_protocol=proxy_protocol,
            proxy_from=proxy_from or _EMPTY,
        )

    def contradiction(self, only: AddressList, deny: AddressList, role: str) -> None:
        dead = netmatch.shadowed(only, deny)
        if not dead:
            return
        shown = ", ".join(str(n) for n in dead[:5]) + (", ..." if len(dead) > 5 else "")
        if len(dead) == len(only):
            self.report(role, "only_from and no_access contradict: no_access covers every "
                        f"only_from entry ({shown}), so the service refuses every client",
                        "remove the no_access entries that cover only_from, or fix only_from "
                        "(one of them comes from defaults)")
        else:
            self.report(role, f"only_from entries inside no_access allow nobody: {shown}",
                        "remove them from only_from", warning=True)

    def limits(self, spec: ServiceSpec, pool: PoolSettings) -> Limits:
        """The entry's limits, then ``defaults``', then the command line's, limit by limit;
        then the safe default for ``max_child_per_ip`` (docs/configuration.md, "Limits")."""
        chain = (spec.limits, *(options.limits for options in self.chain[1:]))
        values: dict[str, int] = {}
        lifted: set[str] = set()
        unix = spec.protocol.is_unix
        for name in LIMIT_NAMES:
            per_source = name in _PER_SOURCE
            if unix and per_source and spec.limits.given(name):
                self.report(name if name in dict(spec.locs) else "wait",
                            f"{name} on a unix socket counts all clients as one source "
                            "(unix peers have no address)", "use max_child or "
                            "max_spawn_per_min for a limit on the whole service", warning=True)
            # Unix peers have no address, so a per-source limit from defaults would
            # silently become a limit on the whole service: only the entry's applies.
            for limits in chain[:1] if unix and per_source else chain:
                if limits.given(name):
                    value: int | None = getattr(limits, name)
                    if value is None:
                        lifted.add(name)
                    else:
                        values[name] = value
                    break
        connections = (spec.socket_type is SocketType.STREAM and not spec.wait
                       and not spec.protocol.is_unix)
        if connections and "max_child_per_ip" not in values and "max_child_per_ip" not in lifted:
            capacity = values.get("max_child") or pool.pool_max * pool.worker_connections
            values["max_child_per_ip"] = max(1, capacity // SAFE_SHARE)
        return Limits(**values, unlimited=frozenset(lifted))


@dataclass(frozen=True, slots=True)
class _Traffic:
    """What ``_SpecResolver.traffic`` resolves (the Service fields of the same names)."""

    only_from: AddressList
    no_access: AddressList
    source_v4_prefix: int
    source_v6_prefix: int
    block_time: float
    reuseport: bool
    proxy_protocol: bool
    proxy_from: AddressList


_EMPTY = AddressList()


# -- names -------------------------------------------------------------------------------


def display_name(spec: ServiceSpec, internal: str | None, argv: tuple[str, ...]) -> str:
    """How logs, titles and status name a service: ``echo/tcp``, ``echo:7007/tcp``.

    A numeric port says nothing to an operator, so it is prefixed with the
    built-in's name or the program's argv[0] (``cat:0/tcp``).
    """
    proto = spec.protocol.value
    if spec.tcpmux is not None:
        return f"tcpmux/{spec.tcpmux.lower()}"  # also its reload identity (ServiceKey.label)
    if spec.service.isdigit():
        what = internal or os.path.basename(argv[0] if argv else spec.server)
        return f"{what}:{spec.service}/{proto}"
    return f"{spec.service}/{proto}"


# -- entry points ------------------------------------------------------------------------


def resolve(
    parsed: ParsedConfig, cli_defaults: Options, lookups: Lookups
) -> tuple[tuple[Service, ...], tuple[Diagnostic, ...]]:
    """Resolve every enabled spec of ``parsed``.

    Returns the services that resolved cleanly (duplicates dropped) and the
    diagnostics of resolution only (``parsed.diagnostics`` are not repeated).
    Option precedence: entry > file ``defaults`` > ``cli_defaults`` > spec.DEFAULT_*.
    Never raises on a bad config; lookups that raise are treated as "unknown".
    """
    services: list[Service] = []
    diags: list[Diagnostic] = []
    base_env = _merged_env((parsed.defaults, cli_defaults))
    env_total = 0
    for spec in parsed.specs:
        if not spec.enabled:
            continue  # "off" entries are parsed, not resolved: they may name absent users
        resolver = _SpecResolver(spec, (spec.options, parsed.defaults, cli_defaults), lookups,
                                 base_env)
        service = resolver.run()
        diags.extend(resolver.diags)
        if service is None:
            continue
        env_total += len(service.env)
        if env_total > MAX_ENV_TOTAL:
            # Every service carries its whole environment: bound what a load can build.
            where = spec.loc("service")
            diags.append(Diagnostic(
                spec.source, where.lineno, where.field, where.token,
                f"the services' environments add up to more than {MAX_ENV_TOTAL} variables",
                "set fewer env= variables, especially in defaults"))
            break
        services.append(service)
    kept, dup_diags = overlap.find_duplicates(services)
    kept, mux_diags = _tcpmux_check(kept)
    return tuple(kept), tuple(diags) + tuple(dup_diags) + tuple(mux_diags)


def _tcpmux_check(services: list[Service]) -> tuple[list[Service], list[Diagnostic]]:
    """Drop a tcpmux sub-service whose name (case-insensitive) an earlier one has; warn
    about sub-services when no tcpmux listener is configured."""
    kept: list[Service] = []
    diags: list[Diagnostic] = []
    names: dict[str, Service] = {}
    listener = any(s.internal == TCPMUX for s in services)
    for svc in services:
        if svc.tcpmux_name is None:
            kept.append(svc)
            continue
        where = svc.spec.loc("service")
        first = names.setdefault(svc.tcpmux_name, svc)
        if first is not svc:
            diags.append(Diagnostic(
                svc.spec.source, where.lineno, where.field, where.token,
                f"duplicate tcpmux sub-service {svc.tcpmux_name!r}: also at "
                f"{first.spec.source}:{first.spec.lineno} (tcpmux names are case-insensitive)",
                "remove one or rename it"))
            continue
        kept.append(svc)
        if not listener:
            diags.append(Diagnostic(
                svc.spec.source, where.lineno, where.field, where.token,
                f"no tcpmux listener is configured, so {svc.name} cannot be reached",
                "add: tcpmux stream tcp nowait root internal", Severity.WARNING))
    return kept, diags


def _merged_env(chain: Iterable[Options]) -> tuple[tuple[str, str], ...]:
    """The env of ``chain`` (most specific first): the first source that sets a name wins."""
    env: dict[str, str] = {}
    for options in reversed(tuple(chain)):  # later (more specific) sources override
        env.update(options.env)
    return tuple(env.items())


def _ordered(diags: Iterable[Diagnostic], sources: list[str]) -> tuple[Diagnostic, ...]:
    rank: dict[str, int] = {}
    for src in sources:
        rank.setdefault(src, len(rank))
    listed = list(diags)
    for d in listed:
        rank.setdefault(d.source, len(rank))
    return tuple(sorted(listed, key=lambda d: (rank[d.source], d.lineno, d.field)))


def load_text(
    text: str,
    source: str,
    cli_defaults: Options = _NO_OPTIONS,
    lookups: Lookups | None = None,
) -> LoadedConfig:
    """Parse and resolve ``text`` (``.include`` paths relative to ``source``'s directory).

    Reading follows the rules of ``poolinetd.includes`` (regular files only,
    bounded, each once, UTF-8 outside comments).
    """
    return _finish(includes.load_text(text, source), source, cli_defaults, lookups)


def load_file(
    path: str, cli_defaults: Options = _NO_OPTIONS, lookups: Lookups | None = None
) -> LoadedConfig:
    """Read, parse and resolve the config at ``path``; an unreadable file is a diagnostic.

    A FIFO, device or directory given as ``path`` is refused without
    waiting on it (see ``poolinetd.includes``).
    """
    return _finish(includes.load_path(path), path, cli_defaults, lookups)


def _finish(parsed: ParsedConfig, source: str, cli_defaults: Options,
            lookups: Lookups | None) -> LoadedConfig:
    services, diags = resolve(
        parsed, cli_defaults, lookups if lookups is not None else system_lookups()
    )
    sources = [source, *(s.source for s in parsed.specs)]
    return LoadedConfig(
        services,
        _ordered((*parsed.diagnostics, *diags), sources),
        max_connections=global_cap(cli_defaults.max_connections, parsed.defaults.max_connections),
        max_programs=global_cap(cli_defaults.max_programs, parsed.defaults.max_programs),
    )


def global_cap(cli: int | None, file: int | None) -> int | None:
    """A global cap: the command line's if given, else the file's; None or 0 = no cap."""
    value = cli if cli is not None else file
    return value or None
