"""Registering RPC services with rpcbind: a small ONC RPC client of poolinetd's own.

Touches the OS: a unix stream socket to rpcbind's local endpoint
(``/run/rpcbind.sock``), non-blocking, inside the engine's selector; and
``/proc/PID/fd`` for an upgrade's hand-over (``held_by``).

Wire (RFC 5531 calls, RFC 1833 RPCB version 3, record marking on a stream):
each call is one record ``[last-fragment bit | length]`` + the call; the
argument of SET (1) and UNSET (2) is ``rpcb {prog, vers, netid, uaddr,
owner}``; DUMP (4) lists every mapping (GETADDR would answer for the
transport it is asked over, the local socket, not for the netid named).
Over the local socket rpcbind takes the owner from the peer's credentials
(root is "superuser"), so what a root master registers only root can
unset; and it accepts SET and UNSET there without ``-i`` or ``-L``. XDR is
a few big-endian words and padded strings (``xdrlib`` is deprecated),
written here.

Never blocks the engine: one call at a time, sent whole (a few hundred bytes
into an empty local socket) and answered through the selector under
``CALL_TIMEOUT``. When rpcbind is not there (no socket, refused, no answer)
the work waits ``backoff`` (0.5 s doubling to ``BACKOFF_MAX``) and is tried
again; the first failure of a streak is logged (``rpcbind_unavailable``).

    registrar.sync(wanted)     the mappings that should be registered now
                               (every open RPC listener's); the rest of what
                               this master registered is unset
    registrar.disown(maps)     an upgrade: the new master serves these sockets
                               now; never unset them
    registrar.stop()           stopping: unset what remains, no retries
    registrar.state(name)      (registered, why not) for status

What a SET finds: rpcbind refuses a mapping that exists. When the one there
has our port it is this very socket's (an upgrade's old master registered
it: the new master adopted the socket with its port), so it is kept as it
is: no gap. Any other port is a leftover (a master that was killed), unset,
then set. An unset first asks DUMP and unsets only a mapping that still
names our port, so a newer owner's mapping is never removed.

fd ownership: the registrar owns its one connection to rpcbind (closed when
the work is done, on any failure, and at ``close``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import stat
import struct
from collections.abc import Callable, Collection, Generator, Iterable
from dataclasses import dataclass

from poolinetd.observe import log

SOCKET_PATH = "/run/rpcbind.sock"
RPCBPROG, RPCBVERS = 100000, 3
SET, UNSET, DUMP = 1, 2, 4
CALL_TIMEOUT = 2.0  # seconds for one answer from the local rpcbind
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0
# How often what this master registered is checked against rpcbind's table (one DUMP):
# an rpcbind restarted without -w has forgotten every mapping, and nothing else says so.
AUDIT_INTERVAL = 10.0
MAX_RECORD = 64 * 1024  # an answer to these calls is a few dozen bytes
MAX_STRING = 1024

Clock = Callable[[], float]
# A call's steps: it yields a request's argument (procedure, rpcb) and is sent the
# result's bytes; its return value says whether the mapping is now as wanted.
Steps = Generator[tuple[int, bytes], bytes, bool]


class RpcError(Exception):
    """An answer that is not a successful RPC reply (denied, garbled, wrong call)."""


# -- XDR ------------------------------------------------------------------------------------


def xdr_uint(value: int) -> bytes:
    return struct.pack(">I", value)


def xdr_string(text: str) -> bytes:
    data = text.encode()
    return xdr_uint(len(data)) + data + b"\0" * (-len(data) % 4)


def call_message(xid: int, prog: int, vers: int, proc: int, args: bytes) -> bytes:
    """An RPC call (RFC 5531): CALL, RPC version 2, AUTH_NONE credentials and verifier."""
    return struct.pack(">10I", xid, 0, 2, prog, vers, proc, 0, 0, 0, 0) + args


def record(message: bytes) -> bytes:
    """``message`` as one record (a single, last fragment) for a stream transport."""
    return xdr_uint(0x8000_0000 | len(message)) + message


class Reader:
    """Reads XDR values off a byte string; raises RpcError past its end."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def uint(self) -> int:
        if self.pos + 4 > len(self.data):
            raise RpcError("answer cut short")
        (value,) = struct.unpack_from(">I", self.data, self.pos)
        self.pos += 4
        return int(value)

    def opaque(self, limit: int = MAX_STRING) -> bytes:
        size = self.uint()
        if size > limit or self.pos + size > len(self.data):
            raise RpcError("string too long or cut short")
        data = self.data[self.pos : self.pos + size]
        self.pos += size + (-size % 4)
        return data

    def string(self) -> str:
        return self.opaque().decode("ascii", "replace")


def reply_result(message: bytes, xid: int) -> bytes:
    """The result bytes of a successful reply to call ``xid``; raises RpcError otherwise."""
    rd = Reader(message)
    if rd.uint() != xid:
        raise RpcError("answer to another call")
    if rd.uint() != 1:
        raise RpcError("not a reply")
    if rd.uint() != 0:
        raise RpcError("call denied (RPC version mismatch or authentication)")
    rd.uint()  # verifier flavour
    rd.opaque(400)  # verifier body
    accept = rd.uint()
    if accept != 0:
        raise RpcError(f"call not accepted (status {accept})")
    return rd.data[rd.pos :]


class Records:
    """Reassembles records (RFC 5531 section 11) from a stream; bounded in size."""

    def __init__(self) -> None:
        self.buf = b""
        self.fragments = b""

    def feed(self, data: bytes) -> list[bytes]:
        """Every record ``data`` completes; raises RpcError for a record over MAX_RECORD."""
        self.buf += data
        out: list[bytes] = []
        while len(self.buf) >= 4:
            (mark,) = struct.unpack_from(">I", self.buf)
            size = mark & 0x7FFF_FFFF
            if size + len(self.fragments) > MAX_RECORD:
                raise RpcError("answer too big")
            if len(self.buf) < 4 + size:
                break
            self.fragments += self.buf[4 : 4 + size]
            self.buf = self.buf[4 + size :]
            if mark & 0x8000_0000:
                out.append(self.fragments)
                self.fragments = b""
        return out


# -- what is registered ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Mapping:
    """One rpcbind entry: program, version, transport (netid) -> the socket's address."""

    prog: int
    vers: int
    netid: str  # udp, tcp (IPv4), udp6, tcp6
    address: str  # the socket's bound address (an IPv4 netid of a dual socket: 0.0.0.0)
    port: int

    @property
    def uaddr(self) -> str:
        """The universal address (RFC 5665): ``h1.h2.h3.h4.p1.p2``, ``::.p1.p2``."""
        return f"{self.address}.{self.port >> 8}.{self.port & 0xFF}"

    def rpcb(self, uaddr: str) -> bytes:
        """This mapping as an rpcb argument (the owner is taken from our credentials)."""
        return (xdr_uint(self.prog) + xdr_uint(self.vers) + xdr_string(self.netid)
                + xdr_string(uaddr) + xdr_string(""))


def mappings(prog: int, versions: Iterable[int], netids: Iterable[str], family: str,
             address: str, port: int) -> list[Mapping]:
    """What one RPC listener registers: every version over every netid.

    ``family``/``address``/``port`` are where the socket is bound
    (``listeners.Bound``); a dual-stack socket's IPv4 netid names 0.0.0.0 for
    the wildcard and the IPv4 address of a mapped one.
    """
    out: list[Mapping] = []
    for netid in netids:
        where = address
        if family == "inet6" and not netid.endswith("6"):
            where = address.removeprefix("::ffff:") if address.startswith("::ffff:") \
                else "0.0.0.0"
        out.extend(Mapping(prog, vers, netid, where, port) for vers in versions)
    return out


def uaddr_port(uaddr: str) -> int:
    """The port a universal address names; -1 for none (the empty string, garbage)."""
    parts = uaddr.rsplit(".", 2)
    if len(parts) != 3 or not (parts[1].isdigit() and parts[2].isdigit()):
        return -1
    return int(parts[1]) * 256 + int(parts[2])


def dump_table(rd: Reader) -> dict[tuple[int, int, str], int]:
    """(program, version, netid) -> port, from a DUMP answer (an XDR list: a 1 before
    each ``rpcb``, a 0 at its end); the first entry of a key wins, as in rpcbind."""
    table: dict[tuple[int, int, str], int] = {}
    for _ in range(MAX_RECORD // 24):  # an entry takes at least 24 bytes: bounded
        if not rd.uint():
            break
        prog, vers, netid, uaddr = rd.uint(), rd.uint(), rd.string(), rd.string()
        rd.string()  # owner
        table.setdefault((prog, vers, netid), uaddr_port(uaddr))
    return table


def registered_port(rd: Reader, m: Mapping) -> int:
    """The port rpcbind maps ``m``'s program, version and netid to; -1 when none."""
    return dump_table(rd).get((m.prog, m.vers, m.netid), -1)


def held_by(pid: int, socks: Iterable[socket.socket]) -> set[socket.socket]:
    """Which of ``socks`` process ``pid`` also holds (its /proc/PID/fd names the same
    socket inode). An upgrade's old master asks it of the new one: a socket the new
    master adopted is its to register and unset now."""
    inodes: set[int] = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return set()
    for name in names:
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{name}")
            if target.startswith("socket:[") and target.endswith("]"):
                inodes.add(int(target[8:-1]))
    out: set[socket.socket] = set()
    for sock in socks:
        with contextlib.suppress(OSError):
            st = os.fstat(sock.fileno())
            if stat.S_ISSOCK(st.st_mode) and st.st_ino in inodes:
                out.add(sock)
    return out


# -- the registrar --------------------------------------------------------------------------


class Registrar:
    """Keeps rpcbind's mappings in step with the RPC listeners this master has open."""

    def __init__(self, sel: selectors.BaseSelector, clock: Clock,
                 path: str = SOCKET_PATH) -> None:
        self.sel = sel
        self.clock = clock
        self.path = path
        self.wanted: dict[Mapping, str] = {}  # should be registered -> its service's name
        self.registered: dict[Mapping, str] = {}  # registered by this master (or adopted)
        self.errors: dict[str, str] = {}  # service -> why its registration is not complete
        self.sock: socket.socket | None = None
        self.records = Records()
        self.steps: Steps | None = None  # the mapping being set or unset, step by step
        self.job: tuple[bool, Mapping] | None = None  # (set?, mapping) of ``steps``
        self.xid = int.from_bytes(os.urandom(4), "big") & 0x7FFF_FFFF
        self.deadline = 0.0  # of the call in flight
        self.retry_at = 0.0  # rpcbind was unavailable: nothing is tried before this
        self.backoff = 0.0
        self.down = False  # the last call failed for want of rpcbind (logged once)
        self.audit_at = 0.0  # when the registered mappings are checked next (0: not due)
        self.stopping = False

    # -- what the engine says -----------------------------------------------------------------
    def sync(self, wanted: dict[Mapping, str]) -> None:
        """These mappings should be registered (and nothing else this master registered)."""
        self.wanted = wanted
        for name in set(self.errors) - set(wanted.values()):
            del self.errors[name]
        self._pump()

    def disown(self, maps: Collection[Mapping]) -> None:
        """Forget ``maps`` without unsetting them: another master serves their sockets."""
        for m in maps:
            self.registered.pop(m, None)
            self.wanted.pop(m, None)

    def stop(self) -> None:
        """Stopping: what is left is unset once, without retries."""
        self.stopping = True
        self.retry_at = 0.0
        self._pump()

    def busy(self) -> bool:
        """Work left that a stop waits for (unsets of what this master registered)."""
        return any(m not in self.wanted for m in self.registered)

    def state(self, name: str) -> tuple[bool, str]:
        """Whether every mapping of service ``name`` is registered, and why not."""
        done = all(m in self.registered for m, owner in self.wanted.items() if owner == name)
        return done, self.errors.get(name, "" if done else "registering with rpcbind")

    def next_deadline(self) -> float | None:
        if self.steps is not None:
            return self.deadline
        if self.retry_at:
            return self.retry_at if self._next_job() is not None else None
        return self.audit_at if self.audit_at and self.registered else None

    def expire(self, now: float) -> None:
        if self.steps is not None and now >= self.deadline:
            self._unavailable(f"no answer within {CALL_TIMEOUT:g} s")
        elif self.steps is None and self.retry_at and now >= self.retry_at:
            self.retry_at = 0.0
            self._pump()
        elif (self.steps is None and not self.retry_at and not self.stopping
              and self.audit_at and now >= self.audit_at):
            self.audit_at = 0.0
            self._audit_now()

    def close(self) -> None:
        self._disconnect()

    # -- the work ----------------------------------------------------------------------------
    def _next_job(self) -> tuple[bool, Mapping] | None:
        """Unsets first (a moved program frees its mappings before they are set again)."""
        for m in self.registered:
            if m not in self.wanted:
                return False, m
        if self.stopping:
            return None
        for m in self.wanted:
            if m not in self.registered:
                return True, m
        return None

    def _pump(self) -> None:
        """Start the next call if none is in flight and nothing makes us wait."""
        while self.steps is None:
            if self.retry_at and not self.stopping:
                return
            job = self._next_job()
            if job is None:
                self._disconnect()
                if self.registered and not self.audit_at and not self.stopping:
                    self.audit_at = self.clock() + AUDIT_INTERVAL
                return
            if self.sock is None and not self._connect():
                return
            self.job = job
            want, m = job
            self.steps = self._set(m) if want else self._unset(m)
            if not self._advance(None):
                return

    def _connect(self) -> bool:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            reason = ("no rpcbind socket" if exc.errno == errno.ENOENT
                      else exc.strerror or str(exc))
            self._unavailable(f"{self.path}: {reason}")
            return False
        self.sock = sock
        self.records = Records()
        self.sel.register(sock, selectors.EVENT_READ, self._on_readable)
        return True

    def _disconnect(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(sock)
            sock.close()

    def _advance(self, result: bytes | None) -> bool:
        """Give the call in flight its ``result`` (None: start it), send its next request;
        True when the job ended and the next one may start."""
        assert self.steps is not None
        try:
            proc, args = self.steps.send(result) if result is not None else next(self.steps)
        except StopIteration as done:
            if self.job is None:  # an audit: what it found missing is set again next
                self.steps = None
            else:
                self._finished(self.job, bool(done.value))
            return True
        except RpcError as exc:
            self._unavailable(str(exc))
            return False
        self.xid = (self.xid + 1) & 0x7FFF_FFFF
        message = record(call_message(self.xid, RPCBPROG, RPCBVERS, proc, args))
        assert self.sock is not None
        try:
            sent = self.sock.send(message)
        except OSError as exc:
            self._unavailable(exc.strerror or str(exc))
            return False
        if sent != len(message):  # a local socket with room takes a small record whole
            self._unavailable("rpcbind is not reading its socket")
            return False
        self.deadline = self.clock() + CALL_TIMEOUT
        return False

    def _on_readable(self, _mask: int = 0) -> None:
        if self.sock is None:
            return
        try:
            data = self.sock.recv(MAX_RECORD)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._unavailable(exc.strerror or str(exc))
            return
        if not data:
            self._unavailable("rpcbind closed the connection")
            return
        try:
            answers = self.records.feed(data)
            for answer in answers:
                if self.steps is None:
                    raise RpcError("an answer nobody asked for")
                if self._advance(reply_result(answer, self.xid)):
                    self._pump()
        except RpcError as exc:
            self._unavailable(str(exc))

    def _audit_now(self) -> None:
        """Check every registered mapping against rpcbind's table (one DUMP)."""
        if self.sock is None and not self._connect():
            return
        self.steps, self.job = self._audit(), None
        if self._advance(None):
            self._pump()

    def _audit(self) -> Steps:
        table = dump_table(Reader((yield DUMP, b"")))
        lost: dict[str, list[Mapping]] = {}
        for m in list(self.registered):
            if table.get((m.prog, m.vers, m.netid)) != m.port:
                lost.setdefault(self.registered.pop(m), []).append(m)
        for name, maps in lost.items():
            log.warning("rpc_mapping_lost", service=name, program=maps[0].prog,
                        mappings=len(maps), port=maps[0].port,
                        action="registered again (was rpcbind restarted?)")
        return True

    def _set(self, m: Mapping) -> Steps:
        if Reader((yield SET, m.rpcb(m.uaddr))).uint():
            return True
        there = registered_port(Reader((yield DUMP, b"")), m)
        if there == m.port:
            return True  # this very socket, registered by the master before us (upgrade)
        if there >= 0:
            yield UNSET, m.rpcb("")  # a leftover of a master that is gone
        return bool(Reader((yield SET, m.rpcb(m.uaddr))).uint())

    def _unset(self, m: Mapping) -> Steps:
        there = registered_port(Reader((yield DUMP, b"")), m)
        if there == m.port:  # still ours: never remove a newer owner's mapping
            yield UNSET, m.rpcb("")
        return True

    def _finished(self, job: tuple[bool, Mapping], ok: bool) -> None:
        self.steps = self.job = None
        want, m = job
        if self.down:
            log.info("rpcbind_available", path=self.path)
            self.down = False
        if ok:
            self.backoff = 0.0  # a refusal keeps doubling its wait
        if not want:
            name = self.registered.pop(m, "")
            if not any(owner == name for owner in self.registered.values()):
                log.info("rpc_unregistered", service=name, program=m.prog, port=m.port)
            return
        name = self.wanted.get(m, "")
        if not ok:
            # rpcbind keeps another owner's mapping: say so; try again after a while.
            why = (f"rpcbind refused program {m.prog} version {m.vers} over {m.netid} "
                   "(registered by another user?)")
            if self.errors.get(name) != why:
                log.error("rpc_register_failed", service=name, program=m.prog, version=m.vers,
                          netid=m.netid, error=why)
            self.errors[name] = why
            self._wait(self.clock())
            return
        self.registered[m] = name
        mine = [w for w, owner in self.wanted.items() if owner == name]
        if all(w in self.registered for w in mine):
            self.errors.pop(name, None)
            versions = sorted({w.vers for w in mine})
            log.info("rpc_registered", service=name, program=m.prog,
                     versions=f"{versions[0]}-{versions[-1]}",
                     netids=",".join(sorted({w.netid for w in mine})), port=m.port)

    def _unavailable(self, why: str) -> None:
        """rpcbind did not answer as it should: drop the connection; wait, then retry (when
        stopping: give up what is left, said once)."""
        self._disconnect()
        self.steps = self.job = None
        now = self.clock()
        if self.stopping:
            left = [m for m in self.registered if m not in self.wanted]
            if left:
                log.warning("rpcbind_unavailable", path=self.path, error=why,
                            action=f"{len(left)} mappings left registered: stopping")
            for m in left:
                del self.registered[m]
            return
        first, self.down = not self.down, True
        retry = self._wait(now)
        for name in set(self.wanted.values()):
            if not self.state(name)[0]:
                self.errors[name] = f"rpcbind unavailable: {why}; retrying in {retry:g} s"
        if first:
            log.warning("rpcbind_unavailable", path=self.path, error=why, retry_in=retry,
                        action="registrations retried until rpcbind answers")

    def _wait(self, now: float) -> float:
        self.backoff = min(BACKOFF_MAX, self.backoff * 2) if self.backoff else BACKOFF_FIRST
        self.retry_at = now + self.backoff
        return self.backoff
