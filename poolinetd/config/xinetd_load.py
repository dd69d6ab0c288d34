"""Reading an xinetd.conf and the files it includes, then mapping them: one ParsedConfig.

Touches the OS: reads files through the reader ``includes`` passes in
(``read_regular``: regular files only, never waiting on a FIFO or device)
and lists ``includedir`` directories. Never raises on a bad config: every problem is a Diagnostic at
the FILE:LINE of the ``include``/``includedir`` line or of what it is about.

Rules, as xinetd 2.3.15 has them, under ``includes.LoadLimits``' bounds:

- ``include FILE`` reads one file; ``includedir DIR`` reads every regular file
  of DIR whose name holds no ``.`` and does not end in ``~`` (so ``foo.rpmsave``,
  ``foo.dpkg-old`` and ``foo~`` stay out), in C-locale (byte) order. Other
  entries (directories, sockets) are skipped. A relative path is taken from the
  including file's directory.
- Each file is read once (same device and inode): a second inclusion is a
  warning, a file including itself an error. Depth, file count, bytes and
  services are bounded; past a bound the load is an error and stops.
- The UTF-8 rule of ``includes.check_utf8``: a statement on a line that is not
  UTF-8 is dropped with an error.
- ``defaults`` blocks from any file apply to every service, as in xinetd.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from poolinetd.config import xinetd_banner, xinetd_lexer, xinetd_map
from poolinetd.config.report import short
from poolinetd.config.spec import Diagnostic, ParsedConfig, Severity
from poolinetd.config.xinetd_lexer import Block, Directive

__all__ = ["Bounds", "load"]

Ident = tuple[int, int]
# includes.read_regular: (bytes, (dev, ino)) or why the file cannot be read.
Reader = Callable[[str, int], "tuple[bytes, Ident] | str"]
# includes.check_utf8: (text to parse, one error per bad line, the bad line numbers).
Utf8Check = Callable[[str, str], "tuple[str, list[Diagnostic], frozenset[int]]"]


class Bounds(Protocol):
    """The bounds of one load (``includes.LoadLimits``)."""

    @property
    def file_bytes(self) -> int: ...
    @property
    def total_bytes(self) -> int: ...
    @property
    def files(self) -> int: ...
    @property
    def entries(self) -> int: ...
    @property
    def depth(self) -> int: ...


def load(text: str, source: str, ident: Ident | None, limits: Bounds, read: Reader,
         check_utf8: Utf8Check) -> ParsedConfig:
    """Lex ``text`` (the main file, ``ident`` = its (dev, ino) when it is on disk), read
    what it includes, and map every block. Total.

    ``includes`` calls this for a file it recognises as xinetd's and passes its own
    reader and UTF-8 rule, so both formats read files the same way (and this module
    does not import ``includes``, which imports it).
    """
    tree = _Tree(limits, read, check_utf8)
    if ident is not None:
        tree.seen[ident] = "as the main file"
    tree.bytes = len(text)
    tree.read_text(text, source, (ident,) if ident is not None else ())
    def read_banner(path: str) -> bytes | str:
        # Relative to the main file's directory; read once per load, bounded (the map
        # cuts it to BANNER_MAX), by xinetd_banner's rules: no symbolic link on the path,
        # a regular file anyone may read (the master is root; a banner goes to anyone).
        return xinetd_banner.read(path, os.path.dirname(os.path.abspath(source)),
                                  xinetd_map.BANNER_MAX)

    # passenv takes its values from the master's environment, as xinetd from its own.
    mapped = xinetd_map.build(tree.blocks, read_banner, os.environ)
    return ParsedConfig(mapped.specs, mapped.defaults, (*tree.diags, *mapped.diagnostics))


@dataclass(slots=True)
class _Tree:
    """One load: the blocks read so far, in order, and how much work is left."""

    limits: Bounds
    read: Reader
    check_utf8: Utf8Check
    blocks: list[Block] = field(default_factory=list)
    diags: list[Diagnostic] = field(default_factory=list)
    seen: dict[Ident, str] = field(default_factory=dict)
    files: int = 0
    bytes: int = 0
    services: int = 0
    stopped: bool = False

    def problem(self, where: Directive, message: str, hint: str,
                severity: Severity = Severity.ERROR) -> None:
        self.diags.append(Diagnostic(where.source, where.lineno, 0, short(where.path),
                                     f"{where.kind}: {message}", hint, severity))

    def read_text(self, text: str, source: str, stack: tuple[Ident, ...]) -> None:
        """Lex one file's text and follow its directives, in order."""
        clean, bad_diags, bad = self.check_utf8(text, source)
        lexed = xinetd_lexer.lex(clean, source)
        self.diags.extend(bad_diags)
        self.diags.extend(lexed.diagnostics)
        for item in lexed.items:
            if self.stopped:
                return
            if isinstance(item, Directive):
                if item.lineno not in bad:
                    self.directive(item, stack)
                continue
            if item.lineno in bad or any(a.lineno in bad for a in item.attrs):
                continue  # the UTF-8 error is reported; the block is not guessed at
            if item.kind == "service":
                self.services += 1
                if self.services > self.limits.entries:
                    self.stopped = True
                    self.diags.append(Diagnostic(
                        item.source, item.lineno, 0, "service",
                        f"more than {self.limits.entries} services in all",
                        "split the services over several poolinetd instances"))
                    return
            self.blocks.append(item)

    def directive(self, item: Directive, stack: tuple[Ident, ...]) -> None:
        """``include FILE`` or ``includedir DIR``, relative to the including file."""
        path = os.path.join(os.path.dirname(item.source), item.path)
        if item.kind == "include":
            self.include(item, path, stack)
            return
        try:
            with os.scandir(path) as entries:
                found = list(itertools.islice(entries, self.limits.files + 1))
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self.problem(item, f"cannot read directory {path}: {reason}",
                         "give a readable directory")
            return
        if len(found) > self.limits.files:
            self.stopped = True
            self.problem(item, f"{path} holds more than {self.limits.files} entries",
                         "include fewer files")
            return
        # xinetd's rule: names with a dot or ending in "~" are backups, packaging
        # leftovers (.dpkg-old, .rpmsave) or editor files; C-locale order = byte order.
        names = sorted((e.name for e in found if "." not in e.name
                        and not e.name.endswith("~") and _is_file(e)), key=os.fsencode)
        for name in names:
            if self.stopped:
                return
            self.include(item, os.path.join(path, name), stack)

    def include(self, item: Directive, path: str, stack: tuple[Ident, ...]) -> None:
        """Read one included file (bounded, each once) and lex it in turn."""
        if len(stack) > self.limits.depth:
            self.problem(item, f"include nesting too deep at {path} (more than "
                         f"{self.limits.depth} levels)", "remove the include")
            return
        self.files += 1
        if self.files > self.limits.files:
            self.stopped = True
            self.problem(item, f"more than {self.limits.files} files included",
                         "include fewer files")
            return
        left = min(self.limits.file_bytes, self.limits.total_bytes - self.bytes)
        got = self.read(path, max(left, 0))
        if isinstance(got, str):
            if left < self.limits.file_bytes and "larger than" in got:
                self.stopped = True
                got = f"the included files exceed {self.limits.total_bytes} bytes in all"
            self.problem(item, f"{path}: cannot include: {got}",
                         "include only regular, readable files")
            return
        data, ident = got
        if ident in stack:
            self.problem(item, f"include cycle at {path}", "remove the include")
            return
        if ident in self.seen:
            self.problem(item, f"{path} is already included ({self.seen[ident]}); skipped",
                         "include each file once", Severity.WARNING)
            return
        self.seen[ident] = f"at {item.source}:{item.lineno}"
        self.bytes += len(data)
        self.read_text(data.decode("utf-8", "surrogateescape"), path, (*stack, ident))


def _is_file(entry: os.DirEntry[str]) -> bool:
    """A regular file, or a link to one (never raises)."""
    try:
        return entry.is_file()
    except OSError:
        return False
