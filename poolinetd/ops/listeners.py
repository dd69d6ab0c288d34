"""Opening and closing the listening sockets of a service; the one rule for stale unix sockets.

Touches the OS: socket, bind, listen, and the unix socket file of a
listener. Never forks, never parses. Every socket returned is non-blocking
and close-on-exec; the caller owns it.

Unix socket files are where root meets paths that other users may be able to
change, so they follow these rules (see docs/configuration.md):

- The socket's directory must be owned by root, by the user poolinetd runs
  as, or by the service's user; if group or others may write to it, it must
  be root's and have the sticky bit (``/tmp``). Anything else is refused.
- The file is born owner-only (mode 0600, set on the socket before ``bind``),
  so nobody but root can use it before it is finished.
- Right after ``bind`` the file is opened with ``O_PATH|O_NOFOLLOW`` and
  proven to be *this* socket (a probe connects or sends through that fd and
  the listener receives it). Owner and mode are then set through that fd
  (``/proc/self/fd/N``), never by name: a symlink or any other file swapped
  in is never touched, and the listener is refused.
- ``close_listener`` and ``remove_stale_socket`` unlink by name inside a
  directory fd, only after checking (lstat through that fd) that the entry
  is the socket they mean. Between that check and the unlink only someone
  who may write the directory (root, its owner; in a sticky directory the
  entry's owner) can replace the entry, and each of them could remove the
  replacement themselves: the unlink gives nobody anything new.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import stat
import struct
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from poolinetd.config.spec import DEFAULT_BACKLOG, Endpoint, Service, SocketType

BACKLOG = DEFAULT_BACKLOG  # a service's backlog= replaces it; somaxconn caps both

_SOCKTYPES = {
    SocketType.STREAM: socket.SOCK_STREAM,
    SocketType.DGRAM: socket.SOCK_DGRAM,
    SocketType.SEQPACKET: socket.SOCK_SEQPACKET,
}
_PROBE_TRIES = 64  # queued connections/datagrams looked at while finding our own probe
_BORN_MODE = 0o600  # what a unix socket file is until its owner and mode are final


class ListenError(Exception):
    """A listener could not be opened (address in use, permission, bad path)."""


class SocketInUse(ListenError):
    """A unix socket path is a live socket: some process listens there."""


@dataclass(frozen=True, slots=True)
class Bound:
    """Where a listener actually is: the port the kernel gave for port 0."""

    family: str  # "inet", "inet6", "unix"
    address: str
    port: int

    def __str__(self) -> str:
        """As an operator writes it: ``127.0.0.1:7``, ``[::1]:7``, or the unix path."""
        if self.family == "unix":
            return self.address
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class _Made:
    """The unix socket file a listener created: only this inode is ever unlinked."""

    path: str
    dev: int
    ino: int


# Listener -> the file it created. Weak, so a listener closed some other way leaves nothing.
_MADE: weakref.WeakKeyDictionary[socket.socket, _Made] = weakref.WeakKeyDictionary()


def family_name(family: int) -> str:
    if family == socket.AF_INET:
        return "inet"
    return "inet6" if family == socket.AF_INET6 else "unix"


def open_endpoint(service: Service, endpoint: Endpoint) -> socket.socket:
    """Bind (and for connection types, listen on) one endpoint of ``service``.

    TCP listeners get SO_REUSEADDR (a restart must not wait for TIME_WAIT);
    datagram sockets never do, so no other user can bind the same address
    and port and take the service's datagrams. SO_REUSEPORT is set (before
    bind, TCP and UDP) only when ``service.reuseport``: then several
    poolinetd instances running as the same user share the port and the
    kernel spreads connections over them; the kernel refuses it to sockets of
    other users. Unix sockets: see ``bind_unix``. Raises ListenError naming
    the service and address.
    """
    stype = _SOCKTYPES.get(service.socket_type)
    if stype is None:
        raise ListenError(f"{service.name}: socket type {service.socket_type.value} not supported")
    if endpoint.family == socket.AF_UNIX:
        owner = service.socket_owner
        mode = owner.mode if owner is not None and owner.mode is not None else 0o600
        uid = owner.uid if owner is not None else -1
        gid = owner.gid if owner is not None else -1
        try:
            return bind_unix(endpoint.address, stype, mode=mode, uid=uid, gid=gid,
                             trusted_uids=(service.uid,), backlog=service.sockopts.backlog)
        except ListenError as exc:
            raise ListenError(f"{service.name}: cannot listen on {endpoint.address}: {exc}"
                              ) from exc
    where = (f"[{endpoint.address}]:{endpoint.port}" if endpoint.family == socket.AF_INET6
             else f"{endpoint.address}:{endpoint.port}")
    sock = socket.socket(endpoint.family, stype)
    try:
        if stype == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if service.reuseport and stype in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if endpoint.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(endpoint.v6only))
        set_socket_options(sock, service)
        sock.bind((endpoint.address, endpoint.port))
        if stype != socket.SOCK_DGRAM:
            sock.listen(service.sockopts.backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ListenError(f"{service.name}: cannot listen on {where}: "
                          f"{exc.strerror or exc}") from exc
    return sock


def set_socket_options(sock: socket.socket, service: Service) -> None:
    """``service``'s socket controls on a TCP or UDP listener, before bind (raises OSError).

    Set on the listener only: Linux copies a listener's SO_RCVBUF, SO_SNDBUF,
    SO_KEEPALIVE and TCP_NODELAY to every socket accept() returns (the new
    socket is a clone of the listener's; tests/test_keys_socket.py checks it on
    fd 0 of a launched program), so no connection costs a setsockopt. The
    buffers are set before listen: TCP picks its window scale from SO_RCVBUF
    when the handshake starts. settings.py has already dropped the options that
    cannot apply to this kind of socket (resolved as None, False or 0).
    """
    opts = service.sockopts
    if opts.rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, opts.rcvbuf)
    if opts.sndbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, opts.sndbuf)
    if opts.keepalive:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if opts.nodelay:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if opts.defer_accept:
        # accept() returns a connection only once data arrived (or the time passed and
        # the kernel's SYN-ACK retries ran out): silent clients never reach the engine.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, opts.defer_accept)


def update_socket_options(sock: socket.socket, old: Service, new: Service) -> None:
    """A reload changed the service whose listener ``sock`` moves on: set what differs.

    keepalive, nodelay and defer_accept are switched either way and the backlog
    is set again by a second listen() (Linux takes it on a listening socket). A
    buffer size is set when the new service names one; one removed stays what it
    was until the listener is reopened (the kernel's default cannot be asked
    for). Affects connections accepted from now on. Never raises: these calls
    cannot fail on a socket open_endpoint made, and a failed one must not fail
    the reload.
    """
    was, now = old.sockopts, new.sockopts
    if was == now or (sock.family == socket.AF_UNIX and was.backlog == now.backlog):
        return
    with contextlib.suppress(OSError):
        if sock.family != socket.AF_UNIX:
            for key, level, opt in (("rcvbuf", socket.SOL_SOCKET, socket.SO_RCVBUF),
                                    ("sndbuf", socket.SOL_SOCKET, socket.SO_SNDBUF)):
                value = getattr(now, key)
                if value is not None and value != getattr(was, key):
                    sock.setsockopt(level, opt, value)
            if sock.type == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, int(now.keepalive))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(now.nodelay))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, now.defer_accept)
        if sock.type != socket.SOCK_DGRAM and was.backlog != now.backlog:
            sock.listen(now.backlog)


def bind_unix(path: str, socktype: int, *, mode: int = 0o600, uid: int = -1, gid: int = -1,
              trusted_uids: Iterable[int] = (), backlog: int = BACKLOG) -> socket.socket:
    """A unix socket bound at ``path`` (listening unless datagram), owned ``uid:gid``, ``mode``.

    ``uid``/``gid`` -1 keep poolinetd's own. The directory of ``path`` must
    pass ``check_socket_dir(dir, trusted_uids)``. A stale socket at ``path``
    is removed first (``remove_stale_socket``); anything else there is an
    error. The returned socket is non-blocking; the caller owns it and
    closes it with ``close_listener``, which removes exactly this file.
    Raises ListenError (SocketInUse if a live socket holds the path).
    """
    directory, name = os.path.split(path)
    if not name or not directory:
        raise ListenError("the socket path must be absolute and name a file")
    dfd = _open_dir(directory)
    try:
        check_socket_dir(dfd, directory, trusted_uids)
        _remove_stale(dfd, name, path)
        sock = socket.socket(socket.AF_UNIX, socktype)
        try:
            _bind_born_private(sock, path)
            if socktype != socket.SOCK_DGRAM:
                sock.listen(backlog)
            sock.setblocking(False)
            made = _finish(sock, dfd, name, path, mode, uid, gid)
        except BaseException:
            sock.close()
            raise
    finally:
        os.close(dfd)
    _MADE[sock] = made
    return sock


def check_socket_dir(dfd: int, directory: str, trusted_uids: Iterable[int] = ()) -> None:
    """Refuse a directory where someone other than root, us or a trusted user could swap files.

    Allowed: owned by root, by our effective uid, or by one of
    ``trusted_uids`` and writable only by its owner; or owned by root,
    writable by others and sticky (like ``/tmp``). Raises ListenError.
    """
    st = os.fstat(dfd)
    owners = {0, os.geteuid(), *trusted_uids}
    shared = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if st.st_uid not in owners:
        raise ListenError(f"directory {directory} is owned by uid {st.st_uid}, not by root "
                          "or the service's user: it could swap the socket file")
    if shared and not (st.st_mode & stat.S_ISVTX and st.st_uid == 0):
        raise ListenError(f"directory {directory} is writable by others without being a "
                          "root-owned sticky directory: they could swap the socket file")


def remove_stale_socket(path: str) -> bool:
    """The one rule for a leftover unix socket at ``path``: remove it only if nobody listens.

    Returns True if a stale socket was removed, False if nothing was there.
    Raises SocketInUse if a process listens on it, ListenError if ``path`` is
    anything but a socket (regular file, symlink, directory: never removed)
    or cannot be checked. The unlink is done in a directory fd, after proving
    the entry is still the socket that was probed.
    """
    directory, name = os.path.split(path)
    if not name or not directory:
        raise ListenError(f"{path}: not an absolute file path")
    dfd = _open_dir(directory)
    try:
        return _remove_stale(dfd, name, path)
    finally:
        os.close(dfd)


def bound_address(sock: socket.socket) -> Bound:
    """The address a listener is really bound to (reports the port chosen for port 0)."""
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return Bound("unix", name if isinstance(name, str) else name.decode(), 0)
    return Bound(family_name(sock.family), name[0], name[1])


_SO_GET_FILTER = 26  # SO_ATTACH_FILTER's number: getsockopt reads the attached filter
_SO_LOCK_FILTER = 44


def tampered(sock: socket.socket) -> str:
    """What a process that held ``sock`` (a lent listener) changed that would shut out
    whoever gets it next, or "" if nothing seen.

    A worker or a ``wait`` program holds the very socket the master keeps: a
    socket filter it attached (and locked: not even root can detach it) drops
    every datagram or connection for its successors; a datagram socket it
    connected receives from one peer only; a listener it shut down no longer
    listens (a datagram socket shut for reading reads nothing); a datagram
    socket it gave SO_REUSEADDR can be bound again, by any local user, who is
    then given the service's datagrams. None can be undone, only replaced by a
    fresh socket (``open_endpoint``).
    """
    try:
        if sock.getsockopt(socket.SOL_SOCKET, _SO_GET_FILTER, 1024):
            return "a socket filter was attached to it"
        if sock.getsockopt(socket.SOL_SOCKET, _SO_LOCK_FILTER):
            return "its socket filter was locked"
    except OSError:
        pass  # a kernel without these options has no such state either
    if sock.type != socket.SOCK_DGRAM:
        try:  # shutdown(SHUT_RD) on a listening TCP socket stops it listening for good
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        except OSError:
            return ""
        return "" if listening else "it no longer listens (shut down)"
    # Datagram sockets are bound without SO_REUSEADDR (open_endpoint): with it, any
    # local user could bind the same address and be given the service's datagrams.
    if sock.family != socket.AF_UNIX and sock.getsockopt(socket.SOL_SOCKET,
                                                         socket.SO_REUSEADDR):
        return "SO_REUSEADDR was set on it (another user could bind its address)"
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP)
    if any(events & select.POLLRDHUP for _, events in poller.poll(0)):
        return "it was shut down for reading"
    try:
        sock.getpeername()
    except OSError:
        return ""
    return "it was connected to one peer"


def close_listener(sock: socket.socket, dispose: Callable[[int], None] | None = None) -> None:
    """Close a listener; the unix socket file it created is unlinked if it is still there.

    Only the very inode ``bind_unix`` created is removed (dev and inode
    checked through a directory fd); a socket not made by ``bind_unix``
    leaves its path alone. Closing an already closed listener does nothing.
    ``dispose(fd)``, if given, closes a unix listener instead (the closer): the
    connections still in its backlog hold what their clients sent, descriptors
    too, which the last close releases, and one with a linger time blocks it.
    """
    made = _MADE.pop(sock, None)
    if sock.fileno() < 0:
        return
    if dispose is not None and sock.family == socket.AF_UNIX:
        dispose(sock.detach())
    else:
        sock.close()
    if made is None:
        return
    directory, name = os.path.split(made.path)
    try:
        dfd = _open_dir(directory)
    except ListenError:
        return
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == (made.dev, made.ino):
            os.unlink(name, dir_fd=dfd)
    except OSError:
        pass  # already gone, or the directory changed: nothing of ours to remove
    finally:
        os.close(dfd)


def disown(sock: socket.socket) -> None:
    """Never unlink ``sock``'s unix socket file: it was handed to another process (an
    upgrade's new master), which serves on the same socket."""
    _MADE.pop(sock, None)


# -- OS helpers ----------------------------------------------------------------------------


def _open_dir(directory: str) -> int:
    try:
        return os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ListenError(f"directory {directory}: {exc.strerror or exc}") from exc


def _fd_path(fd: int) -> str:
    """A path that names exactly the file behind ``fd`` (the kernel's magic link)."""
    return f"/proc/self/fd/{fd}"


def _remove_stale(dfd: int, name: str, path: str) -> bool:
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ListenError(f"{path}: {exc.strerror or exc}") from exc
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenError(f"{path} exists and is not a socket (not removed)")
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ListenError(f"{path}: {exc.strerror or exc}") from exc
    try:
        held = os.fstat(fd)
        if (held.st_dev, held.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISSOCK(held.st_mode):
            raise ListenError(f"{path} changed while being checked (not removed)")
        if _listening(fd, path):
            raise SocketInUse(f"{path} is in use by another process")
        again = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino):
            raise ListenError(f"{path} changed while being checked (not removed)")
        os.unlink(name, dir_fd=dfd)  # nobody listens: a leftover from a previous run
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ListenError(f"{path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    return True


def _listening(fd: int, path: str) -> bool:
    """Whether a process has the socket behind ``fd`` bound (probed without blocking)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(_fd_path(fd))
    except (BlockingIOError, InterruptedError):
        return True  # its backlog is full: very much alive
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        if exc.errno == errno.EPROTOTYPE:
            return True  # a datagram or seqpacket socket is bound there
        raise ListenError(f"{path}: cannot tell whether it is in use: {exc.strerror}") from exc
    finally:
        probe.close()
    return True


def _bind_born_private(sock: socket.socket, path: str) -> None:
    """Bind so the file is created owner-only: Linux takes the new file's mode from the socket."""
    os.fchmod(sock.fileno(), _BORN_MODE)
    old = os.umask(0o077)  # and if a kernel ignored the fchmod, the umask still applies
    try:
        sock.bind(path)
    except OSError as exc:
        raise ListenError(exc.strerror or str(exc)) from exc
    finally:
        os.umask(old)


def _finish(sock: socket.socket, dfd: int, name: str, path: str, mode: int, uid: int,
            gid: int) -> _Made:
    """Prove the file at ``name`` is ``sock``'s, then set owner and mode through an fd."""
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    except OSError as exc:
        raise ListenError(f"the socket file vanished after bind: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode) or not _is_ours(sock, fd):
            raise ListenError("the socket file was replaced right after bind; refusing it "
                              "(is someone else writing to its directory?)")
        target = _fd_path(fd)
        try:
            if uid != -1 or gid != -1:
                os.chown(target, uid, gid)
            if mode != _BORN_MODE:
                os.chmod(target, mode)
        except OSError as exc:
            raise ListenError(f"cannot set owner or mode: {exc.strerror or exc}") from exc
        return _Made(path, st.st_dev, st.st_ino)
    finally:
        os.close(fd)


def _is_ours(sock: socket.socket, fd: int) -> bool:
    """Whether the socket file behind ``fd`` is bound by ``sock`` (a probe must reach it).

    The file is still mode 0600 and root's (or ours), so only root could
    have queued anything else; whatever else is queued is dropped.
    """
    probe = socket.socket(socket.AF_UNIX, sock.type)
    probe.setblocking(False)
    nonce = os.urandom(16)
    try:
        try:
            if sock.type == socket.SOCK_DGRAM:
                probe.sendto(nonce, _fd_path(fd))
            else:
                probe.connect(_fd_path(fd))
        except OSError:
            return False
        for _ in range(_PROBE_TRIES):
            try:
                if sock.type == socket.SOCK_DGRAM:
                    if sock.recv(64) == nonce:
                        return True
                    continue
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return False
            with conn:
                cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                       struct.calcsize("3i"))
                if struct.unpack("3i", cred)[0] == os.getpid():
                    return True
        return False
    finally:
        probe.close()


__all__ = [
    "BACKLOG",
    "Bound",
    "ListenError",
    "SocketInUse",
    "bind_unix",
    "bound_address",
    "check_socket_dir",
    "close_listener",
    "family_name",
    "open_endpoint",
    "remove_stale_socket",
    "set_socket_options",
    "update_socket_options",
]
