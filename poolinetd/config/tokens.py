"""The lexical pieces both inetd.conf notations share: physical lines, blanks, tokens, options.

Pure: no I/O. ``split_lines`` is the one place that decides what a line is;
``Tok`` is a positional field (or a word read out of a key's value), ``Opt``
one ``key=value`` option of a key-values definition, both with their place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

WS = " \t"
FIELD = re.compile(r"[^ \t]+")


def split_lines(text: str) -> list[str]:
    """``text`` cut at "\\n" only; one "\\r" before it is dropped (files edited on Windows)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line; it does not start a new one
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def is_blank(line: str) -> bool:
    """Whether ``line`` holds nothing but spaces and tabs."""
    return not line.strip(WS)


@dataclass(slots=True)
class Tok:
    """One field as read: ``text`` without its quotes, ``raw`` as written (diagnostics quote it)."""

    text: str  # quotes removed
    raw: str  # as written
    lineno: int
    field: int
    end: int  # column just after the token


@dataclass(slots=True)
class Opt:
    """One ``key=value ...`` option; ``bad`` once the scanner has reported it (it is skipped)."""

    key: str
    values: list[str]
    lineno: int
    field: int
    raw: str
    bad: bool = False
