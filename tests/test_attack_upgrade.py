"""Attacks on what a master is started with: relative paths after the chdir to /
(issue 21, finding 13).

A master started from a working directory with relative paths, glued short options
(``-cFILE``) or argparse prefixes (``--pid``, ``--log-fi``, ``--ready``) must serve the same
config, write the same pidfile and log to the same file after the chdir to / and after an
upgrade; and an upgrade must not change the file limit programs get.
"""

from __future__ import annotations

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

from poolinetd.ops import control

U = TEST_USER


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
