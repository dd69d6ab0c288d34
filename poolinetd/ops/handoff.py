"""Hand listening sockets to a new master process with the socket-activation protocol. OS code.

An upgrade starts the new master as a child of the old one and passes every
listener the way systemd does (``activation.listen_fds`` reads them), so the
new master has one adoption path for both.

The protocol wants the fds at 3, 4, ... and ``LISTEN_PID`` equal to the
*child's* pid, which the parent cannot know before it forks. systemd writes
the variable in the child between fork and exec. From Python that would need
``preexec_fn`` (Python code in a forked copy of the master: unsafe with locks,
and it disables vfork), and ``subprocess`` cannot move fds to chosen numbers
either. Choices considered:

- ``sh -c 'LISTEN_PID=$$ exec "$@"'``: sets the pid correctly (exec keeps it),
  but dash can only redirect fds 0-9, so it cannot move 20 listeners to 3..22.
- A different variable (``POOLINETD_LISTEN_PARENT=<old pid>``, checked against
  ``getppid()``): a second protocol, and it breaks if the parent dies early.
- **Chosen**: a tiny Python trampoline run as ``python -I -S -c TRAMPOLINE``.
  ``subprocess`` (vfork + exec, no Python in the forked master) passes the
  parent's temporary duplicates, which sit above the target range; the
  trampoline, already in a fresh process, dup2s them onto 3.., closes the
  duplicates, sets ``LISTEN_PID`` (and any other pid variable asked for,
  e.g. ``WATCHDOG_PID``) to its own pid and execs the real command. Exec keeps
  the pid, so ``Popen.pid`` is the new master's pid and ``LISTEN_PID`` matches
  it. The cost is one interpreter start with no site (about 12 ms), once per upgrade.

Ownership: ``spawn_with_fds`` never closes or changes the caller's fds; they
stay open (and keep working) in the old master. Both masters then share each
socket's open file description: neither may change its O_NONBLOCK flag or
shut it down (that would act on the other's too), and the old master must not
unlink a unix socket path it handed over.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import IO

from poolinetd.ops.activation import ENVIRONMENT, LISTEN_FDS_START

# Runs in the child: argv = [-c, source fds, pid variable names, command...]. Kept tiny and
# stdlib-only (-I -S: no site, no PYTHON* variables for this interpreter; the exec'd command
# still gets the environment unchanged).
TRAMPOLINE = """\
import os, sys
fds = [int(x) for x in sys.argv[1].split(",") if x]
for i, fd in enumerate(fds):
    os.dup2(fd, 3 + i)
for fd in fds:
    if fd >= 3 + len(fds):
        os.close(fd)
pid = str(os.getpid())
for name in sys.argv[2].split(","):
    if name:
        os.environ[name] = pid
try:
    os.execvp(sys.argv[3], sys.argv[3:])
except OSError as err:
    sys.stderr.write("poolinetd handoff: cannot run %s: %s\\n" % (sys.argv[3], err.strerror))
    os._exit(127)
"""

MAX_NAME = 255  # systemd's limit for one LISTEN_FDNAMES entry


def clean_name(name: str) -> str:
    """``name`` usable in LISTEN_FDNAMES: printable ASCII without ':' (the separator)."""
    cleaned = "".join(c if c.isascii() and c.isprintable() and c != ":" else "_" for c in name)
    return cleaned[:MAX_NAME] or "unknown"


def listen_environment(names: Sequence[str]) -> dict[str, str]:
    """LISTEN_FDS and LISTEN_FDNAMES for sockets named ``names`` (LISTEN_PID is the child's)."""
    return {"LISTEN_FDS": str(len(names)),
            "LISTEN_FDNAMES": ":".join(clean_name(name) for name in names)}


def trampoline_argv(source_fds: Sequence[int], argv: Sequence[str],
                    pid_variables: Sequence[str] = ("LISTEN_PID",)) -> list[str]:
    """The command that moves ``source_fds`` onto 3.., sets ``pid_variables``, then runs ``argv``.

    Every source fd must be >= 3 + len(source_fds), so that no dup2 overwrites
    a source that is still to be moved (``spawn_with_fds`` arranges that).
    """
    low = LISTEN_FDS_START + len(source_fds)
    if any(fd < low for fd in source_fds):
        raise ValueError(f"source fds must be >= {low}: {list(source_fds)}")
    return [sys.executable, "-I", "-S", "-c", TRAMPOLINE, ",".join(map(str, source_fds)),
            ",".join(pid_variables), *argv]


def spawn_with_fds(argv: Sequence[str], fds_with_names: Sequence[tuple[int, str]],
                   extra_env: Mapping[str, str] | None = None, *,
                   pid_variables: Sequence[str] = ("LISTEN_PID",),
                   cwd: str | None = None, stdout: int | IO[bytes] | None = None,
                   stderr: int | IO[bytes] | None = None) -> subprocess.Popen[bytes]:
    """Start ``argv`` with ``fds_with_names`` on fds 3.. per the socket-activation protocol.

    The child's environment is ours without any LISTEN_* variable, plus
    ``extra_env`` (e.g. NOTIFY_SOCKET and WATCHDOG_USEC to hand systemd's ear
    on; add ``"WATCHDOG_PID"`` to ``pid_variables`` then), plus LISTEN_FDS,
    LISTEN_FDNAMES and, set by the trampoline, LISTEN_PID = the child's pid.
    The child inherits stdin, stdout and stderr (unless ``stdout``/``stderr``
    redirect them, as for ``Popen``) and no other fd. Raises OSError
    if the process cannot be started (the caller keeps serving and says why);
    a command that cannot be executed exits 127 after a line on stderr.

    The caller reaps the child. The returned Popen is for its pid and stdio;
    an engine that reaps with ``waitpid(-1)`` should not call ``poll``/``wait``.
    """
    count = len(fds_with_names)
    low = LISTEN_FDS_START + count
    duplicates: list[int] = []
    try:
        for fd, _name in fds_with_names:
            # Above the target range, close-on-exec here; pass_fds makes them inheritable
            # in the child only.
            duplicates.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, low))
        env = {k: v for k, v in os.environ.items() if k not in ENVIRONMENT}
        env.update(extra_env or {})
        for name in ENVIRONMENT:
            env.pop(name, None)
        env.update(listen_environment([name for _fd, name in fds_with_names]))
        return subprocess.Popen(trampoline_argv(duplicates, argv, pid_variables),
                                env=env, pass_fds=tuple(duplicates), close_fds=True, cwd=cwd,
                                stdout=stdout, stderr=stderr)
    finally:
        for fd in duplicates:
            os.close(fd)
