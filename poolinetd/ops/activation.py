"""Socket activation: adopt sockets passed per sd_listen_fds(3), and match them to endpoints.

``listen_fds`` touches the OS (it inspects fds 3.. and sets close-on-exec);
``match`` is pure. The same environment protocol carries the listeners from
an old master to a new one during an upgrade (``handoff.py``).

Protocol (sd_listen_fds): ``LISTEN_PID`` must equal our pid (the variables
were meant for us, not inherited from an ancestor), ``LISTEN_FDS`` counts the
fds, which start at 3 and are consecutive, and ``LISTEN_FDNAMES`` optionally
names them, colon-separated. The three variables are always removed from the
environment so that no child inherits them.

Ownership: after ``listen_fds`` returns, the caller owns every fd in the
result (including the ones with a ``problem``). It adopts the matched ones
(``socket.socket(fileno=fd)``) and closes the rest after warning about them.
Names are only reported, never trusted: a socket is adopted for the endpoint
its getsockname/SO_TYPE/SO_ACCEPTCONN say it is.

A count that names an fd which is not open, or one the caller reserves as its
own (``--ready-fd``), is a broken environment (libsystemd's sd_listen_fds
fails with EBADF then too): ``ListenFdsError``, with no fd touched. Read the
environment before opening anything of your own, so that no fd you opened
can sit in the range and be taken (and later closed) as a passed one.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import socket
from collections.abc import Collection, Hashable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

LISTEN_FDS_START = 3
ENVIRONMENT = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
# Far more than any inetd.conf has; a bigger count is a broken environment, not a config.
MAX_FDS = 4096

K = TypeVar("K", bound=Hashable)

# spec.SocketType values -> the int a WantedSocket carries.
SOCKET_TYPES: dict[str, int] = {"stream": socket.SOCK_STREAM, "dgram": socket.SOCK_DGRAM,
                                "seqpacket": socket.SOCK_SEQPACKET}
_TYPE_NAMES = {number: name for name, number in SOCKET_TYPES.items()}


@dataclass(frozen=True, slots=True)
class PassedSocket:
    """What one passed fd really is.

    ``family``/``socket_type`` are 0 and ``problem`` says why when the fd is
    not a usable socket. ``address`` is the numeric host for inet sockets, the
    path for unix ones (``@name`` for abstract, ``""`` if unbound); ``port`` is
    0 for unix. ``v6only`` is IPV6_V6ONLY for AF_INET6 and True otherwise (so
    it compares like ``spec.Endpoint.v6only``). ``name`` is the LISTEN_FDNAMES
    entry (``"unknown"`` when none was given, as systemd does).
    """

    fd: int
    name: str
    family: int
    socket_type: int
    listening: bool
    address: str
    port: int
    v6only: bool = True
    problem: str = ""
    is_open: bool = True  # False: the fd number was never open (nothing to close)

    def describe(self) -> str:
        """A human name for warnings: ``fd 4 'web' (tcp 0.0.0.0:80)``."""
        return f"fd {self.fd} {self.name!r} ({self.problem or self._where()})"

    def _where(self) -> str:
        kind = _TYPE_NAMES.get(self.socket_type, str(self.socket_type))
        if self.family == socket.AF_UNIX:
            return f"unix {kind} {self.address or '(unbound)'}"
        host = f"[{self.address}]" if self.family == socket.AF_INET6 else self.address
        idle = not self.listening and self.socket_type != socket.SOCK_DGRAM
        suffix = ", not listening" if idle else ""
        return f"{kind} {host}:{self.port}{suffix}"


@dataclass(frozen=True, slots=True)
class WantedSocket(Generic[K]):
    """One endpoint a service listens on, as ``match`` needs it.

    ``key`` is whatever the caller uses to find the endpoint again (for example
    ``(service.key, endpoint)``); the other fields mirror ``spec.Endpoint`` plus
    the socket type as an int (``SOCKET_TYPES[service.key.socket_type.value]``).
    """

    key: K
    family: int
    socket_type: int
    address: str
    port: int
    v6only: bool = True




class ListenFdsError(ValueError):
    """LISTEN_FDS names an fd that was not passed (a message for the operator)."""


def forget_environment(environ: MutableMapping[str, str]) -> None:
    """Remove LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES from ``environ``."""
    for name in ENVIRONMENT:
        environ.pop(name, None)


def listen_fds(environ: MutableMapping[str, str], pid: int | None = None,
               reserved: Collection[int] = ()) -> list[PassedSocket]:
    """The sockets passed to process ``pid`` (default ours), described; [] if none were.

    Always removes the LISTEN_* variables from ``environ`` (pass ``os.environ``).
    A LISTEN_PID naming another process, or a LISTEN_FDS that is not a count,
    means nothing was passed to us: those fds are not ours to touch. Each fd
    that was passed is marked close-on-exec (workers and programs must not
    inherit listeners by accident) and inspected; it never raises for an odd fd.
    Raises ListenFdsError, before touching any fd, when the count reaches an
    fd that is not open or is in ``reserved`` (fds the caller owns).
    """
    pid_text = environ.get("LISTEN_PID", "")
    count_text = environ.get("LISTEN_FDS", "")
    names_text = environ.get("LISTEN_FDNAMES")
    forget_environment(environ)
    expected = os.getpid() if pid is None else pid
    if not (_is_number(pid_text) and int(pid_text) == expected and _is_number(count_text)):
        return []
    count = int(count_text)
    if count > MAX_FDS:
        return []
    _check_range(count, reserved)
    names = names_text.split(":") if names_text is not None else []
    if len(names) != count:  # sd_listen_fds_with_names: a mismatch leaves them unnamed
        names = ["unknown"] * count
    return [inspect(fd, names[i] or "unknown")
            for i, fd in enumerate(range(LISTEN_FDS_START, LISTEN_FDS_START + count))]


def _check_range(count: int, reserved: Collection[int]) -> None:
    """Raise ListenFdsError unless fds 3 .. 3+count-1 are all open and none is reserved."""
    last = LISTEN_FDS_START + count - 1
    for fd in range(LISTEN_FDS_START, last + 1):
        if fd in reserved:
            why = "is poolinetd's own (--ready-fd)"
        else:
            try:
                fcntl.fcntl(fd, fcntl.F_GETFD)
                continue
            except OSError:
                why = "is not open"
        raise ListenFdsError(
            f"LISTEN_FDS={count} names fds {LISTEN_FDS_START}-{last}, but fd {fd} {why}: "
            "the count is larger than the fds passed; no passed socket was used")


def inspect(fd: int, name: str) -> PassedSocket:
    """Describe ``fd`` (set close-on-exec first); the fd stays open and the caller's."""
    try:
        os.set_inheritable(fd, False)
    except OSError as err:
        return _broken(fd, name, f"not open: {err.strerror}", is_open=False)
    try:
        # socket(fileno=) reads SO_DOMAIN/SO_TYPE/SO_PROTOCOL; detach() below keeps the fd open.
        sock = socket.socket(fileno=fd)
    except OSError as err:
        return _broken(fd, name, f"not a socket: {err.strerror}")
    try:
        family = sock.family
        kind = sock.type
        listening = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        v6only = True
        if family == socket.AF_INET6:
            v6only = bool(sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
        if family in (socket.AF_INET, socket.AF_INET6):
            sockname = sock.getsockname()
            address, port = str(sockname[0]), int(sockname[1])
        elif family == socket.AF_UNIX:
            address, port = _unix_path(sock.getsockname()), 0
        else:
            return _broken(fd, name, f"unsupported address family {int(family)}")
    except OSError as err:
        return _broken(fd, name, f"cannot inspect: {err.strerror}")
    finally:
        sock.detach()
    return PassedSocket(fd=fd, name=name, family=int(family), socket_type=int(kind),
                        listening=listening, address=address, port=port, v6only=v6only)


def match(passed: Sequence[PassedSocket],
          wanted: Sequence[WantedSocket[K]]) -> tuple[dict[K, PassedSocket], list[PassedSocket]]:
    """Assign passed sockets to wanted endpoints; return (assignment, unmatched).

    A socket matches an endpoint when family, socket type, address (compared
    as IP addresses, so ``::`` equals ``0::0``; paths for unix) and port are
    equal, IPV6_V6ONLY agrees for AF_INET6, and a stream/seqpacket socket is
    listening. A wildcard listener therefore matches only a wildcard endpoint,
    and an endpoint asking for port 0 ("any free port") matches nothing. Each
    socket goes to at most one endpoint and each endpoint gets at most one
    socket (the first in ``passed`` order); the rest is ``unmatched``, in order.
    """
    assignment: dict[K, PassedSocket] = {}
    unmatched: list[PassedSocket] = []
    for candidate in passed:
        for want in wanted:
            if want.key not in assignment and _fits(candidate, want):
                assignment[want.key] = candidate
                break
        else:
            unmatched.append(candidate)
    return assignment, unmatched


def _fits(got: PassedSocket, want: WantedSocket[K]) -> bool:
    if got.problem or got.family != want.family or got.socket_type != want.socket_type:
        return False
    if got.socket_type != socket.SOCK_DGRAM and not got.listening:
        return False
    if got.family == socket.AF_UNIX:
        return bool(got.address) and os.path.normpath(got.address) == os.path.normpath(
            want.address)
    if want.port == 0 or got.port != want.port:
        return False
    if got.family == socket.AF_INET6 and got.v6only != want.v6only:
        return False
    return _same_host(got.address, want.address)


def _same_host(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b


def _unix_path(sockname: object) -> str:
    if isinstance(sockname, bytes):  # Linux reports abstract names as bytes with a leading NUL
        if sockname.startswith(b"\0"):
            return "@" + os.fsdecode(sockname[1:])
        return os.fsdecode(sockname)
    return str(sockname)


def _broken(fd: int, name: str, problem: str, is_open: bool = True) -> PassedSocket:
    return PassedSocket(fd=fd, name=name, family=0, socket_type=0, listening=False,
                        address="", port=0, problem=problem, is_open=is_open)


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit()


def close_unmatched(unmatched: Sequence[PassedSocket]) -> None:
    """Close the fds of sockets nobody adopted (the caller has warned about them)."""
    for item in unmatched:
        if not item.is_open:
            continue  # the number may belong to something else by now
        with contextlib.suppress(OSError):
            os.close(item.fd)
