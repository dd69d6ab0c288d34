"""Logging: one line per event with stable keys, as text or JSON lines (orjson).

Touches the OS: writes to stderr or a log file. ``event(level, name,
**fields)`` is the only call sites use; never call it from a signal handler.
Keys that are always there: ``event``; usually ``service``, ``pid``,
``peer``, ``status``.
"""

from __future__ import annotations

import enum
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import orjson

LOGGER = logging.getLogger("poolinetd")


def safe_text(value: str) -> str:
    """``value`` as valid UTF-8: lone surrogates (undecodable bytes) become ``\\xNN`` escapes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape" if _only_escapes(value) else
                            "backslashreplace").decode("utf-8", "backslashreplace")
    return value


def _only_escapes(value: str) -> bool:
    """Whether every surrogate in ``value`` came from surrogateescape (U+DC80..U+DCFF)."""
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in value)


def _safe(value: object, depth: int = 0) -> object:
    """A copy of ``value`` that orjson always accepts: every str valid, odd types as text."""
    if isinstance(value, str):
        return safe_text(value)
    if value is None or isinstance(value, bool | float):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else str(value)
    if depth < 32 and isinstance(value, dict):
        return {safe_text(str(k)): _safe(v, depth + 1) for k, v in value.items()}
    if depth < 32 and isinstance(value, list | tuple | set | frozenset):
        return [_safe(v, depth + 1) for v in value]
    return safe_text(str(value))


def json_bytes(doc: object, option: int = 0) -> bytes:
    """orjson.dumps that never raises: a document orjson refuses (lone surrogates, huge ints,
    non-str keys, odd types) is made safe first, escaping what is not valid text."""
    try:
        return orjson.dumps(doc, default=str, option=option)
    except (orjson.JSONEncodeError, TypeError, ValueError):
        return orjson.dumps(_safe(doc), option=option)


def text_body(record: logging.LogRecord) -> str:
    """The text format's line after its ``TIME poolinetd[PID] `` prefix:
    ``LEVEL EVENT key=value ...`` (what syslog gets as its message, too)."""
    fields: dict[str, Any] = getattr(record, "fields", {})
    parts = [f"{record.levelname.lower()} {safe_text(str(record.msg))}"]
    for key, value in fields.items():
        text = safe_text(str(value))
        if not text or any(c in text for c in ' "=\n'):
            text = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
            text = f'"{text}"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        return f"{stamp} poolinetd[{record.process}] {text_body(record)}"


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        doc = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "pid": record.process,
            "event": record.msg,
            **fields,
        }
        return json_bytes(doc).decode()


class _ReopenableHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A file handler whose ``reopen()`` follows logrotate's rename (SIGUSR1)."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(open(path, "a", buffering=1, encoding="utf-8"))  # noqa: SIM115

    def reopen(self) -> None:
        self.adopt(open(self.path, "a", buffering=1, encoding="utf-8"))  # noqa: SIM115

    def adopt(self, stream: TextIO) -> None:
        """Write to ``stream`` from now on and close the old one."""
        self.acquire()
        try:
            old = self.stream
            self.stream = stream
            old.close()
        finally:
            self.release()


def setup(fmt: str = "text", level: int = logging.INFO, path: str | None = None,
          stream: TextIO | None = None) -> None:
    """Configure the poolinetd logger (replacing any previous configuration)."""
    for old in list(LOGGER.handlers):
        LOGGER.removeHandler(old)
        if isinstance(old, _ReopenableHandler):
            old.close()
    handler: logging.Handler = (
        _ReopenableHandler(path) if path else logging.StreamHandler(stream or sys.stderr)
    )
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    LOGGER.addHandler(handler)
    LOGGER.setLevel(level)
    LOGGER.propagate = False


def reopen() -> None:
    """Reopen the log file, if logging to one (SIGUSR1)."""
    for handler in LOGGER.handlers:
        if isinstance(handler, _ReopenableHandler):
            handler.reopen()


def adopt_fd(fd: int) -> None:
    """A worker takes over the master's freshly reopened log file (passed as ``fd``).

    Workers run as service users and usually could not open the log file
    themselves; the master reopens it and hands each worker the new fd. The
    caller's ``fd`` is owned by the log from now on.
    """
    for handler in LOGGER.handlers:
        if isinstance(handler, _ReopenableHandler):
            handler.adopt(open(fd, "a", buffering=1, encoding="utf-8", closefd=True))  # noqa: SIM115
            return
    os.close(fd)


def log_fd() -> int:
    """The fd launched programs get as stderr when ``stderr=log``."""
    for handler in LOGGER.handlers:
        if isinstance(handler, logging.StreamHandler):
            try:
                return int(handler.stream.fileno())
            except (AttributeError, OSError, ValueError):
                break
    return 2


# -- lines that workers send to the master (pool mode) ------------------------------------------

# Handlers a worker inherited from the master by fork and stopped using
# (``forward``). Kept referenced, never closed: fork_child already closed the
# fds under them, and the numbers may since belong to something else, which
# closing (or a garbage-collected file object) would close by mistake.
_inherited: list[logging.Handler] = []


class _Forward(logging.Handler):
    """A worker's handler: every line goes to ``sink(level, name, fields)`` (the upward
    pipe), none to a file. ``sink`` must not log (it would recurse) and must not raise."""

    def __init__(self, sink: Callable[[int, str, dict[str, Any]], None]) -> None:
        super().__init__()
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink(record.levelno, str(record.msg), dict(getattr(record, "fields", {})))


def forward(sink: Callable[[int, str, dict[str, Any]], None]) -> None:
    """In a worker: send every line to ``sink`` instead of writing it (the master writes
    it: see ``reemit``). The level stays the master's. ``log_fd()`` answers 2 from
    now on: the worker's fd 2 is where a stderr=log program's stderr goes."""
    for old in list(LOGGER.handlers):
        LOGGER.removeHandler(old)
        _inherited.append(old)
    LOGGER.addHandler(_Forward(sink))


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def worker_text(value: str) -> str:
    """Text a worker sent, safe to write and to show: valid UTF-8, and every control
    character (escape sequences, BEL, CR, newlines) as a visible ``\\xNN``."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", safe_text(value))


# The JSON formatter's own keys, which a line's fields would override: a worker's
# fields may not (its line would say another event, level or time).
_OWN_KEYS = frozenset({"ts", "level", "event"})


def reemit(level: Level, name: str, pid: int, fields: dict[str, Any]) -> None:
    """Write a line a worker sent as if the worker had written it: the text form's
    bracketed pid and JSON's ``pid`` are the worker's. The caller has checked the
    name, the level and the keys; text values are passed through ``worker_text``;
    fields named like the JSON formatter's own keys (``_OWN_KEYS``) are dropped."""
    if not LOGGER.isEnabledFor(level):
        return
    clean = {key: worker_text(value) if isinstance(value, str) else value
             for key, value in fields.items() if key not in _OWN_KEYS}
    record = LOGGER.makeRecord(LOGGER.name, level, "(worker)", 0, name, (), None,
                               extra={"fields": clean})
    record.process = pid
    LOGGER.handle(record)


class Level(enum.IntEnum):
    """Event severities (the stdlib logging numbers, so handlers and filters agree)."""

    DEBUG = logging.DEBUG
    INFO = logging.INFO
    WARNING = logging.WARNING
    ERROR = logging.ERROR


DEBUG, INFO, WARNING, ERROR = Level.DEBUG, Level.INFO, Level.WARNING, Level.ERROR


def event(level: Level, name: str, **fields: Any) -> None:
    """Log one event line: ``name`` plus ``fields`` in the order given."""
    if LOGGER.isEnabledFor(level):
        LOGGER.log(level, name, extra={"fields": fields})


def event_pri(level: Level, name: str, pri: tuple[int | None, int], **fields: Any) -> None:
    """``event``, with the syslog facility and severity of this one line given: ``pri`` is
    (facility number or None for the handler's own, syslog severity 0-7). Only the
    syslog handler reads them (tcp_wrappers' ``severity`` option); others see ``level``."""
    if LOGGER.isEnabledFor(level):
        LOGGER.log(level, name, extra={"fields": fields, "syslog_pri": pri})


def enabled(level: Level) -> bool:
    return LOGGER.isEnabledFor(level)


def info(name: str, **fields: Any) -> None:
    event(Level.INFO, name, **fields)


def warning(name: str, **fields: Any) -> None:
    event(Level.WARNING, name, **fields)


def error(name: str, **fields: Any) -> None:
    event(Level.ERROR, name, **fields)


def debug(name: str, **fields: Any) -> None:
    event(Level.DEBUG, name, **fields)


__all__ = [
    "DEBUG",
    "ERROR",
    "INFO",
    "WARNING",
    "Level",
    "debug",
    "enabled",
    "error",
    "event",
    "forward",
    "info",
    "json_bytes",
    "log_fd",
    "reemit",
    "reopen",
    "safe_text",
    "setup",
    "text_body",
    "warning",
    "worker_text",
]
