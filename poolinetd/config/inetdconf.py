"""Parser and formatter for inetd.conf: positional entries and NetBSD key-values definitions.

Pure: no I/O, no name lookups. ``parse(text, source)`` is total (it never
raises, whatever the text) and returns every spec and every diagnostic;
``format_spec(spec)`` writes one entry back, and parse(format_spec(s)) == s.

This module reads statements and dispatches them; the pieces live beside it:
``tokens`` (lines, fields), ``fields`` (the fields both notations share),
``positional``, ``kvscan`` and ``keyvalues`` (the key-values notation),
``keys`` and ``values`` (key tables, value converters), ``formatter``.

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
                  | "rpc/" (udp | tcp | udp4 | tcp4 | udp6 | tcp6 | udp46 | tcp46 | "*")
                  (then service = program "/" low ["-" high]);  "/faith": error
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

from poolinetd.config import kvscan, positional
from poolinetd.config.fields import EntryFields, FieldReader
from poolinetd.config.formatter import format_defaults, format_spec
from poolinetd.config.keys import DEFAULTS_KEYS, ENTRY_KEYS
from poolinetd.config.keyvalues import KeyValues
from poolinetd.config.report import FileReport
from poolinetd.config.spec import (
    Diagnostic,
    Include,
    Options,
    ParsedConfig,
    Protocol,
    ServiceSpec,
)
from poolinetd.config.tokens import FIELD, WS, Tok, is_blank, split_lines

# The key tables and the formatter are imported from here by docs tests, benchmarks and
# property tests: this module stays the parser's front door.
__all__ = ["DEFAULTS_KEYS", "ENTRY_KEYS", "format_defaults", "format_spec", "parse"]


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


class _Parser:
    """One pass over the lines: each statement to its reader; every problem a Diagnostic."""

    def __init__(self, text: str, source: str) -> None:
        self.source = source
        self.lines = split_lines(text)
        self.report = FileReport(source)
        self.fields = FieldReader(self.report)
        self.kv = KeyValues(self.report, self.fields)
        self.specs: list[ServiceSpec] = []
        self.includes: list[Include] = []
        self.default_addrs: tuple[str, ...] = ()

    def run(self) -> ParsedConfig:
        """Read every line: comments and blanks skipped, statements dispatched."""
        i, n = 0, len(self.lines)
        while i < n:
            line = self.lines[i]
            if is_blank(line):
                i += 1
            elif line.startswith("#@"):
                if line[2:].strip(WS):
                    self.report.warn(
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
            defaults=self.kv.build_defaults(),
            diagnostics=tuple(self.report.diags),
            includes=tuple(self.includes),
        )

    def statement(self, i: int) -> int:
        """Read the statement starting at line index ``i``; return the next line index."""
        j = i + 1
        while (
            j < len(self.lines)
            and self.lines[j][:1] in (" ", "\t")
            and not is_blank(self.lines[j])
        ):
            j += 1
        self.report.entry_failed = False
        # Key-values definitions say on/off in field 2 of their first line; they
        # have their own quoting, so detect them before positional tokenizing.
        first = self.lines[i]
        heads = FIELD.finditer(first)
        head = next(heads)  # the line is not blank
        second = next(heads, None)
        if second is not None and second.group() in ("on", "off"):
            svc = Tok(head.group(), head.group(), i + 1, 1, head.end())
            onoff = Tok(second.group(), second.group(), i + 1, 2, second.end())
            return self.kv_definition(svc, onoff)
        toks = positional.tokenize(self.lines, i, j, self.report)
        if not toks:
            return j
        if toks[0].text == ".include":
            self.include(toks)
        elif len(toks) == 1 and toks[0].text.endswith(":"):
            self.default_address(toks[0])
        elif not self.report.entry_failed:
            f = positional.read_entry(toks, self.fields)
            if f is not None:
                self.emit(f, toks[0].lineno, enabled=True)
        return j

    def kv_definition(self, svc: Tok, onoff: Tok) -> int:
        """A key-values definition (an entry or ``defaults``); return the next line index."""
        opts, next_index = kvscan.scan(self.lines, onoff, self.report)
        if svc.text == "defaults":
            self.kv.defaults(onoff, opts)
        elif not self.report.entry_failed:
            f = self.kv.entry(svc, onoff, opts)
            if f is not None:
                self.emit(f, svc.lineno, enabled=onoff.text == "on")
        return next_index

    def include(self, toks: list[Tok]) -> None:
        """``.include PATTERN``: recorded with its place; ``includes`` expands it."""
        if len(toks) != 2:
            self.report.tok_error(
                toks[-1], ".include takes exactly one pattern", 'write .include "inetd.d/*.conf"'
            )
            return
        pattern = toks[1].text
        if len(pattern) >= 2 and pattern[0] == pattern[-1] and pattern[0] in "\"'":
            pattern = pattern[1:-1]
        if not pattern:
            self.report.tok_error(
                toks[1], "empty .include pattern", 'write .include "inetd.d/*.conf"'
            )
            return
        self.includes.append(Include(pattern, self.source, toks[0].lineno, len(self.specs)))

    def default_address(self, tok: Tok) -> None:
        """``addr-list:`` alone on its line: the listen addresses of the entries below it."""
        addrs = self.fields.address_list(tok, tok.text[:-1])
        if addrs is not None:
            self.default_addrs = addrs

    def emit(self, f: EntryFields, lineno: int, *, enabled: bool) -> None:
        """Add the spec of a complete, error-free entry."""
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
                rpc=f.rpc,
                unix_perms=f.unix_perms,
                options=f.options,
                enabled=enabled,
                source=self.source,
                lineno=lineno,
                locs=tuple(f.locs.items()),
            )
        )
