"""Hypothesis properties of inetdconf.parse and format_spec (profiles: hypothesis_profiles.py)."""

from __future__ import annotations

from dataclasses import replace

import hypothesis_profiles  # noqa: F401  (registers and loads the profile)
from hypothesis import given
from hypothesis import strategies as st

from poolinetd.config.inetdconf import format_defaults, format_spec, parse
from poolinetd.config.spec import (
    Limits,
    Options,
    ParsedConfig,
    Protocol,
    RpcSpec,
    ServiceSpec,
    SocketType,
    StderrRoute,
    UnixPerms,
)
from poolinetd.net import netmatch

NAME = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=8).filter(
    lambda s: not s[0].isdigit()
)
WORD = st.text(
    st.characters(codec="utf-8", exclude_characters="\n\r"), max_size=10
)
IPV4 = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
ADDR = IPV4 | st.sampled_from(["::1", "::", "fe80::1", "localhost", "host.example"])
ENV = st.lists(st.tuples(st.from_regex(r"[A-Z_][A-Z0-9_]{0,5}", fullmatch=True), WORD), max_size=3)

def _limits(draw: st.DrawFn, *, positional_zero: bool = True) -> Limits:
    """Limits as parse can produce them: a number (0 = nothing allowed, never for
    max_child), "unlimited" (None, named in ``unlimited``) or not written."""
    values: dict[str, int] = {}
    lifted: set[str] = set()
    for name in ("max_child", "max_cpm_per_ip", "max_child_per_ip", "max_spawn_per_min"):
        kind = draw(st.sampled_from(["absent", "number", "unlimited"]))
        if kind == "number":
            values[name] = draw(st.integers(1 if name == "max_child" else 0, 2**31 - 1))
        elif kind == "unlimited":
            lifted.add(name)
    return Limits(**values, unlimited=frozenset(lifted))


LIMITS = st.composite(_limits)()
CIDR = (
    st.tuples(IPV4, st.integers(0, 32)).map(lambda t: f"{t[0]}/{t[1]}")
    | st.tuples(st.integers(0, 2**128 - 1), st.integers(0, 128)).map(
        lambda t: f"{netmatch.format_addr(t[0]) if t[0] >> 32 != 0xFFFF else '::1'}/{t[1]}")
)


def _address_list(words: list[str]) -> netmatch.AddressList:
    nets = [netmatch.parse_cidr(w) for w in words]
    return netmatch.AddressList(n for n in nets if isinstance(n, netmatch.Network))


ADDRESS_LIST = st.lists(CIDR, min_size=1, max_size=4).map(_address_list)

OPTIONS = st.builds(
    Options,
    pool_min=st.none() | st.integers(0, 100),
    pool_max=st.none() | st.integers(1, 100),
    worker_connections=st.none() | st.integers(1, 10_000),
    max_requests=st.none() | st.integers(0, 10**6),
    idle_timeout=st.none() | st.floats(0, 1e6, allow_nan=False),
    conn_timeout=st.none() | st.floats(1e-3, 1e6, allow_nan=False),
    stderr=st.none() | st.sampled_from(list(StderrRoute)),
    env=ENV.map(lambda pairs: tuple(dict(pairs).items())),
    only_from=st.none() | ADDRESS_LIST,
    no_access=st.none() | ADDRESS_LIST,
    source_v4_prefix=st.none() | st.integers(0, 32),
    source_v6_prefix=st.none() | st.integers(0, 128),
    block_time=st.none() | st.floats(0, 1e6, allow_nan=False),
    reuseport=st.none() | st.booleans(),
    proxy_protocol=st.none() | st.booleans(),
    proxy_from=st.none() | ADDRESS_LIST,
)


def _consistent(options: Options) -> Options:
    """Drop a no_access that contradicts only_from (parse reports that as an error)."""
    only, deny = options.only_from, options.no_access
    if only is not None and deny is not None and len(netmatch.shadowed(only, deny)) == len(only):
        return replace(options, no_access=None)
    return options


@st.composite
def specs(draw: st.DrawFn) -> ServiceSpec:
    """Valid specs: what parse can produce."""
    protocol = draw(st.sampled_from(list(Protocol)))
    unix_perms = None
    tcpmux, plus = None, False
    rpc = None
    if protocol.is_unix:
        service = "/" + draw(NAME) + draw(st.sampled_from(["", "/x.sock", ":y"]))
        addresses: tuple[str, ...] = ()
        if draw(st.booleans()):
            unix_perms = UnixPerms(draw(st.none() | NAME), draw(st.none() | NAME),
                                   draw(st.none() | st.integers(0, 0o7777)))  # fmt: skip
    else:
        service = draw(
            NAME | st.integers(0, 65535).map(str) | st.sampled_from(["defaults", ".include"])
        )
        addresses = tuple(draw(st.lists(ADDR, max_size=3)))
        if draw(st.integers(0, 9)) == 0:
            service, tcpmux, plus = "tcpmux", draw(NAME), draw(st.booleans())
        elif draw(st.integers(0, 9)) == 0:  # an RPC entry: PROGRAM/LOW-HIGH ... rpc/PROTO
            low = draw(st.integers(0, 2**31 - 32))
            rpc = RpcSpec(low, low + draw(st.integers(0, 31)))
            service = draw(NAME | st.integers(1, 2**31 - 1).map(str))
    server = draw(st.sampled_from(["internal", "/bin/cat", "/usr/libexec/x d"]))
    if server == "/usr/libexec/x d":
        server = "/usr/libexec/xd"
    user = draw(NAME | st.tuples(NAME, NAME).map(".".join))
    return ServiceSpec(
        service=service,
        socket_type=(draw(st.sampled_from(list(SocketType))) if rpc is None
                     else SocketType.DGRAM if protocol.is_udp else SocketType.STREAM),
        protocol=protocol,
        wait=draw(st.booleans()),
        user=user,
        server=server,
        argv=tuple(draw(st.lists(WORD, max_size=4))),
        addresses=addresses,
        group=draw(st.none() | NAME),
        login_class=draw(st.none() | NAME),
        limits=draw(LIMITS),
        tcpmux=tcpmux,
        tcpmux_plus=plus,
        rpc=rpc,
        unix_perms=unix_perms,
        options=_consistent(draw(st.just(Options()) | OPTIONS)),
        enabled=draw(st.booleans() | st.just(True)),
    )


@given(st.text())
def test_parse_never_raises_on_any_text(text: str) -> None:
    parsed = parse(text, "fuzz.conf")
    assert isinstance(parsed, ParsedConfig)
    assert all(d.lineno >= 1 for d in parsed.diagnostics)


@given(OPTIONS, LIMITS, st.none() | st.integers(0, 10**6), st.none() | st.integers(0, 10**6))
def test_format_defaults_then_parse_gives_the_defaults_back(
    options: Options, limits: Limits, max_connections: int | None, max_programs: int | None
) -> None:
    defaults = replace(_consistent(options), proxy_protocol=None, limits=limits,
                       max_connections=max_connections, max_programs=max_programs)
    line = format_defaults(defaults)
    parsed = parse(line, "x.conf")
    assert parsed.errors == (), (line, [str(d) for d in parsed.errors])
    assert parsed.defaults == defaults, line


@given(specs())
def test_format_then_parse_gives_the_spec_back(spec: ServiceSpec) -> None:
    line = format_spec(spec)
    parsed = parse(line, "x.conf")
    assert parsed.errors == (), (line, [str(d) for d in parsed.errors])
    assert parsed.specs == (spec,), line


MUTATIONS = st.sampled_from(
    [" ", "\t", ":", ",", "/", ".", "#", "=", ";", '"', "'", "\\", "\x00", "\r", "\n", "[", "]",
     "on", "off", "*", "wait", "-1", "99999999999", "\ud800", "rpc/", "tcpmux/+", "\n  "]
)  # fmt: skip


@given(st.lists(specs(), min_size=1, max_size=4), st.data())
def test_parse_never_raises_on_mutated_valid_entries(
    entries: list[ServiceSpec], data: st.DataObject
) -> None:
    text = "\n".join(format_spec(s) for s in entries)
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(0, len(text)))
        kind = data.draw(st.integers(0, 2))
        if kind == 0:
            text = text[:pos] + data.draw(MUTATIONS) + text[pos:]
        elif kind == 1:
            text = text[:pos] + text[pos + data.draw(st.integers(1, 5)) :]
        else:
            end = data.draw(st.integers(pos, len(text)))
            text = text[:pos] + text[end:] + text[pos:end]
    parsed = parse(text, "m.conf")
    lines = text.split("\n")
    for d in parsed.diagnostics:
        assert 1 <= d.lineno <= len(lines)
        # Every diagnostic's token is written on the line it names.
        assert d.token in lines[d.lineno - 1], (d, text)


@given(st.lists(specs(), min_size=1, max_size=5), st.data())
def test_inserting_comments_and_blank_lines_only_moves_line_numbers(
    entries: list[ServiceSpec], data: st.DataObject
) -> None:
    lines = [format_spec(s) for s in entries]
    # Entries are one line each, so every boundary is a safe place to insert.
    inserted = {i: data.draw(st.sampled_from(["", "# note", "   ", "#", "\t"])) for i in
                data.draw(st.sets(st.integers(0, len(lines)), max_size=4))}  # fmt: skip
    out: list[str] = []
    moved: list[int] = []
    for i, line in enumerate(lines):
        if i in inserted:
            out.append(inserted[i])
        out.append(line)
        moved.append(len(out))
    if len(lines) in inserted:
        out.append(inserted[len(lines)])
    before = parse("\n".join(lines), "a.conf")
    after = parse("\n".join(out), "a.conf")
    assert after.specs == before.specs
    assert [s.lineno for s in after.specs] == [moved[s.lineno - 1] for s in before.specs]
    assert [(d.message, d.token) for d in after.diagnostics] == [
        (d.message, d.token) for d in before.diagnostics
    ]


BAD_FIELDS = st.sampled_from(
    [(2, "streamx"), (3, "tcp7"), (4, "nowait/x"), (5, "root:"), (6, "relative"), (3, "rpc/tcp7")]
)


@given(st.lists(specs().filter(lambda s: s.enabled), min_size=1, max_size=5), st.data())
def test_error_line_points_at_the_offending_token(
    entries: list[ServiceSpec], data: st.DataObject
) -> None:
    lines = [format_spec(s) for s in entries]
    victim = data.draw(st.integers(0, len(lines) - 1))
    field, token = data.draw(BAD_FIELDS)
    good = ["echo", "stream", "tcp", "nowait", "root", "internal"]
    good[field - 1] = token
    lines.insert(victim, " ".join(good))
    parsed = parse("\n".join(lines), "e.conf")
    errs = [d for d in parsed.errors if d.token == token]
    assert errs and all(d.lineno == victim + 1 and d.field == field for d in errs)
