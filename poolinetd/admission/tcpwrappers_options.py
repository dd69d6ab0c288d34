"""What a tcp_wrappers verdict asks poolinetd to do besides allow or deny. Pure.

``actions(verdict)`` reads the options a deciding rule carried (already
%-expanded by ``tcpwrappers.decide``, with libwrap's shell-safe character
set) into an ``Actions``:

* ``spawn``: shell commands to run beside the connection, in rule order
  (libwrap runs each at its place in the option list, whatever the verdict);
* ``twist``: the shell command that replaces the service's program for this
  connection (libwrap requires it last, so there is at most one);
* ``env``: ``setenv NAME VALUE`` pairs for the program's environment (NAME
  is the value's first word, VALUE the rest without surrounding blanks, as
  libwrap's setenv_option splits it); a later pair for the same name wins;
* ``severity``: ``[facility.]level`` for the lines logged about the
  connection (``Severity``).

The setenv pairs of one verdict are bounded: more than MAX_SETENV_TEXT bytes
(as ``NAME=VALUE`` texts, after expansion) or a value with a NUL is an
``error``, and the rule then denies, as libwrap's option errors do.

Who runs the commands, as whom, and what the program gets: see
``launch/wrapcmd.py`` and ``engine/wrappers_commands.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from poolinetd.admission import tcpwrappers as tw
from poolinetd.observe import log
from poolinetd.observe.syslog import FACILITIES

_BLANKS: Final = " \t\r\n"
MAX_SETENV_TEXT: Final = 2048  # bytes of NAME=VALUE texts per connection (pool.wire too)
# syslog(3)'s severity numbers by the names libwrap's severity option accepts.
_SYSLOG_LEVELS: Final = {
    "emerg": 0, "panic": 0, "alert": 1, "crit": 2, "err": 3, "error": 3, "warning": 4,
    "warn": 4, "notice": 5, "info": 6, "debug": 7}
# libwrap's facility names poolinetd's syslog table lacks: "security" is auth's old
# name; "mark" is syslog's internal facility (LOG_MARK, 24).
_EXTRA_FACILITIES: Final = {"security": FACILITIES["auth"], "mark": 24}


@dataclass(frozen=True, slots=True)
class Severity:
    """``severity [facility.]level``: ``facility`` (syslog number, None: poolinetd's own
    ``--syslog-facility``) and ``level`` (syslog severity number, 0 emerg .. 7 debug)."""

    facility: int | None
    level: int

    @property
    def log_level(self) -> log.Level:
        """The text/JSON line's level: emerg..err error, warning warning, notice and info
        info, debug debug."""
        if self.level <= 3:
            return log.ERROR
        if self.level == 4:
            return log.WARNING
        return log.INFO if self.level <= 6 else log.DEBUG


@dataclass(frozen=True, slots=True)
class Actions:
    """The non-deciding options of one verdict (see the module docstring)."""

    spawn: tuple[str, ...] = ()
    twist: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    severity: Severity | None = None
    error: str = ""  # "" or why the rule denies (setenv out of bounds)


NONE: Final = Actions()


def parse_severity(value: str) -> Severity | None:
    """``level`` or ``facility.level`` (case ignored), or None if libwrap would refuse it."""
    facility_name, dot, level_name = value.strip(_BLANKS).lower().rpartition(".")
    level = _SYSLOG_LEVELS.get(level_name)
    if level is None:
        return None
    if not dot:
        return Severity(None, level)
    facility = FACILITIES.get(facility_name, _EXTRA_FACILITIES.get(facility_name))
    return None if facility is None else Severity(facility, level)


def actions(verdict: tw.Verdict) -> Actions:
    """The spawn, twist, setenv and severity options of ``verdict``, in rule order."""
    if not verdict.options:
        return NONE
    spawn: list[str] = []
    twist: str | None = None
    env: dict[str, str] = {}
    severity: Severity | None = None
    for opt in verdict.options:
        value = opt.value or ""
        if opt.name == "spawn":
            spawn.append(value)
        elif opt.name == "twist":
            twist = value
        elif opt.name == "setenv":
            name, val = tw.split_setenv(value)
            if not name or "=" in name:  # an expansion made it one setenv(3) refuses
                continue
            env.pop(name, None)  # a later setenv of the same name wins, in its place
            env[name] = val
        elif opt.name == "severity":
            severity = parse_severity(value)
    size = sum(len(f"{name}={val}".encode()) + 1 for name, val in env.items())
    if size > MAX_SETENV_TEXT + 1 or any("\0" in val for val in env.values()):
        return Actions(tuple(spawn), twist, (), severity,
                       f"setenv: more than {MAX_SETENV_TEXT} bytes or a NUL")
    return Actions(tuple(spawn), twist, tuple(env.items()), severity)
