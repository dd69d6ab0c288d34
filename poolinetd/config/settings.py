"""A service's settings after precedence: pool sizes, timeouts, stderr, environment, traffic
rules (access lists, PROXY protocol, per-source keying) and limits.

Pure. Each value is the entry's, else the file's ``defaults``', else the
command line's, else spec.DEFAULT_* (docs/configuration.md); combinations
that cannot work are reported to the ``SpecReport``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from poolinetd.config import accesslists
from poolinetd.config.report import SpecReport
from poolinetd.config.servers import TCP_PROTOCOLS
from poolinetd.config.spec import (
    DEFAULT_BACKLOG,
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
    PROGRAM_LAUNCH_WORKERS,
    RLIMIT_KEYS,
    SAFE_SHARE,
    Limits,
    Options,
    PoolSettings,
    ProcessControls,
    ServiceSpec,
    SocketControls,
    SocketType,
    StderrRoute,
)
from poolinetd.net.netmatch import AddressList

_T = TypeVar("_T")
_PER_SOURCE = ("max_cpm_per_ip", "max_child_per_ip")
_PROCESS_KEYS = (*(key for key, _ in RLIMIT_KEYS), "nice", "umask")
_TCP_STREAM_KEYS = ("keepalive", "nodelay", "defer_accept")
_EMPTY = AddressList()
Env = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Launch:
    """How the service's workers run (the Service fields of the same names)."""

    pool: PoolSettings
    conn_timeout: float
    stderr: StderrRoute
    env: Env


@dataclass(frozen=True, slots=True)
class Traffic:
    """Who may connect and how connections are counted (the Service fields of the same names)."""

    only_from: AddressList
    no_access: AddressList
    source_v4_prefix: int
    source_v6_prefix: int
    block_time: float
    reuseport: bool
    proxy_protocol: bool
    proxy_from: AddressList


def merged_env(chain: Iterable[Options]) -> Env:
    """The env of ``chain`` (most specific first): the first source that sets a name wins."""
    env: dict[str, str] = {}
    for options in reversed(tuple(chain)):  # later (more specific) sources override
        env.update(options.env)
    return tuple(env.items())


class Settings:
    """Settles one spec's options along ``chain``: entry, file defaults, command line.

    ``base_env`` is the env of everything but the entry, merged once per load
    (not once per entry).
    """

    def __init__(
        self, spec: ServiceSpec, chain: tuple[Options, ...], base_env: Env, out: SpecReport
    ) -> None:
        self.spec = spec
        self.chain = chain
        self.base_env = base_env
        self.out = out

    def pick(self, get: Callable[[Options], _T | None]) -> _T | None:
        """The first value ``get`` finds along the chain (None: set nowhere)."""
        for options in self.chain:
            value = get(options)
            if value is not None:
                return value
        return None

    def launch(self, is_internal: bool) -> Launch:
        """Pool sizes, conn_timeout, stderr and env; built-ins and programs differ in defaults."""

        def num(get: Callable[[Options], float | None], default: float) -> float:
            value = self.pick(get)
            return default if value is None else value

        per_worker = (
            DEFAULT_WORKER_CONNECTIONS_INTERNAL
            if is_internal
            else DEFAULT_WORKER_CONNECTIONS_PROGRAM
        )
        pool_max = int(num(lambda o: o.pool_max, DEFAULT_POOL_MAX))
        # The program default never exceeds an explicit pool_max.
        min_default = DEFAULT_POOL_MIN if is_internal else min(DEFAULT_POOL_MIN_PROGRAM, pool_max)
        pool = PoolSettings(
            pool_min=int(num(lambda o: o.pool_min, min_default)),
            pool_max=pool_max,
            worker_connections=int(num(lambda o: o.worker_connections, per_worker)),
            max_requests=int(num(lambda o: o.max_requests, DEFAULT_MAX_REQUESTS)),
            idle_timeout=float(num(lambda o: o.idle_timeout, DEFAULT_IDLE_TIMEOUT)),
            spread=not is_internal,
            launch_depth=0 if is_internal else PROGRAM_LAUNCH_DEPTH,
            launch_workers=0 if is_internal else PROGRAM_LAUNCH_WORKERS,
        )
        if pool.pool_min > pool.pool_max:
            role = "pool_min" if self.spec.options.pool_min is not None else "pool_max"
            self.out.report(
                role,
                f"pool_min {pool.pool_min} is larger than pool_max {pool.pool_max}",
                "raise pool_max or lower pool_min",
            )
        env = self.base_env
        if self.spec.options.env:
            env = merged_env((*self.chain[:1], Options(env=self.base_env)))
        stderr = self.pick(lambda o: o.stderr)
        return Launch(
            pool=pool,
            conn_timeout=float(num(lambda o: o.conn_timeout, DEFAULT_CONN_TIMEOUT)),
            stderr=StderrRoute.SOCKET if stderr is None else stderr,
            env=env,
        )

    def traffic(self, spec: ServiceSpec) -> Traffic:
        """Access lists, per-source keying, PROXY protocol and SO_REUSEPORT, defaults applied.

        ``spec`` is the entry after the built-in wait rule (a stream built-in is nowait).
        """
        own = spec.options
        only, deny = self.pick(lambda o: o.only_from), self.pick(lambda o: o.no_access)
        if spec.protocol.is_unix:
            # Unix peers have no address: the socket file's mode decides who connects.
            for key in ("only_from", "no_access"):
                if getattr(own, key) is not None:
                    self.out.report(key, f"{key} needs an IP service: unix peers have no "
                                    "address", "limit who may connect with the socket's "
                                    ":owner:group:mode:")
            only = deny = None
        elif only and deny and (own.only_from is None) != (own.no_access is None):
            # One list is the entry's, the other from defaults (the parser judged the
            # lists written together).
            self.contradiction(only, deny, "only_from" if own.only_from is not None
                               else "no_access")
        proxy_protocol = own.proxy_protocol is True
        if proxy_protocol:
            proxy_from = self.proxy_from(spec)
        else:
            self.unused_proxy_from(spec)
            proxy_from = None
        reuseport = self.pick(lambda o: o.reuseport) is True
        if spec.tcpmux is not None:
            if own.reuseport is not None:
                self.out.report("reuseport", "reuseport ignored: a tcpmux sub-service has no "
                                "socket of its own", "set it on the tcpmux listener",
                                warning=True)
            reuseport = False
        v4, v6 = self.pick(lambda o: o.source_v4_prefix), self.pick(lambda o: o.source_v6_prefix)
        block = self.pick(lambda o: o.block_time)
        return Traffic(
            only_from=only or _EMPTY,
            no_access=deny or _EMPTY,
            source_v4_prefix=DEFAULT_SOURCE_V4_PREFIX if v4 is None else v4,
            source_v6_prefix=DEFAULT_SOURCE_V6_PREFIX if v6 is None else v6,
            block_time=0.0 if block is None else float(block),
            reuseport=reuseport,
            proxy_protocol=proxy_protocol,
            proxy_from=proxy_from or _EMPTY,
        )

    def proxy_from(self, spec: ServiceSpec) -> AddressList | None:
        """The proxies trusted to send a PROXY header (``proxy_protocol=yes``), checked."""
        ok_kind = (spec.socket_type is SocketType.STREAM and not spec.wait
                   and (spec.protocol in TCP_PROTOCOLS or spec.protocol.is_unix))
        trusted = self.pick(lambda o: o.proxy_from)
        if spec.tcpmux is not None:
            self.out.report("proxy_protocol", "a tcpmux sub-service reads no PROXY header",
                            "set proxy_protocol=yes on the tcpmux listener")
        elif not ok_kind:
            self.out.report("proxy_protocol",
                            "proxy_protocol=yes needs a stream tcp or unix nowait service",
                            "a PROXY header starts a connection; datagram and wait services "
                            "have none")
        elif spec.protocol.is_unix:
            if spec.options.proxy_from is not None:
                self.out.report("proxy_from", "proxy_from needs an IP service: unix peers "
                                "have no address", "the socket's :owner:group:mode: decides "
                                "who may send the header")
            return None
        elif not trusted:
            self.out.report("proxy_protocol",
                            "proxy_protocol=yes needs proxy_from=..., the proxies trusted to "
                            "send the header", "write e.g. proxy_from=10.0.0.5 10.0.0.6")
        return trusted

    def unused_proxy_from(self, spec: ServiceSpec) -> None:
        """Without ``proxy_protocol=yes`` no header is read: an entry's proxy_from is a slip."""
        if spec.options.proxy_from is not None:
            self.out.report("proxy_from", "proxy_from without proxy_protocol=yes is ignored",
                            "add proxy_protocol=yes or remove proxy_from", warning=True)

    def contradiction(self, only: AddressList, deny: AddressList, role: str) -> None:
        """Judge the entry's access list against the other one from defaults."""
        found = accesslists.contradiction(
            only, deny, hint_more=" (one of them comes from defaults)"
        )
        if found is not None:
            self.out.report(role, found.message, found.hint, warning=not found.error)

    def process(self, is_internal: bool) -> ProcessControls:
        """rlimit_*, nice and umask along the chain; none for a built-in (no program runs).

        The entry's own keys on a built-in are a slip (warning); ``defaults``' are not.
        """
        if is_internal:
            for key in _PROCESS_KEYS:
                if getattr(self.spec.options, key) is not None:
                    self.out.report(key, f"{key} ignored: a built-in runs no program",
                                    "process controls apply to launched programs",
                                    warning=True)
            return ProcessControls()
        rlimits: list[tuple[str, int]] = []
        for key, _ in RLIMIT_KEYS:
            for options in self.chain:
                value: int | None = getattr(options, key)
                if value is not None:
                    rlimits.append((key, value))
                    break
        return ProcessControls(rlimits=tuple(rlimits), nice=self.pick(lambda o: o.nice),
                               umask=self.pick(lambda o: o.umask))

    def sockopts(self, spec: ServiceSpec) -> SocketControls:
        """rcvbuf, sndbuf, keepalive, nodelay, backlog and defer_accept along the chain.

        A key that cannot apply to this kind of socket is dropped: with a warning
        when the entry wrote it, silently when it comes from ``defaults`` (which
        serve every kind). A tcpmux sub-service has no socket: its listener's apply.
        """
        own = spec.options
        tcp_stream = (spec.socket_type is SocketType.STREAM and spec.protocol in TCP_PROTOCOLS
                      and spec.tcpmux is None)
        has_queue = spec.socket_type is not SocketType.DGRAM and spec.tcpmux is None
        ip_socket = not spec.protocol.is_unix and spec.tcpmux is None
        for key in _TCP_STREAM_KEYS:
            if getattr(own, key) is not None and not tcp_stream:
                self.out.report(key, f"{key} ignored: it applies to stream tcp listeners",
                                "remove it", warning=True)
        if own.backlog is not None and not has_queue:
            self.out.report("backlog", "backlog ignored: only a listening socket has one",
                            "remove it", warning=True)
        for key in ("rcvbuf", "sndbuf"):
            if getattr(own, key) is not None and not ip_socket:
                self.out.report(key, f"{key} ignored: it applies to tcp and udp sockets",
                                "remove it", warning=True)
        backlog = self.pick(lambda o: o.backlog) if has_queue else None
        return SocketControls(
            backlog=DEFAULT_BACKLOG if backlog is None else backlog,
            rcvbuf=self.pick(lambda o: o.rcvbuf) if ip_socket else None,
            sndbuf=self.pick(lambda o: o.sndbuf) if ip_socket else None,
            keepalive=tcp_stream and self.pick(lambda o: o.keepalive) is True,
            nodelay=tcp_stream and self.pick(lambda o: o.nodelay) is True,
            defer_accept=(self.pick(lambda o: o.defer_accept) or 0) if tcp_stream else 0,
        )

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
                self.out.report(name if name in dict(spec.locs) else "wait",
                                f"{name} on a unix socket counts all clients as one source "
                                "(unix peers have no address)", "use max_child or "
                                "max_spawn_per_min for a limit on the whole service",
                                warning=True)
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
            return Limits(**values, unlimited=frozenset(lifted), safe_default=True)
        return Limits(**values, unlimited=frozenset(lifted), safe_default=False)
