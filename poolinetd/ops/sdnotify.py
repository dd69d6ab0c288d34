"""The systemd notify protocol (sd_notify): one datagram of ``KEY=value`` lines. Touches the OS.

No library: the protocol is a single ``sendto`` of newline-separated
assignments to the AF_UNIX datagram socket named by ``NOTIFY_SOCKET``
(an absolute path, or ``@name`` for the abstract namespace). The python
bindings (``systemd-python``, ``sdnotify``) would add a C extension or a
dependency for ten lines, and neither gives the non-blocking, never-raising
behaviour a single-threaded master needs.

Contracts:

- ``Notifier.from_env`` reads the environment once and opens one socket
  (non-blocking, close-on-exec) that the Notifier owns until ``close``.
  Each send names the address again (``sendto``, not ``connect``): if the
  service manager re-executes, it re-creates the socket at the same path and
  a connected socket would keep pointing at the dead one.
- The caller must then call ``forget_environment(os.environ)`` before it forks
  or spawns anything (workers, programs, a new master): otherwise a child
  would inherit ``NOTIFY_SOCKET`` and could speak for the service. A new master
  after an upgrade is given the address explicitly (``Notifier.address``).
- Every send is non-blocking and never raises: it returns False when the
  datagram could not be sent (no listener, full buffer, bad field). It logs
  nothing; the caller decides whether a failure is worth a line.
- Messages are sent with the sender's own credentials (no SCM_CREDENTIALS
  override as sd_pid_notify does): with ``NotifyAccess=main`` only the main
  process is listened to, which is why ``mainpid`` exists (see the unit files).
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Mapping, MutableMapping

# systemd reads at most this many bytes of one notification (NOTIFY_BUFFER_MAX = PIPE_BUF).
MAX_DATAGRAM = 4096
_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]*\Z")
ENVIRONMENT = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def socket_address(value: str) -> bytes | None:
    """The sockaddr path for a ``NOTIFY_SOCKET`` value, or None if it is not one we speak.

    ``/path`` is a filesystem socket, ``@name`` an abstract one (leading NUL).
    Anything else (relative paths, ``vsock:...``) is not supported: None.
    """
    if value.startswith("/"):
        return os.fsencode(value)
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])
    return None


def forget_environment(environ: MutableMapping[str, str]) -> None:
    """Remove NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID from ``environ``.

    Call it with ``os.environ`` right after ``Notifier.from_env`` and
    ``watchdog_interval`` and before the first fork, so that no worker or
    program inherits the right to notify systemd (``os.environ.pop`` also
    unsets the process environment that ``fork``/``exec`` pass on).
    """
    for name in ENVIRONMENT:
        environ.pop(name, None)


def watchdog_interval(environ: Mapping[str, str], pid: int | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings, or None when no watchdog is asked of ``pid``.

    Per sd_watchdog_enabled: ``WATCHDOG_USEC`` is a positive integer of
    microseconds; if ``WATCHDOG_PID`` is set it must equal our pid (default
    ``os.getpid()``). The result is half the timeout, as sd_watchdog_enabled(3)
    advises, so one late loop turn does not kill the service.
    """
    usec_text = environ.get("WATCHDOG_USEC", "")
    if not _is_number(usec_text):
        return None
    usec = int(usec_text)
    if usec <= 0:
        return None
    pid_text = environ.get("WATCHDOG_PID")
    if pid_text is not None:
        expected = os.getpid() if pid is None else pid
        if not _is_number(pid_text) or int(pid_text) != expected:
            return None
    return usec / 2 / 1_000_000


def _is_number(text: str) -> bool:
    """ASCII digits only (str.isdigit also accepts digits int() rejects, such as '²')."""
    return text.isascii() and text.isdigit()


def format_message(fields: Mapping[str, str | int]) -> bytes | None:
    """``KEY=value\\n`` lines in the given order; None if a name or value would break framing.

    Names are upper-case identifiers; values may not contain a newline (it would
    start another assignment) or NUL. None also when the datagram would exceed
    what systemd reads.
    """
    lines = []
    for name, value in fields.items():
        text = str(value)
        if not _FIELD_NAME.match(name) or "\n" in text or "\0" in text:
            return None
        lines.append(f"{name}={text}\n")
    data = "".join(lines).encode("utf-8", "surrogateescape")
    if not data or len(data) > MAX_DATAGRAM:
        return None
    return data


def one_line(text: str, limit: int = 1024) -> str:
    """``text`` as a STATUS value: control characters become spaces, at most ``limit`` chars."""
    cleaned = "".join(" " if ord(c) < 32 or c == "\x7f" else c for c in text)
    return cleaned[:limit]


class Notifier:
    """An open notify socket; owns ``sock`` until ``close``."""

    def __init__(self, address: str, sock: socket.socket) -> None:
        target = socket_address(address)
        if target is None:
            raise ValueError(f"not a notify socket address: {address!r}")
        self.address = address  # the NOTIFY_SOCKET value, to hand to a new master
        self._target = target
        self._sock = sock

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Notifier | None:
        """A Notifier for ``NOTIFY_SOCKET``, or None if it is unset, unsupported or unopenable."""
        address = environ.get("NOTIFY_SOCKET", "")
        if socket_address(address) is None:
            return None
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        except OSError:
            return None
        sock.setblocking(False)
        return cls(address, sock)

    def send(self, **fields: str | int) -> bool:
        """Send one datagram with ``fields`` in order; True if the kernel took it."""
        data = format_message(fields)
        if data is None or self._sock.fileno() < 0:
            return False
        try:
            return self._sock.sendto(data, self._target) == len(data)
        except OSError:  # ENOENT/ECONNREFUSED (no manager), EAGAIN (its buffer is full), ...
            return False

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: every listener open and every pool ready (or a reload applied/rejected)."""
        if status is None:
            return self.send(READY=1)
        return self.send(READY=1, STATUS=one_line(status))

    def reloading(self, monotonic_usec: int | None = None) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC`` (CLOCK_MONOTONIC now, unless given)."""
        if monotonic_usec is None:
            monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send(RELOADING=1, MONOTONIC_USEC=monotonic_usec)

    def stopping(self) -> bool:
        """``STOPPING=1``: a stop has begun."""
        return self.send(STOPPING=1)

    def status(self, text: str) -> bool:
        """``STATUS=`` with ``text`` made one line."""
        return self.send(STATUS=one_line(text))

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the loop is alive."""
        return self.send(WATCHDOG=1)

    def mainpid(self, pid: int, ready: bool = False) -> bool:
        """``MAINPID=pid`` (the new master after an upgrade), with ``READY=1`` if ``ready``."""
        if ready:
            return self.send(MAINPID=pid, READY=1)
        return self.send(MAINPID=pid)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
