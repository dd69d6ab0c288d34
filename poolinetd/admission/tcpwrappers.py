"""tcp_wrappers: hosts_access(5) as Debian's libwrap (tcpd 7.6.q) decides it. Pure.

Two halves:

* load time: ``parse(text, path)`` turns the text of a hosts.allow or
  hosts.deny into a ``Table`` (its rules and a ``Diagnostic`` per problem,
  each with file:line). It never raises, whatever the text.
* connection time: ``decide(allow, deny, request)`` reads hosts.allow first,
  then hosts.deny; the first rule whose daemon list and client list both
  match wins; no match grants. It answers a ``Verdict`` (allowed or not, the
  rule, its options expanded) or ``NEED_NAME`` when a pattern the walk
  reached needs the client's host name and ``request.client_name`` is None
  (not looked up yet): the caller looks the name up (never on the engine
  loop) and asks again with it. Evaluation has no side effects, so asking
  again walks the same rules to the same point.

Semantics follow libwrap's hosts_access.c as Debian builds it, checked
against the real ``tcpdmatch`` by tests/test_tcpwrappers_diff.py:

* a logical line joins physical lines ending in a backslash; a line starting
  with ``#`` is a comment (also when a continuation joins more onto it);
  ``#`` elsewhere is an ordinary character (libwrap has no inline comments);
* a last line without its newline (or one over MAX_LINE) is an error when a
  walk reaches it: hosts.allow then grants nothing more, and hosts.deny
  denies (libwrap's table_match returns its error; tcpdmatch agrees);
* fields are split at ``:`` outside ``[...]``, tokens at ``,`` and blanks;
  keywords, names and ``*``/``?`` wildcards compare ignoring ASCII case;
* ``n.n.n.n/m.m.m.m`` and ``/len`` match when ``addr & mask == net`` (a net
  with host bits set never matches, as in libwrap); addresses in dotted
  quads are read as inet_aton reads them (``010`` is octal);
* the client's host name is a real name, ``unknown`` (the lookup failed) or
  ``paranoid`` (the name does not map back to the address), as libwrap's
  ``UNKNOWN``/``PARANOID`` patterns expect; the user (ident) is never looked
  up: it is always ``unknown``; the server's host name is ``unknown`` too
  (``daemon@host`` matches the local address);
* an IPv4-mapped client (``::ffff:a.b.c.d``) is judged as a.b.c.d;
* an option error (an unknown option, a missing value, ``allow`` not last)
  denies, as libwrap's tcpd_jump does; load time already reports it.

What poolinetd does with the options is the engine's business (see
docs/configuration.md): ``allow``/``deny`` decide here; the others come back
expanded in ``Verdict.options``.
"""

from __future__ import annotations

import ipaddress
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

MAX_FILE_BYTES: Final = 1 << 20  # a hosts.allow/deny (or a /file pattern) larger is refused
MAX_LINE: Final = 2047  # libwrap's line buffer (BUFLEN 2048 with its NUL)
MAX_RULES: Final = 10_000  # per file: more is a diagnostic, the rest ignored
MAX_DEPTH: Final = 64  # EXCEPT nesting walked at most this deep (libwrap recurses freely)
UNKNOWN: Final = "unknown"
PARANOID: Final = "paranoid"
_SEP = re.compile(r"[, \t\r\n]+")
_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)  # strcasecmp: ASCII only
_INADDR_CHARS = frozenset("01234567890./")
# percent_x's safe characters: any other character an expansion yields becomes "_",
# so a client's host name cannot inject shell syntax into spawn or twist.
_OK_CHARS = frozenset(
    "1234567890!@%-_=+:,./abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
# libwrap's option table: name -> (needs a value, must come last, value is %-expanded)
_OPTIONS: Final[Mapping[str, tuple[bool, bool, bool]]] = {
    "user": (True, False, False), "group": (True, False, False),
    "umask": (True, False, False), "linger": (True, False, False),
    "keepalive": (False, False, False), "spawn": (True, False, True),
    "twist": (True, True, True), "rfc931": (False, False, False),
    "setenv": (True, False, True), "nice": (False, False, False),
    "severity": (True, False, False), "allow": (False, True, False),
    "deny": (False, True, False), "banners": (True, False, False),
}
_NO_VALUE = frozenset({"keepalive", "allow", "deny"})  # a value given to these is an error
_FACILITIES = frozenset({
    "auth", "authpriv", "cron", "daemon", "ftp", "kern", "lpr", "mail", "news", "security",
    "syslog", "user", "uucp", "local0", "local1", "local2", "local3", "local4", "local5",
    "local6", "local7", "mark"})
_SEVERITIES = frozenset({
    "emerg", "panic", "alert", "crit", "err", "error", "warning", "warn", "notice", "info",
    "debug"})
# Options poolinetd reads but does not apply (a load-time warning says so): the
# program's user, umask and nice are the service's; no ident lookups, no banners.
# spawn, twist, setenv and severity are applied (tcpwrappers_options.actions).
NOT_APPLIED: Final = frozenset({"user", "group", "umask", "linger", "keepalive", "rfc931",
                                "nice", "banners"})


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One problem in a file: ``where`` is "path:line"; ``level`` "error" or "warning"."""

    where: str
    message: str
    level: str = "error"

    def __str__(self) -> str:
        return f"{self.where}: {self.level}: {self.message}"


@dataclass(frozen=True, slots=True)
class Option:
    """One option of a rule: its name (lower case) and raw value (None if it has none)."""

    name: str
    value: str | None


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``daemon_list : client_list [: options]`` line.

    ``daemons``/``clients``: the lists' text, tokenised at match time as libwrap
    does (a list is short); ``options`` parsed at load time; ``option_error``
    is "" or why libwrap would deny when this rule matches.
    """

    where: str
    daemons: tuple[str, ...]
    clients: tuple[str, ...]
    options: tuple[Option, ...] = ()
    option_error: str = ""
    broken: bool = False  # a line without its newline: reaching it is an error (see decide)


@dataclass(frozen=True, slots=True)
class Table:
    """A parsed hosts.allow or hosts.deny: its rules in order and its diagnostics."""

    path: str = ""
    rules: tuple[Rule, ...] = ()
    diagnostics: tuple[Diagnostic, ...] = ()

    def file_patterns(self) -> set[str]:
        """Every ``/file`` pattern named in a client list (the loader reads them)."""
        found: set[str] = set()
        for rule in self.rules:
            for tok in rule.clients:
                host = _split_at(tok[1:], "@")
                pattern = host[1] if host is not None else tok
                if pattern.startswith("/"):
                    found.add(pattern)
        return found


@dataclass(frozen=True, slots=True)
class Request:
    """What a decision is about.

    ``daemon``: the process name (argv[0]'s basename, or a built-in's service
    name); ``server_addr``/``client_addr``: numeric addresses as the socket
    reports them ("" if unknown, e.g. a unix socket); ``client_name``: the
    client's host name, ``unknown``, ``paranoid``, or None if not looked up;
    ``files``: the tokens of each ``/file`` pattern (absent: no such file);
    ``pid``: what ``%p`` expands to.
    """

    daemon: str
    client_addr: str
    server_addr: str = ""
    client_name: str | None = None
    files: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    pid: int = 0


@dataclass(frozen=True, slots=True)
class Verdict:
    """The decision: ``allowed``; ``where`` the deciding rule ("" when none matched);
    ``options`` the rule's options with values %-expanded; ``error`` "" or the
    option error that denied."""

    allowed: bool
    where: str = ""
    options: tuple[Option, ...] = ()
    error: str = ""


class _NeedName(Exception):
    """The walk reached a pattern that needs the client's name, and it is not known."""


NEED_NAME: Final = "need_name"  # decide()'s answer when the client's host name is needed


# -- load time ------------------------------------------------------------------------
def parse(text: str, path: str) -> Table:
    """Parse the text of a hosts.allow/hosts.deny; every problem is a Diagnostic.

    ``text`` is the file decoded as latin-1 (one character per byte, as the C
    code sees it). Never raises.
    """
    diags: list[Diagnostic] = []
    rules: list[Rule] = []
    if len(text) > MAX_FILE_BYTES:
        # as a file libwrap cannot read: its walk errs at once
        diags.append(Diagnostic(f"{path}:1", f"file larger than {MAX_FILE_BYTES} bytes: "
                                "not read; treated as an error, as libwrap does"))
        return Table(path, (Rule(f"{path}:1", (), (), broken=True),), tuple(diags))
    for lineno, line, complete in _logical_lines(text):
        where = f"{path}:{lineno}"
        if "\0" in line:
            diags.append(Diagnostic(where, "NUL byte in line: line ignored"))
            continue
        if not complete:
            # libwrap's table walk stops with an error here: hosts.allow then grants
            # nothing more, hosts.deny denies (tcpdmatch agrees)
            diags.append(Diagnostic(where, "missing newline or line too long: a client "
                                    "that reaches this line is not granted by this file"
                                    + (" and is denied" if _is_deny(path) else "")))
            rules.append(Rule(where, (), (), broken=True))
            continue
        if line.startswith("#") or not line.strip(" \t\r\n"):
            continue
        split = _split_at(line, ":")
        if split is None:
            diags.append(Diagnostic(where, 'missing ":" separator: line ignored'))
            continue
        daemons, rest = split
        more = _split_at(rest, ":")
        clients, options = more if more is not None else (rest, None)
        if len(rules) >= MAX_RULES:
            diags.append(Diagnostic(where, f"more than {MAX_RULES} rules: the rest ignored"))
            break
        opts: tuple[Option, ...] = ()
        error = ""
        if options is not None:
            opts, error, notes = _parse_options(options)
            diags += [Diagnostic(where, note, "warning") for note in notes]
            if error:
                diags.append(Diagnostic(where, f"{error} (libwrap denies when this rule "
                                        "matches)"))
        dtoks, ctoks = _tokens(daemons), _tokens(clients)
        if not dtoks:
            diags.append(Diagnostic(where, "empty daemon list: the rule never matches",
                                    "warning"))
        if not ctoks:
            diags.append(Diagnostic(where, "empty client list: the rule never matches",
                                    "warning"))
        for tok in ctoks:
            note = _pattern_note(tok)
            if note:
                diags.append(Diagnostic(where, note, "warning"))
        rules.append(Rule(where, dtoks, ctoks, opts, error))
    return Table(path, tuple(rules), tuple(diags))


def _is_deny(path: str) -> bool:
    return path.endswith("deny")


def _logical_lines(text: str) -> list[tuple[int, str, bool]]:
    """(first line number, logical line with its newline, ended by a newline) per line.

    As libwrap's xgets: a backslash right before the newline joins the next
    physical line (both removed). A logical line longer than MAX_LINE is
    reported incomplete (libwrap would split it at its buffer size).
    """
    out: list[tuple[int, str, bool]] = []
    parts: list[str] = []
    start = 1
    lineno = 0
    for phys in text.splitlines(keepends=True):
        lineno += 1
        # only "\n" ends a line for fgets: splitlines also splits at \r, \x0b...
        if not parts:
            start = lineno
        if phys.endswith("\n") and phys[-2:-1] == "\\":
            parts.append(phys[:-2])
            continue
        parts.append(phys)
        if phys.endswith("\n"):
            line = "".join(parts)
            out.append((start, line, len(line) <= MAX_LINE))
            parts = []
    if parts:
        out.append((start, "".join(parts), False))
    return out


def _tokens(text: str) -> tuple[str, ...]:
    return tuple(t for t in _SEP.split(text) if t)


def _split_at(text: str, delimiter: str) -> tuple[str, str] | None:
    """libwrap's split_at: split at the first ``delimiter`` outside [brackets], or None."""
    depth = 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif depth == 0 and ch == delimiter:
            return text[:i], text[i + 1:]
    return None


def _fields(text: str) -> list[str]:
    """libwrap's get_field: split options at ":", where "\\:" is a literal colon."""
    out: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and text[i + 1:i + 2] == ":":
            cur.append(":")
            i += 2
            continue
        if ch == ":":
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    out.append("".join(cur))
    return out


def _parse_options(text: str) -> tuple[tuple[Option, ...], str, list[str]]:
    """(options, error, warnings) of an option field list, checked as process_options
    checks them (libwrap does it at match time; the error denies then)."""
    opts: list[Option] = []
    notes: list[str] = []
    fields = _fields(text)
    for i, raw in enumerate(fields):
        opt = raw.strip(" \t\r\n")
        cut = len(opt)
        for j, ch in enumerate(opt):
            if ch in " \t\r\n=":
                cut = j
                break
        key, value = opt[:cut], opt[cut:]
        value = value.lstrip(" \t\r\n")
        if value.startswith("="):
            value = value[1:].lstrip(" \t\r\n")
        if not key:
            return tuple(opts), "missing option name", notes
        name = key.translate(_LOWER)
        spec = _OPTIONS.get(name)
        if spec is None:
            return tuple(opts), f'bad option name: "{key}"', notes
        needs, last, _expand = spec
        if not value and needs:
            return tuple(opts), f'value required for option "{key}"', notes
        if value and name in _NO_VALUE:
            return tuple(opts), f'option "{key}" requires no value', notes
        if last and i != len(fields) - 1:
            return tuple(opts), f'option "{key}" must be at end', notes
        if name == "severity" and not _severity_ok(value):
            return tuple(opts), f'bad syslog facility or severity: "{value}"', notes
        if name == "setenv":
            problem = _setenv_problem(value)
            if problem:
                return tuple(opts), problem, notes
        if name in NOT_APPLIED:
            notes.append(f'option "{name}" is not applied by poolinetd')
        opts.append(Option(name, value or None))
    return tuple(opts), "", notes


def split_setenv(value: str) -> tuple[str, str]:
    """libwrap's setenv_option: NAME up to the first blank, VALUE the rest, both chopped."""
    text = value.strip(" \t\r\n")
    for i, ch in enumerate(text):
        if ch in " \t\r\n":
            return text[:i], text[i + 1:].strip(" \t\r\n")
    return text, ""


def _setenv_problem(value: str) -> str:
    """Why setenv(3) would refuse the NAME ("" if it would not): libwrap's tcpd then
    exits without serving the client, so the rule denies."""
    name, _ = split_setenv(value)
    if "=" in name:
        return f'option "setenv": bad variable name "{name}"'
    return ""


def _severity_ok(value: str) -> bool:
    """``level`` or ``facility.level``, as libwrap's severity_option accepts."""
    facility, dot, level = value.translate(_LOWER).rpartition(".")
    if dot and facility not in _FACILITIES:
        return False
    return level in _SEVERITIES


def _pattern_note(tok: str) -> str:
    """A warning for a client pattern libwrap accepts but that never matches here."""
    if tok.startswith("@"):
        return f"{tok}: NIS netgroups are not supported (never matches, as in Debian)"
    return ""


# -- connection time -----------------------------------------------------------------
def decide(allow: Table, deny: Table, request: Request) -> Verdict | str:
    """hosts.allow, then hosts.deny, first match wins, else granted; or NEED_NAME."""
    req = _normal(request)
    try:
        for table, allowed in ((allow, True), (deny, False)):
            for rule in table.rules:
                if rule.broken:
                    if allowed:
                        break  # hosts.allow: an error grants nothing; hosts.deny is next
                    return Verdict(False, rule.where, (), "missing newline or line too long")
                if (_list_match(rule.daemons, 0, req, _server_match)
                        and _list_match(rule.clients, 0, req, _client_match)):
                    return _verdict(rule, allowed, req)
    except _NeedName:
        return NEED_NAME
    return Verdict(True)


def _normal(request: Request) -> Request:
    addr = request.client_addr
    if addr[:7].lower() == "::ffff:" and _dot_quad(addr[7:]) is not None:
        return Request(request.daemon, addr[7:], request.server_addr, request.client_name,
                       request.files, request.pid)
    return request


def _verdict(rule: Rule, allowed: bool, req: Request) -> Verdict:
    if rule.option_error:
        return Verdict(False, rule.where, (), rule.option_error)
    opts: list[Option] = []
    for opt in rule.options:
        if opt.name == "allow":
            allowed = True
        elif opt.name == "deny":
            allowed = False
        else:
            value = opt.value
            if value is not None and _OPTIONS[opt.name][2]:
                value = expand(value, req).strip(" \t\r\n")
            opts.append(Option(opt.name, value))
    return Verdict(allowed, rule.where, tuple(opts))


def _list_match(toks: Sequence[str], start: int, req: Request,
                match: Callable[[str, Request], bool], depth: int = 0) -> bool:
    """libwrap's list_match: the first matching token, unless an EXCEPT list matches."""
    for i in range(start, len(toks)):
        tok = toks[i]
        if tok.translate(_LOWER) == "except":
            return False
        if match(tok, req):
            for j in range(i + 1, len(toks)):
                if toks[j].translate(_LOWER) == "except":
                    if depth >= MAX_DEPTH:
                        return False
                    return not _list_match(toks, j + 1, req, match, depth + 1)
            return True
    return False


def _server_match(tok: str, req: Request) -> bool:
    split = _split_at(tok[1:], "@")
    if split is None:
        return _string_match(tok, req.daemon)
    daemon = tok[0] + split[0]
    return (_string_match(daemon, req.daemon)
            and _host_match(split[1], req.server_addr or UNKNOWN, UNKNOWN, req))


def _client_match(tok: str, req: Request) -> bool:
    split = _split_at(tok[1:], "@")
    if split is None:
        return _host_match(tok, req.client_addr or UNKNOWN, None, req)
    user = tok[0] + split[0]
    return (_host_match(split[1], req.client_addr or UNKNOWN, None, req)
            and _string_match(user, UNKNOWN))


def _host_match(tok: str, addr: str, name: str | None, req: Request, nested: int = 0) -> bool:
    """libwrap's host_match; ``name`` None: the client's name (looked up only if needed)."""

    def hostname() -> str:
        if name is not None:
            return name
        if req.client_name is None:
            raise _NeedName
        return req.client_name

    if tok.startswith("@"):
        return False  # NIS netgroups: Debian's libwrap has them off too
    if tok.startswith("/"):
        if nested:
            return False  # a /file inside a /file: not followed (no loops)
        return any(_host_match(t, addr, name, req, nested + 1)
                   for t in req.files.get(tok, ()))
    low = tok.translate(_LOWER)
    if low == "known":
        return addr != UNKNOWN and _name_known(hostname())
    if low == "local":
        got = hostname()
        return "." not in got and _name_known(got)
    split = _split_at(tok, "/")
    if split is not None:
        return _masked_match(split[0], split[1], addr)
    if _string_match(tok, addr):
        return True
    return not set(tok) <= _INADDR_CHARS and _string_match(tok, hostname())


def _name_known(name: str) -> bool:
    low = name.translate(_LOWER)
    return low not in (UNKNOWN, PARANOID)


def _string_match(tok: str, value: str) -> bool:
    """libwrap's string_match (with Debian's wildcards and bracketed IPv6)."""
    if value[:7].lower() == "::ffff:" and _dot_quad(value[7:]) is not None:
        value = value[7:]
    low = tok.translate(_LOWER)
    if tok.startswith("."):
        n = len(value) - len(tok)
        return n > 0 and value[n:].translate(_LOWER) == low
    if low == "all":
        return True
    if low == "known":
        return value.translate(_LOWER) != UNKNOWN
    if tok.endswith("."):
        return value[:len(tok)].translate(_LOWER) == low
    if "*" in tok or "?" in tok:
        return _wildcard(value, tok)
    if tok.startswith("[") and tok.endswith("]") and len(tok) >= 2:
        pat, got = _ip6(tok[1:-1]), _ip6(value)
        return pat is not None and got is not None and pat == got
    return value.translate(_LOWER) == low


def _wildcard(value: str, pattern: str) -> bool:
    """``*`` and ``?`` over the whole of ``value``, ignoring ASCII case (Debian's
    match_pattern_ylo; tcpdmatch agrees: ``?cho`` matches ``ECHO``).

    A greedy glob that backtracks only to the last ``*``: O(len(value) x
    len(pattern)) whatever the pattern (a regex of ``.*`` runs is exponential in
    the stars on a name that does not match, and the client chooses the name).
    """
    text, pat = value.translate(_LOWER), pattern.translate(_LOWER)
    t = p = 0
    star, mark = -1, 0  # where the last * was, and where in text it stood
    while t < len(text):
        if p < len(pat) and pat[p] == "*":
            star, mark = p, t
            p += 1
        elif p < len(pat) and (pat[p] == "?" or pat[p] == text[t]):
            t += 1
            p += 1
        elif star >= 0:  # let the last * take one character more
            mark += 1
            t, p = mark, star + 1
        else:
            return False
    while p < len(pat) and pat[p] == "*":
        p += 1
    return p == len(pat)


def _masked_match(net: str, mask: str, addr: str) -> bool:
    if _dot_quad(addr) is not None:
        return _masked4(net, mask, addr)
    return _masked6(net, mask, addr)


def _masked4(net_tok: str, mask_tok: str, addr_tok: str) -> bool:
    addr = _dot_quad(addr_tok)
    net = _dot_quad(net_tok)
    if addr is None or net is None:
        return False
    mask = _dot_quad(mask_tok)
    if mask is None:
        mask = _prefix_mask(mask_tok)
        if mask is None:
            return False
    return (addr & mask) == net


def _prefix_mask(text: str) -> int | None:
    """``/len`` as Debian's libwrap reads it: the number that starts the text (strtoul,
    base 10, what follows ignored: ``/8x`` is /8), as a C int, valid from 1 to 32
    ("/0", "/33", "/-8" and "/x" are bad masks; tcpdmatch agrees)."""
    m = re.match(r"[ \t\n\r\f\v]*([+-]?)([0-9]+)", text)
    if m is None:
        return None
    value = min(int(m.group(2)), (1 << 64) - 1)  # strtoul saturates at ULONG_MAX
    if m.group(1) == "-":
        value = -value % (1 << 64)
    value &= 0xFFFFFFFF  # the int it is stored in
    bits = value - (1 << 32) if value >= 1 << 31 else value
    if not 1 <= bits <= 32:
        return None
    return (0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF


def _masked6(net_tok: str, mask_tok: str, addr_tok: str) -> bool:
    addr = _ip6(addr_tok)
    if addr is None or not (net_tok.startswith("[") and net_tok.endswith("]")):
        return False
    net = _ip6(net_tok[1:-1])
    if net is None:
        return False
    m = re.match(r"[ \t]*[+-]?[0-9]*", mask_tok)  # atoi: what number starts the text
    digits = m.group(0).strip() if m else ""
    bits = int(digits) if digits not in ("", "+", "-") else 0
    if not 0 <= bits <= 128:
        return False
    shift = 128 - bits
    return (addr >> shift) == (net >> shift)


def _ip6(text: str) -> int | None:
    """A numeric IPv6 address (as getaddrinfo AF_INET6 AI_NUMERICHOST), or None."""
    if "%" in text:
        text = text.split("%", 1)[0]  # scope ids are not compared (poolinetd: see docs)
    try:
        return int(ipaddress.IPv6Address(text))
    except ValueError:
        return None


_PART = re.compile(r"0[xX][0-9a-fA-F]*|0[0-7]*|[1-9][0-9]*")


def _dot_quad(text: str) -> int | None:
    """libwrap's dot_quad_addr: exactly four dot-separated runs, read by inet_aton
    (hex and octal parts); 255.255.255.255 is INADDR_NONE, so None, as in C."""
    parts = text.split(".")
    if len(parts) != 4:
        return None
    value = 0
    for part in parts:
        if not _PART.fullmatch(part):
            return None
        if part[:2] in ("0x", "0X"):
            n = int(part[2:] or "0", 16)
        elif part.startswith("0") and len(part) > 1:
            n = int(part, 8)
        else:
            n = int(part)
        if n > 255:
            return None
        value = value << 8 | n
    return None if value == 0xFFFFFFFF else value


# -- % expansions ------------------------------------------------------------------
def expand(text: str, req: Request) -> str:
    """libwrap's percent_x: %a %A %c %d %h %H %n %N %p %s %u %% in ``text``.

    Each expansion's characters outside libwrap's safe set become "_". ``%h``
    and ``%c`` give the client's name when it is known, else its address;
    ``%n`` its name or ``unknown``; the server's name and the user are unknown.
    """
    name = req.client_name if req.client_name is not None else UNKNOWN
    addr = req.client_addr or UNKNOWN
    host = name if _name_known(name) else addr
    server = req.server_addr or UNKNOWN
    values = {
        "a": addr, "A": server, "c": host, "d": req.daemon, "h": host, "H": server,
        "n": name, "N": UNKNOWN, "p": str(req.pid), "s": f"{req.daemon}@{server}",
        "u": UNKNOWN,
    }
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "%" and i + 1 < len(text):
            key = text[i + 1]
            i += 2
            if key == "%":
                out.append("%")
                continue
            got = values.get(key, "")
            out.append("".join(c if c in _OK_CHARS else "_" for c in got))
            continue
        out.append(ch)
        i += 1
    return "".join(out)
