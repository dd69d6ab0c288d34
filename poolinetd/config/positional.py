"""The positional notation: ``service socktype protocol wait user server [argv...]``.

Pure. ``tokenize`` splits a statement's lines into fields (from field 7 on,
a quoted word runs to the same quote on the same line: FreeBSD's rule);
``read_entry`` reads the fields of one entry through a ``FieldReader``.
"""

from __future__ import annotations

from poolinetd.config.fields import EntryFields, FieldReader
from poolinetd.config.report import FileReport, short
from poolinetd.config.spec import FieldLoc
from poolinetd.config.tokens import FIELD, Tok

_MIN_FIELDS = 6


def tokenize(lines: list[str], start: int, stop: int, report: FileReport) -> list[Tok]:
    """The fields of ``lines[start:stop]`` (one statement with its continuation lines).

    An unterminated quote is reported and the word runs to the end of its line.
    """
    toks: list[Tok] = []
    for idx in range(start, stop):
        line, pos = lines[idx], 0
        while (m := FIELD.search(line, pos)) is not None:
            fld = len(toks) + 1
            begin = m.start()
            quote = line[begin]
            if fld >= 7 and quote in "\"'":
                close = line.find(quote, begin + 1)
                if close < 0:
                    raw = line[begin:]
                    report.error(
                        idx + 1, fld, raw, "unterminated quote", f"close the argument with {quote}"
                    )
                    toks.append(Tok(raw[1:], raw, idx + 1, fld, len(line)))
                    break
                # FreeBSD rule: the word ends at the closing quote.
                toks.append(
                    Tok(line[begin + 1 : close], line[begin : close + 1], idx + 1, fld, close + 1)
                )
                pos = close + 1
            else:
                toks.append(Tok(m.group(), m.group(), idx + 1, fld, m.end()))
                pos = m.end()
    return toks


def read_entry(toks: list[Tok], reader: FieldReader) -> EntryFields | None:
    """The entry ``toks`` spell, or None when it has an error (reported to ``reader.report``)."""
    if len(toks) < _MIN_FIELDS:
        reader.report.tok_error(
            toks[-1],
            f"entry ends after field {len(toks)}; expected at least {_MIN_FIELDS}",
            "write: service socket-type protocol wait user server [args]",
        )
        return None
    f = EntryFields()
    # The protocol first: it decides how field 1 reads (a unix service is a path, an
    # RPC service PROGRAM/VERSIONS).
    reader.protocol_field(toks[2], toks[2].text, f)
    reader.service_field(toks[0], toks[0].text, f.protocol, f)
    reader.socket_type_field(toks[1], toks[1].text, f)
    reader.rpc_socket(toks[1], f)  # rpc/*: the socket type picks udp or tcp
    reader.wait_field(toks[3], toks[3].text, f)
    reader.user_field(toks[4], toks[4].text, f)
    reader.server_field(toks[5], toks[5].text, f)
    f.argv = tuple(t.text for t in toks[_MIN_FIELDS:])
    if len(toks) > _MIN_FIELDS:
        f.locs["argv"] = FieldLoc(toks[6].lineno, 7, short(toks[6].raw))
    return None if reader.report.entry_failed else f
