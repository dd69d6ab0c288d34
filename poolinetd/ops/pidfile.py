"""The ``--pidfile``: created without following links, replaced only if stale, removed only if ours.

Touches the OS: open/read/unlink of one path, ``kill(pid, 0)``. Rules:

- Created with ``O_CREAT|O_EXCL|O_NOFOLLOW``: an existing file, symlink
  (dangling or not) or anything else at the path is never written through.
- An existing file is replaced only when it is a regular file with one link
  that names, in at most 32 bytes of ASCII digits, a process that does not
  exist (``kill(pid, 0)`` says ESRCH) or is this process. It is removed by
  name after checking (lstat) that it is still the file that was read; then
  creation is tried once more with ``O_EXCL``, so of two masters starting at
  once only one gets it. A live pid is ``PidfileInUse``; anything else
  (empty, garbage, a symlink, a directory) is ``PidfileError`` and is left alone.
- ``release`` removes the path only in the process that created the file and
  only while the path is still that file (same device and inode).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from types import TracebackType

__all__ = ["Pidfile", "PidfileError", "PidfileInUse"]

_MAX_BYTES = 32


class PidfileError(Exception):
    """The pidfile could not be created (a message for the operator)."""


class PidfileInUse(PidfileError):
    """The pidfile names a live process: another master is probably running."""

    def __init__(self, path: str, pid: int) -> None:
        super().__init__(f"{path} names pid {pid}, which is running")
        self.pid = pid


class Pidfile:
    """One pidfile: ``acquire()`` writes our pid, ``release()`` removes it if it is still ours.

    Also a context manager (acquire on enter, release on exit).
    """

    def __init__(self, path: str, replaces: int = 0) -> None:
        """``replaces``: the pid of the master this one takes over from in an upgrade
        (its pidfile is ours to replace although it still runs)."""
        self.path = path
        self.replaces = replaces
        self._made: tuple[int, int] | None = None  # (st_dev, st_ino) of the file we created
        self._owner_pid = 0

    def acquire(self) -> None:
        """Create the pidfile with our pid; raises PidfileInUse or PidfileError."""
        for _attempt in range(2):
            try:
                fd = os.open(self.path,
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o644)
            except FileExistsError:
                self._remove_if_stale()
                continue
            except OSError as exc:
                raise PidfileError(f"cannot create {self.path}: {exc.strerror or exc}") from exc
            try:
                st = os.fstat(fd)
                os.write(fd, f"{os.getpid()}\n".encode("ascii"))
            except OSError as exc:
                os.close(fd)
                raise PidfileError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
            os.close(fd)
            self._made = (st.st_dev, st.st_ino)
            self._owner_pid = os.getpid()
            return
        raise PidfileError(f"{self.path} was created again by someone else while replacing it")

    def release(self) -> None:
        """Remove the pidfile if this process created it and the path is still that file."""
        made, self._made = self._made, None
        if made is None or os.getpid() != self._owner_pid:
            return  # never ours, or a forked child: the master removes it
        try:
            st = os.lstat(self.path)
            # Same inode and still our pid: an upgrade's new master may have replaced
            # the file, and a file system may give the new file the freed inode number.
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == made and (
                    _read_pid(self.path) == self._owner_pid):
                os.unlink(self.path)
        except OSError:
            pass  # gone already, or replaced: not ours to remove

    def _remove_if_stale(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return  # removed meanwhile: try to create it again
        except OSError as exc:
            why = "it is a symlink" if exc.errno == errno.ELOOP else (exc.strerror or str(exc))
            raise PidfileError(f"{self.path} exists and cannot be checked: {why}") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                raise PidfileError(f"{self.path} exists and is not a plain pidfile "
                                   "(not a regular file with one link); remove it by hand")
            data = os.read(fd, _MAX_BYTES + 1)
        finally:
            os.close(fd)
        text = data.decode("ascii", "replace").strip()
        if len(data) > _MAX_BYTES or not text.isdigit() or not text.isascii() or int(text) <= 0:
            raise PidfileError(f"{self.path} exists and does not hold a pid; remove it by hand")
        pid = int(text)
        if pid not in (os.getpid(), self.replaces) and _alive(pid):
            raise PidfileInUse(self.path, pid)
        try:
            again = os.lstat(self.path)
        except FileNotFoundError:
            return
        if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino):
            raise PidfileError(f"{self.path} changed while being checked")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a dead process's pidfile

    def __enter__(self) -> Pidfile:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, as another user
    return True


def _read_pid(path: str) -> int:
    """The pid a pidfile names (0 if it names none); never follows a link."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        text = os.read(fd, _MAX_BYTES + 1).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    return int(text) if text.isdigit() and len(text) <= _MAX_BYTES else 0
