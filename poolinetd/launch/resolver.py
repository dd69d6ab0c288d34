"""The resolver: a child process that looks up clients' host names for tcp_wrappers.

Touches the OS: fork, a SOCK_SEQPACKET socketpair (requests, down) and a
pipe (answers, up), the system resolver (getnameinfo, getaddrinfo), threads
in the child.

Why a child: a name lookup can take seconds (a DNS server that does not
answer), and the master has one thread that must never wait. Only rules
that need a name (host names, ``.domain``, KNOWN, UNKNOWN, PARANOID, LOCAL)
ask for one (admission/tcpwrappers.py answers NEED_NAME); the connection
then waits in the engine (engine/wrappers_stage.py) under a deadline, and is
decided when the answer arrives.

The child runs as ``nobody`` where that user exists and holds nothing but
its ends of the channel. As with a pool worker (docs/design.md, "The wire"),
nothing the child sends can carry a descriptor into the master: a child
taken over (through a hostile DNS answer) could otherwise attach a socket
with a linger time that blocks whoever closes it last. Answers come up a
pipe, one line each (at most MAX_MESSAGE bytes: one atomic write), and the
master's end of the socketpair is shut for reading. What a lookup imports
(the idna codec) is imported before the fork: as nobody, the interpreter's
library may not be readable.
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
import os
import pwd
import socket
import threading
from collections.abc import Callable
from typing import Protocol

from poolinetd.launch import privileges, spawn
from poolinetd.observe import log

MAX_THREADS = 32  # lookups the child runs at once
MAX_MESSAGE = 1100  # an answer: an id, a blank, a name (at most 1025 bytes, NI_MAXHOST)
UNKNOWN = "unknown"
PARANOID = "paranoid"

Fork = Callable[[Callable[[], int], tuple[int, ...]], int]


class Watchable(Protocol):
    """What the engine's selector watches: anything with a file descriptor."""

    def fileno(self) -> int: ...


Watch = Callable[[Watchable, Callable[[int], None]], object]
Unwatch = Callable[[Watchable], object]


class Resolver:
    """The master's side: the child's pid and channel.

    ``on_answer(request_id, name)`` is called for each answer; ``on_lost()``
    when the child is gone with requests unanswered (their callers decide
    without a name: libwrap's ``unknown``). ``watch(sock, handler)`` and
    ``unwatch(sock)`` register the channel with the engine's selector.
    """

    def __init__(self, on_answer: Callable[[int, str], None], on_lost: Callable[[], None],
                 watch: Watch, unwatch: Unwatch, fork: Fork | None = None) -> None:
        self._fork = fork or spawn.fork_child
        self.on_answer = on_answer
        self.on_lost = on_lost
        self.watch = watch
        self.unwatch = unwatch
        self.pid = 0
        self.sock: socket.socket | None = None  # requests, down (shut for reading here)
        self.answers: _Answers | None = None  # answers, up (a pipe: no descriptors)
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
        answers = self.answers
        if answers is None:
            return
        lines = answers.read()
        if lines is None:
            self._lost()
            return
        for line in lines:
            ident, _, name = line.decode("ascii", "replace").partition(" ")
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
        self._close_channel()

    def _close_channel(self) -> None:
        if self.answers is not None:
            self.unwatch(self.answers)
            self.answers.close()
            self.answers = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _channel(self) -> socket.socket | None:
        if self.sock is not None:
            return self.sock
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        up_read, up_write = os.pipe2(os.O_CLOEXEC)
        try:
            ours.shutdown(socket.SHUT_RD)  # the child can queue nothing (no fds) to us
            ours.setblocking(False)
            os.set_blocking(up_read, False)
            self.pid = self._fork(lambda: run_resolver(theirs, up_write),
                                  (theirs.fileno(), up_write))
        except OSError as exc:
            ours.close()
            os.close(up_read)
            if not self.failed_logged:
                log.error("resolver_failed", error=exc.strerror,
                          action="host names are unknown to tcp_wrappers")
                self.failed_logged = True
            return None
        finally:
            theirs.close()
            os.close(up_write)
        self.failed_logged = False
        self.sock = ours
        self.answers = _Answers(up_read)
        self.watch(self.answers, self.on_readable)
        return ours

    def _lost(self) -> None:
        self.pid = 0
        if self.sock is not None or self.answers is not None:
            self._close_channel()
            self.on_lost()


class _Answers:
    """The read end of the answers pipe (owned: ``close``), split into lines.

    ``read`` gives the complete lines that arrived (at most 64 KiB per call),
    [] if none yet, None at EOF or when the child breaks the framing (a line
    longer than MAX_MESSAGE): the caller drops the child.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.partial = b""

    def fileno(self) -> int:
        return self.fd

    def read(self) -> list[bytes] | None:
        try:
            data = os.read(self.fd, 65536)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            return None
        if not data:
            return None
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        if len(self.partial) > MAX_MESSAGE:
            return None
        return lines

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def run_resolver(sock: socket.socket, answers: int) -> int:
    """The child's whole life: answer lookups (one line each up ``answers``, a pipe)
    until the master closes the channel."""
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
        threading.Thread(target=_answer, args=(answers, sending, slots, ident, address),
                         daemon=True).start()


def _answer(answers: int, sending: threading.Lock, slots: threading.BoundedSemaphore,
            ident: str, address: str) -> None:
    try:
        try:
            name = host_name(address)
        except Exception:  # an answer, whatever happens: the master need not wait it out
            name = UNKNOWN
        line = f"{ident} {name}".encode("ascii", "replace").replace(b"\n", b"?")
        with sending, contextlib.suppress(OSError):
            os.write(answers, line[:MAX_MESSAGE - 1] + b"\n")  # one atomic write
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

