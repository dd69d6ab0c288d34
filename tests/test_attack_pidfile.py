"""--pidfile attacks (issue 13 item 4): symlinks, live and stale pidfiles, others' files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TEST_USER, start_server, wait_until

from poolinetd.ops.pidfile import Pidfile, PidfileError, PidfileInUse

CONF = f"127.0.0.1:0 stream tcp nowait {TEST_USER} internal echo\n"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_symlink_at_the_path_is_never_written_through(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_text("precious\n")
    link = tmp_path / "pid"
    link.symlink_to(target)
    with pytest.raises(PidfileError, match="symlink"):
        Pidfile(str(link)).acquire()
    assert target.read_text() == "precious\n" and link.is_symlink()
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "would-be-created")
    with pytest.raises(PidfileError):
        Pidfile(str(dangling)).acquire()
    assert not (tmp_path / "would-be-created").exists()


def test_live_pidfile_is_refused_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "pid"
    path.write_text(f"{os.getppid()}\n")
    with pytest.raises(PidfileInUse) as info:
        Pidfile(str(path)).acquire()
    assert info.value.pid == os.getppid()
    assert path.read_text() == f"{os.getppid()}\n"


@pytest.mark.parametrize("content", ["", "garbage\n", "0\n", "-5\n", "1" * 40 + "\n"])
def test_something_that_is_not_a_pidfile_is_refused_and_kept(tmp_path: Path,
                                                             content: str) -> None:
    path = tmp_path / "pid"
    path.write_text(content)
    with pytest.raises(PidfileError, match="does not hold a pid"):
        Pidfile(str(path)).acquire()
    assert path.read_text() == content


def test_hard_linked_or_special_file_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.write_text(f"{_dead_pid()}\n")
    path = tmp_path / "pid"
    os.link(other, path)
    with pytest.raises(PidfileError, match="one link"):
        Pidfile(str(path)).acquire()
    assert other.exists() and path.exists()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(PidfileError, match="not a plain pidfile"):
        Pidfile(str(fifo)).acquire()  # and it does not hang


def test_stale_pidfile_is_replaced_and_ours_removed_at_release(tmp_path: Path) -> None:
    path = tmp_path / "pid"
    path.write_text(f"{_dead_pid()}\n")
    with Pidfile(str(path)):
        assert path.read_text() == f"{os.getpid()}\n"
    assert not path.exists()


def test_release_never_removes_a_file_that_replaced_ours(tmp_path: Path) -> None:
    path = tmp_path / "pid"
    holder = Pidfile(str(path))
    holder.acquire()
    other = tmp_path / "other"
    other.write_text("someone else's\n")  # created while ours exists: another inode
    os.replace(other, path)
    holder.release()
    assert path.read_text() == "someone else's\n"


def test_a_forked_child_does_not_remove_the_masters_pidfile(tmp_path: Path) -> None:
    path = tmp_path / "pid"
    holder = Pidfile(str(path))
    holder.acquire()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        holder.release()
        os._exit(0)
    os.waitpid(pid, 0)
    assert path.exists()
    holder.release()
    assert not path.exists()


# -- against the real master -----------------------------------------------------------------


@pytest.mark.process
@pytest.mark.parametrize("mode", ["pool", "classic"])
def test_master_refuses_a_live_pidfile_with_exit_71(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "poolinetd.pid"
    path.write_text(f"{os.getpid()}\n")
    server = start_server(tmp_path, CONF, "--pidfile", str(path), mode=mode, expect_ready=False)
    try:
        code = server.proc.wait(30)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()
        pytest.fail("poolinetd started over a live pidfile")
    assert code == 71
    assert path.read_text() == f"{os.getpid()}\n"
    assert "pidfile_in_use" in server.log()


@pytest.mark.process
def test_master_refuses_a_symlinked_pidfile(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    path = tmp_path / "poolinetd.pid"
    path.symlink_to(victim)
    server = start_server(tmp_path, CONF, "--pidfile", str(path), expect_ready=False)
    assert server.proc.wait(30) == 71
    assert victim.read_text() == "precious\n" and path.is_symlink()
    assert "pidfile_failed" in server.log()


@pytest.mark.process
@pytest.mark.parametrize("mode", ["pool", "classic"])
def test_master_replaces_a_stale_pidfile_and_removes_only_its_own(tmp_path: Path,
                                                                  mode: str) -> None:
    path = tmp_path / "poolinetd.pid"
    path.write_text(f"{_dead_pid()}\n")
    server = start_server(tmp_path, CONF, "--pidfile", str(path), mode=mode)
    try:
        wait_until(lambda: path.read_text() == f"{server.pid}\n", what="pidfile written")
    finally:
        assert server.stop(signal.SIGTERM) == 0
    assert not path.exists()

    second = start_server(tmp_path, CONF, "--pidfile", str(path), mode=mode)
    wait_until(lambda: path.exists(), what="pidfile written")
    other = tmp_path / "other"
    other.write_text("not yours\n")  # created while the master's exists: another inode
    os.replace(other, path)  # the file at the path is no longer the master's
    assert second.stop(signal.SIGTERM) == 0
    assert path.read_text() == "not yours\n"
