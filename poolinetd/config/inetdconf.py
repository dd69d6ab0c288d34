"""Parser and formatter for inetd.conf: positional entries and NetBSD key-values definitions.

Pure: no I/O, no name lookups. ``parse(text, source)`` is total (it never
raises, whatever the text) and returns every spec and every diagnostic;
``format_spec(spec)`` writes one entry back, and parse(format_spec(s)) == s.

Grammar (physical lines are split at "\\n" only; one "\\r" before it is dropped)::

    line        = blank | comment | ipsec | default-addr | include | entry | kv-definition
    comment     = "#" ...                     (column 1 only)
    ipsec       = "#@" [policy]               (warning, ignored)
    default-addr= addr-list ":"               (alone on its line; "*:" resets)
    include     = ".include" PATTERN          (expanded by resolve.load_file)
    entry       = [addr-list ":"] service  socktype  protocol  wait  user  server  [argv...]
    continuation: a non-blank line starting with SP/TAB continues the entry above it
    addr-list   = addr {"," addr};  addr = "*" | host | ipv4 | ipv6 | "[" ipv6 "]"
                  (the prefix is split at the last ":", so BusyBox ":::svc" = "::")
    service     = name | port | "tcpmux/" ["+"] name | [":" owner ":" group ":" mode ":"] /path
    socktype    = stream | dgram | seqpacket | raw | rdm  [":" acceptfilter (warning)]
    protocol    = tcp | tcp4 | tcp6 | tcp46 | udp | udp4 | udp6 | udp46 | unix
                  ["/ttcp" (warning)]  {",sndbuf=N" | ",rcvbuf=N" (warning)}
                  "rpc/..." and "/faith": error, not supported
    wait        = (wait | nowait) [ "/" max_child ["/" max_cpm_per_ip ["/" max_child_per_ip]]
                                  | ("." | ":") max_spawn_per_min ]
    user        = user [":" group] ["/" login_class]   ("u.g" is kept whole: resolve
                  tries it as a user name first, then splits at a dot)
    server      = "internal" [builtin-name] | /absolute/path argv0 [args...]
    argv        = words; from field 7 on a word starting with " or ' runs to the same
                  quote on the same line (no escapes), quotes removed

    kv-definition = [addr-list ":"] service ("on" | "off") option {"," option} ";"
    option      = key [blanks] "=" {value}; value = word | quoted
                  (escapes \\\\ \\" \\' \\n \\t \\r \\xHH); blanks and line ends may
                  separate key, "=" and values (NetBSD); "#" outside quotes starts a comment;
                  continuation lines start with SP/TAB, or in column 1 while an option is
                  open (after on/off, ",", a key or "="); nothing but a comment after ";"
    defaults on option {"," option} ";"        (poolinetd keys only; any position in the file)

Keys: bind socktype protocol wait(yes|no) user group login_class exec args
service_max(=max_spawn_per_min) ip_max(=max_cpm_per_ip) max_child max_cpm_per_ip
max_child_per_ip max_spawn_per_min (N, or unlimited; 0 = nothing allowed, but
max_child=0 = no limit) pool_min pool_max worker_connections max_requests
idle_timeout conn_timeout stderr(socket|log) env(K=V ...) only_from no_access
proxy_from (ADDR[/LEN] ...) source_v4_prefix source_v6_prefix block_time
reuseport(yes|no) proxy_protocol(yes|no); max_connections max_programs in defaults
only; acceptfilter sndbuf recvbuf ipsec are read and ignored with a warning.
Positional 0s keep their dialect's meaning: FreeBSD /0 and .0 = no limit (recorded
in Limits.unlimited), NetBSD :0 = nothing allowed. docs/configuration.md is the
reference.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields

from poolinetd.config.spec import (
    LIMIT_NAMES,
    Diagnostic,
    FieldLoc,
    Include,
    Limits,
    Options,
    ParsedConfig,
    Protocol,
    ServiceSpec,
    Severity,
    SocketType,
    StderrRoute,
    UnixPerms,
)
from poolinetd.net import netmatch
from poolinetd.net.netmatch import AddressList

__all__ = ["DEFAULTS_KEYS", "ENTRY_KEYS", "format_spec", "parse"]

_WS = " \t"
_FIELD = re.compile(r"[^ \t]+")
_UINT = re.compile(r"[0-9]{1,10}")
_FLOAT = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_OCTAL = re.compile(r"[0-7]{1,6}")
_BUFSIZE = re.compile(r"(?:sndbuf|rcvbuf)=[0-9]+[kKmM]?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEY = re.compile(r"[^ \t=,;#]*")
_WORD = re.compile(r"[^ \t,;#]+")
_KV_SPECIAL = frozenset(" \t,;#\"'\\")  # a value holding any of these is written quoted
_INT_MAX = 2**31 - 1
# Diagnostics quote the offending token; a megabyte-long token helps nobody.
_TOKEN_MAX = 120

_SOCKET_TYPES = ", ".join(t.value for t in SocketType)
_PROTOCOLS = ", ".join(p.value for p in Protocol)
_LIMIT_KEYS = LIMIT_NAMES
# Options fields in the order docs list them; ``limits`` is written as the limit keys.
_OPTION_KEYS = tuple(f.name for f in fields(Options) if f.name != "limits")
_LIST_KEYS = ("only_from", "no_access", "proxy_from")
_GLOBAL_KEYS = ("max_connections", "max_programs")  # defaults only: one cap for all services
_ENTRY_ONLY_KEYS = ("proxy_protocol",)  # a per-listener decision, never a default
UNLIMITED = "unlimited"
# Every key a service definition accepts, in the order docs list them.
ENTRY_KEYS: tuple[str, ...] = (
    "bind",
    "socktype",
    "protocol",
    "wait",
    "user",
    "group",
    "login_class",
    "exec",
    "args",
    "service_max",
    "ip_max",
    *_LIMIT_KEYS,
    *_OPTION_KEYS,
    "acceptfilter",
    "sndbuf",
    "recvbuf",
    "ipsec",
)
# What a ``defaults`` definition accepts: poolinetd's options and limits, the global caps.
DEFAULTS_KEYS: tuple[str, ...] = (
    *_LIMIT_KEYS,
    *(k for k in _OPTION_KEYS if k not in _ENTRY_ONLY_KEYS),
)
# NetBSD names for the limits, mapped onto poolinetd's own.
_KEY_ALIASES = {"service_max": "max_spawn_per_min", "ip_max": "max_cpm_per_ip"}
_IGNORED_KEYS = {
    "acceptfilter": "accept filters are a BSD kernel feature",
    "sndbuf": "socket buffer sizes are left to the kernel",
    "recvbuf": "socket buffer sizes are left to the kernel",
    "ipsec": "poolinetd applies no IPsec policy; the service accepts connections without it",
}


# -- small pure helpers ----------------------------------------------------------------------


def _uint(text: str) -> int | None:
    """A decimal integer 0..2**31-1 written in ASCII digits, else None."""
    if _UINT.fullmatch(text) is None:
        return None
    value = int(text)
    return value if value <= _INT_MAX else None


def _ufloat(text: str) -> float | None:
    """A finite, non-negative decimal number, else None."""
    if _FLOAT.fullmatch(text) is None:
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def _short(token: str) -> str:
    return token[:_TOKEN_MAX]


def _split_lines(text: str) -> list[str]:
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line; it does not start a new one
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _is_blank(line: str) -> bool:
    return not line.strip(_WS)


@dataclass(slots=True)
class _Tok:
    text: str  # quotes removed
    raw: str  # as written
    lineno: int
    field: int
    end: int  # column just after the token


@dataclass(slots=True)
class _Opt:
    key: str
    values: list[str]
    lineno: int
    field: int
    raw: str
    bad: bool = False


@dataclass(slots=True)
class _Fields:
    """What an entry says, collected before it becomes a ServiceSpec."""

    service: str = ""
    addresses: tuple[str, ...] | None = None  # None = not given: the default address applies
    tcpmux: str | None = None
    tcpmux_plus: bool = False
    unix_perms: UnixPerms | None = None
    socket_type: SocketType | None = None
    protocol: Protocol | None = None
    wait: bool | None = None
    limits: Limits = field(default_factory=Limits)
    user: str | None = None
    group: str | None = None
    login_class: str | None = None
    server: str | None = None
    argv: tuple[str, ...] = ()
    options: Options = field(default_factory=Options)
    locs: dict[str, FieldLoc] = field(default_factory=dict)
    kv_names: dict[str, str] = field(default_factory=dict)  # group=, login_class= as written


# -- the parser ------------------------------------------------------------------------------


class _Parser:
    """One pass over the lines; every problem becomes a Diagnostic, nothing raises."""

    def __init__(self, text: str, source: str) -> None:
        self.source = source
        self.lines = _split_lines(text)
        self.diags: list[Diagnostic] = []
        self.specs: list[ServiceSpec] = []
        self.includes: list[Include] = []
        self.default_addrs: tuple[str, ...] = ()
        self.defaults: dict[str, object] = {}
        self.env_defaults: dict[str, str] = {}  # insertion-ordered; O(1) twice-checks
        self.limit_defaults: dict[str, int | None] = {}  # None = "unlimited" written
        self.defaults_at: dict[str, _Opt] = {}  # where defaults set an address list
        self.entry_failed = False

    # diagnostics ---------------------------------------------------------------------------

    def error(self, lineno: int, fld: int, token: str, message: str, hint: str = "") -> None:
        self.entry_failed = True
        self.diags.append(Diagnostic(self.source, lineno, fld, _short(token), message, hint))

    def warn(self, lineno: int, fld: int, token: str, message: str, hint: str = "") -> None:
        self.diags.append(
            Diagnostic(self.source, lineno, fld, _short(token), message, hint, Severity.WARNING)
        )

    def tok_error(self, tok: _Tok, message: str, hint: str = "") -> None:
        self.error(tok.lineno, tok.field, tok.raw, message, hint)

    # main loop -----------------------------------------------------------------------------

    def run(self) -> ParsedConfig:
        i, n = 0, len(self.lines)
        while i < n:
            line = self.lines[i]
            if _is_blank(line):
                i += 1
            elif line.startswith("#@"):
                if line[2:].strip(_WS):
                    self.warn(
                        i + 1,
                        0,
                        line,
                        "IPsec policy line ignored",
                        "poolinetd applies no IPsec policy; the entries below it still load",
                    )
                i += 1
            elif line.startswith("#"):
                i += 1
            else:
                i = self.statement(i)
        return ParsedConfig(
            specs=tuple(self.specs),
            defaults=self.build_defaults(),
            diagnostics=tuple(self.diags),
            includes=tuple(self.includes),
        )

    def statement(self, i: int) -> int:
        """Read the statement starting at line index ``i``; return the next line index."""
        j = i + 1
        while (
            j < len(self.lines)
            and self.lines[j][:1] in (" ", "\t")
            and not _is_blank(self.lines[j])
        ):
            j += 1
        self.entry_failed = False
        # Key-values definitions say on/off in field 2 of their first line; they
        # have their own quoting, so detect them before positional tokenizing.
        first = self.lines[i]
        heads = _FIELD.finditer(first)
        head = next(heads)  # the line is not blank
        second = next(heads, None)
        if second is not None and second.group() in ("on", "off"):
            svc = _Tok(head.group(), head.group(), i + 1, 1, head.end())
            onoff = _Tok(second.group(), second.group(), i + 1, 2, second.end())
            return self.kv_definition(svc, onoff)
        toks = self.tokenize(i, j)
        if not toks:
            return j
        if toks[0].text == ".include":
            self.include(toks)
        elif len(toks) == 1 and toks[0].text.endswith(":"):
            self.default_address(toks[0])
        elif not self.entry_failed:
            self.positional(toks)
        return j

    def tokenize(self, start: int, stop: int) -> list[_Tok]:
        toks: list[_Tok] = []
        for idx in range(start, stop):
            line, pos = self.lines[idx], 0
            while (m := _FIELD.search(line, pos)) is not None:
                fld = len(toks) + 1
                begin = m.start()
                quote = line[begin]
                if fld >= 7 and quote in "\"'":
                    close = line.find(quote, begin + 1)
                    if close < 0:
                        raw = line[begin:]
                        self.error(
                            idx + 1,
                            fld,
                            raw,
                            "unterminated quote",
                            f"close the argument with {quote}",
                        )
                        toks.append(_Tok(raw[1:], raw, idx + 1, fld, len(line)))
                        break
                    # FreeBSD rule: the word ends at the closing quote.
                    toks.append(
                        _Tok(
                            line[begin + 1 : close],
                            line[begin : close + 1],
                            idx + 1,
                            fld,
                            close + 1,
                        )
                    )
                    pos = close + 1
                else:
                    toks.append(_Tok(m.group(), m.group(), idx + 1, fld, m.end()))
                    pos = m.end()
        return toks

    # simple statements ---------------------------------------------------------------------

    def include(self, toks: list[_Tok]) -> None:
        if len(toks) != 2:
            self.tok_error(
                toks[-1], ".include takes exactly one pattern", 'write .include "inetd.d/*.conf"'
            )
            return
        pattern = toks[1].text
        if len(pattern) >= 2 and pattern[0] == pattern[-1] and pattern[0] in "\"'":
            pattern = pattern[1:-1]
        if not pattern:
            self.tok_error(toks[1], "empty .include pattern", 'write .include "inetd.d/*.conf"')
            return
        self.includes.append(Include(pattern, self.source, toks[0].lineno, len(self.specs)))

    def default_address(self, tok: _Tok) -> None:
        addrs = self.address_list(tok, tok.text[:-1])
        if addrs is not None:
            self.default_addrs = addrs

    def address_list(self, tok: _Tok, text: str) -> tuple[str, ...] | None:
        """Addresses of a prefix; () = the wildcard; None after an error."""
        out: list[str] = []
        parts = text.split(",")
        for part in parts:
            addr = part
            if addr.startswith("["):
                if not addr.endswith("]") or len(addr) < 3:
                    self.tok_error(tok, f"bad bracketed address {part!r}", "write [::1]:service")
                    return None
                addr = addr[1:-1]
            if not addr:
                self.tok_error(
                    tok, "empty address", "write addr:service, [v6addr]:service or *:service"
                )
                return None
            if addr == "*":
                if len(parts) > 1:
                    self.tok_error(
                        tok,
                        "'*' cannot be combined with other addresses",
                        "write *:service alone, or list the addresses",
                    )
                    return None
                continue
            if any(c in addr for c in "[]/"):
                self.tok_error(tok, f"bad address {part!r}", "write an IP address or a host name")
                return None
            out.append(addr)
        return tuple(out)

    # fields shared by both forms -----------------------------------------------------------

    def service_field(self, tok: _Tok, text: str, protocol: Protocol | None, f: _Fields) -> None:
        """Fill service, addresses, tcpmux and unix_perms from field 1 (``text`` = as written)."""
        f.locs["service"] = FieldLoc(tok.lineno, tok.field, _short(tok.raw))
        if protocol is Protocol.UNIX:
            self.unix_service(tok, text, f)
            return
        name = text
        if ":" in text:
            host, _, name = text.rpartition(":")
            f.addresses = self.address_list(tok, host)
        if name.startswith("tcpmux/"):
            mux = name[len("tcpmux/") :]
            f.tcpmux_plus = mux.startswith("+")
            f.tcpmux = mux[1:] if f.tcpmux_plus else mux
            if not f.tcpmux or "/" in f.tcpmux:
                self.tok_error(
                    tok, "tcpmux service needs a name", "write tcpmux/NAME or tcpmux/+NAME"
                )
            name = "tcpmux"
        elif not name:
            self.tok_error(tok, "empty service name", "write a name from /etc/services or a port")
        elif name.startswith("/"):
            self.tok_error(tok, "a path is a unix socket", "use protocol unix for a socket path")
        elif "/" in name:
            self.tok_error(
                tok,
                "RPC services are not supported",
                "poolinetd serves tcp, udp and unix services only",
            )
        elif name[0].isdigit() or name.isdigit():
            port = _uint(name)
            if port is None or port > 65535:
                self.tok_error(tok, f"bad port {name!r}", "a port is a number from 0 to 65535")
        elif any(c in name for c in "[],#\x00"):
            self.tok_error(tok, f"bad service name {name!r}", "write a name from /etc/services")
        f.service = name

    def unix_service(self, tok: _Tok, text: str, f: _Fields) -> None:
        path = text
        if text.startswith(":"):
            parts = text.split(":", 4)
            if len(parts) != 5:
                self.tok_error(tok, "bad unix socket prefix", "write :owner:group:mode:/path")
                return
            _, owner, group, mode_text, path = parts
            mode: int | None = None
            if mode_text:
                if _OCTAL.fullmatch(mode_text) is None or int(mode_text, 8) > 0o7777:
                    self.tok_error(
                        tok, f"bad socket mode {mode_text!r}", "write an octal mode like 0660"
                    )
                    return
                mode = int(mode_text, 8)
            f.unix_perms = UnixPerms(owner or None, group or None, mode)
        if not path.startswith("/") or len(path) < 2:
            self.tok_error(
                tok,
                "a unix service must be an absolute path",
                "write /run/name.sock or :owner:group:mode:/run/name.sock",
            )
        elif "\x00" in path:
            self.tok_error(tok, "NUL byte in socket path", "remove it")
        f.service = path
        f.addresses = ()  # a unix socket has no listen address (NetBSD rule)

    def socket_type_field(self, tok: _Tok, text: str, f: _Fields) -> None:
        f.locs["socket_type"] = FieldLoc(tok.lineno, tok.field, _short(tok.raw))
        base, colon, _ = text.partition(":")
        try:
            f.socket_type = SocketType(base)
        except ValueError:
            self.tok_error(tok, f"unknown socket type {base!r}", f"use one of {_SOCKET_TYPES}")
            return
        if colon:
            self.warn(
                tok.lineno,
                tok.field,
                tok.raw,
                "accept filter ignored",
                "accept filters are a BSD kernel feature",
            )

    def protocol_field(self, tok: _Tok, text: str, f: _Fields) -> None:
        f.locs["protocol"] = FieldLoc(tok.lineno, tok.field, _short(tok.raw))
        if text.startswith("rpc/"):
            self.tok_error(
                tok,
                "RPC services are not supported",
                "remove the entry or serve it with rpcbind and a standalone daemon",
            )
            return
        base, *bufs = text.split(",")
        for buf in bufs:
            if _BUFSIZE.fullmatch(buf) is None:
                self.tok_error(tok, f"bad protocol option {buf!r}", "write ,sndbuf=N or ,rcvbuf=N")
                return
        if bufs:
            self.warn(
                tok.lineno,
                tok.field,
                tok.raw,
                "socket buffer sizes ignored",
                "poolinetd leaves buffer sizes to the kernel",
            )
        base, slash, suffix = base.partition("/")
        if slash:
            if suffix == "ttcp":
                self.warn(
                    tok.lineno,
                    tok.field,
                    tok.raw,
                    "/ttcp ignored: T/TCP is obsolete",
                    "plain TCP is used",
                )
            elif suffix == "faith":
                self.tok_error(tok, "FAITH (/faith) is not supported", "remove /faith")
                return
            else:
                self.tok_error(
                    tok, f"unknown protocol suffix /{suffix}", f"use one of {_PROTOCOLS}"
                )
                return
        try:
            f.protocol = Protocol(base)
        except ValueError:
            self.tok_error(tok, f"unknown protocol {base!r}", f"use one of {_PROTOCOLS}")

    def wait_field(self, tok: _Tok, text: str, f: _Fields) -> None:
        f.locs["wait"] = FieldLoc(tok.lineno, tok.field, _short(tok.raw))
        if text.startswith("nowait"):
            f.wait, rest = False, text[len("nowait") :]
        elif text.startswith("wait"):
            f.wait, rest = True, text[len("wait") :]
        else:
            self.tok_error(
                tok,
                f"expected wait or nowait, not {text!r}",
                "write wait, nowait, nowait/MAX_CHILD or nowait.PER_MINUTE",
            )
            return
        if not rest:
            return
        if rest[0] == "/":
            parts = rest[1:].split("/")
            names = ("max_child", "max_cpm_per_ip", "max_child_per_ip")
            if len(parts) > 3:
                self.tok_error(tok, "too many /limits", "write nowait/MAX_CHILD/MAX_CPM/MAX_PER_IP")
                return
            values: dict[str, int] = {}
            lifted: set[str] = set()
            for name, part in zip(names, parts, strict=False):
                number = _uint(part)
                if number is None:
                    self.tok_error(
                        tok, f"{name} must be an integer from 0 to {_INT_MAX}", "0 means no limit"
                    )
                    return
                if number == 0:
                    lifted.add(name)  # FreeBSD: /0 = no limit
                else:
                    values[name] = number
            f.limits = Limits(**values, unlimited=frozenset(lifted))
        elif rest[0] in ".:":
            number = _uint(rest[1:])
            if number is None:
                self.tok_error(
                    tok,
                    f"spawns per minute must be an integer from 0 to {_INT_MAX}",
                    "write nowait.N or nowait:N",
                )
                return
            if number == 0 and rest[0] == ".":
                # GNU/BusyBox (and OpenBSD's spelling): .0 = no per-service limit.
                f.limits = Limits(unlimited=frozenset({"max_spawn_per_min"}))
            else:
                # NetBSD's :N, like its service_max=N: 0 = nothing is started.
                f.limits = Limits(max_spawn_per_min=number)
        else:
            self.tok_error(
                tok,
                f"unexpected {rest!r} after {text[: len(text) - len(rest)]}",
                "write nowait/MAX_CHILD[/MAX_CPM[/MAX_PER_IP]] or nowait.PER_MINUTE",
            )

    def user_field(self, tok: _Tok, text: str, f: _Fields) -> None:
        f.locs["user"] = FieldLoc(tok.lineno, tok.field, _short(tok.raw))
        user, slash, login_class = text.partition("/")
        user, colon, group = user.partition(":")
        if not user or (colon and not group) or (slash and not login_class):
            self.tok_error(tok, f"bad user {text!r}", "write user, user:group or user:group/class")
            return
        if ":" in group or "/" in login_class:
            self.tok_error(tok, f"bad user {text!r}", "write user, user:group or user:group/class")
            return
        f.user = user
        f.group = group or None
        f.login_class = login_class or None

    def server_field(self, tok: _Tok, text: str, f: _Fields) -> None:
        f.locs["server"] = FieldLoc(tok.lineno, tok.field, _short(tok.raw))
        if text != "internal" and (not text.startswith("/") or "\x00" in text):
            self.tok_error(
                tok,
                "server must be an absolute path or 'internal'",
                "write e.g. /usr/sbin/in.fingerd in.fingerd",
            )
            return
        f.server = text

    # positional entries --------------------------------------------------------------------

    def positional(self, toks: list[_Tok]) -> None:
        if len(toks) < 6:
            last = toks[-1]
            self.tok_error(
                last,
                f"entry ends after field {len(toks)}; expected at least 6",
                "write: service socket-type protocol wait user server [args]",
            )
            return
        f = _Fields()
        self.protocol_field(toks[2], toks[2].text, f)
        if toks[2].text.startswith("rpc/"):
            return  # one clear error for the entry; its other fields are RPC-shaped
        self.service_field(toks[0], toks[0].text, f.protocol, f)
        self.socket_type_field(toks[1], toks[1].text, f)
        self.wait_field(toks[3], toks[3].text, f)
        self.user_field(toks[4], toks[4].text, f)
        self.server_field(toks[5], toks[5].text, f)
        f.argv = tuple(t.text for t in toks[6:])
        if len(toks) > 6:
            f.locs["argv"] = FieldLoc(toks[6].lineno, 7, _short(toks[6].raw))
        if not self.entry_failed:
            self.emit(f, toks[0].lineno, enabled=True)

    def emit(self, f: _Fields, lineno: int, *, enabled: bool) -> None:
        assert f.socket_type is not None and f.protocol is not None  # checked by the callers
        assert f.wait is not None and f.user is not None and f.server is not None
        addresses = self.default_addrs if f.addresses is None else f.addresses
        self.specs.append(
            ServiceSpec(
                service=f.service,
                socket_type=f.socket_type,
                protocol=f.protocol,
                wait=f.wait,
                user=f.user,
                server=f.server,
                argv=f.argv,
                addresses=() if f.protocol is Protocol.UNIX else addresses,
                group=f.group,
                login_class=f.login_class,
                limits=f.limits,
                tcpmux=f.tcpmux,
                tcpmux_plus=f.tcpmux_plus,
                unix_perms=f.unix_perms,
                options=f.options,
                enabled=enabled,
                source=self.source,
                lineno=lineno,
                locs=tuple(f.locs.items()),
            )
        )

    # key-values definitions ----------------------------------------------------------------

    def kv_definition(self, svc: _Tok, onoff: _Tok) -> int:
        opts, next_index = self.kv_scan(onoff)
        if svc.text == "defaults":
            self.kv_defaults(svc, onoff, opts)
        elif not self.entry_failed:
            self.kv_entry(svc, onoff, opts)
        return next_index

    def kv_scan(self, onoff: _Tok) -> tuple[list[_Opt], int]:
        """Read ``key=value, ...;`` after the on/off token; return options and the next line.

        As NetBSD reads it: blanks may surround ``=`` (``protocol = udp,``), and the
        ``=`` and the values may be on the lines after their key. A line that starts
        in column 1 continues the definition only while an option is open (after the
        ``on``/``off``, a ``,``, a key or an ``=``); after a value it means the ``;``
        is missing, which is reported rather than swallowing the next entry.
        """
        opts: list[_Opt] = []
        cur: _Opt | None = None
        pending: _Opt | None = None  # a key read, its '=' not yet
        open_item = True  # the definition cannot end here: the next line continues it
        li, col = onoff.lineno - 1, onoff.end
        start_col = 0

        def finish() -> None:
            nonlocal cur
            if cur is not None:
                line = self.lines[cur.lineno - 1]
                end = col if li == cur.lineno - 1 else len(line)
                cur.raw = line[start_col:end].rstrip(" \t,;")
                opts.append(cur)
                cur = None

        def no_equals(token: str) -> None:
            nonlocal cur, pending
            assert pending is not None
            self.error(
                pending.lineno,
                pending.field,
                pending.key,
                f"expected key=value, not {pending.key!r}",
                "separate options with ',' and end the definition with ';'",
            )
            cur, pending = pending, None
            cur.bad = True

        while True:
            if li >= len(self.lines):
                if pending is not None:
                    no_equals("")
                finish()
                self.tok_error(
                    onoff,
                    "key-values definition has no closing ';'",
                    "end it with ';'; continuation lines start with a space or tab",
                )
                return opts, li
            line = self.lines[li]
            if col >= len(line):
                li, col = li + 1, 0
                nxt = self.lines[li] if li < len(self.lines) else ""
                continues = open_item or pending is not None
                if li < len(self.lines) and not (
                    continues or _is_blank(nxt) or nxt[0] in " \t#"
                ):
                    finish()
                    self.tok_error(
                        onoff,
                        "key-values definition has no closing ';'",
                        "end it with ';'; continuation lines start with a space or tab",
                    )
                    return opts, li
                continue
            c = line[col]
            if c in _WS:
                col += 1
            elif c == "#":
                col = len(line)
            elif pending is not None:
                if c == "=":
                    cur, pending = pending, None
                    col += 1
                else:
                    no_equals(c)  # the text goes on as the (bad) option's values
            elif c == ";":
                finish()
                rest = line[col + 1 :].strip(_WS)
                if rest and not rest.startswith("#"):
                    self.error(
                        li + 1, 0, rest, "text after ';'", "put each definition on its own line"
                    )
                return opts, li + 1
            elif c == ",":
                if cur is None:
                    self.error(li + 1, len(opts) + 3, ",", "empty option", "remove the extra ','")
                finish()
                open_item = True
                col += 1
            elif cur is None:
                m = _KEY.match(line, col)
                assert m is not None  # the pattern matches the empty string
                start_col, key = col, m.group()
                after = line[m.end()] if m.end() < len(line) else ""
                if key and after == "=":
                    cur = _Opt(key, [], li + 1, len(opts) + 3, "")
                    col = m.end() + 1
                elif key and after in ("", " ", "\t", "#"):
                    pending = _Opt(key, [], li + 1, len(opts) + 3, "")
                    col = m.end()
                else:
                    token = key or c
                    self.error(
                        li + 1,
                        len(opts) + 3,
                        token,
                        f"expected key=value, not {token!r}",
                        "separate options with ',' and end the definition with ';'",
                    )
                    cur = _Opt(key, [], li + 1, len(opts) + 3, "", bad=True)
                    col = max(m.end(), col + 1)
                open_item = True
            elif c in "\"'":
                value, col = self.kv_quoted(li, col, cur)
                cur.values.append(value)
                open_item = False
            else:
                m = _WORD.match(line, col)
                assert m is not None  # c is none of the characters the pattern excludes
                cur.values.append(m.group())
                col = m.end()
                open_item = False

    def kv_quoted(self, li: int, col: int, opt: _Opt) -> tuple[str, int]:
        line, quote = self.lines[li], self.lines[li][col]
        out: list[str] = []
        i = col + 1
        while i < len(line):
            c = line[i]
            if c == quote:
                return "".join(out), i + 1
            if c == "\\" and i + 1 < len(line):
                esc = line[i + 1]
                simple = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t", "r": "\r"}
                if esc in simple:
                    out.append(simple[esc])
                    i += 2
                    continue
                hexa = line[i + 2 : i + 4]
                if esc == "x" and re.fullmatch(r"[0-9A-Fa-f]{2}", hexa):
                    out.append(chr(int(hexa, 16)))
                    i += 4
                    continue
                self.error(
                    li + 1,
                    opt.field,
                    line[i : i + 2],
                    f"unknown escape {line[i : i + 2]!r}",
                    "use \\\\ \\\" \\' \\n \\t \\r or \\xHH",
                )
                opt.bad = True
                i += 2
                continue
            out.append(c)
            i += 1
        self.error(
            li + 1, opt.field, line[col:], "unterminated quote", f"close the value with {quote}"
        )
        opt.bad = True
        return "".join(out), len(line)

    def kv_entry(self, svc: _Tok, onoff: _Tok, opts: list[_Opt]) -> None:
        f = _Fields()
        seen: dict[str, _Opt] = {}
        env: dict[str, str] = {}
        option_values: dict[str, object] = {}
        limit_values: dict[str, int | None] = {}
        for opt in opts:
            if opt.bad:
                continue
            key = _KEY_ALIASES.get(opt.key, opt.key)
            if opt.key not in ENTRY_KEYS:
                self.opt_error(
                    opt, f"unknown key {opt.key!r}", "valid keys: " + ", ".join(ENTRY_KEYS)
                )
                continue
            if key in seen and key != "env":
                first = seen[key]
                self.opt_error(opt, f"{key} set twice (first at line {first.lineno})", "keep one")
                continue
            seen[key] = opt
            f.locs[key] = FieldLoc(opt.lineno, opt.field, _short(opt.raw))
            self.kv_entry_option(opt, key, f, env, option_values, limit_values)
        if env:
            option_values["env"] = tuple(env.items())
        only, deny = option_values.get("only_from"), option_values.get("no_access")
        if isinstance(only, AddressList) and isinstance(deny, AddressList):
            self.contradiction(seen["only_from"], only, deny)
        f.options = Options(**option_values)  # type: ignore[arg-type]
        f.limits = _limits(limit_values)
        self.kv_complete(svc, onoff, f, seen)
        if not self.entry_failed:
            self.emit(f, svc.lineno, enabled=onoff.text == "on")

    def kv_entry_option(
        self,
        opt: _Opt,
        key: str,
        f: _Fields,
        env: dict[str, str],
        option_values: dict[str, object],
        limit_values: dict[str, int | None],
    ) -> None:
        if key in _IGNORED_KEYS:
            self.warn(opt.lineno, opt.field, opt.raw, f"{opt.key} ignored", _IGNORED_KEYS[key])
            return
        if key == "args":
            f.argv = tuple(opt.values)
            return
        if key == "env":
            self.env_values(opt, env)
            return
        if key in _GLOBAL_KEYS:
            self.opt_error(
                opt,
                f"{key} is a global cap, not a per-service key",
                f"set it in defaults (defaults on {key}=N;) or with --{key.replace('_', '-')}",
            )
            return
        if key in _LIST_KEYS:
            addresses = self.address_values(opt)
            if addresses is not None:
                option_values[key] = addresses
            return
        if key == "bind":
            if not opt.values:
                self.opt_error(opt, "bind needs an address", "write bind=127.0.0.1")
                return
            addrs: list[str] = []
            for word in opt.values:
                got = self.address_list(_Tok(word, opt.raw, opt.lineno, opt.field, 0), word)
                if got is None:
                    self.entry_failed = True
                    return
                addrs.extend(got)
            f.addresses = tuple(addrs)
            return
        value = self.single(opt)
        if value is None:
            return
        tok = _Tok(value, opt.raw, opt.lineno, opt.field, 0)
        if key == "socktype":
            self.socket_type_field(tok, value, f)
        elif key == "protocol":
            self.protocol_field(tok, value, f)
        elif key == "wait":
            if value not in ("yes", "no"):
                self.opt_error(
                    opt, f"wait must be yes or no, not {value!r}", "write wait=yes or wait=no"
                )
            f.wait = value == "yes"
        elif key == "user":
            self.user_field(tok, value, f)
        elif key in ("group", "login_class"):
            if not value or any(c in value for c in ":/"):
                self.opt_error(opt, f"bad {key} {value!r}", f"write {key}=NAME")
            f.kv_names[key] = value
        elif key == "exec":
            self.server_field(tok, value, f)
        elif key in _LIMIT_KEYS:
            self.limit_value(opt, key, value, limit_values)
        else:
            parsed = self.option_value(opt, key, value)
            if parsed is not None:
                option_values[key] = parsed

    def kv_complete(self, svc: _Tok, onoff: _Tok, f: _Fields, seen: dict[str, _Opt]) -> None:
        """Infer what NetBSD infers, demand the rest, then read the service field."""
        if f.protocol is None and "protocol" not in seen:
            if f.socket_type is SocketType.STREAM:
                f.protocol = Protocol.TCP
            elif f.socket_type is SocketType.DGRAM:
                f.protocol = Protocol.UDP
            elif "socktype" not in seen:
                self.tok_error(
                    onoff, "protocol= is required", "add protocol=tcp (or udp, unix, ...)"
                )
        if f.socket_type is None and "socktype" not in seen and f.protocol is not None:
            if f.protocol.is_unix:
                self.tok_error(onoff, "socktype= is required for unix", "add socktype=stream")
            else:
                f.socket_type = SocketType.DGRAM if f.protocol.is_udp else SocketType.STREAM
        if f.server is None and "exec" not in seen:
            f.server = "internal"
        if f.wait is None and "wait" not in seen:
            if f.server == "internal":
                # Built-ins do not care; record what Debian writes for them.
                f.wait = f.socket_type is SocketType.DGRAM
            else:
                self.tok_error(
                    onoff, "wait= is required for a program", "add wait=no (or wait=yes)"
                )
        if f.user is None and "user" not in seen:
            self.tok_error(onoff, "user= is required", "add user=nobody")
        for key in ("group", "login_class"):
            opt = seen.get(key)
            if opt is not None and not opt.bad:
                if getattr(f, key) is not None:
                    self.opt_error(opt, f"{key} given twice (also in user=)", "keep one")
                setattr(f, key, f.kv_names.get(key))
        bind, f.addresses = f.addresses, None
        self.service_field(svc, svc.text, f.protocol, f)
        if bind is not None and f.protocol is not Protocol.UNIX:
            if f.addresses is not None:
                self.tok_error(svc, "listen address given twice (prefix and bind=)", "keep one")
            f.addresses = bind

    def kv_defaults(self, svc: _Tok, onoff: _Tok, opts: list[_Opt]) -> None:
        if onoff.text != "on":
            self.tok_error(
                onoff, "'defaults off' means nothing", "write defaults on key=value, ...;"
            )
        for opt in opts:
            if opt.bad:
                continue
            if opt.key not in DEFAULTS_KEYS:
                why = "unknown key" if opt.key not in ENTRY_KEYS else "key not allowed in defaults"
                self.opt_error(
                    opt, f"{why} {opt.key!r}", "defaults accept: " + ", ".join(DEFAULTS_KEYS)
                )
                continue
            if opt.key == "env":
                self.env_values(opt, self.env_defaults)
                continue
            if opt.key in self.defaults or opt.key in self.limit_defaults:
                self.opt_error(opt, f"defaults set {opt.key} twice", "keep one")
                continue
            if opt.key in _LIST_KEYS:
                addresses = self.address_values(opt)
                if addresses is not None:
                    self.defaults[opt.key] = addresses
                    self.defaults_at[opt.key] = opt
                continue
            value = self.single(opt)
            if value is None:
                continue
            if opt.key in _LIMIT_KEYS:
                self.limit_value(opt, opt.key, value, self.limit_defaults)
                continue
            parsed = self.option_value(opt, opt.key, value)
            if parsed is not None:
                self.defaults[opt.key] = parsed
        only, deny = self.defaults.get("only_from"), self.defaults.get("no_access")
        if isinstance(only, AddressList) and isinstance(deny, AddressList):
            self.contradiction(self.defaults_at["only_from"], only, deny)

    def build_defaults(self) -> Options:
        values = dict(self.defaults)
        if self.env_defaults:
            values["env"] = tuple(self.env_defaults.items())
        values["limits"] = _limits(self.limit_defaults)
        return Options(**values)  # type: ignore[arg-type]

    # option values -------------------------------------------------------------------------

    def opt_error(self, opt: _Opt, message: str, hint: str = "") -> None:
        self.error(opt.lineno, opt.field, opt.raw, message, hint)

    def single(self, opt: _Opt) -> str | None:
        if len(opt.values) != 1:
            what = "a value" if not opt.values else "one value"
            self.opt_error(opt, f"{opt.key} takes {what}", f"write {opt.key}=VALUE")
            return None
        return opt.values[0]

    def env_values(self, opt: _Opt, env: dict[str, str]) -> None:
        if not opt.values:
            self.opt_error(opt, "env needs NAME=VALUE", 'write env="NAME=value"')
        for item in opt.values:
            name, eq, value = item.partition("=")
            if not eq or _ENV_NAME.fullmatch(name) is None:
                self.opt_error(opt, f"bad environment entry {item!r}", 'write env="NAME=value"')
            elif name in env:
                self.opt_error(opt, f"environment variable {name} set twice", "keep one")
            else:
                env[name] = value

    def limit_value(
        self, opt: _Opt, key: str, value: str, into: dict[str, int | None]
    ) -> None:
        """A limit key's value: N, 0 (nothing allowed; for max_child: no limit) or unlimited.

        ``into[key]`` becomes the number, or None for "no limit, written".
        """
        if value == UNLIMITED:
            into[key] = None
            return
        number = _uint(value)
        if number is None:
            zero = "no limit" if key == "max_child" else "nothing allowed"
            self.opt_error(
                opt,
                f"{key} must be an integer from 0 to {_INT_MAX} or unlimited, not {value!r}",
                f"0 means {zero}; write {key}=unlimited for no limit",
            )
            return
        into[key] = None if number == 0 and key == "max_child" else number

    def address_values(self, opt: _Opt) -> AddressList | None:
        """The ADDR[/LEN] words of an access list; None after an error (host bits: warning)."""
        if not opt.values:
            self.opt_error(
                opt,
                f"{opt.key} needs at least one ADDR[/LEN]",
                f"write {opt.key}=192.0.2.0/24 2001:db8::/32"
                + ("; for everyone write only_from=0.0.0.0/0 ::/0" if opt.key == "only_from"
                   else ""),
            )
            return None
        networks: list[netmatch.Network] = []
        ok = True
        for word in opt.values:
            got = netmatch.parse_cidr(word)
            if isinstance(got, str):
                self.opt_error(opt, f"{opt.key}: {got}", "write ADDR or ADDR/LEN, e.g. 10.0.0.0/8")
                ok = False
                continue
            if got.note:
                self.warn(opt.lineno, opt.field, opt.raw, f"{opt.key}: {got.note}",
                          f"write {got} to say what is meant")
            networks.append(got)
        return AddressList(networks) if ok else None

    def contradiction(self, where: _Opt, only: AddressList, deny: AddressList) -> None:
        """Diagnose only_from entries that no_access makes useless (all of them: an error)."""
        dead = netmatch.shadowed(only, deny)
        if not dead:
            return
        shown = ", ".join(str(n) for n in dead[:5]) + (", ..." if len(dead) > 5 else "")
        if len(dead) == len(only):
            self.error(where.lineno, where.field, _short(where.raw),
                       "only_from and no_access contradict: no_access covers every only_from "
                       f"entry ({shown}), so the service refuses every client",
                       "remove the no_access entries that cover only_from, or fix only_from")
        else:
            self.warn(where.lineno, where.field, _short(where.raw),
                      f"only_from entries inside no_access allow nobody: {shown}",
                      "remove them from only_from")

    def option_value(self, opt: _Opt, key: str, value: str) -> object | None:
        """Parse one poolinetd option value; None after reporting an error."""
        spec = _OPTION_PARSERS[key]
        parsed = spec.parse(value)
        if parsed is None:
            self.opt_error(
                opt, f"{key} must be {spec.what}, not {value!r}", f"write e.g. {key}={spec.example}"
            )
        return parsed


@dataclass(frozen=True, slots=True)
class _OptionParser:
    parse: Callable[[str], object | None]
    what: str
    example: str


def _positive(text: str) -> int | None:
    value = _uint(text)
    return value if value is not None and value > 0 else None


def _positive_float(text: str) -> float | None:
    value = _ufloat(text)
    return value if value is not None and value > 0 else None


def _stderr(text: str) -> StderrRoute | None:
    try:
        return StderrRoute(text)
    except ValueError:
        return None


def _yes_no(text: str) -> bool | None:
    return {"yes": True, "no": False}.get(text)


def _prefix(bits: int) -> Callable[[str], int | None]:
    def parse(text: str) -> int | None:
        value = _uint(text)
        return value if value is not None and value <= bits else None

    return parse


def _cap(text: str) -> int | None:
    """A global cap: N >= 1, or unlimited (stored as 0: "explicitly no cap")."""
    return 0 if text == UNLIMITED else _positive(text)


def _limits(values: dict[str, int | None]) -> Limits:
    """Limits from parsed limit keys (a None value = "unlimited" written)."""
    numbers = {k: v for k, v in values.items() if v is not None}
    lifted = frozenset(k for k, v in values.items() if v is None)
    return Limits(**numbers, unlimited=lifted)


_OPTION_PARSERS: dict[str, _OptionParser] = {
    "pool_min": _OptionParser(_uint, "an integer >= 0", "2"),
    "pool_max": _OptionParser(_positive, "an integer >= 1", "32"),
    "worker_connections": _OptionParser(_positive, "an integer >= 1", "256"),
    "max_requests": _OptionParser(_uint, "an integer >= 0 (0 = never recycle)", "10000"),
    "idle_timeout": _OptionParser(_ufloat, "a number of seconds >= 0", "60"),
    "conn_timeout": _OptionParser(_positive_float, "a number of seconds > 0", "300"),
    "stderr": _OptionParser(_stderr, "socket or log", "log"),
    "source_v4_prefix": _OptionParser(_prefix(32), "a prefix length from 0 to 32", "24"),
    "source_v6_prefix": _OptionParser(_prefix(128), "a prefix length from 0 to 128", "64"),
    "block_time": _OptionParser(_ufloat, "a number of seconds >= 0", "60"),
    "reuseport": _OptionParser(_yes_no, "yes or no", "yes"),
    "proxy_protocol": _OptionParser(_yes_no, "yes or no", "yes"),
    "max_connections": _OptionParser(_cap, "an integer >= 1 or unlimited", "10000"),
    "max_programs": _OptionParser(_cap, "an integer >= 1 or unlimited", "512"),
}


def parse(text: str, source: str) -> ParsedConfig:
    """Parse inetd.conf ``text``; ``source`` names it in diagnostics.

    Total: returns every spec it could read and a diagnostic for every
    problem, for any string (NUL bytes, lone surrogates and huge lines
    included). An entry with an error yields no spec; warnings do not stop
    an entry. ``.include`` lines are returned in ``includes``, not expanded.
    """
    try:
        return _Parser(text, source).run()
    except Exception as exc:
        # A bug here must not take down a running master on reload; report it
        # as an error so the file is refused and the bug gets noticed.
        bug = Diagnostic(
            source, 0, 0, "", f"internal parser error: {exc!r}", "please report this with the file"
        )
        return ParsedConfig(specs=(), defaults=Options(), diagnostics=(bug,))


# -- the formatter ---------------------------------------------------------------------------


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
    if spec.protocol is Protocol.UNIX:
        perms = spec.unix_perms
        if perms is None:
            return spec.service
        mode = "" if perms.mode is None else f"0{perms.mode:o}"
        return f":{perms.owner or ''}:{perms.group or ''}:{mode}:{spec.service}"
    name = spec.service
    if spec.tcpmux is not None:
        name = "tcpmux/" + ("+" if spec.tcpmux_plus else "") + spec.tcpmux
    if not spec.addresses:
        # "*:" keeps a service literally named like a directive from being read as one.
        return "*:" + name if name in ("defaults", ".include") else name
    addrs = ",".join(f"[{a}]" if ":" in a else a for a in spec.addresses)
    return f"{addrs}:{name}"


def _user_token(spec: ServiceSpec) -> str:
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
            spec.protocol.value,
            wait,
            _user_token(spec),
            spec.server,
            *(a for a in args if a is not None),
        ]
        return "\t".join(fields_)
    return _format_kv(spec)


def _format_kv(spec: ServiceSpec) -> str:
    opts = [
        f"socktype={spec.socket_type.value}",
        f"protocol={spec.protocol.value}",
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
    out: list[str] = []
    for name in _LIMIT_KEYS:
        value = getattr(limits, name)
        if value is not None:
            out.append(f"{name}={value}")
        elif name in limits.unlimited:
            out.append(f"{name}={UNLIMITED}")
    return out


def _format_options(options: Options) -> list[str]:
    out: list[str] = []
    for name in _OPTION_KEYS:
        value = getattr(options, name)
        if name == "env":
            if value:
                out.append("env=" + " ".join(_kv_value(f"{k}={v}") for k, v in value))
        elif isinstance(value, AddressList):
            out.append(f"{name}=" + " ".join(str(n) for n in value.networks))
        elif isinstance(value, StderrRoute):
            out.append(f"{name}={value.value}")
        elif isinstance(value, bool):
            out.append(f"{name}={'yes' if value else 'no'}")
        elif name in _GLOBAL_KEYS and value == 0:
            out.append(f"{name}={UNLIMITED}")
        elif isinstance(value, float):
            out.append(f"{name}={value!r}")
        elif value is not None:
            out.append(f"{name}={value}")
    return out


def format_defaults(options: Options) -> str:
    """A ``defaults on ...;`` line for ``options`` ("" when nothing is set)."""
    opts = _format_limits(options.limits) + _format_options(options)
    return "defaults on " + ", ".join(opts) + ";" if opts else ""
