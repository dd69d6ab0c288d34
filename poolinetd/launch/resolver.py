"""The resolver: a child process that looks up clients' host names for tcp_wrappers.

Touches the OS: fork, a SOCK_SEQPACKET socketpair, the system resolver
(getnameinfo, getaddrinfo), threads in the child.

Why a child: a name lookup can take seconds (a DNS server that does not
answer), and the master has one thread that must never wait. Only rules
that need a name (host names, ``.domain``, KNOWN, UNKNOWN, PARANOID, LOCAL)
ask for one (admission/tcpwrappers.py answers NEED_NAME); the connection
then waits in the engine (engine/wrappers_stage.py) under a deadline, and is
decided when the answer arrives.

The child runs as ``nobody`` where that user exists and holds nothing but
its end of the channel. What a lookup imports (the idna codec) is imported
before the fork: as nobody, the interpreter's library may not be readable.
Each request is one message ``ID ADDRESS``; each answer ``ID NAME``, where
NAME is the host name libwrap would use:

* the reverse lookup (getnameinfo, NI_NAMEREQD) fails: ``unknown``;
* the name does not map back to the address (getaddrinfo): ``paranoid``
  (libwrap's sock_hostname does the same double check);
* else the name.

Lookups run on threads (at most MAX_THREADS at once), so one slow lookup
holds up no other. The master's side (``Resolver``) never blocks: requests
are sent with MSG_DONTWAIT (``ask`` says False when the channel is full or
the child cannot be started), answers are read when the channel is readable.
"""

from __future__ import annotations

import contextlib
import encodings.idna  # noqa: F401  (a lookup needs it; as nobody it may not be importable)
import pwd
import socket
import threading
from collections.abc import Callable

from poolinetd.launch import privileges, spawn
from poolinetd.observe import log

MAX_THREADS = 32  # lookups the child runs at once
MAX_MESSAGE = 1100  # an answer: an id, a blank, a name (at most 1025 bytes, NI_MAXHOST)
UNKNOWN = "unknown"
PARANOID = "paranoid"

Fork = Callable[[Callable[[], int], tuple[int, ...]], int]


class Resolver:
    """The master's side: the child's pid and channel.

    ``on_answer(request_id, name)`` is called for each answer; ``on_lost()``
    when the child is gone with requests unanswered (their callers decide
    without a name: libwrap's ``unknown``). ``watch(sock, handler)`` and
    ``unwatch(sock)`` register the channel with the engine's selector.
    """

    def __init__(self, on_answer: Callable[[int, str], None], on_lost: Callable[[], None],
                 watch: Callable[[socket.socket, Callable[[int], None]], object],
                 unwatch: Callable[[socket.socket], object], fork: Fork | None = None) -> None:
        self._fork = fork or spawn.fork_child
        self.on_answer = on_answer
        self.on_lost = on_lost
        self.watch = watch
        self.unwatch = unwatch
        self.pid = 0
        self.sock: socket.socket | None = None
        self.failed_logged = False

    def ask(self, request_id: int, address: str) -> bool:
        """Send one lookup; False if it cannot go now (no child, channel full)."""
        sock = self._channel()
        if sock is None:
            return False
        try:
            sock.send(f"{request_id} {address}".encode(), socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            self._lost()
            return False
        return True

    def on_readable(self, _mask: int = 0) -> None:
        """Read every answer that has arrived (never blocks)."""
        while self.sock is not None:
            try:
                data = self.sock.recv(MAX_MESSAGE, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._lost()
                return
            ident, _, name = data.decode("ascii", "replace").partition(" ")
            if ident.isdigit() and name:
                self.on_answer(int(ident), name)

    def child_exited(self, pid: int) -> bool:
        """Whether reaped ``pid`` was the resolver (the next ``ask`` starts another)."""
        if not pid or pid != self.pid:
            return False
        self._lost()
        return True

    def close(self) -> None:
        """Close the channel: the child exits at EOF."""
        if self.sock is not None:
            self.unwatch(self.sock)
            self.sock.close()
            self.sock = None

    def _channel(self) -> socket.socket | None:
        if self.sock is not None:
            return self.sock
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            ours.setblocking(False)
            self.pid = self._fork(lambda: run_resolver(theirs), (theirs.fileno(),))
        except OSError as exc:
            ours.close()
            if not self.failed_logged:
                log.error("resolver_failed", error=exc.strerror,
                          action="host names are unknown to tcp_wrappers")
                self.failed_logged = True
            return None
        finally:
            theirs.close()
        self.failed_logged = False
        self.sock = ours
        self.watch(ours, self.on_readable)
        return ours

    def _lost(self) -> None:
        self.pid = 0
        if self.sock is not None:
            self.unwatch(self.sock)
            self.sock.close()
            self.sock = None
            self.on_lost()


def run_resolver(sock: socket.socket) -> int:
    """The child's whole life: answer lookups until the master closes the channel."""
    spawn.set_title("poolinetd: resolver")
    with contextlib.suppress(KeyError, privileges.PrivilegeError):
        nobody = pwd.getpwnam("nobody")
        privileges.drop(nobody.pw_uid, nobody.pw_gid, ())
    slots = threading.BoundedSemaphore(MAX_THREADS)
    sending = threading.Lock()
    while True:
        try:
            data = sock.recv(MAX_MESSAGE)
        except InterruptedError:
            continue
        except OSError:
            data = b""
        if not data:
            return 0  # the master is gone, or closed the channel
        ident, _, address = data.decode("ascii", "replace").partition(" ")
        slots.acquire()
        threading.Thread(target=_answer, args=(sock, sending, slots, ident, address),
                         daemon=True).start()


def _answer(sock: socket.socket, sending: threading.Lock, slots: threading.BoundedSemaphore,
            ident: str, address: str) -> None:
    try:
        try:
            name = host_name(address)
        except Exception:  # an answer, whatever happens: the master need not wait it out
            name = UNKNOWN
        with sending, contextlib.suppress(OSError):
            sock.send(f"{ident} {name}".encode("ascii", "replace"))
    finally:
        slots.release()


def host_name(address: str) -> str:
    """The name libwrap would give ``address``: verified name, ``unknown`` or ``paranoid``."""
    try:
        info = socket.getaddrinfo(address, None, 0, socket.SOCK_STREAM, 0,
                                  socket.AI_NUMERICHOST)
        name, _ = socket.getnameinfo(info[0][4], socket.NI_NAMEREQD)
    except (OSError, UnicodeError, IndexError):
        return UNKNOWN
    if not name or not name.isascii() or " " in name:
        return UNKNOWN
    try:
        forward = socket.getaddrinfo(name, None, info[0][0], socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return PARANOID
    want = _canonical(str(info[0][4][0]))
    if any(_canonical(str(got[4][0])) == want for got in forward):
        return name
    return PARANOID


def _canonical(address: str) -> str:
    with contextlib.suppress(OSError, ValueError):
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        plain = address.split("%", 1)[0]
        return socket.inet_ntop(family, socket.inet_pton(family, plain))
    return address

