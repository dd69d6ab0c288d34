"""ONC RPC program names: /etc/rpc, read the way the master reads its config (bounded).

Touches the OS: reads ``/etc/rpc`` (``getrpcbyname`` is ``Lookups.getrpcbyname``
in ``system_lookups()``; tests pass fakes). The C library's ``getrpcbyname``
is not in Python's standard library, and the file is one table of
``name number aliases...`` lines, so it is read here: a regular file only,
opened non-blocking (a FIFO put in its place is never waited on), at most
``MAX_BYTES``, re-read only when its identity or size or time changes.
"""

from __future__ import annotations

import os
import stat

from poolinetd.config.spec import RPC_NUMBER_MAX

RPC_FILE = "/etc/rpc"
MAX_BYTES = 1 << 20  # glibc's file is 3 KiB; a bigger one is not a name table
# (path, device, inode, size, mtime_ns) -> names and aliases -> program number
_cache: tuple[tuple[str, int, int, int, int], dict[str, int]] | None = None


def parse_rpc(text: str) -> dict[str, int]:
    """``name number [aliases...]`` per line, ``#`` starts a comment; the first line that
    names a program wins (as getrpcbyname's linear scan). Malformed lines are skipped."""
    table: dict[str, int] = {}
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) < 2 or not (words[1].isascii() and words[1].isdigit()):
            continue
        number = int(words[1])
        if not 0 < number <= RPC_NUMBER_MAX:
            continue
        for name in (words[0], *words[2:]):
            table.setdefault(name, number)
    return table


def read_table(path: str = RPC_FILE) -> dict[str, int]:
    """The names in ``path`` (empty when it is missing, not a regular file, too big, or
    not text). Never raises for what the file holds; never blocks on a special file."""
    global _cache
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError:
        return {}
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_BYTES:
            return {}
        ident = (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if _cache is not None and _cache[0] == ident:
            return _cache[1]
        data = b""
        while len(data) <= MAX_BYTES:
            chunk = os.read(fd, MAX_BYTES + 1 - len(data))
            if not chunk:
                break
            data += chunk
    except OSError:
        return {}
    finally:
        os.close(fd)
    if len(data) > MAX_BYTES:
        return {}
    table = parse_rpc(data.decode("utf-8", "replace"))
    _cache = (ident, table)
    return table


def getrpcbyname(name: str) -> int:
    """The program number /etc/rpc gives ``name`` (or an alias); raises LookupError."""
    number = read_table().get(name)
    if number is None:
        raise LookupError(name)
    return number
