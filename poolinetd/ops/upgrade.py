"""A binary upgrade: start a new master on the same sockets, hand over once it is ready.

Touches the OS: a pipe, and the new master started through handoff.py (the
socket-activation protocol, so the new master adopts everything through the
same path as under systemd: adopt.py).

    Upgrade.start(argv, sockets, extra_env) -> Upgrade (or OSError)

The old master passes every listener (named ``SERVICE#INDEX``), its control
and metrics sockets and the write end of a pipe (``poolinetd-ready``), on
which the new master writes its ready line once its own pools are ready.
Until then the old master serves as before: both accept from the same
sockets, so nothing is refused. Then the old master stops accepting and
drains (engine/upgrading.py). If the new master exits, closes the pipe without a
line, or is not ready within ``TIMEOUT``, the upgrade has failed: the old
master keeps serving and says why.

The new master also learns the soft RLIMIT_NOFILE that launched programs get
(``NOFILE_ENV``): every master raises its own soft limit, so the one a new
master inherits is the raised one, not the one the first master was started
with; ``take_program_nofile`` reads it back (and removes it) at start.

fd ownership: ``Upgrade`` owns the read end of the pipe (``reader``) until
``close``; the passed sockets stay the old master's (the new master has its
own copies of the same open files).
"""

from __future__ import annotations

import os
import resource
import subprocess
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field

import orjson

from poolinetd.ops import adopt, handoff

TIMEOUT = 60.0  # seconds the new master has to become ready
EXIT_GRACE = 2.0  # after its pipe closes, how long to wait for its exit status
_LINE_MAX = 1 << 20
NOFILE_ENV = "POOLINETD_PROGRAM_NOFILE"

# The soft RLIMIT_NOFILE this master's programs get, recorded by cli at start and handed
# to every new master this one starts (None: not recorded, nothing is passed).
program_nofile: int | None = None


def take_program_nofile(environ: MutableMapping[str, str], hard: int) -> int | None:
    """The programs' soft fd limit the previous master passed in ``environ``, removed from it.

    None when it is absent or not a limit a process whose hard limit is
    ``hard`` (``resource.RLIM_INFINITY``: none) could set: ASCII digits, at
    most ``hard``. Always removes the variable, so that no worker inherits it.
    """
    text = environ.pop(NOFILE_ENV, "")
    if not (text.isascii() and text.isdigit()) or len(text) > 20:
        return None
    value = int(text)
    return value if hard == resource.RLIM_INFINITY or value <= hard else None


@dataclass(slots=True, eq=False)
class Upgrade:
    """One upgrade in progress."""

    proc: subprocess.Popen[bytes]
    reader: int
    deadline: float
    buf: bytes = b""
    eof: bool = field(default=False)  # the pipe closed without a ready line
    failure: str = ""  # why, if it fails at its deadline

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    def start(cls, argv: Sequence[str], sockets: Sequence[tuple[int, str]],
              extra_env: Mapping[str, str], now: float,
              pid_variables: Sequence[str] = ("LISTEN_PID",), cwd: str | None = None
              ) -> Upgrade:
        """Start the new master; raises OSError if it cannot be started."""
        reader, writer = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            env = {**extra_env, adopt.UPGRADE_ENV: str(os.getpid())}
            if program_nofile is not None:
                env[NOFILE_ENV] = str(program_nofile)
            proc = handoff.spawn_with_fds(argv, [(writer, adopt.READY_NAME), *sockets], env,
                                          pid_variables=pid_variables, cwd=cwd)
        except OSError:
            os.close(reader)
            raise
        finally:
            os.close(writer)
        return cls(proc, reader, now + TIMEOUT)

    def read(self) -> dict[str, object] | str | None:
        """Read the pipe: the ready document, a failure reason, or None (nothing decided)."""
        try:
            data = os.read(self.reader, 65536)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            return f"ready pipe: {exc.strerror}"
        if not data:
            self.eof = True
            return "the new master closed its ready pipe without being ready"
        self.buf += data
        if b"\n" not in self.buf:
            return None if len(self.buf) < _LINE_MAX else "the new master's ready line is too long"
        try:
            doc = orjson.loads(self.buf.split(b"\n", 1)[0])
        except orjson.JSONDecodeError:
            return "the new master's ready line is not JSON"
        return doc if isinstance(doc, dict) else "the new master's ready line is not an object"

    def exited(self, code: int) -> None:
        """The engine reaped the new master (Popen must not reap it again)."""
        self.proc.returncode = code

    def close(self) -> None:
        if self.reader >= 0:
            os.close(self.reader)
            self.reader = -1
