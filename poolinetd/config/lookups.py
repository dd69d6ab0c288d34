"""Name services for resolution: ports, users, groups, hosts, programs, passed in as a value.

``Lookups`` is what ``resolve`` asks; ``system_lookups()`` answers from the C
library (touches the OS: /etc/services, NSS, DNS, the file system), tests
pass fakes. ``attempt`` calls one lookup and turns "unknown" into None.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from poolinetd.config import rpcnames

_P = ParamSpec("_P")
_T = TypeVar("_T")

# What a failed lookup may raise: pwd/grp KeyError, socket OSError, and the
# ValueError/UnicodeError the C wrappers raise for NUL bytes or lone surrogates.
LOOKUP_FAILURES = (LookupError, OSError, ValueError)


@dataclass(frozen=True, slots=True)
class UserEntry:
    """What resolution needs from a passwd entry."""

    name: str
    uid: int
    gid: int
    home: str


def _sys_file_stamp(path: str) -> tuple[int, int, int, int] | None:
    """stat(2) only: the file is never opened here (the master runs as root; the
    script is read by the service's user, in its worker)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


@dataclass(frozen=True, slots=True)
class Lookups:
    """Name services, passed in so tests can fake them.

    Each callable raises ``LookupError`` or ``OSError`` when the name is unknown.
    ``getaddrinfo(host, family)`` returns the numeric addresses of ``host``
    for ``socket.AF_INET`` or ``AF_INET6``.
    """

    getservbyname: Callable[[str, str], int]
    getservbyport: Callable[[int, str], str]
    getpwnam: Callable[[str], UserEntry]
    getgrnam: Callable[[str], int]
    getgrouplist: Callable[[str, int], tuple[int, ...]]
    getaddrinfo: Callable[[str, int], tuple[str, ...]]
    is_executable: Callable[[str], bool]
    # ONC RPC program numbers by name (/etc/rpc); a default, so fakes need not give it.
    getrpcbyname: Callable[[str], int] = rpcnames.getrpcbyname
    # A preloaded script's (device, inode, mtime ns, size), None if it is not there: a
    # reload that sees it change restarts the service (config/preload.py).
    file_stamp: Callable[[str], tuple[int, int, int, int] | None] = _sys_file_stamp


def attempt(fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T | None:
    """``fn(*args)``, or None when it fails the way an unknown name fails (``LOOKUP_FAILURES``).

    Resolution never raises on a bad config: a name that cannot be looked up
    is "unknown", and the caller reports it.
    """
    try:
        return fn(*args, **kwargs)
    except LOOKUP_FAILURES:
        return None


def _sys_getpwnam(name: str) -> UserEntry:
    entry = pwd.getpwnam(name)
    return UserEntry(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


def _sys_getaddrinfo(host: str, family: int) -> tuple[str, ...]:
    infos = socket.getaddrinfo(host, None, family, socket.SOCK_STREAM)
    return tuple(dict.fromkeys(str(info[4][0]) for info in infos))


def _sys_is_executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def system_lookups() -> Lookups:
    """The real C library: /etc/services, NSS users and groups, DNS, the file system."""
    return Lookups(
        getservbyname=socket.getservbyname,
        getservbyport=socket.getservbyport,
        getpwnam=_sys_getpwnam,
        getgrnam=lambda name: grp.getgrnam(name).gr_gid,
        getgrouplist=lambda name, gid: tuple(os.getgrouplist(name, gid)),
        getaddrinfo=_sys_getaddrinfo,
        is_executable=_sys_is_executable,
    )
