"""A pool worker's side of the Python preloader (``launch/preloader.py``, a program of its
own): start it, pass it connections, read what it reports.

Touches the OS: socketpair, posix_spawn (``spawn.launch``), sendmsg with
SCM_RIGHTS, kill/waitpid of the preloader, and a read of the script's
``#!`` line. The worker calls ``Preloader.start`` after it has dropped
privileges, so the script is read, and the interpreter run, as the service's
user, as an exec would.

fd ownership: a ``Preloader`` owns its end of the channel (closed by
``close`` or when the preloader dies). ``send`` passes a duplicate of a
connection's socket; the caller keeps its own copy until ``Spawned``,
``Refused`` or ``Died`` says what became of it: if the preloader dies first,
the caller still holds the socket and can exec the program on it instead.
The preloader process is this process's child: ``close`` and ``Died`` reap it.
"""

from __future__ import annotations

import array
import contextlib
import enum
import json
import os
import posixpath
import shutil
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

from poolinetd.config.preload import PYTHON_NAME
from poolinetd.config.spec import Service, StderrRoute
from poolinetd.launch import program, spawn

# Given to the interpreter with -c: reads the preloader's source (the channel's first
# message) and runs it. Short, so that ps shows the script after it.
BOOTSTRAP = "import os;exec(compile(os.read(0,1<<20),'<poolinetd preloader>','exec'))"
# Read once, when the master imports this (as root, before any fork): the service's user
# need not be able to read poolinetd's own files (a checkout in root's home).
SOURCE = Path(__file__).with_name("preloader.py").read_bytes()
_MAX_REPORT = 8192  # bytes of one message from the preloader
MAX_CONN_MESSAGE = 1 << 16  # the preloader's MAX_MESSAGE: a larger connection is exec'd
_SHEBANG_MAX = 256  # bytes of the #! line read (Linux reads 256)


class State(enum.Enum):
    """Where a worker's preloader is."""

    BOOTING = "booting"  # started, importing: connections wait for READY
    READY = "ready"  # takes connections
    DOWN = "down"  # died after it was ready: programs are exec'd until it is restarted
    FAILED = "failed"  # the script cannot be preloaded: exec'd for this worker's life


@dataclass(frozen=True, slots=True)
class Ready:
    pid: int
    modules: int  # modules loaded after the preload
    threads: int  # threads the imports started (> 1: fork copies only one)


@dataclass(frozen=True, slots=True)
class Failed:
    file: str
    line: int
    error: str


@dataclass(frozen=True, slots=True)
class Spawned:
    conn_id: int
    pid: int


@dataclass(frozen=True, slots=True)
class Refused:
    conn_id: int
    errno: int
    error: str


@dataclass(frozen=True, slots=True)
class Exited:
    conn_id: int
    pid: int
    status: int
    usec: int


@dataclass(frozen=True, slots=True)
class Died:
    """The channel ended, or said what no preloader says. The caller stops polling it,
    then ``reap``s the preloader."""


@dataclass(frozen=True, slots=True)
class Pong:
    """The answer to ``ping``: the preloader's loop turns."""


Event = Ready | Failed | Spawned | Refused | Exited | Died | Pong


def parse_shebang(first: bytes) -> tuple[str, str, tuple[str, ...]] | str:
    """(interpreter, its argv[0], options) from a script's first bytes, as Linux reads ``#!``;
    else why not. argv[0] is the path, or the name env was given (env execs it so).

    Linux passes everything after the interpreter's path as one argument:
    ``#!/usr/bin/python3 -u`` gives ``-u``; ``#!/usr/bin/env python3`` and
    ``#!/usr/bin/env -S python3 -u`` name the interpreter through env (looked
    up on the launch PATH).
    """
    if not first.startswith(b"#!"):
        return "the script has no #! line naming its interpreter"
    line = first[2:].split(b"\n", 1)[0].strip()
    try:
        text = line.decode()
    except UnicodeDecodeError:
        return "the script's #! line is not text"
    path, _, arg = text.replace("\t", " ").partition(" ")
    arg = arg.strip()
    if posixpath.basename(path) == "env":
        words = arg[2:].split() if arg.startswith("-S") else ([arg] if arg else [])
        if not words:
            return "the script's #! line runs env without a program"
        found = shutil.which(words[0], path=program.BASE_PATH)
        if found is None:
            return f"the script's #! line names {words[0]}, not found on {program.BASE_PATH}"
        path, argv0, options = found, words[0], tuple(words[1:])
    else:
        argv0, options = path, ((arg,) if arg else ())
    if PYTHON_NAME.fullmatch(posixpath.basename(path)) is None:
        return f"the script's #! line names {path}, not a Python interpreter"
    return path, argv0, options


def command(service: Service) -> tuple[str, tuple[str, ...]] | Failed:
    """The interpreter and argv that run the preloader for ``service``; Failed (at the
    script's line 1) when its ``#!`` line names no Python interpreter."""
    pre = service.preload
    assert pre is not None
    if pre.interpreter is not None:
        interpreter, argv0, options = pre.interpreter, service.argv[0], pre.options
    else:
        try:
            with open(pre.script, "rb") as fh:
                first = fh.read(_SHEBANG_MAX)
        except OSError as exc:
            return Failed(pre.script, 0, f"cannot read the script: {exc.strerror}")
        got = parse_shebang(first)
        if isinstance(got, str):
            return Failed(pre.script, 1, got)
        interpreter, argv0, options = got
    return interpreter, (argv0, *options, "-c", BOOTSTRAP, pre.script)


class Preloader:
    """One worker's preloader process and its channel."""

    def __init__(self, service: Service, env: dict[str, str],
                 rlimits: tuple[tuple[int, int], ...]) -> None:
        """``env``: the programs' environment without the connection's variables (the
        preloader runs with it: an exec'd interpreter would read the same); ``rlimits``:
        (resource.RLIMIT_*, value) pairs each child sets as soft and hard limit."""
        self.service = service
        self.env = env
        self.rlimits = rlimits
        self.state = State.BOOTING
        self.chan: socket.socket | None = None
        self.pid = 0

    def fileno(self) -> int:
        assert self.chan is not None
        return self.chan.fileno()

    def start(self) -> Failed | None:
        """Start the preloader (state BOOTING); Failed when it cannot even be started
        (state FAILED)."""
        pre = self.service.preload
        assert pre is not None
        got = command(self.service)
        if isinstance(got, Failed):
            self.state = State.FAILED
            return got
        interpreter, argv = got
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.pid = spawn.launch(interpreter, argv, self.env, theirs.fileno(), stderr_fd=2)
        except OSError as exc:
            mine.close()
            self.state = State.FAILED
            return Failed(pre.script, 1, f"cannot start {interpreter}: {exc.strerror}")
        finally:
            theirs.close()
        config = {"script": pre.script, "argv": list(pre.argv), "modules": list(pre.modules),
                  "stderr_socket": self.service.stderr is StderrRoute.SOCKET,
                  "rlimits": [list(pair) for pair in self.rlimits], "env": self.env}
        try:
            mine.send(SOURCE)
            mine.send(json.dumps(config).encode())
        except OSError as exc:  # it died at once (killed): the next turn reads EOF
            del exc
        mine.setblocking(False)
        self.chan = mine
        self.state = State.BOOTING
        return None

    def send(self, conn_id: int, sock: socket.socket, env: dict[str, str]) -> bool:
        """Pass ``sock`` (a duplicate: the caller keeps its own) with the connection's
        environment; False when the channel cannot take it now (the caller execs)."""
        if self.chan is None or self.state is not State.READY:
            return False
        payload = json.dumps({"id": conn_id, "env": env}).encode()
        if len(payload) > MAX_CONN_MESSAGE:  # the preloader would read it cut short
            return False
        rights = array.array("i", [sock.fileno()])
        try:
            self.chan.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
        except OSError:
            return False
        return True

    def ping(self) -> bool:
        """Ask the preloader to answer (Pong); False if the channel cannot take it."""
        if self.chan is None:
            return False
        try:
            self.chan.send(b"ping")
        except OSError:
            return False
        return True

    def kill(self) -> None:
        """SIGKILL the preloader (it stopped answering): its EOF then comes as Died."""
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def events(self) -> list[Event]:
        """What the preloader said since the last call (Died last, once, when it is gone;
        Failed last: it exits next)."""
        got: list[Event] = []
        for _ in range(256):  # bounded: the worker's other work goes on
            if self.chan is None:
                break
            try:
                data = self.chan.recv(_MAX_REPORT)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            event = _parse(data) if data else None
            if isinstance(event, (Ready, Failed)) and self.state is not State.BOOTING:
                event = None  # said once, at boot: again is a preloader not to be trusted
            if event is None:  # EOF, or a message no preloader sends: it is done
                got.append(Died())
                break
            if isinstance(event, Ready):
                self.state = State.READY
            got.append(event)
            if isinstance(event, Failed):  # it exits next: the caller reaps it
                self.state = State.FAILED
                break
        return got

    def reap(self) -> int:
        """Close the channel (stop polling it first), then kill and collect the preloader;
        its exit code (negative: the signal that ended it). Killed even after an EOF: a
        process can end its channel and live on (a thread an import started keeps it),
        and the wait would then never return; a SIGKILL to a zombie changes nothing."""
        if self.chan is not None:
            self.chan.close()
            self.chan = None
        if self.state is not State.FAILED:
            self.state = State.DOWN
        if not self.pid:
            return 0
        pid, self.pid = self.pid, 0
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            return 0
        return os.waitstatus_to_exitcode(status)

    def close(self) -> None:
        """The worker is done: the preloader goes (its children, if any, run on)."""
        self.reap()


def _parse(data: bytes) -> Event | None:
    """One report; None if it is not one (the worker then drops the preloader)."""
    try:
        msg = json.loads(data)
        kind = msg["t"]
        if kind == "spawned":
            return Spawned(_int(msg["id"]), _int(msg["pid"], *_PID))
        if kind == "exit":
            return Exited(_int(msg["id"]), _int(msg["pid"], *_PID),
                          _int(msg["status"], *_STATUS), _int(msg["usec"], *_USEC))
        if kind == "refused":
            return Refused(_int(msg["id"]), _int(msg.get("errno") or 0, 0, 4095),
                           str(msg.get("error"))[:200])
        if kind == "pong":
            return Pong()
        if kind == "ready":
            return Ready(_int(msg["pid"], *_PID), _int(msg["modules"]), _int(msg["threads"]))
        if kind == "failed":
            return Failed(str(msg["file"])[:500], _int(msg["line"]), str(msg["error"])[:2000])
    except (ValueError, KeyError, TypeError):
        return None
    return None


def _int(value: object, low: int = 0, high: int = 2**62) -> int:
    """An integer report field within [low, high], else ValueError (the report is garbage:
    a value the wire up to the master could not carry must never reach it)."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError("not an integer in range")
    return value


_PID = (2, 2**31 - 1)
_STATUS = (-64, 255)  # wire.EXIT_CODES
_USEC = (0, 2**63 - 1)  # what STATS carries (wire._EXIT: unsigned 64 bits)

