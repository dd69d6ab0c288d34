"""Hypothesis properties of the xinetd parser: total on any text, and a formatted spec reads
back the same (profiles: hypothesis_profiles.py)."""

from __future__ import annotations

import hypothesis_profiles  # noqa: F401  (registers and loads the profile)
from hypothesis import given
from hypothesis import strategies as st

from poolinetd.config import xinetd_attrs, xinetd_lexer, xinetd_map
from poolinetd.config.spec import (
    AtLimit,
    Limits,
    Options,
    Protocol,
    ServiceSpec,
    Severity,
    SocketType,
)
from poolinetd.config.xinetd_format import format_service
from poolinetd.config.xinetd_lexer import Block
from poolinetd.net import netmatch

NAME = st.from_regex(r"[a-z][a-z0-9_-]{0,7}", fullmatch=True)
WORD = st.from_regex(r"[A-Za-z0-9_./:+-]{1,8}", fullmatch=True)
ATTRS = sorted({*xinetd_attrs.MAPPED, *xinetd_attrs.WARNED, *xinetd_attrs.REFUSED,
                *xinetd_attrs.DEFAULTS_ONLY})
VALUE = st.sampled_from(["yes", "no", "UNLIMITED", "stream", "dgram", "tcp", "udp", "0",
                         "10", "INTERNAL", "UNLISTED", "IPv6", "10.0.{1,2}", "0.0.0.0",
                         "/bin/cat", "A=1", "::1", "{", "}", "=", "#"]) | WORD
LINE = st.one_of(
    st.tuples(st.sampled_from(ATTRS) | NAME, st.sampled_from(["=", "+=", "-="]),
              st.lists(VALUE, max_size=4)).map(lambda t: f"  {t[0]} {t[1]} {' '.join(t[2])}"),
    st.sampled_from(["{", "}", "service", "defaults", "# c", "", "include x", "includedir y"]),
    NAME.map(lambda n: f"service {n}"),
    st.text(max_size=20),
)
XINETD_TEXT = st.lists(LINE, max_size=30).map("\n".join)


def _parse(text: str) -> tuple[list[ServiceSpec], list[str], list[Severity]]:
    lexed = xinetd_lexer.lex(text, "x.conf")
    blocks = [i for i in lexed.items if isinstance(i, Block)]
    mapped = xinetd_map.build(blocks)
    diags = [*lexed.diagnostics, *mapped.diagnostics]
    return list(mapped.specs), [str(d) for d in diags], [d.severity for d in diags]


@given(st.text())
def test_total_on_arbitrary_text(text: str) -> None:
    _parse(text)
    xinetd_lexer.looks_like_xinetd(text)


@given(XINETD_TEXT)
def test_total_on_xinetd_shaped_text_and_every_diagnostic_is_located(text: str) -> None:
    specs, shown, _ = _parse(text)
    assert all(s.startswith("x.conf:") for s in shown), shown
    assert all("internal parser error" not in s for s in shown), shown
    for spec in specs:
        assert spec.source == "x.conf" and spec.lineno >= 1


@given(st.text("0123456789.{},/:abcdef ", max_size=24))
def test_address_words_are_total(word: str) -> None:
    got = xinetd_attrs.xinetd_networks(word)
    assert isinstance(got, (str, list))


IPV4 = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
CIDR = st.tuples(IPV4, st.integers(0, 32)).map(lambda t: f"{t[0]}/{t[1]}") | st.sampled_from(
    ["2001:db8::/32", "::1/128", "fd00::/8"])


def _networks(words: list[str]) -> netmatch.AddressList:
    nets = [netmatch.parse_cidr(w) for w in words]
    return netmatch.AddressList(
        netmatch.Network(n.version, n.value, n.prefix) for n in nets
        if isinstance(n, netmatch.Network))


LISTS = st.none() | st.lists(CIDR, min_size=1, max_size=3).map(_networks)
ENV = st.lists(st.tuples(st.from_regex(r"[A-Z_][A-Z0-9_]{0,5}", fullmatch=True),
                         st.from_regex(r"[a-z0-9/:]{0,6}", fullmatch=True)), max_size=3)


@st.composite
def specs(draw: st.DrawFn) -> ServiceSpec:
    """Specs xinetd can express (format_service returns text for them)."""
    socket_type = draw(st.sampled_from([SocketType.STREAM, SocketType.DGRAM]))
    udp = socket_type is SocketType.DGRAM
    protocol = draw(st.sampled_from(
        [Protocol.UDP, Protocol.UDP6, Protocol.UDP46] if udp
        else [Protocol.TCP, Protocol.TCP6, Protocol.TCP46]))
    v6 = protocol not in (Protocol.TCP, Protocol.UDP)
    internal = draw(st.booleans())
    port = draw(st.none() | st.integers(0, 65535).map(str))
    if internal:
        name = draw(st.sampled_from(["echo", "discard", "chargen", "daytime", "time"]))
        server, argv = "internal", (name,)
        service = port or name
    else:
        server = draw(st.sampled_from(["/bin/cat", "/usr/sbin/in.x", "/opt/a-b/run"]))
        args = tuple(draw(st.lists(WORD, max_size=3)))
        argv = (server.rsplit("/", 1)[1], *args) if draw(st.booleans()) else (
            draw(WORD), *args)
        service = port or draw(NAME)
    bind = draw(st.sampled_from([(), ("127.0.0.1",), ("::1",) if v6 else ("10.1.2.3",)]))
    numbers = {}
    lifted = set()
    for key in ("max_child", "max_child_per_ip"):
        kind = draw(st.sampled_from(["absent", "number", "unlimited"]))
        if kind == "number":
            numbers[key] = draw(st.integers(1 if key == "max_child" else 0, 10_000))
        elif kind == "unlimited":
            lifted.add(key)
    spawn = draw(st.none() | st.integers(1, 1000))
    pause = None if spawn is None else float(draw(st.integers(0, 3600)))
    wait = draw(st.booleans())
    wrapped = socket_type is SocketType.STREAM and not wait and draw(st.booleans())
    return ServiceSpec(
        service=service, socket_type=socket_type, protocol=protocol, wait=wait,
        user=draw(st.sampled_from(["root", "nobody", "www-data"])), server=server, argv=argv,
        addresses=bind, group=draw(st.none() | st.sampled_from(["nogroup", "daemon"])),
        limits=Limits(**numbers, max_spawn_per_min=spawn, unlimited=frozenset(lifted)),
        options=Options(env=tuple(dict(draw(ENV)).items()), only_from=draw(LISTS),
                        no_access=draw(LISTS), tcp_wrappers=True if wrapped else None),
        enabled=draw(st.booleans()), spawn_window=None if spawn is None else 1.0,
        spawn_pause=pause, at_limit=AtLimit.REFUSE)


@given(specs())
def test_format_then_parse_is_the_same_spec(spec: ServiceSpec) -> None:
    text = format_service(spec)
    assert text is not None
    got, shown, severities = _parse(text)
    assert Severity.ERROR not in severities, (text, shown)
    assert got == [spec], text


def test_format_refuses_what_xinetd_cannot_say() -> None:
    base = ServiceSpec("echo", SocketType.STREAM, Protocol.TCP, False, "root", "internal",
                       ("echo",))
    assert format_service(base) is not None
    assert format_service(ServiceSpec("/run/x", SocketType.STREAM, Protocol.UNIX, False,
                                      "root", "internal", ("echo",))) is None
    assert format_service(ServiceSpec("7", SocketType.STREAM, Protocol.TCP4, False, "root",
                                      "internal", ("echo",))) is None
    assert format_service(ServiceSpec("x", SocketType.STREAM, Protocol.TCP, False, "root",
                                      "/bin/cat", ("cat", "a b"))) is None
    assert format_service(ServiceSpec("x", SocketType.STREAM, Protocol.TCP, False, "root",
                                      "/bin/cat", ("cat",),
                                      limits=Limits(max_cpm_per_ip=3))) is None


@given(st.text(max_size=40), st.sampled_from(["/", "/tmp", "/nonexistent", "", "rel"]))
def test_banner_reader_is_total(path: str, base: str) -> None:
    """Any path (NULs, surrogates, '..', links, devices) gives bytes or a reason."""
    from poolinetd.config import xinetd_banner

    got = xinetd_banner.read(path, base, 64)
    assert isinstance(got, (bytes, str))
    assert not isinstance(got, bytes) or len(got) <= 65
