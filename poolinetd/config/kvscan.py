"""The scanner of key-values definitions: ``key = value ..., key = "quoted" ...;`` -> options.

Pure. ``scan`` reads from just after the ``on``/``off`` word to the closing
``;`` and returns each option with its values, unescaped; what the keys mean
is ``keyvalues``'s business. Lexical problems are reported to the
``FileReport`` and mark the option ``bad``.
"""

from __future__ import annotations

import re

from poolinetd.config.report import FileReport
from poolinetd.config.tokens import WS, Opt, Tok, is_blank

_KEY = re.compile(r"[^ \t=,;#]*")
_WORD = re.compile(r"[^ \t,;#]+")
_HEX2 = re.compile(r"[0-9A-Fa-f]{2}")
_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t", "r": "\r"}
_NO_SEMICOLON = (
    "key-values definition has no closing ';'",
    "end it with ';'; continuation lines start with a space or tab",
)


def scan(lines: list[str], onoff: Tok, report: FileReport) -> tuple[list[Opt], int]:
    """Read ``key=value, ...;`` after the on/off token; return the options and the next line.

    As NetBSD reads it: blanks may surround ``=`` (``protocol = udp,``), and the
    ``=`` and the values may be on the lines after their key. A line that starts
    in column 1 continues the definition only while an option is open (after the
    ``on``/``off``, a ``,``, a key or an ``=``); after a value it means the ``;``
    is missing, which is reported rather than swallowing the next entry.
    """
    return _Scanner(lines, onoff, report).run()


class _Scanner:
    """One definition's scan: a cursor (``li``, ``col``) and the option being read."""

    def __init__(self, lines: list[str], onoff: Tok, report: FileReport) -> None:
        self.lines = lines
        self.onoff = onoff
        self.report = report
        self.opts: list[Opt] = []
        self.cur: Opt | None = None  # the option whose values are being read
        self.pending: Opt | None = None  # a key read, its '=' not yet
        self.open_item = True  # the definition cannot end here: the next line continues it
        self.li, self.col = onoff.lineno - 1, onoff.end
        self.start_col = 0  # where ``cur`` starts on its line (for its ``raw``)

    def run(self) -> tuple[list[Opt], int]:
        """Scan to the ';' (or to where it is missing): see ``scan``."""
        while True:
            if self.li >= len(self.lines):
                if self.pending is not None:
                    self.no_equals()
                self.finish()
                self.report.tok_error(self.onoff, *_NO_SEMICOLON)
                return self.opts, self.li
            line = self.lines[self.li]
            if self.col >= len(line):
                if self.next_line_ends_definition():
                    self.finish()
                    self.report.tok_error(self.onoff, *_NO_SEMICOLON)
                    return self.opts, self.li
                continue
            c = line[self.col]
            if c in WS:
                self.col += 1
            elif c == "#":
                self.col = len(line)
            elif self.pending is not None:
                if c == "=":
                    self.cur, self.pending = self.pending, None
                    self.col += 1
                else:
                    self.no_equals()  # the text goes on as the (bad) option's values
            elif c == ";":
                self.finish()
                rest = line[self.col + 1 :].strip(WS)
                if rest and not rest.startswith("#"):
                    self.report.error(self.li + 1, 0, rest, "text after ';'",
                                      "put each definition on its own line")
                return self.opts, self.li + 1
            elif c == ",":
                if self.cur is None:
                    self.report.error(
                        self.li + 1, self.next_field, ",", "empty option", "remove the extra ','"
                    )
                self.finish()
                self.open_item = True
                self.col += 1
            elif self.cur is None:
                self.key(line, c)
            else:
                self.value(line, c, self.cur)

    @property
    def next_field(self) -> int:
        """The field number of the next option: the service is 1, on/off 2."""
        return len(self.opts) + 3

    def next_line_ends_definition(self) -> bool:
        """Move to the next line; whether it starts something else (the ';' is missing)."""
        self.li, self.col = self.li + 1, 0
        if self.li >= len(self.lines):
            return False  # the end of the text: run() reports it
        nxt = self.lines[self.li]
        continues = self.open_item or self.pending is not None
        return not (continues or is_blank(nxt) or nxt[0] in " \t#")

    def finish(self) -> None:
        """Close the option being read (its ``raw`` runs to the cursor, or its line's end)."""
        cur = self.cur
        if cur is not None:
            line = self.lines[cur.lineno - 1]
            end = self.col if self.li == cur.lineno - 1 else len(line)
            cur.raw = line[self.start_col : end].rstrip(" \t,;")
            self.opts.append(cur)
            self.cur = None

    def no_equals(self) -> None:
        """The pending key has no '=': report it; it becomes a bad option."""
        pending = self.pending
        assert pending is not None
        self.report.error(
            pending.lineno,
            pending.field,
            pending.key,
            f"expected key=value, not {pending.key!r}",
            "separate options with ',' and end the definition with ';'",
        )
        self.cur, self.pending = pending, None
        pending.bad = True

    def key(self, line: str, c: str) -> None:
        """Read a key at the cursor: ``key=`` opens it, a bare ``key`` waits for its '='."""
        m = _KEY.match(line, self.col)
        assert m is not None  # the pattern matches the empty string
        self.start_col, key = self.col, m.group()
        after = line[m.end()] if m.end() < len(line) else ""
        lineno, fld = self.li + 1, self.next_field
        if key and after == "=":
            self.cur = Opt(key, [], lineno, fld, "")
            self.col = m.end() + 1
        elif key and after in ("", " ", "\t", "#"):
            self.pending = Opt(key, [], lineno, fld, "")
            self.col = m.end()
        else:
            token = key or c
            self.report.error(
                lineno,
                fld,
                token,
                f"expected key=value, not {token!r}",
                "separate options with ',' and end the definition with ';'",
            )
            self.cur = Opt(key, [], lineno, fld, "", bad=True)
            self.col = max(m.end(), self.col + 1)
        self.open_item = True

    def value(self, line: str, c: str, cur: Opt) -> None:
        """Read one value of ``cur`` at the cursor: a quoted string or a bare word."""
        if c in "\"'":
            text, self.col = self.quoted(cur)
        else:
            m = _WORD.match(line, self.col)
            assert m is not None  # c is none of the characters the pattern excludes
            text, self.col = m.group(), m.end()
        cur.values.append(text)
        self.open_item = False

    def quoted(self, opt: Opt) -> tuple[str, int]:
        """The quoted value at the cursor, unescaped, and the column after it."""
        li, col = self.li, self.col
        line, quote = self.lines[li], self.lines[li][col]
        out: list[str] = []
        i = col + 1
        while i < len(line):
            c = line[i]
            if c == quote:
                return "".join(out), i + 1
            if c == "\\" and i + 1 < len(line):
                esc = line[i + 1]
                if esc in _ESCAPES:
                    out.append(_ESCAPES[esc])
                    i += 2
                    continue
                hexa = line[i + 2 : i + 4]
                if esc == "x" and _HEX2.fullmatch(hexa):
                    out.append(chr(int(hexa, 16)))
                    i += 4
                    continue
                self.report.error(
                    li + 1,
                    opt.field,
                    line[i : i + 2],
                    f"unknown escape {line[i : i + 2]!r}",
                    "use \\\\ \\\" \\' \\n \\t \\r or \\xHH",
                )
                opt.bad = True
                i += 2
                continue
            out.append(c)
            i += 1
        self.report.error(
            li + 1, opt.field, line[col:], "unterminated quote", f"close the value with {quote}"
        )
        opt.bad = True
        return "".join(out), len(line)
