"""The command line as a new user meets it: the default config, a non-root start, usage errors."""

from __future__ import annotations

import os
import pwd
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from conftest import REPO, tcp_exchange, udp_exchange

pytestmark = pytest.mark.process
MODES = ["pool", "classic"]


def _port_free(port: int) -> bool:
    """Whether poolinetd could bind ``port`` on 127.0.0.1 for TCP and UDP (its TCP
    listeners set SO_REUSEADDR, so a TIME_WAIT left by a previous run is no obstacle)."""
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def run_master(args: list[str], tmp_path: Path, prefix: tuple[str, ...] = (),
               python: str = sys.executable, env: dict[str, str] | None = None,
               cwd: Path | None = None, ready: str = "--ready-fd") -> tuple[
        subprocess.Popen[bytes], dict[str, object], Path]:
    """Start ``python -m poolinetd ARGS READY N`` and wait for its ready line (20 s).

    ``ready`` is how the ready option is spelled (an abbreviation, say); the
    process runs in ``cwd`` (default: the checkout, or / with an ``env`` of
    its own); its stdout and stderr go to ``tmp_path / "log"``.
    """
    rfd, wfd = os.pipe()
    log_path = tmp_path / "log"
    if cwd is None:
        cwd = REPO if env is None else Path("/")
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen([*prefix, python, "-m", "poolinetd", *args,
                                 ready, str(wfd)], pass_fds=(wfd,), stdout=logf,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=cwd, env=env)
    os.close(wfd)
    try:
        ready_now, _, _ = select.select([rfd], [], [], 20)
        line = os.read(rfd, 65536) if ready_now else b""
    finally:
        os.close(rfd)
    if not line:
        proc.kill()
        proc.wait()
        pytest.fail(f"not ready: {log_path.read_text()}")
    return proc, orjson.loads(line), log_path


@pytest.mark.parametrize("mode", MODES)
def test_no_config_serves_the_builtin_default_on_localhost(tmp_path: Path, mode: str) -> None:
    from poolinetd.cli import DEFAULT_PORTS

    if not all(_port_free(p) for p in DEFAULT_PORTS.values()):
        pytest.skip("a default port (7007-7037) is in use on this machine")
    proc, info, log_path = run_master(["--no-control", "--mode", mode], tmp_path)
    try:
        listeners = info["listeners"]
        assert isinstance(listeners, list) and len(listeners) == 10
        assert {(lst["address"], lst["port"]) for lst in listeners} == {
            ("127.0.0.1", p) for p in DEFAULT_PORTS.values()}
        assert tcp_exchange(DEFAULT_PORTS["echo"], b"first try") == b"first try"
        assert tcp_exchange(DEFAULT_PORTS["daytime"]).endswith(b"\r\n")
        assert udp_exchange(DEFAULT_PORTS["echo"], b"udp") == b"udp"
        text = log_path.read_text()
        assert text.count("info listening") == 10 and "port=7007" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


@pytest.mark.parametrize("mode", MODES)
def test_started_as_a_normal_user_serves_only_that_users_services(
        public_dir: Path, tmp_path: Path, mode: str,
        nobody_python: tuple[str, Path]) -> None:
    python, stage = nobody_python  # reachable by nobody wherever the clone sits
    conf = public_dir / "mixed.conf"
    conf.write_text("127.0.0.1:0 stream tcp nowait nobody internal echo\n"
                    "127.0.0.1:0 stream tcp nowait root internal daytime\n")
    conf.chmod(0o644)
    log_dir = public_dir / "run"
    log_dir.mkdir(mode=0o755)
    # nobody creates its control socket and log here: its own directory (one
    # writable by others is refused for a socket, which could be swapped there).
    nobody = pwd.getpwnam("nobody")
    os.chown(log_dir, nobody.pw_uid, nobody.pw_gid)
    proc, info, log_path = run_master(["-c", str(conf), "--control", str(log_dir / "ctl.sock"),
                                 "--mode", mode],
                                log_dir, ("/usr/bin/setpriv", "--reuid=nobody",
                                          "--regid=nogroup", "--clear-groups"),
                                python=python,
                                env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(stage)})
    try:
        listeners = info["listeners"]
        assert isinstance(listeners, list) and len(listeners) == 1
        assert tcp_exchange(int(listeners[0]["port"]), b"as nobody") == b"as nobody"
        text = log_path.read_text()
        assert "service_skipped" in text and "daytime" in text and "cannot switch" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_bad_config_at_start_lists_every_error_and_exits_78(tmp_path: Path) -> None:
    conf = tmp_path / "bad.conf"
    conf.write_text("echo stream tcp nowait nobody internal\n"
                    "daytime stream tpc nowait nobody internal\n"
                    "chargen stream tcp nowait no-such-user internal\n")
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "poolinetd", "-c", str(conf), "--no-control"],
                            capture_output=True, text=True, timeout=30, cwd=REPO)
    assert result.returncode == 78
    assert f"{conf}:2: field 3 'tpc'" in result.stderr
    assert f"{conf}:3: field 5 'no-such-user'" in result.stderr
    assert time.monotonic() - start < 20


def test_listener_in_use_exits_71_naming_the_address(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        conf = tmp_path / "busy.conf"
        conf.write_text(f"127.0.0.1:{port} stream tcp nowait nobody internal echo\n")
        result = subprocess.run([sys.executable, "-m", "poolinetd", "-c", str(conf),
                                 "--no-control"], capture_output=True, text=True, timeout=30,
                                cwd=REPO)
    assert result.returncode == 71
    assert f"127.0.0.1:{port}" in result.stderr and "in use" in result.stderr


def test_status_without_a_master_says_so() -> None:
    result = subprocess.run([sys.executable, "-m", "poolinetd", "status", "--control",
                             "/nonexistent/ctl.sock"], capture_output=True, text=True,
                            timeout=30, cwd=REPO)
    assert result.returncode == 69 and "cannot reach the master" in result.stderr


def test_servable_keeps_only_own_services_when_not_root(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """The same rule at the OS seam (geteuid/getuid), for machines where the e2e test skips."""
    from poolinetd import cli
    from poolinetd.config import resolve
    from poolinetd.observe import log

    loaded = resolve.load_text("127.0.0.1:0 stream tcp nowait nobody internal echo\n"
                               "127.0.0.1:0 stream tcp nowait root internal daytime\n", "t.conf")
    assert not loaded.errors
    log.setup("text", 20, stream=sys.stderr)
    monkeypatch.setattr(os, "geteuid", lambda: 65534)
    monkeypatch.setattr(os, "getuid", lambda: 65534)
    kept = cli._servable(loaded.services)
    assert [s.user_name for s in kept] == ["nobody"]
    err = capsys.readouterr().err
    assert "service_skipped" in err and "daytime:0/tcp" in err and "t.conf:2" in err


def test_programs_get_the_fd_limit_poolinetd_was_started_with(tmp_path: Path) -> None:
    hard = int(subprocess.run(["sh", "-c", "ulimit -Hn"], capture_output=True, text=True,
                              timeout=10).stdout)
    if hard <= 512:
        pytest.skip("hard fd limit too low to tell a raised soft limit apart")
    conf = tmp_path / "limits.conf"
    conf.write_text("127.0.0.1:0 stream tcp nowait root /bin/sh sh -c 'ulimit -n'\n")
    for mode in ("pool", "classic"):
        proc, info, _ = run_master(["-c", str(conf), "--no-control", "--mode", mode], tmp_path,
                             ("prlimit", "--nofile=512:"))
        try:
            listeners = info["listeners"]
            assert isinstance(listeners, list)
            assert tcp_exchange(int(listeners[0]["port"])) == b"512\n", mode
            limits = Path(f"/proc/{proc.pid}/limits").read_text()
            soft = int(limits.split("Max open files")[1].split()[0])
            assert soft == hard  # the master itself raised its soft limit
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0


def test_usage_errors_exit_64() -> None:
    for args in (["--mode", "threads"], ["check", "--no-such-flag"]):
        result = subprocess.run([sys.executable, "-m", "poolinetd", *args], capture_output=True,
                                text=True, timeout=30, cwd=REPO)
        assert result.returncode == 64, (args, result.stderr)
        assert "usage:" in result.stderr
