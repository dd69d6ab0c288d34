"""xinetd.conf(5) statements: ``defaults { }``, ``service NAME { }``, ``include``, ``includedir``.

Pure: no I/O. ``lex(text, source)`` is total (it never raises, whatever the
text) and returns the blocks and directives in file order with every
problem as a Diagnostic at FILE:LINE naming what it is about; what the
attributes mean is ``xinetd_map``'s business, reading the included files
``xinetd_load``'s. ``looks_like_xinetd`` tells the format from the content.

Grammar, as xinetd 2.3.15 reads it (line-oriented; "\\r" before "\\n" dropped)::

    comment    = a line whose first non-blank character is "#"
    directive  = ("include" PATH | "includedir" DIR)         (top level only)
    block      = ("defaults" | "service" NAME) NL "{" NL {attribute NL} "}"
    attribute  = NAME ("=" | "+=" | "-=") {VALUE}            (values split on blanks)

xinetd wants ``{`` on a line of its own; ``service NAME {`` is read too, with a
warning. Inline comments do not exist: ``#`` after a value is a value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from poolinetd.config.report import FileReport
from poolinetd.config.spec import Diagnostic
from poolinetd.config.tokens import split_lines

__all__ = ["Attr", "Block", "Directive", "Lexed", "lex", "looks_like_xinetd"]

_ATTR = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)[ \t]*(\+=|-=|=)(.*)")
_WS = " \t"
_BLANKS = re.compile(r"[ \t]+")
# What a first statement of an xinetd file looks like (an inetd.conf entry has at least
# six fields, or "defaults on ...;", or an address prefix ending in ":").
_FIRST = re.compile(
    r"(?:defaults|service[ \t]+[^ \t{]+|includedir[ \t]+[^ \t]+|include[ \t]+[^ \t]+)"
    r"[ \t]*\{?[ \t]*")


@dataclass(frozen=True, slots=True)
class Attr:
    """One ``name op values`` line of a block; ``values`` split on blanks, as xinetd does."""

    name: str
    op: str  # "=", "+=" or "-="
    values: tuple[str, ...]
    lineno: int


@dataclass(frozen=True, slots=True)
class Block:
    """A ``defaults`` (name "") or ``service NAME`` block, closed and error-free in shape."""

    kind: str  # "defaults" or "service"
    name: str
    attrs: tuple[Attr, ...]
    source: str
    lineno: int


@dataclass(frozen=True, slots=True)
class Directive:
    """An ``include FILE`` or ``includedir DIR`` line, expanded by ``xinetd_load``."""

    kind: str  # "include" or "includedir"
    path: str
    source: str
    lineno: int


@dataclass(frozen=True, slots=True)
class Lexed:
    """What ``lex`` returns: the statements in file order and every diagnostic."""

    items: tuple[Block | Directive, ...]
    diagnostics: tuple[Diagnostic, ...]


def looks_like_xinetd(text: str) -> bool:
    """Whether ``text`` is an xinetd file: its first statement is ``defaults``,
    ``service NAME``, ``include PATH`` or ``includedir DIR``.

    None of these is a valid first statement of an inetd.conf (an entry has six
    fields or more; a key-values definition says on/off), so the test cannot take
    an inetd.conf for an xinetd file. Total: any str.
    """
    for line in split_lines(text):
        stripped = line.strip(_WS)
        if not stripped or stripped.startswith("#"):
            continue
        return _FIRST.fullmatch(stripped) is not None
    return False


def lex(text: str, source: str) -> Lexed:
    """The statements of xinetd ``text``; ``source`` names it in diagnostics. Total."""
    try:
        return _Lexer(source).run(split_lines(text))
    except Exception as exc:  # a bug must not take a running master down on reload
        bug = Diagnostic(source, 0, 0, "", f"internal parser error: {exc!r}",
                         "please report this with the file")
        return Lexed((), (bug,))


class _Lexer:
    """One pass over the lines with a three-state machine: top level, after a block's
    head (a ``{`` is due), inside a block."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.report = FileReport(source)
        self.items: list[Block | Directive] = []
        self.head: tuple[str, str, int] | None = None  # kind, name, line of an open block
        self.open = False  # inside the braces of ``head``
        self.attrs: list[Attr] = []
        self.bad = False  # the open block has a line in error: it yields no Block

    def run(self, lines: list[str]) -> Lexed:
        for index, line in enumerate(lines):
            stripped = line.strip(_WS)
            if stripped and not stripped.startswith("#"):
                self.line(index + 1, stripped)
        if self.head is not None:
            kind, name, lineno = self.head
            self.report.error(lineno, 0, _label(kind, name), f"{_label(kind, name)} is not "
                              "closed: the file ends first", "end the block with } on a line "
                              "of its own")
        return Lexed(tuple(self.items), tuple(self.report.diags))

    def line(self, lineno: int, text: str) -> None:
        """One significant line, by state."""
        if self.head is not None and not self.open:
            if text == "{":
                self.open = True
                return
            kind, name, at = self.head
            self.report.error(at, 0, _label(kind, name), f"{_label(kind, name)} is not "
                              f"followed by {{ (line {lineno} comes first)",
                              "write { on the line after the block's head")
            self.head = None  # the block is dropped; the line is read as a new statement
        if self.open:
            self.inside(lineno, text)
        else:
            self.top(lineno, text)

    def top(self, lineno: int, text: str) -> None:
        """A statement at top level: a block's head or a directive."""
        words = _words(text)
        brace = len(words) > 1 and words[-1] == "{"
        if brace:
            words = words[:-1]
        first = words[0]
        if text == "}":
            # xinetd logs "missing service keyword" and reads on; so does poolinetd.
            self.report.warn(lineno, 0, first, "a } outside any block is ignored",
                             "remove it")
            return
        if first in ("service", "defaults"):
            want = 2 if first == "service" else 1
            if len(words) != want:
                self.report.error(lineno, 0, first, f"{first} takes "
                                  f"{'one name' if want == 2 else 'no name'}",
                                  "write: service NAME" if want == 2 else "write: defaults")
                return
            self.head = (first, words[1] if want == 2 else "", lineno)
            self.attrs, self.bad = [], False
            if brace:
                self.report.warn(lineno, 0, first, "{ on the same line as the block's head",
                                 "xinetd itself wants { on a line of its own")
                self.open = True
            return
        if first in ("include", "includedir") and not brace:
            if len(words) != 2:
                self.report.error(lineno, 0, first, f"{first} takes one path",
                                  f"write: {first} /etc/xinetd.d")
                return
            self.items.append(Directive(first, words[1], self.source, lineno))
            return
        self.report.error(lineno, 0, first[:40], "expected service NAME, defaults, include "
                          "or includedir", "attributes go inside a service NAME { } block")

    def inside(self, lineno: int, text: str) -> None:
        """A line inside a block: an attribute or the closing brace."""
        assert self.head is not None
        kind, name, at = self.head
        if text == "}":
            if not self.bad:
                self.items.append(Block(kind, name, tuple(self.attrs), self.source, at))
            self.head, self.open, self.attrs = None, False, []
            return
        found = _ATTR.fullmatch(text)
        if found is None:
            if _words(text)[0] in ("service", "defaults", "include", "includedir", "{"):
                # A block not closed before the next statement: report it, read on.
                self.report.error(at, 0, _label(kind, name), f"{_label(kind, name)} is not "
                                  f"closed before line {lineno}", "end the block with }")
                self.head, self.open, self.attrs = None, False, []
                self.top(lineno, text)
                return
            self.report.error(lineno, 0, _words(text)[0][:40], "expected ATTRIBUTE = VALUE "
                              f"inside {_label(kind, name)}",
                              "write one attribute per line: name = value ...")
            self.bad = True
            return
        self.attrs.append(Attr(found[1], found[2], tuple(_words(found[3])), lineno))


def _words(text: str) -> list[str]:
    """``text`` split at blanks (spaces and tabs only, as xinetd splits; never empty
    for a line that is not blank)."""
    return [w for w in _BLANKS.split(text) if w]


def _label(kind: str, name: str) -> str:
    return f"service {name}" if kind == "service" else kind
