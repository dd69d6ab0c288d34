"""listeners.py against the real kernel: unix socket files, the stale-socket rule, SO_REUSEADDR."""

from __future__ import annotations

import os
import pwd
import socket
import stat
from pathlib import Path

import pytest

from poolinetd.config import resolve
from poolinetd.config.spec import Service
from poolinetd.ops import listeners

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (chown, other users)")
NOBODY = pwd.getpwnam("nobody")


def _service(line: str) -> Service:
    loaded = resolve.load_text(line + "\n", "<test>")
    assert loaded.ok, loaded.diagnostics
    (service,) = loaded.services
    return service


def _me() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


# -- unix sockets: how the file is made ------------------------------------------------------


def test_unix_socket_is_made_with_its_mode_and_removed_on_close(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    svc = _service(f":::0640:{path} stream unix nowait {_me()} internal echo")
    sock = listeners.open_endpoint(svc, svc.key.endpoints[0])
    try:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
        assert sock.getsockname() == str(path)
        assert listeners.bound_address(sock).address == str(path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))
    finally:
        listeners.close_listener(sock)
    assert not path.exists()


def test_unix_socket_default_mode_is_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "d.sock"
    svc = _service(f"{path} dgram unix wait {_me()} internal echo")
    sock = listeners.open_endpoint(svc, svc.key.endpoints[0])
    try:
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    finally:
        listeners.close_listener(sock)
    assert not path.exists()


@needs_root
@pytest.mark.root
def test_unix_socket_owner_and_group_from_the_prefix(tmp_path: Path) -> None:
    path = tmp_path / "o.sock"
    svc = _service(f":nobody:nogroup:0660:{path} seqpacket unix nowait nobody internal echo")
    sock = listeners.open_endpoint(svc, svc.key.endpoints[0])
    try:
        st = os.lstat(path)
        assert (st.st_uid, st.st_gid) == (NOBODY.pw_uid, svc.socket_owner.gid)  # type: ignore[union-attr]
        assert stat.S_IMODE(st.st_mode) == 0o660
    finally:
        listeners.close_listener(sock)


def test_bind_unix_for_each_socket_type(tmp_path: Path) -> None:
    for i, kind in enumerate((socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET)):
        path = str(tmp_path / f"t{i}.sock")
        sock = listeners.bind_unix(path, kind, mode=0o600)
        try:
            assert sock.type == kind and not sock.getblocking()
            assert stat.S_ISSOCK(os.lstat(path).st_mode)
        finally:
            listeners.close_listener(sock)
        assert not os.path.exists(path)


# -- socket directories ----------------------------------------------------------------------


@needs_root
@pytest.mark.root
def test_directory_owned_by_a_stranger_is_refused(tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    stranger.mkdir(mode=0o755)
    os.chown(stranger, 54321, 54321)
    with pytest.raises(listeners.ListenError, match="owned by uid 54321"):
        listeners.bind_unix(str(stranger / "s.sock"), socket.SOCK_STREAM)
    assert not (stranger / "s.sock").exists()


def test_directory_writable_by_others_without_sticky_bit_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(listeners.ListenError, match="writable by others"):
        listeners.bind_unix(str(shared / "s.sock"), socket.SOCK_STREAM)
    group = tmp_path / "group"
    group.mkdir()
    group.chmod(0o775)
    with pytest.raises(listeners.ListenError, match="writable by others"):
        listeners.bind_unix(str(group / "s.sock"), socket.SOCK_STREAM)


@needs_root
@pytest.mark.root
def test_root_sticky_directory_and_service_users_directory_are_allowed(tmp_path: Path) -> None:
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    own = tmp_path / "own"
    own.mkdir(mode=0o755)
    os.chown(own, NOBODY.pw_uid, NOBODY.pw_gid)
    a = listeners.bind_unix(str(sticky / "a.sock"), socket.SOCK_STREAM)
    b = listeners.bind_unix(str(own / "b.sock"), socket.SOCK_STREAM, trusted_uids=(NOBODY.pw_uid,))
    listeners.close_listener(a)
    listeners.close_listener(b)
    with pytest.raises(listeners.ListenError, match="owned by uid"):
        listeners.bind_unix(str(own / "c.sock"), socket.SOCK_STREAM)  # nobody is not trusted here


# -- the stale-socket rule -------------------------------------------------------------------


def _stale(path: Path, kind: int = socket.SOCK_STREAM) -> None:
    with socket.socket(socket.AF_UNIX, kind) as s:
        s.bind(str(path))  # closed without unlink: a leftover


def test_stale_socket_is_removed_and_nothing_else_is(tmp_path: Path) -> None:
    stale = tmp_path / "stale.sock"
    _stale(stale)
    assert listeners.remove_stale_socket(str(stale)) is True
    assert not stale.exists()
    assert listeners.remove_stale_socket(str(stale)) is False  # nothing there

    regular = tmp_path / "file"
    regular.write_text("keep me\n")
    with pytest.raises(listeners.ListenError, match="not a socket"):
        listeners.remove_stale_socket(str(regular))
    assert regular.read_text() == "keep me\n"

    target = tmp_path / "target.sock"
    _stale(target)
    link = tmp_path / "link.sock"
    link.symlink_to(target)
    with pytest.raises(listeners.ListenError, match="not a socket"):
        listeners.remove_stale_socket(str(link))
    assert link.is_symlink() and target.exists()

    directory = tmp_path / "dir"
    directory.mkdir()
    with pytest.raises(listeners.ListenError, match="not a socket"):
        listeners.remove_stale_socket(str(directory))


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET])
def test_live_socket_of_any_type_is_never_taken_over(tmp_path: Path, kind: int) -> None:
    """A live dgram socket answers a stream probe with EPROTOTYPE: it is alive, not stale."""
    path = tmp_path / "live.sock"
    with socket.socket(socket.AF_UNIX, kind) as live:
        live.bind(str(path))
        if kind != socket.SOCK_DGRAM:
            live.listen(1)
        with pytest.raises(listeners.SocketInUse):
            listeners.remove_stale_socket(str(path))
        svc = _service(f"{path} dgram unix wait {_me()} internal echo")
        with pytest.raises(listeners.ListenError, match="in use"):
            listeners.open_endpoint(svc, svc.key.endpoints[0])
        ino = os.lstat(path).st_ino
    assert os.lstat(path).st_ino == ino  # still the live one's file


def test_stale_socket_of_a_previous_run_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "again.sock"
    _stale(path, socket.SOCK_DGRAM)
    svc = _service(f"{path} stream unix nowait {_me()} internal echo")
    sock = listeners.open_endpoint(svc, svc.key.endpoints[0])
    listeners.close_listener(sock)
    assert not path.exists()


def test_close_listener_leaves_a_path_it_did_not_create(tmp_path: Path) -> None:
    path = tmp_path / "foreign.sock"
    foreign = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    foreign.bind(str(path))
    listeners.close_listener(foreign)  # not made by bind_unix: the path stays
    assert foreign.fileno() < 0 and path.exists()
    listeners.close_listener(foreign)  # twice is fine


def test_close_listener_never_removes_a_replacement(tmp_path: Path) -> None:
    path = tmp_path / "r.sock"
    sock = listeners.bind_unix(str(path), socket.SOCK_STREAM)
    os.rename(path, tmp_path / "moved.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(path))  # someone else's socket now sits at the path
        listeners.close_listener(sock)
        assert path.exists() and stat.S_ISSOCK(os.lstat(path).st_mode)


# -- inet options ----------------------------------------------------------------------------


def test_reuseaddr_on_tcp_only() -> None:
    me = _me()
    tcp = _service(f"127.0.0.1:0 stream tcp nowait {me} internal echo")
    udp = _service(f"127.0.0.1:0 dgram udp wait {me} internal echo")
    t = listeners.open_endpoint(tcp, tcp.key.endpoints[0])
    u = listeners.open_endpoint(udp, udp.key.endpoints[0])
    try:
        assert t.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        assert u.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 0
        assert u.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as thief:
            thief.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with pytest.raises(OSError):
                thief.bind(u.getsockname())
    finally:
        listeners.close_listener(t)
        listeners.close_listener(u)


@pytest.mark.parametrize(("socktype", "protocol"), [("stream", "tcp"), ("dgram", "udp")])
def test_reuseport_lets_two_listeners_share_a_port_and_only_with_it(
    socktype: str, protocol: str
) -> None:
    me = _me()

    def service(port: int, reuseport: bool) -> Service:
        yes = "yes" if reuseport else "no"
        return _service(f"127.0.0.1:{port} on socktype={socktype}, protocol={protocol}, "
                        f"wait=no, user={me}, args=echo, reuseport={yes};")

    first_svc = service(0, True)
    first = listeners.open_endpoint(first_svc, first_svc.key.endpoints[0])
    try:
        port = first.getsockname()[1]
        assert first.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        if socktype == "dgram":
            assert first.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 0
        shared = service(port, True)
        second = listeners.open_endpoint(shared, shared.key.endpoints[0])
        try:
            assert second.getsockname() == first.getsockname()
            alone = service(port, False)
            assert not alone.reuseport
            with pytest.raises(listeners.ListenError, match=r"cannot listen on 127\.0\.0\.1"):
                listeners.open_endpoint(alone, alone.key.endpoints[0])
        finally:
            listeners.close_listener(second)
    finally:
        listeners.close_listener(first)


def test_without_reuseport_a_second_listener_cannot_bind() -> None:
    me = _me()
    plain = _service(f"127.0.0.1:0 stream tcp nowait {me} internal echo")
    assert not plain.reuseport
    first = listeners.open_endpoint(plain, plain.key.endpoints[0])
    try:
        assert first.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
        port = first.getsockname()[1]
        again = _service(f"127.0.0.1:{port} on protocol=tcp, user={me}, args=echo, "
                         "reuseport=yes;")
        # One side without SO_REUSEPORT is enough for the kernel to refuse the share.
        with pytest.raises(listeners.ListenError):
            listeners.open_endpoint(again, again.key.endpoints[0])
    finally:
        listeners.close_listener(first)
