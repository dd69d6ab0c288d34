"""xinetd's banners, passenv and log fields, mapped for one service block.

Pure: the banner files are read through the ``BannerReader`` passed in
(``xinetd_load`` passes ``xinetd_banner.read``) and the environment is a
mapping passed in, so ``xinetd_map`` stays free of I/O. Each function takes
the block's ``Values`` (``xinetd_map._Service``), reads its attributes and
reports every problem there, with the attribute's file and line.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from poolinetd.config.spec import SocketType

__all__ = ["BANNER_MAX", "BannerReader", "Banners", "Values", "banners", "check_log_fields",
           "passenv"]

# A banner is read when the config loads and sent with one non-blocking send: more than a
# fresh socket's first send buffer would be cut anyway.
BANNER_MAX = 16 * 1024
# Reads a banner file: its bytes (at most BANNER_MAX + 1), or why it cannot be read.
BannerReader = Callable[[str], "bytes | str"]

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# The fields of log_on_success/log_on_failure (xinetd.conf(5)) poolinetd's own events
# already carry (conn_* lines, program_exited, conn_refused), and the two it cannot give.
_LOGGED = frozenset({"PID", "HOST", "EXIT", "DURATION", "ATTEMPT", "RECORD"})
_NOT_LOGGED = {
    "USERID": "poolinetd asks no ident server (RFC 1413), so no user id is logged",
    "TRAFFIC": "the master does not see a program's traffic, so no byte counts are logged",
}


class Values(Protocol):
    """What the mapping of one service block offers these functions."""

    def one(self, name: str) -> str | None:
        """The single value of ``name`` (None: not set, or not one value: reported)."""

    def words(self, name: str) -> list[str] | None:
        """Every value of ``name`` (None: not set)."""

    def at(self, name: str, message: str, hint: str = "", *, warning: bool = False) -> None:
        """Report a problem with ``name`` where it was written (errors fail the service)."""


@dataclass(frozen=True, slots=True)
class Banners:
    """The bytes of a service's banner files (None: not set or not sent)."""

    banner: bytes | None = None  # to every client, as soon as it is accepted
    success: bytes | None = None  # to a client about to be served
    fail: bytes | None = None  # to a refused client


def banners(values: Values, socket_type: SocketType, read: BannerReader | None) -> Banners:
    """banner, banner_success and banner_fail of a stream service, read through ``read``
    (None: the attributes are read but nothing is attached). On a datagram service they
    are ignored with a warning: xinetd would write them to the shared listening socket."""
    got: dict[str, bytes | None] = {}
    for name in ("banner", "banner_success", "banner_fail"):
        got[name] = None
        path = values.one(name)
        if path is None or read is None:
            continue
        if socket_type is not SocketType.STREAM:
            values.at(name, f"{name} is not sent on a datagram service",
                      "a datagram service has no connection to write it to", warning=True)
            continue
        data = read(path)
        if isinstance(data, str):
            values.at(name, f"{name} {path}: {data}; nothing is sent",
                      "give a regular file anyone may read (mode o+r), on a path with no "
                      "symbolic link", warning=True)
            continue
        if len(data) > BANNER_MAX:
            values.at(name, f"{name} {path} is cut to {BANNER_MAX} bytes",
                      "one non-blocking send carries it", warning=True)
        got[name] = data[:BANNER_MAX] or None
    return Banners(got["banner"], got["banner_success"], got["banner_fail"])


def passenv(values: Values, environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """The variables ``passenv`` names, with their values in ``environ`` (the master's
    environment when the config loads, as xinetd passes its own); a name ``environ``
    lacks is skipped, as xinetd skips it. ``passenv =`` (no names) passes nothing."""
    found: list[tuple[str, str]] = []
    for name in values.words("passenv") or ():
        if _ENV_NAME.fullmatch(name) is None:
            values.at("passenv", f"passenv: bad variable name {name!r}: ignored",
                      "write passenv = NAME ...", warning=True)
        elif name in environ:
            found.append((name, environ[name]))
    return found


def check_log_fields(values: Values) -> None:
    """log_on_success/log_on_failure: the fields poolinetd logs anyway pass silently; a
    field it cannot log, or does not know, gets a warning naming it."""
    for attr in ("log_on_success", "log_on_failure"):
        for word in values.words(attr) or ():
            if word in _LOGGED:
                continue
            why = _NOT_LOGGED.get(word)
            if why is not None:
                values.at(attr, f"{attr}: {word} is not logged", why, warning=True)
            else:
                values.at(attr, f"{attr}: unknown field {word!r}: ignored",
                          "fields: PID HOST USERID EXIT DURATION TRAFFIC ATTEMPT",
                          warning=True)
