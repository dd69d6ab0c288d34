"""Fake name services for config tests: a small, fixed world (no /etc, no DNS)."""

from __future__ import annotations

import socket

from poolinetd.config.lookups import Lookups, UserEntry

# name -> (tcp port, udp port); None = not offered for that protocol.
SERVICES: dict[str, tuple[int | None, int | None]] = {
    "echo": (7, 7),
    "discard": (9, 9),
    "sink": (9, 9),  # alias of discard, as in /etc/services
    "chargen": (19, 19),
    "daytime": (13, 13),
    "time": (37, 37),
    "ftp": (21, None),
    "telnet": (23, None),
    "shell": (514, None),
    "login": (513, None),
    "exec": (512, None),
    "finger": (79, None),
    "comsat": (None, 512),
    "talk": (None, 517),
    "ntalk": (None, 518),
    "tftp": (None, 69),
    "tcpmux": (1, None),
    "klogin": (543, None),
    "eklogin": (2105, None),
    "kshell": (544, None),
    "tftp-proxy": (None, 6969),
    "auth": (113, None),
    "http": (80, None),
}
OFFICIAL = {"sink": "discard"}
USERS = {
    "root": UserEntry("root", 0, 0, "/root"),
    "nobody": UserEntry("nobody", 65534, 65534, "/nonexistent"),
    "daemon": UserEntry("daemon", 1, 1, "/usr/sbin"),
    "www.data": UserEntry("www.data", 33, 33, "/var/www"),  # a user name with a dot
    "www": UserEntry("www", 80, 80, "/var/www"),
    "tty": UserEntry("tty", 5, 5, "/dev"),
}
GROUPS = {"root": 0, "daemon": 1, "tty": 5, "kmem": 15, "wheel": 10, "nogroup": 65534, "www": 80}
EXTRA_GROUPS = {"root": (10,)}  # root is also in wheel
HOSTS = {"localhost": (("127.0.0.1",), ("::1",)), "twohomed": (("192.0.2.1", "192.0.2.2"), ())}
PROGRAMS = frozenset(
    {"/usr/libexec/ftpd", "/usr/sbin/in.fingerd", "/bin/cat", "/usr/libexec/fingerd", "/bin/date",
     "/usr/bin/python3", "/usr/local/libexec/report.py", "/usr/local/libexec/plain.py"}
)


# /etc/rpc as glibc ships it, in part: names and aliases -> program numbers.
RPC_PROGRAMS = {"rstatd": 100001, "rstat": 100001, "rup": 100001, "rusersd": 100002,
                "rusers": 100002, "walld": 100008, "rwall": 100008}


def _rpcbyname(name: str) -> int:
    return RPC_PROGRAMS[name]


def _servbyname(name: str, proto: str) -> int:
    ports = SERVICES.get(name)
    port = None if ports is None else ports[0 if proto == "tcp" else 1]
    if port is None:
        raise OSError(f"service/proto not found: {name}/{proto}")
    return port


def _servbyport(port: int, proto: str) -> str:
    for name, ports in SERVICES.items():
        if name not in OFFICIAL and ports[0 if proto == "tcp" else 1] == port:
            return name
    raise OSError("port/proto not found")


def _pwnam(name: str) -> UserEntry:
    return USERS[name]


def _grnam(name: str) -> int:
    return GROUPS[name]


def _grouplist(name: str, gid: int) -> tuple[int, ...]:
    return (gid, *EXTRA_GROUPS.get(name, ()))


def _addrinfo(host: str, family: int) -> tuple[str, ...]:
    v4, v6 = HOSTS[host]
    found = v4 if family == socket.AF_INET else v6
    if not found:
        raise OSError("no address for that family")
    return found


def fake_lookups(*, programs: frozenset[str] | None = None, all_programs: bool = False) -> Lookups:
    """The fixed world above; ``all_programs`` makes every absolute path executable."""
    allowed = PROGRAMS if programs is None else programs
    return Lookups(
        getservbyname=_servbyname,
        getservbyport=_servbyport,
        getpwnam=_pwnam,
        getgrnam=_grnam,
        getgrouplist=_grouplist,
        getaddrinfo=_addrinfo,
        is_executable=(lambda p: p.startswith("/")) if all_programs else allowed.__contains__,
        getrpcbyname=_rpcbyname,
    )
