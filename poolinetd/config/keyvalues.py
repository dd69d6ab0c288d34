"""Key-values definitions (NetBSD's notation and ``defaults``): scanned options -> an entry,
or the file's defaults.

Pure. ``KeyValues.entry`` reads one ``service on|off key=value, ...;``
definition into ``EntryFields`` (the shared fields through ``FieldReader``,
poolinetd's options and limits here), inferring what NetBSD infers;
``KeyValues.defaults`` accumulates ``defaults on ...;`` definitions, which
``build_defaults`` turns into ``Options``. Every problem goes to the report.
"""

from __future__ import annotations

import re
from dataclasses import replace

from poolinetd.config import accesslists, values
from poolinetd.config.fields import EntryFields, FieldReader
from poolinetd.config.keys import (
    DEFAULTS_KEYS,
    ENTRY_KEYS,
    GLOBAL_KEYS,
    IGNORED_KEYS,
    KEY_ALIASES,
    LIMIT_KEYS,
    LIST_KEYS,
    OPTION_PARSERS,
    WORDS_KEYS,
)
from poolinetd.config.report import FileReport, short
from poolinetd.config.spec import FieldLoc, Options, Protocol, SocketType
from poolinetd.config.tokens import Opt, Tok
from poolinetd.config.values import INT_MAX, UNLIMITED, limits_from, uint
from poolinetd.net import netmatch
from poolinetd.net.netmatch import AddressList

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class _EntryValues:
    """What one entry's options set, collected before they become Options and Limits."""

    def __init__(self) -> None:
        self.seen: dict[str, Opt] = {}  # canonical key -> where it was set
        self.env: dict[str, str] = {}
        self.options: dict[str, object] = {}
        self.limits: dict[str, int | None] = {}  # None = "unlimited" written


class KeyValues:
    """Reads key-values definitions; holds the file's ``defaults`` as they accumulate."""

    def __init__(self, report: FileReport, reader: FieldReader) -> None:
        self.report = report
        self.reader = reader
        self.defaults_set: dict[str, object] = {}
        self.env_defaults: dict[str, str] = {}  # insertion-ordered; O(1) twice-checks
        self.limit_defaults: dict[str, int | None] = {}  # None = "unlimited" written
        self.defaults_at: dict[str, Opt] = {}  # where defaults set an address list

    # entries -------------------------------------------------------------------------------

    def entry(self, svc: Tok, onoff: Tok, opts: list[Opt]) -> EntryFields | None:
        """The entry a definition spells, or None when it has an error (reported)."""
        f = EntryFields()
        got = _EntryValues()
        for opt in opts:
            if opt.bad:
                continue
            key = KEY_ALIASES.get(opt.key, opt.key)
            if opt.key not in ENTRY_KEYS:
                self.report.opt_error(
                    opt, f"unknown key {opt.key!r}", "valid keys: " + ", ".join(ENTRY_KEYS)
                )
                continue
            if key in got.seen and key != "env":
                first = got.seen[key]
                self.report.opt_error(
                    opt, f"{key} set twice (first at line {first.lineno})", "keep one"
                )
                continue
            got.seen[key] = opt
            f.locs[key] = FieldLoc(opt.lineno, opt.field, short(opt.raw))
            self.entry_option(opt, key, f, got)
        if got.env:
            got.options["env"] = tuple(got.env.items())
        only, deny = got.options.get("only_from"), got.options.get("no_access")
        if isinstance(only, AddressList) and isinstance(deny, AddressList):
            self.contradiction(got.seen["only_from"], only, deny)
        for key in ("sndbuf", "rcvbuf"):  # also in protocol=tcp,sndbuf=N (NetBSD)
            if key in got.options and getattr(f.options, key) is not None:
                self.report.opt_error(got.seen[key], f"{key} given twice (also in protocol=)",
                                      "keep one")
        f.options = replace(f.options, **got.options)  # type: ignore[arg-type]
        f.limits = limits_from(got.limits)
        self.complete(svc, onoff, f, got.seen)
        return None if self.report.entry_failed else f

    def entry_option(self, opt: Opt, key: str, f: EntryFields, got: _EntryValues) -> None:
        """Apply one option of an entry (``key`` = its canonical name)."""
        if key in IGNORED_KEYS:
            self.report.warn(opt.lineno, opt.field, opt.raw, f"{opt.key} ignored",
                             IGNORED_KEYS[key])
        elif key == "args":
            f.argv = tuple(opt.values)
        elif key == "env":
            self.env_values(opt, got.env)
        elif key in GLOBAL_KEYS:
            self.report.opt_error(
                opt,
                f"{key} is a global cap, not a per-service key",
                f"set it in defaults (defaults on {key}=N;) or with --{key.replace('_', '-')}",
            )
        elif key in LIST_KEYS:
            addresses = self.address_values(opt)
            if addresses is not None:
                got.options[key] = addresses
        elif key in WORDS_KEYS:
            words = self.module_words(opt)
            if words is not None:
                got.options[key] = words
        elif key == "bind":
            self.bind(opt, f)
        else:
            value = self.single(opt)
            if value is not None:
                self.entry_single(opt, key, value, f, got)

    def entry_single(
        self, opt: Opt, key: str, value: str, f: EntryFields, got: _EntryValues
    ) -> None:
        """Apply an entry option that takes one value."""
        tok = Tok(value, opt.raw, opt.lineno, opt.field, 0)
        if key == "socktype":
            self.reader.socket_type_field(tok, value, f)
        elif key == "protocol":
            self.reader.protocol_field(tok, value, f)
        elif key == "wait":
            if value not in ("yes", "no"):
                self.report.opt_error(
                    opt, f"wait must be yes or no, not {value!r}", "write wait=yes or wait=no"
                )
            f.wait = value == "yes"
        elif key == "user":
            self.reader.user_field(tok, value, f)
        elif key in ("group", "login_class"):
            if not value or any(c in value for c in ":/"):
                self.report.opt_error(opt, f"bad {key} {value!r}", f"write {key}=NAME")
            f.kv_names[key] = value
        elif key == "exec":
            self.reader.server_field(tok, value, f)
        elif key in LIMIT_KEYS:
            self.limit_value(opt, key, value, got.limits)
        else:
            parsed = self.option_value(opt, key, value)
            if parsed is not None:
                got.options[key] = parsed

    def bind(self, opt: Opt, f: EntryFields) -> None:
        """``bind=ADDR ...``: the listen addresses (each word read like a prefix)."""
        if not opt.values:
            self.report.opt_error(opt, "bind needs an address", "write bind=127.0.0.1")
            return
        addrs: list[str] = []
        for word in opt.values:
            got = self.reader.address_list(Tok(word, opt.raw, opt.lineno, opt.field, 0), word)
            if got is None:
                self.report.entry_failed = True
                return
            addrs.extend(got)
        f.addresses = tuple(addrs)

    def complete(self, svc: Tok, onoff: Tok, f: EntryFields, seen: dict[str, Opt]) -> None:
        """Infer what NetBSD infers, demand the rest, then read the service field."""
        if f.protocol is None and "protocol" not in seen:
            if f.socket_type is SocketType.STREAM:
                f.protocol = Protocol.TCP
            elif f.socket_type is SocketType.DGRAM:
                f.protocol = Protocol.UDP
            elif "socktype" not in seen:
                self.report.tok_error(
                    onoff, "protocol= is required", "add protocol=tcp (or udp, unix, ...)"
                )
        if f.socket_type is None and "socktype" not in seen and f.protocol is not None:
            if f.protocol.is_unix:
                self.report.tok_error(
                    onoff, "socktype= is required for unix", "add socktype=stream"
                )
            else:
                f.socket_type = SocketType.DGRAM if f.protocol.is_udp else SocketType.STREAM
        if f.server is None and "exec" not in seen:
            f.server = "internal"
        if f.wait is None and "wait" not in seen:
            if f.server == "internal":
                # Built-ins do not care; record what Debian writes for them.
                f.wait = f.socket_type is SocketType.DGRAM
            else:
                self.report.tok_error(
                    onoff, "wait= is required for a program", "add wait=no (or wait=yes)"
                )
        if f.user is None and "user" not in seen:
            self.report.tok_error(onoff, "user= is required", "add user=nobody")
        for key in ("group", "login_class"):
            opt = seen.get(key)
            if opt is not None and not opt.bad:
                if getattr(f, key) is not None:
                    self.report.opt_error(opt, f"{key} given twice (also in user=)", "keep one")
                setattr(f, key, f.kv_names.get(key))
        bind, f.addresses = f.addresses, None
        self.reader.service_field(svc, svc.text, f.protocol, f)
        if bind is not None and f.protocol is not Protocol.UNIX:
            if f.addresses is not None:
                self.report.tok_error(
                    svc, "listen address given twice (prefix and bind=)", "keep one"
                )
            f.addresses = bind

    # defaults ------------------------------------------------------------------------------

    def defaults(self, onoff: Tok, opts: list[Opt]) -> None:
        """Add a ``defaults on ...;`` definition's options to the file's defaults."""
        if onoff.text != "on":
            self.report.tok_error(
                onoff, "'defaults off' means nothing", "write defaults on key=value, ...;"
            )
        for opt in opts:
            if not opt.bad:
                self.default_option(opt)
        only, deny = self.defaults_set.get("only_from"), self.defaults_set.get("no_access")
        if isinstance(only, AddressList) and isinstance(deny, AddressList):
            self.contradiction(self.defaults_at["only_from"], only, deny)

    def default_option(self, opt: Opt) -> None:
        """Apply one option of a ``defaults`` definition."""
        if opt.key not in DEFAULTS_KEYS:
            why = "unknown key" if opt.key not in ENTRY_KEYS else "key not allowed in defaults"
            self.report.opt_error(
                opt, f"{why} {opt.key!r}", "defaults accept: " + ", ".join(DEFAULTS_KEYS)
            )
            return
        if opt.key == "env":
            self.env_values(opt, self.env_defaults)
            return
        if opt.key in self.defaults_set or opt.key in self.limit_defaults:
            self.report.opt_error(opt, f"defaults set {opt.key} twice", "keep one")
            return
        if opt.key in LIST_KEYS:
            addresses = self.address_values(opt)
            if addresses is not None:
                self.defaults_set[opt.key] = addresses
                self.defaults_at[opt.key] = opt
            return
        if opt.key in WORDS_KEYS:
            words = self.module_words(opt)
            if words is not None:
                self.defaults_set[opt.key] = words
            return
        value = self.single(opt)
        if value is None:
            return
        if opt.key in LIMIT_KEYS:
            self.limit_value(opt, opt.key, value, self.limit_defaults)
            return
        parsed = self.option_value(opt, opt.key, value)
        if parsed is not None:
            self.defaults_set[opt.key] = parsed

    def build_defaults(self) -> Options:
        """The file's ``defaults``, every definition of them merged."""
        values = dict(self.defaults_set)
        if self.env_defaults:
            values["env"] = tuple(self.env_defaults.items())
        values["limits"] = limits_from(self.limit_defaults)
        return Options(**values)  # type: ignore[arg-type]

    # option values -------------------------------------------------------------------------

    def single(self, opt: Opt) -> str | None:
        """The one value of ``opt``; None (reported) when it has none or several."""
        if len(opt.values) != 1:
            what = "a value" if not opt.values else "one value"
            self.report.opt_error(opt, f"{opt.key} takes {what}", f"write {opt.key}=VALUE")
            return None
        return opt.values[0]

    def module_words(self, opt: Opt) -> tuple[str, ...] | None:
        """``preload_modules=NAME ...``: dotted module names; None (reported) if one is not."""
        if not opt.values:
            self.report.opt_error(opt, f"{opt.key} needs a module name",
                                  f"write {opt.key}=json email.mime.text")
            return None
        for word in opt.values:
            if values.module_name(word) is None:
                self.report.opt_error(opt, f"{opt.key}: {word!r} is not a Python module name",
                                      f"write {opt.key}=json email.mime.text")
                return None
        return tuple(dict.fromkeys(opt.values))

    def env_values(self, opt: Opt, env: dict[str, str]) -> None:
        """Add ``env=NAME=VALUE ...`` to ``env``; a name set twice is an error."""
        if not opt.values:
            self.report.opt_error(opt, "env needs NAME=VALUE", 'write env="NAME=value"')
        for item in opt.values:
            name, eq, value = item.partition("=")
            if not eq or _ENV_NAME.fullmatch(name) is None:
                self.report.opt_error(
                    opt, f"bad environment entry {item!r}", 'write env="NAME=value"'
                )
            elif name in env:
                self.report.opt_error(opt, f"environment variable {name} set twice", "keep one")
            else:
                env[name] = value

    def limit_value(
        self, opt: Opt, key: str, value: str, into: dict[str, int | None]
    ) -> None:
        """A limit key's value: N, 0 (nothing allowed; for max_child: no limit) or unlimited.

        ``into[key]`` becomes the number, or None for "no limit, written".
        """
        if value == UNLIMITED:
            into[key] = None
            return
        number = uint(value)
        if number is None:
            zero = "no limit" if key == "max_child" else "nothing allowed"
            self.report.opt_error(
                opt,
                f"{key} must be an integer from 0 to {INT_MAX} or unlimited, not {value!r}",
                f"0 means {zero}; write {key}=unlimited for no limit",
            )
            return
        into[key] = None if number == 0 and key == "max_child" else number

    def address_values(self, opt: Opt) -> AddressList | None:
        """The ADDR[/LEN] words of an access list; None after an error (host bits: warning)."""
        if not opt.values:
            self.report.opt_error(
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
                self.report.opt_error(
                    opt, f"{opt.key}: {got}", "write ADDR or ADDR/LEN, e.g. 10.0.0.0/8"
                )
                ok = False
                continue
            if got.note:
                self.report.warn(opt.lineno, opt.field, opt.raw, f"{opt.key}: {got.note}",
                                 f"write {got} to say what is meant")
            networks.append(got)
        return AddressList(networks) if ok else None

    def contradiction(self, where: Opt, only: AddressList, deny: AddressList) -> None:
        """Diagnose only_from entries that no_access makes useless (all of them: an error)."""
        found = accesslists.contradiction(only, deny)
        if found is None:
            return
        say = self.report.error if found.error else self.report.warn
        say(where.lineno, where.field, short(where.raw), found.message, found.hint)

    def option_value(self, opt: Opt, key: str, value: str) -> object | None:
        """Parse one poolinetd option value; None after reporting an error."""
        parser = OPTION_PARSERS[key]
        parsed = parser.parse(value)
        if parsed is None:
            self.report.opt_error(
                opt,
                f"{key} must be {parser.what}, not {value!r}",
                f"write e.g. {key}={parser.example}",
            )
        return parsed
