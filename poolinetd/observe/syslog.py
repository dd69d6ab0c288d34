"""Sending the log to syslog (``--syslog``): RFC 3164 datagrams on /dev/log that never block.

Touches the OS: an AF_UNIX SOCK_DGRAM socket connected to the syslog socket.
``SyslogHandler`` is a logging handler ``log.setup`` adds beside the file or
stderr one. Each line goes out as libc's syslog(3) frames it,
``<PRI>Mmm dd hh:mm:ss poolinetd[PID]: MESSAGE``, where MESSAGE is the text
format's ``LEVEL EVENT key=value ...`` (so one fail2ban filter reads both).

Why not ``logging.handlers.SysLogHandler``: it blocks when the daemon stops
reading (a full receive queue), and it writes no timestamp or tag. Here the
socket is non-blocking: a line the daemon cannot take at once (queue full,
daemon gone, socket missing) is dropped and counted, never waited for, so a
stuck syslog daemon cannot stall the master's loop. Drops are reported by a
``syslog_dropped`` warning at most once a minute (to the other handlers: the
file or stderr) and by ``status()`` (``poolinetd status`` shows it).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import time

from poolinetd.observe import log

DEFAULT_SOCKET = "/dev/log"
# syslog(3)'s facility numbers (RFC 3164 4.1.1); the PRI is facility * 8 + severity.
FACILITIES: dict[str, int] = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6,
    "news": 7, "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11,
    **{f"local{n}": 16 + n for n in range(8)},
}
_SEVERITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
MAX_LINE = 8192  # rsyslog's default maxMessageSize: longer lines are cut, not dropped
REPORT_INTERVAL = 60.0  # seconds between two syslog_dropped warnings
_RECONNECT_INTERVAL = 1.0  # seconds between two attempts to reach a missing daemon
# A send that fails with one of these means the daemon is gone, restarted (a new
# socket at the path) or not there yet: reconnect (at most once a second). The
# others (EAGAIN, ENOBUFS: its queue is full) only drop the line.
_RECONNECT_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ENOENT, errno.ENOTCONN,
                               errno.EPIPE, errno.EBADF, errno.ENOTSOCK})


def timestamp(when: float) -> str:
    """RFC 3164's TIMESTAMP in local time, ``Mmm dd hh:mm:ss`` (day padded with a space),
    in English whatever the locale (libc's syslog does the same)."""
    t = time.localtime(when)
    return f"{_MONTHS[t.tm_mon - 1]} {t.tm_mday:2d} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"


def frame(facility: int, level: int, when: float, pid: int, message: str,
          severity: int | None = None) -> bytes:
    """One datagram: ``<PRI>TIMESTAMP poolinetd[PID]: MESSAGE``, at most MAX_LINE bytes.
    ``severity`` (syslog's 0-7) instead of the one ``level`` maps to, when given."""
    pri = facility * 8 + (_SEVERITIES.get(level, 6) if severity is None else severity)
    data = f"<{pri}>{timestamp(when)} poolinetd[{pid}]: {message}".encode("utf-8",
                                                                          "backslashreplace")
    return data[:MAX_LINE]


class SyslogHandler(logging.Handler):
    """A logging handler that sends each record to the syslog socket at ``path``; never
    blocks, never raises. ``dropped``/``sent`` count lines since start."""

    def __init__(self, path: str = DEFAULT_SOCKET, facility: int = FACILITIES["daemon"]) -> None:
        super().__init__()
        self.path = path
        self.facility = facility
        self.sent = 0
        self.dropped = 0
        self._unreported = 0  # drops since the last syslog_dropped warning
        self._reported_at = time.monotonic() - REPORT_INTERVAL
        self._retry_at = 0.0
        self._reporting = False
        self._owner = os.getpid()
        self._inode = 0
        self.sock: socket.socket | None = None
        self._connect()

    def _connect(self) -> None:
        """(Re)connect to the daemon's socket; on failure stay unconnected until the next try."""
        self._retry_at = time.monotonic() + _RECONNECT_INTERVAL
        if self.sock is None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.sock.setblocking(False)
            self._inode = os.fstat(self.sock.fileno()).st_ino
        # Unreachable now: lines count as drops, and sending retries at most once a second.
        with contextlib.suppress(OSError):
            self.sock.connect(self.path)

    def fileno(self) -> int:
        """The socket's fd, for a forked child that keeps logging here (classic mode)."""
        return -1 if self.sock is None else self.sock.fileno()

    def _ours(self) -> bool:
        """In a forked child the fd may have been closed and its number reused (a child
        keeps only the fds it is told to): send only through the very same socket."""
        if self.sock is None:
            return False
        if os.getpid() == self._owner:
            return True
        try:
            return os.fstat(self.sock.fileno()).st_ino == self._inode
        except OSError:
            return False

    def emit(self, record: logging.LogRecord) -> None:
        if self._reporting:  # our own syslog_dropped line: for the other handlers
            return
        if not self._ours():
            return
        assert self.sock is not None
        try:
            message = log.text_body(record)
        except Exception:  # a handler must not raise into the caller
            message = str(record.msg)
        # A line may name its own facility and severity (tcp_wrappers' severity option).
        facility, severity = getattr(record, "syslog_pri", (None, None))
        data = frame(self.facility if facility is None else facility, record.levelno,
                     record.created, record.process or 0, message, severity)
        try:
            self.sock.send(data)
        except OSError as exc:
            self._drop(exc.errno)
            return
        self.sent += 1

    def _drop(self, code: int | None) -> None:
        self.dropped += 1
        self._unreported += 1
        now = time.monotonic()
        if code in _RECONNECT_ERRNOS and now >= self._retry_at and os.getpid() == self._owner:
            self._connect()
        if now - self._reported_at >= REPORT_INTERVAL and os.getpid() == self._owner:
            self._reported_at = now
            count, self._unreported = self._unreported, 0
            self._reporting = True
            try:
                log.warning("syslog_dropped", dropped=count, total=self.dropped,
                            socket=self.path, error=errno.errorcode.get(code or 0, "?"))
            finally:
                self._reporting = False

    def close(self) -> None:
        if self.sock is not None and os.getpid() == self._owner:
            self.sock.close()
        self.sock = None
        super().close()


def install(path: str = DEFAULT_SOCKET, facility: str = "daemon") -> SyslogHandler:
    """Send every line of poolinetd's logger to syslog too (after ``log.setup``); replaces
    a handler installed before. ``facility`` is a name from FACILITIES (the CLI checks)."""
    for old in list(log.LOGGER.handlers):
        if isinstance(old, SyslogHandler):
            log.LOGGER.removeHandler(old)
            old.close()
    handler = SyslogHandler(path, FACILITIES[facility])
    log.LOGGER.addHandler(handler)
    return handler


def _handler() -> SyslogHandler | None:
    for handler in log.LOGGER.handlers:
        if isinstance(handler, SyslogHandler):
            return handler
    return None


def child_fds() -> list[int]:
    """The fds a forked child must keep to go on logging to syslog ([] when not on)."""
    handler = _handler()
    return [handler.fileno()] if handler is not None and handler.fileno() >= 0 else []


def status() -> dict[str, object]:
    """``{"syslog": {...}}`` for ``poolinetd status`` when syslog is on, else ``{}``: the
    socket, lines sent and lines dropped (the daemon did not take them at once)."""
    handler = _handler()
    if handler is None:
        return {}
    return {"syslog": {"socket": handler.path, "sent": handler.sent,
                       "dropped": handler.dropped}}
