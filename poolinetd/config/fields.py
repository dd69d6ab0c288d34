"""The fields both notations share, read into an entry: service, socket type, protocol, wait,
user, server, listen addresses.

Pure: a ``FieldReader`` reports every problem to its ``FileReport`` and
fills an ``EntryFields``; the positional reader calls it with the fields of
a line, the key-values reader with the value of ``socktype=``, ``user=``...
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from poolinetd.config import values
from poolinetd.config.report import FileReport, short
from poolinetd.config.spec import (
    RPC_NUMBER_MAX,
    RPC_VERSIONS_MAX,
    FieldLoc,
    Limits,
    Options,
    Protocol,
    RpcSpec,
    SocketType,
    UnixPerms,
)
from poolinetd.config.tokens import Tok
from poolinetd.config.values import INT_MAX, uint

_OCTAL = re.compile(r"[0-7]{1,6}")
_BUFSIZE = re.compile(r"(?:sndbuf|rcvbuf)=[0-9]+[kKmM]?")
_SOCKET_TYPES = ", ".join(t.value for t in SocketType)
_PROTOCOLS = ", ".join(p.value for p in Protocol)
# FreeBSD's nowait/MAX_CHILD/MAX_CPM/MAX_PER_IP, in the order they are written.
_FREEBSD_LIMITS = ("max_child", "max_cpm_per_ip", "max_child_per_ip")


@dataclass(slots=True)
class EntryFields:
    """What an entry says, collected before it becomes a ServiceSpec."""

    service: str = ""
    addresses: tuple[str, ...] | None = None  # None = not given: the default address applies
    tcpmux: str | None = None
    tcpmux_plus: bool = False
    rpc: RpcSpec | None = None  # an RPC entry's versions (field 1 after its '/')
    rpc_protocol: bool = False  # field 3 was rpc/...: field 1 reads PROGRAM/VERSIONS
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


def _loc(tok: Tok) -> FieldLoc:
    return FieldLoc(tok.lineno, tok.field, short(tok.raw))


class FieldReader:
    """Reads one field at a time into an ``EntryFields``; problems go to ``report``.

    Each ``*_field(tok, text, f)`` reads ``text`` (the field as the notation
    gives it) and records ``tok`` as where the field was written. A field in
    error is left unset; the caller decides from ``report.entry_failed``.
    """

    def __init__(self, report: FileReport) -> None:
        self.report = report

    def address_list(self, tok: Tok, text: str) -> tuple[str, ...] | None:
        """Addresses of a prefix; () = the wildcard; None after an error."""
        out: list[str] = []
        parts = text.split(",")
        for part in parts:
            addr = part
            if addr.startswith("["):
                if not addr.endswith("]") or len(addr) < 3:
                    self.report.tok_error(
                        tok, f"bad bracketed address {part!r}", "write [::1]:service"
                    )
                    return None
                addr = addr[1:-1]
            if not addr:
                self.report.tok_error(
                    tok, "empty address", "write addr:service, [v6addr]:service or *:service"
                )
                return None
            if addr == "*":
                if len(parts) > 1:
                    self.report.tok_error(
                        tok,
                        "'*' cannot be combined with other addresses",
                        "write *:service alone, or list the addresses",
                    )
                    return None
                continue
            if any(c in addr for c in "[]/"):
                self.report.tok_error(
                    tok, f"bad address {part!r}", "write an IP address or a host name"
                )
                return None
            out.append(addr)
        return tuple(out)

    def service_field(
        self, tok: Tok, text: str, protocol: Protocol | None, f: EntryFields
    ) -> None:
        """Fill service, addresses, tcpmux and unix_perms from field 1 (``text`` = as written).

        ``protocol`` decides the reading: a unix service is a socket path.
        """
        f.locs["service"] = _loc(tok)
        if protocol is Protocol.UNIX:
            self.unix_service(tok, text, f)
            return
        name = text
        if ":" in text:
            # At the last ':', so that BusyBox's ":::svc" is the address "::".
            host, _, name = text.rpartition(":")
            f.addresses = self.address_list(tok, host)
        if f.rpc_protocol:
            name = self.rpc_service(tok, name, f)
        elif name.startswith("tcpmux/"):
            mux = name[len("tcpmux/") :]
            f.tcpmux_plus = mux.startswith("+")
            f.tcpmux = mux[1:] if f.tcpmux_plus else mux
            if not f.tcpmux or "/" in f.tcpmux:
                self.report.tok_error(
                    tok, "tcpmux service needs a name", "write tcpmux/NAME or tcpmux/+NAME"
                )
            name = "tcpmux"
        else:
            self.service_name(tok, name)
        f.service = name

    def service_name(self, tok: Tok, name: str) -> None:
        """Check a service name or port number (it is looked up at resolve time)."""
        if not name:
            self.report.tok_error(
                tok, "empty service name", "write a name from /etc/services or a port"
            )
        elif name.startswith("/"):
            self.report.tok_error(
                tok, "a path is a unix socket", "use protocol unix for a socket path"
            )
        elif "/" in name:
            self.report.tok_error(
                tok,
                "a '/' in the service name is an RPC program and its versions",
                "write protocol rpc/udp or rpc/tcp for an RPC service",
            )
        elif name[0].isdigit() or name.isdigit():
            port = uint(name)
            if port is None or port > 65535:
                self.report.tok_error(
                    tok, f"bad port {name!r}", "a port is a number from 0 to 65535"
                )
        elif any(c in name for c in "[],#\x00"):
            self.report.tok_error(
                tok, f"bad service name {name!r}", "write a name from /etc/services"
            )

    def unix_service(self, tok: Tok, text: str, f: EntryFields) -> None:
        """A unix socket path, with FreeBSD's optional ``:owner:group:mode:`` prefix."""
        path = text
        if text.startswith(":"):
            parts = text.split(":", 4)
            if len(parts) != 5:
                self.report.tok_error(
                    tok, "bad unix socket prefix", "write :owner:group:mode:/path"
                )
                return
            _, owner, group, mode_text, path = parts
            mode: int | None = None
            if mode_text:
                if _OCTAL.fullmatch(mode_text) is None or int(mode_text, 8) > 0o7777:
                    self.report.tok_error(
                        tok, f"bad socket mode {mode_text!r}", "write an octal mode like 0660"
                    )
                    return
                mode = int(mode_text, 8)
            f.unix_perms = UnixPerms(owner or None, group or None, mode)
        if not path.startswith("/") or len(path) < 2:
            self.report.tok_error(
                tok,
                "a unix service must be an absolute path",
                "write /run/name.sock or :owner:group:mode:/run/name.sock",
            )
        elif "\x00" in path:
            self.report.tok_error(tok, "NUL byte in socket path", "remove it")
        f.service = path
        f.addresses = ()  # a unix socket has no listen address (NetBSD rule)

    def socket_type_field(self, tok: Tok, text: str, f: EntryFields) -> None:
        """stream, dgram, ...; a BSD ``:acceptfilter`` suffix is ignored with a warning."""
        f.locs["socket_type"] = _loc(tok)
        base, colon, _ = text.partition(":")
        try:
            f.socket_type = SocketType(base)
        except ValueError:
            self.report.tok_error(
                tok, f"unknown socket type {base!r}", f"use one of {_SOCKET_TYPES}"
            )
            return
        if colon:
            self.report.warn(
                tok.lineno,
                tok.field,
                tok.raw,
                "accept filter ignored",
                "accept filters are a BSD kernel feature",
            )

    def protocol_buffers(self, tok: Tok, bufs: list[str], f: EntryFields) -> None:
        """NetBSD's ``tcp,sndbuf=N,rcvbuf=N``: the socket buffer sizes, into ``f.options``.

        Each word already matched ``_BUFSIZE``; NetBSD reads k and m as 1024 multiples.
        """
        sizes: dict[str, int] = {}
        for buf in bufs:
            key, _, text = buf.partition("=")
            value = values.buffer_size(text)
            if value is None:
                self.report.tok_error(tok, f"{key} must be a size from 1 to 2G-1, not {text!r}",
                                      f"write e.g. ,{key}=256k")
            elif key in sizes:
                self.report.tok_error(tok, f"{key} given twice", "keep one")
            else:
                sizes[key] = value
        f.options = replace(f.options, **sizes)  # type: ignore[arg-type]

    def protocol_field(self, tok: Tok, text: str, f: EntryFields) -> None:
        """tcp, udp6, unix, ...; ``,sndbuf=N`` sets a buffer, ``/ttcp`` warns, ``/faith`` fails."""
        f.locs["protocol"] = _loc(tok)
        if text.startswith("rpc/"):
            self.rpc_transport(tok, text[len("rpc/") :], f)
            return
        base, *bufs = text.split(",")
        for buf in bufs:
            if _BUFSIZE.fullmatch(buf) is None:
                self.report.tok_error(
                    tok, f"bad protocol option {buf!r}", "write ,sndbuf=N or ,rcvbuf=N"
                )
                return
        if bufs:
            self.protocol_buffers(tok, bufs, f)
        base, slash, suffix = base.partition("/")
        if slash:
            if suffix == "ttcp":
                self.report.warn(
                    tok.lineno,
                    tok.field,
                    tok.raw,
                    "/ttcp ignored: T/TCP is obsolete",
                    "plain TCP is used",
                )
            elif suffix == "faith":
                self.report.tok_error(tok, "FAITH (/faith) is not supported", "remove /faith")
                return
            else:
                self.report.tok_error(
                    tok, f"unknown protocol suffix /{suffix}", f"use one of {_PROTOCOLS}"
                )
                return
        try:
            f.protocol = Protocol(base)
        except ValueError:
            self.report.tok_error(tok, f"unknown protocol {base!r}", f"use one of {_PROTOCOLS}")

    def wait_field(self, tok: Tok, text: str, f: EntryFields) -> None:
        """wait or nowait, then FreeBSD's ``/N/N/N`` limits or a per-minute ``.N`` / ``:N``."""
        f.locs["wait"] = _loc(tok)
        if text.startswith("nowait"):
            f.wait, rest = False, text[len("nowait") :]
        elif text.startswith("wait"):
            f.wait, rest = True, text[len("wait") :]
        else:
            self.report.tok_error(
                tok,
                f"expected wait or nowait, not {text!r}",
                "write wait, nowait, nowait/MAX_CHILD or nowait.PER_MINUTE",
            )
            return
        if not rest:
            return
        if rest[0] == "/":
            self.freebsd_limits(tok, rest[1:], f)
        elif rest[0] in ".:":
            self.spawn_rate(tok, rest, f)
        else:
            self.report.tok_error(
                tok,
                f"unexpected {rest!r} after {text[: len(text) - len(rest)]}",
                "write nowait/MAX_CHILD[/MAX_CPM[/MAX_PER_IP]] or nowait.PER_MINUTE",
            )

    def freebsd_limits(self, tok: Tok, text: str, f: EntryFields) -> None:
        """``MAX_CHILD[/MAX_CPM[/MAX_PER_IP]]`` (after the first '/'); FreeBSD: 0 = no limit."""
        parts = text.split("/")
        if len(parts) > 3:
            self.report.tok_error(
                tok, "too many /limits", "write nowait/MAX_CHILD/MAX_CPM/MAX_PER_IP"
            )
            return
        numbers: dict[str, int] = {}
        lifted: set[str] = set()
        for name, part in zip(_FREEBSD_LIMITS, parts, strict=False):
            number = uint(part)
            if number is None:
                self.report.tok_error(
                    tok, f"{name} must be an integer from 0 to {INT_MAX}", "0 means no limit"
                )
                return
            if number == 0:
                lifted.add(name)  # FreeBSD: /0 = no limit
            else:
                numbers[name] = number
        f.limits = Limits(**numbers, unlimited=frozenset(lifted), safe_default=False)

    def spawn_rate(self, tok: Tok, rest: str, f: EntryFields) -> None:
        """``.N`` or ``:N`` after wait/nowait: services started per minute."""
        number = uint(rest[1:])
        if number is None:
            self.report.tok_error(
                tok,
                f"spawns per minute must be an integer from 0 to {INT_MAX}",
                "write nowait.N or nowait:N",
            )
            return
        if number == 0 and rest[0] == ".":
            # GNU/BusyBox (and OpenBSD's spelling): .0 = no per-service limit.
            f.limits = Limits(unlimited=frozenset({"max_spawn_per_min"}))
        else:
            # NetBSD's :N, like its service_max=N: 0 = nothing is started.
            f.limits = Limits(max_spawn_per_min=number)

    def user_field(self, tok: Tok, text: str, f: EntryFields) -> None:
        """``user[:group][/login_class]``; "u.g" stays whole (resolve tries it as a user first)."""
        f.locs["user"] = _loc(tok)
        user, slash, login_class = text.partition("/")
        user, colon, group = user.partition(":")
        empty_part = not user or (colon and not group) or (slash and not login_class)
        if empty_part or ":" in group or "/" in login_class:
            self.report.tok_error(
                tok, f"bad user {text!r}", "write user, user:group or user:group/class"
            )
            return
        f.user = user
        f.group = group or None
        f.login_class = login_class or None

    def server_field(self, tok: Tok, text: str, f: EntryFields) -> None:
        """``internal`` or an absolute program path."""
        f.locs["server"] = _loc(tok)
        if text != "internal" and (not text.startswith("/") or "\x00" in text):
            self.report.tok_error(
                tok,
                "server must be an absolute path or 'internal'",
                "write e.g. /usr/sbin/in.fingerd in.fingerd",
            )
            return
        f.server = text

    # -- ONC RPC (rpc/udp, rpc/tcp, ...) --------------------------------------------------

    def rpc_transport(self, tok: Tok, text: str, f: EntryFields) -> None:
        """What follows ``rpc/`` in field 3: udp, tcp (IPv4), udp6, tcp6, or ``*`` (BSD:
        every transport of the socket type: one dual-stack socket, see ``rpc_socket``)."""
        f.rpc_protocol = True
        if text == "*":
            f.protocol = Protocol.UDP46  # a stream entry becomes tcp46 in rpc_socket
            return
        try:
            proto = Protocol(text)
        except ValueError:
            proto = None
        if proto is None or proto.is_unix:
            self.report.tok_error(tok, f"unknown RPC transport {text!r}",
                                  "write rpc/udp, rpc/tcp, rpc/udp6, rpc/tcp6 or rpc/*")
            return
        f.protocol = proto

    def rpc_service(self, tok: Tok, name: str, f: EntryFields) -> str:
        """``PROGRAM/LOW-HIGH`` or ``PROGRAM/VERSION`` (field 1 of an RPC entry): fills
        ``f.rpc`` and returns PROGRAM (a name from /etc/rpc or a number, looked up later)."""
        if f.socket_type is SocketType.STREAM and f.protocol is Protocol.UDP46:
            f.protocol = Protocol.TCP46  # key-values: rpc/* with socktype=stream read first
        program, slash, versions = name.partition("/")
        if not slash or not versions:
            self.report.tok_error(tok, "an RPC service needs its versions",
                                  "write PROGRAM/LOW-HIGH or PROGRAM/VERSION, e.g. rstatd/1-5")
            return program
        if not program or any(c in program for c in "[],#/\x00") or program.isspace():
            self.report.tok_error(tok, f"bad RPC program {program!r}",
                                  "write a name from /etc/rpc or a program number")
            return program
        if program.isascii() and program.isdigit():
            number = uint(program)
            if number is None or not 0 < number <= RPC_NUMBER_MAX:
                self.report.tok_error(tok, f"bad RPC program number {program!r}",
                                      f"a program number is 1 to {RPC_NUMBER_MAX}")
                return program
        low_text, dash, high_text = versions.partition("-")
        low, high = uint(low_text), uint(high_text if dash else low_text)
        if low is None or high is None or high > RPC_NUMBER_MAX:
            self.report.tok_error(tok, f"bad RPC version range {versions!r}",
                                  f"write LOW-HIGH or one version, numbers 0 to {RPC_NUMBER_MAX}")
        elif low > high:
            self.report.tok_error(tok, f"RPC version range {versions!r} runs backwards",
                                  f"write {high}-{low}")
        elif high - low >= RPC_VERSIONS_MAX:
            self.report.tok_error(tok, f"RPC version range {versions!r} is too wide",
                                  f"at most {RPC_VERSIONS_MAX} versions per entry")
        else:
            f.rpc = RpcSpec(low, high)
        return program

    def rpc_socket(self, tok: Tok, f: EntryFields) -> None:
        """Once the socket type is known (``tok`` = field 2): an RPC service is dgram over
        udp or stream over tcp; ``rpc/*`` takes the transport from the socket type."""
        if not f.rpc_protocol or f.socket_type is None or f.protocol is None:
            return
        if f.socket_type is SocketType.STREAM and f.protocol is Protocol.UDP46:
            f.protocol = Protocol.TCP46  # rpc/* on a stream socket
        want = SocketType.DGRAM if f.protocol.is_udp else SocketType.STREAM
        if f.socket_type is not want:
            self.report.tok_error(
                tok, f"socket type {f.socket_type.value} does not go with RPC over "
                f"{f.protocol.value}", f"write {want.value} rpc/{f.protocol.value}")
