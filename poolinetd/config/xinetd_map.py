"""xinetd blocks -> poolinetd's ServiceSpecs: what each attribute means here, or why not.

Pure: no I/O, no name lookups (resolve does those, as for inetd.conf).
``build(blocks)`` takes every ``defaults`` and ``service`` block of a load,
in file order, and returns a ``ParsedConfig``: one spec per service block
that maps cleanly and a Diagnostic for every attribute poolinetd does not
apply as xinetd would, naming the attribute and saying what poolinetd does
instead. Total: ``build`` never raises (a bug becomes an error diagnostic).

Every attribute of xinetd.conf(5) is in exactly one of the tables below
(``attrs.MAPPED``, ``attrs.WARNED``, ``attrs.REFUSED``, ``attrs.DEFAULTS_ONLY``); tests check that.

Semantics kept from xinetd 2.3.15 (Debian's, checked against the real
daemon by tests/test_xinetd_diff.py):

* ``defaults`` give bind, per_source, instances, cps, umask, groups, banner*,
  max_load and log_type to services that do not set them; only_from,
  no_access, log_on_*, passenv accumulate there, and a service's ``+=``/``-=``
  starts from them while its ``=`` replaces them.
* only_from/no_access: an address in both lists is refused (xinetd 2.3.15
  logs "only_from list and no_access list match equally" and refuses, whatever
  the masks; the man page's "better match wins" is xinetd 2.1's rule), which
  is poolinetd's own rule: no_access wins. IPv4 addresses written without a
  length treat their trailing zero parts as wildcards (10.0.0.0 = 10.0.0.0/8,
  0.0.0.0 = everyone); ``10.0.{1,2}`` = 10.0.1.0/24 and 10.0.2.0/24.
* only_from written with no value: nobody is served (the service is not served).
* instances, per_source -> max_child, max_child_per_ip; ``cps N M`` -> at most N
  starts in a 1 s window, then a rest of M s (ServiceSpec.spawn_window/pause).
* banner, banner_success, banner_fail: the files' bytes (read through the
  ``read_banner`` passed in, ``xinetd_extras``) are sent on accept, before a
  client is served, and to a refused client. A stream nowait service without
  NOLIBWRAP is judged by tcp_wrappers, as Debian's libwrap-enabled xinetd judges it.
* instances: a connection past it is accepted and refused at once (AtLimit.REFUSE),
  as xinetd refuses it, where inetd.conf's max_child leaves it in the backlog.
* passenv: the named variables of the master's environment at load (``environ``).
* A single-valued attribute with other than one value is ignored with a warning,
  as xinetd ignores it (``per_source = 10 # comment``: no inline comments).
* A disabled service (``disable = yes``, defaults' ``disabled``, or left out of
  defaults' ``enabled``) is read but not served; its problems are warnings.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from poolinetd.config import accesslists, values, xinetd_extras
from poolinetd.config import xinetd_attrs as attrs
from poolinetd.config.report import short
from poolinetd.config.spec import (
    AtLimit,
    Diagnostic,
    FieldLoc,
    Limits,
    Options,
    ParsedConfig,
    Protocol,
    ServiceSpec,
    Severity,
    SocketType,
)
from poolinetd.config.xinetd_extras import BANNER_MAX, BannerReader
from poolinetd.config.xinetd_lexer import Attr, Block
from poolinetd.net import netmatch
from poolinetd.net.netmatch import AddressList

__all__ = ["BANNER_MAX", "build"]

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
@dataclass(slots=True)
class _Value:
    """An attribute's value as the service sees it, with where it was written."""

    values: list[str]
    source: str
    lineno: int
    own: bool  # written in the service block (not inherited from defaults)


@dataclass(slots=True)
class _Defaults:
    """Every ``defaults`` block merged: single attributes and accumulated sets."""

    single: dict[str, _Value] = field(default_factory=dict)
    sets: dict[str, _Value] = field(default_factory=dict)


def build(blocks: Sequence[Block], read_banner: BannerReader | None = None,
          environ: Mapping[str, str] | None = None) -> ParsedConfig:
    """The specs and diagnostics of every block of one load (every file, in order).

    ``read_banner`` reads a banner file (``xinetd_load`` passes one; without it the
    banner attributes are read but nothing is attached); ``environ`` is what passenv
    takes its values from (None: nothing is passed). Total: a bug is reported as an
    error diagnostic, never raised. A warning about a value inherited from defaults is
    given once, at the defaults' line, not once per service.
    """
    try:
        return _build(blocks, read_banner, environ or {})
    except Exception as exc:
        where = blocks[0].source if blocks else "<xinetd>"
        bug = Diagnostic(where, 0, 0, "", f"internal parser error: {exc!r}",
                         "please report this with the file")
        return ParsedConfig((), Options(), (bug,))


def _build(blocks: Sequence[Block], read_banner: BannerReader | None,
           environ: Mapping[str, str]) -> ParsedConfig:
    diags: list[Diagnostic] = []
    defaults = _Defaults()
    for block in blocks:
        if block.kind == "defaults":
            _read_defaults(block, defaults, diags)
    specs: list[ServiceSpec] = []
    ids: dict[str, Block] = {}
    for block in blocks:
        if block.kind != "service":
            continue
        svc = _Service(block, defaults, read_banner, environ)
        spec = svc.build()
        first = ids.setdefault(svc.ident, block)
        if first is not block:
            svc.problem(block.source, block.lineno, "id", f"service id {svc.ident!r} is "
                        f"already used at {first.source}:{first.lineno}",
                        "give one of them another id = ...")
            spec = None
        diags.extend(svc.finish())
        if spec is not None:
            specs.append(spec)
    unique = dict.fromkeys(diags)  # (Diagnostic is a frozen dataclass: equal ones once)
    return ParsedConfig(tuple(specs), Options(), tuple(unique))


def _read_defaults(block: Block, into: _Defaults, diags: list[Diagnostic]) -> None:
    """Merge one ``defaults`` block: sets accumulate ("=" adds, as xinetd does there)."""
    for attr in block.attrs:
        name = attr.name
        if name in attrs.WARNED and (name in attrs.LIST_ATTRS or name in attrs.INHERITED):
            diags.append(_diag(block.source, attr.lineno, name, f"{name} is not applied",
                               attrs.WARNED[name], Severity.WARNING))
        if name in attrs.LIST_ATTRS or name in attrs.DEFAULTS_ONLY:
            got = into.sets.setdefault(name, _Value([], block.source, attr.lineno, False))
            if attr.op == "-=":
                got.values = [v for v in got.values if v not in attr.values]
            else:
                got.values.extend(attr.values)
        elif name in attrs.INHERITED:
            if attr.op != "=":
                diags.append(_diag(block.source, attr.lineno, name, f"{name} takes '=' only",
                                   f"write {name} = ..."))
            into.single[name] = _Value(list(attr.values), block.source, attr.lineno, False)
        elif attrs.known(name):
            diags.append(_diag(block.source, attr.lineno, name, f"{name} in defaults is "
                               "ignored: xinetd does not take it there",
                               "set it in each service", Severity.WARNING))
        else:
            diags.append(_diag(block.source, attr.lineno, name, f"unknown attribute {name!r}",
                               "see xinetd.conf(5) and docs/configuration.md"))


def _diag(source: str, lineno: int, name: str, message: str, hint: str,
          severity: Severity = Severity.ERROR) -> Diagnostic:
    return Diagnostic(source, lineno, 0, short(name), message, hint, severity)


class _Service:
    """One service block mapped onto a ServiceSpec; problems collected, never raised."""

    def __init__(self, block: Block, defaults: _Defaults,
                 read_banner: BannerReader | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        self.block = block
        self.read_banner = read_banner
        self.environ = environ or {}
        self.defaults = defaults
        self.diags: list[Diagnostic] = []
        self.failed = False
        self.disabled = False
        self.values: dict[str, _Value] = {}
        self.cps: tuple[float, float] | None = None  # cps N M: (window, rest) seconds
        self.locs: dict[str, FieldLoc] = {"service": FieldLoc(block.lineno, 0,
                                                              f"service {block.name}")}
        self.collect()
        ident = self.one("id")
        self.ident = ident if ident is not None else block.name

    # -- reporting ------------------------------------------------------------------------

    def problem(self, source: str, lineno: int, name: str, message: str, hint: str = "",
                *, warning: bool = False) -> None:
        """Record a problem with attribute ``name`` (errors fail the service)."""
        self.failed = self.failed or not warning
        self.diags.append(_diag(source, lineno, name, message, hint,
                                Severity.WARNING if warning else Severity.ERROR))

    def at(self, name: str, message: str, hint: str = "", *, warning: bool = False) -> None:
        """A problem with ``name`` where its value was written (or at the block's head)."""
        got = self.values.get(name)
        if got is None:
            self.problem(self.block.source, self.block.lineno, name, message, hint,
                         warning=warning)
        else:
            self.problem(got.source, got.lineno, name, message, hint, warning=warning)

    def finish(self) -> list[Diagnostic]:
        """The diagnostics; a disabled service's errors become warnings (it is not served)."""
        if not self.disabled:
            return self.diags
        return [d if d.severity is Severity.WARNING else Diagnostic(
            d.source, d.lineno, d.field, d.token, d.message + " (the service is disabled, "
            "so it is not served)", d.hint, Severity.WARNING) for d in self.diags]

    # -- values ---------------------------------------------------------------------------

    def collect(self) -> None:
        """Own attributes by name, then what defaults give; shape errors reported."""
        block = self.block
        for attr in block.attrs:
            name = attr.name
            if name in attrs.DEFAULTS_ONLY:
                self.problem(block.source, attr.lineno, name, f"{name} belongs in defaults",
                             "move it to the defaults block")
            elif not attrs.known(name):
                self.problem(block.source, attr.lineno, name, f"unknown attribute {name!r}",
                             "see xinetd.conf(5) and docs/configuration.md")
            elif name in attrs.LIST_ATTRS:
                self.list_attr(attr)
            elif attr.op != "=":
                self.problem(block.source, attr.lineno, name,
                             f"{name} takes '=' only ({attr.op} is for sets such as only_from)",
                             f"write {name} = ...")
            elif name in self.values:
                # xinetd 2.3.15 warns "attribute already set" and keeps the first value.
                self.problem(block.source, attr.lineno, name, f"{name} set twice: the first "
                             f"(line {self.values[name].lineno}) is kept, as xinetd keeps it",
                             "remove one", warning=True)
            else:
                self.values[name] = _Value(list(attr.values), block.source, attr.lineno, True)
            if name not in self.locs:
                self.locs[name] = FieldLoc(attr.lineno, 0, name)
        for name, got in self.defaults.single.items():
            self.values.setdefault(name, got)
        for name in attrs.LIST_ATTRS:
            if name not in self.values and name in self.defaults.sets:
                self.values[name] = self.defaults.sets[name]

    def list_attr(self, attr: Attr) -> None:
        """A set attribute: "=" replaces what defaults give, "+=" adds, "-=" removes."""
        got = self.values.get(attr.name)
        if got is None:
            inherited = self.defaults.sets.get(attr.name)
            start = [] if attr.op == "=" or inherited is None else list(inherited.values)
            got = self.values[attr.name] = _Value(start, self.block.source, attr.lineno, True)
        if attr.op == "=":
            got.values = list(attr.values)
        elif attr.op == "+=":
            got.values.extend(attr.values)
        elif attr.name == "env":
            self.problem(self.block.source, attr.lineno, "env", "env does not take '-='",
                         "write env = NAME=value ...")
        else:
            got.values = [v for v in got.values if v not in attr.values]
        got.lineno = attr.lineno

    def one(self, name: str) -> str | None:
        """The single value of ``name`` (None: not set).

        With another number of values xinetd 2.3.15 warns and ignores the attribute
        (``per_source = 10 # per IP`` sets nothing: there are no inline comments), so
        poolinetd ignores it too, with a warning, and reads on as if it were absent.
        """
        got = self.values.get(name)
        if got is None:
            return None
        if len(got.values) != 1:
            comment = any(v.startswith("#") for v in got.values)
            self.at(name, f"{name} takes one value, not {len(got.values)}: ignored, as "
                    "xinetd ignores it", "xinetd has no comments after a value: move the "
                    "comment to a line of its own" if comment else f"write {name} = VALUE",
                    warning=True)
            del self.values[name]
            return None
        return got.values[0]

    def words(self, name: str) -> list[str] | None:
        got = self.values.get(name)
        return None if got is None else got.values

    # -- the mapping ----------------------------------------------------------------------

    def build(self) -> ServiceSpec | None:
        """The spec this block describes, or None when it has an error (recorded)."""
        types = self.types()
        flags = self.flags()
        self.disabled = self.is_disabled(flags)
        for name, why in attrs.WARNED.items():
            if name in self.values and self.values[name].own:
                self.at(name, f"{name} is not applied", why, warning=True)
        for name, why in attrs.REFUSED.items():
            if name in self.values:
                self.at(name, f"{name} is not supported", why)
        if "RPC" in types:
            self.at("type", "RPC services are not supported",
                    "poolinetd serves tcp, udp and unix services; keep RPC under xinetd")
            return None
        socket_type = self.socket_type()
        protocol = self.protocol(socket_type, flags)
        wait = self.yes_no("wait", required=True)
        user = self.one("user")
        if user is None and "user" not in self.values:
            self.at("user", "user is required", "add user = nobody (or the account to run as)")
        group = self.one("group")
        server, argv = self.server(types, flags)
        service, mux, plus = self.service_name(types)
        addresses = self.bind()
        only, deny, nobody = self.access_lists()
        env = self.env()
        xinetd_extras.check_log_fields(self)
        controls = self.controls(flags)
        limits = self.limits()
        self.groups()
        if nobody:
            self.disabled = True
        # xinetd (Debian's is built with libwrap) consults hosts.allow/hosts.deny for every
        # service without NOLIBWRAP, under the same daemon name poolinetd derives (the
        # program's basename, the built-in's name); poolinetd judges natively only the
        # stream nowait services whose connections its master accepts.
        if (socket_type is SocketType.STREAM and wait is False and "NOLIBWRAP" not in flags
                and "libwrap" not in self.values):
            controls["tcp_wrappers"] = True
        if (self.failed or socket_type is None or protocol is None or wait is None
                or user is None or server is None or service is None):
            return None
        banners = xinetd_extras.banners(self, socket_type, self.read_banner)
        return ServiceSpec(
            service=service,
            socket_type=socket_type,
            protocol=protocol,
            wait=wait,
            user=user,
            server=server,
            argv=argv,
            addresses=addresses,
            group=group,
            limits=limits,
            tcpmux=mux,
            tcpmux_plus=plus,
            options=Options(env=env, only_from=only, no_access=deny,
                            **controls),  # type: ignore[arg-type]
            enabled=not self.disabled,
            spawn_window=None if self.cps is None else self.cps[0],
            spawn_pause=None if self.cps is None else self.cps[1],
            banner_fail=banners.fail,
            banner=banners.banner,
            banner_success=banners.success,
            at_limit=AtLimit.REFUSE,
            source=self.block.source,
            lineno=self.block.lineno,
            locs=tuple(self.locs.items()),
        )

    def types(self) -> frozenset[str]:
        words = self.words("type") or []
        for word in words:
            if word not in attrs.TYPES:
                self.at("type", f"unknown type {word!r}",
                        "type takes INTERNAL, UNLISTED, TCPMUX, TCPMUXPLUS")
        if "TCPMUX" in words and "TCPMUXPLUS" in words:
            self.at("type", "TCPMUX and TCPMUXPLUS together", "keep one")
        return frozenset(words)

    def flags(self) -> frozenset[str]:
        words = self.words("flags") or []
        for word in words:
            if word in attrs.FLAGS_DONE or word in attrs.FLAGS_SOCKOPTS:
                continue
            if word in attrs.FLAGS_WARNED:
                self.at("flags", f"flag {word} is not applied", attrs.FLAGS_WARNED[word],
                        warning=True)
            elif word == "SENSOR":
                self.at("flags", attrs.FLAGS_REFUSED[word], "keep this service under xinetd")
            elif word != "DISABLE":
                self.at("flags", f"unknown flag {word!r}", "see xinetd.conf(5)")
        if "IPv4" in words and "IPv6" in words:
            self.at("flags", "flags IPv4 and IPv6 together", "keep one")
        return frozenset(words)

    def is_disabled(self, flags: frozenset[str]) -> bool:
        """``disable = yes``, the DISABLE flag, or defaults' disabled/enabled lists."""
        off = self.yes_no("disable", required=False) is True or "DISABLE" in flags
        listed = self.defaults.sets.get("disabled")
        if listed is not None and (self.ident in listed.values
                                   or self.block.name in listed.values):
            off = True
        only = self.defaults.sets.get("enabled")
        if only is not None and self.ident not in only.values:
            off = True
        return off

    def yes_no(self, name: str, *, required: bool) -> bool | None:
        value = self.one(name)
        if value is None:
            if required and name not in self.values:
                self.at(name, f"{name} is required", f"add {name} = no (or yes)")
            return None
        if value not in ("yes", "no"):
            self.at(name, f"{name} must be yes or no, not {value!r}", f"write {name} = no")
            return None
        return value == "yes"

    def socket_type(self) -> SocketType | None:
        value = self.one("socket_type")
        if value is None:
            if "socket_type" not in self.values:
                self.at("socket_type", "socket_type is required", "add socket_type = stream")
            return None
        try:
            return SocketType(value)
        except ValueError:
            self.at("socket_type", f"unknown socket_type {value!r}",
                    "write stream, dgram or seqpacket")
            return None

    def protocol(self, socket_type: SocketType | None, flags: frozenset[str]
                 ) -> Protocol | None:
        """tcp/udp from ``protocol`` (or the socket type), the family from flags, bind
        and v6only: IPv6 listens on both families unless ``v6only = yes``."""
        value = self.one("protocol")
        if value is None:
            value = {SocketType.STREAM: "tcp", SocketType.DGRAM: "udp"}.get(
                socket_type) if socket_type is not None else None
            if value is None:
                if socket_type is not None:
                    self.at("protocol", "protocol is required for this socket_type",
                            "add protocol = tcp")
                return None
        if value not in ("tcp", "udp"):
            self.at("protocol", f"protocol {value!r} is not supported", "write tcp or udp")
            return None
        bind = " ".join(self.words("bind") or self.words("interface") or ())
        v6only = self.yes_no("v6only", required=False)
        six = "IPv6" in flags or ":" in bind
        if not six:
            # (v6only given by defaults applies to the IPv6 services only, silently.)
            if v6only is not None and self.values["v6only"].own:
                self.at("v6only", "v6only is for IPv6 services: ignored",
                        "add flags = IPv6", warning=True)
            return Protocol(value)
        return Protocol(value + ("6" if v6only else "46"))

    def server(self, types: frozenset[str], flags: frozenset[str]
               ) -> tuple[str | None, tuple[str, ...]]:
        """``internal`` with the built-in's name, or the program with its argv
        (argv[0] = the path's last part, as xinetd gives it; NAMEINARGS: server_args)."""
        path = self.one("server")
        args = tuple(self.words("server_args") or ())
        if "INTERNAL" in types:
            if path is not None:
                self.at("server", "server ignored: the service is INTERNAL",
                        "remove server", warning=True)
            return "internal", (self.block.name,)
        if "redirect" in self.values:
            return None, ()
        if path is None:
            if "server" not in self.values:
                self.at("server", "server is required", "add server = /path/to/program "
                        "(or type = INTERNAL)")
            return None, ()
        if not path.startswith("/"):
            self.at("server", f"server {path!r} is not an absolute path",
                    "write the program's full path")
            return None, ()
        if "NAMEINARGS" in flags:
            if not args:
                self.at("server_args", "NAMEINARGS needs argv[0] in server_args",
                        "write server_args = NAME [ARGS...]")
                return None, ()
            return path, args
        return path, (os.path.basename(path) or path, *args)

    def service_name(self, types: frozenset[str]) -> tuple[str | None, str | None, bool]:
        """(the service field, the tcpmux name, tcpmux '+'): the port when one is
        written (an UNLISTED service must write it), else the name for /etc/services."""
        name = self.block.name
        if "TCPMUX" in types or "TCPMUXPLUS" in types:
            return "tcpmux", name, "TCPMUXPLUS" in types
        text = self.one("port")
        if text is not None:
            port = values.uint(text)
            if port is None or port > 65535:
                self.at("port", f"bad port {text!r}", "a port is a number from 0 to 65535")
                return None, None, False
            return str(port), None, False
        if "UNLISTED" in types and "port" not in self.values:
            self.at("port", "an UNLISTED service needs port", "add port = N")
            return None, None, False
        if _NAME.fullmatch(name) is None:
            self.at("service", f"bad service name {name!r}",
                    "write a name from /etc/services, or type = UNLISTED with port = N")
            return None, None, False
        return name, None, False

    def bind(self) -> tuple[str, ...]:
        """``bind``/``interface``: the one listen address (a host name is looked up later)."""
        if "bind" in self.values and "interface" in self.values:
            self.at("interface", "bind and interface are the same attribute", "keep one")
        value = self.one("bind") if "bind" in self.values else self.one("interface")
        if value is None:
            return ()
        if any(c in value for c in "[]/,"):
            self.at("bind", f"bad address {value!r}", "write one IP address or host name")
            return ()
        return (value,)

    def access_lists(self) -> tuple[AddressList | None, AddressList | None, bool]:
        """only_from, no_access as AddressLists, and whether only_from allows nobody."""
        only_words = self.words("only_from")
        deny_words = self.words("no_access")
        only = deny = None
        nobody = False
        if only_words is not None:
            nets, names = self.networks("only_from", only_words)
            if names:
                self.at("only_from", f"only_from: host names are not matched: "
                        f"{', '.join(names[:3])}", "poolinetd's lists take addresses; those "
                        "hosts are refused unless an address entry allows them", warning=True)
            if not nets:
                nobody = not names
                if not names:
                    self.at("only_from", "only_from has no address xinetd can use: it "
                            "serves nobody, so the service is not served",
                            "write disable = yes, or the clients' addresses", warning=True)
                else:
                    self.at("only_from", "only_from names no address poolinetd can match",
                            "write the clients' addresses (ADDR or ADDR/LEN)")
            only = AddressList(nets)
        if deny_words is not None:
            nets, names = self.networks("no_access", deny_words)
            if names:
                self.at("no_access", f"no_access: host names cannot be matched: "
                        f"{', '.join(names[:3])}", "write their addresses; poolinetd's lists "
                        "take addresses, and would serve those hosts")
            deny = AddressList(nets) if nets else None
        if only and deny:
            found = accesslists.contradiction(only, deny)
            if found is not None:  # xinetd loads such lists too: a warning, never an error
                self.at("only_from", found.message, found.hint, warning=True)
        return only, deny, nobody

    def networks(self, name: str, words: list[str]) -> tuple[list[netmatch.Network], list[str]]:
        """The networks ``words`` denote, and the words that are host or network names.

        A word that is neither is dropped with a warning, as xinetd drops it ("failed
        to parse", logged as an error, and the service starts without it).
        """
        nets: list[netmatch.Network] = []
        names: list[str] = []
        for word in attrs.joined(words):
            got = attrs.xinetd_networks(word)
            if isinstance(got, str):
                if got:
                    self.at(name, f"{name}: {got}: ignored, as xinetd ignores it",
                            "write ADDR, ADDR/LEN or a.b.{c,d}" + (
                                "; xinetd has no comments after a value"
                                if word.startswith("#") else ""), warning=True)
                else:
                    names.append(word)
                continue
            nets.extend(got)
        return nets, names

    def env(self) -> tuple[tuple[str, str], ...]:
        """``passenv``'s variables, then ``env``'s (which wins for the same name)."""
        found: dict[str, str] = dict(xinetd_extras.passenv(self, self.environ))
        for item in self.words("env") or ():
            key, eq, value = item.partition("=")
            if not eq or _ENV_NAME.fullmatch(key) is None:
                self.at("env", f"bad environment entry {item!r}", "write env = NAME=value")
            else:
                found[key] = value
        return tuple(found.items())

    def limits(self) -> Limits:
        """instances -> max_child, per_source -> max_child_per_ip (UNLIMITED or absent:
        no limit), cps N M -> max_spawn_per_min N per 1 s window, rest M s (``self.cps``;
        absent: xinetd's implicit 50 10; N = 0: no rate limit)."""
        numbers: dict[str, int] = {}
        lifted: set[str] = set()
        for attr, key in (("instances", "max_child"), ("per_source", "max_child_per_ip")):
            value = self.one(attr)
            if value is None:
                continue
            if value == attrs.UNLIMITED:
                lifted.add(key)
                continue
            number = values.uint(value)
            if number is None:
                self.at(attr, f"{attr} must be a number or UNLIMITED, not {value!r}",
                        f"write {attr} = 10")
            elif number == 0 and attr == "instances":
                self.at(attr, "instances = 0 serves nobody", "write disable = yes")
            else:
                numbers[key] = number
        # xinetd 2.3.15 gives every service without cps (its own or defaults') "cps = 50
        # 10" (confparse.c service_fill: DEFAULT_LOOP_RATE, DEFAULT_LOOP_TIME); a rate of
        # 0 turns the check off (access.c only counts when the rate is not 0).
        cps = self.words("cps")
        if cps is None:
            cps = [str(attrs.DEFAULT_CPS[0]), str(attrs.DEFAULT_CPS[1])]
        rate = values.uint(cps[0]) if cps else None
        pause = values.uint(cps[1]) if len(cps) == 2 else None
        if len(cps) != 2 or rate is None or pause is None:
            self.at("cps", f"cps takes a rate and a pause, not {' '.join(cps)!r}",
                    "write cps = 50 10")
        elif rate:
            # N starts in the last second, then a rest of M seconds (xinetd counts
            # from the first connection of a window; a sliding second is as strict).
            numbers["max_spawn_per_min"] = rate
            self.cps = (1.0, float(pause))
        return Limits(max_child=numbers.get("max_child"),
                      max_child_per_ip=numbers.get("max_child_per_ip"),
                      max_spawn_per_min=numbers.get("max_spawn_per_min"),
                      unlimited=frozenset(lifted))

    def controls(self, flags: frozenset[str]) -> dict[str, object]:
        """rlimit_*, nice, umask and the NODELAY/KEEPALIVE flags as poolinetd's keys of
        the same meaning (``UNLIMITED`` = no limit)."""
        found: dict[str, object] = {}
        readers = {**{name: values.rlimit for name in attrs.RLIMITS}, "nice": values.nice,
                   "umask": values.umask}
        for name, read in readers.items():
            text = self.one(name)
            if text is None:
                continue
            value = read(values.UNLIMITED if text == attrs.UNLIMITED else text)
            if value is None:
                self.at(name, f"bad {name} value {text!r}", {
                    "nice": "a number from -20 to 19", "umask": "an octal mask: 022"}.get(
                        name, "a number of bytes (K and M allowed), seconds or files, "
                        "or UNLIMITED"))
                continue
            found[name] = value
        for flag, key in attrs.FLAGS_SOCKOPTS.items():
            if flag in flags:
                found[key] = True
                where = self.values["flags"]
                self.locs[key] = FieldLoc(where.lineno, 0, "flags")
        return found

    def groups(self) -> None:
        value = self.yes_no("groups", required=False)
        if value is False:
            self.at("groups", "groups = no is not applied", "programs get the supplementary "
                    "groups of their user (initgroups), as with groups = yes", warning=True)
