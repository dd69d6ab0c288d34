"""Command line: ``poolinetd [run]``, ``check``, ``status``, ``reload``, ``metrics``, ``upgrade``.

The only module that exits.

Touches the OS: reads files, opens listeners, writes the pidfile, runs the
master. Exit codes follow sysexits: 0 ok, 64 usage, 69 nothing to serve or
master unreachable, 71 a listener could not be opened, 78 bad config.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import pwd
import socket
import sys
from collections.abc import Sequence
from typing import NoReturn

from poolinetd import __version__, check
from poolinetd.builtins import internal
from poolinetd.classic.dispatcher import ForkDispatcher
from poolinetd.config import resolve
from poolinetd.config.spec import Options, Service
from poolinetd.engine import reloadplan
from poolinetd.engine.ledger import Caps
from poolinetd.engine.loop import Engine
from poolinetd.launch import spawn
from poolinetd.observe import log, syslog
from poolinetd.ops import adopt, control, listeners, metricshttp, pidfile, sdnotify, upgrade
from poolinetd.pool.dispatcher import PoolDispatcher

EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_OSERR = 71
EX_CONFIG = 78

DEFAULT_CONF = "/etc/inetd.conf"
DEFAULT_PORTS = {b.name: b.default_port for b in internal.TABLE}


def default_config_text(user: str) -> str:
    """The config served when no ``-c`` is given: every built-in on 127.0.0.1, tcp and udp."""
    lines = ["# poolinetd built-in default: the inetd built-ins on localhost, unprivileged ports"]
    for b in internal.TABLE:
        if b.stream is not None:
            lines.append(f"127.0.0.1:{b.default_port} stream tcp nowait {user} internal {b.name}")
        if b.datagram is not None:
            lines.append(f"127.0.0.1:{b.default_port} dgram  udp wait   {user} internal {b.name}")
    return "\n".join(lines) + "\n"


def default_control_path() -> str:
    if os.geteuid() == 0:
        return "/run/poolinetd.sock"
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/poolinetd-{os.getuid()}"
    os.makedirs(base, mode=0o700, exist_ok=True)
    return os.path.join(base, "poolinetd.sock")


def _add_pool_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("pool defaults (a service's own keys win)")
    group.add_argument("--pool-min", type=int, metavar="N",
                       help="workers kept ready (default 1 for built-ins, 2 for programs)")
    group.add_argument("--pool-max", type=int, metavar="N", help="workers at most (default 16)")
    group.add_argument("--worker-connections", type=int, metavar="N",
                       help="connections per worker at once (default 256 built-in, 64 program)")
    group.add_argument("--max-requests", type=int, metavar="N",
                       help="recycle a worker after N connections (default 0: never)")
    group.add_argument("--idle-timeout", type=float, metavar="SEC",
                       help="seconds a surplus idle worker lives (default 60)")
    group.add_argument("--conn-timeout", type=float, metavar="SEC",
                       help="seconds a built-in connection may stay silent (default 300)")
    caps = parser.add_argument_group("global caps (over the config's defaults; 0 = none)")
    caps.add_argument("--max-connections", type=int, metavar="N",
                      help="connections and programs at once, all services; at the cap "
                           "clients wait in the backlog")
    caps.add_argument("--max-programs", type=int, metavar="N",
                      help="programs running at once, all services")
    wrap = parser.add_argument_group("tcp_wrappers")
    wrap.add_argument("--tcp-wrappers", action="store_true",
                      help="judge every service's clients by /etc/hosts.allow and "
                           "/etc/hosts.deny (a service's tcp_wrappers=no lifts it)")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error exits EX_USAGE (64) like the other sysexits codes."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def _add_run_options(run: argparse.ArgumentParser) -> None:
    """The options of ``run`` (also read by ``run_options`` to rebuild a command line)."""
    run.add_argument("-c", "--conf", metavar="FILE",
                     help="inetd.conf to serve (default: a built-in localhost config)")
    run.add_argument("--mode", choices=("pool", "classic"), default="pool",
                     help="pool: pre-forked workers (default); classic: fork per connection")
    run.add_argument("--pidfile", metavar="FILE",
                     help="write the master's pid here (locked; removed at a clean stop)")
    run.add_argument("--log-format", choices=("text", "json"), default="text",
                     help="one event per line: key=value text (default) or JSON")
    run.add_argument("--log-file", metavar="FILE",
                     help="log here instead of stderr (SIGUSR1 reopens)")
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                     help="the lowest level logged (default info)")
    run.add_argument("--log-connections", action="store_true",
                     help="one info line per connection (service, peer, pid, status, duration)")
    run.add_argument("--syslog", action="store_true",
                     help="also send every line to syslog (/dev/log), tagged poolinetd[PID]; "
                          "never blocks: lines the daemon does not take are dropped, counted")
    run.add_argument("--syslog-facility", choices=tuple(syslog.FACILITIES), default="daemon",
                     metavar="NAME", help="the syslog facility (default daemon; user, auth, "
                                          "authpriv, local0-local7, ...)")
    run.add_argument("--syslog-socket", default=syslog.DEFAULT_SOCKET, metavar="PATH",
                     help="the syslog daemon's datagram socket (default /dev/log)")
    run.add_argument("--ready-fd", type=int, metavar="N",
                     help="when serving, write one JSON line with the bound listeners to fd N")
    run.add_argument("--control", metavar="PATH",
                     help="control socket (default /run/poolinetd.sock as root)")
    run.add_argument("--no-control", action="store_true", help="no control socket")
    run.add_argument("--graceful-timeout", type=float, default=30.0, metavar="SEC",
                     help="SIGTERM: seconds busy workers get to finish (default 30)")
    run.add_argument("--metrics", metavar="ADDR:PORT",
                     help="serve Prometheus metrics at http://ADDR:PORT/metrics")
    run.add_argument("--tcp-wrappers-dir", metavar="DIR", default="/etc",
                     help="read hosts.allow and hosts.deny from DIR (default /etc)")
    _add_pool_options(run)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="poolinetd",
        description="An inetd that serves inetd.conf from pools of pre-forked workers.",
        epilog="Commands: run (default), check, status, reload, metrics, upgrade. "
               "'poolinetd COMMAND -h' for each.")
    parser.add_argument("--version", action="version", version=f"poolinetd {__version__}")
    sub = parser.add_subparsers(dest="command")

    _add_run_options(sub.add_parser("run", help="serve (the default command)"))

    chk = sub.add_parser("check", help="check a config file; exit 78 on any error")
    chk.add_argument("-c", "--conf", metavar="FILE", default=DEFAULT_CONF,
                     help=f"the config to check (default {DEFAULT_CONF})")
    chk.add_argument("--json", action="store_true", help="print the resolved services as JSON")
    _add_pool_options(chk)

    status = sub.add_parser("status", help="show the running master's pools and counters")
    status.add_argument("--json", action="store_true",
                        help="the whole status document as JSON")
    rel = sub.add_parser("reload", help="make the running master re-read its config")
    met = sub.add_parser("metrics", help="print the running master's Prometheus metrics")
    upg = sub.add_parser("upgrade", help="start a new master from the installed poolinetd on "
                                         "the same sockets; the old one drains and exits")
    for client in (status, rel, met, upg):
        client.add_argument("--control", metavar="PATH",
                            help="the master's control socket (default: as run's --control)")
    return parser


def _options(args: argparse.Namespace) -> Options:
    return Options(pool_min=args.pool_min, pool_max=args.pool_max,
                   worker_connections=args.worker_connections, max_requests=args.max_requests,
                   idle_timeout=args.idle_timeout, conn_timeout=args.conn_timeout,
                   max_connections=args.max_connections, max_programs=args.max_programs,
                   tcp_wrappers=True if args.tcp_wrappers else None)


def _raise_fd_limit(from_master: bool) -> None:
    """Soft RLIMIT_NOFILE up to the hard limit, as busy daemons do (inherited by workers);
    programs get the original soft limit back (``spawn.original_nofile``).

    A worker serving hundreds of connections at once must not run out of fds
    while receiving one (the kernel would drop it: MSG_CTRUNC). The original
    is the limit we were started with, except in an upgrade (``from_master``):
    the old master raised its own, we inherit that, and the limit its
    programs got comes in ``upgrade.NOFILE_ENV``. The variable is removed from
    the environment either way, and honoured only from the master that
    started us. Whatever the original, it is recorded for the next upgrade.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    passed_on = upgrade.take_program_nofile(os.environ, hard)
    original = passed_on if from_master and passed_on is not None else soft
    target = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if original != resource.getrlimit(resource.RLIMIT_NOFILE)[0]:
        spawn.original_nofile = original  # programs get the original back
    upgrade.program_nofile = original


def _ensure_stdio() -> None:
    """Open /dev/null on any of fds 0-2 that is closed.

    Otherwise the first socket we open would become fd 0, 1 or 2, and a
    program launched on a connection would get it twice.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def main(argv: Sequence[str] | None = None) -> None:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or args_list[0] not in ("run", "check", "status", "reload", "metrics",
                                             "upgrade", "-h", "--help", "--version"):
        args_list.insert(0, "run")
    args = build_parser().parse_args(args_list)
    if args.command == "check":
        sys.exit(check.run_check(args.conf, args.json, sys.stdout, sys.stderr, _options(args)))
    if args.command in ("status", "reload", "metrics", "upgrade"):
        sys.exit(_client(args))
    sys.exit(_run(args))


# Options of run a new master is not given in an upgrade: it reports ready on a pipe of its
# own (passed as poolinetd-ready), and the old master's --ready-fd is not its to write to.
_NOT_PASSED_ON = frozenset({"ready_fd"})


def run_options() -> list[argparse.Action]:
    """Every option of ``run``, as argparse defined it (from ``_add_run_options``)."""
    parser = argparse.ArgumentParser(add_help=False)
    _add_run_options(parser)
    return list(parser._actions)  # argparse has no public list of a parser's options


def upgrade_command(args: argparse.Namespace) -> list[str]:
    """The poolinetd arguments a new master is started with in an upgrade: ``run`` and
    every option of ``args`` (parsed, paths already absolute) whose value is not the
    default, in one canonical spelling, less ``--ready-fd``.

    Built from what argparse understood, never from the words typed, so every
    spelling argparse accepts (``-cFILE``, ``--conf=FILE``, a prefix such as
    ``--pid``) reaches the new master with the same meaning. Each value goes
    as ``--long-name=VALUE``, so a value that starts with "-" stays a value;
    floats go as ``repr`` so that they parse back to the same number.
    ``parse_args(upgrade_command(args))`` gives ``args`` back, ``ready_fd`` aside.
    """
    out = ["run"]
    for action in run_options():
        if action.dest in _NOT_PASSED_ON or action.default == argparse.SUPPRESS:
            continue
        value = getattr(args, action.dest)
        if value == action.default:
            continue
        name = max(action.option_strings, key=len)  # the long spelling
        if action.nargs == 0:  # a flag (store_true): its presence is its value
            out.append(name)
        else:
            out.append(f"{name}={value!r}" if isinstance(value, float) else f"{name}={value}")
    return out


def _client(args: argparse.Namespace) -> int:
    path = args.control or default_control_path()
    try:
        answer = control.request(path, args.command)
    except OSError as exc:
        print(f"poolinetd: cannot reach the master at {path}: {exc.strerror or exc}",
              file=sys.stderr)
        return EX_UNAVAILABLE
    if args.command == "reload":
        ok = bool(answer.get("ok"))
        print("reloaded" if ok else "reload failed: the master kept its config (see its log)")
        return 0 if ok else EX_CONFIG
    if args.command == "upgrade":
        if answer.get("ok"):
            print("upgrade started: the new master takes over once it is ready (see the log)")
            return 0
        print(f"upgrade refused: {log.worker_text(str(answer.get('error')))}", file=sys.stderr)
        return EX_UNAVAILABLE
    if args.command == "metrics":
        sys.stdout.write(str(answer.get("text", "")))
        return 0
    if args.json:
        import orjson

        sys.stdout.write(orjson.dumps(answer, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(format_status(answer))
    return 0


def format_status(doc: dict[str, object]) -> str:
    """The human table of ``poolinetd status``.

    Every cell goes through ``log.worker_text``: text that came from a worker (a
    BOOT_FAILED reason) or a config (a service name) reaches root's terminal, and
    an escape sequence, BEL or CR in it must show as ``\\xNN``, never act.
    """
    rows = [("SERVICE", "STATE", "LISTEN", "IDLE", "BUSY", "BOOT", "DRAIN", "ACCEPTED",
             "REFUSED", "ACTIVE", "PROGRAMS", "RESTARTS", "LAST ERROR")]
    services = doc.get("services", [])
    assert isinstance(services, list)
    for svc in services:
        workers = svc["workers"]
        rows.append((svc["service"], svc["state"], ",".join(svc["listeners"]) or "-",
                     str(workers["idle"]), str(workers["busy"]), str(workers["booting"]),
                     str(workers["draining"]), str(svc["accepted"]), str(svc["refused"]),
                     str(svc["active"]), str(svc["programs"]), str(svc["restarts"]),
                     svc["last_error"] or "-"))
    cells = [[log.worker_text(cell) for cell in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]) - 1)]
    out = [log.worker_text(f"poolinetd pid {doc.get('pid')} up {doc.get('uptime')}s, "
                           f"reloads {doc.get('reloads')}")]
    for row in cells:
        line = "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False))
        out.append(line + "  " + row[-1])
    return "\n".join(out) + "\n"


def _load(args: argparse.Namespace) -> resolve.LoadedConfig:
    if args.conf:
        return resolve.load_file(args.conf, _options(args))
    user = "nobody" if os.geteuid() == 0 else pwd.getpwuid(os.getuid()).pw_name
    return resolve.load_text(default_config_text(user), "<built-in default>", _options(args))


def _servable(services: Sequence[Service]) -> list[Service]:
    """As a normal user, only our own services can be served; the rest are reported."""
    if os.geteuid() == 0:
        return list(services)
    me = os.getuid()
    kept = []
    for service in services:
        if service.uid == me:
            kept.append(service)
        else:
            log.error("service_skipped", service=service.name,
                      source=f"{service.spec.source}:{service.spec.lineno}",
                      user=service.user_name,
                      reason="poolinetd is not root and cannot switch to that user")
    return kept


def _open_sockets(service: Service, passed: adopt.Passed | None = None) -> list[socket.socket]:
    """Open every endpoint of ``service`` (adopting what was passed); all or nothing.

    Raises ListenError.
    """
    taken = passed.take(service) if passed is not None else {}
    socks: list[socket.socket] = []
    try:
        for i, endpoint in enumerate(service.key.endpoints):
            sock = taken.pop(i, None)
            socks.append(sock if sock is not None else listeners.open_endpoint(service, endpoint))
    except listeners.ListenError:
        for sock in [*socks, *taken.values()]:
            listeners.close_listener(sock)
        raise
    return socks


# The options of run that name a file: made absolute at start (``absolute_paths``).
PATH_OPTIONS = ("conf", "pidfile", "log_file", "control", "tcp_wrappers_dir", "syslog_socket")


def absolute(path: str) -> str:
    """``path`` made absolute against the working directory, naming what it names now.

    "." and empty components go; ".." stays, because after a symlink it is not
    the lexical parent that ``os.path.abspath`` would take. Raises OSError if
    ``path`` is relative and the working directory is gone.
    """
    parts = [part for part in path.split("/") if part not in ("", ".")]
    return os.path.join("/" if path.startswith("/") else os.getcwd(), *parts)


def absolute_paths(args: argparse.Namespace) -> None:
    """Make every path option of ``run`` in ``args`` absolute, in place.

    The master works from / (like inetd), and an upgrade starts the new master
    there: a path is resolved once, here, against the directory poolinetd was
    started in, so the config, the pidfile, the log file (reopened on SIGUSR1)
    and the control socket stay the files the operator named, whenever they
    are used. Empty values (meaning "none" or "the default") are left alone.
    """
    for name in PATH_OPTIONS:
        value = getattr(args, name)
        if value:
            setattr(args, name, absolute(value))


def _run(args: argparse.Namespace) -> int:
    try:
        absolute_paths(args)  # before anything opens a path or changes directory
    except OSError as exc:
        print(f"poolinetd: cannot make the paths absolute: {exc.strerror or exc}",
              file=sys.stderr)
        return EX_USAGE
    _ensure_stdio()
    # What systemd (or the master we take over from) gave us; no worker or program may
    # inherit it, so it leaves the environment here, before anything forks. Read before
    # the log file is opened: an fd of ours in the passed range would be taken for a
    # passed one and closed as unused.
    passed = adopt.Passed.from_env(
        os.environ, reserved=() if args.ready_fd is None else (args.ready_fd,))
    level = {"debug": 10, "info": 20, "warning": 30, "error": 40}[args.log_level]
    log.setup(args.log_format, level, args.log_file)
    if args.syslog:
        syslog.install(args.syslog_socket, args.syslog_facility)
    if passed.problem:
        log.error("listen_failed", error=passed.problem)
        return EX_OSERR
    _raise_fd_limit(bool(passed.from_master))
    # A live pidfile stops a start before anything is bound. In an upgrade the new
    # master takes the pidfile over only once it is ready (a failed one leaves it alone).
    held: list[pidfile.Pidfile] = []
    if args.pidfile and not passed.from_master:
        holder = _take_pidfile(args.pidfile)
        if holder is None:
            passed.close_unused()
            return EX_OSERR
        held.append(holder)
    try:
        return _serve(args, passed, held)
    finally:
        for holder in held:
            holder.release()


def _open_all(args: argparse.Namespace, services: Sequence[Service], passed: adopt.Passed
              ) -> tuple[list[tuple[Service, list[socket.socket]]], socket.socket | None]:
    """Every service's listeners (adopted where passed) and the metrics listener.

    The caller owns what is returned; on error (raised) nothing stays open.
    """
    opened: list[tuple[Service, list[socket.socket]]] = []
    own_metrics = passed.own_fd(adopt.METRICS_NAME)
    try:
        for service in services:
            opened.append((service, _open_sockets(service, passed)))
        if own_metrics is not None:
            return opened, socket.socket(fileno=own_metrics)
        if args.metrics:
            return opened, metricshttp.open_listener(*metricshttp.parse_address(args.metrics))
        return opened, None
    except (listeners.ListenError, OSError, ValueError):
        _close_opened(opened)
        raise


def _close_opened(opened: list[tuple[Service, list[socket.socket]]]) -> None:
    for _, socks in opened:
        for sock in socks:
            listeners.close_listener(sock)


def _serve(args: argparse.Namespace, passed: adopt.Passed, held: list[pidfile.Pidfile]) -> int:
    notifier = sdnotify.Notifier.from_env(os.environ)
    watchdog = sdnotify.watchdog_interval(os.environ)
    sdnotify.forget_environment(os.environ)
    loaded = _load(args)
    reloadplan.log_diagnostics(loaded.diagnostics)
    if loaded.errors:
        log.error("config_invalid", errors=len(loaded.errors), conf=args.conf or "<built-in>")
        return EX_CONFIG
    services = _servable(loaded.services)
    if not services:
        log.error("nothing_to_serve", conf=args.conf or "<built-in>")
        return EX_UNAVAILABLE
    ready_fd = args.ready_fd
    if ready_fd is None:
        ready_fd = passed.own_fd(adopt.READY_NAME)  # an upgrade: the old master waits on it
    own_control = passed.own_fd(adopt.CONTROL_NAME)
    try:
        opened, metrics_sock = _open_all(args, services, passed)
    except (listeners.ListenError, OSError, ValueError) as exc:
        log.error("listen_failed", error=str(exc))
        return EX_OSERR
    passed.close_unused()
    # Like inetd: work from /, so programs start there and no mount point is held busy.
    os.chdir("/")
    title = f"poolinetd: master{' -c ' + args.conf if args.conf else ''}"

    def reload_config() -> reloadplan.NewConfig:
        again = _load(args)
        if again.errors:
            return reloadplan.NewConfig((), again.diagnostics)
        # The global caps follow the file's defaults too: applied with the plan, if it is.
        return reloadplan.NewConfig(tuple(_servable(again.services)), again.diagnostics,
                                    Caps(again.max_connections, again.max_programs))

    def on_ready() -> None:
        if args.pidfile and passed.from_master:  # an upgrade: take the pidfile over now
            holder = _take_pidfile(args.pidfile, replaces=passed.from_master)
            if holder is not None:
                held.append(holder)

    control_path = None if args.no_control else (args.control or default_control_path())
    control_sock = socket.socket(fileno=own_control) if own_control is not None else None
    dispatcher = ForkDispatcher() if args.mode == "classic" else PoolDispatcher()
    try:
        server = Engine(opened, dispatcher, load_config=reload_config,
                        open_sockets=_open_sockets, ready_fd=ready_fd,
                        control_path=control_path, graceful_timeout=args.graceful_timeout,
                        log_connections=args.log_connections,
                        tcp_wrappers_dir=args.tcp_wrappers_dir,
                        title=title + (" (classic)" if args.mode == "classic" else ""),
                        notifier=notifier, watchdog_interval=watchdog,
                        metrics_sock=metrics_sock, control_sock=control_sock,
                        # -P: the new master's imports never come from a working
                        # directory (safe_path); it runs in /.
                        upgrade_argv=[sys.executable, "-P", "-m", "poolinetd",
                                      *upgrade_command(args)],
                        upgrade_cwd="/",
                        caps=Caps(loaded.max_connections, loaded.max_programs),
                        on_ready=on_ready)
    except OSError as exc:
        hint = ("another poolinetd may be running; " if exc.errno == errno.EADDRINUSE else "")
        log.error("control_socket_failed", path=control_path, error=exc.strerror,
                  hint=hint + "use --control PATH or --no-control")
        _close_opened(opened)
        if metrics_sock is not None:
            metrics_sock.close()
        return EX_OSERR
    return server.run()


def _take_pidfile(path: str, replaces: int = 0) -> pidfile.Pidfile | None:
    """Write the pidfile at ``path`` (rules in poolinetd/pidfile.py); None, after one log
    line, when it is live or unusable (the caller exits EX_OSERR)."""
    holder = pidfile.Pidfile(path, replaces)
    try:
        holder.acquire()
    except pidfile.PidfileInUse as exc:
        log.error("pidfile_in_use", path=path, pid=exc.pid, error=str(exc),
                  hint="another poolinetd is running; stop it or use another --pidfile")
        return None
    except pidfile.PidfileError as exc:
        log.error("pidfile_failed", path=path, error=str(exc))
        return None
    return holder
