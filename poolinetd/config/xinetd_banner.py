"""Reading an xinetd banner file safely: the master is root, a banner goes to anyone.

xinetd 2.3.15 opens a banner as root, following every symbolic link, on every
connection, and writes the whole file with blocking writes. poolinetd reads
it once per load (the master, or ``poolinetd check``), bounded, never
waiting, and only a file that cannot turn root's privilege into a client's:

* every component of the path is opened with O_NOFOLLOW, from ``/`` down: a
  symbolic link anywhere on the path is refused, so a local user who owns a
  directory on it cannot point the banner at /etc/shadow or /root/...;
  ``..`` is refused too (it could climb out through a swapped directory);
* the file must be regular and readable by anyone (mode o+r): a banner is sent
  to every client, so it may hold only what every local user may read
  anyway (a hard link to a private file keeps that file's mode);
* at most ``limit`` bytes are read (the caller cuts and warns), O_NONBLOCK so
  a FIFO swapped in after the check is never waited on.
"""

from __future__ import annotations

import errno
import os
import stat

__all__ = ["read"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def read(path: str, base: str, limit: int) -> bytes | str:
    """At most ``limit`` + 1 bytes of the banner at ``path`` (relative to the directory
    ``base``), or why it is not read. Never raises for any input."""
    try:
        return _read(os.path.join(base, path), limit)
    except OSError as exc:
        return exc.strerror or str(exc)
    except ValueError as exc:  # a NUL byte, a lone surrogate
        return f"not a usable path: {exc}"


def _read(path: str, limit: int) -> bytes | str:
    if not path.startswith("/"):
        return "the path is not absolute (nor is the config file's directory)"
    parts = [p for p in path.split("/") if p and p != "."]
    if not parts:
        return "it is a directory, not a regular file"
    if ".." in parts:
        return "the path has '..' in it"
    fd = os.open("/", _DIR_FLAGS)
    try:
        for part in parts[:-1]:
            try:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno == errno.ELOOP or _is_link(fd, part):  # ELOOP: a symbolic link
                    return f"{part!r} on its path is a symbolic link"
                raise
            os.close(fd)
            fd = nxt
        try:
            file_fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return "it is a symbolic link"
            raise
    finally:
        os.close(fd)
    try:
        st = os.fstat(file_fd)
        if not stat.S_ISREG(st.st_mode):
            return "it is not a regular file"
        if not st.st_mode & stat.S_IROTH:
            return "it is not readable by everyone (mode o+r): a banner goes to any client"
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(file_fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(file_fd)


def _is_link(dir_fd: int, name: str) -> bool:
    """Whether ``name`` in ``dir_fd`` is a symbolic link (O_DIRECTORY|O_NOFOLLOW on one
    gives ENOTDIR, not ELOOP)."""
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False
