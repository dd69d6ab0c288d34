"""The helpers config tests share: parse or load a text (against config_fakes' small world)
and read back the one spec or service it holds, or its diagnostics as users see them."""

from __future__ import annotations

from config_fakes import fake_lookups

from poolinetd.config.inetdconf import parse
from poolinetd.config.resolve import LoadedConfig, load_text
from poolinetd.config.spec import Options, Service, ServiceSpec

NO_OPTIONS = Options()
PARSE_SOURCE = "t.conf"  # the name parse-level diagnostics carry
LOAD_SOURCE = "/etc/t.conf"  # where a loaded text "lives" (.include paths are relative to it)


def parse_one(text: str) -> ServiceSpec:
    """The one spec ``text`` parses to; fails the test on any parse error."""
    parsed = parse(text, PARSE_SOURCE)
    assert parsed.errors == (), [str(d) for d in parsed.errors]
    assert len(parsed.specs) == 1, parsed.specs
    return parsed.specs[0]


def parse_errors(text: str) -> list[str]:
    """The parse errors of ``text``, as printed."""
    return [str(d) for d in parse(text, PARSE_SOURCE).errors]


def parse_warnings(text: str) -> list[str]:
    """The parse warnings of ``text``, as printed."""
    return [str(d) for d in parse(text, PARSE_SOURCE).warnings]


def load(text: str, cli: Options = NO_OPTIONS) -> LoadedConfig:
    """``text`` parsed and resolved against the fake world, ``cli`` as the command line."""
    return load_text(text, LOAD_SOURCE, cli, fake_lookups())


def only(text: str, cli: Options = NO_OPTIONS) -> Service:
    """The one service ``text`` loads to; fails the test on any error."""
    loaded = load(text, cli)
    assert loaded.errors == (), [str(d) for d in loaded.errors]
    assert len(loaded.services) == 1, loaded.services
    return loaded.services[0]


def errors(text: str, cli: Options = NO_OPTIONS) -> list[str]:
    """The errors of loading ``text`` (parse and resolve), as printed."""
    return [str(d) for d in load(text, cli).errors]


def warnings(text: str, cli: Options = NO_OPTIONS) -> list[str]:
    """The warnings of loading ``text``, as printed."""
    return [str(d) for d in load(text, cli).warnings]
