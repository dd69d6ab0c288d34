"""The Python preloader: a program of its own, run by the script's interpreter.

Stdlib only, no poolinetd import, Python 3.8 or later: it runs under the
interpreter the script names (``#!/usr/bin/python3``), which need not be the
one poolinetd runs on (a venv, another version). A pool worker of a
``preload=python`` service starts it (``launch.preload``), already as the
service's user, with

* fd 0 and 1: its end of a SOCK_SEQPACKET socketpair with the worker (the
  control channel), moved to a higher fd at once; 0 and 1 become /dev/null,
  so a module that reads stdin or prints while it is imported touches
  neither the channel nor a client;
* fd 2: where a program's stderr goes when it is not the connection (the
  log for ``stderr=log``, else /dev/null).

The bootstrap (``launch.preload.BOOTSTRAP``, given with ``-c``) reads this
file's source as the channel's first message and runs it. The second
message is the configuration (JSON): the script, its ``sys.argv``, the
extra modules, where a child's stderr goes, its rlimits. The preloader then
compiles the script, imports what the script imports at its top level (and
``preload_modules``), and says ``ready`` — or ``failed`` with the file, line
and error, and exits (the worker then execs the script per connection).

Each ``conn`` message (JSON: id and environment) carries one socket
(SCM_RIGHTS). The preloader forks; the child becomes the program
(``_become_program``: a new session, the socket on fds 0, 1 and 2, no other
fd, the environment, rlimits, Python's own startup signal dispositions,
fresh ``sys.stdin``/``stdout``/``stderr``) and runs the script as
``__main__`` at the top of the stack, after the serving loop has unwound.
The parent closes its copy of the socket and reports ``spawned`` (id, pid),
later ``exit`` (id, status, µs) when it reaps the child, or ``refused`` when
the fork failed; it answers ``ping`` with ``pong`` (the worker's check that
it has not been stopped). Module state is never shared: each child is a copy of the
preloader as it was after the imports.

The preloader exits when the channel ends (the worker stops or is gone);
children still running go on (the master, a subreaper, reaps them).
"""

from __future__ import annotations

import array
import ast
import builtins
import contextlib
import gc
import importlib
import importlib.machinery
import io
import json
import os
import resource
import select
import signal
import socket
import sys
import time
import types
from typing import Any

MAX_MESSAGE = 1 << 16  # a conn message: id and environment (the worker keeps it small)
MAX_SCRIPT = 1 << 24  # bytes of script read
# What Python's own startup gives a fresh interpreter; every other signal is SIG_DFL.
_STARTUP_SIGNALS = {signal.SIGINT: signal.default_int_handler, signal.SIGPIPE: signal.SIG_IGN,
                    signal.SIGXFSZ: signal.SIG_IGN}
# The buffered file objects a script's exit flushes (concrete classes: an ABC check on
# every object would cost more than the flushing).
_BUFFERED = (io.TextIOWrapper, io.BufferedWriter, io.BufferedRandom, io.BufferedRWPair)


class PreloadError(Exception):
    """The script cannot be preloaded: where and why (reported as ``failed``)."""

    def __init__(self, file: str, line: int, error: str) -> None:
        super().__init__(f"{file}:{line}: {error}")
        self.file, self.line, self.error = file, line, error


class Job:
    """What a child runs once the serving loop has unwound: the program's whole setup."""

    def __init__(self, config: dict[str, Any], code: types.CodeType, sock_fd: int,
                 env: dict[str, str]) -> None:
        self.config, self.code, self.sock_fd, self.env = config, code, sock_fd, env


def top_level_imports(tree: ast.Module) -> list[tuple[int, str, tuple[str, ...], bool]]:
    """(line, module, names, guarded) for each absolute import the module runs at its top
    level. ``guarded``: under an ``if``, a ``with``, or in a ``try`` that handles an
    exception, where a failing import is the script's business, not a preload failure
    (the child's own import then fails, or not, as the exec'd script's would)."""
    found: list[tuple[int, str, tuple[str, ...], bool]] = []

    def walk(body: list[ast.stmt], guarded: bool) -> None:
        for stmt in body:
            if isinstance(stmt, ast.Import):
                found.extend((stmt.lineno, a.name, (), guarded) for a in stmt.names)
            elif isinstance(stmt, ast.ImportFrom):
                if stmt.level == 0 and stmt.module:
                    names = tuple(a.name for a in stmt.names if a.name != "*")
                    found.append((stmt.lineno, stmt.module, names, guarded))
            elif isinstance(stmt, ast.If):
                walk(stmt.body, True)
                walk(stmt.orelse, True)
            elif isinstance(stmt, ast.Try) or type(stmt).__name__ == "TryStar":
                handled = bool(getattr(stmt, "handlers", ()))
                walk(getattr(stmt, "body", []), guarded or handled)
                for handler in getattr(stmt, "handlers", ()):
                    walk(handler.body, True)
                walk(getattr(stmt, "orelse", []), guarded)
                walk(getattr(stmt, "finalbody", []), guarded)
            elif isinstance(stmt, (ast.With, ast.AsyncWith)):
                walk(stmt.body, True)  # contextlib.suppress(ImportError), for one

    walk(tree.body, False)
    return found


def preload(config: dict[str, Any]) -> types.CodeType:
    """Compile the script and import what it imports; PreloadError if it cannot be."""
    script = str(config["script"])
    try:
        with open(script, "rb") as fh:
            source = fh.read(MAX_SCRIPT + 1)
    except OSError as exc:
        raise PreloadError(script, 0, f"cannot read the script: {exc.strerror}") from None
    if len(source) > MAX_SCRIPT:
        raise PreloadError(script, 0, f"the script is over {MAX_SCRIPT} bytes")
    try:
        tree = ast.parse(source, script)
        code = compile(tree, script, "exec", dont_inherit=True)
    except SyntaxError as exc:
        raise PreloadError(exc.filename or script, exc.lineno or 0,
                           f"SyntaxError: {exc.msg}") from None
    except (ValueError, RecursionError, MemoryError) as exc:
        raise PreloadError(script, 0, f"{type(exc).__name__}: {exc}") from None
    for module in config.get("modules", ()):
        _import(script, 0, str(module), (), False, "preload_modules: ")
    for line, module, names, guarded in top_level_imports(tree):
        _import(script, line, module, names, guarded, "")
    return code


def _import(script: str, line: int, module: str, names: tuple[str, ...], guarded: bool,
            what: str) -> None:
    """Import ``module`` (and its submodules among ``names``); failures of a guarded
    import are ignored, others are PreloadErrors at the script's line."""
    try:
        got = importlib.import_module(module)
    except BaseException as exc:  # an import runs arbitrary code: SystemExit included
        if guarded and not isinstance(exc, KeyboardInterrupt):
            return
        raise PreloadError(script, line, f"{what}{type(exc).__name__}: {exc}") from None
    for name in names:
        if not hasattr(got, name):  # ``from pkg import submodule``
            with contextlib.suppress(Exception):  # the script's own import says what is wrong
                importlib.import_module(f"{module}.{name}")


def _recv(chan: socket.socket) -> tuple[bytes, list[int]]:
    """One message and the fds it carries (b"" at EOF). Every fd received is ours."""
    fds = array.array("i")
    data, ancdata, _flags, _addr = chan.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(4 * 4))
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[: len(cdata) - (len(cdata) % fds.itemsize)])
    return data, list(fds)


def _send(chan: socket.socket, **fields: Any) -> None:
    chan.send(json.dumps(fields).encode())


def _exit_code(status: int) -> int:
    """os.waitstatus_to_exitcode, which Python 3.8 (a script's interpreter may be) lacks."""
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else 1


class Server:
    """The serving loop: one fork per connection, reaping, reporting."""

    def __init__(self, chan: socket.socket, config: dict[str, Any],
                 code: types.CodeType) -> None:
        self.chan, self.config, self.code = chan, config, code
        self.children: dict[int, tuple[int, float]] = {}  # pid -> (conn id, start)
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda _sig, _frame: None)
        # The dispositions a child must change to look freshly started: the SIGCHLD
        # handler above, and whatever the imports set.
        self.signals: list[tuple[int, Any]] = []
        for signum in signal.valid_signals():
            if signum in (signal.SIGKILL, signal.SIGSTOP):
                continue
            want = _STARTUP_SIGNALS.get(signum, signal.SIG_DFL)
            with contextlib.suppress(OSError, ValueError):
                if signal.getsignal(signum) != want:
                    self.signals.append((signum, want))

    def serve(self) -> Job | None:
        """Serve until the channel ends (None) — or, in a child, return its Job."""
        while True:
            chan = self.chan.fileno()
            ready, _, _ = select.select([chan, self.wake_r], [], [])
            if self.wake_r in ready:
                while True:
                    try:
                        if not os.read(self.wake_r, 512):
                            break
                    except BlockingIOError:
                        break
                self.reap()
            if chan in ready:
                data, fds = _recv(self.chan)
                if not data and not fds:
                    return None
                job = self.on_message(data, fds)
                if job is not None:
                    return job

    def on_message(self, data: bytes, fds: list[int]) -> Job | None:
        if data == b"ping" and not fds:  # the worker checks that this loop still turns
            _send(self.chan, t="pong")
            return None
        try:
            msg = json.loads(data)
            conn_id, env = int(msg["id"]), msg["env"]
            if len(fds) != 1 or not isinstance(env, dict):
                raise ValueError("a conn message carries one socket and an environment")
        except (ValueError, KeyError, TypeError) as exc:
            for fd in fds:
                os.close(fd)
            sys.stderr.write(f"poolinetd preloader: bad message: {exc}\n")
            return None
        started = time.monotonic()
        # The child waits at this gate until the worker has been told it serves the
        # connection: a preloader killed in between must not leave the connection to a
        # child the worker does not know of, which it would serve a second time by exec.
        gate_r, gate_w = os.pipe()
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in (fds[0], gate_r, gate_w):
                os.close(fd)
            _send(self.chan, t="refused", id=conn_id, errno=exc.errno, error=exc.strerror)
            return None
        if pid == 0:
            os.close(gate_w)
            go = os.read(gate_r, 1)
            os.close(gate_r)
            if not go:  # the preloader died before the worker knew: not ours to serve
                os._exit(0)
            return Job(self.config, self.code, fds[0],
                       {str(k): str(v) for k, v in env.items()})
        os.close(gate_r)
        os.close(fds[0])
        self.children[pid] = (conn_id, started)
        try:
            _send(self.chan, t="spawned", id=conn_id, pid=pid)
            os.write(gate_w, b"g")
        finally:
            os.close(gate_w)
        return None

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            got = self.children.pop(pid, None)
            if got is not None:
                usec = int((time.monotonic() - got[1]) * 1_000_000)
                _send(self.chan, t="exit", id=got[0], pid=pid, status=_exit_code(status),
                      usec=usec)

    def close_in_child(self) -> None:
        """Let go of the preloader's fds (closed by ``_become_program``'s closerange: a
        socket object closing its number later could close one the script opened)."""
        signal.set_wakeup_fd(-1)
        self.chan.detach()
        os.close(self.wake_r)
        os.close(self.wake_w)


def _become_program(server: Server, job: Job) -> None:
    """In the child: inetd's contract for a program, then the fresh interpreter's state."""
    for stream in (sys.stdout, sys.stderr):  # what imports printed goes to /dev/null,
        with contextlib.suppress(OSError, ValueError, AttributeError):  # not to the client
            stream.flush()
    os.setsid()
    server.close_in_child()
    fd = job.sock_fd
    os.dup2(fd, 0)
    os.dup2(fd, 1)
    if job.config.get("stderr_socket", True):
        os.dup2(fd, 2)
    # No other fd: the channel, the socket's own number, and whatever an imported
    # module opened (its object must not be used in the child; the worker warned).
    os.closerange(3, max(os.sysconf("SC_OPEN_MAX"), 1024))
    for res, value in job.config.get("rlimits", ()):
        # Checked at load; the worker's own hard limit was raised as root.
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(int(res), (int(value), int(value)))
    want = dict(job.env)
    # What the interpreter's own startup added (LC_CTYPE=C.UTF-8, PEP 538's C locale
    # coercion) it would add for an exec'd program too.
    for key, value in job.config.get("startup_env", {}).items():
        want.setdefault(key, value)
    # Changed, not rebuilt: every write in a forked child copies a page (the preloader
    # started with the programs' environment, so a connection's is a few variables more).
    for key in [key for key in os.environ if key not in want]:
        del os.environ[key]
    for key, value in want.items():
        if os.environ.get(key) != value:
            os.environ[key] = value
    for signum, handler in server.signals:
        signal.signal(signum, handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    sys.stdin = sys.__stdin__ = _stdio(0, "<stdin>", False, sys.stdin)  # type: ignore[misc]
    sys.stdout = sys.__stdout__ = _stdio(1, "<stdout>", True, sys.stdout)  # type: ignore[misc]
    sys.stderr = sys.__stderr__ = _stdio(2, "<stderr>", True, sys.stderr)  # type: ignore[misc]
    sys.argv = [str(a) for a in job.config["argv"]]
    orig = getattr(sys, "orig_argv", None)  # 3.10+: as the exec'd interpreter's would read
    if isinstance(orig, list) and "-c" in orig:
        sys.orig_argv = [*orig[: orig.index("-c")], *sys.argv]


def _stdio(fd: int, name: str, writing: bool, like: Any) -> io.TextIOWrapper:
    """A standard stream on ``fd`` as Python's startup builds it (encoding and errors as
    the preloader got them, from the same environment)."""
    raw = io.FileIO(fd, "wb" if writing else "rb", closefd=False)
    raw.name = name
    # python -u: the preloader's own streams write through; the child's do too.
    unbuffered = writing and bool(getattr(like, "write_through", False))
    buf: Any = raw if unbuffered else (io.BufferedWriter(raw) if writing
                                       else io.BufferedReader(raw))
    text = io.TextIOWrapper(buf, encoding=getattr(like, "encoding", None) or "utf-8",
                            errors=getattr(like, "errors", None) or "strict", newline="\n",
                            line_buffering=fd == 2 and not unbuffered,
                            write_through=unbuffered)
    text.mode = "w" if writing else "r"  # type: ignore[misc]
    return text


def run_script(job: Job) -> None:
    """Run the script as ``__main__``, as ``python3 SCRIPT`` would, then exit as it would.

    Never returns. The exit is Python's, without tearing down the modules the
    child shares with the preloader (that would write to, and so copy, most of
    its memory: some 10 ms a connection): non-daemon threads are joined,
    atexit handlers run, every file object the script left open is flushed,
    the standard streams last (a failing flush exits 120, as Python does).
    """
    script = str(job.config["script"])
    main = types.ModuleType("__main__")
    main.__file__ = script
    main.__builtins__ = builtins  # type: ignore[attr-defined]
    main.__cached__ = None  # type: ignore[attr-defined]
    main.__loader__ = importlib.machinery.SourceFileLoader("__main__", script)
    sys.modules["__main__"] = main
    interrupted = False
    try:
        exec(job.code, main.__dict__)
        code = 0
    except SystemExit as exc:
        code = _exit_status(exc)
    except BaseException:
        etype, exc_value, tb = sys.exc_info()
        # The traceback starts at the script, as an exec'd interpreter prints it.
        tb = tb.tb_next if tb is not None else None
        if exc_value is not None:
            exc_value.__traceback__ = tb
        sys.excepthook(etype, exc_value, tb)  # type: ignore[arg-type]
        interrupted = isinstance(exc_value, KeyboardInterrupt)
        code = 1
    os._exit(_finish(code, interrupted))


def _exit_status(exc: SystemExit) -> int:
    """sys.exit's argument as Python's exit turns it into a status."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    with contextlib.suppress(Exception):
        sys.stderr.write(f"{exc.code}\n")
    return 1


def _finish(code: int, interrupted: bool) -> int:
    """Python's shutdown, as far as a program can see it; the exit status."""
    threading = sys.modules.get("threading")
    if threading is not None:
        with contextlib.suppress(BaseException):
            threading._shutdown()
    import atexit

    atexit._run_exitfuncs()
    # The preloader's own objects were frozen before the fork (gc.freeze): what the GC
    # lists now is what the script made.
    for obj in gc.get_objects():
        if (isinstance(obj, _BUFFERED) and obj is not sys.stdout and obj is not sys.stderr
                and not obj.closed):
            with contextlib.suppress(BaseException):
                obj.flush()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None and not stream.closed:
                stream.flush()
        except BaseException as exc:  # Python reports any, and exits 120
            with contextlib.suppress(BaseException):
                os.write(2, f"Exception ignored in: {stream!r}\n"
                            f"{type(exc).__name__}: {exc}\n".encode())
            code = 120
    if interrupted:  # Python 3.8+: an uncaught KeyboardInterrupt ends by SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    return code


def _limit_forks(config: dict[str, Any]) -> None:
    """The service's rlimit_nproc as this process's soft limit: a fork past it fails
    with EAGAIN (``refused``, logged as exec_failed), as a spawn past it does."""
    for res, value in config.get("rlimits", ()):
        if int(res) == resource.RLIMIT_NPROC:
            hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
            with contextlib.suppress(OSError, ValueError):
                resource.setrlimit(resource.RLIMIT_NPROC, (int(value), hard))


def main() -> None:
    """The preloader's life: setup, preload, serve; a child leaves the loop to run."""
    chan_fd = os.dup(0)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    chan = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, chan_fd)
    data, fds = _recv(chan)
    for fd in fds:
        os.close(fd)
    config = json.loads(data) if data else None
    if not isinstance(config, dict):
        return
    sys.argv = [str(a) for a in config["argv"]]
    given = config.get("env", {})
    config["startup_env"] = {k: v for k, v in os.environ.items() if k not in given}
    if sys.path and sys.path[0] == "":  # -c put the cwd first; a script run puts its dir
        sys.path[0] = os.path.dirname(str(config["script"]))
    try:
        code = preload(config)
    except PreloadError as exc:
        _send(chan, t="failed", file=exc.file, line=exc.line, error=exc.error[:2000])
        return
    threads = sys.modules["threading"].active_count() if "threading" in sys.modules else 1
    # What exists now is shared with every child: the collector leaves it alone (so a
    # child does not copy the pages it would touch), and a child's exit tells what the
    # script made from what it found.
    gc.collect()
    gc.freeze()
    _send(chan, t="ready", pid=os.getpid(), modules=len(sys.modules), threads=threads)
    _limit_forks(config)
    server = Server(chan, config, code)
    job = server.serve()
    if job is None:
        return
    _become_program(server, job)
    del server, chan, data, config
    run_script(job)


if __name__ == "__main__":
    main()
