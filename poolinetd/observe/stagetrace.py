"""Benchmark-only stage timestamps per connection, on when POOLINETD_TRACE_STAGES names a file.

Touches the OS (open, write). With the variable unset (always, outside
benchmarks) ``enabled`` is False, nothing is opened, and every call site is
behind ``if stagetrace.enabled:``, so the cost is one global load per stage.

With ``POOLINETD_TRACE_STAGES=FILE`` the master opens FILE at start (append,
created 0600, never following a symlink as the last component) before any
worker is forked; pool workers keep that fd (it is in their keep-list, and
close-on-exec so no launched program inherits it). Every process buffers
lines and appends them in whole-line writes (O_APPEND: concurrent writers do
not interleave inside a write), when the buffer is full and when it exits.

One line per stage of one instance, space separated::

    PID IID STAGE MONOTONIC [KEY=VALUE ...]

``MONOTONIC`` is ``time.monotonic()``, system-wide on Linux, so the
master's and the workers' stamps compare directly (and with a load
generator's ``perf_counter``, the same clock). Stages: ``accepted`` (the
master took it off the listener; ``peer=IP:PORT``), ``handed`` (the sendmsg that
carried it to worker ``to=PID`` returned; ``load=N`` that worker had then,
``batch=N`` connections in that message), ``received`` (the
worker read the CONN; ``batch=N`` messages read in that wakeup so far),
``spawned`` (posix_spawn returned), ``exited`` (the worker reaped the
program), ``finished`` (a built-in closed the connection), ``closed`` (the
master read the DONE). ``benchmarks/stages.py`` reads the file.
"""

from __future__ import annotations

import contextlib
import os
import time

ENV = "POOLINETD_TRACE_STAGES"
_FLUSH_AT = 512  # lines buffered before a write

enabled = False
_fd = -1
_buf: list[str] = []


def open_from_env() -> None:
    """Open the trace file if ``ENV`` names one (the master, once, before forking workers).

    A file that cannot be opened turns tracing off (it is a benchmark aid,
    never a reason not to serve).
    """
    global enabled, _fd
    path = os.environ.get(ENV, "")
    if not path or enabled:
        return
    try:
        _fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                      0o600)
    except OSError:
        return
    enabled = True


def fd() -> int:
    """The trace file's fd for a forked worker's keep-list, or -1 when off."""
    return _fd


def stamp(stage: str, iid: int, when: float | None = None, extra: str = "") -> None:
    """Buffer one record (only call when ``enabled``)."""
    t = time.monotonic() if when is None else when
    _buf.append(f"{os.getpid()} {iid} {stage} {t:.6f} {extra}\n")
    if len(_buf) >= _FLUSH_AT:
        flush()


def forked() -> None:
    """In a freshly forked worker: drop the master's buffered lines (the master writes them)."""
    _buf.clear()


def flush() -> None:
    """Append what is buffered (a no-op when off or empty); never raises."""
    if _fd < 0 or not _buf:
        return
    data = "".join(_buf).encode()
    _buf.clear()
    with contextlib.suppress(OSError):
        os.write(_fd, data)
