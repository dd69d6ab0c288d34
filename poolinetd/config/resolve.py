"""Resolve parsed specs into services: ports, endpoints, uid/gid/groups, built-ins, pool sizes.

Touches the OS only through a ``Lookups`` value (``system_lookups()`` by
default, fakes in tests) and, in ``load_file``/``load_text``, by reading the
config file and its ``.include`` files. Never raises on a bad config: every
problem is a Diagnostic. Entry points: ``resolve``, ``load_file``, ``load_text``.

This module checks what an entry combines and assembles the ``Service``; the
parts live beside it: ``lookups`` (the name services), ``endpoints`` (port and
sockets), ``identity`` (user, groups, socket owner), ``servers`` (program or
built-in), ``settings`` (options after precedence), ``overlap`` (duplicates).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from poolinetd.config import includes, overlap, tcpwrappers_entry
from poolinetd.config.endpoints import endpoints, service_port, transport
from poolinetd.config.identity import credentials, socket_owner
from poolinetd.config.lookups import Lookups, UserEntry, attempt, system_lookups
from poolinetd.config.preload import python_preload
from poolinetd.config.report import SpecReport
from poolinetd.config.servers import TCP_PROTOCOLS, choose_server, display_name
from poolinetd.config.settings import Env, Settings, merged_env
from poolinetd.config.spec import (
    TCPMUX,
    Diagnostic,
    Endpoint,
    Options,
    ParsedConfig,
    RpcProgram,
    Service,
    ServiceKey,
    ServiceSpec,
    Severity,
    SocketType,
)
from poolinetd.net import tcpmux

# Lookups, UserEntry, system_lookups and display_name are imported from here by the
# command line, tests and benchmarks: this module stays resolution's front door.
__all__ = [
    "LoadedConfig",
    "Lookups",
    "UserEntry",
    "display_name",
    "load_file",
    "load_text",
    "resolve",
    "system_lookups",
]

# Bound on the sum of every service's env variables in one load (each service carries its
# whole environment, so a big ``defaults env=`` times many entries would be quadratic).
MAX_ENV_TOTAL = 2_000_000
_NO_OPTIONS = Options()  # frozen, so one shared default is safe


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
    """Resolves one enabled spec; collects diagnostics (``out``) instead of raising."""

    def __init__(self, spec: ServiceSpec, chain: tuple[Options, ...], lookups: Lookups,
                 base_env: Env | None = None) -> None:
        self.spec = spec
        self.lk = lookups
        self.out = SpecReport(spec)
        # chain: entry options, file defaults, command line: first set wins.
        self.settings = Settings(
            spec, chain, merged_env(chain[1:]) if base_env is None else base_env, self.out
        )

    def run(self) -> Service | None:
        """The service ``spec`` describes, or None when it has an error (in ``out``)."""
        spec = self.spec
        self.check_kinds()
        mux = self.tcpmux_name()
        port = 0 if spec.tcpmux is not None else self.port()
        # A tcpmux sub-service has no socket: it is reached through a tcpmux listener.
        bound: tuple[Endpoint, ...] = ()
        if port is not None and spec.tcpmux is None:
            bound = endpoints(spec, port, self.lk, self.out)
        rpc = self.rpc_program(bound)
        server = choose_server(spec, port, self.lk, self.out)
        ids = credentials(spec, self.lk, self.out)
        owner = socket_owner(spec, self.lk, self.out)
        if spec.login_class is not None:
            self.out.report(
                "user",
                f"login class {spec.login_class!r} ignored",
                "login classes are a BSD feature; Linux has none",
                warning=True,
            )
        if server.internal is not None and spec.wait and spec.socket_type is SocketType.STREAM:
            # FreeBSD rule: a stream built-in always runs nowait.
            self.out.report("wait", "stream built-in served as nowait", "write nowait",
                            warning=True)
            spec = replace(spec, wait=False)
        server, wrapped = tcpwrappers_entry.settle(
            spec, server, self.settings.pick(lambda o: o.tcp_wrappers), self.out)
        launch = self.settings.launch(server.internal is not None)
        traffic = self.settings.traffic(spec)
        limits = self.settings.limits(spec, launch.pool)
        process = self.settings.process(server.internal is not None)
        preload = python_preload(self.settings.pick(lambda o: o.preload),
                                 spec.options.preload is not None,
                                 self.settings.pick(lambda o: o.preload_modules), server,
                                 self.lk, self.out)
        sockopts = self.settings.sockopts(spec)
        if self.out.failed or ids is None or port is None:
            return None
        name = display_name(spec, server.internal, server.argv)
        any_port = any(ep.port == 0 for ep in bound) and not spec.protocol.is_unix
        label = name if any_port or mux is not None else ""
        return Service(
            spec=spec,
            name=name,
            key=ServiceKey(spec.socket_type, spec.protocol.is_udp, bound, label),
            uid=ids.user.uid,
            gid=ids.gid,
            groups=ids.groups,
            user_name=ids.user.name,
            home=ids.user.home,
            internal=server.internal,
            program=server.program,
            argv=server.argv,
            pool=launch.pool,
            conn_timeout=launch.conn_timeout,
            stderr=launch.stderr,
            env=launch.env,
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
            tcp_wrappers=wrapped,
            rpc=rpc,
            tcpmux_name=mux,
            tcpmux_plus=spec.tcpmux_plus if mux is not None else False,
            process=process,
            preload=preload,
            sockopts=sockopts,
        )

    def check_kinds(self) -> None:
        """Report socket type / protocol / wait combinations poolinetd cannot serve."""
        spec, report = self.spec, self.out.report
        st, proto = spec.socket_type, spec.protocol
        if st in (SocketType.RAW, SocketType.RDM):
            report(
                "socket_type",
                f"socket type {st.value} is not supported",
                "use stream, dgram or seqpacket",
            )
        elif st is SocketType.SEQPACKET and not proto.is_unix:
            report("socket_type", "seqpacket needs protocol unix", "write seqpacket unix")
        elif st is SocketType.STREAM and proto.is_udp:
            report("protocol", f"stream does not go with {proto.value}", "use tcp for stream")
        elif st is SocketType.DGRAM and not (proto.is_udp or proto.is_unix):
            report("protocol", f"dgram does not go with {proto.value}", "use udp for dgram")
        if spec.tcpmux is not None:
            if st is not SocketType.STREAM:
                report("socket_type", "a tcpmux sub-service is stream only",
                       "write tcpmux/NAME stream tcp nowait ...")
            elif proto not in TCP_PROTOCOLS:
                report("protocol", "a tcpmux sub-service is reached over TCP",
                       "write tcpmux/NAME stream tcp nowait ...")
            if spec.wait:
                report("wait", "a tcpmux sub-service is nowait: it has no socket to wait on",
                       "write nowait")
            if spec.addresses:
                report("service", "listen address ignored: a tcpmux sub-service is "
                       "reached through the tcpmux listener", "remove the address",
                       warning=True)

    def rpc_program(self, bound: tuple[Endpoint, ...]) -> RpcProgram | None:
        """An RPC entry's program number (a name through /etc/rpc), versions and rpcbind
        netids; None for other entries and after reporting a problem."""
        spec = self.spec
        if spec.rpc is None:
            return None
        name = spec.service
        number = (int(name) if name.isascii() and name.isdigit()
                  else attempt(self.lk.getrpcbyname, name))
        if number is None:
            self.out.report("service", f"unknown RPC program {name!r}",
                            "add it to /etc/rpc or write the program number")
            return None
        if len(bound) > 1:
            # rpcbind maps a program and version to one address per transport.
            self.out.report("service", "an RPC service listens on one address",
                            "write one address (or none: the wildcard)")
            return None
        netid = "tcp" if spec.protocol in TCP_PROTOCOLS else "udp"
        six = spec.protocol.value.endswith("6")
        dual = spec.protocol.value.endswith("46")
        netids = (netid, netid + "6") if dual else (netid + "6",) if six else (netid,)
        return RpcProgram(number, spec.rpc.low, spec.rpc.high, netids)

    def tcpmux_name(self) -> str | None:
        """The lower-cased name of a ``tcpmux/NAME`` sub-service (None for other entries)."""
        name = self.spec.tcpmux
        if name is None:
            return None
        if not (name.isascii() and name.isprintable()) or len(name) > tcpmux.MAX_NAME:
            self.out.report("service", "a tcpmux name is printable ASCII, at most "
                            f"{tcpmux.MAX_NAME} characters", "rename the sub-service")
            return None
        lower = name.lower()
        if lower == tcpmux.HELP:
            self.out.report("service", "HELP is tcpmux's own request (it lists the "
                            "sub-services)", "give the sub-service another name")
        return lower

    def port(self) -> int | None:
        """The entry's port; None after reporting an unknown service name."""
        port = service_port(self.spec, self.lk)
        if port is None:
            proto = transport(self.spec)
            self.out.report(
                "service",
                f"unknown service {self.spec.service!r} for {proto}",
                "add it to /etc/services or write the port number",
            )
        return port


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
    base_env = merged_env((parsed.defaults, cli_defaults))
    env_total = 0
    for spec in parsed.specs:
        if not spec.enabled:
            continue  # "off" entries are parsed, not resolved: they may name absent users
        resolver = _SpecResolver(spec, (spec.options, parsed.defaults, cli_defaults), lookups,
                                 base_env)
        service = resolver.run()
        diags.extend(resolver.out.diags)
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
    kept, rpc_diags = _rpc_check(kept)
    mux_diags += rpc_diags
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


def _rpc_check(services: list[Service]) -> tuple[list[Service], list[Diagnostic]]:
    """Drop an RPC service that registers a program, version and transport an earlier one
    registers: rpcbind maps each of them to one port."""
    kept: list[Service] = []
    diags: list[Diagnostic] = []
    owners: dict[tuple[int, int, str], Service] = {}
    for svc in services:
        rpc = svc.rpc
        if rpc is None:
            kept.append(svc)
            continue
        wanted = [(rpc.number, v, n) for n in rpc.netids for v in rpc.versions]
        clash = next((owners[k] for k in wanted if k in owners), None)
        if clash is not None:
            where = svc.spec.loc("service")
            diags.append(Diagnostic(
                svc.spec.source, where.lineno, where.field, where.token,
                f"RPC program {rpc.number} is also registered by {clash.name} at "
                f"{clash.spec.source}:{clash.spec.lineno} for the same version and transport",
                "rpcbind maps a program's version to one port: remove one or split the "
                "versions"))
            continue
        owners.update(dict.fromkeys(wanted, svc))
        kept.append(svc)
    return kept, diags


def _ordered(diags: Iterable[Diagnostic], sources: list[str]) -> tuple[Diagnostic, ...]:
    """``diags`` in file order: by file (as first met in ``sources``), then line and field.

    Stable, so problems found at the same field keep the order they were found in.
    """
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

    Reading follows the rules of ``config.includes`` (regular files only,
    bounded, each once, UTF-8 outside comments).
    """
    return _finish(includes.load_text(text, source), source, cli_defaults, lookups)


def load_file(
    path: str, cli_defaults: Options = _NO_OPTIONS, lookups: Lookups | None = None
) -> LoadedConfig:
    """Read, parse and resolve the config at ``path``; an unreadable file is a diagnostic.

    A FIFO, device or directory given as ``path`` is refused without
    waiting on it (see ``config.includes``).
    """
    return _finish(includes.load_path(path), path, cli_defaults, lookups)


def _finish(parsed: ParsedConfig, source: str, cli_defaults: Options,
            lookups: Lookups | None) -> LoadedConfig:
    """Resolve ``parsed`` (read from ``source``) and settle the global caps."""
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
