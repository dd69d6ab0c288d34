"""Where config problems are written down: one file's (the parser) or one spec's (resolve).

Pure: collects ``Diagnostic`` values and never raises. ``FileReport`` places a
problem by line and field, because the parser knows where it is reading;
``SpecReport`` by the role of a field ("user", "service"), because resolution
knows what a problem is about and ``ServiceSpec.loc`` knows where it was written.
"""

from __future__ import annotations

from poolinetd.config.spec import Diagnostic, ServiceSpec, Severity
from poolinetd.config.tokens import Opt, Tok

# Diagnostics quote the offending token; a megabyte-long token helps nobody.
TOKEN_MAX = 120


def short(token: str) -> str:
    """``token`` cut to the length a diagnostic quotes."""
    return token[:TOKEN_MAX]


class FileReport:
    """The diagnostics of one file being parsed, in the order they were found.

    ``entry_failed`` says whether the statement being read has had an error
    (so it yields no spec); the parser resets it at each statement.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.diags: list[Diagnostic] = []
        self.entry_failed = False

    def error(self, lineno: int, fld: int, token: str, message: str, hint: str = "") -> None:
        """Record an error at ``lineno``/``fld``; the current statement fails."""
        self.entry_failed = True
        self.diags.append(Diagnostic(self.source, lineno, fld, short(token), message, hint))

    def warn(self, lineno: int, fld: int, token: str, message: str, hint: str = "") -> None:
        """Record a warning; the statement still yields its spec."""
        self.diags.append(
            Diagnostic(self.source, lineno, fld, short(token), message, hint, Severity.WARNING)
        )

    def tok_error(self, tok: Tok, message: str, hint: str = "") -> None:
        """An error about a positional token (or a field read out of a key's value)."""
        self.error(tok.lineno, tok.field, tok.raw, message, hint)

    def opt_error(self, opt: Opt, message: str, hint: str = "") -> None:
        """An error about one ``key=value`` option, quoted as written."""
        self.error(opt.lineno, opt.field, opt.raw, message, hint)


class SpecReport:
    """The diagnostics of resolving one spec; ``failed`` once any of them is an error."""

    def __init__(self, spec: ServiceSpec) -> None:
        self.spec = spec
        self.diags: list[Diagnostic] = []
        self.failed = False

    def report(self, role: str, message: str, hint: str = "", *, warning: bool = False) -> None:
        """Record a problem with the field that plays ``role`` (see ``ServiceSpec.loc``)."""
        where = self.spec.loc(role)
        severity = Severity.WARNING if warning else Severity.ERROR
        self.failed = self.failed or not warning
        self.diags.append(
            Diagnostic(
                self.spec.source, where.lineno, where.field, where.token, message, hint, severity
            )
        )
