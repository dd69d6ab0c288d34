"""The man pages keep up with the code, and render without a warning.

* man/poolinetd.8 names every long option of every command of the argparse
  parser (``cli.build_parser``), and every long option it names exists there;
  every command has its paragraph.
* man/poolinetd.conf.5 lists every key of ``ENTRY_KEYS`` (between the
  ``entry-keys`` markers, one ``.TP`` tag per key) and of ``DEFAULTS_KEYS``
  (between the ``defaults-keys`` markers), and nothing else, as
  tests/test_keys_docs.py does for docs/configuration.md.
* ``man --warnings -l FILE`` and ``groff -man -ww -z FILE`` print nothing;
  skipped, with the reason, only where neither program is installed (Debian
  packages man-db and groff-base).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from poolinetd.config.inetdconf import DEFAULTS_KEYS, ENTRY_KEYS

REPO = Path(__file__).resolve().parents[1]
MAN8 = REPO / "man" / "poolinetd.8"
MAN5 = REPO / "man" / "poolinetd.conf.5"
PAGES = (MAN8, MAN5)


def _roff_text(path: Path) -> str:
    """The page's source without comment lines, roff's minus sign (``\\-``) as a hyphen."""
    lines = [line for line in path.read_text().splitlines() if not line.startswith('.\\"')]
    return "\n".join(lines).replace("\\-", "-")


# -- poolinetd(8) against the command line ---------------------------------------------


def _parser_options() -> dict[str, set[str]]:
    """Command ("" for the top level) -> its long options, from the real parser.

    ``cli.build_parser()`` is the parser ``main`` uses; should it ever go, the
    ``--help`` output of each command is read instead.
    """
    try:
        from poolinetd.cli import build_parser
    except ImportError:
        return _help_options()
    parser = build_parser()
    found = {"": _long(parser)}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[name] = _long(sub)
    return found


def _long(parser: argparse.ArgumentParser) -> set[str]:
    return {opt for action in parser._actions for opt in action.option_strings
            if opt.startswith("--")}


def _help_options() -> dict[str, set[str]]:
    def run(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "poolinetd", *args, "--help"],
                              capture_output=True, text=True, timeout=30, cwd=REPO).stdout

    top = run()
    commands = re.search(r"\{([a-z,]+)\}", top)
    assert commands, "no command list in 'poolinetd --help'"
    found = {"": set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", top))}
    for name in commands.group(1).split(","):
        found[name] = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", run(name)))
    return found


def _man8_options() -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", _roff_text(MAN8)))


def test_the_parser_is_found() -> None:
    options = _parser_options()
    assert {"run", "check", "status", "reload", "metrics", "upgrade"} <= set(options)
    assert "--graceful-timeout" in options["run"]


@pytest.mark.parametrize(("command", "option"), sorted(
    (command, option) for command, opts in _parser_options().items() for option in opts))
def test_every_option_is_in_the_man_page(command: str, option: str) -> None:
    assert option in _man8_options(), (
        f"man/poolinetd.8 does not mention {option} (of "
        f"'poolinetd {command or '--help'}'): describe it under OPTIONS")


def test_every_option_in_the_man_page_exists() -> None:
    known = set().union(*_parser_options().values())
    unknown = sorted(_man8_options() - known)
    assert not unknown, f"man/poolinetd.8 names options the parser does not have: {unknown}"


@pytest.mark.parametrize("command", sorted(c for c in _parser_options() if c))
def test_every_command_has_its_paragraph(command: str) -> None:
    text = _roff_text(MAN8)
    commands = text[text.index("\n.SH COMMANDS\n"):text.index("\n.SH OPTIONS\n")]
    assert f"\n.TP\n.B {command}\n" in commands, f"no .TP paragraph for {command} under COMMANDS"


def test_the_man_page_states_the_exit_codes_the_cli_uses() -> None:
    from poolinetd import cli

    text = _roff_text(MAN8)
    status = text[text.index("\n.SH EXIT STATUS\n"):]
    for code in (0, cli.EX_USAGE, cli.EX_UNAVAILABLE, cli.EX_OSERR, cli.EX_CONFIG):
        assert f"\n.TP\n.B {code}\n" in status, code


# -- poolinetd.conf(5) against the parser's keys -----------------------------------------


def _block(marker: str) -> list[str]:
    text = MAN5.read_text()
    begin, end = f'.\\" {marker}-begin\n', f'.\\" {marker}-end\n'
    assert begin in text and end in text, f"markers {marker}-begin/-end missing"
    return text[text.index(begin) + len(begin):text.index(end)].splitlines()


_TAG_KEY = re.compile(r'^\.(?:B|BI|BR)\s+"?([a-z0-9_]+)=')


def _entry_keys_in_page() -> list[str]:
    """The key of every ``.TP`` tag line in the entry-keys block (one per key)."""
    lines = _block("entry-keys")
    keys = []
    for i, line in enumerate(lines):
        if line == ".TP":
            tag = lines[i + 1] if i + 1 < len(lines) else ""
            match = _TAG_KEY.match(tag)
            assert match, f"man/poolinetd.conf.5: a .TP tag that names no key=: {tag!r}"
            keys.append(match.group(1))
    return keys


def _defaults_keys_in_page() -> list[str]:
    keys = []
    for line in _block("defaults-keys"):
        match = re.match(r"^\.BR?\s+([a-z0-9_]+)", line)
        if match:
            keys.append(match.group(1))
    return keys


@pytest.mark.parametrize("key", ENTRY_KEYS)
def test_every_key_has_its_paragraph(key: str) -> None:
    assert key in _entry_keys_in_page(), f"man/poolinetd.conf.5 has no .TP for {key}="


def test_every_key_in_the_page_exists_once() -> None:
    keys = _entry_keys_in_page()
    assert sorted(set(keys) - set(ENTRY_KEYS)) == [], "keys the parser does not know"
    assert len(keys) == len(set(keys)), "a key described twice"


@pytest.mark.parametrize("key", DEFAULTS_KEYS)
def test_every_defaults_key_is_listed(key: str) -> None:
    assert key in _defaults_keys_in_page(), f"DEFAULTS in man/poolinetd.conf.5 misses {key}"


def test_the_defaults_list_holds_only_defaults_keys() -> None:
    assert sorted(set(_defaults_keys_in_page()) - set(DEFAULTS_KEYS)) == []


# -- rendering -------------------------------------------------------------------------------


def _checkers() -> list[list[str]]:
    found = []
    if shutil.which("man"):
        found.append(["man", "--warnings", "-l"])
    if shutil.which("groff"):
        found.append(["groff", "-man", "-ww", "-z"])
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_the_page_renders_without_a_warning(page: Path) -> None:
    checkers = _checkers()
    if not checkers:
        pytest.skip("neither man nor groff is installed (Debian: apt-get install man-db "
                    "groff-base)")
    env = {**os.environ, "MANWIDTH": "80", "LC_ALL": "C.UTF-8", "MAN_KEEP_FORMATTING": ""}
    env.pop("MANPAGER", None)
    env.pop("PAGER", None)
    for command in checkers:
        result = subprocess.run([*command, str(page)], capture_output=True, text=True,
                                timeout=60, env=env, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, f"{' '.join(command)} {page.name}: {result.stderr}"
        assert result.stderr == "", f"{' '.join(command)} {page.name} warns:\n{result.stderr}"
