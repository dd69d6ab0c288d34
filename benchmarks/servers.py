"""Servers under test: poolinetd (pool, classic) and peer inetds (touches the OS).

Every server is started from a private temporary directory, in the
foreground, in its own session, and stopped (SIGTERM, then SIGKILL after a
grace period) by ``Server.stop``; a server that is not ready within
``READY_TIMEOUT`` seconds raises ``ServerError``.

poolinetd contract (see issue 4): ``python -m poolinetd --mode pool|classic
-c CONF --ready-fd N``; when every listener is open and every pool is ready
it writes one JSON line to fd N with ``{"pid", "mode", "listeners": [...]}``,
listeners in config order. Configs use ``127.0.0.1:0`` so ports are never
guessed.

Peers, each only if installed, configured so their rate limits do not
distort the numbers:

* openbsd-inetd (``/usr/sbin/inetd``, Debian ``openbsd-inetd``): run as
  ``inetd -i -q 1024 -R 100000000 CONF`` (``-i`` foreground, ``-q`` listen
  backlog as large as poolinetd's, ``-R`` per-minute invocation limit out of
  reach), and every entry says ``nowait.100000000`` (the per-service limit).
* xinetd (``xinetd``; Debian's package conflicts with openbsd-inetd, so the
  binary may also be unpacked with ``dpkg -x`` and pointed to with
  ``$XINETD``): ``xinetd -dontfork -filelog LOG -pidfile PID -f CONF`` with
  ``instances = UNLIMITED``, ``per_source = UNLIMITED``, ``cps = 100000000 1``
  and no per-connection logging. Its listen backlog is fixed at 64.

Both peers look their built-in services up by the official service name,
which ties them to the well-known port (echo 7, daytime 13): those scenarios
bind 127.0.0.1:7 and 127.0.0.1:13 and are skipped for the peer if either is
busy. Launched programs use free ports chosen just before start.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson

READY_TIMEOUT = 20.0
PYECHO = Path(__file__).resolve().parent / "tools" / "pyecho.py"  # one-process reference
PYHANDOFF = PYECHO.with_name("pyhandoff.py")
STOP_TIMEOUT = 10.0

# Well-known ports the peers' built-ins are tied to.
WELL_KNOWN = {"echo": 7, "daytime": 13}


class ServerError(RuntimeError):
    """A server under test did not start or did not report itself ready."""


@dataclass(frozen=True)
class Scenario:
    """One service, how each server runs it, and what a client sends and expects.

    ``builtin`` is the internal service name, or None for a launched program
    given by ``argv`` (``argv[0]`` is the path; ``{tmp}`` is replaced by the
    run's temporary directory).
    """

    name: str
    title: str
    builtin: str | None
    argv: tuple[str, ...]
    payload: bytes
    expect: bytes | None
    until_close: bool


@dataclass
class Server:
    """A running server: its process and one port per scenario it serves."""

    mode: str
    proc: subprocess.Popen[bytes]
    ports: dict[str, int]
    pid: int
    log_path: Path
    skipped: dict[str, str] = field(default_factory=dict)

    def stop(self) -> int | None:
        """SIGTERM, wait, SIGKILL the session if needed; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(STOP_TIMEOUT)
        # The server runs in a session of its own that we created; anything
        # still in it (a stuck worker or launched program) is ours to end.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(STOP_TIMEOUT)
        return self.proc.returncode


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (only for peers, which cannot say)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def port_free(port: int) -> bool:
    """Whether 127.0.0.1:port can be bound now."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def wait_listening(ports: list[int], deadline: float) -> bool:
    """Poll /proc/net/tcp until every port is in LISTEN on 127.0.0.1 (no connection made)."""
    want = {f"0100007F:{p:04X}" for p in ports}
    while time.monotonic() < deadline:
        have: set[str] = set()
        with open("/proc/net/tcp") as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                if parts[3] == "0A":  # TCP_LISTEN
                    have.add(parts[1])
        if want <= have:
            return True
        time.sleep(0.05)
    return False


def _argv(s: Scenario, tmp: Path) -> list[str]:
    return [a.replace("{tmp}", str(tmp)) for a in s.argv]


def poolinetd_config(scenarios: list[Scenario], tmp: Path, extra: list[str]) -> str:
    """inetd.conf text for poolinetd, one listener per scenario in the given order."""
    lines = ["# generated by benchmarks/run.py", *extra]
    for s in scenarios:
        if s.builtin is not None:
            lines.append(f"127.0.0.1:0 stream tcp nowait nobody internal {s.builtin}")
        else:
            argv = _argv(s, tmp)
            name = os.path.basename(argv[0])
            lines.append(
                f"127.0.0.1:0 stream tcp nowait nobody {argv[0]} {name} {' '.join(argv[1:])}"
            )
    return "\n".join(line.rstrip() for line in lines) + "\n"


def start_poolinetd(
    mode: str,
    scenarios: list[Scenario],
    tmp: Path,
    cmd: list[str],
    extra: list[str],
    extra_args: list[str] = [],  # noqa: B006 -- never mutated
) -> Server:
    """Start poolinetd in ``mode`` and wait for its ready line; ports in scenario order."""
    return launch_poolinetd(
        mode,
        poolinetd_config(scenarios, tmp, extra),
        [s.name for s in scenarios],
        tmp,
        cmd,
        extra_args,
    )


def launch_poolinetd(
    mode: str,
    conf_text: str,
    names: list[str],
    tmp: Path,
    cmd: list[str],
    extra_args: list[str] = [],  # noqa: B006 -- never mutated
    tag: str = "",
) -> Server:
    """Start poolinetd on ``conf_text`` and map its listeners, in config order, to ``names``.

    The ready line names services by the engine's own rules (``echo:0/tcp``
    for a built-in on a numeric port, ...), which are not ours to rely on:
    the i-th listener reported is the i-th service line of the config.
    """
    stem = f"poolinetd-{mode}{tag}"
    conf = tmp / f"{stem}.conf"
    conf.write_text(conf_text)
    log_path = tmp / f"{stem}.log"
    rfd, wfd = os.pipe()
    try:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [*cmd, "--mode", mode, "-c", str(conf), "--ready-fd", str(wfd), *extra_args],
                pass_fds=(wfd,),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                cwd=tmp,
                env=_repo_env(),
            )
    finally:
        os.close(wfd)
    try:
        line = _read_line(rfd, time.monotonic() + READY_TIMEOUT, proc)
    except ServerError as exc:
        # The temporary directory goes away with the run: quote the log now.
        raise ServerError(f"{exc}; log tail: {_tail(log_path)}") from None
    finally:
        os.close(rfd)
    server = Server(mode, proc, {}, proc.pid, log_path)
    try:
        info = orjson.loads(line)
        listeners = info["listeners"]
        if len(listeners) != len(names):
            raise ServerError(f"{len(listeners)} listeners reported, {len(names)} configured")
        server.ports = {n: int(li["port"]) for n, li in zip(names, listeners, strict=True)}
        server.pid = int(info.get("pid", proc.pid))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, ServerError) as exc:
        server.stop()
        raise ServerError(f"poolinetd {mode}: bad ready line {line!r}: {exc}") from exc
    return server


def _repo_env() -> dict[str, str]:
    """Environment in which ``python -m poolinetd`` finds this checkout's package."""
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH", "")) if p)
    return env


def _tail(path: Path, limit: int = 600) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return text[-limit:].strip() or "(empty log)"


def _read_line(fd: int, deadline: float, proc: subprocess.Popen[bytes]) -> bytes:
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            proc.kill()
            proc.wait()
            raise ServerError(f"not ready within {READY_TIMEOUT:g}s")
        r, _, _ = select.select([fd], [], [], min(left, 0.2))
        if r:
            chunk = os.read(fd, 4096)
            if not chunk:
                proc.wait(STOP_TIMEOUT)
                raise ServerError(f"exited before ready (status {proc.returncode})")
            buf += chunk
    return buf.split(b"\n", 1)[0]


def find_xinetd() -> str | None:
    """Path of an xinetd binary: $XINETD, PATH, /usr/sbin, or an unpacked /opt/xinetd."""
    for cand in (
        os.environ.get("XINETD"),
        shutil.which("xinetd"),
        "/usr/sbin/xinetd",
        "/opt/xinetd/usr/sbin/xinetd",
    ):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def find_openbsd_inetd() -> str | None:
    """Path of openbsd-inetd (Debian installs it as /usr/sbin/inetd), or $OPENBSD_INETD."""
    cand = os.environ.get("OPENBSD_INETD") or "/usr/sbin/inetd"
    return cand if os.access(cand, os.X_OK) else None


def _peer_ports(scenarios: list[Scenario]) -> tuple[dict[str, int], dict[str, str]]:
    ports: dict[str, int] = {}
    skipped: dict[str, str] = {}
    for s in scenarios:
        if s.builtin is None:
            ports[s.name] = free_port()
            continue
        wk = WELL_KNOWN.get(s.builtin)
        if wk is None:
            skipped[s.name] = f"no well-known port for {s.builtin}"
        elif not port_free(wk):
            skipped[s.name] = f"127.0.0.1:{wk} busy"
        else:
            ports[s.name] = wk
    return ports, skipped


def start_openbsd_inetd(binary: str, scenarios: list[Scenario], tmp: Path) -> Server:
    """Start openbsd-inetd in the foreground on the scenarios it can serve."""
    ports, skipped = _peer_ports(scenarios)
    lines = []
    for s in scenarios:
        if s.name not in ports:
            continue
        if s.builtin is not None:
            # Built-ins are found by service name, so name the service.
            lines.append(f"127.0.0.1:{s.builtin} stream tcp nowait.100000000 nobody internal")
        else:
            argv = _argv(s, tmp)
            args = " ".join([os.path.basename(argv[0]), *argv[1:]])
            lines.append(
                f"127.0.0.1:{ports[s.name]} stream tcp nowait.100000000 nobody {argv[0]} {args}"
            )
    conf = tmp / "openbsd-inetd.conf"
    conf.write_text("\n".join(lines) + "\n")
    return _start_peer(
        "openbsd-inetd",
        [binary, "-i", "-q", "1024", "-R", "100000000", str(conf)],
        tmp,
        ports,
        skipped,
    )


def start_xinetd(binary: str, scenarios: list[Scenario], tmp: Path) -> Server:
    """Start xinetd in the foreground on the scenarios it can serve."""
    ports, skipped = _peer_ports(scenarios)
    blocks = [
        "defaults\n{\n    instances = UNLIMITED\n    per_source = UNLIMITED\n"
        "    cps = 100000000 1\n    log_on_success =\n    log_on_failure =\n}\n"
    ]
    for s in scenarios:
        if s.name not in ports:
            continue
        common = (
            "    socket_type = stream\n    protocol = tcp\n    wait = no\n"
            "    user = nobody\n    bind = 127.0.0.1\n"
            # xinetd is built with libwrap: without this every connection runs
            # a hosts_access() check the other servers do not do. (flags is not
            # accepted in the defaults section: it must be per service.)
            "    flags = NOLIBWRAP\n"
        )
        if s.builtin is not None:
            blocks.append(f"service {s.builtin}\n{{\n    type = INTERNAL\n{common}}}\n")
        else:
            argv = _argv(s, tmp)
            server_args = f"    server_args = {' '.join(argv[1:])}\n" if argv[1:] else ""
            blocks.append(
                f"service bench-{s.name}\n{{\n    type = UNLISTED\n{common}"
                f"    port = {ports[s.name]}\n    server = {argv[0]}\n{server_args}}}\n"
            )
    conf = tmp / "xinetd.conf"
    conf.write_text("\n".join(blocks))
    cmd = [
        binary, "-dontfork", "-filelog", str(tmp / "xinetd.log"),
        "-pidfile", str(tmp / "xinetd.pid"), "-f", str(conf),
    ]  # fmt: skip
    return _start_peer("xinetd", cmd, tmp, ports, skipped)


def _start_peer(
    mode: str, cmd: list[str], tmp: Path, ports: dict[str, int], skipped: dict[str, str]
) -> Server:
    log_path = tmp / f"{mode}.out"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            cwd=tmp,
        )
    server = Server(mode, proc, ports, proc.pid, log_path, skipped)
    if not wait_listening(list(ports.values()), time.monotonic() + READY_TIMEOUT):
        server.stop()
        raise ServerError(f"{mode} did not listen on {sorted(ports.values())}: {_tail(log_path)}")
    return server


def python_cmd() -> list[str]:
    """Default command that starts poolinetd from this interpreter."""
    return [sys.executable, "-m", "poolinetd"]


C_REFERENCE = "c-epoll"
TOOLS_DIR = Path(__file__).resolve().parent / "tools"


# Every tool is built warning-free: a warning in a benchmark tool is a bug in it.
CFLAGS = ("-O2", "-Wall", "-Wextra", "-Werror")
# Extra flags per tool (the load generator runs threads).
TOOL_FLAGS = {"loadgen": ("-pthread",)}


def find_cc() -> str | None:
    """The C compiler the tools are built with (``cc``, else ``gcc``), or None."""
    return shutil.which("cc") or shutil.which("gcc")


def build_tool(name: str, tmp: Path) -> str | None:
    """Compile ``tools/NAME.c`` into ``tmp/NAME`` (``cc -O2 -Wall -Wextra -Werror``, mode
    0755, so a service user can run it from the run's temp dir); its path, or None
    without a compiler or when it does not compile (the compiler's message goes to
    stderr). Built once per directory; the binary appears atomically (a temporary
    name, then a rename), so concurrent builders never run a half-written file."""
    cc = find_cc()
    if cc is None:
        return None
    out = tmp / name
    if not out.exists():
        part = tmp / f".{name}.{os.getpid()}.part"
        src = TOOLS_DIR / f"{name}.c"
        cmd = [cc, *CFLAGS, *TOOL_FLAGS.get(name, ()), "-o", str(part), str(src)]
        done = subprocess.run(cmd, capture_output=True, timeout=60, check=False)
        if done.returncode != 0:
            sys.stderr.write(f"building {name}.c failed: {done.stderr.decode(errors='replace')}")
            with contextlib.suppress(OSError):
                part.unlink()
            return None
        part.chmod(0o755)
        os.replace(part, out)
    return str(out)


def build_c_reference(tmp: Path) -> str | None:
    """The C reference server (``tools/cecho.c``) built into ``tmp``, or None."""
    return build_tool("cecho", tmp)


def start_c_reference(binary: str, scenarios: list[Scenario], tmp: Path) -> Server:
    """The reference column: one C epoll process answering echo and daytime in-process.

    Programs are not its business (skipped). It prints its ports on stdout;
    it stops by itself after 600 s in any case.
    """
    names = {s.builtin: s.name for s in scenarios if s.builtin in ("echo", "daytime")}
    skipped = {s.name: "not an in-process reference" for s in scenarios
               if s.builtin not in ("echo", "daytime")}
    log_path = tmp / f"{C_REFERENCE}.out"
    rfd, wfd = os.pipe()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([binary, "0", "0"], stdin=subprocess.DEVNULL, stdout=wfd,
                                stderr=log, start_new_session=True, cwd=tmp)
    os.close(wfd)
    server = Server(C_REFERENCE, proc, {}, proc.pid, log_path, skipped)
    try:
        line = _read_line(rfd, time.monotonic() + READY_TIMEOUT, proc)
        echo_port, day_port = (int(x) for x in line.split())
    except (ServerError, ValueError) as exc:
        server.stop()
        raise ServerError(f"{C_REFERENCE}: {exc}") from None
    finally:
        os.close(rfd)
    if "echo" in names:
        server.ports[names["echo"]] = echo_port
    if "daytime" in names:
        server.ports[names["daytime"]] = day_port
    return server


C_SPAWN = "c-spawn"
C_SPAWN_SCENARIO = "cat"  # the launched program it serves (one per process)


def start_c_spawn(binary: str, scenarios: list[Scenario], tmp: Path) -> Server:
    """tools/cspawn.c: the exec-per-connection bound, one C process that posix_spawns
    the ``cat`` scenario's program per connection (the other scenarios are skipped)."""
    cat = next((s for s in scenarios if s.name == C_SPAWN_SCENARIO), None)
    if cat is None:
        raise ServerError(f"{C_SPAWN} serves only the {C_SPAWN_SCENARIO} scenario")
    server = start_echo_tool(C_SPAWN, [binary, "0", *_argv(cat, tmp)], tmp)
    server.ports = {cat.name: server.ports["echo"]}
    server.skipped = {s.name: "serves the cat scenario only" for s in scenarios
                      if s.name != cat.name}
    return server


def start_pyecho(tmp: Path) -> Server:
    """tools/pyecho.py in a session of its own; its port is the line it prints."""
    return start_echo_tool("pyecho", [sys.executable, str(PYECHO)], tmp)


def start_pyhandoff(tmp: Path) -> Server:
    """tools/pyhandoff.py: poolinetd's shape in the least Python that can do it (two
    processes, SCM_RIGHTS batches, nothing else)."""
    return start_echo_tool("py-handoff", [sys.executable, str(PYHANDOFF)], tmp)


def start_handoff(binary: str, tmp: Path) -> Server:
    """tools/handoff.c (built with ``build_tool``): poolinetd's shape in C, an echo
    served by a second process that gets its connections in SCM_RIGHTS batches."""
    return start_echo_tool("c-handoff", [binary, "0"], tmp)


def start_echo_tool(mode: str, cmd: list[str], tmp: Path) -> Server:
    """An echo server that prints its port on one line, in a session of its own (so
    ``Server.stop`` ends all its processes); serves the ``echo`` scenario."""
    log_path = tmp / f"{mode}.out"
    rfd, wfd = os.pipe()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=wfd, stderr=log,
                                start_new_session=True, cwd=tmp)
    os.close(wfd)
    server = Server(mode, proc, {}, proc.pid, log_path)
    try:
        server.ports["echo"] = int(_read_line(rfd, time.monotonic() + READY_TIMEOUT, proc))
    except ValueError:
        server.stop()
        raise
    finally:
        os.close(rfd)
    return server
