"""Attacks on what a master is started with: the upgrade's command line and fd limit, and
relative paths after the chdir to / (issue 21, findings 11, 12 and 13).

A master started from a working directory with relative paths, glued short options
(``-cFILE``) or argparse prefixes (``--pid``, ``--log-fi``, ``--ready``) must serve the same
config, write the same pidfile and log to the same file after the chdir to / and after an
upgrade; and an upgrade must not change the file limit programs get.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TEST_USER, tcp_exchange, wait_until
from test_cli import run_master

from poolinetd import cli
from poolinetd.ops import control, upgrade

U = TEST_USER


# ---------------------------------------------------------------- the command line (in-process)

def _parse(argv: list[str]) -> argparse.Namespace:
    return cli.build_parser().parse_args(["run", *argv])


def test_upgrade_command_comes_from_the_parsed_options(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    spellings = [  # each a way argparse accepts to say the same thing
        ["-cinetd.conf", "--pid", "run.pid", "--log-fi", "p.log", "--contr", "c.sock",
         "--ready", "9"],
        ["-c", "inetd.conf", "--pidfile=run.pid", "--log-file", "p.log", "--control=c.sock",
         "--ready-fd=9"],
        ["--conf=./inetd.conf", "--pidf", "./run.pid", "--log-file=p.log", "--control", "c.sock"],
    ]
    commands = []
    for argv in spellings:
        args = _parse(argv)
        cli.absolute_paths(args)
        command = cli.upgrade_command(args)
        commands.append(command)
        again = _parse(command[1:])
        assert command[0] == "run"
        assert again.conf == str(tmp_path / "inetd.conf")
        assert again.pidfile == str(tmp_path / "run.pid")
        assert again.log_file == str(tmp_path / "p.log")
        assert again.control == str(tmp_path / "c.sock")
        assert again.ready_fd is None  # the new master reports ready on its own pipe
        assert not any(a.startswith("--ready") for a in command)
    assert commands[0] == commands[1] == commands[2]


def test_every_run_option_survives_the_round_trip(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Every option of ``run`` (a new one too) reaches the new master with its value."""
    monkeypatch.chdir(tmp_path)
    argv = ["-c", "a b.conf", "--mode", "classic", "--pidfile=-odd.pid",
            "--log-format", "json", "--log-file", "l.log", "--log-level", "debug",
            "--log-connections", "--control", "/abs/c.sock", "--graceful-timeout", "0.1",
            "--metrics", "127.0.0.1:0", "--pool-min", "2", "--pool-max", "7",
            "--worker-connections", "3", "--max-requests", "11", "--idle-timeout", "1e-3",
            "--conn-timeout", "2.5", "--max-connections", "0", "--max-programs", "5",
            "--syslog", "--syslog-facility", "local3", "--syslog-socket", "s.sock",
            "--tcp-wrappers", "--tcp-wrappers-dir", "wrap"]
    args = _parse(argv)
    cli.absolute_paths(args)
    again = _parse(cli.upgrade_command(args)[1:])
    assert vars(again) == vars(args)
    given = {a.dest for a in cli.run_options() if a.default != argparse.SUPPRESS}
    differs = {name for name in given if getattr(args, name) != _parse([]).__dict__[name]}
    # Every option but --ready-fd and --no-control (exclusive with --control) was given.
    assert given - differs == {"ready_fd", "no_control"}
    args = _parse(["--no-control"])
    assert cli.upgrade_command(args) == ["run", "--no-control"]
    assert cli.upgrade_command(_parse([])) == ["run"]


def test_the_programs_fd_limit_passed_on_is_checked_and_always_removed() -> None:
    import resource

    environ = {upgrade.NOFILE_ENV: "1024", "HOME": "/root"}
    assert upgrade.take_program_nofile(environ, 4096) == 1024
    assert environ == {"HOME": "/root"}
    for bad in ("", "-1", "1e3", "\u0663", "5000", "9" * 30):
        environ = {upgrade.NOFILE_ENV: bad}
        assert upgrade.take_program_nofile(environ, 4096) is None, bad
        assert environ == {}
    assert upgrade.take_program_nofile({upgrade.NOFILE_ENV: "5000"},
                                       resource.RLIM_INFINITY) == 5000


# ---------------------------------------------------------------- real masters

def _start(cwd: Path, argv: list[str], prefix: tuple[str, ...] = (), ready: str = "--ready-fd"
           ) -> tuple[subprocess.Popen[bytes], dict[str, object]]:
    """Start poolinetd in ``cwd`` (relative paths resolve there); its ready document."""
    proc, info, _ = run_master(["run", *argv], cwd, prefix, cwd=cwd, ready=ready)
    return proc, info


def _port(info: dict[str, object]) -> int:
    listeners = info["listeners"]
    assert isinstance(listeners, list)
    return int(listeners[0]["port"])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def _new_master(log: Path) -> int:
    """The new master's pid once the old one logged upgrade_ready; -1 if it failed."""
    text = log.read_text(errors="replace") if log.exists() else ""
    for line in text.splitlines():
        if "upgrade_ready" in line:
            return int(line.split("new_pid=")[1].split()[0])
    return -1 if "upgrade_failed" in text else 0


@pytest.fixture
def unique() -> Iterator[str]:
    """A name no other test uses; whatever a master makes of it at / is removed afterwards
    (the bug under test puts relative paths there)."""
    name = f"poolinetd-attack-{os.getpid()}-{time.monotonic_ns()}"
    yield name
    for suffix in (".conf", ".pid", ".log", ".sock"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"/{name}{suffix}")


def _stop(pid: int) -> None:
    if pid > 0 and _alive(pid):
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not _alive(pid), 30, f"pid {pid} to stop")


@pytest.mark.process
def test_upgrade_keeps_config_pidfile_and_log_spelled_relative_glued_or_abbreviated(
        tmp_path: Path, unique: str) -> None:
    (tmp_path / f"{unique}.conf").write_text(f"127.0.0.1:0 stream tcp nowait {U} internal echo\n")
    pid_path, log_path = tmp_path / f"{unique}.pid", tmp_path / f"{unique}.log"
    ctl = tmp_path / f"{unique}.sock"
    proc, info = _start(tmp_path, [f"-c{unique}.conf", "--pid", f"{unique}.pid",
                                   "--log-fi", f"{unique}.log", "--contr", str(ctl),
                                   "--graceful-timeout", "5"], ready="--ready")
    port, new_pid = _port(info), 0
    try:
        assert tcp_exchange(port, b"before") == b"before"
        assert control.request(str(ctl), "upgrade") == {"ok": True}
        new_pid = int(wait_until(lambda: _new_master(log_path), 60, "the upgrade's outcome"))
        assert new_pid > 0, log_path.read_text()
        assert proc.wait(30) == 0
        title = Path(f"/proc/{new_pid}/cmdline").read_bytes().decode()
        assert title.startswith(f"poolinetd: master -c {tmp_path}/{unique}.conf")
        assert tcp_exchange(port, b"after") == b"after"  # echo still: the same config
        assert pid_path.read_text().strip() == str(new_pid)
        doc = control.request(str(ctl), "status")
        assert doc["pid"] == new_pid
        os.kill(new_pid, signal.SIGUSR1)  # the new master logs to the same file
        wait_until(lambda: f"poolinetd[{new_pid}] info log_reopened" in log_path.read_text(),
                   20, "the new master's line in the same log")
    finally:
        _stop(proc.pid)
        _stop(new_pid)
    assert not pid_path.exists()
    assert not any(os.path.lexists(f"/{unique}{s}") for s in (".conf", ".pid", ".log", ".sock"))


@pytest.mark.process
def test_upgrade_keeps_the_fd_limit_programs_were_given(tmp_path: Path, unique: str) -> None:
    hard = int(subprocess.run(["sh", "-c", "ulimit -Hn"], capture_output=True, text=True,
                              timeout=10).stdout)
    if hard <= 512:
        pytest.skip("hard fd limit too low to tell a raised soft limit apart")
    conf = tmp_path / "limits.conf"
    conf.write_text(f"127.0.0.1:0 stream tcp nowait {U} /bin/sh sh -c 'ulimit -n'\n")
    log_path = tmp_path / "p.log"
    proc, info = _start(tmp_path, ["-c", str(conf), "--control", str(tmp_path / "c.sock"),
                                   "--log-file", str(log_path)], ("prlimit", "--nofile=512:"))
    port, new_pid = _port(info), 0
    try:
        assert tcp_exchange(port) == b"512\n"
        proc.send_signal(signal.SIGUSR2)
        new_pid = int(wait_until(lambda: _new_master(log_path), 60, "the upgrade's outcome"))
        assert new_pid > 0, log_path.read_text()
        assert proc.wait(30) == 0
        limits = Path(f"/proc/{new_pid}/limits").read_text()
        assert int(limits.split("Max open files")[1].split()[0]) == hard  # raised for itself
        assert tcp_exchange(port) == b"512\n"  # and 512 again for its programs
        os.kill(new_pid, signal.SIGUSR2)  # a second upgrade keeps it too
        wait_until(lambda: log_path.read_text().count("upgrade_ready") == 2
                   or "upgrade_failed" in log_path.read_text(), 60, "the second upgrade")
        assert "upgrade_failed" not in log_path.read_text()
        newer = int(log_path.read_text().split("upgrade_ready new_pid=")[2].split()[0])
        wait_until(lambda: not _alive(new_pid), 30, "the first new master to exit")
        new_pid = newer
        assert tcp_exchange(port) == b"512\n"
    finally:
        _stop(proc.pid)
        _stop(new_pid)


@pytest.mark.process
@pytest.mark.parametrize("mode", ["pool", "classic"])
def test_relative_paths_stay_where_they_were_after_the_chdir(tmp_path: Path, unique: str,
                                                             mode: str) -> None:
    (tmp_path / "inetd.conf").write_text(f"127.0.0.1:0 stream tcp nowait {U} internal echo\n")
    pid_path, log_path = tmp_path / f"{unique}.pid", tmp_path / f"{unique}.log"
    proc, info = _start(tmp_path, ["-c", "inetd.conf", "--mode", mode,
                                   "--pidfile", f"{unique}.pid", "--log-file", f"{unique}.log",
                                   "--control", f"{unique}.sock"])
    try:
        assert pid_path.read_text().strip() == str(proc.pid)
        assert (tmp_path / f"{unique}.sock").is_socket()
        assert control.request(str(tmp_path / f"{unique}.sock"), "status")["pid"] == proc.pid
        os.rename(log_path, tmp_path / "rotated.log")
        proc.send_signal(signal.SIGUSR1)
        wait_until(lambda: log_path.exists() or os.path.lexists(f"/{unique}.log"), 20,
                   "the reopened log")
        wait_until(lambda: "log_reopened" in log_path.read_text(), 20, "log_reopened")
        assert tcp_exchange(_port(info), b"x") == b"x"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert not pid_path.exists()  # removed at a clean stop, although the master ran in /
    assert not (tmp_path / f"{unique}.sock").exists()
    assert not any(os.path.lexists(f"/{unique}{s}") for s in (".pid", ".log", ".sock"))
