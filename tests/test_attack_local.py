"""Attacks by local users (issue 13 items 1, 3, 4; issue 8's --control file), each made for real.

The attacker runs as ``nobody`` in a forked child (setgroups/setgid/setuid);
files the attacker must reach are staged under ``public_dir``. Every test
asserts the safe outcome and fails on the code before the fix.
"""

from __future__ import annotations

import os
import pwd
import socket
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import TEST_USER, start_server, udp_exchange, wait_until

from poolinetd.config import resolve
from poolinetd.ops import listeners

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (other users)")
NOBODY = pwd.getpwnam("nobody")


def as_nobody(action: Callable[[], int]) -> int:
    """Run ``action`` in a child that is really ``nobody``; its return value is the exit code."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 98
        try:
            os.setgroups([])
            os.setgid(NOBODY.pw_gid)
            os.setuid(NOBODY.pw_uid)
            code = action()
        except BaseException:
            code = 99
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _nobody_dir(public_dir: Path) -> Path:
    """A directory owned by ``nobody`` (the service user): allowed, and the attacker's."""
    d = public_dir / "svc"
    d.mkdir()
    os.chown(d, NOBODY.pw_uid, NOBODY.pw_gid)
    return d


# -- item 1: root chown/chmod of a swapped socket path ---------------------------------------


@pytest.mark.root
@needs_root
def test_socket_swapped_for_symlink_after_bind_is_refused_and_target_untouched(
        public_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The service user swaps the freshly bound socket for a symlink to a root-owned file.

    The swap happens exactly in the window between bind and the owner/mode
    change (a hook on bind runs the attacker to completion), which is the
    window a reload gives the attacker.
    """
    svc_dir = _nobody_dir(public_dir)
    path = svc_dir / "s.sock"
    target = tmp_path / "root-secret"
    target.write_text("root only\n")
    target.chmod(0o600)
    before = os.stat(target)

    def attack() -> int:
        os.rename(path, svc_dir / "moved.sock")
        os.symlink(target, path)
        return 0

    real = socket.socket

    class Hooked(real):  # type: ignore[misc, valid-type]
        def bind(self, address: object) -> None:
            super().bind(address)
            if address == str(path):
                assert as_nobody(attack) == 0

    monkeypatch.setattr(socket, "socket", Hooked)
    loaded = resolve.load_text(
        f":nobody:nogroup:0666:{path} stream unix nowait nobody internal echo\n", "<attack>")
    (svc,) = loaded.services
    with pytest.raises(listeners.ListenError, match="replaced"):
        sock = listeners.open_endpoint(svc, svc.key.endpoints[0])
        listeners.close_listener(sock)
    monkeypatch.undo()
    after = os.stat(target)
    assert (after.st_uid, after.st_gid, after.st_mode) == (before.st_uid, before.st_gid,
                                                           before.st_mode)
    assert target.read_text() == "root only\n"
    assert os.path.islink(path)  # the attacker's symlink is left alone, not followed


@pytest.mark.root
@needs_root
def test_close_does_not_unlink_what_the_service_user_put_in_place(public_dir: Path) -> None:
    svc_dir = _nobody_dir(public_dir)
    path = svc_dir / "c.sock"
    loaded = resolve.load_text(f"{path} stream unix nowait nobody internal echo\n", "<attack>")
    (svc,) = loaded.services
    sock = listeners.open_endpoint(svc, svc.key.endpoints[0])
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()

    def attack() -> int:
        os.rename(path, svc_dir / "ours-moved.sock")
        theirs = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        theirs.bind(str(path))
        theirs.listen(1)
        os.write(ready_w, b"x")
        os.read(go_r, 1)  # hold it while root closes its listener
        theirs.close()
        return 0

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os._exit(as_nobody(attack))
    try:
        assert os.read(ready_r, 1) == b"x"
        listeners.close_listener(sock)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)  # their socket is still there
    finally:
        os.write(go_w, b"x")
        os.waitpid(pid, 0)
        for fd in (ready_r, ready_w, go_r, go_w):
            os.close(fd)


@pytest.mark.root
@needs_root
def test_socket_in_a_directory_others_can_write_is_refused(public_dir: Path) -> None:
    shared = public_dir / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    loaded = resolve.load_text(
        f":nobody::0660:{shared}/s.sock stream unix nowait nobody internal echo\n", "<attack>")
    (svc,) = loaded.services
    with pytest.raises(listeners.ListenError, match="writable by others"):
        sock = listeners.open_endpoint(svc, svc.key.endpoints[0])
        listeners.close_listener(sock)
    assert not (shared / "s.sock").exists()


# -- item 3: another user binds the same UDP address -----------------------------------------


@pytest.mark.process
@pytest.mark.root
@needs_root
@pytest.mark.parametrize("mode", ["pool", "classic"])
def test_other_user_cannot_bind_a_running_udp_service(serve, mode: str) -> None:
    server = serve(f"127.0.0.1:0 dgram udp wait {TEST_USER} internal echo\n", mode=mode)
    port = server.port()
    assert udp_exchange(port, b"hi") == b"hi"

    def steal(option: int) -> Callable[[], int]:
        def attempt() -> int:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as thief:
                thief.setsockopt(socket.SOL_SOCKET, option, 1)
                try:
                    thief.bind(("127.0.0.1", port))
                except OSError:
                    return 0  # refused: the safe outcome
                return 1
        return attempt

    assert as_nobody(steal(socket.SO_REUSEADDR)) == 0
    assert as_nobody(steal(socket.SO_REUSEPORT)) == 0
    assert udp_exchange(port, b"still ours") == b"still ours"


# -- issue 8: --control at an existing regular file ------------------------------------------


@pytest.mark.process
@pytest.mark.parametrize("mode", ["pool", "classic"])
def test_control_path_at_a_regular_file_is_an_error_and_the_file_stays(tmp_path: Path,
                                                                       mode: str) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("do not delete\n")
    server = start_server(tmp_path, f"127.0.0.1:0 stream tcp nowait {TEST_USER} internal echo\n",
                          "--control", str(precious), mode=mode, expect_ready=False)
    try:
        code = server.proc.wait(30)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()
        pytest.fail("poolinetd started with --control at a regular file")
    assert code == 71
    assert precious.read_text() == "do not delete\n"
    log = server.log()
    assert "control_socket_failed" in log and "not a socket" in log


@pytest.mark.process
def test_control_path_at_a_stale_socket_is_reused(tmp_path: Path, serve) -> None:
    ctl = tmp_path / "stale-ctl.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(ctl))
    server = serve(f"127.0.0.1:0 stream tcp nowait {TEST_USER} internal echo\n",
                   "--control", str(ctl))
    from poolinetd.ops import control

    assert control.request(str(ctl), "status")["ok"] is True
    assert stat.S_IMODE(os.lstat(ctl).st_mode) == 0o600
    server.stop()
    wait_until(lambda: not ctl.exists(), what="control socket removed at exit")
