"""hosts.allow and hosts.deny as files: read, re-read when they change, bounded.

Touches the OS (the one module of ``admission`` that does): stat and read of
small local files. The rules themselves are judged by the pure
``tcpwrappers`` module.

As with libwrap, an edit takes effect without a reload: ``RuleFiles.current``
stats the two files (and the files ``/file`` patterns name) at most once
every CHECK_INTERVAL seconds and re-parses what changed (inode, size, mtime
or ctime). A file is read only if it is a regular file of at most
MAX_FILE_BYTES (opened non-blocking, so a FIFO put there never stalls the
master); an absent file has no rules, as for libwrap. A file that cannot be
read (permissions, a directory, too large) is treated as present but
unreadable: libwrap then refuses (its table_match error), and so do we, with
a diagnostic. The diagnostics of a file are logged once per change
(``tcp_wrappers_problem``), never per connection.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from poolinetd.admission import tcpwrappers as tw
from poolinetd.observe import log

CHECK_INTERVAL = 1.0  # seconds between two stats of the files
MAX_FILE_PATTERNS = 64  # /file patterns followed at most (each file bounded too)
DEFAULT_DIR = "/etc"

_Stamp = tuple[int, int, int, int, int] | None  # (dev, ino, size, mtime_ns, ctime_ns)


@dataclass(frozen=True, slots=True)
class Rules:
    """The rules in force: the two tables and the tokens of each ``/file`` pattern."""

    allow: tw.Table = field(default_factory=tw.Table)
    deny: tw.Table = field(default_factory=tw.Table)
    files: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    server_patterns: bool = False  # a daemon@host pattern: the local address is needed


def _stamp(path: str) -> _Stamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def read_text(path: str) -> tuple[str | None, str]:
    """(text as latin-1 or None if absent, why it could not be read or "")."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None, ""
        return None, f"cannot open: {exc.strerror}"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, "not a regular file"
        if st.st_size > tw.MAX_FILE_BYTES:
            return None, f"larger than {tw.MAX_FILE_BYTES} bytes"
        chunks: list[bytes] = []
        left = tw.MAX_FILE_BYTES + 1
        while left > 0:
            chunk = os.read(fd, min(left, 65536))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        if left <= 0:
            return None, f"larger than {tw.MAX_FILE_BYTES} bytes"
        return b"".join(chunks).decode("latin-1"), ""
    except OSError as exc:
        return None, f"cannot read: {exc.strerror}"
    finally:
        os.close(fd)


def pattern_tokens(text: str) -> tuple[str, ...]:
    """The patterns of a ``/file``: words separated by blanks and newlines, as libwrap's
    file_match reads them (no comments, no commas, no EXCEPT: tcpdmatch agrees)."""
    return tuple(tok for tok in re.split(r"[ \t\r\n]+", text) if tok)


def _unreadable(path: str, why: str) -> tw.Table:
    """A file libwrap cannot read: its walk errs at once (allow grants nothing, deny denies)."""
    where = f"{path}:1"
    return tw.Table(path, (tw.Rule(where, (), (), broken=True),),
                    (tw.Diagnostic(where, f"{why}: treated as an error, as libwrap does"),))


class RuleFiles:
    """hosts.allow and hosts.deny in ``directory``, kept current (see the module doc)."""

    def __init__(self, directory: str = DEFAULT_DIR,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = directory
        self.allow_path = os.path.join(directory, "hosts.allow")
        self.deny_path = os.path.join(directory, "hosts.deny")
        self.clock = clock
        self.next_check = 0.0
        self.stamps: dict[str, _Stamp] = {}
        self.rules = Rules()
        self.watched: tuple[str, ...] = ()  # every file stated: the two and the /file ones
        self.loads = 0  # how many times the rules were (re-)read

    def current(self, now: float | None = None) -> Rules:
        """The rules in force, re-read if a file changed (stats at most once a second)."""
        now = self.clock() if now is None else now
        if now < self.next_check:
            return self.rules
        self.next_check = now + CHECK_INTERVAL
        stamps = {path: _stamp(path) for path in self.watched}
        if stamps != self.stamps or self.loads == 0:
            self._load()
        return self.rules

    def _load(self) -> None:
        tables = []
        # Each file is stamped before it is read: an edit racing the read is seen at
        # the next check, never hidden behind a stamp of what was not read.
        stamps: dict[str, _Stamp] = {}
        for path in (self.allow_path, self.deny_path):
            stamps[path] = _stamp(path)
            text, why = read_text(path)
            if why:
                tables.append(_unreadable(path, why))
            else:
                tables.append(tw.parse(text or "", path))
        allow, deny = tables
        files: dict[str, tuple[str, ...]] = {}
        notes: list[tw.Diagnostic] = [*allow.diagnostics, *deny.diagnostics]
        named = sorted(allow.file_patterns() | deny.file_patterns())[:MAX_FILE_PATTERNS]
        for path in named:
            stamps[path] = _stamp(path)
            text, why = read_text(path)
            if why:
                notes.append(tw.Diagnostic(f"{path}:1", f"{why}: its patterns match nothing",
                                           "warning"))
            if text is not None:
                files[path] = pattern_tokens(text)
        server = any("@" in tok for table in (allow, deny) for rule in table.rules
                     for tok in rule.daemons)
        self.rules = Rules(allow, deny, files, server)
        self.watched = (self.allow_path, self.deny_path, *named)
        self.stamps = stamps
        self.loads += 1
        log.info("tcp_wrappers_loaded", allow=self.allow_path, deny=self.deny_path,
                 rules=len(allow.rules) + len(deny.rules), problems=len(notes))
        for diag in notes:
            log.warning("tcp_wrappers_problem", where=diag.where, severity=diag.level,
                        problem=diag.message)
