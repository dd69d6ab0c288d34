"""Reading a config and its ``.include`` files: safe, bounded, each file once, UTF-8 only.

Touches the OS: stat/open/read of config files, ``glob``. Never raises on
a bad config: every problem is a Diagnostic naming FILE:LINE (the
``.include`` line for a file that cannot be included). Entry points:
``read_config`` (one file), ``load_path`` and ``load_text`` (a file or a
text, with its includes spliced in, as one ParsedConfig).

Rules:

- Only regular files are read (stat before open, opened ``O_NONBLOCK |
  O_NOCTTY``, fstat after open): a FIFO, a device, a directory or a socket
  is an error, never opened for reading or waited on. Symlinks are followed
  (``/etc/inetd.d/x.conf -> ../available/x.conf`` is common); whoever can
  write the config tree controls the config anyway.
- Bounded: each file at most ``LoadLimits.file_bytes`` (4 MiB); in all at
  most ``total_bytes``, ``files`` files, ``entries`` entries and ``depth``
  nested includes. Past a bound the load is an error, and no more work is done.
- Each file is read once: a file already included (same device and inode)
  is skipped with a warning, and a file that includes itself is an error.
  So the work is linear in the bytes read, whatever the include graph.
- Text must be UTF-8. Full-line comments may hold any bytes (old files carry
  Latin-1 comments); anywhere else a byte that is not UTF-8 is an error at
  FILE:LINE: field N, and that line yields no entry. Service names, paths and
  arguments are therefore always valid text (JSON, logs and exec agree).
- A main file whose first statement is xinetd's (``defaults``, ``service NAME``,
  ``include``, ``includedir``) is read as xinetd.conf(5) by ``xinetd_load``,
  under the same bounds.
"""

from __future__ import annotations

import bisect
import glob
import itertools
import os
import re
import stat
from dataclasses import dataclass, field

from poolinetd.config import inetdconf, xinetd_lexer, xinetd_load
from poolinetd.config.report import short
from poolinetd.config.spec import (
    LIMIT_NAMES,
    Diagnostic,
    Include,
    Limits,
    Options,
    ParsedConfig,
    ServiceSpec,
    Severity,
)

__all__ = [
    "DEFAULT_LIMITS", "LoadLimits", "load_path", "load_text", "read_config", "read_regular",
]

MIB = 1 << 20
_SURROGATE = re.compile("[\ud800-\udfff]")
_FIELD = re.compile(r"[^ \t]+")
_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


@dataclass(frozen=True, slots=True)
class LoadLimits:
    """Bounds on the work one load may do (every file, every ``.include``)."""

    file_bytes: int = 4 * MIB
    total_bytes: int = 32 * MIB
    files: int = 1024
    entries: int = 100_000
    depth: int = 16


DEFAULT_LIMITS = LoadLimits()


class _ReadError(Exception):
    """Why a file cannot be read (a message for a Diagnostic)."""


def _kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def _read_bytes(path: str, limit: int) -> tuple[bytes, tuple[int, int]]:
    """The bytes of the regular file at ``path`` (at most ``limit``) and its (dev, ino)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise _ReadError(exc.strerror or str(exc)) from exc
    except ValueError as exc:  # a NUL byte, or a lone surrogate the file system cannot take
        raise _ReadError(f"not a usable path: {exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise _ReadError(f"it is {_kind(st.st_mode)}, not a regular file")
    if st.st_size > limit:
        raise _ReadError(f"it is larger than {limit} bytes")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise _ReadError(exc.strerror or str(exc)) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # swapped between stat and open
            raise _ReadError(f"it is {_kind(st.st_mode)}, not a regular file")
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 16, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise _ReadError(exc.strerror or str(exc)) from exc
    finally:
        os.close(fd)
    if size > limit:
        raise _ReadError(f"it is larger than {limit} bytes")  # it grew while being read
    return b"".join(chunks), (st.st_dev, st.st_ino)


def read_regular(path: str, limit: int) -> tuple[bytes, tuple[int, int]] | str:
    """The bytes (at most ``limit``) and (dev, ino) of the regular file at ``path``, or why
    not, by the rules above (the xinetd loader reads its include files with it)."""
    try:
        return _read_bytes(path, limit)
    except _ReadError as exc:
        return str(exc)


def read_config(path: str, limits: LoadLimits = DEFAULT_LIMITS
                ) -> tuple[str | None, Diagnostic | None]:
    """The text of one config file (undecodable bytes kept as surrogates), or why not."""
    try:
        data, _ = _read_bytes(path, limits.file_bytes)
    except _ReadError as exc:
        return None, _unreadable(path, str(exc))
    return data.decode("utf-8", "surrogateescape"), None


def _unreadable(path: str, reason: str) -> Diagnostic:
    return Diagnostic(path, 0, 0, "", f"cannot read the file: {reason}",
                      "give a regular, readable file")


def _escaped(text: str) -> str:
    """``text`` as valid text: each surrogate shown as an escape (never raises)."""
    return _SURROGATE.sub(lambda found: _escape(found.group()), text)


def _escape(char: str) -> str:
    """A lone surrogate as text: ``\\xNN`` for the undecodable byte NN that surrogateescape
    made U+DCNN, ``\\uNNNN`` for one that did not come from a byte (text handed to
    ``load_text`` may hold any str)."""
    code = ord(char)
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


def _not_text(char: str, column: int) -> str:
    """Why the surrogate ``char`` at ``column`` (1-based) is refused, for a Diagnostic."""
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:
        return f"byte 0x{code - 0xDC00:02x} at column {column} is not UTF-8"
    return f"character U+{code:04X} at column {column} is not valid text (a lone surrogate)"


def check_utf8(text: str, source: str) -> tuple[str, list[Diagnostic], frozenset[int]]:
    """Apply the UTF-8 rule to ``text`` (bytes that were not UTF-8 are lone surrogates).

    Returns the text to parse (comment lines cleaned, bad lines' bytes shown
    as U+FFFD), one error per bad line and the set of bad line numbers.
    """
    if _SURROGATE.search(text) is None:
        return text, [], frozenset()
    lines = text.split("\n")
    diags: list[Diagnostic] = []
    bad: set[int] = set()
    for index, line in enumerate(lines):
        found = _SURROGATE.search(line)
        if found is None:
            continue
        if not line.startswith("#"):
            col = found.start()
            words = [m for m in _FIELD.finditer(line) if m.start() <= col]
            word = words[-1].group() if words else line[col:col + 1]
            diags.append(Diagnostic(
                source, index + 1, len(words), short(_escaped(word)), _not_text(line[col], col + 1),
                "write the file in UTF-8 (e.g. iconv -f latin1 -t utf-8); only full-line "
                "comments may hold other bytes"))
            bad.add(index + 1)
        lines[index] = _SURROGATE.sub("\ufffd", line)
    return "\n".join(lines), diags, frozenset(bad)


def _parse_checked(text: str, source: str) -> ParsedConfig:
    """Parse ``text`` after the UTF-8 rule; entries and includes on bad lines are dropped."""
    clean, diags, bad = check_utf8(text, source)
    parsed = inetdconf.parse(clean, source)
    if not bad:
        return parsed
    starts = [s.lineno for s in parsed.specs] + [len(clean.split("\n")) + 1]
    marks = sorted(bad)

    def spans_bad(i: int) -> bool:
        # An entry owns its lines up to the next entry; drop it if a bad line is among them.
        at = bisect.bisect_left(marks, starts[i])
        return at < len(marks) and marks[at] < starts[i + 1]

    keep = [not spans_bad(i) for i in range(len(parsed.specs))]
    specs = tuple(s for s, k in zip(parsed.specs, keep, strict=True) if k)
    kept_before = list(itertools.accumulate(keep, initial=0))  # kept specs before position n
    includes = tuple(
        Include(inc.pattern, inc.source, inc.lineno, kept_before[inc.position])
        for inc in parsed.includes if inc.lineno not in bad)
    return ParsedConfig(specs, parsed.defaults, (*parsed.diagnostics, *diags), includes)


@dataclass(slots=True)
class _Loader:
    """One load: what was read so far and how much work is left."""

    limits: LoadLimits
    seen: dict[tuple[int, int], str] = field(default_factory=dict)  # file -> where included
    files: int = 0
    bytes: int = 0
    entries: int = 0
    stopped: bool = False  # a bound was hit: no more work
    defaults: list[Options] = field(default_factory=list)  # in file order; first set wins

    def error(self, inc: Include, message: str, hint: str,
              severity: Severity = Severity.ERROR) -> Diagnostic:
        """A problem with an ``.include`` line, placed on its pattern (field 2)."""
        return Diagnostic(inc.source, inc.lineno, 2, short(inc.pattern), message, hint, severity)

    def count_entries(self, parsed: ParsedConfig, where: Include | None) -> Diagnostic | None:
        """Count ``parsed``'s entries against the bound; the problem once it is passed
        (placed on the ``.include`` that brought them, or on the first entry too many)."""
        self.entries += len(parsed.specs)
        if self.entries <= self.limits.entries:
            return None
        self.stopped = True
        message = f"more than {self.limits.entries} entries in all"
        hint = "split the services over several poolinetd instances"
        if where is not None:
            return self.error(where, message, hint)
        over = parsed.specs[len(parsed.specs) - (self.entries - self.limits.entries)]
        return Diagnostic(over.source, over.lineno, 0, "", message, hint)

    def expand(self, parsed: ParsedConfig, stack: tuple[tuple[int, int], ...]
               ) -> tuple[list[ServiceSpec], list[Diagnostic]]:
        """Splice ``parsed``'s includes (relative to the including file, globbed, sorted)."""
        self.defaults.append(parsed.defaults)
        specs: list[ServiceSpec] = []
        diags = list(parsed.diagnostics)
        done = 0
        for inc in parsed.includes:
            specs.extend(parsed.specs[done:inc.position])
            done = inc.position
            if self.stopped:
                continue
            self.include(inc, stack, specs, diags)
        specs.extend(parsed.specs[done:])
        return specs, diags

    def include(self, inc: Include, stack: tuple[tuple[int, int], ...],
                specs: list[ServiceSpec], diags: list[Diagnostic]) -> None:
        """Read, parse and splice the files ``inc`` names into ``specs``, in sorted order.

        Each bound (files, bytes, depth) stops the whole load once hit; a cycle
        is an error, a file included twice a warning (it is read once).
        """
        pattern = os.path.join(os.path.dirname(inc.source), inc.pattern)
        if glob.has_magic(pattern):
            try:
                found = list(itertools.islice(glob.iglob(pattern), self.limits.files + 1))
            except ValueError as exc:  # a directory name the file system cannot take
                diags.append(self.error(inc, f"{pattern}: cannot include: not a usable path: "
                                        f"{exc}", "include only regular, readable files"))
                return
            if len(found) > self.limits.files:
                self.stopped = True
                diags.append(self.error(inc, f"matches more than {self.limits.files} files",
                                        "narrow the pattern"))
                return
            paths = sorted(found)
        else:
            paths = [pattern]
        if not paths:
            diags.append(self.error(inc, ".include matched no files", "check the pattern",
                                    Severity.WARNING))
        for path in paths:
            if self.stopped:
                return
            if len(stack) > self.limits.depth:
                diags.append(self.error(inc, f"include nesting too deep at {path} "
                                        f"(more than {self.limits.depth} levels)",
                                        "remove the .include"))
                return
            self.files += 1
            if self.files > self.limits.files:
                self.stopped = True
                diags.append(self.error(inc, f"more than {self.limits.files} files included",
                                        "include fewer files"))
                return
            left = min(self.limits.file_bytes, self.limits.total_bytes - self.bytes)
            try:
                data, ident = _read_bytes(path, max(left, 0))
            except _ReadError as exc:
                reason = str(exc)
                if left < self.limits.file_bytes and "larger than" in reason:
                    self.stopped = True
                    reason = f"the included files exceed {self.limits.total_bytes} bytes in all"
                diags.append(self.error(inc, f"{path}: cannot include: {reason}",
                                        "include only regular, readable files"))
                continue
            if ident in stack:
                diags.append(self.error(inc, f"include cycle at {path}", "remove the .include"))
                continue
            if ident in self.seen:
                diags.append(self.error(inc, f"{path} is already included ({self.seen[ident]}); "
                                        "skipped", "include each file once", Severity.WARNING))
                continue
            self.seen[ident] = f"at {inc.source}:{inc.lineno}"
            self.bytes += len(data)
            sub = _parse_checked(data.decode("utf-8", "surrogateescape"), path)
            problem = self.count_entries(sub, inc)
            if problem is not None:
                diags.append(problem)
                return
            sub_specs, sub_diags = self.expand(sub, (*stack, ident))
            specs.extend(sub_specs)
            diags.extend(sub_diags)

    def merged_defaults(self) -> Options:
        """Field by field, the first file (in include order) that sets it wins; env by
        name; each limit on its own (a limit written "unlimited" counts as set)."""
        values: dict[str, object] = {}
        env: dict[str, str] = {}
        limits: dict[str, int | None] = {}
        for options in self.defaults:
            for name in Options.__dataclass_fields__:
                if name not in ("env", "limits") and values.get(name) is None:
                    values[name] = getattr(options, name)
            for key, value in options.env:
                env.setdefault(key, value)
            for name in LIMIT_NAMES:
                if name not in limits and options.limits.given(name):
                    limits[name] = getattr(options.limits, name)
        values["env"] = tuple(env.items())
        values["limits"] = Limits(
            **{k: v for k, v in limits.items() if v is not None},
            unlimited=frozenset(k for k, v in limits.items() if v is None), safe_default=False)
        return Options(**values)  # type: ignore[arg-type]


def _identity(source: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of ``source`` when it is a file (a text may name none)."""
    try:
        st = os.stat(source)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino)


def _load(text: str, source: str, ident: tuple[int, int] | None,
          limits: LoadLimits) -> ParsedConfig:
    """Parse ``text`` (the main file, ``ident`` if on disk) and splice its includes.

    An xinetd.conf (told by its first statement) goes to the xinetd loader.
    """
    if xinetd_lexer.looks_like_xinetd(text):
        return xinetd_load.load(text, source, ident, limits, read_regular, check_utf8)
    loader = _Loader(limits)
    top = _parse_checked(text, source)
    problem = loader.count_entries(top, None)
    if problem is not None:
        return ParsedConfig((), top.defaults, (*top.diagnostics, problem))
    stack = (ident,) if ident is not None else ()
    if ident is not None:
        loader.seen[ident] = "as the main file"
    specs, diags = loader.expand(top, stack)
    return ParsedConfig(tuple(specs), loader.merged_defaults(), tuple(diags))


def load_text(text: str, source: str, limits: LoadLimits = DEFAULT_LIMITS) -> ParsedConfig:
    """Parse ``text`` and splice in its includes (relative to ``source``'s directory)."""
    return _load(text, source, _identity(source), limits)


def load_path(path: str, limits: LoadLimits = DEFAULT_LIMITS) -> ParsedConfig:
    """Read, parse and splice the config at ``path``; an unreadable file is a diagnostic."""
    try:
        data, ident = _read_bytes(path, limits.file_bytes)
    except _ReadError as exc:
        return ParsedConfig((), Options(), (_unreadable(path, str(exc)),))
    return _load(data.decode("utf-8", "surrogateescape"), path, ident, limits)
